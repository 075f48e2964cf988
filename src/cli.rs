//! The command line. Flags and `GRAFT_*` variables override the config file;
//! both are judged by the same parser as the file.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigErrors, Overrides};

/// `graft --version`: the crate version and the build's git commit
/// (build.rs: `GRAFT_COMMIT`, else `git rev-parse --short HEAD`, else
/// "unknown").
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GRAFT_COMMIT"), ")");

/// A caching reverse proxy that gives OCI Distribution 1.0 registries the
/// OCI 1.1 referrers API and serves as an edge cache for CI runners.
#[derive(Parser, Debug)]
#[command(name = "graft", version = VERSION, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy in front of an upstream registry.
    Serve(Box<ServeArgs>),
    /// Exit 0 when graft's /healthz answers 200 (for container HEALTHCHECKs,
    /// where no curl is installed).
    Healthcheck {
        /// The health URL to probe (plain http).
        #[arg(long, default_value = "http://127.0.0.1:5001/healthz")]
        url: String,
    },
    /// Rebuild the referrers index from the upstream's fallback tags (stop
    /// `graft serve` on the same data directory first).
    Reindex(ReindexArgs),
    /// Print the referrers a running graft lists for a subject; --tree adds
    /// referrers of referrers.
    Referrers(ReferrersArgs),
    /// Inspect and maintain the content cache, or fill it ahead of pulls.
    Cache(CacheArgs),
    /// After the registry gained the referrers API: re-push every fallback
    /// tag's referrers unchanged so its own API lists them (exit 1 when
    /// anything is left).
    Migrate(MigrateArgs),
    /// Check a registry before putting graft in front of it: reachability,
    /// TLS, auth, catalog, push and DELETE rights, the referrers API, index
    /// validation, tag pagination and round-trip time. Exits 0 when graft
    /// can serve it fully, 1 when something graft needs fails, 2 for usage
    /// errors or an unreachable registry.
    Doctor(DoctorArgs),
    /// Print a shell completion script: `source <(graft completions bash)`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `graft man > graft.1; man ./graft.1`.
    Man,
}

impl Cli {
    /// Writes the completion script for `shell` to `out`.
    pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "graft", out);
    }

    /// Writes the man page, with a section for each subcommand, to `out`.
    pub fn man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let command = <Cli as clap::CommandFactory>::command();
        clap_mangen::Man::new(command.clone()).render(out)?;
        // The top page lists the subcommands; their options follow, each
        // under its own heading, so `man graft` is the whole reference.
        man_sections(&command, "graft", out)
    }
}

/// A `.SH "GRAFT <SUB>"` section with the options of each subcommand of
/// `parent`, and of theirs (`graft cache warm`).
fn man_sections(
    parent: &clap::Command,
    prefix: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for sub in parent.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("{prefix} {}", sub.get_name());
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        if let Some(about) = sub.get_about() {
            writeln!(out, "{}", roff_text(&about.to_string()))?;
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut page)?;
        // Only the option list: the string-definition preamble is already
        // at the top of the page, and the heading is the one above.
        let text = String::from_utf8_lossy(&page);
        for line in text.lines() {
            let preamble = line.starts_with(".ie \\n(.g") || line.starts_with(".el .ds Aq");
            if !preamble && line != ".SH OPTIONS" {
                writeln!(out, "{line}")?;
            }
        }
        man_sections(sub, &name, out)?;
    }
    Ok(())
}

/// `text` safe as a roff text line: hyphens and backslashes escaped, and a
/// leading `.` or `'` kept from being read as a request.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// A password from the command line or the environment: `Debug` (and so
/// `{:?}` of the parsed command line) shows `<redacted>`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// `stats`, `gc` and `verify` open the data directory themselves: stop
/// `graft serve` on it first. `warm` talks to a running graft.
#[derive(Subcommand, Debug, Clone)]
pub enum CacheCommand {
    /// Print entries, bytes in use against the budget, the oldest and
    /// newest access, and the files on disk (stop `graft serve` on the same
    /// data directory first).
    Stats(ConfigArgs),
    /// Evict least recently used files until the cache fits its budget,
    /// printing what was removed (stop `graft serve` first; it evicts on its
    /// own while it runs).
    Gc(CacheGcArgs),
    /// Re-hash every cached file, remove the corrupt ones and report; exits 1
    /// when any was corrupt (stop `graft serve` first).
    Verify(ConfigArgs),
    /// Pull whole images (every platform of an index: manifests, configs,
    /// layers) through a running graft so that its cache holds them.
    Warm(CacheWarmArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct CacheGcArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Evict down to this size instead of the budget, e.g. 20GiB or
    /// 1048576 [config: cache.max_bytes; default 10GiB]
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CacheWarmArgs {
    /// Images to pull: <repository>:<tag> or <repository>@<digest>, as
    /// graft names them (no registry host), e.g. ci/builder:2024.06
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
    #[command(flatten)]
    pub client: GraftClientArgs,
    /// Blobs of one image pulled at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub jobs: usize,
}

/// How a command reaches a running graft, as a registry client would.
#[derive(clap::Args, Debug, Clone)]
pub struct GraftClientArgs {
    /// The running graft to ask.
    #[arg(
        long,
        env = "GRAFT_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:5001"
    )]
    pub graft: String,
    /// Registry user to read the repository as (basic auth, passed through
    /// graft to the upstream).
    #[arg(long, env = "GRAFT_CLIENT_USERNAME", value_name = "USER")]
    pub username: Option<String>,
    /// Password for --username; prefer the environment variable.
    #[arg(
        long,
        env = "GRAFT_CLIENT_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<Secret>,
    /// A Bearer token to send instead of a user and password (one the
    /// registry's token service issued); prefer the environment variable.
    #[arg(
        long,
        env = "GRAFT_CLIENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["username", "password"]
    )]
    pub token: Option<Secret>,
    /// Docker config.json whose `auths.<graft host>.auth` (base64
    /// user:password) is used when neither --username nor --token is given
    /// [default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json]
    #[arg(long, env = "GRAFT_DOCKER_CONFIG", value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
}

impl GraftClientArgs {
    /// The `Authorization` a command sends to graft as a registry client:
    /// Basic from --username/--password, Bearer from --token, else Basic
    /// from the docker config.json entry for graft's host, else none.
    pub fn authorization(&self) -> Result<Option<http::HeaderValue>, String> {
        if let Some(token) = &self.token {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| "--token is not a valid header value".to_string())?;
            value.set_sensitive(true);
            return Ok(Some(value));
        }
        match (self.username.as_deref(), self.password.as_ref()) {
            (None, Some(_)) => Err("--password needs --username".into()),
            (Some(user), password) => basic(user, password.map(Secret::expose)).map(Some),
            (None, None) => match self.docker_config_credentials()? {
                Some((user, password)) => basic(&user, Some(&password)).map(Some),
                None => Ok(None),
            },
        }
    }

    /// The user and password docker's config.json keeps for graft's host.
    /// An explicit --docker-config must exist; the default one may not.
    fn docker_config_credentials(&self) -> Result<Option<(String, String)>, String> {
        let (path, explicit) = match &self.docker_config {
            Some(p) => (p.clone(), true),
            None => match default_docker_config() {
                Some(p) => (p, false),
                None => return Ok(None),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(_) if !explicit => return Ok(None),
            Err(e) => return Err(format!("--docker-config {}: {e}", path.display())),
        };
        let host = self
            .graft
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        docker_auth(&text, &host).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// The `auths` entry of a docker config.json for `host` (keys may carry a
/// scheme and a path, as `docker login` writes them), decoded.
fn docker_auth(text: &str, host: &str) -> Result<Option<(String, String)>, String> {
    use base64::Engine as _;
    let config: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let entry = auths.iter().find(|(key, _)| {
        let key = key.split_once("://").map_or(key.as_str(), |(_, rest)| rest);
        key.split('/').next() == Some(host)
    });
    let Some(encoded) = entry
        .and_then(|(_, e)| e.get("auth"))
        .and_then(|a| a.as_str())
    else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|d| String::from_utf8(d).ok())
        .ok_or_else(|| format!("the auth of `{host}` is not base64 of user:password"))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| format!("the auth of `{host}` is not user:password"))?;
    Ok(Some((user.to_owned(), password.to_owned())))
}

/// `Basic base64(user:password)`, marked sensitive.
fn basic(user: &str, password: Option<&str>) -> Result<http::HeaderValue, String> {
    let cfg = crate::config::UpstreamConfig {
        username: Some(user.to_string()),
        password: password.map(str::to_string),
        ..Config::default().upstream
    };
    cfg.own_authorization()
        .ok_or_else(|| "the credentials are not a valid header value".into())
}

/// Options shared by every command that reads the configuration.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Configuration file (TOML). Without it, config/graft.toml is read when
    /// present.
    #[arg(long, env = "GRAFT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Upstream registry origin, e.g. https://registry.internal:5000
    /// [config: upstream.url; default http://127.0.0.1:5000]
    #[arg(long, env = "GRAFT_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Directory for the index and the content cache
    /// [config: storage.data_dir; default ./graft-data]
    #[arg(long, env = "GRAFT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Extra CA certificates (PEM) trusted for the upstream, on top of the
    /// system roots [config: upstream.ca_file]
    #[arg(long, env = "GRAFT_UPSTREAM_CA_FILE", value_name = "FILE")]
    pub upstream_ca_file: Option<String>,
    /// graft's own upstream user for fallback-tag upkeep (basic auth, or
    /// for Bearer tokens from the registry's realm)
    /// [config: upstream.username]
    #[arg(long, env = "GRAFT_UPSTREAM_USERNAME", value_name = "USER")]
    pub upstream_username: Option<String>,
    /// Password for --upstream-username; prefer the environment variable
    /// [config: upstream.password]
    #[arg(
        long,
        env = "GRAFT_UPSTREAM_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub upstream_password: Option<Secret>,
    /// Log format: text or json [config: log.format; default text]. The
    /// level comes from RUST_LOG (default info).
    #[arg(long, env = "GRAFT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Address to listen on [config: server.listen; default 127.0.0.1:5001]
    #[arg(long, env = "GRAFT_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// TLS certificate chain (PEM) for the listener [config: server.tls_cert]
    #[arg(long, env = "GRAFT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// TLS private key (PEM) for the listener [config: server.tls_key]
    #[arg(long, env = "GRAFT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// Upstream connect timeout, e.g. 5s [config: upstream.connect_timeout]
    #[arg(long, env = "GRAFT_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Time allowed for the upstream's response head, e.g. 60s
    /// [config: upstream.response_timeout]
    #[arg(long, env = "GRAFT_RESPONSE_TIMEOUT", value_name = "DURATION")]
    pub response_timeout: Option<String>,
    /// Time a client has to send a request head, e.g. 30s
    /// [config: server.header_read_timeout]
    #[arg(long, env = "GRAFT_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// How long unused upstream connections stay pooled, e.g. 90s
    /// [config: upstream.idle_timeout]
    #[arg(long, env = "GRAFT_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// How long in-flight requests may finish after SIGTERM, e.g. 30s
    /// [config: server.shutdown_grace]
    #[arg(long, env = "GRAFT_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReindexArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// A repository to walk (repeatable). Without it, every repository the
    /// upstream's /v2/_catalog lists.
    #[arg(long = "repo", value_name = "NAME")]
    pub repos: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReferrersArgs {
    /// The subject: <repository>@<digest>, e.g. demo/app@sha256:3f2a…
    #[arg(value_name = "REPO@DIGEST")]
    pub subject: String,
    /// Also list referrers of each referrer, as an indented tree.
    #[arg(long)]
    pub tree: bool,
    /// Levels below the subject shown with --tree.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_depth: usize,
    /// Only the subject's referrers of this artifactType (repeatable, ORed).
    #[arg(long = "artifact-type", value_name = "TYPE")]
    pub artifact_types: Vec<String>,
    #[command(flatten)]
    pub client: GraftClientArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Docker config.json whose `auths.<upstream host>.auth` is the account
    /// to check when --upstream-username is not given
    /// [default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json]
    #[arg(long, env = "GRAFT_DOCKER_CONFIG", value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Connect and response timeout for each request, e.g. 10s.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: String,
}

impl DoctorArgs {
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        self.common.load(|_| {})
    }

    /// The account to check: upstream.username/password, else the docker
    /// config.json entry for the upstream's host, else none.
    pub fn authorization(&self, config: &Config) -> Result<Option<http::HeaderValue>, String> {
        if let Some(own) = config.upstream.own_authorization() {
            return Ok(Some(own));
        }
        let (path, explicit) = match &self.docker_config {
            Some(p) => (p.clone(), true),
            None => match default_docker_config() {
                Some(p) => (p, false),
                None => return Ok(None),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(_) if !explicit => return Ok(None),
            Err(e) => return Err(format!("--docker-config {}: {e}", path.display())),
        };
        let host = config
            .upstream
            .url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        match docker_auth(&text, &host).map_err(|e| format!("{}: {e}", path.display()))? {
            Some((user, password)) => basic(&user, Some(&password)).map(Some),
            None => Ok(None),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// A repository to walk (repeatable). Without it, every repository the
    /// upstream's /v2/_catalog lists.
    #[arg(long = "repo", value_name = "NAME")]
    pub repos: Vec<String>,
    /// Only read (GET and HEAD): report what would be migrated.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete each fallback tag once all its entries are listed natively.
    #[arg(long)]
    pub remove_fallback_tags: bool,
}

impl MigrateArgs {
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        self.common.load(|_| {})
    }
}

impl ReindexArgs {
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        self.common.load(|_| {})
    }
}

impl ConfigArgs {
    fn overrides(&self, o: &mut Overrides) {
        o.set("upstream.url", self.upstream.clone());
        o.set("storage.data_dir", self.data_dir.clone());
        o.set("upstream.ca_file", self.upstream_ca_file.clone());
        o.set("log.format", self.log_format.clone());
        o.set("upstream.username", self.upstream_username.clone());
        o.set(
            "upstream.password",
            self.upstream_password
                .as_ref()
                .map(|p| p.expose().to_string()),
        );
    }

    /// Loads the file (the named one must exist; the default may not) and
    /// applies `extra` overrides on top.
    pub fn load(&self, extra: impl FnOnce(&mut Overrides)) -> Result<Config, ConfigErrors> {
        let mut o = Overrides::default();
        self.overrides(&mut o);
        extra(&mut o);
        let default = PathBuf::from("config/graft.toml");
        let file = match &self.config {
            Some(p) => (p.as_path(), true),
            None => (default.as_path(), false),
        };
        Config::load(Some(file), &o)
    }
}

impl CacheGcArgs {
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        self.common
            .load(|o| o.set("cache.max_bytes", self.max_bytes.clone()))
    }
}

impl ServeArgs {
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        self.common.load(|o| {
            o.set("server.listen", self.listen.clone());
            o.set("server.tls_cert", self.tls_cert.clone());
            o.set("server.tls_key", self.tls_key.clone());
            o.set("upstream.connect_timeout", self.connect_timeout.clone());
            o.set("upstream.response_timeout", self.response_timeout.clone());
            o.set(
                "server.header_read_timeout",
                self.header_read_timeout.clone(),
            );
            o.set("upstream.idle_timeout", self.idle_timeout.clone());
            o.set("server.shutdown_grace", self.shutdown_grace.clone());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_reach_the_config() {
        let cli = Cli::try_parse_from([
            "graft",
            "serve",
            "--config",
            "/nonexistent-but-unused",
            "--listen",
            "127.0.0.1:6000",
            "--upstream",
            "https://reg.example:5000",
            "--data-dir",
            "/tmp/x",
            "--log-format",
            "json",
        ])
        .expect("parses");
        let Command::Serve(mut args) = cli.command else {
            panic!("not serve")
        };
        args.common.config = None;
        let c = args.load().expect("valid");
        assert_eq!(c.server.listen.port(), 6000);
        assert_eq!(c.upstream.url, "https://reg.example:5000");
        assert_eq!(c.log.format, crate::config::LogFormat::Json);
    }

    #[test]
    fn passwords_reach_the_config_but_not_debug_output() {
        let cli = Cli::try_parse_from([
            "graft",
            "reindex",
            "--upstream-username",
            "graft",
            "--upstream-password",
            "s3cr3t-pa55",
        ])
        .expect("parses");
        assert!(!format!("{cli:?}").contains("s3cr3t-pa55"), "{cli:?}");
        let Command::Reindex(mut args) = cli.command else {
            panic!("not reindex")
        };
        args.common.config = None;
        let c = args.load().expect("valid");
        assert_eq!(c.upstream.password.as_deref(), Some("s3cr3t-pa55"));

        let cli = Cli::try_parse_from(["graft", "referrers", "a@b", "--password", "pa55-xyz"])
            .expect("parses");
        assert!(!format!("{cli:?}").contains("pa55-xyz"), "{cli:?}");
    }

    #[test]
    fn reindex_and_referrers_parse() {
        let cli = Cli::try_parse_from([
            "graft",
            "reindex",
            "--repo",
            "a",
            "--repo",
            "b/c",
            "--data-dir",
            "/tmp/d",
        ])
        .expect("parses");
        let Command::Reindex(args) = cli.command else {
            panic!("not reindex")
        };
        assert_eq!(args.repos, ["a", "b/c"]);
        assert_eq!(args.common.data_dir.as_deref(), Some("/tmp/d"));

        let cli = Cli::try_parse_from([
            "graft",
            "referrers",
            "app@sha256:00",
            "--tree",
            "--artifact-type",
            "x/y",
        ])
        .expect("parses");
        let Command::Referrers(args) = cli.command else {
            panic!("not referrers")
        };
        assert!(args.tree);
        assert_eq!(args.artifact_types, ["x/y"]);
        assert_eq!(args.max_depth, 8);
    }

    #[test]
    fn cache_commands_parse_and_gc_overrides_the_budget() {
        let cli = Cli::try_parse_from([
            "graft",
            "cache",
            "gc",
            "--data-dir",
            "/tmp/d",
            "--max-bytes",
            "2MiB",
        ])
        .expect("parses");
        let Command::Cache(CacheArgs {
            command: CacheCommand::Gc(mut args),
        }) = cli.command
        else {
            panic!("not cache gc")
        };
        args.common.config = None;
        let c = args.load().expect("valid");
        assert_eq!(c.cache.max_bytes, 2 << 20);
        assert_eq!(c.storage.data_dir, PathBuf::from("/tmp/d"));
        args.max_bytes = Some("lots".into());
        assert!(args.load().is_err());

        let cli = Cli::try_parse_from([
            "graft",
            "cache",
            "warm",
            "a:v1",
            "b@sha256:00",
            "--graft",
            "http://127.0.0.1:6000",
            "--jobs",
            "2",
        ])
        .expect("parses");
        let Command::Cache(CacheArgs {
            command: CacheCommand::Warm(args),
        }) = cli.command
        else {
            panic!("not cache warm")
        };
        assert_eq!(args.images, ["a:v1", "b@sha256:00"]);
        assert_eq!(args.client.graft, "http://127.0.0.1:6000");
        assert_eq!(args.jobs, 2);
        assert!(Cli::try_parse_from(["graft", "cache", "warm"]).is_err());
    }

    #[test]
    fn docker_config_auths_are_found_by_graft_s_host() {
        let text = r#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"eDp5"},
            "http://127.0.0.1:5001":{"auth":"Y2k6czNjcjN0OndpdGg6Y29sb25z"}}}"#;
        assert_eq!(
            docker_auth(text, "127.0.0.1:5001").expect("readable"),
            Some(("ci".to_owned(), "s3cr3t:with:colons".to_owned()))
        );
        assert_eq!(docker_auth(text, "127.0.0.1:6000").expect("readable"), None);
        assert!(docker_auth(r#"{"auths":{"h":{"auth":"!!"}}}"#, "h").is_err());

        let cli = Cli::try_parse_from(["graft", "referrers", "a@sha256:x", "--token", "t"])
            .expect("parses");
        let Command::Referrers(args) = cli.command else {
            panic!("not referrers")
        };
        let auth = args.client.authorization().expect("valid").expect("some");
        assert_eq!(auth.to_str().ok(), Some("Bearer t"));
        assert!(Cli::try_parse_from([
            "graft",
            "referrers",
            "a@sha256:x",
            "--token",
            "t",
            "--username",
            "u"
        ])
        .is_err());
    }
}
