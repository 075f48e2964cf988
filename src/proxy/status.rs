//! The status page: `GET /` (HTML rendered here, readable without
//! JavaScript: there is none) and `GET /-/status.json` (the same
//! [`Snapshot`]). Each load probes the upstream once and recounts the
//! index (at most every few seconds), then reads every figure back from
//! the `/metrics` exposition, so the page and a scrape agree.
//!
//! Every figure's element carries `data-metric` (the series it was read
//! from) and `data-value` (the raw number), so a browser test, or a
//! scraper of the page, need not parse the human-friendly text.

use std::fmt::Write as _;

use bytesize::ByteSize;
use http::{header, HeaderValue, Method, Response, StatusCode};

use super::{health, Proxy};
use crate::body::{self, Body};
use crate::config::ReferrersMode;
use crate::status::{metric, Context, Snapshot};

/// `GET /`: the page.
pub(crate) async fn page(proxy: &Proxy, method: Method) -> Response<Body> {
    if let Some(refused) = refuse_method(&method) {
        return refused;
    }
    let snap = snapshot(proxy).await;
    respond(render(&snap), "text/html; charset=utf-8")
}

/// `GET /-/status.json`: the page's data.
pub(crate) async fn json(proxy: &Proxy, method: Method) -> Response<Body> {
    if let Some(refused) = refuse_method(&method) {
        return refused;
    }
    let snap = snapshot(proxy).await;
    let mut text = serde_json::to_string_pretty(&snap).expect("the snapshot serialises");
    text.push('\n');
    respond(text, "application/json")
}

fn refuse_method(method: &Method) -> Option<Response<Body>> {
    if matches!(*method, Method::GET | Method::HEAD) {
        return None;
    }
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    Some(resp)
}

fn respond(text: String, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Figures of the moment: a cached copy would show old ones.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn snapshot(proxy: &Proxy) -> Snapshot {
    health::probe(proxy).await;
    proxy.board.recount(proxy.referrers.index()).await;
    let cx = Context {
        origin: proxy.upstream.origin(),
        referrers_mode: match proxy.config.referrers.mode {
            ReferrersMode::Auto => "auto",
            ReferrersMode::Synthesize => "synthesize",
            ReferrersMode::Passthrough => "passthrough",
        },
        native: proxy.referrers.upstream_is_native(),
        cache_enabled: proxy.cache.is_some(),
        board: &proxy.board,
    };
    Snapshot::read(&proxy.metrics.render(), &cx)
}

/// Text made safe for HTML element content and quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    format!("{:.1}", ByteSize(n).display().iec())
}

/// One figure: a label, and the value with its metric and raw number.
fn figure(out: &mut String, id: &str, label: &str, series: &str, raw: u64, shown: &str) {
    let _ = writeln!(
        out,
        "<div class=\"figure\"><span class=\"label\">{}</span>\
         <span class=\"value\" id=\"{}\" data-metric=\"{}\" data-value=\"{raw}\">{}</span></div>",
        escape(label),
        escape(id),
        escape(series),
        escape(shown),
    );
}

const STYLE: &str = "\
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f6f7f9;color:#1d2330}\
header{background:#1d2330;color:#fff;padding:14px 28px}\
header h1{display:inline;font-size:22px;margin:0 12px 0 0}\
header a{color:#9cc3ff}\
main{padding:8px 28px 28px;max-width:1100px}\
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 18px;margin-top:16px}\
h2{font-size:17px;margin:4px 0 10px}\
.figures{display:flex;flex-wrap:wrap;gap:10px}\
.figure{border:1px solid #e4e7ed;border-radius:6px;padding:8px 12px;min-width:150px}\
.label{display:block;color:#5b6474;font-size:12px;text-transform:uppercase;letter-spacing:.03em}\
.value{display:block;font-size:21px;font-weight:600}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef2;font-size:14px}\
th{color:#5b6474;font-weight:600}\
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#5b6474}\
meter{width:320px;height:16px}\
code{font-size:13px}";

/// The whole page.
fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(8 << 10);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>graft status</title><style>{STYLE}</style></head><body>\n\
         <header><h1>graft</h1><span>version {} · {} · \
         <a href=\"/-/status.json\">JSON</a> · <a href=\"/metrics\">metrics</a></span></header>\n<main>\n",
        escape(s.version),
        escape(&s.generated_at),
    );
    upstreams(&mut out, s);
    cache(&mut out, s);
    referrers(&mut out, s);
    errors(&mut out, s);
    out.push_str(
        "<p class=\"muted\">Aggregate figures only: no repository, tag or digest is shown here. \
         Refreshes every 10 s.</p>\n</main></body></html>\n",
    );
    out
}

fn upstreams(out: &mut String, s: &Snapshot) {
    out.push_str(
        "<section id=\"upstreams\"><h2>Upstream</h2><table>\n<tr><th>registry</th><th>health</th>\
         <th>round trip</th><th>checked</th><th>referrers API</th></tr>\n",
    );
    for u in &s.upstreams {
        let (health, class, up, rtt, at) = match &u.probe {
            Some(p) if p.healthy => (
                format!("answering ({})", p.status.unwrap_or_default()),
                "ok",
                1,
                format!("{:.1} ms", p.rtt_ms),
                p.checked_at.clone(),
            ),
            Some(p) => (
                format!("down: {}", p.problem.as_deref().unwrap_or("no answer")),
                "bad",
                0,
                format!("{:.1} ms", p.rtt_ms),
                p.checked_at.clone(),
            ),
            None => ("not probed yet".into(), "muted", 0, "–".into(), "–".into()),
        };
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td>\
             <td id=\"upstream-health\" class=\"{class}\" data-metric=\"graft_upstream_up\" data-value=\"{up}\">{}</td>\
             <td id=\"upstream-rtt\">{}</td><td>{}</td>\
             <td id=\"upstream-referrers-api\" data-value=\"{}\">{} <span class=\"muted\">(referrers.mode = {})</span></td></tr>",
            escape(&u.origin),
            escape(&health),
            escape(&rtt),
            escape(&at),
            escape(u.referrers_api),
            escape(u.referrers_api),
            escape(u.referrers_mode),
        );
    }
    out.push_str("</table></section>\n");
}

fn cache(out: &mut String, s: &Snapshot) {
    let c = &s.cache;
    out.push_str("<section id=\"cache\"><h2>Cache</h2>\n");
    if !c.enabled {
        out.push_str("<p class=\"muted\" id=\"cache-disabled\">The cache is disabled (cache.enabled = false): everything passes through.</p>\n");
    }
    let ratio = c
        .hit_ratio
        .map_or("–".to_string(), |r| format!("{:.1} %", r * 100.0));
    let ratio_raw = c.hit_ratio.map_or(String::new(), |r| format!("{r:.4}"));
    let _ = writeln!(
        out,
        "<div class=\"figures\"><div class=\"figure\"><span class=\"label\">hit ratio</span>\
         <span class=\"value\" id=\"cache-hit-ratio\" data-value=\"{}\">{}</span></div>",
        escape(&ratio_raw),
        escape(&ratio),
    );
    figure(
        out,
        "cache-hits",
        "hits",
        metric::HITS,
        c.hits,
        &c.hits.to_string(),
    );
    let misses = c.misses.to_string();
    figure(
        out,
        "cache-misses",
        "misses",
        metric::MISSES,
        c.misses,
        &misses,
    );
    let (from_cache, from_up) = (c.bytes_from_cache, c.bytes_from_upstream);
    figure(
        out,
        "cache-bytes-from-cache",
        "served from cache",
        metric::BYTES_FROM_CACHE,
        from_cache,
        &bytes(from_cache),
    );
    figure(
        out,
        "cache-bytes-from-upstream",
        "fetched from upstream",
        metric::BYTES_FROM_UPSTREAM,
        from_up,
        &bytes(from_up),
    );
    figure(
        out,
        "cache-evictions",
        "evictions",
        metric::EVICTIONS,
        c.evictions,
        &c.evictions.to_string(),
    );
    out.push_str("</div>\n");
    let used = c.bytes_in_use;
    let _ = write!(
        out,
        "<p>Disk in use: <span id=\"cache-bytes-in-use\" data-metric=\"{}\" data-value=\"{used}\">{}</span>",
        metric::BYTES_IN_USE,
        bytes(used),
    );
    if let Some(max) = c.max_bytes {
        let _ = write!(
            out,
            " of <span id=\"cache-max-bytes\" data-metric=\"{}\" data-value=\"{max}\">{}</span> \
             <meter min=\"0\" max=\"{max}\" value=\"{used}\"></meter>",
            metric::MAX_BYTES,
            bytes(max),
        );
    }
    out.push_str("</p></section>\n");
}

fn referrers(out: &mut String, s: &Snapshot) {
    let r = &s.referrers;
    out.push_str("<section id=\"referrers\"><h2>Referrers</h2><div class=\"figures\">\n");
    for (id, label, series, v) in [
        (
            "referrers-subjects",
            "subjects indexed",
            metric::SUBJECTS,
            r.subjects_indexed,
        ),
        (
            "referrers-indexed",
            "referrers indexed",
            metric::REFERRERS,
            r.referrers_indexed,
        ),
        (
            "referrers-owed-tag-writes",
            "owed tag writes",
            metric::OWED,
            r.owed_tag_writes,
        ),
        (
            "referrers-pending-intents",
            "pending recovery intents",
            metric::INTENTS,
            r.pending_intents,
        ),
    ] {
        figure(out, id, label, series, v, &v.to_string());
    }
    out.push_str("</div></section>\n");
}

fn errors(out: &mut String, s: &Snapshot) {
    let _ = write!(
        out,
        "<section id=\"errors\"><h2>Last errors</h2>\n<table id=\"recent-errors\" data-count=\"{}\">\
         <tr><th>time</th><th>request id</th><th>route</th><th>status</th><th>code</th><th>message</th></tr>\n",
        s.recent_errors.len()
    );
    if s.recent_errors.is_empty() {
        out.push_str("<tr><td colspan=\"6\" class=\"muted\">none since graft started</td></tr>\n");
    }
    for e in &s.recent_errors {
        let _ = writeln!(
            out,
            "<tr class=\"error\"><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&e.time),
            escape(&e.request_id),
            escape(e.route),
            e.status,
            escape(e.code),
            escape(&e.message),
        );
    }
    out.push_str("</table></section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Board, ErrorNote};

    #[test]
    fn everything_shown_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        let board = Board::default();
        board.record_error(
            "blob",
            &ErrorNote {
                status: 502,
                code: "UNAVAILABLE",
                message: "<script>alert(1)</script>".into(),
                request_id: "id\"><b>".into(),
                blame: crate::error::Blame::Upstream,
            },
        );
        let cx = Context {
            origin: "http://<evil>",
            referrers_mode: "auto",
            native: Some(false),
            cache_enabled: false,
            board: &board,
        };
        let html = render(&Snapshot::read("", &cx));
        assert!(!html.contains("<script"), "{html}");
        assert!(
            !html.contains("<evil>") && !html.contains("\"><b>"),
            "{html}"
        );
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("id=\"cache-disabled\""), "{html}");
    }
}
