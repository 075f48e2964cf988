//! A bounded soak: many concurrent clients mixing every kind of traffic
//! graft sees for a few minutes, then the checks that catch slow leaks
//! and rare races: no error the upstream did not cause, every pool
//! subject's fallback tag listing exactly what graft's API lists once the
//! load stops, open file descriptors back to the baseline once the clients
//! are gone, resident memory flat after warm-up.
//!
//! The mix, per client and operation: pull a blob (bytes checked against
//! their digest), pull a manifest by tag or by digest (bytes checked),
//! push an artifact with `subject` through graft (then the referrers API
//! must list it at once), write a referrer the old way (manifest and
//! fallback tag straight to the registry), delete a referrer pushed through
//! graft (then the API must no longer list it), query referrers.
//!
//! `soak_smoke` (20 s, 16 clients) runs with the other tests; the full run
//! is `scripts/soak` (`GRAFT_SOAK_SECS`, default 180; `GRAFT_SOAK_CLIENTS`,
//! default 64). graft runs in this process, so `/proc/self` measures it
//! (plus the test's own clients, which are dropped before the final count).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use common::artifacts::{self, Subject, EMPTY, INDEX, MANIFEST};
use common::{random_bytes, sha256_digest, Api, DigestWriter, Graft, Registry, TestImage};

const REPO: &str = "soak/app";
/// Images in the pull pool, each with one extra 1 MiB blob.
const POOL: usize = 8;
const BIG_BLOB: usize = 1 << 20;
/// How many committed cache files graft keeps open (`OPEN_FILES` in
/// src/cache/store.rs).
const OPEN_CACHE_FILES: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_smoke() {
    soak(Duration::from_secs(20), 16, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long: run with scripts/soak"]
async fn soak_full() {
    let secs = env_number("GRAFT_SOAK_SECS", 180);
    let clients = env_number("GRAFT_SOAK_CLIENTS", 64) as usize;
    // Memory is judged on the full run only: 20 s say nothing about a leak.
    soak(Duration::from_secs(secs), clients, Some(32 << 20)).await;
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the clients pull and refer to.
struct Pool {
    images: Vec<(String, TestImage)>,
    blobs: Vec<(String, Bytes)>,
    subjects: Vec<Subject>,
}

/// Who caused a failed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    /// graft said the upstream failed (502/503/504 with graft's "upstream
    /// registry …" message), or passed on the upstream's own 5xx.
    Upstream,
    /// Anything else: graft's own 5xx, a wrong body, a lost or resurrected
    /// referrer, a connection graft dropped.
    Graft,
}

#[derive(Default)]
struct Tally {
    /// Per operation: (ok, upstream-caused, graft-caused).
    ops: BTreeMap<&'static str, (u64, u64, u64)>,
    /// The first few graft-caused failures, for the report.
    samples: Vec<String>,
    /// The first few upstream-caused ones, to show what they were.
    upstream_samples: Vec<String>,
}

impl Tally {
    fn record(&mut self, op: &'static str, outcome: Result<(), (Cause, String)>) {
        let row = self.ops.entry(op).or_default();
        match outcome {
            Ok(()) => row.0 += 1,
            Err((Cause::Upstream, what)) => {
                row.1 += 1;
                if self.upstream_samples.len() < 5 {
                    self.upstream_samples.push(format!("{op}: {what}"));
                }
            }
            Err((Cause::Graft, what)) => {
                row.2 += 1;
                if self.samples.len() < 10 {
                    self.samples.push(format!("{op}: {what}"));
                }
            }
        }
    }

    fn graft_errors(&self) -> u64 {
        self.ops.values().map(|r| r.2).sum()
    }
}

/// Only warnings: an access-log line per request would cost the run CPU
/// and, captured by the test harness, count as graft's memory growth.
fn quiet_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_test_writer()
        .try_init();
}

async fn soak(duration: Duration, clients: usize, rss_bound: Option<u64>) {
    quiet_logs();
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| {
        // Idle upstream connections close soon, so that the descriptor
        // count can come back to the baseline within the test.
        c.upstream.idle_timeout = Duration::from_secs(2);
    });
    let direct = Api::for_registry(&registry);
    let pool = Arc::new(build_pool(&direct).await);
    // Warm-up: every pool item pulled once, so the cache's open files and
    // the index are part of the baseline.
    let warm = Api::for_graft(&graft);
    for _miss_then_hit in 0..2 {
        for (_, bytes) in &pool.blobs {
            pull_blob(&warm, &sha256_digest(bytes))
                .await
                .expect("warm-up pull");
        }
        for (tag, image) in &pool.images {
            warm.get_manifest(REPO, tag).await;
            warm.get_manifest(REPO, &image.digest).await;
        }
    }
    drop(warm);
    tokio::time::sleep(Duration::from_secs(3)).await; // idle connections expire
    let data_dir = graft.data_dir().to_path_buf();
    let fd_baseline = open_fds(&data_dir);
    let kinds_before = fd_kinds();

    let tally = Arc::new(Mutex::new(Tally::default()));
    let rss = Arc::new(Mutex::new(Vec::<(Duration, u64)>::new()));
    let started = Instant::now();
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            loop {
                rss.lock()
                    .expect("rss")
                    .push((started.elapsed(), rss_bytes()));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let workers: Vec<_> = (0..clients)
        .map(|n| {
            let (api, direct) = (Api::for_graft(&graft), Api::for_registry(&registry));
            let (pool, tally) = (pool.clone(), tally.clone());
            tokio::spawn(async move {
                let mut client = Client::new(n, api, direct, pool);
                while started.elapsed() < duration {
                    let (op, outcome) = client.step().await;
                    tally.lock().expect("tally").record(op, outcome);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("client task");
    }
    let elapsed = started.elapsed();
    sampler.abort();
    let converged = fallback_tags_converge(&graft, &direct, &pool).await;

    // Clients are gone with their tasks; graft's idle connections follow.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fds_after = open_fds(&data_dir);
    while fds_after.0 > fd_baseline.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fds_after = open_fds(&data_dir);
    }

    let tally = tally.lock().expect("tally");
    let samples = rss.lock().expect("rss").clone();
    let warm_up = elapsed / 5;
    let after_warm = samples
        .iter()
        .find(|(t, _)| *t >= warm_up)
        .map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    // The curve, to tell a plateau from a leak: RSS at each fifth.
    let curve: Vec<String> = (1..=5)
        .filter_map(|k| samples.iter().rev().find(|(t, _)| *t <= elapsed * k / 5))
        .map(|(t, b)| format!("{:.0} s: {:.1} MiB", t.as_secs_f64(), *b as f64 / 1048576.0))
        .collect();
    println!("resident memory over the run: {}", curve.join(", "));
    print_summary(
        &tally,
        clients,
        elapsed,
        (fd_baseline, fds_after),
        (after_warm, last, peak),
    );

    assert_eq!(
        tally.graft_errors(),
        0,
        "errors the upstream did not cause: {:#?}",
        tally.samples
    );
    if let Err(stale) = converged {
        panic!("fallback tags still differ from graft's listing after the load: {stale}")
    }
    let total: u64 = tally.ops.values().map(|r| r.0 + r.1 + r.2).sum();
    assert!(
        total > clients as u64,
        "the clients barely ran: {total} operations"
    );
    assert!(
        fds_after.0 <= fd_baseline.0,
        "open descriptors {fds_after:?} after the run, {fd_baseline:?} before:\n{:#?}\nbefore:\n{kinds_before:#?}",
        fd_kinds()
    );
    assert!(
        fds_after.1 <= OPEN_CACHE_FILES,
        "{} cache files open, more than graft's bound",
        fds_after.1
    );
    if let Some(bound) = rss_bound {
        assert!(
            last <= after_warm + bound,
            "resident memory grew from {after_warm} to {last} bytes after warm-up"
        );
    }
}

fn print_summary(
    tally: &Tally,
    clients: usize,
    elapsed: Duration,
    (fd_before, fd_after): ((usize, usize), (usize, usize)),
    (rss_warm, rss_last, rss_peak): (u64, u64, u64),
) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "\nsoak: {clients} clients for {:.0} s",
        elapsed.as_secs_f64()
    );
    println!("| operation | ok | upstream errors | graft errors |");
    println!("|---|---:|---:|---:|");
    let mut total = (0, 0, 0);
    for (op, (ok, up, own)) in &tally.ops {
        println!("| {op} | {ok} | {up} | {own} |");
        total = (total.0 + ok, total.1 + up, total.2 + own);
    }
    println!("| all | {} | {} | {} |", total.0, total.1, total.2);
    for sample in &tally.upstream_samples {
        println!("upstream-caused: {sample}");
    }
    println!(
        "operations per second: {:.0}",
        (total.0 + total.1 + total.2) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "open descriptors: {} before, {} after (plus cache files kept open by design: {} before, {} after)",
        fd_before.0, fd_after.0, fd_before.1, fd_after.1
    );
    println!(
        "resident memory: {:.1} MiB after warm-up, {:.1} MiB at the end, {:.1} MiB peak",
        mib(rss_warm),
        mib(rss_last),
        mib(rss_peak)
    );
}

/// Once the load stops, every pool subject's fallback tag on the registry
/// must come to list exactly what graft's referrers API lists (old clients
/// lose no referrer, and see no deleted one): tag writes the registry
/// refused under the load are owed and retried, with a back-off of up to a
/// minute. Returns how long that took, or the subjects still differing.
async fn fallback_tags_converge(
    graft: &Graft,
    direct: &Api,
    pool: &Pool,
) -> Result<Duration, String> {
    let api = Api::for_graft(graft);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    loop {
        let mut stale = Vec::new();
        for subject in &pool.subjects {
            let mut upstream = artifacts::upstream_fallback_digests(direct, REPO, subject).await;
            let mut listed = list(&api, subject).await.unwrap_or_default();
            upstream.sort();
            listed.sort();
            if upstream != listed {
                let mut only = Vec::new();
                for d in upstream.iter().filter(|d| !listed.contains(d)) {
                    only.push(format!("{d} only in the tag ({})", exists(direct, d).await));
                }
                for d in listed.iter().filter(|d| !upstream.contains(d)) {
                    only.push(format!("{d} only in the API ({})", exists(direct, d).await));
                }
                stale.push(format!("subject {}: {}", subject.digest, only.join(", ")));
            }
        }
        if stale.is_empty() {
            let took = started.elapsed();
            println!(
                "fallback tags matched graft's listing {:.0} s after the load",
                took.as_secs_f64()
            );
            return Ok(took);
        }
        if Instant::now() > deadline {
            return Err(stale.join("; "));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Whether the registry still holds manifest `digest`, for the report.
/// The OCI types must be accepted: distribution answers 404 to a HEAD of
/// an OCI manifest that does not accept them, as if it were deleted.
async fn exists(direct: &Api, digest: &str) -> &'static str {
    let head = direct
        .head(&format!("/v2/{REPO}/manifests/{digest}"))
        .header("accept", format!("{MANIFEST}, {INDEX}"));
    match head.send().await.map(|r| r.status().as_u16()) {
        Ok(200) => "the registry has it",
        Ok(404) => "deleted at the registry",
        _ => "the registry did not say",
    }
}

/// Open descriptors: (everything but committed cache files, committed
/// cache files). graft keeps recently hit cache files open by design, up to
/// [`OPEN_CACHE_FILES`]; everything else (sockets, temp files, pipes) must
/// come back to the baseline.
fn open_fds(data_dir: &std::path::Path) -> (usize, usize) {
    let blobs = data_dir.join("blobs");
    let tmp = blobs.join("tmp");
    let mut counts = (0, 0);
    for entry in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        match std::fs::read_link(entry.path()) {
            Ok(p) if p.starts_with(&blobs) && !p.starts_with(&tmp) => counts.1 += 1,
            _ => counts.0 += 1,
        }
    }
    counts
}

/// Open descriptors by what they point at (sockets by local and peer
/// port), to tell which kind leaked.
fn fd_kinds() -> BTreeMap<String, usize> {
    let tcp = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    let port = |hex: &str| {
        hex.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    let sockets: BTreeMap<String, String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, peer, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
            Some((
                inode.to_string(),
                format!("tcp {}->{}", port(local), port(peer)),
            ))
        })
        .collect();
    let mut kinds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let kind = match target.strip_prefix("socket:[") {
            Some(inode) => sockets
                .get(inode.trim_end_matches(']'))
                .cloned()
                .unwrap_or_else(|| "socket (not tcp)".into()),
            None if target.starts_with('/') => target
                .rsplit_once('/')
                .map_or(target.clone(), |(dir, _)| format!("{dir}/*")),
            None => target.split('[').next().unwrap_or_default().to_string(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

async fn build_pool(direct: &Api) -> Pool {
    let mut pool = Pool {
        images: Vec::new(),
        blobs: Vec::new(),
        subjects: Vec::new(),
    };
    direct.push_blob(REPO, Bytes::from_static(b"{}")).await;
    for n in 0..POOL {
        let tag = format!("t{n}");
        let image = TestImage::build(2);
        direct.push_image(REPO, &tag, &image).await;
        for blob in image.blobs() {
            pool.blobs.push((blob.digest.clone(), blob.data.clone()));
        }
        let big = Bytes::from(random_bytes(BIG_BLOB));
        let digest = direct.push_blob(REPO, big.clone()).await;
        pool.blobs.push((digest, big));
        pool.subjects.push(Subject {
            digest: image.digest.clone(),
            size: image.manifest.len(),
            media_type: TestImage::MEDIA_TYPE,
        });
        pool.images.push((tag, image));
    }
    pool
}

/// One client: its own connections, its own random sequence, and the
/// referrers it wrote (so it knows what the API must list).
struct Client {
    n: usize,
    api: Api,
    direct: Api,
    pool: Arc<Pool>,
    rng: u64,
    /// Referrers pushed through graft and not deleted yet: (subject, digest).
    pushed: Vec<(Subject, String)>,
    /// This client's own subject for old-style writes, and the fallback
    /// tag entries it has written there.
    old_style: Option<(Subject, Vec<Value>)>,
}

type Outcome = Result<(), (Cause, String)>;

impl Client {
    fn new(n: usize, api: Api, direct: Api, pool: Arc<Pool>) -> Client {
        Client {
            n,
            api,
            direct,
            pool,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1),
            pushed: Vec::new(),
            old_style: None,
        }
    }

    fn next(&mut self, below: usize) -> usize {
        // xorshift64: a different, reproducible sequence per client.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % below as u64) as usize
    }

    async fn step(&mut self) -> (&'static str, Outcome) {
        let roll = self.next(100);
        let (pick, blob) = (self.next(POOL), self.next(self.pool.blobs.len()));
        let pool = self.pool.clone();
        match roll {
            0..40 => {
                let (digest, _) = &pool.blobs[blob];
                ("pull blob", pull_blob(&self.api, digest).await)
            }
            40..55 => {
                let (tag, image) = &pool.images[pick];
                let got = pull_manifest(&self.api, tag).await;
                ("pull manifest by tag", same(got, &image.manifest))
            }
            55..70 => {
                let (_, image) = &pool.images[pick];
                let got = pull_manifest(&self.api, &image.digest).await;
                ("pull manifest by digest", same(got, &image.manifest))
            }
            70..80 => ("push with subject", self.push_referrer().await),
            80..85 => ("old-style tag write", self.old_style_write().await),
            85..90 => ("delete referrer", self.delete_referrer().await),
            _ => {
                let subject = &pool.subjects[pick];
                ("query referrers", list(&self.api, subject).await.map(drop))
            }
        }
    }

    /// Pushes an artifact with `subject` through graft; the referrers API
    /// must list it right away.
    async fn push_referrer(&mut self) -> Outcome {
        let pick = self.next(POOL);
        let subject = self.pool.subjects[pick].clone();
        let manifest = artifact(&subject, self.n);
        let digest = sha256_digest(&manifest);
        let put = self
            .api
            .request(
                reqwest::Method::PUT,
                &format!("/v2/{REPO}/manifests/{digest}"),
            )
            .header("content-type", MANIFEST)
            .body(manifest);
        check_status(put.send().await, 201).await?;
        let listed = list(&self.api, &subject).await?;
        if !listed.contains(&digest) {
            return Err((Cause::Graft, format!("pushed referrer {digest} not listed")));
        }
        self.pushed.push((subject, digest));
        Ok(())
    }

    /// Deletes a referrer this client pushed through graft; the API must
    /// stop listing it.
    async fn delete_referrer(&mut self) -> Outcome {
        let Some((subject, digest)) = self.pushed.pop() else {
            return Ok(());
        };
        let delete = self.api.delete(&format!("/v2/{REPO}/manifests/{digest}"));
        check_status(delete.send().await, 202).await?;
        let listed = list(&self.api, &subject).await?;
        if listed.contains(&digest) {
            return Err((
                Cause::Graft,
                format!("deleted referrer {digest} still listed"),
            ));
        }
        Ok(())
    }

    /// Writes a referrer as an old client does: the manifest and the
    /// fallback tag straight to the registry (each client has its own
    /// subject, so no two clients race on one tag).
    async fn old_style_write(&mut self) -> Outcome {
        if self.old_style.is_none() {
            // Not `artifacts::push_subject`: it pushes the shared `{}` blob
            // again, and distribution answers concurrent commits of one blob
            // with a spurious MANIFEST_BLOB_UNKNOWN.
            let image = TestImage::build(1);
            self.direct
                .push_image(REPO, &format!("old{}", self.n), &image)
                .await;
            let subject = Subject {
                digest: image.digest.clone(),
                size: image.manifest.len(),
                media_type: TestImage::MEDIA_TYPE,
            };
            self.old_style = Some((subject, Vec::new()));
        }
        let (subject, entries) = self.old_style.as_mut().expect("set above");
        let manifest = artifact(subject, 1_000_000 + entries.len());
        let digest = sha256_digest(&manifest);
        put_direct(&self.direct, &digest, MANIFEST, manifest.clone()).await?;
        entries.push(artifacts::expected_descriptor(&manifest));
        let index = artifacts::fallback_index(entries);
        put_direct(&self.direct, &subject.fallback_tag(), INDEX, index).await?;
        let subject = subject.clone();
        list(&self.api, &subject).await.map(drop)
    }
}

/// PUTs a manifest straight to the registry; a refusal there is the
/// registry's own doing.
async fn put_direct(direct: &Api, reference: &str, media_type: &str, body: Bytes) -> Outcome {
    let put = direct
        .request(
            reqwest::Method::PUT,
            &format!("/v2/{REPO}/manifests/{reference}"),
        )
        .header("content-type", media_type)
        .body(body);
    match put.send().await {
        Ok(r) if r.status().as_u16() == 201 => Ok(()),
        Ok(r) => Err((
            Cause::Upstream,
            format!("registry refused a direct PUT: {}", r.status()),
        )),
        Err(e) => Err((Cause::Upstream, format!("registry unreachable: {e}"))),
    }
}

fn artifact(subject: &Subject, seed: usize) -> Bytes {
    artifacts::artifact(
        subject,
        Some("application/vnd.example.soak"),
        Some(EMPTY),
        Some(json!({"seed": seed.to_string(), "nonce": hex::encode(random_bytes(8))})),
    )
}

/// Classifies a non-success answer by who caused it.
async fn blame(resp: reqwest::Response) -> (Cause, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let error = &body["errors"][0];
    let from_graft = error["detail"]["request_id"].is_string();
    let message = error["message"].as_str().unwrap_or_default();
    let upstream = status >= 500 && (!from_graft || message.starts_with("upstream registry"));
    let cause = if upstream {
        Cause::Upstream
    } else {
        Cause::Graft
    };
    (cause, format!("{status}: {body}"))
}

async fn check_status(
    sent: Result<reqwest::Response, reqwest::Error>,
    want: u16,
) -> Result<reqwest::Response, (Cause, String)> {
    let resp = sent.map_err(|e| (Cause::Graft, format!("request failed: {e}")))?;
    if resp.status().as_u16() == want {
        Ok(resp)
    } else {
        Err(blame(resp).await)
    }
}

async fn pull_blob(api: &Api, digest: &str) -> Outcome {
    let sent = api.get(&format!("/v2/{REPO}/blobs/{digest}")).send().await;
    let mut resp = check_status(sent, 200).await?;
    let mut hasher = DigestWriter::default();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => hasher.update(&chunk),
            Ok(None) => break,
            Err(e) => return Err((Cause::Graft, format!("blob body cut: {e}"))),
        }
    }
    let got = hasher.digest();
    if got == digest {
        Ok(())
    } else {
        Err((Cause::Graft, format!("blob {digest} arrived as {got}")))
    }
}

async fn pull_manifest(api: &Api, reference: &str) -> Result<Bytes, (Cause, String)> {
    let sent = api
        .get(&format!("/v2/{REPO}/manifests/{reference}"))
        .header("accept", format!("{MANIFEST}, {INDEX}"))
        .send()
        .await;
    let resp = check_status(sent, 200).await?;
    resp.bytes()
        .await
        .map_err(|e| (Cause::Graft, format!("manifest body cut: {e}")))
}

fn same(got: Result<Bytes, (Cause, String)>, want: &Bytes) -> Outcome {
    let got = got?;
    if got == *want {
        Ok(())
    } else {
        Err((
            Cause::Graft,
            format!("manifest of {} bytes, expected {}", got.len(), want.len()),
        ))
    }
}

/// The digests the referrers API lists for `subject`.
async fn list(api: &Api, subject: &Subject) -> Result<Vec<String>, (Cause, String)> {
    let sent = api
        .get(&format!("/v2/{REPO}/referrers/{}", subject.digest))
        .send()
        .await;
    let resp = check_status(sent, 200).await?;
    let body: Value = resp
        .json()
        .await
        .map_err(|e| (Cause::Graft, format!("referrers body: {e}")))?;
    let manifests = body["manifests"]
        .as_array()
        .ok_or_else(|| (Cause::Graft, format!("not an index: {body}")))?;
    Ok(manifests
        .iter()
        .filter_map(|d| d["digest"].as_str().map(str::to_owned))
        .collect())
}
