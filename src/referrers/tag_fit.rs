//! The size rule for the fallback tags graft writes: the index must fit
//! the registry's manifest limit (`referrers.max_tag_bytes`, distribution's
//! 4 MiB by default), or the registry refuses it and old clients never see
//! the referrers after it.
//!
//! Every referrer keeps its digest, media type, size and artifact type in
//! the tag, always: a referrer is never hidden from old clients to save
//! space. Annotations go first, from the entries whose annotations take the
//! most bytes down, until the index fits (graft's own API keeps them all).
//! When even the bare descriptors do not fit, nothing is written. The rule
//! is deterministic, so the same referrers give the same bytes and an
//! unchanged tag is not rewritten.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::oci::{Descriptor, ImageIndex};

/// What the size rule made of a tag's entries.
pub(super) enum Fit {
    /// These entries fit; `stripped` of them lost their annotations.
    Fits {
        entries: Vec<Descriptor>,
        stripped: usize,
    },
    /// Without any annotations the index still takes `bare_bytes`.
    TooLarge { bare_bytes: usize },
}

/// Applies the size rule to `entries` (in the order they are written).
pub(super) fn fit(mut entries: Vec<Descriptor>, limit: usize) -> Fit {
    let whole = ImageIndex::of(entries.clone()).to_bytes().len();
    if whole <= limit {
        return Fit::Fits {
            entries,
            stripped: 0,
        };
    }
    // Bytes each entry's annotations take in the compact JSON: removing
    // them changes that entry alone, so the savings add up exactly.
    let mut savings: Vec<(usize, usize)> = entries
        .iter()
        .enumerate()
        .filter(|(_, d)| d.annotations.is_some())
        .map(|(i, d)| (json_len(d).saturating_sub(json_len(&bare(d))), i))
        .collect();
    savings.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| entries[a.1].digest.cmp(&entries[b.1].digest))
    });
    let mut size = whole;
    let mut strip = Vec::new();
    for (saved, i) in savings {
        if size <= limit {
            break;
        }
        size -= saved;
        strip.push(i);
    }
    if size > limit {
        return Fit::TooLarge { bare_bytes: size };
    }
    for &i in &strip {
        entries[i].annotations = None;
    }
    Fit::Fits {
        entries,
        stripped: strip.len(),
    }
}

fn bare(d: &Descriptor) -> Descriptor {
    Descriptor {
        annotations: None,
        ..d.clone()
    }
}

fn json_len(d: &Descriptor) -> usize {
    serde_json::to_vec(d).map_or(0, |v| v.len())
}

/// What the size rule and the registry's refusals did, for `/metrics`.
#[derive(Default)]
pub(crate) struct TagSizeCounters {
    /// Referrer descriptors written to a fallback tag without their
    /// annotations.
    pub(super) annotations_dropped: AtomicU64,
    /// Tag writes not attempted: the bare descriptors exceed the limit.
    pub(super) too_large: AtomicU64,
    /// Tag writes the registry refused with 400 or 413, not retried.
    pub(super) refused: AtomicU64,
}

impl TagSizeCounters {
    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn annotations_dropped(&self) -> u64 {
        self.annotations_dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn too_large(&self) -> u64 {
        self.too_large.load(Ordering::Relaxed)
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use serde_json::{Map, Value};

    fn desc(seed: &str, annotation_bytes: usize) -> Descriptor {
        let annotations = (annotation_bytes > 0).then(|| {
            let mut m = Map::new();
            m.insert("a".into(), Value::String("x".repeat(annotation_bytes)));
            m
        });
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest::sha256_of(seed.as_bytes()),
            size: 100,
            artifact_type: Some("application/vnd.example.sig".into()),
            annotations,
            other: Map::new(),
        }
    }

    fn len(entries: &[Descriptor]) -> usize {
        ImageIndex::of(entries.to_vec()).to_bytes().len()
    }

    #[test]
    fn an_index_that_fits_is_left_alone() {
        let entries = vec![desc("a", 10), desc("b", 0)];
        let Fit::Fits {
            entries: got,
            stripped,
        } = fit(entries.clone(), 10_000)
        else {
            panic!("fits");
        };
        assert_eq!(stripped, 0);
        assert_eq!(got, entries);
    }

    #[test]
    fn annotations_go_from_the_largest_entries_first_until_it_fits() {
        let entries = vec![desc("a", 3000), desc("b", 2000), desc("c", 1000)];
        let limit = len(&entries) - 3000 - 1500;
        let Fit::Fits {
            entries: got,
            stripped,
        } = fit(entries.clone(), limit)
        else {
            panic!("fits once annotations go");
        };
        assert_eq!(stripped, 2);
        assert!(len(&got) <= limit, "{} > {limit}", len(&got));
        assert!(got[0].annotations.is_none() && got[1].annotations.is_none());
        assert_eq!(got[2], entries[2], "the smallest keeps its annotations");
        for (g, e) in got.iter().zip(&entries) {
            assert_eq!(
                (&g.digest, &g.media_type, g.size, &g.artifact_type),
                (&e.digest, &e.media_type, e.size, &e.artifact_type)
            );
        }
    }

    #[test]
    fn bare_descriptors_that_do_not_fit_are_not_written() {
        let entries = vec![desc("a", 50), desc("b", 0)];
        let bare: Vec<_> = entries.iter().map(bare).collect();
        match fit(entries, len(&bare) - 1) {
            Fit::TooLarge { bare_bytes } => assert_eq!(bare_bytes, len(&bare)),
            Fit::Fits { .. } => panic!("cannot fit"),
        }
    }

    #[test]
    fn the_rule_is_exact_at_the_limit() {
        let entries = vec![desc("a", 500), desc("b", 400)];
        let stripped_a = vec![bare(&entries[0]), entries[1].clone()];
        let Fit::Fits { entries: got, .. } = fit(entries, len(&stripped_a)) else {
            panic!("fits exactly");
        };
        assert_eq!(got, stripped_a);
    }
}
