//! Tokens minted here with rcgen certificates and ring signatures, the way
//! a token service signing for distribution does (`x5c` chain, RS256 or
//! ES256).

use super::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use serde_json::json;

const ISSUER: &str = "test-token-issuer";
const SERVICE: &str = "test-registry";
const NOW: u64 = 1_800_000_000;
/// A 2048-bit RSA key for RS256 tests (rcgen on ring cannot generate RSA).
const RSA_KEY: &str = include_str!("test-rsa-key.pem");

/// A CA and a signing certificate it issued; `rsa` picks the leaf's key.
struct Signer {
    ca_pem: String,
    chain: Vec<String>,
    key: KeyPair,
    rsa: bool,
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    (Issuer::new(params, key), cert.pem())
}

impl Signer {
    fn new(rsa: bool) -> Signer {
        let (issuer, ca_pem) = ca("token CA");
        Signer::issued_by(&issuer, ca_pem, rsa)
    }

    fn issued_by(issuer: &Issuer<'_, KeyPair>, ca_pem: String, rsa: bool) -> Signer {
        let key = if rsa {
            KeyPair::from_pem(RSA_KEY).expect("RSA key")
        } else {
            KeyPair::generate().expect("leaf key")
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "token signer");
        let leaf = params.signed_by(&key, issuer).expect("leaf");
        Signer {
            ca_pem,
            chain: vec![STANDARD.encode(leaf.der())],
            key,
            rsa,
        }
    }

    fn verifier(&self) -> TokenVerifier {
        TokenVerifier::from_pem(self.ca_pem.as_bytes(), ISSUER, SERVICE).expect("bundle")
    }

    /// A compact JWS of `claims` under `header` (`alg` and `x5c` filled in
    /// unless given).
    fn mint_with(&self, mut header: serde_json::Value, claims: serde_json::Value) -> String {
        let alg = if self.rsa { "RS256" } else { "ES256" };
        let h = header.as_object_mut().expect("object");
        h.entry("alg").or_insert(json!(alg));
        h.entry("x5c").or_insert(json!(self.chain));
        if h["x5c"].is_null() {
            h.remove("x5c");
        }
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        let der = self.key.serialize_der();
        if self.rsa {
            let key = RsaKeyPair::from_pkcs8(&der).expect("RSA pkcs8");
            let mut sig = vec![0; key.public().modulus_len()];
            key.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                .expect("sign");
            sig
        } else {
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let key = EcdsaKeyPair::from_pkcs8(alg, &der, &rng).expect("EC pkcs8");
            key.sign(&rng, msg).expect("sign").as_ref().to_vec()
        }
    }

    fn mint(&self, claims: serde_json::Value) -> String {
        self.mint_with(json!({"typ": "JWT"}), claims)
    }
}

fn claims(repo: &str, actions: &[&str]) -> serde_json::Value {
    json!({
        "iss": ISSUER,
        "sub": "alice",
        "aud": SERVICE,
        "exp": NOW + 300,
        "nbf": NOW - 10,
        "iat": NOW - 10,
        "jti": "1",
        "access": [{"type": "repository", "name": repo, "actions": actions}],
    })
}

fn bearer_of(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}")).expect("header")
}

fn check(v: &TokenVerifier, token: &str, repo: &str, now: u64) -> Result<(), JwtError> {
    v.grants_pull(Some(&bearer_of(token)), repo, now)
}

#[test]
fn a_good_token_grants_pull_on_its_repository_only() {
    for rsa in [true, false] {
        let s = Signer::new(rsa);
        let v = s.verifier();
        let token = s.mint(claims("team/app", &["pull", "push"]));
        check(&v, &token, "team/app", NOW).expect("valid token");
        assert!(matches!(
            check(&v, &token, "team/other", NOW),
            Err(JwtError::NoPull)
        ));
        let star = s.mint(claims("team/app", &["*"]));
        check(&v, &star, "team/app", NOW).expect("* grants pull");
    }
}

#[test]
fn access_without_pull_or_of_another_type_is_refused() {
    let s = Signer::new(false);
    let v = s.verifier();
    let push_only = s.mint(claims("app", &["push", "delete"]));
    assert!(matches!(
        check(&v, &push_only, "app", NOW),
        Err(JwtError::NoPull)
    ));
    let mut c = claims("app", &["pull"]);
    c["access"][0]["type"] = json!("registry");
    assert!(matches!(
        check(&v, &s.mint(c), "app", NOW),
        Err(JwtError::NoPull)
    ));
    let mut none = claims("app", &["pull"]);
    none["access"] = json!(null);
    assert!(matches!(
        check(&v, &s.mint(none), "app", NOW),
        Err(JwtError::NoPull)
    ));
}

#[test]
fn a_bad_signature_is_refused() {
    let s = Signer::new(true);
    let v = s.verifier();
    let token = s.mint(claims("app", &["pull"]));
    // The same signature over other claims.
    let (_, sig) = token.rsplit_once('.').expect("three parts");
    let other = s.mint(claims("other", &["pull"]));
    let (input, _) = other.rsplit_once('.').expect("three parts");
    let forged = format!("{input}.{sig}");
    assert!(matches!(
        check(&v, &forged, "other", NOW),
        Err(JwtError::Signature)
    ));
    // A token signed by a key other than the x5c leaf's.
    let impostor = Signer::new(false);
    let mut stolen_chain = impostor.mint_with(json!({"x5c": s.chain}), claims("app", &["pull"]));
    assert!(matches!(
        check(&v, &stolen_chain, "app", NOW),
        Err(JwtError::Signature)
    ));
    stolen_chain.push('A');
    assert!(check(&v, &stolen_chain, "app", NOW).is_err());
}

#[test]
fn wrong_issuer_or_audience_is_refused() {
    let s = Signer::new(false);
    let v = s.verifier();
    let mut c = claims("app", &["pull"]);
    c["iss"] = json!("someone-else");
    assert!(matches!(
        check(&v, &s.mint(c), "app", NOW),
        Err(JwtError::Issuer)
    ));
    let mut c = claims("app", &["pull"]);
    c["aud"] = json!("another-registry");
    assert!(matches!(
        check(&v, &s.mint(c), "app", NOW),
        Err(JwtError::Audience)
    ));
    let mut c = claims("app", &["pull"]);
    c["aud"] = json!(["another-registry", SERVICE]);
    check(&v, &s.mint(c), "app", NOW).expect("an audience list naming the service");
}

#[test]
fn expiry_and_not_before_hold_with_a_minute_of_leeway() {
    let s = Signer::new(false);
    let v = s.verifier();
    let token = s.mint(claims("app", &["pull"]));
    let exp = NOW + 300;
    check(&v, &token, "app", exp + 60).expect("within the leeway");
    assert!(matches!(
        check(&v, &token, "app", exp + 61),
        Err(JwtError::Expired)
    ));
    let nbf = NOW - 10;
    check(&v, &token, "app", nbf - 60).expect("within the leeway");
    assert!(matches!(
        check(&v, &token, "app", nbf - 61),
        Err(JwtError::NotYetValid)
    ));
    let mut c = claims("app", &["pull"]);
    c.as_object_mut().expect("object").remove("exp");
    assert!(matches!(
        check(&v, &s.mint(c), "app", NOW),
        Err(JwtError::Expired)
    ));
}

#[test]
fn a_chain_to_a_foreign_ca_is_refused() {
    let trusted = Signer::new(false);
    let foreign = Signer::new(false);
    let token = foreign.mint(claims("app", &["pull"]));
    assert!(matches!(
        check(&trusted.verifier(), &token, "app", NOW),
        Err(JwtError::Chain(_))
    ));
}

#[test]
fn an_intermediate_in_x5c_chains_to_the_bundle() {
    let (root, root_pem) = ca("token root");
    let key = KeyPair::generate().expect("intermediate key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "token intermediate");
    let cert = params.signed_by(&key, &root).expect("intermediate");
    let intermediate = Issuer::new(params, key);
    let mut s = Signer::issued_by(&intermediate, root_pem, true);
    let token_without = s.mint(claims("app", &["pull"]));
    assert!(matches!(
        check(&s.verifier(), &token_without, "app", NOW),
        Err(JwtError::Chain(_))
    ));
    s.chain.push(STANDARD.encode(cert.der()));
    check(&s.verifier(), &s.mint(claims("app", &["pull"])), "app", NOW).expect("chained");
}

#[test]
fn alg_none_hmac_jwk_and_tokens_naming_no_key_are_refused() {
    let s = Signer::new(false);
    let v = s.verifier();
    let c = claims("app", &["pull"]);
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "x5c": s.chain}).to_string()),
        URL_SAFE_NO_PAD.encode(c.to_string())
    );
    assert!(matches!(
        check(&v, &unsigned, "app", NOW),
        Err(JwtError::Algorithm)
    ));
    let hs = s.mint_with(json!({"alg": "HS256"}), c.clone());
    assert!(matches!(
        check(&v, &hs, "app", NOW),
        Err(JwtError::Algorithm)
    ));
    let jwk = s.mint_with(json!({"jwk": {"kty": "EC"}, "x5c": null}), c.clone());
    assert!(matches!(
        check(&v, &jwk, "app", NOW),
        Err(JwtError::KeyHeader("jwk"))
    ));
    let bare = s.mint_with(json!({"x5c": null}), c.clone());
    assert!(matches!(
        check(&v, &bare, "app", NOW),
        Err(JwtError::KeyHeader(_))
    ));
    let crit = s.mint_with(json!({"crit": ["exp"]}), c);
    assert!(matches!(
        check(&v, &crit, "app", NOW),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn malformed_tokens_and_other_schemes_are_refused() {
    let v = Signer::new(false).verifier();
    for token in ["", "a.b", "a.b.c.d", "!!.??.**", "e30.e30.e30"] {
        assert!(check(&v, token, "app", NOW).is_err(), "{token:?}");
    }
    let basic = HeaderValue::from_static("Basic YWxpY2U6czNjcmV0");
    assert!(matches!(
        v.grants_pull(Some(&basic), "app", NOW),
        Err(JwtError::NotBearer)
    ));
    assert!(matches!(
        v.grants_pull(None, "app", NOW),
        Err(JwtError::NotBearer)
    ));
}

#[test]
fn the_unverified_expiry_is_read_from_bearer_jwts_only() {
    let s = Signer::new(false);
    let token = s.mint(claims("app", &["pull"]));
    assert_eq!(unverified_expiry(Some(&bearer_of(&token))), Some(NOW + 300));
    let lower = HeaderValue::from_str(&format!("bearer {token}")).expect("header");
    assert_eq!(unverified_expiry(Some(&lower)), Some(NOW + 300));
    let opaque = HeaderValue::from_static("Bearer 0123456789abcdef");
    assert_eq!(unverified_expiry(Some(&opaque)), None);
    let basic = HeaderValue::from_static("Basic YWxpY2U6czNjcmV0");
    assert_eq!(unverified_expiry(Some(&basic)), None);
    assert_eq!(unverified_expiry(None), None);
    let fractional = format!(
        "e30.{}.sig",
        URL_SAFE_NO_PAD.encode(json!({"exp": 1_700_000_000.9}).to_string())
    );
    assert_eq!(
        unverified_expiry(Some(&bearer_of(&fractional))),
        Some(1_700_000_000)
    );
}

#[test]
fn a_bundle_without_certificates_is_refused() {
    assert!(TokenVerifier::from_pem(b"", ISSUER, SERVICE).is_err());
    assert!(TokenVerifier::from_pem(RSA_KEY.as_bytes(), ISSUER, SERVICE).is_err());
}

#[test]
fn a_kid_naming_a_bundle_key_and_a_bundle_certificate_as_its_own_chain_are_accepted() {
    // A self-signed (CA) signing certificate that is its own bundle, as
    // Harbor and GitLab set up their registries.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "self-signed token signer");
    let cert = params.self_signed(&key).expect("self-signed");
    let s = Signer {
        ca_pem: cert.pem(),
        chain: vec![STANDARD.encode(cert.der())],
        key,
        rsa: false,
    };
    let v = s.verifier();
    let c = claims("app", &["pull"]);
    check(&v, &s.mint(c.clone()), "app", NOW).expect("the bundle certificate as x5c");

    let kid = libtrust_key_id(&v.anchors[0].subject_public_key_info);
    assert_eq!(kid.len(), 59);
    assert_eq!(kid.split(':').count(), 12);
    let by_kid = s.mint_with(json!({"kid": kid, "x5c": null}), c.clone());
    check(&v, &by_kid, "app", NOW).expect("a kid naming the bundle key");

    // A kid naming another key, or the right kid on another key's signature.
    let other = Signer::new(false);
    let other_kid = libtrust_key_id(&other.verifier().anchors[0].subject_public_key_info);
    let wrong = s.mint_with(json!({"kid": other_kid, "x5c": null}), c.clone());
    assert!(matches!(
        check(&v, &wrong, "app", NOW),
        Err(JwtError::KeyHeader(_))
    ));
    let forged = other.mint_with(json!({"kid": kid, "x5c": null}), c);
    assert!(matches!(
        check(&v, &forged, "app", NOW),
        Err(JwtError::Signature)
    ));
}

#[test]
fn the_libtrust_key_id_is_sha256_of_the_spki_in_base32_groups() {
    use sha2::Digest as _;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // The SPKI of a P-256 key has a one-byte DER length; of the 2048-bit
    // RSA key, a two-byte one.
    for key in [
        KeyPair::generate().expect("EC key"),
        KeyPair::from_pem(RSA_KEY).expect("RSA key"),
    ] {
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        // Bit by bit, independently of the implementation's arithmetic.
        let digest = sha2::Sha256::digest(&spki);
        let bits: Vec<usize> = digest[..30]
            .iter()
            .flat_map(|byte| (0..8).rev().map(move |i| usize::from((byte >> i) & 1)))
            .collect();
        let digits: Vec<char> = bits
            .chunks(5)
            .map(|c| char::from(ALPHABET[c.iter().fold(0, |a, b| a * 2 + b)]))
            .collect();
        let expected = digits
            .chunks(4)
            .map(|g| g.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join(":");
        // webpki hands over the SPKI without its outer SEQUENCE header.
        let header_len = match spki[1] {
            n if n & 0x80 == 0 => 2,
            n => 2 + usize::from(n & 0x7f),
        };
        assert_eq!(libtrust_key_id(&spki[header_len..]), expected);
    }
}

#[test]
fn a_bundle_certificate_signing_as_its_own_chain_holds_to_its_dates() {
    // distribution (Go's Verify) checks a leaf's dates even when the leaf
    // is in the root pool: an expired signing certificate still in the
    // bundle must not vouch for a token offline.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "retired token signer");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = params.self_signed(&key).expect("self-signed");
    let s = Signer {
        ca_pem: cert.pem(),
        chain: vec![STANDARD.encode(cert.der())],
        key,
        rsa: false,
    };
    let v = s.verifier();
    let token = s.mint(claims("app", &["pull"]));
    assert!(matches!(
        check(&v, &token, "app", NOW),
        Err(JwtError::Chain(_))
    ));
}
