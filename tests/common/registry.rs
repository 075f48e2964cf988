//! A real upstream: the `docker-registry` binary (CNCF distribution 2.8.2,
//! Debian package `docker-registry`), started as a child process.
//!
//! Each [`Registry`] owns a temporary directory holding its `config.yml`,
//! its storage, its log (stdout and stderr, including the access log) and,
//! when asked for, an htpasswd file and a test CA with a server certificate.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, require_tool};

/// How long a starting registry may take to answer `/v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How many fresh ports to try when another process grabs ours first.
const PORT_ATTEMPTS: usize = 5;

/// How the registry is set up.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this user and password (htpasswd).
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS with a certificate for 127.0.0.1 and localhost, issued by
    /// a CA generated for this registry ([`Registry::ca_file`]).
    pub tls: bool,
    /// Require Bearer tokens from a token service (`auth: token`), e.g.
    /// [`super::token::TokenService::registry_auth`].
    pub token_auth: Option<TokenAuth>,
    /// Turn manifest and blob `DELETE` off (`storage.delete.enabled: false`,
    /// distribution's default): DELETE answers 405 UNSUPPORTED.
    pub delete_disabled: bool,
}

/// The registry's `auth: token` section.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    /// Where clients fetch tokens (named in the registry's challenges).
    pub realm: String,
    /// The `service` of challenges, and the `aud` tokens must carry.
    pub service: String,
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// PEM of the CA the tokens' `x5c` chains must lead to.
    pub rootcertbundle: PathBuf,
}

impl RegistryOptions {
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn token_auth(mut self, auth: TokenAuth) -> Self {
        self.token_auth = Some(auth);
        self
    }

    pub fn delete_disabled(mut self) -> Self {
        self.delete_disabled = true;
        self
    }
}

/// One line of the registry's access log (Apache combined format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Path and query as the registry received them.
    pub uri: String,
    pub status: u16,
}

/// A running (or stopped) `docker-registry`; `Drop` kills it and removes
/// its directory.
pub struct Registry {
    /// Config, storage, log and certificates; deleted when dropped.
    dir: TempDir,
    bin: PathBuf,
    /// Kept across [`Registry::restart`] so clients and graft configs stay valid.
    port: u16,
    tls: Option<TestCa>,
    basic_auth: Option<(String, String)>,
    token_auth: Option<TokenAuth>,
    delete_disabled: bool,
    child: Option<Child>,
}

enum SpawnError {
    /// Someone else bound the port between our probe and the registry.
    AddrInUse,
    Failed(String),
}

impl Registry {
    /// A plain-HTTP registry without auth.
    pub fn start() -> Registry {
        Registry::start_with(RegistryOptions::default())
    }

    pub fn start_with(options: RegistryOptions) -> Registry {
        let bin = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("graft-test-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let tls = options.tls.then(|| TestCa::generate(dir.path()));
        if let Some((user, password)) = &options.basic_auth {
            write_htpasswd(&dir.path().join("htpasswd"), user, password);
        }
        let mut registry = Registry {
            dir,
            bin,
            port: 0,
            tls,
            basic_auth: options.basic_auth,
            token_auth: options.token_auth,
            delete_disabled: options.delete_disabled,
            child: None,
        };
        for _ in 0..PORT_ATTEMPTS {
            registry.port = free_port();
            match registry.spawn() {
                Ok(()) => return registry,
                Err(SpawnError::AddrInUse) => continue,
                Err(SpawnError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("docker-registry found no free port in {PORT_ATTEMPTS} attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Origin for `config.upstream.url`: `http(s)://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// PEM file of the CA that issued the registry's certificate (TLS only),
    /// for `config.upstream.ca_file`.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|ca| ca.ca_pem.clone())
    }

    /// DER of the test CA (TLS only), for clients that talk to it directly.
    pub fn ca_der(&self) -> Option<&[u8]> {
        self.tls.as_ref().map(|ca| ca.ca_der.as_slice())
    }

    /// The user and password the registry accepts (htpasswd only).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.basic_auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Where the registry keeps blobs and repositories.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Everything the registry printed since it was first started.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// The access-log lines (one per request the registry answered), oldest
    /// first. The registry writes a line just after the response, so use
    /// [`Registry::wait_for_access`] right after a request.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        self.log_text()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Number of requests with `method` whose URI starts with `uri_prefix`.
    pub fn count_requests(&self, method: &str, uri_prefix: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.method == method && e.uri.starts_with(uri_prefix))
            .count()
    }

    /// Waits (up to 5 s) until some access-log entry satisfies `matches`.
    pub fn wait_for_access(&self, what: &str, matches: impl Fn(&AccessLogEntry) -> bool) {
        super::wait_until(Duration::from_secs(5), what, || {
            self.access_log().iter().any(&matches)
        });
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the registry (its port then refuses connections); storage and
    /// log are kept for [`Registry::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(SpawnError::AddrInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(SpawnError::AddrInUse) => {
                    panic!(
                        "port {} stayed in use; cannot restart docker-registry",
                        self.port
                    )
                }
                Err(SpawnError::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// Writes the config for the current port, starts the child and waits
    /// until `/v2/` answers.
    fn spawn(&mut self) -> Result<(), SpawnError> {
        let config_path = self.dir.path().join("config.yml");
        fs::write(&config_path, self.config_yaml()).expect("write registry config");
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open registry log");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = self.log_since(log_start);
                return Err(if log.contains("address already in use") {
                    SpawnError::AddrInUse
                } else {
                    SpawnError::Failed(format!("docker-registry exited with {status}:\n{log}"))
                });
            }
            if self.answers_v2() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(SpawnError::Failed(format!(
                    "docker-registry did not answer /v2/ within {READY_TIMEOUT:?}:\n{}",
                    self.log_since(log_start)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let text = fs::read(self.log_path()).unwrap_or_default();
        let start = (offset as usize).min(text.len());
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    fn config_yaml(&self) -> String {
        let root = self.storage_dir();
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: {delete}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: graft-test-secret\n",
            root = root.display(),
            port = self.port,
            delete = !self.delete_disabled,
        );
        if let Some(ca) = &self.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                ca.server_cert_pem.display(),
                ca.server_key_pem.display()
            ));
        }
        if self.basic_auth.is_some() {
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: graft-test\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ));
        }
        if let Some(token) = &self.token_auth {
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                 rootcertbundle: {}\n",
                token.realm,
                token.service,
                token.issuer,
                token.rootcertbundle.display()
            ));
        }
        yaml
    }

    /// Whether an HTTP request for `/v2/` gets any HTTP answer (401 counts).
    fn answers_v2(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(2)));
        let request = format!(
            "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host()
        );
        let mut head = [0u8; 12];
        let answered = match &self.tls {
            None => exchange(tcp, request.as_bytes(), &mut head),
            Some(ca) => {
                let config = ca.client_config();
                let name =
                    rustls::pki_types::ServerName::try_from("127.0.0.1").expect("IP server name");
                let Ok(conn) = rustls::ClientConnection::new(config, name) else {
                    return false;
                };
                exchange(
                    rustls::StreamOwned::new(conn, tcp),
                    request.as_bytes(),
                    &mut head,
                )
            }
        };
        answered && head.starts_with(b"HTTP/1.")
    }
}

fn exchange(mut stream: impl Read + Write, request: &[u8], head: &mut [u8]) -> bool {
    stream.write_all(request).is_ok() && stream.read_exact(head).is_ok()
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of the docker-registry log (port {}) ---",
                self.port
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Parses `127.0.0.1 - user [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, after) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_owned();
    let uri = parts.next()?.to_owned();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = after.split_whitespace().next()?.parse().ok()?;
    Some(AccessLogEntry {
        method,
        uri,
        status,
    })
}

/// An htpasswd file with one bcrypt (`$2y$`) entry, the format distribution
/// reads; the low cost keeps tests fast.
fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let hash = bcrypt::hash_with_result(password, 4)
        .expect("bcrypt hash")
        .format_for_version(bcrypt::Version::TwoY);
    fs::write(path, format!("{user}:{hash}\n")).expect("write htpasswd");
}

/// A CA made for one registry, and a server certificate it issued for
/// `127.0.0.1` and `localhost`.
struct TestCa {
    ca_pem: PathBuf,
    ca_der: Vec<u8>,
    server_cert_pem: PathBuf,
    server_key_pem: PathBuf,
}

impl TestCa {
    fn generate(dir: &Path) -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "graft test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("issue server certificate");

        let ca = TestCa {
            ca_pem: dir.join("ca.pem"),
            ca_der: ca_cert.der().to_vec(),
            server_cert_pem: dir.join("server.pem"),
            server_key_pem: dir.join("server-key.pem"),
        };
        write_file(&ca.ca_pem, &ca_cert.pem());
        write_file(&ca.server_cert_pem, &server_cert.pem());
        write_file(&ca.server_key_pem, &server_key.serialize_pem());
        ca
    }

    /// A rustls client config that trusts only this CA.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .expect("add test CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    }
}

fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
