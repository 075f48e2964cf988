//! The content-addressed store on disk: the only code that writes cache
//! files.
//!
//! Layout under the data directory: `blobs/sha256/<aa>/<hex>` for content,
//! `blobs/tmp/` for fills in progress. A file becomes visible under its
//! digest only after its bytes were hashed, matched, fsynced and renamed;
//! `tmp/` is emptied at startup, so no partial file survives a restart.
//!
//! A committed file is *sealed*: its modification time is set to a fixed
//! instant ([`SEAL`]) before the rename. Any later write or truncation —
//! by anything but graft — sets it to the present, so one `stat` on open
//! tells a file graft committed from one changed behind its back, without
//! hashing it (see `check.rs`).
//! Every method here does blocking file I/O: callers on the async workers
//! go through `spawn_blocking`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::CacheError;
use crate::oci::Digest;

/// Committed files kept open for the hits to come: a hot manifest or
/// layer is then served without an `open` at all. Each holds a descriptor
/// (well under the usual 1024 limit), and an evicted file's blocks are
/// freed only when its descriptor closes, so the number stays small.
const OPEN_FILES: u64 = 256;

/// The modification time of a sealed file: 2000-01-01T00:00:00Z, a time no
/// write made today can have.
pub(crate) const SEAL: Duration = Duration::from_secs(946_684_800);

fn seal_time() -> SystemTime {
    UNIX_EPOCH + SEAL
}

/// A committed file, opened: its length, and whether it is still sealed.
pub(crate) struct Opened {
    pub(crate) file: Arc<File>,
    pub(crate) len: u64,
    pub(crate) sealed: bool,
}

/// Free space on the data directory's file system (what an unprivileged
/// writer may use), in bytes.
pub(crate) fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The store on disk.
pub(crate) struct Store {
    root: PathBuf,
    tmp: PathBuf,
    seq: AtomicU64,
    /// Recently hit files, open, with their length. Content-addressed files
    /// never change once committed; removing one drops it from here too.
    open_files: moka::sync::Cache<Digest, (Arc<File>, u64)>,
}

impl Store {
    /// Opens the store under `data_dir`, removing leftovers of interrupted
    /// fills.
    pub(crate) fn open(data_dir: &Path) -> Result<Arc<Store>, CacheError> {
        let root = data_dir.join("blobs");
        let tmp = root.join("tmp");
        // Emptied, not removed and made again: on a full disk a new
        // directory may not fit, and deleting must still work.
        if tmp.is_dir() {
            for leftover in std::fs::read_dir(&tmp)? {
                let path = leftover?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
        }
        std::fs::create_dir_all(&tmp)?;
        std::fs::create_dir_all(root.join("sha256"))?;
        Ok(Arc::new(Store {
            root,
            tmp,
            seq: AtomicU64::new(0),
            open_files: moka::sync::Cache::new(OPEN_FILES),
        }))
    }

    /// Only sha256 content is cached; other algorithms pass through.
    pub(crate) fn cacheable(digest: &Digest) -> bool {
        digest.algorithm() == "sha256"
    }

    pub(crate) fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.encoded();
        self.root.join(digest.algorithm()).join(&hex[..2]).join(hex)
    }

    /// A committed file already open, without any I/O (`None`: call
    /// [`Store::open_file`]).
    pub(crate) fn already_open(&self, digest: &Digest) -> Option<(Arc<File>, u64)> {
        self.open_files.get(digest)
    }

    /// Opens a committed file, if there is one (blocking: the file system),
    /// without trusting it yet: the caller checks it and then calls
    /// [`Store::keep_open`].
    pub(crate) fn open_file(&self, digest: &Digest) -> Option<Opened> {
        if !Store::cacheable(digest) {
            return None;
        }
        let f = File::open(self.path_of(digest)).ok()?;
        let meta = f.metadata().ok()?;
        let sealed = meta.modified().ok() == Some(seal_time());
        Some(Opened {
            file: Arc::new(f),
            len: meta.len(),
            sealed,
        })
    }

    /// Keeps a checked file open for the next hits.
    pub(crate) fn keep_open(&self, digest: &Digest, file: Arc<File>, len: u64) {
        self.open_files.insert(digest.clone(), (file, len));
    }

    /// Seals a file whose bytes were just verified (committed before files
    /// were sealed, or found unsealed after an unclean stop).
    pub(crate) fn seal(file: &File) -> std::io::Result<()> {
        file.set_modified(seal_time())
    }

    /// Root of the store (its file system is the one free space is
    /// measured on).
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        Store::cacheable(digest) && self.path_of(digest).is_file()
    }

    /// Starts writing `digest`'s content to a temp file.
    pub(crate) fn writer(self: &Arc<Self>, digest: &Digest) -> Result<Writer, CacheError> {
        self.new_writer(Some(digest.clone()))
    }

    /// A writer for content whose digest is known only at the end (a blob
    /// upload passing through): commit it with [`Writer::commit_as`].
    pub(crate) fn upload_writer(self: &Arc<Self>) -> Result<Writer, CacheError> {
        self.new_writer(None)
    }

    fn new_writer(self: &Arc<Self>, digest: Option<Digest>) -> Result<Writer, CacheError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let stem = digest.as_ref().map_or("upload", |d| d.encoded());
        let path = self.tmp.join(format!("{stem}-{}-{n}", std::process::id()));
        let file = File::create(&path)?;
        Ok(Writer {
            store: self.clone(),
            digest,
            path,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            committed: false,
        })
    }

    /// Removes a committed file (eviction, a failed verify); `Ok(false)`
    /// when it was already gone. Open readers keep their inode.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<bool, CacheError> {
        self.open_files.invalidate(digest);
        match std::fs::remove_file(self.path_of(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every committed digest with its size (for `cache verify`, and for
    /// rebuilding entries that the index lost).
    pub(crate) fn list(&self) -> Result<Vec<(Digest, u64)>, CacheError> {
        let mut out = Vec::new();
        let base = self.root.join("sha256");
        for shard in std::fs::read_dir(&base)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(shard.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                    out.push((d, f.metadata()?.len()));
                }
            }
        }
        Ok(out)
    }

    /// Hashes an open file from its start; `Ok(false)` when it does not
    /// match `digest`. Reads by offset, leaving other readers undisturbed.
    pub(crate) fn hash_matches(file: &File, digest: &Digest) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = file.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hex::encode(h.finalize()) == digest.encoded())
    }

    /// Re-hashes a committed file; `Ok(false)` when it no longer matches.
    pub(crate) fn verify(&self, digest: &Digest) -> Result<bool, CacheError> {
        let mut f = File::open(self.path_of(digest))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()) == digest.encoded())
    }
}

/// A temp file being filled. Dropping it without [`Writer::commit`] means
/// the write failed: the temp file is deleted.
pub(crate) struct Writer {
    store: Arc<Store>,
    digest: Option<Digest>,
    path: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    written: u64,
    /// Renamed into place: the temp file is no longer ours to delete.
    committed: bool,
}

impl Writer {
    /// The temp file's path, for readers that follow a fill in progress.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), CacheError> {
        let f = self.open()?;
        f.write_all(chunk)?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Closes the temp file, keeping it and the hash so far: an upload idle
    /// between chunks then holds no descriptor. The next write reopens it.
    pub(crate) fn close(&mut self) {
        self.file = None;
    }

    /// The temp file, reopened for appending after [`Writer::close`].
    fn open(&mut self) -> Result<&mut File, CacheError> {
        if self.committed {
            return Err(CacheError::Io(std::io::Error::other(
                "writer used after commit",
            )));
        }
        match &mut self.file {
            Some(f) => Ok(f),
            slot => {
                let f = std::fs::OpenOptions::new().append(true).open(&self.path)?;
                Ok(slot.insert(f))
            }
        }
    }

    /// Bytes written (and hashed) so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Gives the temp file up (it is deleted; open readers keep its inode)
    /// and returns the hash of the bytes it holds and their count, for a
    /// fill that goes on without a file.
    pub(crate) fn abandon(mut self) -> (Sha256, u64) {
        (std::mem::take(&mut self.hasher), self.written)
    }

    /// Verifies the digest, fsyncs, and renames into place. On a mismatch
    /// nothing becomes visible.
    pub(crate) fn commit(self) -> Result<u64, CacheError> {
        let digest = self
            .digest
            .clone()
            .expect("commit needs the digest given at creation");
        self.commit_as(&digest)
    }

    /// Like [`Writer::commit`], for a digest learnt at the end.
    pub(crate) fn commit_as(mut self, digest: &Digest) -> Result<u64, CacheError> {
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if !Store::cacheable(digest) || actual != digest.encoded() {
            return Err(CacheError::DigestMismatch {
                expected: digest.to_string(),
                actual: format!("sha256:{actual}"),
            });
        }
        let file = self.open()?;
        Store::seal(file)?;
        file.sync_all()?;
        self.file = None;
        let dest = self.store.path_of(digest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&self.path, &dest)?;
        self.committed = true;
        // The rename is durable only once the directory entry is.
        if let Some(parent) = dest.parent() {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(self.written)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_becomes_visible_only_when_it_matches_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let d = Digest::sha256_of(b"hello world");
        let mut w = store.writer(&d).expect("writer");
        w.write(b"hello ").expect("write");
        assert!(!store.contains(&d));
        w.write(b"world").expect("write");
        assert_eq!(w.commit().expect("commit"), 11);
        let opened = store.open_file(&d).expect("visible");
        assert_eq!((opened.len, opened.sealed), (11, true));
        assert!(store.verify(&d).expect("verify"));

        let bad = Digest::sha256_of(b"other");
        let mut w = store.writer(&bad).expect("writer");
        let tmp = w.path().to_path_buf();
        w.write(b"not other").expect("write");
        assert!(matches!(w.commit(), Err(CacheError::DigestMismatch { .. })));
        assert!(!store.contains(&bad));
        assert!(!tmp.exists(), "temp file left behind");
    }

    #[test]
    fn a_file_written_after_its_commit_is_no_longer_sealed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let d = Digest::sha256_of(b"sealed");
        let mut w = store.writer(&d).expect("writer");
        w.write(b"sealed").expect("write");
        w.commit().expect("commit");
        assert!(store.open_file(&d).expect("file").sealed);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(store.path_of(&d))
            .expect("open for writing");
        f.write_all(b"S").expect("overwrite");
        drop(f);
        let opened = store.open_file(&d).expect("file");
        assert!(!opened.sealed, "a changed file still looks sealed");
        Store::seal(&opened.file).expect("reseal through a read-only descriptor");
        assert!(store.open_file(&d).expect("file").sealed);
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let d = Digest::sha256_of(b"x");
        let w = store.writer(&d).expect("writer");
        let tmp = w.path().to_path_buf();
        std::mem::forget(w);
        assert!(tmp.exists());
        drop(store);
        let _store = Store::open(dir.path()).expect("reopen");
        assert!(!tmp.exists());
    }
}
