//! Referrer artifacts for the referrers tests: subjects, signature- and
//! SBOM-like manifests with `subject`, and fallback-tag indexes, as clients
//! such as oras, notation and cosign write them.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{sha256_digest, Api, TestImage};

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// The empty JSON blob `{}` every artifact uses as config.
pub fn empty_descriptor() -> Value {
    json!({ "mediaType": EMPTY, "digest": sha256_digest(b"{}"), "size": 2 })
}

/// A pushed subject image: its descriptor for `subject` fields.
#[derive(Clone, Debug)]
pub struct Subject {
    pub digest: String,
    pub size: usize,
    pub media_type: &'static str,
}

impl Subject {
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }

    /// `sha256-<hex>`: the referrers fallback tag of this subject.
    pub fn fallback_tag(&self) -> String {
        self.digest.replacen(':', "-", 1)
    }

    /// A subject that does not exist (the spec allows referrers to it).
    pub fn missing(seed: &str) -> Subject {
        Subject {
            digest: sha256_digest(seed.as_bytes()),
            size: 1234,
            media_type: MANIFEST,
        }
    }
}

/// Pushes a one-layer image tagged `tag` plus the empty config blob that
/// artifacts reference, and returns the image as a subject.
pub async fn push_subject(api: &Api, repo: &str, tag: &str) -> Subject {
    let image = TestImage::build(1);
    api.push_image(repo, tag, &image).await;
    api.push_blob(repo, Bytes::from_static(b"{}")).await;
    Subject {
        digest: image.digest.clone(),
        size: image.manifest.len(),
        media_type: TestImage::MEDIA_TYPE,
    }
}

/// An image manifest with `subject`: `artifact_type` set or not, config
/// media type `config_type` (the empty type unless given), `annotations`.
pub fn artifact(
    subject: &Subject,
    artifact_type: Option<&str>,
    config_type: Option<&str>,
    annotations: Option<Value>,
) -> Bytes {
    let mut config = empty_descriptor();
    if let Some(t) = config_type {
        config["mediaType"] = json!(t);
    }
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config,
        "layers": [empty_descriptor()],
        "subject": subject.descriptor(),
    });
    if let Some(t) = artifact_type {
        m["artifactType"] = json!(t);
    }
    if let Some(a) = annotations {
        m["annotations"] = a;
    }
    Bytes::from(serde_json::to_vec(&m).expect("serialise manifest"))
}

/// The referrer descriptor the spec says a registry lists for `manifest`.
pub fn expected_descriptor(manifest: &[u8]) -> Value {
    let m: Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let mut d = json!({
        "mediaType": m["mediaType"],
        "digest": sha256_digest(manifest),
        "size": manifest.len(),
    });
    let artifact_type = match (&m["artifactType"], &m["config"]["mediaType"]) {
        (Value::String(t), _) => Some(t.clone()),
        (_, Value::String(c)) if m["mediaType"] == MANIFEST => Some(c.clone()),
        _ => None,
    };
    if let Some(t) = artifact_type {
        d["artifactType"] = json!(t);
    }
    if m.get("annotations").is_some() {
        d["annotations"] = m["annotations"].clone();
    }
    d
}

/// A fallback-tag index listing `entries` (descriptors).
pub fn fallback_index(entries: &[Value]) -> Bytes {
    Bytes::from(
        serde_json::to_vec(
            &json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": entries }),
        )
        .expect("serialise index"),
    )
}

/// GETs `/v2/<repo>/referrers/<digest>` (with `query`) and returns the
/// response after checking the status is 200.
pub async fn referrers(api: &Api, repo: &str, digest: &str, query: &str) -> reqwest::Response {
    let path = format!("/v2/{repo}/referrers/{digest}{query}");
    let resp = Api::send(api.get(&path)).await;
    super::api::expect_status(resp, reqwest::StatusCode::OK, "GET referrers").await
}

/// The `manifests` of a referrers answer, checking the index envelope.
pub async fn referrer_list(resp: reqwest::Response) -> Vec<Value> {
    let ct = super::header_str(resp.headers(), "content-type");
    assert_eq!(ct.as_deref(), Some(INDEX), "referrers Content-Type");
    let body: Value = resp.json().await.expect("referrers JSON");
    assert_eq!(body["schemaVersion"], 2);
    assert_eq!(body["mediaType"], INDEX);
    body["manifests"]
        .as_array()
        .expect("manifests array")
        .clone()
}

/// Digests listed in the upstream's fallback tag for `subject`, read from
/// the registry directly; empty when the tag does not exist.
pub async fn upstream_fallback_digests(
    registry_api: &Api,
    repo: &str,
    subject: &Subject,
) -> Vec<String> {
    let resp = Api::send(
        registry_api
            .get(&format!("/v2/{repo}/manifests/{}", subject.fallback_tag()))
            .header("accept", INDEX),
    )
    .await;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Vec::new();
    }
    let resp = super::api::expect_status(resp, reqwest::StatusCode::OK, "GET fallback tag").await;
    let body: Value = resp.json().await.expect("fallback index JSON");
    let mut digests: Vec<String> = body["manifests"]
        .as_array()
        .expect("manifests array")
        .iter()
        .map(|d| d["digest"].as_str().expect("digest").to_owned())
        .collect();
    digests.sort();
    digests
}

/// Sorted digests of a list of descriptors.
pub fn digests_of(list: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|d| d["digest"].as_str().expect("digest").to_owned())
        .collect();
    v.sort();
    v
}

impl Subject {
    /// A pushed manifest as a subject, for referrers of referrers (a
    /// countersignature's subject is the signature).
    pub fn of(manifest: &[u8], media_type: &'static str) -> Subject {
        Subject {
            digest: sha256_digest(manifest),
            size: manifest.len(),
            media_type,
        }
    }
}

/// Pushes an image manifest by digest through `api` (graft, or the registry
/// directly to bypass graft); returns its digest.
pub async fn push_by_digest(api: &Api, repo: &str, manifest: &Bytes) -> String {
    api.push_manifest(repo, &sha256_digest(manifest), MANIFEST, manifest.clone())
        .await
}

/// Writes `tag` (a fallback tag) as an index of `entries` through `api`, as
/// a tag-schema client does.
pub async fn put_fallback_tag(api: &Api, repo: &str, tag: &str, entries: &[Value]) {
    api.push_manifest(repo, tag, INDEX, fallback_index(entries))
        .await;
}

/// A subject with one signature (`application/vnd.example.sig`) and the
/// fallback tag listing it, pushed through `api` as a tag-schema client
/// does; returns the subject and the signature manifest.
pub async fn push_signed_subject(api: &Api, repo: &str) -> (Subject, Bytes) {
    let subject = push_subject(api, repo, "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    push_by_digest(api, repo, &sig).await;
    put_fallback_tag(
        api,
        repo,
        &subject.fallback_tag(),
        &[expected_descriptor(&sig)],
    )
    .await;
    (subject, sig)
}

/// The `graft` binary, run in `dir` (so no `config/graft.toml` is picked
/// up) with no `GRAFT_*` settings from the test's environment.
pub fn graft_command(dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_graft"));
    command.current_dir(dir).stdin(std::process::Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GRAFT_") {
            command.env_remove(key);
        }
    }
    command
}
