//! Registry tokens (the JWTs of the Docker token protocol, distribution's
//! `auth: token`), read two ways (DESIGN.md, "Security model").
//!
//! Unverified, only to learn a token's `exp` ([`unverified_expiry`]): a
//! remembered yes never outlives it. Shortening a lifetime needs no trust in
//! the claims — a forged `exp` can only make graft ask the upstream sooner.
//!
//! Verified ([`TokenVerifier`]), only while the upstream cannot be reached
//! and only when the operator gave graft the registry's token-signing
//! certificate bundle: the JWS signature with the key of the `x5c` chain's
//! leaf, the chain up to a certificate of the bundle (at graft's clock), `iss`,
//! `aud`, `exp`/`nbf` with distribution's own leeway, and an `access` claim
//! granting `pull` on the repository — the checks distribution 2.8 makes, so
//! graft vouches offline only for tokens the registry itself would accept.
//! The signing key is found as distribution finds it: from the `x5c` chain
//! (Docker Hub style), or by a `kid` naming the libtrust fingerprint of a
//! certificate's key in the bundle (Harbor, GitLab). A `jwk` header is
//! refused (distribution accepts one only if it is a bundle key or carries
//! its own chain; no token service graft knows of sends one).

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::HeaderValue;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use serde::Deserialize;
use serde_json::Number;
use webpki::EndEntityCert;

use crate::config::UpstreamConfig;

#[cfg(test)]
mod tests;

/// Clock skew allowed on `exp` and `nbf`: distribution's own `Leeway`, so a
/// token graft accepts offline is one the registry accepted a moment ago.
pub(crate) const LEEWAY_SECS: i64 = 60;

/// Why a token does not authorize an offline pull. Never carries any part
/// of the token: the reason is logged.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a Bearer token")]
    NotBearer,
    #[error("malformed token ({0})")]
    Malformed(&'static str),
    #[error("signature algorithm not accepted")]
    Algorithm,
    #[error("the signing key is named by {0}; only an x5c chain is accepted")]
    KeyHeader(&'static str),
    #[error("the signing certificate does not chain to the token bundle: {0}")]
    Chain(webpki::Error),
    #[error("bad signature")]
    Signature,
    #[error("issuer not trusted")]
    Issuer,
    #[error("token for another audience")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token does not grant pull on this repository")]
    NoPull,
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(auth: &HeaderValue) -> Option<&str> {
    let (scheme, token) = auth.to_str().ok()?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// A JWS in compact serialization, its parts decoded.
struct Jws<'a> {
    /// `header.claims` as sent: what the signature covers.
    signing_input: &'a str,
    header: Vec<u8>,
    claims: Vec<u8>,
    signature: Vec<u8>,
}

/// base64url, with or without padding (distribution accepts both).
fn b64url(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed("base64url"))
}

fn split(token: &str) -> Result<Jws<'_>, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three parts"));
    };
    Ok(Jws {
        signing_input: &token[..h.len() + 1 + c.len()],
        header: b64url(h)?,
        claims: b64url(c)?,
        signature: b64url(s)?,
    })
}

/// A NumericDate as whole Unix seconds (fractions floored, out of range
/// saturated).
fn seconds(n: &Number) -> Option<i64> {
    n.as_i64()
        .or_else(|| n.as_u64().map(|_| i64::MAX))
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        })
}

/// The `exp` of a Bearer JWT, in Unix seconds, read without verifying
/// anything. `None` for Basic credentials, opaque tokens and a JWT without
/// `exp`: those keep the plain time-based rules.
pub(crate) fn unverified_expiry(auth: Option<&HeaderValue>) -> Option<u64> {
    #[derive(Deserialize)]
    struct Exp {
        exp: Option<Number>,
    }
    let token = bearer(auth?)?;
    let claims = token.split('.').nth(1)?;
    let exp: Exp = serde_json::from_slice(&b64url(claims).ok()?).ok()?;
    Some(seconds(exp.exp.as_ref()?)?.max(0) as u64)
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    x5c: Option<Vec<String>>,
    kid: Option<String>,
    jwk: Option<serde_json::Value>,
    /// Extensions a verifier must understand (RFC 7515 §4.1.11): graft
    /// understands none, so their presence refuses the token.
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ResourceActions {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    actions: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<Number>,
    nbf: Option<Number>,
    access: Option<Vec<ResourceActions>>,
}

impl Claims {
    /// Whether an `access` entry grants `pull` (or distribution's `*`) on
    /// repository `repo`.
    fn grants_pull(&self, repo: &str) -> bool {
        self.access.iter().flatten().any(|r| {
            r.kind == "repository"
                && r.name == repo
                && r.actions.iter().flatten().any(|a| a == "pull" || a == "*")
        })
    }
}

/// Accepts any extended key usage, as distribution does
/// (`x509.ExtKeyUsageAny`); a malformed extension is still refused.
struct AnyPurpose;

impl webpki::ExtendedKeyUsageValidator for AnyPurpose {
    fn validate(&self, purposes: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in purposes {
            purpose?;
        }
        Ok(())
    }
}

/// The JWS `alg`s distribution 2.8 verifies (through libtrust) that ring
/// can: the verification algorithm, and for ECDSA the length of `r` (JWS
/// sends `r || s`, X.509 verifiers take DER).
fn algorithm(alg: &str) -> Result<(&'static dyn SignatureVerificationAlgorithm, usize), JwtError> {
    use webpki::ring as algs;
    Ok(match alg {
        "RS256" => (algs::RSA_PKCS1_2048_8192_SHA256, 0),
        "RS384" => (algs::RSA_PKCS1_2048_8192_SHA384, 0),
        "RS512" => (algs::RSA_PKCS1_2048_8192_SHA512, 0),
        "ES256" => (algs::ECDSA_P256_SHA256, 32),
        "ES384" => (algs::ECDSA_P384_SHA384, 48),
        // `none`, HMAC (a shared secret graft does not have) and the rest.
        _ => return Err(JwtError::Algorithm),
    })
}

/// A JWS ECDSA signature (`r || s`, each `n` bytes) as DER
/// `SEQUENCE { INTEGER r, INTEGER s }`.
fn ecdsa_der(sig: &[u8], n: usize) -> Result<Vec<u8>, JwtError> {
    if sig.len() != 2 * n {
        return Err(JwtError::Signature);
    }
    let int = |x: &[u8]| {
        let x = &x[x.iter().position(|&b| b != 0).unwrap_or(x.len() - 1)..];
        let pad = x[0] & 0x80 != 0;
        let mut out = vec![0x02, (x.len() + usize::from(pad)) as u8];
        if pad {
            out.push(0);
        }
        out.extend_from_slice(x);
        out
    };
    let (r, s) = (int(&sig[..n]), int(&sig[n..]));
    // At most 2 × (2 + 49) bytes: the short length form always fits.
    let mut der = vec![0x30, (r.len() + s.len()) as u8];
    der.extend(r);
    der.extend(s);
    Ok(der)
}

/// The libtrust key id of a key (what distribution's `kid` names): the
/// SHA-256 of its DER `SubjectPublicKeyInfo`, truncated to 240 bits, in
/// base32 as twelve groups of four joined by `:`. `spki` is the SPKI's
/// contents, as webpki gives them (without the outer SEQUENCE header).
fn libtrust_key_id(spki: &[u8]) -> String {
    use sha2::Digest as _;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut der = vec![0x30];
    match spki.len() {
        n if n < 0x80 => der.push(n as u8),
        n if n < 0x100 => der.extend([0x81, n as u8]),
        n => der.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    der.extend_from_slice(spki);
    let digest = sha2::Sha256::digest(&der);
    // 30 bytes are 48 base32 digits exactly: no padding, no partial group.
    let mut digits = String::with_capacity(59);
    for chunk in digest[..30].chunks(5) {
        let bits = chunk.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
        for i in (0..8).rev() {
            if digits.len() % 5 == 4 {
                digits.push(':');
            }
            digits.push(char::from(ALPHABET[(bits >> (i * 5)) as usize & 31]));
        }
    }
    digits
}

/// A certificate of the bundle: a trust anchor for `x5c` chains, and a
/// key a `kid` may name.
struct Trusted {
    der: CertificateDer<'static>,
    kid: String,
    /// notBefore and notAfter, Unix seconds: checked when the certificate
    /// signs as its own `x5c` leaf, as Go's `Verify` checks a leaf's dates
    /// even when the leaf is in the root pool.
    valid: (i64, i64),
}

/// Validates registry tokens against the registry's token-signing bundle
/// (`upstream.token_certificate`, `token_issuer`, `token_service`).
pub struct TokenVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    trusted: Vec<Trusted>,
    issuer: String,
    service: String,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("anchors", &self.anchors.len())
            .field("issuer", &self.issuer)
            .field("service", &self.service)
            .finish()
    }
}

impl TokenVerifier {
    /// Reads the PEM bundle at `path` (the registry's
    /// `auth.token.rootcertbundle`).
    pub fn load(path: &Path, issuer: &str, service: &str) -> Result<TokenVerifier, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        TokenVerifier::from_pem(&pem, issuer, service)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The verifier `upstream.token_certificate` asks for, if it does
    /// (validation made sure issuer and service come with it).
    pub fn from_config(upstream: &UpstreamConfig) -> Result<Option<TokenVerifier>, String> {
        let Some(path) = &upstream.token_certificate else {
            return Ok(None);
        };
        let issuer = upstream.token_issuer.as_deref().unwrap_or_default();
        let service = upstream.token_service.as_deref().unwrap_or_default();
        TokenVerifier::load(path, issuer, service).map(Some)
    }

    /// A verifier trusting the certificates of a PEM bundle.
    pub fn from_pem(pem: &[u8], issuer: &str, service: &str) -> Result<TokenVerifier, String> {
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate bundle ({e})"))?;
        if certs.is_empty() {
            return Err("no certificate in the bundle".into());
        }
        let anchors = certs
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("unusable certificate in the bundle ({e})"))?;
        let trusted = certs
            .into_iter()
            .zip(&anchors)
            .map(|(der, anchor)| {
                let (_, parsed) = x509_parser::parse_x509_certificate(&der)
                    .map_err(|e| format!("unusable certificate in the bundle ({e})"))?;
                let validity = parsed.validity();
                let valid = (
                    validity.not_before.timestamp(),
                    validity.not_after.timestamp(),
                );
                Ok(Trusted {
                    kid: libtrust_key_id(&anchor.subject_public_key_info),
                    der,
                    valid,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(TokenVerifier {
            anchors,
            trusted,
            issuer: issuer.to_string(),
            service: service.to_string(),
        })
    }

    /// Whether the Bearer token of `auth` is valid at `now_secs` and grants
    /// `pull` on repository `repo`.
    pub fn grants_pull(
        &self,
        auth: Option<&HeaderValue>,
        repo: &str,
        now_secs: u64,
    ) -> Result<(), JwtError> {
        let token = auth.and_then(bearer).ok_or(JwtError::NotBearer)?;
        let claims = self.verify(token, now_secs)?;
        if claims.grants_pull(repo) {
            Ok(())
        } else {
            Err(JwtError::NoPull)
        }
    }

    /// The claims of a token whose signature, chain and time window hold.
    fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, JwtError> {
        let jws = split(token)?;
        let header: Header =
            serde_json::from_slice(&jws.header).map_err(|_| JwtError::Malformed("header"))?;
        let claims: Claims =
            serde_json::from_slice(&jws.claims).map_err(|_| JwtError::Malformed("claims"))?;
        self.check_claims(&claims, now_secs)?;
        self.check_signature(&header, &jws, now_secs)?;
        Ok(claims)
    }

    /// `iss`, `aud`, `exp` and `nbf` as distribution checks them: a missing
    /// `exp` counts as expired.
    fn check_claims(&self, claims: &Claims, now_secs: u64) -> Result<(), JwtError> {
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err(JwtError::Issuer);
        }
        let for_us = match &claims.aud {
            Some(Audience::One(aud)) => *aud == self.service,
            Some(Audience::Many(auds)) => auds.contains(&self.service),
            None => false,
        };
        if !for_us {
            return Err(JwtError::Audience);
        }
        let now = i64::try_from(now_secs).unwrap_or(i64::MAX);
        let exp = claims.exp.as_ref().and_then(seconds).unwrap_or(0);
        if now > exp.saturating_add(LEEWAY_SECS) {
            return Err(JwtError::Expired);
        }
        let nbf = claims.nbf.as_ref().and_then(seconds).unwrap_or(0);
        if now < nbf.saturating_sub(LEEWAY_SECS) {
            return Err(JwtError::NotYetValid);
        }
        Ok(())
    }

    /// The signing key, found as distribution finds it (`x5c`, else `jwk`,
    /// else `kid`), then the signature with it.
    fn check_signature(
        &self,
        header: &Header,
        jws: &Jws<'_>,
        now_secs: u64,
    ) -> Result<(), JwtError> {
        if header.crit.is_some() {
            return Err(JwtError::Malformed("unsupported crit header"));
        }
        let (alg, ecdsa_len) = algorithm(&header.alg)?;
        let signature = if ecdsa_len > 0 {
            ecdsa_der(&jws.signature, ecdsa_len)?
        } else {
            jws.signature.clone()
        };
        let verify = |signer: &EndEntityCert<'_>| {
            signer
                .verify_signature(alg, jws.signing_input.as_bytes(), &signature)
                .map_err(|_| JwtError::Signature)
        };
        match (&header.x5c, &header.kid) {
            (Some(chain), _) if !chain.is_empty() => {
                let certs = chain
                    .iter()
                    .map(|c| STANDARD.decode(c).map(CertificateDer::from))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| JwtError::Malformed("x5c"))?;
                let (leaf, intermediates) = certs
                    .split_first()
                    .ok_or(JwtError::Malformed("empty x5c"))?;
                verify(&self.verified_leaf(leaf, intermediates, now_secs)?)
            }
            _ if header.jwk.is_some() => Err(JwtError::KeyHeader("jwk")),
            (_, Some(kid)) => {
                // A bundle key, trusted as distribution trusts it: the
                // certificate's dates are not looked at (nor by distribution).
                let trusted = self
                    .trusted
                    .iter()
                    .find(|t| t.kid == *kid)
                    .ok_or(JwtError::KeyHeader("a kid outside the bundle"))?;
                verify(&EndEntityCert::try_from(&trusted.der).map_err(JwtError::Chain)?)
            }
            _ => Err(JwtError::KeyHeader("nothing")),
        }
    }

    /// The leaf of an `x5c` chain, once it chains to the bundle at
    /// `now_secs`. A leaf that is itself a bundle certificate is trusted as
    /// is (a self-signed signing certificate is commonly its own bundle, and
    /// webpki refuses a CA certificate as a leaf where Go does not).
    fn verified_leaf<'a>(
        &self,
        leaf: &'a CertificateDer<'a>,
        intermediates: &'a [CertificateDer<'a>],
        now_secs: u64,
    ) -> Result<EndEntityCert<'a>, JwtError> {
        let cert = EndEntityCert::try_from(leaf).map_err(JwtError::Chain)?;
        if let Some(t) = self.trusted.iter().find(|t| t.der == *leaf) {
            let at =
                |secs: i64| UnixTime::since_unix_epoch(Duration::from_secs(secs.max(0) as u64));
            let now = i64::try_from(now_secs).unwrap_or(i64::MAX);
            let time = at(now);
            if now < t.valid.0 {
                let not_before = at(t.valid.0);
                return Err(JwtError::Chain(webpki::Error::CertNotValidYet {
                    time,
                    not_before,
                }));
            }
            if now > t.valid.1 {
                let not_after = at(t.valid.1);
                return Err(JwtError::Chain(webpki::Error::CertExpired {
                    time,
                    not_after,
                }));
            }
            return Ok(cert);
        }
        let time = UnixTime::since_unix_epoch(Duration::from_secs(now_secs));
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            intermediates,
            time,
            AnyPurpose,
            None,
            None,
        )
        .map_err(JwtError::Chain)?;
        Ok(cert)
    }
}
