//! The spec's nouns, validated where they are made: [`Digest`],
//! [`RepoName`], [`Reference`], [`Descriptor`], [`ImageIndex`], and the
//! error codes of the distribution spec.

pub(crate) mod descriptor;
pub(crate) mod digest;
mod error_code;
pub(crate) mod name;
pub mod query;

pub use descriptor::{Descriptor, ImageIndex, ManifestFields};
pub use digest::Digest;
pub use error_code::ErrorCode;
pub use name::{Reference, RepoName};

/// Media types graft needs to recognise.
pub mod media {
    pub const IMAGE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const IMAGE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// What graft accepts when it fetches a manifest for itself: every
    /// manifest and index type it can read a `subject` or a layer list from.
    pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
}
