//! Mirror mode: one graft in front of several registries (`[[upstream]]`).
//!
//! Each upstream gets a complete, separate service instance — its own
//! [`Proxy`] with its own upstream client, index, cache, credential keys
//! and remembered authorizations under `<data_dir>/upstreams/<name>/` —
//! built by the same code as the single-upstream instance. Isolation is
//! then structural: nothing one instance learns (a tag, a referrer, a yes
//! for some credentials) is in reach of another.
//!
//! The [`Router`] in front only picks the instance and translates names:
//! by the `ns` query parameter containerd sends to mirrors (answered with
//! `OCI-Namespace`, distribution-spec "Registry Proxying"), by a path
//! prefix (`/v2/<name>/<repo>/…`), by the request's `Host`, else the
//! default upstream. It strips what it routed on before the instance sees
//! the request and puts it back into `Location` and `Link` in the answer,
//! so a client stays on the routing form it started with. `/v2/`,
//! `/healthz` and `/readyz` are the default instance's; `/metrics` merges
//! every instance's, labelled by upstream (`metrics.rs`).

mod access;
mod config;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};

pub(crate) use config::{read_entries, validate_entries};
pub use config::{MirrorAccess, NamedUpstream};

use crate::body::Body;
use crate::config::Config;
use crate::error::{oci_error, Error};
use crate::oci::ErrorCode;
use crate::proxy::Proxy;

/// The header a proxying registry answers an `ns` request with.
const OCI_NAMESPACE: &str = "oci-namespace";

/// The upstreams beside the default one, and how requests find theirs.
pub(crate) struct Router {
    routes: Vec<RouteTo>,
}

/// One `[[upstream]]` as the router sees it.
struct RouteTo {
    name: String,
    hosts: Vec<String>,
    docker_hub: bool,
    /// `None`: the default upstream, the [`Proxy`] holding this router (a
    /// strong reference back to it would never be dropped).
    instance: Option<Arc<Proxy>>,
    access: access::Gate,
}

/// How the client named the upstream, to be kept in URLs sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Form {
    /// `?ns=<name>`.
    Ns(String),
    /// `/v2/<name>/…`.
    Prefix(String),
    /// By `Host`, or not at all (the default): paths are the upstream's own.
    Plain,
}

/// Builds one instance per `[[upstream]]`; the default one is returned,
/// holding the router to the others.
pub(crate) fn build(config: Config) -> Result<Proxy, Error> {
    let default_name = config::default_entry(&config.upstreams)
        .map(|e| e.name.clone())
        .ok_or_else(|| Error::Startup("no `[[upstream]]` configured".into()))?;
    let mut routes = Vec::new();
    let mut default = None;
    for entry in &config.upstreams {
        let instance = Proxy::single(instance_config(&config, entry))?;
        let is_default = entry.name == default_name && default.is_none();
        let route = RouteTo {
            name: entry.name.clone(),
            hosts: entry.hosts.clone(),
            docker_hub: entry.docker_hub,
            instance: None,
            access: access::Gate::new(entry)?,
        };
        if is_default {
            default = Some(instance);
            routes.push(route);
        } else {
            routes.push(RouteTo {
                instance: Some(Arc::new(instance)),
                ..route
            });
        }
    }
    let mut proxy = default.expect("the default entry is one of the entries");
    proxy.mirror = Some(Router { routes });
    Ok(proxy)
}

/// The configuration of one upstream's instance: the file's, with the
/// entry's `upstream`, `cache` and `referrers`, and its own data directory.
fn instance_config(config: &Config, entry: &NamedUpstream) -> Config {
    let mut c = config.clone();
    c.upstreams.clear();
    c.upstream = entry.upstream.clone();
    c.cache = entry.cache.clone();
    c.referrers = entry.referrers.clone();
    c.storage.data_dir = config.storage.data_dir.join("upstreams").join(&entry.name);
    c
}

impl Router {
    /// Every instance but the default (which holds the router).
    pub(crate) fn others(&self) -> impl Iterator<Item = &Arc<Proxy>> {
        self.routes.iter().filter_map(|r| r.instance.as_ref())
    }

    /// Routes one request to its upstream's instance and translates the
    /// answer's URLs back to the form the client used.
    pub(crate) async fn handle(
        &self,
        default: &Proxy,
        mut req: Request<Body>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let Some(rest) = path.strip_prefix("/v2/").filter(|r| !r.is_empty()) else {
            // `/v2/`, health, metrics: graft's own, answered by the default
            // upstream (`/v2/` behind its door: clients learn there
            // whether to authenticate).
            if path == "/metrics" {
                return self.render_metrics(default);
            }
            let base = path == "/v2/" || path == "/v2";
            let gate = &self.routes[self.default_index()].access;
            if base {
                if let Err(resp) = gate.admit(&mut req).await {
                    return *resp;
                }
            }
            let mut resp = default.handle_here(req, peer, scheme).await;
            if base {
                gate.scrub(resp.headers_mut());
            }
            return resp;
        };
        let (ns, query) = take_ns(req.uri().query());
        let host = request_host(&req);
        let picked = match &ns {
            Some(ns) => match self.by_name(ns) {
                // A hosts.toml mirror with the prefix in its path
                // (`override_path`) gets `ns` from containerd too.
                Some(i) => {
                    let inner = match rest.split_once('/') {
                        Some((first, tail)) if first.eq_ignore_ascii_case(ns) => {
                            format!("/v2/{tail}")
                        }
                        _ => path.clone(),
                    };
                    Some((i, Form::Ns(ns.clone()), inner))
                }
                // Isolation before availability: an image of a registry
                // graft does not mirror is never looked up on another one
                // (containerd then falls back to the next host).
                None => return unknown_namespace(ns),
            },
            None => None,
        };
        let (i, form, inner) = picked
            .or_else(|| {
                let (first, tail) = rest.split_once('/')?;
                let i = self.by_name(first)?;
                Some((i, Form::Prefix(first.to_string()), format!("/v2/{tail}")))
            })
            .or_else(|| {
                let i = self.by_host(host.as_deref()?)?;
                Some((i, Form::Plain, path.clone()))
            })
            .unwrap_or_else(|| (self.default_index(), Form::Plain, path.clone()));
        let route = &self.routes[i];
        let inner = if route.docker_hub {
            docker_hub_name(&inner)
        } else {
            inner
        };
        if let Err(resp) = route.access.admit(&mut req).await {
            return *resp;
        }
        match with_path(req.uri(), &inner, query.as_deref()) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return e.into_response(),
        }
        let instance = route.instance.as_deref().unwrap_or(default);
        let mut resp = instance.handle_here(req, peer, scheme).await;
        let origin = host.map(|h| format!("{scheme}://{h}"));
        let public = instance.config.server.public_url.clone();
        rewrite_urls(resp.headers_mut(), &form, [origin, public]);
        route.access.scrub(resp.headers_mut());
        if let Form::Ns(ns) = &form {
            if let Ok(v) = HeaderValue::from_str(ns) {
                resp.headers_mut().insert(OCI_NAMESPACE, v);
            }
        }
        resp
    }

    /// Every instance's metrics, labelled with its upstream.
    fn render_metrics(&self, default: &Proxy) -> Response<Body> {
        let parts: Vec<(&str, String)> = self
            .routes
            .iter()
            .map(|r| {
                let p = r.instance.as_deref().unwrap_or(default);
                (r.name.as_str(), p.metrics().render())
            })
            .collect();
        let mut resp = Response::new(crate::body::full(metrics::merge(&parts)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        resp
    }

    fn by_name(&self, name: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.name.eq_ignore_ascii_case(name))
    }

    /// `host` as sent (`name:port`) or without its port.
    fn by_host(&self, host: &str) -> Option<usize> {
        let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
        self.routes.iter().position(|r| {
            r.hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(bare))
        })
    }

    fn default_index(&self) -> usize {
        self.routes
            .iter()
            .position(|r| r.instance.is_none())
            .expect("the default upstream is routed")
    }
}

/// The request's `Host` (or HTTP/2 `:authority`), when it is one graft may
/// put into a URL.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .filter(|h| crate::upstream::is_valid_host(h))
}

/// Splits `ns=` out of a query string: the namespace, and the query the
/// upstream gets (without it).
fn take_ns(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut ns = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("ns=") {
            Some(v) => {
                ns = Some(v.to_string());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let kept = (!kept.is_empty()).then(|| kept.join("&"));
    (ns.filter(|n| !n.is_empty()), kept)
}

/// Docker Hub keeps official images under `library/`: `/v2/alpine/…` is
/// `/v2/library/alpine/…` there, as `docker pull alpine` means it.
fn docker_hub_name(path: &str) -> String {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return path.to_string();
    };
    const ENDPOINTS: [&str; 4] = ["/manifests/", "/blobs/", "/tags/", "/referrers/"];
    let name_end = ENDPOINTS.iter().filter_map(|e| rest.find(e)).min();
    match name_end {
        Some(end) if !rest[..end].contains('/') => format!("/v2/library/{rest}"),
        _ => path.to_string(),
    }
}

/// `uri` with another path and query, keeping its scheme and authority.
fn with_path(uri: &Uri, path: &str, query: Option<&str>) -> Result<Uri, Error> {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| Error::BadRequest("the request target cannot be forwarded".into()))?,
    );
    Uri::from_parts(parts)
        .map_err(|_| Error::BadRequest("the request target cannot be forwarded".into()))
}

/// Puts the routing form back into `Location` and `Link` URLs on graft
/// (relative, or on one of `origins`): the prefix, or `ns`.
fn rewrite_urls(headers: &mut http::HeaderMap, form: &Form, origins: [Option<String>; 2]) {
    if *form == Form::Plain {
        return;
    }
    let origins: Vec<&str> = origins.iter().flatten().map(String::as_str).collect();
    if let Some(v) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        if let Some(new) = routed_url(v, form, &origins) {
            if let Ok(hv) = HeaderValue::from_str(&new) {
                headers.insert(header::LOCATION, hv);
            }
        }
    }
    let links: Vec<HeaderValue> = headers
        .get_all(header::LINK)
        .iter()
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| routed_link(s, form, &origins))
                .and_then(|n| HeaderValue::from_str(&n).ok())
                .unwrap_or_else(|| v.clone())
        })
        .collect();
    if !links.is_empty() {
        headers.remove(header::LINK);
        for l in links {
            headers.append(header::LINK, l);
        }
    }
}

/// `<url>; rel="next"` with its URL routed.
fn routed_link(value: &str, form: &Form, origins: &[&str]) -> Option<String> {
    let start = value.find('<')? + 1;
    let end = start + value[start..].find('>')?;
    let url = routed_url(&value[start..end], form, origins)?;
    Some(format!("{}{url}{}", &value[..start], &value[end..]))
}

/// A URL pointing at graft's `/v2/…`, in the routing form; `None` for any
/// other URL (a redirect to a storage backend stays as it is).
fn routed_url(url: &str, form: &Form, origins: &[&str]) -> Option<String> {
    let (origin, pq) = if url.starts_with('/') {
        ("", url)
    } else {
        let o = origins.iter().find(|o| {
            url.len() > o.len() && url.starts_with(*o) && url[o.len()..].starts_with('/')
        })?;
        url.split_at(o.len())
    };
    let rest = pq.strip_prefix("/v2/")?;
    Some(match form {
        Form::Prefix(name) => format!("{origin}/v2/{name}/{rest}"),
        Form::Ns(ns) => {
            let sep = if pq.contains('?') { '&' } else { '?' };
            format!("{origin}{pq}{sep}ns={ns}")
        }
        Form::Plain => return None,
    })
}

/// The answer to an `ns` graft does not mirror.
fn unknown_namespace(ns: &str) -> Response<Body> {
    let shown: String = ns.chars().take(100).collect();
    oci_error(
        StatusCode::NOT_FOUND,
        ErrorCode::NameUnknown,
        &format!("graft does not mirror `{shown}`"),
        serde_json::Value::Null,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_is_taken_out_of_the_query() {
        assert_eq!(take_ns(None), (None, None));
        assert_eq!(
            take_ns(Some("ns=docker.io")),
            (Some("docker.io".into()), None)
        );
        assert_eq!(
            take_ns(Some("n=10&ns=ghcr.io&last=b")),
            (Some("ghcr.io".into()), Some("n=10&last=b".into()))
        );
    }

    #[test]
    fn one_segment_names_on_docker_hub_are_official_images() {
        assert_eq!(
            docker_hub_name("/v2/alpine/manifests/3.20"),
            "/v2/library/alpine/manifests/3.20"
        );
        assert_eq!(
            docker_hub_name("/v2/org/app/blobs/sha256:ab"),
            "/v2/org/app/blobs/sha256:ab"
        );
        assert_eq!(
            docker_hub_name("/v2/alpine/tags/list"),
            "/v2/library/alpine/tags/list"
        );
    }

    #[test]
    fn urls_on_graft_keep_the_routing_form() {
        let me = ["http://127.0.0.1:5001"];
        let prefix = Form::Prefix("ghcr.io".into());
        assert_eq!(
            routed_url(
                "http://127.0.0.1:5001/v2/a/blobs/uploads/x?y=1",
                &prefix,
                &me
            )
            .as_deref(),
            Some("http://127.0.0.1:5001/v2/ghcr.io/a/blobs/uploads/x?y=1")
        );
        assert_eq!(
            routed_url("/v2/a/tags/list?n=1", &Form::Ns("q.io".into()), &me).as_deref(),
            Some("/v2/a/tags/list?n=1&ns=q.io")
        );
        assert_eq!(
            routed_url("https://s3.example/v2/x", &prefix, &me),
            None,
            "a storage redirect is not graft's"
        );
        assert_eq!(
            routed_link("</v2/a/tags/list?last=b>; rel=\"next\"", &prefix, &me).as_deref(),
            Some("</v2/ghcr.io/a/tags/list?last=b>; rel=\"next\"")
        );
    }
}
