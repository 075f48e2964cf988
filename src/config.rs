//! Configuration: defaults, `graft.toml`, then `GRAFT_*` variables and flags.
//!
//! The file is read key by key rather than through one `serde` derive so that
//! a bad file is reported completely — one line per bad key — instead of
//! stopping at the first mistake (the habit linkerd2-proxy taught us).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock::Clock;

/// Everything `graft serve` needs, after defaults, file and overrides.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub referrers: ReferrersConfig,
    pub cache: CacheConfig,
    pub index: IndexConfig,
    /// `[[upstream]]` entries (mirror mode, `crate::mirror`): empty when the
    /// file has the single `[upstream]` table, which then is the only one.
    pub upstreams: Vec<crate::mirror::NamedUpstream>,
    /// Not a key: the time source for everything that expires. Tests give a
    /// [`Clock::skewable`] one to test expiry without sleeping.
    pub clock: Clock,
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Serve blobs and manifests by digest from local disk.
    pub enabled: bool,
    /// Byte budget; least recently used files are evicted past it.
    pub max_bytes: u64,
    /// How long a tag → digest answer is trusted before a HEAD revalidates it.
    pub tag_ttl: Duration,
    /// How long a last known tag digest or authorization may be used while
    /// the upstream is unreachable.
    pub max_stale: Duration,
    /// How long the upstream's yes for (credentials, repository) is remembered.
    pub auth_ttl: Duration,
    /// Most (credentials, repository) yeses remembered in memory (about 450
    /// bytes each, ~28 MiB at the default); past it the least used are
    /// forgotten and asked about again (offline, read back from the index).
    /// Bounds memory however many distinct tokens clients use.
    pub auth_cache_capacity: u64,
    /// Blob upload sessions graft keeps (state and cache tee) at once; past
    /// it the least recently active is forgotten (its upload passes through).
    pub max_upload_sessions: usize,
    /// How long an upload session is teed before it counts as abandoned.
    pub upload_session_ttl: Duration,
    /// Upload sessions one client (credentials, or address when anonymous)
    /// keeps at once; past it its own least recently active is forgotten
    /// (its upload passes through uncached).
    pub max_upload_sessions_per_client: usize,
    /// An upload session with no request for this long is forgotten and
    /// its temp file deleted (its upload passes through from then on).
    pub upload_idle_timeout: Duration,
    /// Free space kept on the data directory's file system: a miss is
    /// streamed uncached when caching it would go below this, and eviction
    /// frees files until it is back above it (besides `max_bytes`).
    pub min_free: u64,
}

/// How the index's traffic-grown trees are pruned (see `index::prune`):
/// each keeps entries up to a maximum age, and at most a maximum count
/// (the oldest go first). Ages below what the cache needs are raised to it.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// sled's in-memory page cache: the index's share of graft's memory
    /// (sled's own default, 1 GiB, would let it grow with every key).
    pub cache_bytes: u64,
    /// How often the pruning pass runs.
    pub prune_interval: Duration,
    /// (repository, digest) pairs the upstream confirmed; at least `cache.max_stale`.
    pub present: TreeBounds,
    /// Remembered yeses per (repository, credentials); at least `cache.max_stale`.
    pub access: TreeBounds,
    /// Last known tag digests; at least `max(cache.tag_ttl, cache.max_stale)`.
    pub tags: TreeBounds,
    /// Referrers deleted through graft; at least 10 × `referrers.tag_ttl`.
    pub tombstones: TreeBounds,
    /// Fallback-tag entries judged not to belong; at least 10 × `referrers.tag_ttl`.
    pub rejected: TreeBounds,
    /// Digest of each fallback tag last read.
    pub fallback_seen: TreeBounds,
    /// Last referrers answer of a native upstream per (repository,
    /// subject, filter), for offline answers; at least `referrers.max_stale`.
    pub native_answers: TreeBounds,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// TLS for the listener; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Slow-loris bound: a client has this long to send a request head.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Largest manifest body graft buffers (the spec's suggested floor is 4 MiB).
    pub max_manifest_bytes: usize,
    /// Longest silence allowed between request body bytes from a client: a
    /// client that stops mid-body is cut instead of holding a request open.
    pub body_timeout: Duration,
    /// Open client connections at most; past it the accept loop pauses and
    /// new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// Requests in flight (bodies included) at most; past it new requests
    /// are answered 503 `UNAVAILABLE` at once instead of queueing.
    pub max_concurrent_requests: usize,
    /// The origin clients reach graft at (`https://registry.example.com`),
    /// for `Location` and `Link` URLs when a request carries no valid
    /// `Host`. `None`: such a request gets 400 when a URL must be built.
    pub public_url: Option<String>,
}

/// `Debug` (and so any log line or panic that prints the configuration)
/// shows `password` only as `<redacted>`, and `url` without userinfo.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Origin of the registry graft fronts, e.g. `https://registry.internal`.
    pub url: String,
    /// Extra PEM roots trusted on top of the system store (private CAs).
    pub ca_file: Option<PathBuf>,
    /// Turns certificate verification off; only for test rigs.
    pub insecure_skip_verify: bool,
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response head arrives (→ 504).
    pub response_timeout: Duration,
    /// Longest silence allowed between body bytes from the upstream (cache
    /// fills, fallback-tag reads): a stalled body is cut instead of holding
    /// a fill or a tag lock forever.
    pub body_timeout: Duration,
    /// How long an unused pooled upstream connection is kept.
    pub idle_timeout: Duration,
    /// How long `/readyz` waits for the upstream's `/v2/`.
    pub ready_timeout: Duration,
    /// graft's own upstream credentials (basic auth, or exchanged at the
    /// registry's token realm for Bearer tokens), used only for graft's own
    /// upkeep: finishing owed fallback-tag writes after a restart, fallback
    /// tags a client's token may not write, `graft reindex`. Never used to
    /// answer a client. In front of a token registry they need push rights
    /// on the repositories graft serves.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The registry's token-signing certificate bundle (its
    /// `auth.token.rootcertbundle`). Set, graft validates a client's
    /// Bearer token itself — but only while the upstream is unreachable —
    /// and serves cached content to a token granting pull on the
    /// repository. `None`: offline, only a remembered yes stands.
    pub token_certificate: Option<PathBuf>,
    /// The `iss` tokens must carry (the registry's `auth.token.issuer`);
    /// required with `token_certificate`.
    pub token_issuer: Option<String>,
    /// The `aud` tokens must name (the registry's `auth.token.service`);
    /// required with `token_certificate`.
    pub token_service: Option<String>,
}

/// What `Debug` prints in place of a secret.
const REDACTED: &str = "<redacted>";

impl UpstreamConfig {
    /// graft's own `Authorization` for background work, from `username`
    /// and `password` (marked sensitive, so it never reaches a log).
    pub fn own_authorization(&self) -> Option<http::HeaderValue> {
        use base64::Engine as _;
        let user = self.username.as_deref()?;
        let pass = self.password.as_deref().unwrap_or("");
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let mut v = http::HeaderValue::from_str(&format!("Basic {token}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let UpstreamConfig {
            url,
            ca_file,
            insecure_skip_verify,
            connect_timeout,
            response_timeout,
            body_timeout,
            idle_timeout,
            ready_timeout,
            username,
            password,
            token_certificate,
            token_issuer,
            token_service,
        } = self;
        f.debug_struct("UpstreamConfig")
            .field("url", &without_userinfo(url))
            .field("ca_file", ca_file)
            .field("insecure_skip_verify", insecure_skip_verify)
            .field("connect_timeout", connect_timeout)
            .field("response_timeout", response_timeout)
            .field("body_timeout", body_timeout)
            .field("idle_timeout", idle_timeout)
            .field("ready_timeout", ready_timeout)
            .field("username", username)
            .field("password", &password.as_ref().map(|_| REDACTED))
            .field("token_certificate", token_certificate)
            .field("token_issuer", token_issuer)
            .field("token_service", token_service)
            .finish()
    }
}

/// `scheme://user:secret@host` as `scheme://<redacted>@host`, for `Debug`
/// and the validation messages (a URL without a scheme is judged as if
/// it started after `://`).
fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let scheme = scheme.map(|s| format!("{s}://")).unwrap_or_default();
            format!("{scheme}{REDACTED}{}", &rest[at..]).into()
        }
        None => url.into(),
    }
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Holds `index/` (sled) and `blobs/` (the content cache).
    pub data_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// How the referrers API is provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferrersMode {
    /// Probe the upstream once; pass through when it speaks 1.1 natively.
    Auto,
    /// Always answer from graft's index and the fallback tags.
    Synthesize,
    /// Always forward to the upstream.
    Passthrough,
}

/// Whether graft maintains the upstream's fallback tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackTag {
    Write,
    Read,
}

#[derive(Clone, Debug)]
pub struct ReferrersConfig {
    pub mode: ReferrersMode,
    pub fallback_tag: FallbackTag,
    /// How long a fallback tag's digest is trusted before a HEAD rechecks it.
    pub tag_ttl: Duration,
    /// Entries per referrers page before a `Link: rel="next"` is added.
    pub page_size: usize,
    /// Most (repository, subject, credentials) fallback-tag checks
    /// remembered for `tag_ttl` (about 0.5 KiB each).
    pub recent_checks_capacity: u64,
    /// Largest fallback-tag index graft writes (the registry's manifest
    /// limit; distribution's is 4 MiB): past it annotations are dropped
    /// from the largest entries first, and a tag whose bare descriptors do
    /// not fit is not written.
    pub max_tag_bytes: usize,
    /// How long the last answer of a native upstream's referrers API may
    /// stand in while it is unreachable (clients with a remembered yes).
    pub max_stale: Duration,
}

const DAY: u64 = 86_400;

/// The default of `index.cache_bytes`.
pub const DEFAULT_INDEX_CACHE_BYTES: u64 = 16 << 20;

/// How long, and how many, entries of one index tree are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeBounds {
    pub max_age: Duration,
    pub max_entries: usize,
}

fn bounds(max_age_secs: u64, max_entries: usize) -> TreeBounds {
    TreeBounds {
        max_age: Duration::from_secs(max_age_secs),
        max_entries,
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig {
                listen: "127.0.0.1:5001".parse().expect("literal address"),
                tls_cert: None,
                tls_key: None,
                header_read_timeout: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(30),
                max_manifest_bytes: 4 * 1024 * 1024,
                body_timeout: Duration::from_secs(60),
                max_connections: 1024,
                max_concurrent_requests: 1024,
                public_url: None,
            },
            upstream: UpstreamConfig {
                url: "http://127.0.0.1:5000".into(),
                ca_file: None,
                insecure_skip_verify: false,
                connect_timeout: Duration::from_secs(5),
                response_timeout: Duration::from_secs(60),
                body_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(90),
                ready_timeout: Duration::from_secs(3),
                username: None,
                password: None,
                token_certificate: None,
                token_issuer: None,
                token_service: None,
            },
            storage: StorageConfig {
                data_dir: PathBuf::from("graft-data"),
            },
            log: LogConfig {
                format: LogFormat::Text,
            },
            referrers: ReferrersConfig {
                mode: ReferrersMode::Auto,
                fallback_tag: FallbackTag::Write,
                tag_ttl: Duration::ZERO,
                page_size: 1000,
                recent_checks_capacity: 10_000,
                max_tag_bytes: 4 * 1024 * 1024,
                max_stale: Duration::from_secs(24 * 3600),
            },
            cache: CacheConfig {
                enabled: true,
                max_bytes: 10 << 30,
                tag_ttl: Duration::ZERO,
                max_stale: Duration::from_secs(24 * 3600),
                auth_ttl: Duration::from_secs(60),
                auth_cache_capacity: 65_536,
                max_upload_sessions: 256,
                upload_session_ttl: Duration::from_secs(3600),
                max_upload_sessions_per_client: 32,
                upload_idle_timeout: Duration::from_secs(600),
                min_free: 1 << 30,
            },
            index: IndexConfig {
                cache_bytes: DEFAULT_INDEX_CACHE_BYTES,
                prune_interval: Duration::from_secs(600),
                present: bounds(30 * DAY, 1_000_000),
                access: bounds(DAY, 100_000),
                tags: bounds(7 * DAY, 200_000),
                tombstones: bounds(30 * DAY, 100_000),
                rejected: bounds(7 * DAY, 100_000),
                fallback_seen: bounds(7 * DAY, 100_000),
                native_answers: bounds(7 * DAY, 10_000),
            },
            upstreams: Vec::new(),
            clock: Clock::system(),
        }
    }
}

/// A configuration that could not be used; one message per bad key.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "config: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Values given on the command line or through `GRAFT_*` variables; they win
/// over the file. Each is the raw string so it is judged by the same parser.
/// `Debug` redacts the values of [`SECRET_KEYS`] and userinfo in URLs.
#[derive(Clone, Default)]
pub struct Overrides {
    pub values: Vec<(&'static str, String)>,
}

/// Keys whose values are secrets: never printed.
const SECRET_KEYS: &[&str] = &["upstream.password"];

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.values.iter().map(|(k, v)| {
            let v = match *k {
                k if SECRET_KEYS.contains(&k) => REDACTED.into(),
                "upstream.url" => without_userinfo(v),
                _ => v.as_str().into(),
            };
            (k, v)
        });
        f.debug_struct("Overrides")
            .field("values", &shown.collect::<Vec<_>>())
            .finish()
    }
}

impl Overrides {
    pub fn set(&mut self, key: &'static str, value: Option<String>) {
        if let Some(v) = value {
            self.values.push((key, v));
        }
    }
}

/// Every key graft knows, as `section.key`, with the setter that parses it.
type Setter = fn(&mut Config, &toml::Value) -> Result<(), String>;

const KEYS: &[(&str, Setter)] = &[
    ("server.listen", |c, v| {
        c.server.listen = parse_str(v)?
            .parse()
            .map_err(|e| format!("not a socket address ({e})"))?;
        Ok(())
    }),
    ("server.tls_cert", |c, v| {
        c.server.tls_cert = opt_path(v)?;
        Ok(())
    }),
    ("server.tls_key", |c, v| {
        c.server.tls_key = opt_path(v)?;
        Ok(())
    }),
    ("server.header_read_timeout", |c, v| {
        c.server.header_read_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("server.shutdown_grace", |c, v| {
        c.server.shutdown_grace = parse_duration_value(v)?;
        Ok(())
    }),
    ("server.max_manifest_bytes", |c, v| {
        c.server.max_manifest_bytes = parse_size_value(v)?;
        Ok(())
    }),
    ("server.body_timeout", |c, v| {
        c.server.body_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("server.max_connections", |c, v| {
        c.server.max_connections = parse_count_value(v)?;
        Ok(())
    }),
    ("server.max_concurrent_requests", |c, v| {
        c.server.max_concurrent_requests = parse_count_value(v)?;
        Ok(())
    }),
    ("upstream.url", |c, v| {
        c.upstream.url = parse_str(v)?.trim_end_matches('/').to_string();
        Ok(())
    }),
    ("upstream.ca_file", |c, v| {
        c.upstream.ca_file = opt_path(v)?;
        Ok(())
    }),
    ("upstream.insecure_skip_verify", |c, v| {
        c.upstream.insecure_skip_verify = parse_bool(v)?;
        Ok(())
    }),
    ("upstream.connect_timeout", |c, v| {
        c.upstream.connect_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("upstream.response_timeout", |c, v| {
        c.upstream.response_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("upstream.body_timeout", |c, v| {
        c.upstream.body_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("upstream.idle_timeout", |c, v| {
        c.upstream.idle_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("upstream.ready_timeout", |c, v| {
        c.upstream.ready_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("upstream.username", |c, v| {
        c.upstream.username = Some(parse_str(v)?.to_string()).filter(|s| !s.is_empty());
        Ok(())
    }),
    ("upstream.password", |c, v| {
        c.upstream.password = Some(parse_str(v)?.to_string()).filter(|s| !s.is_empty());
        Ok(())
    }),
    ("upstream.token_certificate", |c, v| {
        c.upstream.token_certificate = opt_path(v)?;
        Ok(())
    }),
    ("upstream.token_issuer", |c, v| {
        c.upstream.token_issuer = Some(parse_str(v)?.to_string()).filter(|s| !s.is_empty());
        Ok(())
    }),
    ("upstream.token_service", |c, v| {
        c.upstream.token_service = Some(parse_str(v)?.to_string()).filter(|s| !s.is_empty());
        Ok(())
    }),
    ("storage.data_dir", |c, v| {
        c.storage.data_dir = PathBuf::from(parse_str(v)?);
        Ok(())
    }),
    ("log.format", |c, v| {
        c.log.format = match parse_str(v)? {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(format!("`{other}` is not one of text, json")),
        };
        Ok(())
    }),
    ("referrers.mode", |c, v| {
        c.referrers.mode = match parse_str(v)? {
            "auto" => ReferrersMode::Auto,
            "synthesize" => ReferrersMode::Synthesize,
            "passthrough" => ReferrersMode::Passthrough,
            other => {
                return Err(format!(
                    "`{other}` is not one of auto, synthesize, passthrough"
                ))
            }
        };
        Ok(())
    }),
    ("referrers.fallback_tag", |c, v| {
        c.referrers.fallback_tag = match parse_str(v)? {
            "write" => FallbackTag::Write,
            "read" => FallbackTag::Read,
            other => return Err(format!("`{other}` is not one of write, read")),
        };
        Ok(())
    }),
    ("referrers.tag_ttl", |c, v| {
        c.referrers.tag_ttl = parse_duration_value(v)?;
        Ok(())
    }),
    ("referrers.page_size", |c, v| {
        let n = parse_size_value(v)?;
        if n == 0 {
            return Err("must be at least 1".into());
        }
        c.referrers.page_size = n;
        Ok(())
    }),
    ("referrers.recent_checks_capacity", |c, v| {
        c.referrers.recent_checks_capacity = parse_size_value(v)? as u64;
        Ok(())
    }),
    // Issue 9 (hardening): where graft says it lives, how big a tag may grow.
    ("server.public_url", |c, v| {
        let url = parse_str(v)?.trim_end_matches('/');
        c.server.public_url = (!url.is_empty()).then(|| url.to_string());
        Ok(())
    }),
    ("referrers.max_tag_bytes", |c, v| {
        let n = parse_size_value(v)?;
        if n == 0 {
            return Err("must be at least 1".into());
        }
        c.referrers.max_tag_bytes = n;
        Ok(())
    }),
    ("index.cache_bytes", |c, v| {
        c.index.cache_bytes = parse_size_value(v)? as u64;
        Ok(())
    }),
    ("index.prune_interval", |c, v| {
        let d = parse_duration_value(v)?;
        if d.is_zero() {
            return Err("must be more than 0s".into());
        }
        c.index.prune_interval = d;
        Ok(())
    }),
    ("index.present_max_age", |c, v| {
        c.index.present.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.present_max_entries", |c, v| {
        c.index.present.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("index.access_max_age", |c, v| {
        c.index.access.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.access_max_entries", |c, v| {
        c.index.access.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("index.tags_max_age", |c, v| {
        c.index.tags.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.tags_max_entries", |c, v| {
        c.index.tags.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("index.tombstones_max_age", |c, v| {
        c.index.tombstones.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.tombstones_max_entries", |c, v| {
        c.index.tombstones.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("index.rejected_max_age", |c, v| {
        c.index.rejected.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.rejected_max_entries", |c, v| {
        c.index.rejected.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("index.fallback_seen_max_age", |c, v| {
        c.index.fallback_seen.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.fallback_seen_max_entries", |c, v| {
        c.index.fallback_seen.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("index.native_answers_max_age", |c, v| {
        c.index.native_answers.max_age = parse_duration_value(v)?;
        Ok(())
    }),
    ("index.native_answers_max_entries", |c, v| {
        c.index.native_answers.max_entries = parse_size_value(v)?;
        Ok(())
    }),
    ("referrers.max_stale", |c, v| {
        c.referrers.max_stale = parse_duration_value(v)?;
        Ok(())
    }),
    ("cache.enabled", |c, v| {
        c.cache.enabled = parse_bool(v)?;
        Ok(())
    }),
    ("cache.max_bytes", |c, v| {
        c.cache.max_bytes = parse_size_value(v)? as u64;
        Ok(())
    }),
    ("cache.tag_ttl", |c, v| {
        c.cache.tag_ttl = parse_duration_value(v)?;
        Ok(())
    }),
    ("cache.max_stale", |c, v| {
        c.cache.max_stale = parse_duration_value(v)?;
        Ok(())
    }),
    ("cache.auth_ttl", |c, v| {
        c.cache.auth_ttl = parse_duration_value(v)?;
        Ok(())
    }),
    ("cache.auth_cache_capacity", |c, v| {
        c.cache.auth_cache_capacity = parse_size_value(v)? as u64;
        Ok(())
    }),
    ("cache.max_upload_sessions", |c, v| {
        c.cache.max_upload_sessions = parse_size_value(v)?;
        Ok(())
    }),
    ("cache.upload_session_ttl", |c, v| {
        c.cache.upload_session_ttl = parse_duration_value(v)?;
        Ok(())
    }),
    ("cache.max_upload_sessions_per_client", |c, v| {
        c.cache.max_upload_sessions_per_client = parse_size_value(v)?;
        Ok(())
    }),
    ("cache.upload_idle_timeout", |c, v| {
        c.cache.upload_idle_timeout = parse_duration_value(v)?;
        Ok(())
    }),
    ("cache.min_free", |c, v| {
        c.cache.min_free = parse_size_value(v)? as u64;
        Ok(())
    }),
];

impl Config {
    /// Builds the configuration from an optional file and overrides.
    ///
    /// `file` is `(path, required)`: the default path may be absent, a path
    /// the user named must exist.
    pub fn load(
        file: Option<(&Path, bool)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        let mut config = Config::default();
        let mut errors = Vec::new();
        if let Some((path, required)) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => config.apply_toml(&text, &path.display().to_string(), &mut errors),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("{}: cannot read ({e})", path.display())),
            }
        }
        for (key, raw) in &overrides.values {
            config.apply_one(
                key,
                &toml::Value::String(raw.clone()),
                "override",
                &mut errors,
            );
        }
        config.validate(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Parses a TOML document onto `self`, collecting every bad key.
    pub fn apply_toml(&mut self, text: &str, origin: &str, errors: &mut Vec<String>) {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{origin}: not valid TOML: {}", e.message()));
                return;
            }
        };
        for (section, value) in &table {
            if section == "upstream" && value.is_array() {
                continue; // `[[upstream]]`: read below, on top of every other section
            }
            let Some(inner) = value.as_table() else {
                errors.push(format!("{origin}: `{section}` is not a known section"));
                continue;
            };
            for (key, v) in inner {
                let full = format!("{section}.{key}");
                self.apply_one(&full, v, origin, errors);
            }
        }
        if let Some(entries) = table.get("upstream").and_then(toml::Value::as_array) {
            crate::mirror::read_entries(self, entries, origin, errors);
        }
    }

    pub(crate) fn apply_one(
        &mut self,
        key: &str,
        value: &toml::Value,
        origin: &str,
        errors: &mut Vec<String>,
    ) {
        match KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, set)) => {
                if let Err(e) = set(self, value) {
                    errors.push(format!("{origin}: `{key}`: {e}"));
                }
            }
            None => errors.push(format!("{origin}: `{key}` is not a known key")),
        }
    }

    /// Checks that cut across keys.
    fn validate(&self, errors: &mut Vec<String>) {
        validate_upstream_url("upstream.url", &self.upstream.url, errors);
        crate::mirror::validate_entries(&self.upstreams, errors);
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                errors.push("`server.tls_cert` and `server.tls_key` must be set together".into())
            }
            _ => {}
        }
        for (key, path) in [
            ("server.tls_cert", &self.server.tls_cert),
            ("server.tls_key", &self.server.tls_key),
            ("upstream.ca_file", &self.upstream.ca_file),
            (
                "upstream.token_certificate",
                &self.upstream.token_certificate,
            ),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    errors.push(format!("`{key}`: {} is not a readable file", p.display()));
                }
            }
        }
        if self.upstream.token_certificate.is_some() {
            for (key, value) in [
                ("upstream.token_issuer", &self.upstream.token_issuer),
                ("upstream.token_service", &self.upstream.token_service),
            ] {
                if value.is_none() {
                    errors.push(format!(
                        "`{key}` is required with `upstream.token_certificate`"
                    ));
                }
            }
        }
        if self.upstream.password.is_some() && self.upstream.username.is_none() {
            errors.push("`upstream.password` is set but `upstream.username` is not".into());
        }
        if let Some(url) = &self.server.public_url {
            if !is_origin(url) {
                errors.push(format!(
                    "`server.public_url`: `{url}` must be an origin (http(s)://host[:port]) without a path"
                ));
            }
        }
        if self.server.max_manifest_bytes == 0 {
            errors.push("`server.max_manifest_bytes`: must be at least 1".into());
        }
    }
}

/// `key` (an upstream's URL) must be `http(s)://host[:port]`.
pub(crate) fn validate_upstream_url(key: &str, url: &str, errors: &mut Vec<String>) {
    let shown = without_userinfo(url);
    match url.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => {
            if rest.contains('/') {
                errors.push(format!(
                    "`{key}`: `{shown}` must be an origin (scheme://host[:port]) without a path"
                ));
            } else if rest.parse::<http::uri::Authority>().is_err() {
                errors.push(format!("`{key}`: `{shown}` is not a valid host[:port]"));
            }
        }
        _ => errors.push(format!(
            "`{key}`: `{shown}` must start with http:// or https://"
        )),
    }
}

/// Whether `url` is `http(s)://host[:port]`: no path, query or userinfo.
fn is_origin(url: &str) -> bool {
    match url.split_once("://") {
        Some(("http" | "https", rest)) => {
            !rest.is_empty()
                && !rest.contains(['/', '?', '#', '@'])
                && rest.parse::<http::uri::Authority>().is_ok()
        }
        _ => false,
    }
}

fn parse_str(v: &toml::Value) -> Result<&str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected a string, found {}", v.type_str()))
}

fn opt_path(v: &toml::Value) -> Result<Option<PathBuf>, String> {
    let s = parse_str(v)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

fn parse_bool(v: &toml::Value) -> Result<bool, String> {
    match v {
        toml::Value::Boolean(b) => Ok(*b),
        toml::Value::String(s) if s == "true" => Ok(true),
        toml::Value::String(s) if s == "false" => Ok(false),
        other => Err(format!("expected true or false, found {other}")),
    }
}

/// A cap: a positive integer (a semaphore of zero would serve nobody).
fn parse_count_value(v: &toml::Value) -> Result<usize, String> {
    let n = match v {
        toml::Value::Integer(i) if *i >= 0 => *i as usize,
        toml::Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number"))?,
        other => return Err(format!("expected a whole number, found {other}")),
    };
    if n == 0 {
        return Err("must be at least 1".into());
    }
    // tokio's semaphore holds at most usize::MAX >> 3 permits.
    Ok(n.min(tokio::sync::Semaphore::MAX_PERMITS))
}

fn parse_size_value(v: &toml::Value) -> Result<usize, String> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as usize),
        toml::Value::String(s) => parse_size(s),
        other => Err(format!(
            "expected a size such as 4MiB or 4194304, found {other}"
        )),
    }
}

/// Accepts a bare number of bytes or a size with a unit as `bytesize` reads
/// it: `4MiB`, `10GiB`, `512KiB`, also decimal units (`4MB` = 4 000 000).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let bytes = match s.parse::<bytesize::ByteSize>() {
        Ok(b) if s.starts_with(|c: char| c.is_ascii_digit()) => b.as_u64(),
        _ => return Err(format!("`{s}` is not a size such as 4MiB or 4194304")),
    };
    // bytesize saturates where the old parser refused.
    usize::try_from(bytes)
        .ok()
        .filter(|_| bytes != u64::MAX)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn parse_duration_value(v: &toml::Value) -> Result<Duration, String> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(Duration::from_secs(*i as u64)),
        toml::Value::String(s) => parse_duration(s),
        other => Err(format!(
            "expected a duration such as \"30s\", found {other}"
        )),
    }
}

/// Accepts a bare number of seconds or what `humantime` reads: `250ms`,
/// `30s`, `5m`, `24h`, also `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{s}` is too large"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration such as 30s, 5m or 250ms ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_key_is_reported() {
        let mut c = Config::default();
        let mut errors = Vec::new();
        c.apply_toml(
            "[server]\nlisten = \"nope\"\nbogus = 1\n[upstream]\nconnect_timeout = \"5 fortnights\"\n[log]\nformat = \"xml\"\n",
            "t.toml",
            &mut errors,
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("server.listen")));
        assert!(errors.iter().any(|e| e.contains("server.bogus")));
        assert!(errors
            .iter()
            .any(|e| e.contains("upstream.connect_timeout")));
        assert!(errors.iter().any(|e| e.contains("log.format")));
    }

    #[test]
    fn overrides_win_over_file_and_are_validated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.toml");
        std::fs::write(&path, "[upstream]\nurl = \"http://file:1\"\n").expect("write");
        let mut o = Overrides::default();
        o.set("upstream.url", Some("https://flag:2".into()));
        let c = Config::load(Some((&path, true)), &o).expect("valid");
        assert_eq!(c.upstream.url, "https://flag:2");

        let mut bad = Overrides::default();
        bad.set("upstream.url", Some("ftp://x".into()));
        bad.set("server.listen", Some("x".into()));
        let e = Config::load(None, &bad).expect_err("invalid");
        assert_eq!(e.0.len(), 2, "{e}");
    }

    #[test]
    fn a_token_certificate_needs_issuer_and_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("token.pem");
        std::fs::write(&bundle, "").expect("write");
        let mut o = Overrides::default();
        o.set(
            "upstream.token_certificate",
            Some(bundle.display().to_string()),
        );
        let e = Config::load(None, &o).expect_err("issuer and service missing");
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(e.0.iter().any(|m| m.contains("upstream.token_issuer")));
        assert!(e.0.iter().any(|m| m.contains("upstream.token_service")));
        o.set("upstream.token_issuer", Some("auth".into()));
        o.set("upstream.token_service", Some("registry".into()));
        let c = Config::load(None, &o).expect("complete");
        assert_eq!(
            c.upstream.token_certificate.as_deref(),
            Some(bundle.as_path())
        );
    }

    #[test]
    fn missing_default_file_is_fine_but_named_file_is_not() {
        let o = Overrides::default();
        assert!(Config::load(Some((Path::new("/nonexistent/g.toml"), false)), &o).is_ok());
        assert!(Config::load(Some((Path::new("/nonexistent/g.toml"), true)), &o).is_err());
    }

    #[test]
    fn every_duration_form_accepted_before_still_parses() {
        let secs = Duration::from_secs;
        for (text, want) in [
            ("250ms", Duration::from_millis(250)),
            ("30s", secs(30)),
            ("0s", Duration::ZERO),
            ("5m", secs(300)),
            ("24h", secs(86_400)),
            ("90", secs(90)),
            ("0", Duration::ZERO),
            (" 30s ", secs(30)),
            ("1h 30m", secs(5_400)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["-1s", "", "soon", "5 fortnights", "1.5.2s", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let value = |v: toml::Value| parse_duration_value(&v);
        assert_eq!(value(toml::Value::Integer(45)), Ok(secs(45)));
        assert!(value(toml::Value::Integer(-1)).is_err());
        assert!(value(toml::Value::Boolean(true)).is_err());
    }

    #[test]
    fn every_size_form_accepted_before_still_parses() {
        for (text, want) in [
            ("4MiB", 4 << 20),
            ("10GiB", 10 << 30),
            ("512KiB", 512 << 10),
            ("100B", 100),
            ("4194304", 4 << 20),
            ("4 MiB", 4 << 20),
            ("0", 0),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["4XB", "", "-1", "lots", "MiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let value = |v: toml::Value| parse_size_value(&v);
        assert_eq!(value(toml::Value::Integer(1000)), Ok(1000));
        assert!(value(toml::Value::Integer(-1)).is_err());
        assert!(value(toml::Value::Float(1.5)).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let secret = "s3cr3t-pa55word";
        let mut o = Overrides::default();
        o.set("upstream.username", Some("graft".into()));
        o.set("upstream.password", Some(secret.into()));
        o.set(
            "upstream.url",
            Some(format!("https://graft:{secret}@reg.example")),
        );
        assert!(!format!("{o:?}").contains(secret), "{o:?}");
        assert!(format!("{o:?}").contains("graft"), "other values are shown");
        let mut c = Config::default();
        let mut errors = Vec::new();
        for (key, raw) in &o.values {
            c.apply_one(key, &toml::Value::String(raw.clone()), "t", &mut errors);
        }
        assert!(errors.is_empty(), "{errors:?}");
        let shown = format!("{c:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("password: Some(\"<redacted>\")"), "{shown}");
        assert!(shown.contains("https://<redacted>@reg.example"), "{shown}");
        c.upstream.url = format!("graft:{secret}@reg.example");
        let mut errors = Vec::new();
        c.validate(&mut errors);
        assert!(!errors.is_empty());
        assert!(errors.iter().all(|e| !e.contains(secret)), "{errors:?}");
    }

    #[test]
    fn example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/graft.toml");
        let text = std::fs::read_to_string(&path).expect("config/graft.toml");
        let table: toml::Table = text.parse().expect("valid TOML");
        for (key, _) in KEYS {
            let (section, name) = key.split_once('.').expect("section.key");
            assert!(
                table.get(section).and_then(|s| s.get(name)).is_some(),
                "{key} missing from config/graft.toml"
            );
        }
        let c = Config::load(Some((&path, true)), &Overrides::default()).expect("valid");
        let d = Config::default();
        // `Debug` redacts the password, so it is compared on its own.
        assert_eq!(c.upstream.password, d.upstream.password);
        assert_eq!(
            format!("{c:?}"),
            format!("{d:?}"),
            "example values differ from the defaults"
        );
    }
}
