//! The index's schema version, and the migration from the previous one.
//!
//! Version 2 stamps the values of the trees that are pruned by age
//! (`present`, `tombstones`, `rejected`, `fallback_seen`); version 1 left
//! them unstamped. Opening a version-1 index stamps every such entry with
//! "now": it then ages out one full bound after the upgrade, never at once.

use super::{stamp, IndexError};

const VERSION_KEY: &str = "schema_version";
const CURRENT: &[u8] = b"2";
const PREVIOUS: &[u8] = b"1";

/// Trees whose version-1 values were empty and become a bare stamp.
const STAMPED_EMPTY: &[&str] = &["present", "tombstones", "rejected"];

/// Checks the version, migrating a version-1 index to the current one.
pub(super) fn check_and_migrate(db: &sled::Db, now_secs: u64) -> Result<(), IndexError> {
    let meta = db.open_tree("meta")?;
    match meta.get(VERSION_KEY)? {
        None => {
            meta.insert(VERSION_KEY, CURRENT)?;
        }
        Some(v) if v.as_ref() == CURRENT => {}
        Some(v) if v.as_ref() == PREVIOUS => {
            migrate_from_1(db, now_secs)?;
            db.flush()?;
            // Only once every value is converted: a crash before this line
            // reruns a migration that is safe to repeat.
            meta.insert(VERSION_KEY, CURRENT)?;
            db.flush()?;
            tracing::info!("index migrated from schema 1 to 2 (pruning stamps added)");
        }
        Some(v) => {
            return Err(IndexError::Schema {
                found: String::from_utf8_lossy(&v).into_owned(),
                expected: String::from_utf8_lossy(CURRENT).into_owned(),
            })
        }
    }
    Ok(())
}

fn migrate_from_1(db: &sled::Db, now_secs: u64) -> Result<(), IndexError> {
    for name in STAMPED_EMPTY {
        let tree = db.open_tree(name)?;
        for k in tree.iter().keys() {
            let k = k?;
            tree.insert(k, &stamp(now_secs))?;
        }
    }
    // Version 1 held the tag digest alone ("sha256:…", starting with a
    // letter); version 2 puts the stamp first (a zero byte for centuries),
    // so a value already converted is recognised and left alone.
    let seen = db.open_tree("fallback_seen")?;
    for kv in seen.iter() {
        let (k, v) = kv?;
        if v.first().is_some_and(u8::is_ascii_alphanumeric) {
            let mut nv = stamp(now_secs).to_vec();
            nv.extend_from_slice(&v);
            seen.insert(k, nv)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::clock::Clock;
    use crate::index::{key, Index, IndexError};
    use crate::oci::{Digest, RepoName};

    /// Writes an index the way schema 1 did, then opens it.
    #[test]
    fn a_schema_1_index_is_stamped_with_now_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, d, s) = ("a/b", Digest::sha256_of(b"d"), Digest::sha256_of(b"s"));
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree("meta")
                .expect("meta")
                .insert("schema_version", "1")
                .expect("version");
            let k = key(&[repo, d.as_str()]);
            db.open_tree("present")
                .expect("t")
                .insert(&k, &[])
                .expect("w");
            db.open_tree("tombstones")
                .expect("t")
                .insert(&k, &[])
                .expect("w");
            let rk = key(&[repo, s.as_str(), d.as_str()]);
            db.open_tree("rejected")
                .expect("t")
                .insert(rk, &[])
                .expect("w");
            db.open_tree("fallback_seen")
                .expect("t")
                .insert(key(&[repo, s.as_str()]), "sha256:abc")
                .expect("w");
            db.flush().expect("flush");
        }
        let clock = Clock::skewable();
        let ix = Index::open_with(
            dir.path(),
            clock.clone(),
            crate::config::DEFAULT_INDEX_CACHE_BYTES,
        )
        .expect("migrated");
        let repo = RepoName::parse(repo).expect("name");
        assert!(ix.present().contains(&repo, &d).expect("read"));
        assert!(ix.referrers().is_tombstoned(&repo, &d).expect("read"));
        assert!(ix.referrers().is_rejected(&repo, &s, &d).expect("read"));
        assert_eq!(
            ix.referrers()
                .fallback_seen(&repo, &s)
                .expect("read")
                .as_deref(),
            Some("sha256:abc")
        );
        // "Now" at migration: a day-long bound keeps them, until a day passes.
        let now = clock.now_secs();
        let bounds =
            crate::index::PruneBounds::uniform(std::time::Duration::from_secs(86_400), 100);
        assert_eq!(ix.prune(&bounds, now).removed(), 0);
        assert_eq!(ix.prune(&bounds, now + 86_400).removed(), 4);
        drop(ix);
        // A second open finds schema 2 and changes nothing.
        let ix = Index::open(dir.path()).expect("reopen");
        assert!(ix
            .referrers()
            .fallback_seen(&repo, &s)
            .expect("read")
            .is_none());
    }

    #[test]
    fn an_unknown_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree("meta")
                .expect("meta")
                .insert("schema_version", "9")
                .expect("version");
            db.flush().expect("flush");
        }
        let opened = Index::open(dir.path());
        assert!(
            matches!(opened, Err(IndexError::Schema { .. })),
            "{:?}",
            opened.err()
        );
    }
}
