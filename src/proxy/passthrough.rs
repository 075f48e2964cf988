//! Pass-through: the request goes to the upstream as it came (less
//! hop-by-hop headers), the answer comes back as it went, bodies streaming in
//! both directions. A non-2xx upstream answer is not an error here. An
//! upstream body silent for `upstream.body_timeout` fails, so a stalled
//! upstream cannot hold a client (and its connection slot) forever.

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Outcome, Proxy};
use crate::body::{self, Body};
use crate::error::Error;
use crate::upstream::ClientSide;

pub(crate) async fn forward(
    proxy: &Proxy,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let up_req = proxy.upstream.forward_request(req, client)?;
    let (resp, took) = proxy.upstream.send(up_req).await?;
    outcome.upstream = Some(took);
    relay(proxy, resp, client)
}

/// The upstream's answer, passed to the client as it came: its URLs
/// pointed back at graft, its body failing if the upstream goes silent for
/// `upstream.body_timeout` (as a fill would).
pub(crate) fn relay(
    proxy: &Proxy,
    resp: Response<Incoming>,
    client: &ClientSide,
) -> Result<Response<Body>, Error> {
    let (mut parts, incoming) = resp.into_parts();
    proxy
        .upstream
        .rewrite_response_headers(&mut parts.headers, client)?;
    let body = body::IdleTimeout::new(incoming, proxy.upstream.body_timeout());
    Ok(Response::from_parts(parts, body::boxed(body)))
}
