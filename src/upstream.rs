//! The connection to the registry graft fronts: a pooled hyper-util client
//! (rustls for https), header hygiene in both directions, and the rewriting
//! of `Location` and `Link` URLs so clients keep talking to graft.

use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{self, Body, CollectError};
use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::token::{self, Challenge, TokenClient};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The upstream registry.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, Body>,
    /// `scheme://authority`, no trailing slash.
    origin: Arc<str>,
    authority: HeaderValue,
    response_timeout: Duration,
    body_timeout: Duration,
    /// Bearer tokens for requests made with graft's own credentials.
    tokens: Arc<TokenClient>,
}

/// Why a request graft sent upstream got no usable answer. The head phase
/// ([`Unreachable`](Self::Unreachable), [`Timeout`](Self::Timeout)) and the
/// bounded body reads of [`Upstream::read_limited`] fail apart, so a log
/// line says which it was; [`Request`](Self::Request) is graft's own
/// failure, never the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection, or it broke before the response head (refused, reset,
    /// DNS, TLS).
    #[error("{0}")]
    Unreachable(String),
    /// No response head within `upstream.response_timeout`.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The body went silent for longer than `upstream.body_timeout`.
    #[error("the response body stalled for {0:?}")]
    BodyStalled(Duration),
    /// The body was longer than the reader's bound.
    #[error("the response body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The body ended in an error before its end.
    #[error("the response body was cut: {0}")]
    BodyCut(String),
    /// The upstream pointed graft at something it cannot request (a
    /// redirect target that is not a URL).
    #[error("{0}")]
    Invalid(String),
    /// graft could not build its own request (a bug, not an outage).
    #[error("building the upstream request: {0}")]
    Request(String),
    /// The client's request body, which graft was streaming upstream,
    /// failed: the client went silent past `server.body_timeout` or hung up.
    /// The client's doing, not the upstream's.
    #[error("the client's request body failed: {0}")]
    ClientBody(String),
}

impl UpstreamError {
    /// Whether the upstream could not be heard from (as opposed to graft's
    /// own failure, or an answer it could not use): the case where a
    /// remembered answer may stand in.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unreachable(_)
                | UpstreamError::Timeout(_)
                | UpstreamError::BodyStalled(_)
                | UpstreamError::BodyCut(_)
        )
    }
}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Unreachable(m) => Error::UpstreamUnreachable(m),
            UpstreamError::Timeout(d) => Error::UpstreamTimeout(d),
            UpstreamError::BodyStalled(d) => Error::UpstreamStalled(d),
            e @ (UpstreamError::BodyTooLarge { .. }
            | UpstreamError::BodyCut(_)
            | UpstreamError::Invalid(_)) => Error::UpstreamInvalid(e.to_string()),
            UpstreamError::Request(m) => Error::Internal(format!("upstream request: {m}")),
            UpstreamError::ClientBody(m) => {
                tracing::debug!(cause = %m, "the client's request body failed");
                Error::BadRequest("the request body stopped arriving".into())
            }
        }
    }
}

/// Where the client reached graft, for rewriting URLs back to it.
#[derive(Clone, Debug)]
pub struct ClientSide {
    peer: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    /// The `Host` the client used (or HTTP/2 `:authority`), only when it is
    /// a valid `host[:port]`: anything else must never be reflected.
    host: Option<String>,
    /// `server.public_url`, the origin used when `host` is missing.
    public_url: Option<String>,
}

impl ClientSide {
    /// `scheme` is `http` or `https`; `host` is the client's `Host` (or
    /// HTTP/2 `:authority`), dropped unless valid; `public_url` is
    /// `server.public_url`.
    pub fn new(
        peer: SocketAddr,
        scheme: &'static str,
        host: Option<String>,
        public_url: Option<&str>,
    ) -> ClientSide {
        ClientSide {
            peer,
            scheme,
            host: host.filter(|h| is_valid_host(h)),
            public_url: public_url.map(str::to_string),
        }
    }

    /// Whether URLs pointing back at graft can be built for this client.
    pub fn has_origin(&self) -> bool {
        self.host.is_some() || self.public_url.is_some()
    }

    /// The client's address (anonymous clients are told apart by it).
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The origin URLs pointing back at graft are built on: the client's
    /// own `Host`, else `server.public_url`.
    fn origin(&self) -> Option<String> {
        match &self.host {
            Some(h) => Some(format!("{}://{h}", self.scheme)),
            None => self.public_url.clone(),
        }
    }
}

/// The client's error when a URL back to graft must be built and neither a
/// valid `Host` nor `server.public_url` says where graft is.
pub(crate) fn host_required() -> Error {
    Error::BadRequest("a valid Host header is required to answer this request".into())
}

/// Whether `host` is a `Host` header graft may put into a URL (RFC 9110
/// §7.2: `uri-host [ ":" port ]`): a registered name of letters, digits,
/// `-`, `.` and `_`, or a bracketed IPv6 literal, and an optional port.
/// No userinfo, no percent-encoding, nothing a URL would have to escape.
pub(crate) fn is_valid_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) if addr.parse::<std::net::Ipv6Addr>().is_ok() => {
                if rest.is_empty() {
                    return true;
                }
                match rest.strip_prefix(':') {
                    Some(p) => ("v6", Some(p)),
                    None => return false,
                }
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        },
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    });
    name_ok && port_ok
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, Error> {
        let tls = tls_config(cfg)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let uri: Uri = cfg
            .url
            .parse()
            .map_err(|e| Error::Startup(format!("upstream.url `{}`: {e}", cfg.url)))?;
        let authority = uri
            .authority()
            .ok_or_else(|| Error::Startup(format!("upstream.url `{}` has no host", cfg.url)))?;
        Ok(Upstream {
            client,
            origin: cfg.url.trim_end_matches('/').into(),
            authority: HeaderValue::from_str(authority.as_str())
                .map_err(|e| Error::Startup(format!("upstream.url `{}`: {e}", cfg.url)))?,
            response_timeout: cfg.response_timeout,
            body_timeout: cfg.body_timeout,
            tokens: Arc::new(TokenClient::new(cfg)),
        })
    }

    /// For the client-side commands (`graft referrers`, `graft cache
    /// warm`): `auth` is the command's own, and a Bearer challenge is
    /// answered with it (Basic), or anonymously (none); a Bearer `auth` is
    /// sent as it is. Call before cloning.
    pub fn client_credentials(mut self, auth: Option<&HeaderValue>) -> Upstream {
        if let Some(t) = Arc::get_mut(&mut self.tokens) {
            t.set_client_credentials(auth);
        }
        self
    }

    /// Whether `upstream.username` is configured (graft has an account).
    pub(crate) fn has_own_credentials(&self) -> bool {
        self.tokens.has_credentials()
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Longest silence allowed between body bytes (`upstream.body_timeout`).
    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    /// Reads a response body of at most `limit` bytes (manifests, indexes,
    /// listings: never blobs), giving up when it stays silent for
    /// `upstream.body_timeout` between frames.
    pub async fn read_limited(&self, body: Incoming, limit: usize) -> Result<Bytes, UpstreamError> {
        body::collect_limited(body, limit, Some(self.body_timeout))
            .await
            .map_err(|e| match e {
                CollectError::TooLarge => UpstreamError::BodyTooLarge { limit },
                CollectError::Stalled(d) => UpstreamError::BodyStalled(d),
                CollectError::Broken(e) => UpstreamError::BodyCut(e.to_string()),
            })
    }

    /// Whether `url` (absolute) points at the upstream itself, so that the
    /// client's credentials may follow it.
    pub fn is_own_url(&self, url: &str) -> bool {
        strip_origin(url, &self.origin).is_some()
    }

    /// The upstream URI for a client's path and query.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, Error> {
        format!("{}{path_and_query}", self.origin)
            .parse()
            .map_err(|e| {
                tracing::debug!(error = %e, "request target cannot be forwarded");
                Error::BadRequest("the request target cannot be forwarded".into())
            })
    }

    /// Sends a request and waits for the response head. The body streams
    /// afterwards; it is the caller's to forward or read.
    pub async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Duration), UpstreamError> {
        let own = req.headers().get(header::AUTHORIZATION).cloned();
        if own.is_some() && self.tokens.has_credentials() && self.tokens.is_own(own.as_ref()) {
            // Mirror mode put graft's own credentials on a client's
            // request (crate::mirror): answer the registry's challenge
            // with graft's token, as for graft's own requests.
            return self.send_as_graft(req, own).await;
        }
        self.send_plain(req).await
    }

    /// [`Upstream::send`] without the mirror-mode token exchange: what
    /// [`Upstream::call`] uses, which answers challenges itself.
    async fn send_plain(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Duration), UpstreamError> {
        req.headers_mut()
            .insert(header::HOST, self.authority.clone());
        let started = Instant::now();
        let resp = self.request(req).await?;
        Ok((resp, started.elapsed()))
    }

    /// A client's request carrying graft's own `Authorization` (mirror
    /// mode): sent with graft's cached token for its scope; a bodiless one
    /// challenged is sent again with a fresh token, and one with a body
    /// (which cannot be sent twice) gets its token from a `/v2/` probe first.
    async fn send_as_graft(
        &self,
        mut req: Request<Body>,
        own: Option<HeaderValue>,
    ) -> Result<(Response<Incoming>, Duration), UpstreamError> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let guess = token::scope_for(&method, &path);
        let cached = self.tokens.cached_for(&method, &path);
        let replayable = matches!(method, Method::GET | Method::HEAD);
        let bearer = match cached {
            Some(b) => Some(b),
            None if !replayable => {
                let mut probe = Request::builder()
                    .method(Method::GET)
                    .uri(
                        self.uri("/v2/")
                            .map_err(|e| UpstreamError::Request(e.to_string()))?,
                    )
                    .header(header::HOST, self.authority.clone());
                if let Some(a) = &own {
                    probe = probe.header(header::AUTHORIZATION, a.clone());
                }
                let probe = probe
                    .body(body::empty())
                    .map_err(|e| UpstreamError::Request(e.to_string()))?;
                let probe = self.request(probe).await?;
                match Challenge::find(probe.headers()) {
                    // `/v2/`'s challenge names no scope: ask for this
                    // request's, so the token is good for it.
                    Some(mut c) => {
                        c.scope = c.scope.or_else(|| guess.clone());
                        self.token_for_request(&c, own.as_ref(), guess.clone())
                            .await
                    }
                    None => None,
                }
            }
            None => None,
        };
        if let Some(b) = &bearer {
            req.headers_mut().insert(header::AUTHORIZATION, b.clone());
        }
        req.headers_mut()
            .insert(header::HOST, self.authority.clone());
        let again = replayable.then(|| crate::proxy::head_only(&req));
        let resp = self.request(req).await?;
        let challenge = (resp.status() == http::StatusCode::UNAUTHORIZED)
            .then(|| Challenge::find(resp.headers()))
            .flatten();
        let (Some(mut again), Some(challenge)) = (again, challenge) else {
            return Ok((resp, started.elapsed()));
        };
        let tried = bearer.as_ref().or(own.as_ref());
        let Some(fresh) = self.token_for_request(&challenge, tried, guess).await else {
            return Ok((resp, started.elapsed()));
        };
        again.headers_mut().insert(header::AUTHORIZATION, fresh);
        let resp = self.request(again).await?;
        Ok((resp, started.elapsed()))
    }

    async fn token_for_request(
        &self,
        challenge: &Challenge,
        tried: Option<&HeaderValue>,
        guess: Option<String>,
    ) -> Option<HeaderValue> {
        match self.tokens.token_for(self, challenge, tried, guess).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "no token for graft's own credentials");
                None
            }
        }
    }

    /// One request, bounded by `response_timeout` until its head arrives.
    async fn request(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let fut = self.client.request(req);
        match tokio::time::timeout(self.response_timeout, fut).await {
            Err(_) => Err(UpstreamError::Timeout(self.response_timeout)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e, self.response_timeout)),
        }
    }

    /// A request graft makes on its own account: reading or writing a
    /// fallback tag, checking a referrer. `auth` is the client's
    /// `Authorization` (graft acts for that client) or graft's own; with
    /// graft's own, a Bearer challenge is answered with a token fetched
    /// with those credentials ([`crate::token`]) and the request sent once
    /// more. A client's challenge is the client's to answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if !self.tokens.is_own(auth) {
            return self.call_once(method, path, auth, headers, body).await;
        }
        let cached = self.tokens.cached_for(&method, path);
        let first = cached.as_ref().or(auth);
        let resp = self
            .call_once(method.clone(), path, first, headers, body.clone())
            .await?;
        if resp.status() != http::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = Challenge::find(resp.headers()) else {
            return Ok(resp);
        };
        let guess = token::scope_for(&method, path);
        match self.tokens.token_for(self, &challenge, first, guess).await {
            Ok(bearer) => {
                self.call_once(method, path, Some(&bearer), headers, body)
                    .await
            }
            Err(e) => {
                tracing::warn!(error = %e, %path, "no token for graft's own request");
                Ok(resp)
            }
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri: Uri = format!("{}{path}", self.origin)
            .parse()
            .map_err(|e| UpstreamError::Request(format!("`{path}`: {e}")))?;
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        for (name, value) in headers {
            req = req.header(name, *value);
        }
        let req = req
            .body(body::full(body))
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        Ok(self.send_plain(req).await?.0)
    }

    /// A GET of an absolute URL (a redirect target, possibly on another
    /// host). `auth` is sent only when the caller decided the host may see it.
    pub async fn get_url(
        &self,
        url: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::Invalid(format!("redirect target `{url}`: {e}")))?;
        let mut req = Request::builder().method(Method::GET).uri(uri.clone());
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let req = req
            .body(body::empty())
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        self.request(req).await
    }

    /// Forwards a client request: same method, path, query, headers (less
    /// hop-by-hop, plus `X-Forwarded-*`) and streamed body.
    pub fn forward_request(
        &self,
        req: Request<Body>,
        client: &ClientSide,
    ) -> Result<Request<Body>, Error> {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = self.uri(pq)?;
        strip_hop_by_hop(&mut parts.headers);
        // The client's expectation was already met by graft's own server.
        parts.headers.remove(header::EXPECT);
        add_forwarded(&mut parts.headers, client);
        parts.version = http::Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }

    /// Cleans an upstream response head before it goes to the client,
    /// pointing `Location` and `Link` URLs on the upstream back at graft.
    /// When such a URL is there but the request gave no valid `Host` (and
    /// `server.public_url` is not set), the client is refused 400: the
    /// upstream's own address must not reach it.
    pub fn rewrite_response_headers(
        &self,
        headers: &mut HeaderMap,
        client: &ClientSide,
    ) -> Result<(), Error> {
        strip_hop_by_hop(headers);
        let Some(client_origin) = client.origin() else {
            return self.refuse_upstream_urls(headers);
        };
        if let Some(v) = headers.get(header::LOCATION) {
            if let Some(new) = rewrite_url(v.to_str().unwrap_or(""), &self.origin, &client_origin) {
                if let Ok(hv) = HeaderValue::from_str(&new) {
                    headers.insert(header::LOCATION, hv);
                }
            }
        }
        let links: Vec<HeaderValue> = headers
            .get_all(header::LINK)
            .iter()
            .map(|v| {
                let s = v.to_str().unwrap_or("");
                rewrite_link(s, &self.origin, &client_origin)
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
        Ok(())
    }

    /// With no origin to point them at, URLs on the upstream cannot be
    /// rewritten: a 400, never the upstream's address.
    fn refuse_upstream_urls(&self, headers: &HeaderMap) -> Result<(), Error> {
        let location = headers
            .get(header::LOCATION)
            .is_some_and(|v| self.is_own_url(v.to_str().unwrap_or("")));
        let link = headers
            .get_all(header::LINK)
            .iter()
            .any(|v| rewrite_link(v.to_str().unwrap_or(""), &self.origin, "").is_some());
        if location || link {
            return Err(host_required());
        }
        Ok(())
    }
}

/// Tells a connection failure from a timeout, looking through the error's
/// sources for the I/O error underneath.
fn classify(e: &hyper_util::client::legacy::Error, limit: Duration) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut msg = e.to_string();
    while let Some(s) = source {
        let client_body = s.is::<tower_http::timeout::TimeoutError>()
            || s.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_user);
        if client_body {
            return UpstreamError::ClientBody(e.to_string());
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return UpstreamError::Timeout(limit);
            }
        }
        let text = s.to_string();
        if !msg.contains(&text) {
            msg = format!("{msg}: {text}");
        }
        source = s.source();
    }
    UpstreamError::Unreachable(msg)
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// including any the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named {
        headers.remove(h);
    }
    for h in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(h);
    }
}

fn add_forwarded(headers: &mut HeaderMap, client: &ClientSide) {
    let ip = client.peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    // The upstream builds its absolute URLs from these: they name graft's
    // origin (the valid `Host`, else `server.public_url`), or are removed so
    // that the upstream's URLs name itself and are rewritten or refused.
    let origin = client.origin();
    let forwarded = origin.as_deref().and_then(|o| o.split_once("://"));
    let values = forwarded.and_then(|(proto, host)| {
        Some((
            HeaderValue::from_str(proto).ok()?,
            HeaderValue::from_str(host).ok()?,
        ))
    });
    match values {
        Some((proto, host)) => {
            headers.insert("x-forwarded-proto", proto);
            headers.insert("x-forwarded-host", host);
        }
        None => {
            headers.remove("x-forwarded-proto");
            headers.remove("x-forwarded-host");
        }
    }
}

/// Points an absolute URL on the upstream back at graft; other hosts (blob
/// storage redirects) and relative URLs stay as they are.
fn rewrite_url(url: &str, upstream_origin: &str, client_origin: &str) -> Option<String> {
    strip_origin(url, upstream_origin).map(|rest| format!("{client_origin}{rest}"))
}

/// The path and query of `url` when it is on `origin` (scheme and host
/// compared case-insensitively, as RFC 3986 §6.2.2.1 says); `None` for
/// another origin, including one that merely shares a prefix
/// (`:5000` vs `:50001`).
fn strip_origin<'a>(url: &'a str, origin: &str) -> Option<&'a str> {
    let n = origin.len();
    let head = url.as_bytes().get(..n)?;
    if !head.eq_ignore_ascii_case(origin.as_bytes()) {
        return None;
    }
    let rest = &url[n..];
    (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')).then_some(rest)
}

/// The upstream's "no" to the credentials it was given (as opposed to an
/// outage, or "not here").
pub(crate) fn is_denial(status: http::StatusCode) -> bool {
    status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN
}

/// Rewrites every `<url>` in a `Link` header value.
fn rewrite_link(value: &str, upstream_origin: &str, client_origin: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut changed = false;
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let url = &rest[open + 1..open + close];
        out.push_str(&rest[..=open]);
        match rewrite_url(url, upstream_origin, client_origin) {
            Some(new) => {
                changed = true;
                out.push_str(&new);
            }
            None => out.push_str(url),
        }
        out.push('>');
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Startup(format!("TLS setup for the upstream: {e}")))?;
    if cfg.insecure_skip_verify {
        tracing::warn!(
            "upstream.insecure_skip_verify is on: upstream certificates are not checked"
        );
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // One unparsable system certificate must not take the rest down.
        let _ = roots.add(cert);
    }
    if let Some(path) = &cfg.ca_file {
        add_ca_file(&mut roots, path)?;
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Adds the certificates of `upstream.ca_file` to `roots`; a file that
/// cannot be read or holds no certificate stops startup with a line that
/// names the key and the file.
fn add_ca_file(roots: &mut rustls::RootCertStore, path: &std::path::Path) -> Result<(), Error> {
    let fail =
        |what: String| Error::Startup(format!("upstream.ca_file {}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot open it: {e}")))?;
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
        let cert = cert.map_err(|e| fail(format!("cannot read it: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("not a usable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(fail("no PEM certificates found".into()));
    }
    Ok(())
}

/// Accepts any server certificate (`upstream.insecure_skip_verify`), still
/// checking that handshake signatures are well-formed.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Foo"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:x"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("docker-content-digest"));
    }

    #[test]
    fn only_a_plain_host_and_port_may_become_a_url() {
        for ok in [
            "graft",
            "graft:5001",
            "reg.example.com",
            "127.0.0.1:80",
            "[::1]:5001",
            "[::1]",
            "a_b",
        ] {
            assert!(is_valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            ":5001",
            "graft:",
            "graft:99999",
            "graft:5o01",
            "a b",
            "evil%2f",
            "u@evil",
            "evil/x",
            "[::1",
            "[nope]:1",
            "[::1]x",
            "é.example",
        ] {
            assert!(!is_valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn upstream_urls_point_back_at_graft() {
        let up = "http://127.0.0.1:5000";
        let me = "http://graft:5001";
        assert_eq!(
            rewrite_url(
                "http://127.0.0.1:5000/v2/a/blobs/uploads/x?_state=y",
                up,
                me
            )
            .as_deref(),
            Some("http://graft:5001/v2/a/blobs/uploads/x?_state=y")
        );
        assert_eq!(rewrite_url("http://127.0.0.1:50001/v2/", up, me), None);
        assert_eq!(rewrite_url("https://s3.example/bucket/x", up, me), None);
        assert_eq!(rewrite_url("/v2/a/blobs/uploads/x", up, me), None);
        assert_eq!(
            rewrite_link(
                "<http://127.0.0.1:5000/v2/_catalog?last=b&n=1>; rel=\"next\"",
                up,
                me
            )
            .as_deref(),
            Some("<http://graft:5001/v2/_catalog?last=b&n=1>; rel=\"next\"")
        );
        assert_eq!(
            rewrite_link("</v2/_catalog?last=b>; rel=\"next\"", up, me),
            None
        );
    }

    #[test]
    fn each_upstream_failure_becomes_the_error_of_whoever_caused_it() {
        use crate::error::Blame;
        let d = Duration::from_secs(1);
        let cases = [
            (
                UpstreamError::Unreachable("refused".into()),
                Blame::Upstream,
            ),
            (UpstreamError::Timeout(d), Blame::Upstream),
            (UpstreamError::BodyStalled(d), Blame::Upstream),
            (UpstreamError::BodyTooLarge { limit: 1 }, Blame::Upstream),
            (UpstreamError::BodyCut("reset".into()), Blame::Upstream),
            (
                UpstreamError::Invalid("bad redirect".into()),
                Blame::Upstream,
            ),
            (UpstreamError::Request("bad uri".into()), Blame::Internal),
        ];
        for (e, blame) in cases {
            let what = format!("{e:?}");
            assert_eq!(Error::from(e).blame(), blame, "{what}");
        }
        assert!(matches!(
            Error::from(UpstreamError::BodyStalled(d)),
            Error::UpstreamStalled(_)
        ));
        assert!(matches!(
            Error::from(UpstreamError::BodyTooLarge { limit: 1 }),
            Error::UpstreamInvalid(_)
        ));
        assert!(!UpstreamError::Request("x".into()).is_outage());
        assert!(UpstreamError::Timeout(d).is_outage());
    }

    #[test]
    fn a_client_path_that_cannot_be_forwarded_is_the_client_s_error() {
        let up =
            Upstream::new(&crate::config::Config::default().upstream).expect("default upstream");
        let e = up.uri("/v2/a b").expect_err("a space is not a URI");
        assert!(matches!(e, Error::BadRequest(_)), "{e:?}");
        assert!(!e.to_string().contains("invalid uri"), "{e}");
    }

    #[test]
    fn a_missing_ca_file_stops_startup_with_one_line_naming_it() {
        let mut cfg = crate::config::Config::default().upstream;
        cfg.ca_file = Some("/nonexistent/graft-ca.pem".into());
        let e = Upstream::new(&cfg).err().expect("startup refused");
        assert!(matches!(e, Error::Startup(_)), "{e:?}");
        let line = e.to_string();
        assert!(
            line.starts_with("upstream.ca_file /nonexistent/graft-ca.pem: cannot open it"),
            "{line}"
        );
        assert!(!line.contains("internal error"), "{line}");
    }

    mod bounded_reads {
        use super::super::*;
        use futures_util::stream::{self, StreamExt};
        use http_body::Frame;
        use http_body_util::StreamBody;

        type Item = Result<Frame<Bytes>, body::BoxError>;

        fn chunk(s: &'static str) -> Item {
            Ok(Frame::data(Bytes::from_static(s.as_bytes())))
        }

        #[tokio::test]
        async fn a_body_that_goes_silent_is_given_up_on() {
            let silent = stream::iter([chunk("{")]).chain(stream::pending::<Item>());
            let got = body::collect_limited(
                StreamBody::new(silent),
                1024,
                Some(Duration::from_millis(50)),
            )
            .await;
            assert!(matches!(got, Err(CollectError::Stalled(_))), "{got:?}");
        }

        #[tokio::test]
        async fn a_slow_body_that_keeps_moving_completes() {
            // Four gaps of 350 ms: longer in total than the 1 s idle bound,
            // each well inside it.
            let slow = stream::iter(["a", "b", "c", "d", "e"]).then(|s| async move {
                if s != "a" {
                    tokio::time::sleep(Duration::from_millis(350)).await;
                }
                chunk(s)
            });
            let got =
                body::collect_limited(StreamBody::new(slow), 1024, Some(Duration::from_secs(1)))
                    .await
                    .expect("a moving body is read to its end");
            assert_eq!(&got[..], b"abcde");
        }

        #[tokio::test]
        async fn a_body_past_the_limit_is_refused() {
            let big = stream::iter([chunk("0123"), chunk("4567")]);
            let got = body::collect_limited(StreamBody::new(big), 6, None).await;
            assert!(matches!(got, Err(CollectError::TooLarge)), "{got:?}");
            let announced = body::full(Bytes::from_static(b"0123456789"));
            let got = body::collect_limited(announced, 6, None).await;
            assert!(matches!(got, Err(CollectError::TooLarge)), "{got:?}");
        }

        #[tokio::test]
        async fn a_cut_body_is_broken_not_short() {
            let cut = stream::iter([chunk("{"), Err("connection reset".into())]);
            let got = body::collect_limited(StreamBody::new(cut), 1024, None).await;
            assert!(matches!(got, Err(CollectError::Broken(_))), "{got:?}");
        }
    }
}
