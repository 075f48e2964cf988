//! Test images: an OCI image manifest with a JSON config and uncompressed
//! tar layers, and the OCI image layout directories `skopeo` reads and
//! writes (`oci-layout`, `index.json`, `blobs/sha256/<hex>`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use bytes::Bytes;
use serde_json::json;

use super::{random_bytes, sha256_digest};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A content-addressed blob and the media type it is referenced with.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Bytes,
}

impl Blob {
    pub fn new(media_type: &str, data: impl Into<Bytes>) -> Blob {
        let data = data.into();
        Blob {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&data),
            data,
        }
    }

    /// The OCI descriptor (`mediaType`, `digest`, `size`).
    pub fn descriptor(&self) -> serde_json::Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.data.len() })
    }
}

/// An OCI image whose manifest bytes are fixed once built (pushing and
/// comparing use exactly these bytes).
#[derive(Clone, Debug)]
pub struct TestImage {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Bytes,
    /// Digest of `manifest`.
    pub digest: String,
}

impl TestImage {
    pub const MEDIA_TYPE: &'static str = OCI_MANIFEST;

    /// An image with `layers` tar layers of a few random small files each;
    /// every call gives different content.
    pub fn build(layers: usize) -> TestImage {
        let layers: Vec<Blob> = (0..layers)
            .map(|n| Blob::new(OCI_LAYER_TAR, tar_layer(n)))
            .collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": ["PATH=/usr/bin:/bin"] },
            "rootfs": {
                "type": "layers",
                // Uncompressed layers: each diff_id is the layer's digest.
                "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
            },
        });
        let config = Blob::new(
            OCI_CONFIG,
            serde_json::to_vec(&config).expect("config JSON"),
        );
        TestImage::from_parts(config, layers)
    }

    /// The manifest for `config` and `layers`.
    pub fn from_parts(config: Blob, layers: Vec<Blob>) -> TestImage {
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifest JSON"));
        TestImage {
            digest: sha256_digest(&manifest),
            config,
            layers,
            manifest,
        }
    }

    /// Config first, then the layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }

    /// The manifest's descriptor, as an index or a referrer lists it.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({ "mediaType": OCI_MANIFEST, "digest": self.digest, "size": self.manifest.len() })
    }

    /// Writes an OCI image layout at `dir` holding this image, tagged
    /// `ref_name` (`org.opencontainers.image.ref.name`), as `skopeo`'s
    /// `oci:<dir>:<ref_name>` reads it.
    pub fn write_oci_layout(&self, dir: &Path, ref_name: &str) {
        let mut blobs = BTreeMap::new();
        for blob in self.blobs() {
            blobs.insert(blob.digest.clone(), blob.data.clone());
        }
        blobs.insert(self.digest.clone(), self.manifest.clone());
        let mut descriptor = self.descriptor();
        descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": ref_name });
        let index =
            json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] });

        let blob_dir = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blob_dir).expect("create layout blob dir");
        for (digest, data) in &blobs {
            fs::write(blob_dir.join(hex_part(digest)), data).expect("write layout blob");
        }
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("index JSON"),
        )
        .expect("write index.json");
    }
}

/// What an OCI image layout holds for one tag.
pub struct LayoutImage {
    pub manifest: Bytes,
    pub manifest_digest: String,
    /// Every blob file in the layout, by digest.
    pub blobs: BTreeMap<String, Bytes>,
}

/// Reads the manifest tagged `ref_name` and all blobs of an OCI layout.
pub fn read_oci_layout(dir: &Path, ref_name: &str) -> LayoutImage {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).expect("read index.json"))
            .expect("index.json is JSON");
    let entry = index["manifests"]
        .as_array()
        .expect("index.json has manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == ref_name)
        .unwrap_or_else(|| panic!("no manifest tagged {ref_name} in {index}"));
    let manifest_digest = entry["digest"]
        .as_str()
        .expect("manifest digest")
        .to_owned();

    let mut blobs = BTreeMap::new();
    for file in fs::read_dir(dir.join("blobs").join("sha256")).expect("list layout blobs") {
        let file = file.expect("layout blob entry");
        let name = file.file_name().to_string_lossy().into_owned();
        let data = Bytes::from(fs::read(file.path()).expect("read layout blob"));
        blobs.insert(format!("sha256:{name}"), data);
    }
    let manifest = blobs
        .get(&manifest_digest)
        .unwrap_or_else(|| panic!("manifest blob {manifest_digest} missing from layout"))
        .clone();
    LayoutImage {
        manifest,
        manifest_digest,
        blobs,
    }
}

/// A small uncompressed tar with three files of random text.
fn tar_layer(n: usize) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for i in 0..3 {
        let contents = hex::encode(random_bytes(64 + 32 * i));
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(
                &mut header,
                format!("layer{n}/file{i}.txt"),
                contents.as_bytes(),
            )
            .expect("append tar entry");
    }
    builder.into_inner().expect("finish tar")
}

fn hex_part(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("a sha256 digest")
}
