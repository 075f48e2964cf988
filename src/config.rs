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
    /// Blob uploads teed into the cache at once; past it the oldest
    /// session's tee is dropped (the upload itself passes through).
    pub max_upload_sessions: usize,
    /// How long an upload session is teed before it counts as abandoned.
    pub upload_session_ttl: Duration,
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
}

#[derive(Clone, Debug)]
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
    /// graft's own upstream credentials (basic auth), used only for work no
    /// client is waiting on: finishing owed fallback-tag writes after a
    /// restart, `graft reindex`. Never sent on a client's behalf.
    pub username: Option<String>,
    pub password: Option<String>,
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
            },
            cache: CacheConfig {
                enabled: true,
                max_bytes: 10 << 30,
                tag_ttl: Duration::ZERO,
                max_stale: Duration::from_secs(24 * 3600),
                auth_ttl: Duration::from_secs(60),
                max_upload_sessions: 256,
                upload_session_ttl: Duration::from_secs(3600),
            },
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
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub values: Vec<(&'static str, String)>,
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
    ("cache.max_upload_sessions", |c, v| {
        c.cache.max_upload_sessions = parse_size_value(v)?;
        Ok(())
    }),
    ("cache.upload_session_ttl", |c, v| {
        c.cache.upload_session_ttl = parse_duration_value(v)?;
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
            let Some(inner) = value.as_table() else {
                errors.push(format!("{origin}: `{section}` is not a known section"));
                continue;
            };
            for (key, v) in inner {
                let full = format!("{section}.{key}");
                self.apply_one(&full, v, origin, errors);
            }
        }
    }

    fn apply_one(
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
        match self.upstream.url.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() => {
                if rest.contains('/') {
                    errors.push(format!(
                        "`upstream.url`: `{}` must be an origin (scheme://host[:port]) without a path",
                        self.upstream.url
                    ));
                } else if rest.parse::<http::uri::Authority>().is_err() {
                    errors.push(format!(
                        "`upstream.url`: `{rest}` is not a valid host[:port]"
                    ));
                }
            }
            _ => errors.push(format!(
                "`upstream.url`: `{}` must start with http:// or https://",
                self.upstream.url
            )),
        }
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
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    errors.push(format!("`{key}`: {} is not a readable file", p.display()));
                }
            }
        }
        if self.upstream.password.is_some() && self.upstream.username.is_none() {
            errors.push("`upstream.password` is set but `upstream.username` is not".into());
        }
        if self.server.max_manifest_bytes == 0 {
            errors.push("`server.max_manifest_bytes`: must be at least 1".into());
        }
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

fn parse_size_value(v: &toml::Value) -> Result<usize, String> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as usize),
        toml::Value::String(s) => parse_size(s),
        other => Err(format!(
            "expected a size such as 4MiB or 4194304, found {other}"
        )),
    }
}

/// Accepts plain bytes or `KiB`/`MiB`/`GiB` suffixes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 4MiB or 4194304"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
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

/// Accepts `250ms`, `30s`, `5m`, `24h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 30s, 5m or 250ms"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown duration unit `{other}` (use ms, s, m, h)")),
    };
    Ok(d)
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
    fn missing_default_file_is_fine_but_named_file_is_not() {
        let o = Overrides::default();
        assert!(Config::load(Some((Path::new("/nonexistent/g.toml"), false)), &o).is_ok());
        assert!(Config::load(Some((Path::new("/nonexistent/g.toml"), true)), &o).is_err());
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert!(parse_size("4XB").is_err());
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
        assert_eq!(
            format!("{c:?}"),
            format!("{d:?}"),
            "example values differ from the defaults"
        );
    }
}
