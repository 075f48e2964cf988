//! graft in front of a token-auth registry (distribution with `auth:
//! token`, the test token service of `tests/common/token.rs`): a remembered
//! yes ends at the token's `exp`, online and offline; with the registry
//! stopped, a fresh token (never seen by graft) pulls cached content only
//! when graft has the registry's token-signing certificate and the token
//! validates and grants pull on that repository. graft's clock is skewed to
//! pass a token's `exp`; the registry's own refusal is shown with a token
//! minted already expired.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::token::{Access, Grant, PULL, PUSH_PULL};
use common::{
    assert_oci_error, header_str, read_metric, Api, Graft, Registry, RegistryOptions, TestImage,
    TokenAuth,
};
use common::{TokenOptions, TokenService};
use graft::clock::Clock;

/// Tokens the service issues live this long (`exp` = issue + 300 s).
const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Long enough that only a token's `exp` ends a remembered yes.
const AUTH_TTL: Duration = Duration::from_secs(3600);
const MAX_STALE: Duration = Duration::from_secs(24 * 3600);

/// A token service and a registry trusting it, with `image` pushed as
/// `app:v1`.
async fn token_registry(image: &TestImage) -> (TokenService, Registry) {
    let service = TokenService::start(TokenOptions::default().expires_in(TOKEN_TTL).user(
        "pusher",
        "pw",
        &[Grant::new("*", PUSH_PULL)],
    ));
    let registry =
        Registry::start_with(RegistryOptions::default().token_auth(service.registry_auth()));
    Api::for_registry(&registry)
        .with_bearer(&service.mint_for("app", PUSH_PULL))
        .push_image("app", "v1", image)
        .await;
    (service, registry)
}

/// graft on a skewable `clock`; with `service`'s signing certificate when
/// `trust` is given.
fn graft_on(registry: &Registry, clock: &Clock, trust: Option<&TokenService>) -> Graft {
    let clock = clock.clone();
    let trust = trust.map(|s| (s.ca_pem_path(), s.issuer(), s.service()));
    Graft::start_with(registry, move |c| {
        c.clock = clock;
        c.cache.auth_ttl = AUTH_TTL;
        c.cache.max_stale = MAX_STALE;
        if let Some((pem, issuer, service)) = trust {
            c.upstream.token_certificate = Some(pem);
            c.upstream.token_issuer = Some(issuer.to_owned());
            c.upstream.token_service = Some(service.to_owned());
        }
    })
}

async fn counter(graft: &Graft, name: &str) -> u64 {
    read_metric(&Api::for_graft(graft), name).await.unwrap_or(0)
}

/// Caches `image` (tag, manifest, first layer) through graft with a token
/// of its own, which graft then remembers.
async fn cache_through(graft: &Graft, service: &TokenService, image: &TestImage) -> Api {
    let api = Api::for_graft(graft).with_bearer(&service.mint_for("app", PULL));
    assert_eq!(api.get_manifest("app", "v1").await, image.manifest);
    let layer = &image.layers[0];
    assert_eq!(api.get_blob("app", &layer.digest).await, layer.data);
    api
}

#[tokio::test]
async fn a_remembered_yes_ends_at_the_tokens_exp_and_an_expired_token_gets_the_registrys_no() {
    let image = TestImage::build(1);
    let (service, registry) = token_registry(&image).await;
    let clock = Clock::skewable();
    let graft = graft_on(&registry, &clock, None);
    let reader = cache_through(&graft, &service, &image).await;
    let layer = &image.layers[0];
    let head_path = format!("/v2/app/blobs/{}", layer.digest);
    let checks = || counter(&graft, "graft_auth_checks_total");

    // Within auth_ttl and before exp: decided from memory.
    let before = checks().await;
    assert_eq!(reader.get_blob("app", &layer.digest).await, layer.data);
    assert_eq!(checks().await, before, "decided from memory");
    assert_eq!(registry.count_requests("HEAD", &head_path), 0);

    // Past the token's exp, still within auth_ttl: the upstream is asked
    // (and, its own clock not skewed, still says yes).
    clock.advance(TOKEN_TTL + Duration::from_secs(1));
    assert_eq!(reader.get_blob("app", &layer.digest).await, layer.data);
    assert_eq!(checks().await, before + 1, "the upstream was asked");
    registry.wait_for_access("graft's HEAD on the blob", |e| {
        e.method == "HEAD" && e.uri == head_path
    });

    // A token really expired (past the registry's 60 s leeway) gets the
    // registry's own 401 and challenge, cached content or not.
    let expired = service.mint("test", &[Access::repository("app", PULL)], -120);
    let resp = Api::send(
        Api::for_graft(&graft)
            .with_bearer(&expired)
            .get(&format!("/v2/app/blobs/{}", layer.digest)),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = header_str(resp.headers(), "www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer "), "challenge `{challenge}`");
}

#[tokio::test]
async fn offline_a_remembered_yes_ends_at_the_tokens_exp_and_a_fresh_token_is_refused() {
    let image = TestImage::build(1);
    let (service, mut registry) = token_registry(&image).await;
    let clock = Clock::skewable();
    let graft = graft_on(&registry, &clock, None);
    let reader = cache_through(&graft, &service, &image).await;
    let layer = &image.layers[0];
    let blob_path = format!("/v2/app/blobs/{}", layer.digest);
    registry.stop();

    // Without the certificate, today's rule: only the exact token graft
    // saw a yes for.
    clock.advance(TOKEN_TTL / 2);
    let fresh = Api::for_graft(&graft).with_bearer(&service.mint_for("app", PULL));
    assert_oci_error(Api::send(fresh.get(&blob_path)).await, 502, None).await;
    assert_eq!(reader.get_blob("app", &layer.digest).await, layer.data);

    // Past its exp, well within auth_ttl and max_stale: no longer.
    clock.advance(TOKEN_TTL);
    assert_oci_error(Api::send(reader.get(&blob_path)).await, 502, None).await;
    let tag = reader
        .get("/v2/app/manifests/v1")
        .header("accept", TestImage::MEDIA_TYPE);
    assert_oci_error(Api::send(tag).await, 502, None).await;
    assert_eq!(
        counter(&graft, "graft_auth_offline_token_pulls_total").await,
        0
    );
}

#[tokio::test]
async fn offline_with_the_signing_certificate_a_fresh_token_granting_pull_is_served() {
    let image = TestImage::build(1);
    let (service, mut registry) = token_registry(&image).await;
    let clock = Clock::skewable();
    let graft = graft_on(&registry, &clock, Some(&service));
    cache_through(&graft, &service, &image).await;
    let layer = &image.layers[0];
    let blob_path = format!("/v2/app/blobs/{}", layer.digest);
    let manifest_path = format!("/v2/app/manifests/{}", image.digest);
    registry.stop();

    let fresh = Api::for_graft(&graft).with_bearer(&service.mint_for("app", PULL));
    assert_eq!(fresh.get_blob("app", &layer.digest).await, layer.data);
    assert_eq!(
        fresh.get_manifest("app", &image.digest).await,
        image.manifest
    );
    assert_eq!(fresh.get_manifest("app", "v1").await, image.manifest);
    let served = counter(&graft, "graft_auth_offline_token_pulls_total").await;
    assert!(served >= 3, "{served} pulls served on a validated token");

    // Tokens the registry would refuse are refused, with today's answer.
    let refused = |token: String| {
        let api = Api::for_graft(&graft).with_bearer(&token);
        let (blob, manifest) = (blob_path.clone(), manifest_path.clone());
        async move {
            assert_oci_error(Api::send(api.get(&blob)).await, 502, None).await;
            let get = api.get(&manifest).header("accept", TestImage::MEDIA_TYPE);
            assert_oci_error(Api::send(get).await, 502, None).await;
        }
    };
    // Pull on another repository only; push without pull on this one.
    refused(service.mint_for("other", PULL)).await;
    refused(service.mint("test", &[Access::repository("app", &["push"])], 300)).await;
    // Expired past the leeway.
    refused(service.mint("test", &[Access::repository("app", PULL)], -120)).await;
    // Signed by another token service (its own CA), same issuer and audience.
    let impostor = TokenService::start(TokenOptions::default());
    refused(impostor.mint_for("app", PULL)).await;
    // A Basic credential graft never saw a yes for.
    let basic = Api::for_graft(&graft).with_basic_auth("pusher", "pw");
    assert_oci_error(Api::send(basic.get(&blob_path)).await, 502, None).await;
    assert!(counter(&graft, "graft_auth_offline_token_refusals_total").await >= 8);

    // graft's clock past the fresh token's exp and the leeway: refused too.
    clock.advance(TOKEN_TTL + Duration::from_secs(61));
    assert_oci_error(Api::send(fresh.get(&blob_path)).await, 502, None).await;
    assert_eq!(
        counter(&graft, "graft_auth_offline_token_pulls_total").await,
        served,
        "nothing more was served on a token"
    );
}

/// A token signer of the Harbor and GitLab kind, which the harness's
/// service is not: a self-signed certificate that is the registry's whole
/// bundle, its key named in tokens by `kid` (the libtrust fingerprint),
/// with no `x5c`.
struct KidSigner {
    dir: tempfile::TempDir,
    key: ring::signature::EcdsaKeyPair,
    kid: String,
}

impl KidSigner {
    fn new() -> KidSigner {
        use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "kid token signer");
        let cert = params.self_signed(&key).expect("self-signed");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bundle.pem"), cert.pem()).expect("write bundle");
        let kid = libtrust_key_id(&key.subject_public_key_info());
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, &key.serialize_der(), &rng)
            .expect("ring reads the key");
        KidSigner { dir, key, kid }
    }

    fn bundle(&self) -> std::path::PathBuf {
        self.dir.path().join("bundle.pem")
    }

    /// An ES256 token naming its key by `kid`, valid for five minutes.
    fn mint(&self, service: &TokenService, repo: &str, actions: &[&str]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let claims = serde_json::json!({
            "iss": service.issuer(), "sub": "ci", "aud": service.service(),
            "exp": now + 300, "nbf": now - 1, "iat": now, "jti": format!("{now}-{repo}-{actions:?}"),
            "access": [{"type": "repository", "name": repo, "actions": actions}],
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = ring::rand::SystemRandom::new();
        let sig = self.key.sign(&rng, input.as_bytes()).expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// libtrust's key id, written here independently of graft's: SHA-256 of
/// the DER SPKI, the first 240 bits in base32, twelve groups of four.
fn libtrust_key_id(spki: &[u8]) -> String {
    use sha2::Digest as _;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = sha2::Sha256::digest(spki);
    let bits: Vec<usize> = digest[..30]
        .iter()
        .flat_map(|byte| (0..8).rev().map(move |i| usize::from((byte >> i) & 1)))
        .collect();
    let digits: Vec<char> = bits
        .chunks(5)
        .map(|c| char::from(ALPHABET[c.iter().fold(0, |a, b| a * 2 + b)]))
        .collect();
    digits
        .chunks(4)
        .map(|g| g.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(":")
}

#[tokio::test]
async fn offline_a_kid_token_the_registry_accepts_is_validated_by_graft_too() {
    let image = TestImage::build(1);
    // The harness's service only lends its issuer, audience and realm.
    let service = TokenService::start(TokenOptions::default());
    let signer = KidSigner::new();
    let mut registry = Registry::start_with(RegistryOptions::default().token_auth(TokenAuth {
        rootcertbundle: signer.bundle(),
        ..service.registry_auth()
    }));
    // The registry itself takes the kid token: the fingerprint is libtrust's.
    Api::for_registry(&registry)
        .with_bearer(&signer.mint(&service, "app", PUSH_PULL))
        .push_image("app", "v1", &image)
        .await;
    let graft = Graft::start_with(&registry, |c| {
        c.upstream.token_certificate = Some(signer.bundle());
        c.upstream.token_issuer = Some(service.issuer().to_owned());
        c.upstream.token_service = Some(service.service().to_owned());
    });
    let layer = &image.layers[0];
    let cacher = Api::for_graft(&graft).with_bearer(&signer.mint(&service, "app", PULL));
    assert_eq!(cacher.get_blob("app", &layer.digest).await, layer.data);
    registry.stop();

    let fresh = Api::for_graft(&graft).with_bearer(&signer.mint(&service, "app", &["*"]));
    assert_eq!(fresh.get_blob("app", &layer.digest).await, layer.data);
    let elsewhere = Api::for_graft(&graft).with_bearer(&signer.mint(&service, "other", PULL));
    let blob_path = format!("/v2/app/blobs/{}", layer.digest);
    assert_oci_error(Api::send(elsewhere.get(&blob_path)).await, 502, None).await;
}

#[tokio::test]
async fn offline_a_token_the_upstream_refused_stays_refused_though_it_validates() {
    let image = TestImage::build(1);
    // The registry trusts the kid signer only; graft (misconfigured, or
    // after a key rotation) trusts the harness's token CA.
    let service = TokenService::start(TokenOptions::default());
    let signer = KidSigner::new();
    let mut registry = Registry::start_with(RegistryOptions::default().token_auth(TokenAuth {
        rootcertbundle: signer.bundle(),
        ..service.registry_auth()
    }));
    Api::for_registry(&registry)
        .with_bearer(&signer.mint(&service, "app", PUSH_PULL))
        .push_image("app", "v1", &image)
        .await;
    let graft = graft_on(&registry, &Clock::skewable(), Some(&service));
    let layer = &image.layers[0];
    let blob_path = format!("/v2/app/blobs/{}", layer.digest);
    let cacher = Api::for_graft(&graft).with_bearer(&signer.mint(&service, "app", PULL));
    assert_eq!(cacher.get_blob("app", &layer.digest).await, layer.data);

    let refused = Api::for_graft(&graft).with_bearer(&service.mint_for("app", PULL));
    let resp = Api::send(refused.get(&blob_path)).await;
    assert_eq!(resp.status().as_u16(), 401, "the registry's own no");
    registry.stop();

    assert_oci_error(Api::send(refused.get(&blob_path)).await, 502, None).await;
    let unseen = Api::for_graft(&graft).with_bearer(&service.mint_for("app", PULL));
    assert_eq!(unseen.get_blob("app", &layer.digest).await, layer.data);
}
