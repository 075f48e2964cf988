//! Real OCI clients (`skopeo`, the `oci-client` crate) push and pull whole
//! images through graft, and what comes back is byte-identical.

mod common;

use common::image::{read_oci_layout, OCI_LAYER_TAR};
use common::{require_tool, Api, Graft, Registry, TestImage};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// Runs `skopeo` with `args`, failing the test with its output on error.
async fn skopeo(args: &[&str]) {
    let bin = require_tool("skopeo");
    let output = tokio::process::Command::new(&bin)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    assert!(
        output.status.success(),
        "skopeo {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn skopeo_copies_a_three_layer_image_through_graft_and_back_byte_for_byte() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let work = tempfile::tempdir().expect("work dir");
    let image = TestImage::build(3);
    let source = work.path().join("source");
    image.write_oci_layout(&source, "v1");
    let remote = format!("docker://{}/library/layered:v1", graft.host());

    skopeo(&[
        "copy",
        "--insecure-policy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", source.display()),
        &remote,
    ])
    .await;

    // It reached the upstream through graft, unchanged.
    registry.wait_for_access("the manifest PUT", |e| {
        e.method == "PUT" && e.uri == "/v2/library/layered/manifests/v1"
    });
    let direct = Api::for_registry(&registry);
    assert_eq!(
        direct.get_manifest("library/layered", "v1").await,
        image.manifest
    );

    let copy = work.path().join("copy");
    skopeo(&[
        "copy",
        "--insecure-policy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &remote,
        &format!("oci:{}:v1", copy.display()),
    ])
    .await;

    let pulled = read_oci_layout(&copy, "v1");
    assert_eq!(pulled.manifest_digest, image.digest);
    assert_eq!(pulled.manifest, image.manifest, "manifest bytes");
    assert_eq!(image.layers.len(), 3);
    for blob in image.blobs() {
        assert_eq!(
            pulled.blobs.get(&blob.digest),
            Some(&blob.data),
            "blob {} ({})",
            blob.digest,
            blob.media_type
        );
    }
    assert_eq!(
        pulled.blobs.len(),
        5,
        "config, three layers and the manifest"
    );
}

#[tokio::test]
async fn oci_client_crate_pushes_and_pulls_an_image_through_graft() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: Reference = format!("{}/tools/cli:1.0", graft.host())
        .parse()
        .expect("image reference");
    let image = TestImage::build(2);
    let layers: Vec<ImageLayer> = image
        .layers
        .iter()
        .map(|l| ImageLayer::new(l.data.clone(), l.media_type.clone(), None))
        .collect();
    let config = Config::oci_v1(image.config.data.clone(), None);

    client
        .push(&reference, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .expect("push through graft");
    let pulled = client
        .pull(&reference, &RegistryAuth::Anonymous, vec![OCI_LAYER_TAR])
        .await
        .expect("pull through graft");

    assert_eq!(pulled.config.data, image.config.data);
    let manifest = pulled.manifest.as_ref().expect("pulled manifest");
    let layer_digests: Vec<&str> = manifest.layers.iter().map(|l| l.digest.as_str()).collect();
    let pushed_digests: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layer_digests, pushed_digests, "layer order in the manifest");
    // oci-client downloads layers concurrently and returns them in arrival order.
    let mut pulled_layers: Vec<_> = pulled.layers.iter().map(|l| l.data.clone()).collect();
    let mut pushed_layers: Vec<_> = image.layers.iter().map(|l| l.data.clone()).collect();
    pulled_layers.sort();
    pushed_layers.sort();
    assert_eq!(pulled_layers, pushed_layers);
    registry.wait_for_access("the manifest PUT", |e| {
        e.method == "PUT" && e.uri == "/v2/tools/cli/manifests/1.0"
    });
    let digest = pulled.digest.expect("pulled digest");
    assert_eq!(
        common::sha256_digest(
            &Api::for_registry(&registry)
                .get_manifest("tools/cli", &digest)
                .await
        ),
        digest
    );
}
