//! `[[upstream]]` entries: one per registry graft mirrors, each with the
//! keys of the single `[upstream]` table plus its name, the `Host` names
//! that route to it, and who may read and write through it.
//!
//! An entry starts from every other section of the file (`[cache]`,
//! `[referrers]`, …) and overrides them with its own `cache`/`referrers`
//! sub-tables, so a per-upstream setting is written where the upstream is.

use std::path::PathBuf;

use crate::config::{CacheConfig, Config, ReferrersConfig, UpstreamConfig};

/// One `[[upstream]]` entry, validated by [`validate_entries`].
#[derive(Clone, Debug)]
pub struct NamedUpstream {
    /// How clients name it: the `ns` query parameter, the first path
    /// segment (`/v2/<name>/<repo>/…`), and its data directory
    /// (`<data_dir>/upstreams/<name>/`). Usually the registry's host name
    /// as images spell it (`docker.io`, `ghcr.io`).
    pub name: String,
    /// `Host` values (`host` or `host:port`) that route to this upstream.
    pub hosts: Vec<String>,
    /// Serves requests that name no upstream (at most one entry; the first
    /// when none says so).
    pub default: bool,
    /// Docker Hub's conventions: one-segment names get `library/`.
    /// Defaults to `name == "docker.io"`.
    pub docker_hub: bool,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub referrers: ReferrersConfig,
    pub access: MirrorAccess,
}

/// Who may use an upstream through graft when graft pulls with its own
/// account (`use_own_credentials`); without it the upstream judges every
/// client by the client's own `Authorization`, as with a single upstream.
#[derive(Clone, Debug, Default)]
pub struct MirrorAccess {
    /// Requests go upstream with graft's `username`/`password` (or the
    /// token they buy), never with the client's `Authorization`.
    pub use_own_credentials: bool,
    /// With `use_own_credentials`: clients without credentials may pull.
    pub allow_anonymous: bool,
    /// With `use_own_credentials`: writes (push, delete) are forwarded,
    /// with graft's credentials. Refused otherwise.
    pub allow_push: bool,
    /// With `use_own_credentials`: an htpasswd file (bcrypt entries, as
    /// distribution's `auth: htpasswd` reads) clients authenticate
    /// against with Basic.
    pub htpasswd: Option<PathBuf>,
}

impl NamedUpstream {
    /// An entry named `name` for `url` with `base`'s settings (tests and
    /// programmatic configuration; the file goes through [`read_entries`]).
    pub fn new(name: &str, url: &str, base: &Config) -> NamedUpstream {
        let mut upstream = base.upstream.clone();
        upstream.url = url.trim_end_matches('/').to_string();
        NamedUpstream {
            name: name.to_string(),
            hosts: Vec::new(),
            default: false,
            docker_hub: name == "docker.io",
            upstream,
            cache: base.cache.clone(),
            referrers: base.referrers.clone(),
            access: MirrorAccess::default(),
        }
    }
}

/// Reads the `[[upstream]]` array onto `config`, on top of every other
/// section; every bad key is reported with the entry's position.
pub(crate) fn read_entries(
    config: &mut Config,
    entries: &[toml::Value],
    origin: &str,
    errors: &mut Vec<String>,
) {
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("{origin}: upstream[{i}]");
        let Some(table) = entry.as_table() else {
            errors.push(format!("{at}: not a table"));
            continue;
        };
        let mut base = config.clone();
        base.upstreams.clear();
        let mut named = NamedUpstream::new("", &base.upstream.url.clone(), &base);
        let mut docker_hub = None;
        for (key, value) in table {
            let bad = |e: String| format!("{at}: `{key}`: {e}");
            let result = match key.as_str() {
                "name" => str_value(value).map(|s| named.name = s.to_string()),
                "hosts" => strings(value).map(|h| named.hosts = h),
                "default" => bool_value(value).map(|b| named.default = b),
                "docker_hub" => bool_value(value).map(|b| docker_hub = Some(b)),
                "use_own_credentials" => {
                    bool_value(value).map(|b| named.access.use_own_credentials = b)
                }
                "allow_anonymous" => bool_value(value).map(|b| named.access.allow_anonymous = b),
                "allow_push" => bool_value(value).map(|b| named.access.allow_push = b),
                "htpasswd" => str_value(value)
                    .map(|s| named.access.htpasswd = (!s.is_empty()).then(|| PathBuf::from(s))),
                "cache" | "referrers" => match value.as_table() {
                    Some(inner) => {
                        for (k, v) in inner {
                            base.apply_one(&format!("{key}.{k}"), v, &at, errors);
                        }
                        Ok(())
                    }
                    None => Err("expected a table".into()),
                },
                other => {
                    base.apply_one(&format!("upstream.{other}"), value, &at, errors);
                    Ok(())
                }
            };
            if let Err(e) = result {
                errors.push(bad(e));
            }
        }
        if !table.contains_key("url") {
            errors.push(format!("{at}: `url` is required"));
        }
        named.docker_hub = docker_hub.unwrap_or(named.name == "docker.io");
        named.upstream = base.upstream;
        named.cache = base.cache;
        named.referrers = base.referrers;
        config.upstreams.push(named);
    }
    if let Some(d) = default_entry(&config.upstreams) {
        // What reads `upstream` alone (the startup line, `/readyz`) sees
        // the default upstream.
        config.upstream = d.upstream.clone();
    }
}

/// The entry requests naming no upstream go to.
pub(crate) fn default_entry(entries: &[NamedUpstream]) -> Option<&NamedUpstream> {
    entries
        .iter()
        .find(|e| e.default)
        .or_else(|| entries.first())
}

/// Checks across entries: names and hosts unique, files readable, and no
/// entry that nobody could use.
pub(crate) fn validate_entries(entries: &[NamedUpstream], errors: &mut Vec<String>) {
    let mut names = std::collections::HashSet::new();
    let mut hosts = std::collections::HashSet::new();
    for e in entries {
        let at = format!("upstream `{}`", e.name);
        if !is_valid_name(&e.name) {
            errors.push(format!(
                "{at}: `name` must be a host-like name (letters, digits, `.`, `-`, `_`, `:`), not empty"
            ));
        }
        if !names.insert(e.name.to_ascii_lowercase()) {
            errors.push(format!("{at}: `name` is used twice"));
        }
        for h in &e.hosts {
            if !hosts.insert(h.to_ascii_lowercase()) {
                errors.push(format!("{at}: host `{h}` routes to two upstreams"));
            }
        }
        crate::config::validate_upstream_url(&format!("{at}: url"), &e.upstream.url, errors);
        for (key, path) in [
            ("ca_file", &e.upstream.ca_file),
            ("token_certificate", &e.upstream.token_certificate),
            ("htpasswd", &e.access.htpasswd),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    errors.push(format!(
                        "{at}: `{key}`: {} is not a readable file",
                        p.display()
                    ));
                }
            }
        }
        if e.upstream.password.is_some() && e.upstream.username.is_none() {
            errors.push(format!("{at}: `password` is set but `username` is not"));
        }
        let a = &e.access;
        if a.use_own_credentials && e.upstream.username.is_none() {
            errors.push(format!("{at}: `use_own_credentials` needs `username`"));
        }
        if a.use_own_credentials && !a.allow_anonymous && a.htpasswd.is_none() {
            errors.push(format!(
                "{at}: with `use_own_credentials`, set `htpasswd` or `allow_anonymous = true` (else nobody may pull)"
            ));
        }
    }
    if entries.iter().filter(|e| e.default).count() > 1 {
        errors.push("more than one `[[upstream]]` says `default = true`".into());
    }
}

/// A name usable as a path segment, a query value and a directory name.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

fn str_value(v: &toml::Value) -> Result<&str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected a string, found {}", v.type_str()))
}

fn bool_value(v: &toml::Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, found {v}"))
}

fn strings(v: &toml::Value) -> Result<Vec<String>, String> {
    let list = v.as_array().ok_or("expected a list of strings")?;
    list.iter()
        .map(|s| str_value(s).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn load(text: &str) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, text).expect("write");
        Config::load(Some((&path, true)), &Overrides::default()).map_err(|e| e.0)
    }

    #[test]
    fn entries_inherit_the_file_s_sections_and_override_their_own() {
        let c = load(
            "[cache]\ntag_ttl = \"30s\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n\
             [upstream.cache]\ntag_ttl = \"5m\"\n\
             [[upstream]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io/\"\nhosts = [\"ghcr.mirror\"]\ndefault = true\n",
        )
        .expect("valid");
        assert_eq!(c.upstreams.len(), 2);
        let hub = &c.upstreams[0];
        assert!(hub.docker_hub, "docker.io follows Docker Hub's conventions");
        assert_eq!(hub.cache.tag_ttl, std::time::Duration::from_secs(300));
        let gh = &c.upstreams[1];
        assert!(!gh.docker_hub);
        assert_eq!(gh.cache.tag_ttl, std::time::Duration::from_secs(30));
        assert_eq!(gh.upstream.url, "https://ghcr.io");
        assert_eq!(gh.hosts, vec!["ghcr.mirror".to_string()]);
        assert_eq!(
            c.upstream.url, "https://ghcr.io",
            "the default is `upstream`"
        );
    }

    #[test]
    fn every_bad_entry_is_reported() {
        let e = load(
            "[[upstream]]\nname = \"a/b\"\nurl = \"ftp://x\"\nbogus = 1\n\
             [[upstream]]\nname = \"c\"\nurl = \"http://c\"\nuse_own_credentials = true\n\
             [[upstream]]\nname = \"c\"\nurl = \"http://d\"\n",
        )
        .expect_err("invalid");
        let has = |s: &str| e.iter().any(|m| m.contains(s));
        assert!(has("`name` must be a host-like name"), "{e:?}");
        assert!(has("must start with http:// or https://"), "{e:?}");
        assert!(has("`upstream.bogus` is not a known key"), "{e:?}");
        assert!(has("`use_own_credentials` needs `username`"), "{e:?}");
        assert!(has("nobody may pull"), "{e:?}");
        assert!(has("`name` is used twice"), "{e:?}");
    }

    #[test]
    fn the_single_upstream_table_still_means_one_upstream() {
        let c = load("[upstream]\nurl = \"http://one:5000\"\n").expect("valid");
        assert!(c.upstreams.is_empty());
        assert_eq!(c.upstream.url, "http://one:5000");
    }
}
