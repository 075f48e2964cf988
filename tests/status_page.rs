//! The status page (`/`, `/-/status.json`) after real traffic: loaded in a
//! real headless browser (Debian's `chromium`), its figures agree with
//! `/metrics` and with the JSON, it needs no script to show them, and it
//! shows no repository content.
//!
//! `GRAFT_UPDATE_SCREENSHOT=1` also writes the browser's screenshot to
//! `docs/status.png` (the README's picture).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::artifacts::{artifact, push_by_digest, push_subject};
use common::{header_str, Api, Graft, Registry, TestImage};
use reqwest::StatusCode;

const REPO: &str = "team-secret/payments-api";

/// Series → value of a Prometheus text exposition.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `(id, data-metric, data-value)` of every element carrying a metric.
fn figures(html: &str) -> Vec<(String, String, String)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        let len = tag[start..].find('"')?;
        Some(tag[start..start + len].to_string())
    };
    html.split('<')
        .filter_map(|tag| {
            let tag = &tag[..tag.find('>')?];
            let metric = attr(tag, "data-metric")?;
            Some((attr(tag, "id")?, metric, attr(tag, "data-value")?))
        })
        .collect()
}

/// The text content of the element with `id` (no nested elements).
fn text_of(html: &str, id: &str) -> String {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let from = at + html[at..].find('>').expect("tag end") + 1;
    let to = from + html[from..].find('<').expect("element end");
    html[from..to].to_string()
}

fn attr_of(html: &str, id: &str, name: &str) -> String {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let tag = &html[html[..at].rfind('<').expect("tag start")..];
    let tag = &tag[..tag.find('>').expect("tag end")];
    let start = tag
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} on #{id}"))
        + name.len()
        + 2;
    tag[start..start + tag[start..].find('"').expect("quote")].to_string()
}

/// Debian's chromium, or `None` (the test then says loudly it skipped).
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/bin")])
                .map(move |dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .find(|p| p.is_file())
}

/// Runs headless chromium with `args` and `url`, killing it after a minute.
fn run_chromium(browser: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("chromium output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pushes an image and a referrer through graft, pulls the image twice,
/// and makes one request fail upstream-side; returns what was pushed.
async fn real_traffic(api: &Api, registry: &mut Registry) -> (String, String) {
    let image = TestImage::build(2);
    api.push_image(REPO, "v1", &image).await;
    for _ in 0..2 {
        api.get_manifest(REPO, &image.digest).await;
        for blob in image.blobs() {
            api.get_blob(REPO, &blob.digest).await;
        }
    }
    let subject = push_subject(api, REPO, "v2").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sig_digest = push_by_digest(api, REPO, &sig).await;
    let listed = common::artifacts::referrers(api, REPO, &subject.digest, "").await;
    assert_eq!(listed.status(), StatusCode::OK);
    // The failing request: the registry is down for a tag graft never saw.
    registry.stop();
    let failed = Api::send(api.get(&format!("/v2/{REPO}/manifests/never-seen"))).await;
    assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
    registry.restart();
    (image.digest.clone(), sig_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_browser_shows_what_metrics_say_after_real_traffic() {
    let Some(browser) = chromium() else {
        eprintln!(
            "\n\n!!!!! SKIPPED: chromium is not installed; the status page was NOT tested in a \
             browser. Run ./scripts/test (installs it) or `apt-get install -y chromium`. !!!!!\n\n"
        );
        return;
    };
    let mut registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let (image_digest, sig_digest) = real_traffic(&api, &mut registry).await;

    let profile = tempfile::tempdir().expect("chromium profile dir");
    let url = format!("{}/", graft.url());
    let dom = {
        let (b, p, u) = (browser.clone(), profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || run_chromium(&b, &p, &["--dump-dom"], &u))
            .await
            .expect("chromium task")
    };
    assert!(dom.contains("<title>graft status</title>"), "{dom}");
    let metrics = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    let json: serde_json::Value = Api::send(api.get("/-/status.json"))
        .await
        .json()
        .await
        .expect("status json");
    let values = samples(&metrics);

    // Every figure the browser shows is the metric it names.
    let shown = figures(&dom);
    let ids: Vec<&str> = shown.iter().map(|(id, _, _)| id.as_str()).collect();
    for want in [
        "upstream-health",
        "cache-hits",
        "cache-misses",
        "cache-bytes-from-cache",
        "cache-bytes-from-upstream",
        "cache-evictions",
        "cache-bytes-in-use",
        "cache-max-bytes",
        "referrers-subjects",
        "referrers-indexed",
        "referrers-owed-tag-writes",
        "referrers-pending-intents",
    ] {
        assert!(ids.contains(&want), "no #{want} figure in {ids:?}");
    }
    for (id, metric, value) in &shown {
        let want = values
            .get(metric)
            .unwrap_or_else(|| panic!("#{id} names `{metric}`, which /metrics lacks"));
        assert_eq!(
            value.parse::<f64>().expect("numeric data-value"),
            *want,
            "#{id} shows {value}, /metrics says {metric} = {want}"
        );
    }

    // The traffic shows: hits after the second pull, bytes both ways, one
    // subject with its referrer, the upstream answering again.
    let hits = values["graft_cache_hits_total"];
    let misses = values["graft_cache_misses_total"];
    assert!(hits >= 3.0, "two pulls of a pushed image hit: {hits}");
    assert!(values["graft_cache_bytes_served_total"] > 0.0);
    assert_eq!(attr_of(&dom, "upstream-health", "data-value"), "1");
    assert!(text_of(&dom, "upstream-health").starts_with("answering"));
    assert!(values["graft_referrers_subjects_indexed"] >= 1.0);
    assert!(values["graft_referrers_indexed"] >= 1.0);
    assert_eq!(text_of(&dom, "cache-hits"), format!("{hits}"));
    let ratio: f64 = attr_of(&dom, "cache-hit-ratio", "data-value")
        .parse()
        .expect("ratio");
    assert!(
        (ratio - hits / (hits + misses)).abs() < 1e-3,
        "ratio {ratio}"
    );
    assert!(text_of(&dom, "cache-hit-ratio").ends_with('%'));

    // The JSON is the same data.
    assert_eq!(json["cache"]["hits"].as_f64(), Some(hits));
    assert_eq!(json["cache"]["misses"].as_f64(), Some(misses));
    assert_eq!(
        json["cache"]["bytes_from_upstream"].as_f64(),
        Some(values["graft_upstream_bytes_fetched_total"])
    );
    assert_eq!(
        json["referrers"]["referrers_indexed"].as_f64(),
        Some(values["graft_referrers_indexed"])
    );
    assert_eq!(json["upstreams"][0]["origin"], registry.url());
    assert_eq!(json["upstreams"][0]["probe"]["healthy"], true);

    // The failed request is among the last errors: route kind, status and
    // code, never the path.
    let errors = json["recent_errors"].as_array().expect("recent_errors");
    let failed = errors
        .iter()
        .find(|e| e["status"] == 502)
        .unwrap_or_else(|| panic!("no 502 among {errors:?}"));
    assert_eq!(failed["route"], "manifest");
    assert_eq!(failed["code"], "UNAVAILABLE");
    assert!(!failed["request_id"].as_str().unwrap_or_default().is_empty());
    assert!(dom.contains(failed["request_id"].as_str().expect("id")));
    assert!(attr_of(&dom, "recent-errors", "data-count") != "0");

    // No repository content: names, tags, digests stay off the page.
    let json_text = json.to_string();
    for private in [
        REPO,
        "team-secret",
        "never-seen",
        &image_digest,
        &sig_digest,
    ] {
        assert!(!dom.contains(private), "the page shows `{private}`");
        assert!(!json_text.contains(private), "the JSON shows `{private}`");
    }

    // A picture of it, for the README.
    let shot = profile.path().join("status.png");
    {
        let arg = format!("--screenshot={}", shot.display());
        let (b, p, u) = (browser.clone(), profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || {
            run_chromium(
                &b,
                &p,
                &[&arg, "--window-size=1200,780", "--hide-scrollbars"],
                &u,
            )
        })
        .await
        .expect("chromium task");
    }
    let png = std::fs::read(&shot).expect("chromium wrote a screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    if std::env::var_os("GRAFT_UPDATE_SCREENSHOT").is_some() {
        let to = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status.png");
        std::fs::copy(&shot, &to).expect("write docs/status.png");
    }
}

#[tokio::test]
async fn the_figures_are_in_the_html_itself_without_any_script() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    api.push_image("app", "v1", &TestImage::build(1)).await;

    let resp = Api::send(api.get("/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = header_str(resp.headers(), "content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert_eq!(
        header_str(resp.headers(), "cache-control").as_deref(),
        Some("no-store")
    );
    let html = resp.text().await.expect("page");
    assert!(!html.to_ascii_lowercase().contains("<script"), "{html}");
    let metrics = samples(
        &Api::send(api.get("/metrics"))
            .await
            .text()
            .await
            .expect("metrics"),
    );
    for (id, metric, value) in figures(&html) {
        assert_eq!(
            value.parse::<f64>().ok(),
            metrics.get(&metric).copied(),
            "#{id} ({metric}) in the raw HTML"
        );
    }
    assert_eq!(attr_of(&html, "upstream-health", "data-value"), "1");
    assert!(text_of(&html, "referrers-indexed").parse::<u64>().is_ok());

    // Only reads: the page is no endpoint to write to.
    let post = Api::send(api.request(reqwest::Method::POST, "/")).await;
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_down_upstream_shows_on_the_page_and_in_the_metrics() {
    let mut registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    registry.stop();

    let json: serde_json::Value = Api::send(api.get("/-/status.json"))
        .await
        .json()
        .await
        .expect("status json");
    let probe = &json["upstreams"][0]["probe"];
    assert_eq!(probe["healthy"], false, "{json}");
    let problem = probe["problem"].as_str().unwrap_or_default();
    assert_eq!(problem, "upstream registry unreachable", "{json}");
    assert_eq!(
        common::read_metric(&api, "graft_upstream_up").await,
        Some(0)
    );
    let html = Api::send(api.get("/")).await.text().await.expect("page");
    assert!(
        text_of(&html, "upstream-health").starts_with("down"),
        "{html}"
    );
}
