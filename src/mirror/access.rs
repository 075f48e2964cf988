//! Who may use an upstream graft pulls from with its own account
//! (`use_own_credentials`).
//!
//! There the registry sees graft, never the client: a client's
//! `Authorization` is judged here (Basic against the entry's htpasswd
//! file, or none when `allow_anonymous`) and then replaced by graft's own,
//! which `Upstream::send` trades for graft's token. Writes are refused
//! unless `allow_push`. Going the other way, the registry's
//! `WWW-Authenticate` is dropped: its realm is graft's business, and a
//! client following it would ask for tokens graft has no use for.

use std::collections::HashMap;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use super::NamedUpstream;
use crate::body::Body;
use crate::error::{oci_error, Error};
use crate::oci::ErrorCode;

/// How long a verified `Authorization` is remembered, so bcrypt (slow by
/// design) runs once per client and credentials, not once per request.
const VERIFIED_TTL: Duration = Duration::from_secs(300);

/// One upstream's door.
pub(crate) struct Gate {
    /// graft's `Basic …`, when requests go upstream as graft; `None`: the
    /// client's own credentials go upstream, as with a single upstream.
    own: Option<HeaderValue>,
    name: String,
    allow_anonymous: bool,
    allow_push: bool,
    /// user → bcrypt hash, from `htpasswd`.
    users: HashMap<String, String>,
    /// SHA-256 of `Authorization` values that matched `users`.
    verified: moka::sync::Cache<[u8; 32], ()>,
}

impl Gate {
    pub(crate) fn new(entry: &NamedUpstream) -> Result<Gate, Error> {
        let a = &entry.access;
        let users = match &a.htpasswd {
            Some(path) => read_htpasswd(path).map_err(|e| {
                Error::Startup(format!(
                    "upstream `{}`: htpasswd {}: {e}",
                    entry.name,
                    path.display()
                ))
            })?,
            None => HashMap::new(),
        };
        Ok(Gate {
            own: a
                .use_own_credentials
                .then(|| entry.upstream.own_authorization())
                .flatten(),
            name: entry.name.clone(),
            allow_anonymous: a.allow_anonymous,
            allow_push: a.allow_push,
            users,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                .build(),
        })
    }

    /// Lets the request through with graft's credentials in place of the
    /// client's, or answers it: 403 for a write nobody may make, 401 (a
    /// Basic challenge for graft itself) for missing or wrong credentials.
    pub(crate) async fn admit(&self, req: &mut Request<Body>) -> Result<(), Box<Response<Body>>> {
        let Some(own) = &self.own else {
            return Ok(());
        };
        let read = matches!(*req.method(), Method::GET | Method::HEAD);
        if !read && !self.allow_push {
            return Err(Box::new(oci_error(
                StatusCode::FORBIDDEN,
                ErrorCode::Denied,
                &format!(
                    "writes through the mirror of `{}` are not allowed",
                    self.name
                ),
                serde_json::Value::Null,
            )));
        }
        let admitted = match req.headers().get(header::AUTHORIZATION) {
            None => self.allow_anonymous,
            Some(auth) => self.verify(auth).await,
        };
        if !admitted {
            return Err(Box::new(self.challenge()));
        }
        req.headers_mut().insert(header::AUTHORIZATION, own.clone());
        Ok(())
    }

    /// Drops what would tell the client about graft's account upstream.
    pub(crate) fn scrub(&self, headers: &mut HeaderMap) {
        if self.own.is_some() {
            headers.remove(header::WWW_AUTHENTICATE);
        }
    }

    /// Whether `auth` is `Basic` for a user of the htpasswd file.
    async fn verify(&self, auth: &HeaderValue) -> bool {
        let key: [u8; 32] = Sha256::digest(auth.as_bytes()).into();
        if self.verified.contains_key(&key) {
            return true;
        }
        let Some((user, password)) = basic_credentials(auth) else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }

    fn challenge(&self) -> Response<Body> {
        let mut resp = oci_error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "authentication required",
            serde_json::Value::Null,
        );
        let realm = format!("Basic realm=\"graft {}\"", self.name);
        if let Ok(v) = HeaderValue::from_str(&realm) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

/// `user:password` of a `Basic` `Authorization`.
fn basic_credentials(auth: &HeaderValue) -> Option<(String, String)> {
    use base64::Engine as _;
    let encoded = auth.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `user:hash` lines; bcrypt hashes only (`$2a$`, `$2b$`, `$2y$`), as
/// distribution reads them.
fn read_htpasswd(path: &std::path::Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, hash)) if hash.starts_with("$2") => {
                users.insert(user.to_string(), hash.to_string());
            }
            _ => return Err(format!("line {}: not `user:<bcrypt hash>`", n + 1)),
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bcrypt_lines_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&path, format!("# ci\nrunner:{hash}\n")).expect("write");
        let users = read_htpasswd(&path).expect("valid");
        assert!(bcrypt::verify("pw", &users["runner"]).expect("verify"));
        std::fs::write(&path, "runner:{SHA}abc\n").expect("write");
        assert!(read_htpasswd(&path).is_err());
    }

    #[test]
    fn basic_credentials_are_decoded() {
        let v = HeaderValue::from_static("Basic cnVubmVyOnA6dw==");
        assert_eq!(
            basic_credentials(&v),
            Some(("runner".to_string(), "p:w".to_string()))
        );
        assert_eq!(
            basic_credentials(&HeaderValue::from_static("Bearer x")),
            None
        );
    }
}
