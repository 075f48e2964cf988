//! The key under which graft remembers a client's credentials: an
//! HMAC-SHA256 of the `Authorization` header under a random secret kept in
//! the data directory (created on first start, mode 0600).
//!
//! A plain hash would let anyone holding a copy of the data directory test
//! password guesses offline against the remembered keys; with the secret
//! kept beside them only at 0600, a copied index alone is useless for that.
//! The credentials themselves are never stored.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;

/// The key of one set of credentials (or of no credentials at all).
pub type CredKey = [u8; 32];

/// File name of the secret under the data directory.
const SECRET_FILE: &str = "credentials.secret";

/// Turns `Authorization` headers into [`CredKey`]s.
#[derive(Clone)]
pub struct CredentialKeys {
    secret: Arc<[u8; 32]>,
}

impl std::fmt::Debug for CredentialKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialKeys(..)")
    }
}

impl CredentialKeys {
    /// Reads the data directory's secret, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<CredentialKeys> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(SECRET_FILE);
        let mut secret = [0u8; 32];
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                f.read_exact(&mut secret).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
                write_secret(&path, &secret)?;
            }
            Err(e) => return Err(e),
        }
        Ok(CredentialKeys {
            secret: Arc::new(secret),
        })
    }

    /// A key from a fixed secret.
    #[cfg(test)]
    pub fn with_secret(secret: [u8; 32]) -> CredentialKeys {
        CredentialKeys {
            secret: Arc::new(secret),
        }
    }

    /// The key for `auth` (`None`: an anonymous client).
    pub fn key(&self, auth: Option<&HeaderValue>) -> CredKey {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.secret.as_ref()).expect("HMAC takes any key size");
        if let Some(a) = auth {
            mac.update(a.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }
}

/// Writes the secret with mode 0600 from the start (never readable by
/// others, not even for an instant), through a temp file and a rename so a
/// crash cannot leave a short secret behind.
fn write_secret(path: &Path, secret: &[u8; 32]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_secret_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = CredentialKeys::load_or_create(dir.path()).expect("create");
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .expect("secret file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = CredentialKeys::load_or_create(dir.path()).expect("reload");
        let auth = HeaderValue::from_static("Basic dXNlcjpwYXNz");
        assert_eq!(a.key(Some(&auth)), b.key(Some(&auth)));
        assert_ne!(a.key(Some(&auth)), a.key(None));

        let other = tempfile::tempdir().expect("tempdir");
        let c = CredentialKeys::load_or_create(other.path()).expect("create");
        assert_ne!(
            a.key(Some(&auth)),
            c.key(Some(&auth)),
            "secrets differ per data directory"
        );
    }

    #[test]
    fn the_key_is_not_a_plain_hash_of_the_credentials() {
        use sha2::Digest as _;
        let keys = CredentialKeys::with_secret([7; 32]);
        let auth = HeaderValue::from_static("Basic dXNlcjpwYXNz");
        let plain: [u8; 32] = Sha256::digest(auth.as_bytes()).into();
        assert_ne!(keys.key(Some(&auth)), plain);
    }
}
