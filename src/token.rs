//! The Docker token protocol for requests graft makes with its own
//! credentials (recovery, owed tag writes, reindex; and the client-side
//! commands `graft referrers` and `graft cache warm`).
//!
//! On a `401` whose `WWW-Authenticate` is `Bearer realm=…,service=…,scope=…`
//! graft asks the realm for a token with its configured user and password
//! (Basic), or anonymously when it has none, and retries once. Tokens are
//! kept per (service, scope) until shortly before they expire — the
//! earlier of `expires_in` and the JWT's `exp` — in a bounded cache; the
//! next request for the same scope sends the token straight away.
//!
//! The realm is fetched through the upstream's client (same TLS settings).
//! Credentials go only to a realm that is `https`, or plain `http` on a
//! loopback address, or on the upstream's own host when graft reaches the
//! upstream over plain http too (it already sees them in the clear): never
//! to another host over plain http.
//!
//! Tokens are secrets: they are never logged, and never part of an error.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::config::UpstreamConfig;
use crate::upstream::{Upstream, UpstreamError};

/// Tokens kept at once; graft's own work touches few (service, scope) pairs,
/// and a miss only costs one request to the realm.
const CAPACITY: u64 = 1024;
/// Largest token response read.
const RESPONSE_LIMIT: usize = 64 * 1024;
/// `expires_in` when the realm does not say (the token spec's default).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// A token is dropped this long before it expires (at most), so a request
/// never carries one that expires on the way.
const MAX_MARGIN: Duration = Duration::from_secs(30);

/// Why no token could be had. Never carries the token or the password.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the Bearer challenge has no usable realm")]
    NoRealm,
    #[error(
        "refusing to send credentials to token realm `{0}`: it must be https, or http on \
         a loopback address or the upstream's own host"
    )]
    RealmNotAllowed(String),
    #[error("token realm `{realm}` answered {status}")]
    Refused { realm: String, status: StatusCode },
    #[error("token realm `{realm}`: {cause}")]
    Unreachable { realm: String, cause: UpstreamError },
    #[error("token realm `{0}` sent no usable token")]
    Unusable(String),
}

/// A `WWW-Authenticate: Bearer` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    /// Space-separated scopes, as the challenge gave them.
    pub scope: Option<String>,
}

impl Challenge {
    /// The Bearer challenge among `headers`' `WWW-Authenticate` values.
    pub(crate) fn find(headers: &HeaderMap) -> Option<Challenge> {
        headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse)
    }

    /// Parses `Bearer realm="…",service="…",scope="…"` (RFC 9110 §11.2
    /// auth-params; quoted values may hold commas).
    pub(crate) fn parse(value: &str) -> Option<Challenge> {
        let (scheme, rest) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = auth_params(rest);
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        Some(Challenge {
            realm: get("realm").filter(|r| !r.is_empty())?,
            service: get("service"),
            scope: get("scope").filter(|s| !s.is_empty()),
        })
    }
}

/// `a="x,y", b=z` → pairs.
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_owned();
        if name.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        out.push((name, value.trim().to_owned()));
    }
}

/// The scope a registry will ask for `method` on `path` (distribution's
/// rule), so a cached token can go with the first try.
pub(crate) fn scope_for(method: &Method, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    if path == "/v2/_catalog" {
        return Some("registry:catalog:*".into());
    }
    let rest = path.strip_prefix("/v2/")?;
    let repo = ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .find_map(|m| rest.find(m).map(|i| &rest[..i]))?;
    let actions = match *method {
        Method::GET | Method::HEAD => "pull",
        Method::DELETE => "delete",
        _ => "pull,push",
    };
    Some(format!("repository:{repo}:{actions}"))
}

#[derive(Clone)]
struct Cached {
    bearer: HeaderValue,
    until: Instant,
}

/// Fetches and keeps Bearer tokens for one set of own credentials.
pub(crate) struct TokenClient {
    /// `Basic …` of graft's own credentials; `None` when it has none.
    basic: Option<HeaderValue>,
    /// Whether a request without credentials is graft's own too (the
    /// client-side commands), so that it may fetch anonymous tokens.
    anonymous_is_own: bool,
    /// The upstream's host when graft reaches it over plain http (and so
    /// already sends it the credentials in the clear); empty for https.
    plain_upstream_host: String,
    /// The service of the last challenge, to find cached tokens before a
    /// request is challenged.
    service: Mutex<Option<String>>,
    cache: moka::sync::Cache<(String, String), Cached>,
}

impl TokenClient {
    pub(crate) fn new(cfg: &UpstreamConfig) -> TokenClient {
        let plain_upstream_host = cfg
            .url
            .parse::<Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("http"))
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default();
        TokenClient {
            basic: cfg.own_authorization(),
            anonymous_is_own: false,
            plain_upstream_host,
            service: Mutex::new(None),
            cache: moka::sync::Cache::builder().max_capacity(CAPACITY).build(),
        }
    }

    /// Makes `auth` (a client command's) the own credentials: Basic ones
    /// are sent to the realm, none fetch anonymous tokens, a Bearer token
    /// is used as given.
    pub(crate) fn set_client_credentials(&mut self, auth: Option<&HeaderValue>) {
        let basic = auth.filter(|a| a.as_bytes().starts_with(b"Basic "));
        self.basic = basic.cloned();
        self.anonymous_is_own = auth.is_none();
    }

    /// Whether graft's own credentials are configured.
    pub(crate) fn has_credentials(&self) -> bool {
        self.basic.is_some()
    }

    /// Whether a request sent with `auth` is made with graft's own
    /// credentials (and so may be given a token of graft's).
    pub(crate) fn is_own(&self, auth: Option<&HeaderValue>) -> bool {
        match (auth, &self.basic) {
            (Some(a), Some(own)) => a == own,
            (None, _) => self.anonymous_is_own,
            (Some(_), None) => false,
        }
    }

    /// A cached token for what `method` on `path` will need, if any.
    pub(crate) fn cached_for(&self, method: &Method, path: &str) -> Option<HeaderValue> {
        let service = self.service.lock().ok()?.clone()?;
        let scope = scope_for(method, path)?;
        self.lookup(&service, &scope)
    }

    fn lookup(&self, service: &str, scope: &str) -> Option<HeaderValue> {
        let key = (service.to_owned(), scope.to_owned());
        let hit = self.cache.get(&key)?;
        if Instant::now() < hit.until {
            return Some(hit.bearer);
        }
        self.cache.invalidate(&key);
        None
    }

    /// A token answering `challenge`: a cached one other than `tried` (the
    /// one just refused), or a fresh one from the realm. `guess` is the
    /// scope [`scope_for`] predicted; the token is kept under it too.
    pub(crate) async fn token_for(
        &self,
        upstream: &Upstream,
        challenge: &Challenge,
        tried: Option<&HeaderValue>,
        guess: Option<String>,
    ) -> Result<HeaderValue, TokenError> {
        let service = challenge.service.clone().unwrap_or_default();
        let scope = challenge.scope.clone().unwrap_or_default();
        if let Ok(mut s) = self.service.lock() {
            *s = Some(service.clone());
        }
        if let Some(hit) = self.lookup(&service, &scope) {
            if Some(&hit) != tried {
                return Ok(hit);
            }
        }
        let (bearer, lifetime) = self.fetch(upstream, challenge).await?;
        let keep = lifetime.saturating_sub(MAX_MARGIN.min(lifetime / 5));
        if !keep.is_zero() {
            let cached = Cached {
                bearer: bearer.clone(),
                until: Instant::now() + keep,
            };
            for scope in std::iter::once(scope).chain(guess) {
                self.cache.insert((service.clone(), scope), cached.clone());
            }
        }
        Ok(bearer)
    }

    /// One `GET <realm>?service=…&scope=…`.
    async fn fetch(
        &self,
        upstream: &Upstream,
        challenge: &Challenge,
    ) -> Result<(HeaderValue, Duration), TokenError> {
        let realm = &challenge.realm;
        let uri: Uri = realm.parse().map_err(|_| TokenError::NoRealm)?;
        if self.basic.is_some() && !realm_allowed(&uri, &self.plain_upstream_host) {
            return Err(TokenError::RealmNotAllowed(realm.clone()));
        }
        let url = token_url(challenge);
        let unreachable = |cause| TokenError::Unreachable {
            realm: realm.clone(),
            cause,
        };
        let resp = upstream
            .get_url(&url, self.basic.as_ref())
            .await
            .map_err(unreachable)?;
        if resp.status() != StatusCode::OK {
            return Err(TokenError::Refused {
                realm: realm.clone(),
                status: resp.status(),
            });
        }
        let body = upstream
            .read_limited(resp.into_body(), RESPONSE_LIMIT)
            .await
            .map_err(unreachable)?;
        parse_response(&body, SystemTime::now()).ok_or_else(|| TokenError::Unusable(realm.clone()))
    }
}

/// `<realm>?service=…&scope=…&scope=…`.
fn token_url(challenge: &Challenge) -> String {
    let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let mut params = Vec::new();
    if let Some(service) = &challenge.service {
        params.push(format!("service={}", enc(service)));
    }
    for scope in challenge.scope.iter().flat_map(|s| s.split_whitespace()) {
        params.push(format!("scope={}", enc(scope)));
    }
    let sep = if challenge.realm.contains('?') {
        '&'
    } else {
        '?'
    };
    if params.is_empty() {
        return challenge.realm.clone();
    }
    format!("{}{sep}{}", challenge.realm, params.join("&"))
}

/// https anywhere; http only on loopback, or on the upstream's host when
/// that is reached over plain http too (`plain_upstream_host`, else empty).
fn realm_allowed(realm: &Uri, plain_upstream_host: &str) -> bool {
    let host = realm.host().unwrap_or_default();
    match realm.scheme_str() {
        Some("https") => true,
        Some("http") => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || bare
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
                || (!plain_upstream_host.is_empty()
                    && host.eq_ignore_ascii_case(plain_upstream_host))
        }
        _ => false,
    }
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The `Authorization` value and how long it lasts: the earlier of
/// `expires_in` and the JWT's `exp` (read, not verified: it only shortens).
fn parse_response(body: &[u8], now: SystemTime) -> Option<(HeaderValue, Duration)> {
    let r: TokenResponse = serde_json::from_slice(body).ok()?;
    let token = r.token.or(r.access_token).filter(|t| !t.is_empty())?;
    let mut lifetime = r
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME);
    if let Some(exp) = jwt_exp(&token) {
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        lifetime = lifetime.min(Duration::from_secs(exp.saturating_sub(now)));
    }
    let mut bearer = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    bearer.set_sensitive(true);
    Some((bearer, lifetime))
}

/// The `exp` claim of a JWT, if it is one.
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .or_else(|_| STANDARD.decode(payload))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_distribution_challenge_is_parsed_with_commas_inside_quotes() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        )
        .expect("a Bearer challenge");
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry"));
        assert_eq!(c.scope.as_deref(), Some("repository:a/b:pull,push"));
        assert_eq!(Challenge::parse(r#"Basic realm="x""#), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }

    #[test]
    fn the_token_url_carries_service_and_each_scope() {
        let c = Challenge {
            realm: "https://auth.example/token?x=1".into(),
            service: Some("reg".into()),
            scope: Some("repository:a:pull repository:b:pull,push".into()),
        };
        assert_eq!(
            token_url(&c),
            "https://auth.example/token?x=1&service=reg&scope=repository%3Aa%3Apull\
             &scope=repository%3Ab%3Apull%2Cpush"
        );
    }

    #[test]
    fn credentials_go_only_to_https_or_loopback_or_the_upstream_host() {
        let ok = |u: &str| realm_allowed(&u.parse().expect("uri"), "registry.internal");
        assert!(ok("https://auth.example/token"));
        assert!(ok("http://127.0.0.1:9000/token"));
        assert!(ok("http://[::1]:9000/token"));
        assert!(ok("http://localhost/token"));
        assert!(ok("http://registry.internal:5001/token"));
        assert!(!ok("http://auth.example/token"));
        assert!(!ok("ftp://127.0.0.1/token"));
        // An https upstream never has its realm's credentials sent in clear.
        assert!(!realm_allowed(
            &"http://registry.internal/token".parse().expect("uri"),
            ""
        ));
        let mut cfg = crate::config::Config::default().upstream;
        cfg.url = "https://registry.internal:5000".into();
        assert_eq!(TokenClient::new(&cfg).plain_upstream_host, "");
        cfg.url = "http://registry.internal:5000".into();
        assert_eq!(
            TokenClient::new(&cfg).plain_upstream_host,
            "registry.internal"
        );
    }

    #[test]
    fn scopes_are_predicted_as_distribution_asks_for_them() {
        assert_eq!(
            scope_for(&Method::HEAD, "/v2/a/b/manifests/sha256:x").as_deref(),
            Some("repository:a/b:pull")
        );
        assert_eq!(
            scope_for(&Method::PUT, "/v2/a/manifests/t").as_deref(),
            Some("repository:a:pull,push")
        );
        assert_eq!(
            scope_for(&Method::GET, "/v2/_catalog?n=100").as_deref(),
            Some("registry:catalog:*")
        );
        assert_eq!(scope_for(&Method::GET, "/v2/"), None);
    }

    #[test]
    fn a_token_lasts_until_the_earlier_of_expires_in_and_exp() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let claims = URL_SAFE_NO_PAD.encode(r#"{"exp":1000100}"#);
        let jwt = format!("h.{claims}.s");
        let body = serde_json::json!({"token": jwt, "expires_in": 300}).to_string();
        let (bearer, lifetime) = parse_response(body.as_bytes(), now).expect("usable");
        assert_eq!(lifetime, Duration::from_secs(100));
        assert!(bearer.is_sensitive());
        assert_eq!(bearer.to_str().ok(), Some(format!("Bearer {jwt}").as_str()));

        let opaque = r#"{"access_token":"opaque"}"#;
        let (_, lifetime) = parse_response(opaque.as_bytes(), now).expect("usable");
        assert_eq!(lifetime, DEFAULT_LIFETIME);
        assert!(parse_response(br#"{"expires_in":5}"#, now).is_none());
    }

    #[test]
    fn only_graft_s_own_credentials_get_tokens_of_graft_s() {
        let mut cfg = crate::config::Config::default().upstream;
        cfg.username = Some("graft".into());
        cfg.password = Some("pw".into());
        let own = cfg.own_authorization().expect("basic");
        let server = TokenClient::new(&cfg);
        assert!(server.has_credentials());
        assert!(server.is_own(Some(&own)));
        assert!(!server.is_own(None), "an anonymous client is not graft");
        let client = HeaderValue::from_static("Basic Y2xpZW50OnB3");
        assert!(!server.is_own(Some(&client)));

        let mut command = TokenClient::new(&crate::config::Config::default().upstream);
        command.set_client_credentials(None);
        assert!(command.is_own(None), "a command may fetch anonymous tokens");
        command.set_client_credentials(Some(&client));
        assert!(command.is_own(Some(&client)) && !command.is_own(None));
        let bearer = HeaderValue::from_static("Bearer given");
        command.set_client_credentials(Some(&bearer));
        assert!(
            !command.is_own(Some(&bearer)),
            "a given token is sent as it is"
        );
    }
}
