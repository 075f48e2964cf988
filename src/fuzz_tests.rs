//! Property-based fuzzing of everything graft parses from a client or an
//! upstream: request paths, names, references, digests, `Range`, query
//! strings, manifests and the descriptors built from them, fallback-tag
//! names. The grammars are written out here a second time, from the spec's
//! text and without sharing code with `src/oci`, so a parser that drifts from
//! the spec fails even when it agrees with itself.
//!
//! CI runs a modest number of cases (proptest's default, 256 per property);
//! `scripts/fuzz` runs the same properties for a bounded time with many more
//! (`PROPTEST_CASES`). Cases that ever failed stay below as named regression
//! tests, so they run on every build whatever the case count.

use proptest::prelude::*;
use proptest::sample::select;

use crate::cache::Store;
use crate::oci::{query, Descriptor, Digest, ImageIndex, ManifestFields, Reference, RepoName};
use crate::proxy::serve::{parse_range, RangeAnswer};
use crate::referrers::{is_fallback_tag, subject_of_tag};
use crate::route::Route;

// ---------------------------------------------------------------------------
// The spec's grammars, independently (distribution-spec "Pulling manifests";
// image-spec descriptor.md "Digests").

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`
/// as a state machine over characters.
fn spec_name(s: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum At {
        /// A component must start here.
        Start,
        /// Inside `[a-z0-9]+`: the only accepting state.
        Alnum,
        /// After `.` or `__`: an alphanumeric must follow.
        Sep,
        /// After one `_`: a second `_` or an alphanumeric.
        Under,
        /// Inside `-+`.
        Dash,
    }
    let mut at = At::Start;
    for c in s.chars() {
        let alnum = c.is_ascii_lowercase() || c.is_ascii_digit();
        at = match (at, c) {
            (_, _) if alnum => At::Alnum,
            (At::Alnum, '.') => At::Sep,
            (At::Alnum, '_') => At::Under,
            (At::Under, '_') => At::Sep,
            (At::Alnum | At::Dash, '-') => At::Dash,
            (At::Alnum, '/') => At::Start,
            _ => return false,
        };
    }
    at == At::Alnum
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
fn spec_tag(s: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if word(c) => {}
        _ => return false,
    }
    let rest: Vec<char> = chars.collect();
    rest.len() <= 127 && rest.iter().all(|&c| word(c) || c == '.' || c == '-')
}

/// `digest ::= algorithm ":" encoded`;
/// `algorithm ::= algorithm-component (algorithm-separator algorithm-component)*`;
/// `algorithm-component ::= [a-z0-9]+`; `algorithm-separator ::= [+._-]`;
/// `encoded ::= [a-zA-Z0-9=_-]+`; sha256 is `[a-f0-9]{64}`, sha512
/// `[a-f0-9]{128}`.
fn spec_digest(s: &str) -> bool {
    let Some(colon) = s.chars().position(|c| c == ':') else {
        return false;
    };
    let chars: Vec<char> = s.chars().collect();
    let (alg, enc) = (&chars[..colon], &chars[colon + 1..]);
    let component = |c: &char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let separator = |c: &char| matches!(c, '+' | '.' | '_' | '-');
    // Components non-empty: no separator first, last, or twice in a row.
    let alg_ok = !alg.is_empty()
        && alg.iter().all(|c| component(c) || separator(c))
        && component(&alg[0])
        && component(&alg[alg.len() - 1])
        && alg
            .windows(2)
            .all(|w| !(separator(&w[0]) && separator(&w[1])));
    let enc_ok = !enc.is_empty()
        && enc
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '=' | '_' | '-'));
    let hex = |n: usize| enc.len() == n && enc.iter().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    let alg: String = alg.iter().collect();
    alg_ok
        && enc_ok
        && match alg.as_str() {
            "sha256" => hex(64),
            "sha512" => hex(128),
            _ => true,
        }
}

/// Whether text is safe as a single path component: graft builds file and
/// upstream paths from accepted names, tags, digests and upload ids.
fn safe_component(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

// ---------------------------------------------------------------------------
// Strategies: mostly the characters the grammars care about, so that
// near-misses are common; and valid values built from the grammar.

fn tricky_text(max: usize) -> impl Strategy<Value = String> {
    let chars = select(vec![
        'a', 'z', '0', '9', 'A', 'Z', '.', '_', '-', '/', ':', '+', '=', '%', '2', 'e', 'f', '\0',
        ' ', '\\', '?', '#', '&', 'é', '\u{202e}',
    ]);
    prop_oneof![
        3 => proptest::collection::vec(chars, 0..max).prop_map(|v| v.into_iter().collect()),
        1 => any::<String>(),
    ]
}

fn valid_component() -> impl Strategy<Value = String> {
    let run = "[a-z0-9]{1,6}";
    let sep = prop_oneof![
        Just(".".to_string()),
        Just("_".into()),
        Just("__".into()),
        "-{1,3}"
    ];
    (run, proptest::collection::vec((sep, run), 0..3)).prop_map(|(first, rest)| {
        let mut s = first;
        for (sep, run) in rest {
            s.push_str(&sep);
            s.push_str(&run);
        }
        s
    })
}

fn valid_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(valid_component(), 1..4).prop_map(|v| v.join("/"))
}

fn valid_digest() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-f0-9]{64}".prop_map(|h| format!("sha256:{h}")),
        "[a-f0-9]{128}".prop_map(|h| format!("sha512:{h}")),
        (
            "[a-z0-9]{1,8}([+._-][a-z0-9]{1,4}){0,2}",
            "[a-zA-Z0-9=_-]{1,100}"
        )
            .prop_filter("registered algorithms have their own grammar", |(a, _)| {
                a != "sha256" && a != "sha512"
            })
            .prop_map(|(a, e)| format!("{a}:{e}")),
    ]
}

fn valid_tag() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
}

/// Request paths assembled from segments that matter to routing.
fn request_path() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        4 => select(vec![
            "a", "b", "library", "..", ".", "%2e%2e", "%2E.", ".%2e", "", "A", "x%2fy", "%00",
            "manifests", "blobs", "uploads", "tags", "list", "referrers", "latest", "-bad",
            "sha256:zz", "sha256%3Azz", "_catalog", "v2",
        ])
        .prop_map(str::to_string),
        1 => valid_digest(),
        1 => valid_digest().prop_map(|d| d.replace(':', "%3A")),
        1 => valid_tag(),
        1 => tricky_text(12),
    ];
    (
        select(vec!["/v2/", "/v2", "/", "/v2//", ""]),
        proptest::collection::vec(seg, 0..7),
    )
        .prop_map(|(prefix, segs)| format!("{prefix}{}", segs.join("/")))
}

/// Manifest bodies: a valid shape with fields replaced by odd values, or
/// arbitrary bytes.
fn manifest_bytes() -> impl Strategy<Value = Vec<u8>> {
    let json_value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<i64>().prop_map(serde_json::Value::from),
        select(vec![0.5, -2.25, 1e300]).prop_map(serde_json::Value::from),
        tricky_text(20).prop_map(serde_json::Value::from),
        valid_digest().prop_map(serde_json::Value::from),
        Just(serde_json::json!({})),
        Just(serde_json::json!([])),
    ];
    let shaped = (
        proptest::option::of(json_value.clone()),
        proptest::option::of(json_value.clone()),
        proptest::option::of(json_value.clone()),
        proptest::option::of(json_value.clone()),
        proptest::option::of(json_value),
        any::<bool>(),
    )
        .prop_map(|(media, artifact, digest, size, annotation, index)| {
            let mut subject = serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{}", "0".repeat(64)),
                "size": 2,
            });
            if let Some(d) = digest {
                subject["digest"] = d;
            }
            if let Some(s) = size {
                subject["size"] = s;
            }
            let mut m = serde_json::json!({
                "schemaVersion": 2,
                "config": {"mediaType": "application/vnd.example", "digest": subject["digest"], "size": 2},
                "layers": [],
                "subject": subject,
                "annotations": {"k": annotation.unwrap_or(serde_json::Value::Null)},
            });
            if let Some(v) = media {
                m["mediaType"] = v;
            }
            if let Some(v) = artifact {
                m["artifactType"] = v;
            }
            if index {
                m["manifests"] = serde_json::json!([]);
            }
            serde_json::to_vec(&m).unwrap_or_default()
        });
    prop_oneof![
        3 => shaped,
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => tricky_text(60).prop_map(String::into_bytes),
    ]
}

// ---------------------------------------------------------------------------
// Properties.

proptest! {
    #[test]
    fn fuzz_names_match_the_spec_grammar(s in prop_oneof![tricky_text(40), valid_name()]) {
        let accepted = RepoName::parse(&s).is_ok();
        prop_assert_eq!(accepted, spec_name(&s) && s.len() <= 255, "name {:?}", s);
        if accepted {
            prop_assert!(s.split('/').all(safe_component), "name {:?}", s);
        }
    }

    #[test]
    fn fuzz_valid_names_round_trip(s in valid_name()) {
        let n = RepoName::parse(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(n.as_str(), s.as_str());
        prop_assert_eq!(n.to_string(), s);
    }

    #[test]
    fn fuzz_references_match_the_spec_grammar(
        s in prop_oneof![tricky_text(140), valid_tag(), valid_digest()]
    ) {
        match Reference::parse(&s) {
            Some(Reference::Tag(t)) => {
                prop_assert!(spec_tag(&t), "tag {:?}", t);
                prop_assert!(safe_component(&t), "tag {:?}", t);
                prop_assert_eq!(&t, &s);
            }
            Some(Reference::Digest(d)) => {
                prop_assert!(spec_digest(d.as_str()), "digest {:?}", d);
                prop_assert_eq!(d.as_str(), s.as_str());
            }
            None => prop_assert!(!spec_tag(&s) && !spec_digest(&s), "{:?} refused", s),
        }
    }

    #[test]
    fn fuzz_digests_match_the_spec_grammar(s in prop_oneof![tricky_text(140), valid_digest()]) {
        match s.parse::<Digest>() {
            Ok(d) => {
                prop_assert!(spec_digest(&s), "accepted {:?}", s);
                prop_assert_eq!(d.as_str(), s.as_str());
                prop_assert_eq!(format!("{}:{}", d.algorithm(), d.encoded()), s.clone());
                // Round trips through text and JSON.
                prop_assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d.clone()));
                let json = serde_json::to_string(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(serde_json::from_str::<Digest>(&json).ok(), Some(d.clone()));
                prop_assert!(safe_component(d.algorithm()) && safe_component(d.encoded()));
            }
            Err(_) => prop_assert!(!spec_digest(&s), "refused {:?}", s),
        }
    }

    #[test]
    fn fuzz_fallback_tags_are_valid_tags(s in valid_digest()) {
        let d: Digest = s.parse().map_err(|e: crate::oci::digest::InvalidDigest| TestCaseError::fail(e.to_string()))?;
        let tag = d.fallback_tag();
        prop_assert!(spec_tag(&tag), "fallback tag {:?}", tag);
        prop_assert!(safe_component(&tag));
        prop_assert!(matches!(Reference::parse(&tag), Some(Reference::Tag(_))));
        // The tag names its subject whole for the registered algorithms.
        if d.algorithm() == "sha256" {
            prop_assert_eq!(subject_of_tag(&tag), Some(d.clone()));
        }
        if matches!(d.algorithm(), "sha256" | "sha512") {
            prop_assert!(is_fallback_tag(&tag), "{:?} not recognised", tag);
        }
        if let Some(long) = d.untruncated_fallback_tag() {
            prop_assert!(long != tag && safe_component(&long));
        }
    }

    #[test]
    fn fuzz_tag_names_never_panic(s in tricky_text(140)) {
        if let Some(d) = subject_of_tag(&s) {
            prop_assert_eq!(d.fallback_tag(), s.clone());
        }
    }

    #[test]
    fn fuzz_routes_hold_only_well_formed_values(path in request_path()) {
        let route = Route::parse(&path);
        let named = |name: &RepoName| spec_name(name.as_str())
            && name.as_str().split('/').all(safe_component);
        match route {
            Ok(Route::Manifest { name, reference }) => {
                prop_assert!(named(&name), "{:?}", path);
                let r = reference.to_string();
                prop_assert!(spec_tag(&r) || spec_digest(&r), "{:?}", path);
                prop_assert!(safe_component(&r), "{:?}", path);
            }
            Ok(Route::Blob { name, digest } | Route::Referrers { name, digest }) => {
                prop_assert!(named(&name), "{:?}", path);
                prop_assert!(spec_digest(digest.as_str()), "{:?}", path);
            }
            Ok(Route::UploadStart { name } | Route::TagsList { name }) => {
                prop_assert!(named(&name), "{:?}", path);
            }
            Ok(Route::Upload { name, id }) => {
                prop_assert!(named(&name), "{:?}", path);
                prop_assert!(safe_component(&id) && !id.contains('%'), "{:?}", path);
            }
            Ok(_) | Err(_) => {}
        }
    }

    #[test]
    fn fuzz_valid_paths_route_back_to_their_parts(
        name in valid_name(),
        reference in prop_oneof![valid_tag(), valid_digest()],
        digest in valid_digest(),
    ) {
        let want = Reference::parse(&reference);
        prop_assert!(want.is_some());
        let got = Route::parse(&format!("/v2/{name}/manifests/{reference}"));
        let expected_name = RepoName::parse(&name).ok();
        match got {
            Ok(Route::Manifest { name: n, reference: r }) => {
                prop_assert_eq!(Some(n), expected_name.clone());
                prop_assert_eq!(Some(r), want);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        let d: Option<Digest> = digest.parse().ok();
        for (kind, encoded) in [("blobs", digest.clone()), ("referrers", digest.replace(':', "%3A"))] {
            match Route::parse(&format!("/v2/{name}/{kind}/{encoded}")) {
                Ok(Route::Blob { name: n, digest: g } | Route::Referrers { name: n, digest: g }) => {
                    prop_assert_eq!(Some(n), expected_name.clone());
                    prop_assert_eq!(Some(g), d.clone());
                }
                other => prop_assert!(false, "{}: {:?}", kind, other),
            }
        }
    }

    #[test]
    fn fuzz_cache_paths_stay_in_the_store(s in valid_digest()) {
        let d: Digest = s.parse().map_err(|e: crate::oci::digest::InvalidDigest| TestCaseError::fail(e.to_string()))?;
        if Store::cacheable(&d) {
            let path = STORE.with(|(_, store)| store.path_of(&d));
            let root = STORE.with(|(dir, _)| dir.path().join("blobs"));
            let rel = path.strip_prefix(&root).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let parts: Vec<_> = rel.components().collect();
            prop_assert_eq!(parts.len(), 3, "{:?}", path);
            prop_assert!(parts.iter().all(|c| matches!(c, std::path::Component::Normal(_))));
        }
    }

    #[test]
    fn fuzz_ranges_stay_in_bounds(
        value in prop_oneof![
            tricky_text(30),
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| format!("bytes={a}-{b}")),
            (0u64..300, 0u64..300).prop_map(|(a, b)| format!("bytes={a}-{b}")),
            (0u64..300).prop_map(|a| format!("bytes={a}-")),
            any::<u64>().prop_map(|n| format!("bytes=-{n}")),
            (0u64..300).prop_map(|n| format!(" bytes=-{n} ")),
        ],
        len in prop_oneof![0u64..300, any::<u64>()],
    ) {
        match parse_range(&value, len) {
            RangeAnswer::Range(a, b) => {
                prop_assert!(a < b && b <= len, "{:?} of {} gave [{}, {})", value, len, a, b);
            }
            RangeAnswer::Unsatisfiable | RangeAnswer::Ignore => {}
        }
    }

    #[test]
    fn fuzz_satisfiable_ranges_are_exact(a in 0u64..1000, span in 0u64..1000, len in 1u64..1000) {
        let b = a + span;
        let want = if a < len { RangeAnswer::Range(a, (b + 1).min(len)) } else { RangeAnswer::Unsatisfiable };
        prop_assert_eq!(parse_range(&format!("bytes={a}-{b}"), len), want);
    }

    #[test]
    fn fuzz_query_values_round_trip(
        pairs in proptest::collection::vec(("[a-zA-Z]{1,12}", tricky_text(30)), 1..4),
        raw in tricky_text(60),
    ) {
        let mut target = "/v2/a/referrers/x".to_string();
        for (k, v) in &pairs {
            query::append(&mut target, k, v);
        }
        let q = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let got: Vec<(String, String)> =
            query::pairs(q).map(|(k, v)| (k.to_string(), v.into_owned())).collect();
        prop_assert_eq!(got, pairs);
        // Whatever a client sends parses without panicking.
        prop_assert!(query::pairs(&raw).count() <= raw.len());
    }

    #[test]
    fn fuzz_manifests_give_well_formed_descriptors(
        bytes in manifest_bytes(),
        content_type in proptest::option::of(tricky_text(20)),
        size in any::<u64>(),
    ) {
        let Some(fields) = ManifestFields::parse(&bytes) else { return Ok(()); };
        if let Some(subject) = &fields.subject {
            prop_assert!(spec_digest(subject.digest.as_str()));
        }
        let digest = Digest::sha256_of(&bytes);
        let desc = fields.referrer_descriptor(digest.clone(), size, content_type.as_deref());
        prop_assert_eq!(&desc.digest, &digest);
        prop_assert_eq!(desc.size, size);
        let is_index = desc.media_type == crate::oci::media::IMAGE_INDEX || fields.manifests.is_some();
        if fields.artifact_type.is_none() && is_index {
            prop_assert_eq!(&desc.artifact_type, &None);
        }
        // The descriptor, alone and in an index, survives JSON both ways.
        let json = serde_json::to_vec(&desc).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: Descriptor = serde_json::from_slice(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &desc);
        let index = ImageIndex::of(vec![desc.clone(), desc]);
        let parsed: ImageIndex = serde_json::from_slice(&index.to_bytes())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.manifests, index.manifests);
    }

    #[test]
    fn fuzz_fallback_indexes_never_panic(bytes in manifest_bytes()) {
        // What graft reads from a fallback tag: an index, or anything else.
        if let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes) {
            for d in &index.manifests {
                prop_assert!(spec_digest(d.digest.as_str()));
            }
        }
    }
}

thread_local! {
    /// One store per test thread for the path property (opening one per case
    /// would make the long run measure the file system).
    static STORE: (tempfile::TempDir, std::sync::Arc<Store>) = {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        (dir, store)
    };
}

// ---------------------------------------------------------------------------
// Regression cases: inputs the properties above once failed on.

/// `bytes=0-18446744073709551615`: the end's `+ 1` overflowed (a panic in
/// debug builds, an empty `[0, 0)` range in release).
#[test]
fn fuzz_regression_range_end_at_u64_max() {
    let answer = parse_range(&format!("bytes=0-{}", u64::MAX), 10);
    assert_eq!(answer, RangeAnswer::Range(0, 10));
}

#[test]
fn fuzz_grammar_checkers_agree_with_the_spec_examples() {
    for ok in ["a", "library/ubuntu", "a.b/c_d/e__f", "a--b", "x-y/z9"] {
        assert!(spec_name(ok), "{ok}");
    }
    for bad in [
        "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a_.b",
    ] {
        assert!(!spec_name(bad), "{bad}");
    }
    assert!(spec_tag("latest") && spec_tag("_x") && !spec_tag(".x") && !spec_tag(""));
    assert!(!spec_tag(&"t".repeat(129)) && spec_tag(&"t".repeat(128)));
    assert!(spec_digest(&format!("sha256:{}", "0".repeat(64))));
    assert!(spec_digest(
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"
    ));
    for bad in ["sha256:zz", "a..b:x", ":x", "a:", "a+:x", "+a:x", "a:x:y"] {
        assert!(!spec_digest(bad), "{bad}");
    }
}
