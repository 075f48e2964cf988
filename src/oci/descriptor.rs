//! Descriptors, image indexes, and the few manifest fields graft reads
//! (image-spec descriptor.md, image-index.md, manifest.md).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{media, Digest};

/// A content descriptor. Fields graft does not interpret (`platform`,
/// `urls`, `data`, …) are kept as they came.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(
        rename = "artifactType",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub annotations: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// An image index as graft writes it for the referrers API and fallback tags.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl ImageIndex {
    pub fn of(manifests: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media::IMAGE_INDEX.to_string()),
            manifests,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an index always serialises")
    }
}

/// The fields of a pushed image manifest or image index that decide whether
/// and how it is a referrer.
#[derive(Debug, Deserialize)]
pub struct ManifestFields {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub config: Option<ConfigField>,
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default)]
    pub annotations: Option<Map<String, Value>>,
    /// Present on image indexes.
    #[serde(default)]
    pub manifests: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
pub struct ConfigField {
    #[serde(rename = "mediaType")]
    pub media_type: String,
}

impl ManifestFields {
    pub fn parse(bytes: &[u8]) -> Option<ManifestFields> {
        serde_json::from_slice(bytes).ok()
    }

    /// The referrer descriptor for this manifest, pushed as `bytes` with
    /// `digest`, as distribution-spec "Listing Referrers" defines it:
    /// `artifactType` is the manifest's, else (image manifests only) its
    /// config's media type; annotations are copied verbatim.
    pub fn referrer_descriptor(
        &self,
        digest: Digest,
        size: u64,
        content_type: Option<&str>,
    ) -> Descriptor {
        let media_type = self
            .media_type
            .clone()
            .or_else(|| content_type.map(str::to_string))
            .unwrap_or_else(|| {
                if self.manifests.is_some() {
                    media::IMAGE_INDEX.to_string()
                } else {
                    media::IMAGE_MANIFEST.to_string()
                }
            });
        let is_index = media_type == media::IMAGE_INDEX || self.manifests.is_some();
        let artifact_type = self.artifact_type.clone().or_else(|| {
            if is_index {
                None
            } else {
                self.config.as_ref().map(|c| c.media_type.clone())
            }
        });
        Descriptor {
            media_type,
            digest,
            size,
            artifact_type,
            annotations: self.annotations.clone(),
            other: Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_type_falls_back_to_config_media_type_for_manifests_only() {
        let d = Digest::sha256_of(b"x");
        let m = ManifestFields::parse(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{"mediaType":"application/vnd.example.sbom","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},
                "annotations":{"a":"1"}}"#,
        )
        .expect("parses");
        let desc = m.referrer_descriptor(d.clone(), 10, None);
        assert_eq!(
            desc.artifact_type.as_deref(),
            Some("application/vnd.example.sbom")
        );
        assert_eq!(desc.annotations.expect("kept")["a"], "1");

        let i = ManifestFields::parse(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#)
            .expect("parses");
        assert_eq!(i.referrer_descriptor(d, 10, None).artifact_type, None);
    }

    #[test]
    fn descriptors_keep_unknown_fields() {
        let text = r#"{"mediaType":"m","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":3,"platform":{"os":"linux"}}"#;
        let d: Descriptor = serde_json::from_str(text).expect("parses");
        let back = serde_json::to_value(&d).expect("serialises");
        assert_eq!(back["platform"]["os"], "linux");
        assert!(back.get("artifactType").is_none());
    }
}
