//! A Docker token service (the `auth: token` realm of distribution), for
//! tests of graft in front of a Bearer-token registry.
//!
//! It answers `GET /token?service=…&scope=repository:<name>:<actions>…`
//! with `{"token","access_token","expires_in","issued_at"}`, for the Basic
//! credentials of configured users (or anonymously, when allowed), granting
//! the intersection of the requested and the allowed actions, as real token
//! services do. Tokens are ES256 JWTs whose `x5c` header carries a signing
//! certificate issued by a self-signed CA; the CA is written to a PEM file
//! that the registry (and graft's `upstream.token_certificate`) trusts.
//!
//! ES256 rather than RS256: `ring` (already in the tree through rustls)
//! signs ECDSA P-256 with keys that `rcgen` generates, but cannot generate
//! RSA keys; distribution verifies both alike.
//!
//! The server is a plain-`std` HTTP/1.1 responder (one request per
//! connection, `Connection: close`), on 127.0.0.1 and an ephemeral port;
//! `Drop` stops it and removes its directory.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use tempfile::TempDir;

use super::registry::TokenAuth;

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// The `service` the registry names in its challenges (the JWT `aud`).
pub const SERVICE: &str = "graft-test-registry";
/// The `iss` of every token, which the registry requires.
pub const ISSUER: &str = "graft-test-token-service";

/// Actions a grant may allow: `pull`, `push`, `delete`, or `*`.
pub type Actions = &'static [&'static str];
pub const PUSH_PULL: Actions = &["pull", "push"];
pub const PULL: Actions = &["pull"];
/// What `oras manifest delete` asks for.
pub const DELETE_PULL: Actions = &["delete", "pull"];
pub const ALL: Actions = &["pull", "push", "delete"];

/// Rights on repositories whose name matches `pattern`: an exact name, a
/// prefix ending in `*` (`team/*`), or `*` for all.
#[derive(Clone, Debug)]
pub struct Grant {
    pub pattern: String,
    pub actions: Vec<String>,
}

impl Grant {
    pub fn new(pattern: &str, actions: Actions) -> Grant {
        Grant {
            pattern: pattern.to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn matches(&self, repo: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => repo.starts_with(prefix),
            None => self.pattern == repo,
        }
    }
}

/// A user of the token service.
#[derive(Clone, Debug)]
struct User {
    password: String,
    grants: Vec<Grant>,
}

/// How the token service is set up.
#[derive(Clone, Debug)]
pub struct TokenOptions {
    users: Vec<(String, User)>,
    /// `None`: requests without credentials get 401. `Some(grants)`:
    /// anonymous tokens with these rights (empty: a token for `/v2/` only).
    anonymous: Option<Vec<Grant>>,
    /// `expires_in` of issued tokens.
    pub expires_in: Duration,
}

impl Default for TokenOptions {
    fn default() -> Self {
        TokenOptions {
            users: Vec::new(),
            anonymous: None,
            expires_in: Duration::from_secs(300),
        }
    }
}

impl TokenOptions {
    /// Adds a user with `grants`.
    pub fn user(mut self, name: &str, password: &str, grants: &[Grant]) -> Self {
        let user = User {
            password: password.to_owned(),
            grants: grants.to_vec(),
        };
        self.users.push((name.to_owned(), user));
        self
    }

    /// Lets requests without credentials have tokens with `grants`.
    pub fn anonymous(mut self, grants: &[Grant]) -> Self {
        self.anonymous = Some(grants.to_vec());
        self
    }

    /// Issued tokens last `expires_in` (the registry adds 60 s of leeway).
    pub fn expires_in(mut self, expires_in: Duration) -> Self {
        self.expires_in = expires_in;
        self
    }
}

/// One `access` entry of a token: what it allows on one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    /// `repository:<name>:<actions>`.
    pub fn repository(name: &str, actions: Actions) -> Access {
        Access {
            kind: "repository".to_owned(),
            name: name.to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"type": self.kind, "name": self.name, "actions": self.actions})
    }
}

/// A token the service issued, as tests inspect them.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The user it was issued to (`None`: anonymous).
    pub user: Option<String>,
    pub access: Vec<Access>,
    pub token: String,
}

/// State the server threads share with the test.
struct Shared {
    options: TokenOptions,
    signer: Signer,
    issued: Mutex<Vec<Issued>>,
    /// `GET /token` requests answered, whatever the outcome.
    requests: AtomicU64,
}

/// A running token service; `Drop` stops it and removes its files.
pub struct TokenService {
    dir: TempDir,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TokenService {
    pub fn start(options: TokenOptions) -> TokenService {
        let dir = tempfile::Builder::new()
            .prefix("graft-test-token-")
            .tempdir()
            .expect("create token service temp dir");
        let signer = Signer::generate();
        let ca_pem = dir.path().join("token-ca.pem");
        std::fs::write(&ca_pem, &signer.ca_pem).expect("write token CA");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token service");
        listener
            .set_nonblocking(true)
            .expect("non-blocking token listener");
        let addr = listener.local_addr().expect("token service address");
        let shared = Arc::new(Shared {
            options,
            signer,
            issued: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(listener, shared, stop))
        };
        TokenService {
            dir,
            addr,
            shared,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:<port>/token`, the realm of the registry's challenges.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `service` (JWT `aud`) the registry is configured with.
    pub fn service(&self) -> &'static str {
        SERVICE
    }

    /// The `iss` the registry is configured with.
    pub fn issuer(&self) -> &'static str {
        ISSUER
    }

    /// PEM of the self-signed CA whose certificate signs the tokens' `x5c`
    /// chain: the registry's `rootcertbundle`, graft's `token_certificate`.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("token-ca.pem")
    }

    /// The `auth: token` section for [`super::RegistryOptions::token_auth`].
    pub fn registry_auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: SERVICE.to_owned(),
            issuer: ISSUER.to_owned(),
            rootcertbundle: self.ca_pem_path(),
        }
    }

    /// How many `/token` requests it has answered.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Every token issued through `/token` so far, oldest first.
    pub fn issued(&self) -> Vec<Issued> {
        self.shared.issued.lock().expect("issued list").clone()
    }

    /// The tokens issued through `/token` to `user`.
    pub fn issued_to(&self, user: &str) -> Vec<String> {
        self.issued()
            .into_iter()
            .filter(|i| i.user.as_deref() == Some(user))
            .map(|i| i.token)
            .collect()
    }

    /// A token for `subject` with exactly `access`, valid from now for
    /// `ttl_secs` (negative: already expired that long ago), not recorded
    /// in [`TokenService::issued`]. Use it for tokens no user could get: an
    /// expired one, one for a repository the user cannot access.
    pub fn mint(&self, subject: &str, access: &[Access], ttl_secs: i64) -> String {
        self.shared.signer.token(subject, access, ttl_secs)
    }

    /// `mint` for one repository and `actions`, valid for the configured
    /// `expires_in`.
    pub fn mint_for(&self, repo: &str, actions: Actions) -> String {
        let ttl = self.shared.options.expires_in.as_secs() as i64;
        self.mint("test", &[Access::repository(repo, actions)], ttl)
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                workers.push(std::thread::spawn(move || serve(stream, &shared)));
                workers.retain(|w| !w.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
}

/// Reads one request head and answers it.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let (status, body) = answer(&head, shared);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// The status line tail and JSON body for a request head.
fn answer(head: &str, shared: &Shared) -> (&'static str, String) {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let target = request_line.split(' ').nth(1).unwrap_or_default();
    let Some(query) = target.strip_prefix("/token") else {
        return ("404 Not Found", r#"{"error":"not found"}"#.to_owned());
    };
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let authorization = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim().to_owned());
    let Some((user, grants)) = authenticate(authorization.as_deref(), &shared.options) else {
        return ("401 Unauthorized", r#"{"error":"unauthorized"}"#.to_owned());
    };
    let params = query_params(query.trim_start_matches('?'));
    let access: Vec<Access> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| granted(scope, &grants))
        .collect();
    let ttl = shared.options.expires_in.as_secs() as i64;
    let subject = user.clone().unwrap_or_default();
    let token = shared.signer.token(&subject, &access, ttl);
    shared.issued.lock().expect("issued list").push(Issued {
        user,
        access,
        token: token.clone(),
    });
    let issued_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": issued_at,
    });
    ("200 OK", body.to_string())
}

/// The user (`None`: anonymous) and their grants, or `None` when refused.
#[allow(clippy::type_complexity)]
fn authenticate(
    authorization: Option<&str>,
    options: &TokenOptions,
) -> Option<(Option<String>, Vec<Grant>)> {
    let Some(value) = authorization else {
        return options.anonymous.clone().map(|grants| (None, grants));
    };
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (name, password) = decoded.split_once(':')?;
    let (_, user) = options
        .users
        .iter()
        .find(|(n, u)| n == name && u.password == password)?;
    Some((Some(name.to_owned()), user.grants.clone()))
}

/// The part of `scope` (`repository:<name>:<actions>`) that `grants` allow,
/// or `None` when nothing is.
fn granted(scope: &str, grants: &[Grant]) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind != "repository" {
        return None;
    }
    let allowed: Vec<&String> = grants
        .iter()
        .filter(|g| g.matches(name))
        .flat_map(|g| g.actions.iter())
        .collect();
    let actions: Vec<String> = actions
        .split(',')
        .filter(|a| {
            allowed
                .iter()
                .any(|b| b.as_str() == *a || b.as_str() == "*")
        })
        .map(str::to_owned)
        .collect();
    (!actions.is_empty()).then(|| Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions,
    })
}

/// `a=b&c=d` → pairs, percent-decoded.
fn query_params(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// The CA, the signing certificate it issued, and that certificate's key.
struct Signer {
    ca_pem: String,
    /// DER of the signing certificate, the one `x5c` entry.
    leaf_der: Vec<u8>,
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    /// Makes every `jti` unique.
    serial: AtomicU64,
}

impl Signer {
    fn generate() -> Signer {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

        let ca_key = KeyPair::generate().expect("token CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "graft test token CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign token CA");
        let issuer = Issuer::new(ca_params, ca_key);

        // rcgen's default key is ECDSA P-256 made by ring, in PKCS#8 that
        // ring reads back for signing.
        let leaf_key = KeyPair::generate().expect("token signing key");
        let mut leaf_params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "graft test token signer");
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("issue token signing certificate");
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &leaf_key.serialize_der(),
            &rng,
        )
        .expect("ring reads the signing key");
        Signer {
            ca_pem: ca_cert.pem(),
            leaf_der: leaf_cert.der().to_vec(),
            key,
            rng,
            serial: AtomicU64::new(0),
        }
    }

    /// A signed JWT for `subject` with `access`, expiring `ttl_secs` from now.
    fn token(&self, subject: &str, access: &[Access], ttl_secs: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        // An already expired token was also issued in the past.
        let issued = now.min(now + ttl_secs - 60);
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [STANDARD.encode(&self.leaf_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + ttl_secs,
            "nbf": issued - 1,
            "iat": issued,
            "jti": format!("jti-{}", self.serial.fetch_add(1, Ordering::SeqCst)),
            "access": access.iter().map(Access::to_json).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ES256 signature");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}
