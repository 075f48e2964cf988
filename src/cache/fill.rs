//! Coalesced misses: one upstream fetch per digest, however many clients
//! ask at once.
//!
//! The first client to miss claims the digest and holds the [`Miss`]: it
//! asks the upstream and hands its 200 to [`Miss::fill`]. Everyone else
//! holds a [`Follow`]. The fetch runs in its own task, writing a temp file
//! on the blocking pool; every client — the leader included — reads that
//! file as it grows, so bytes reach all of them as they arrive, and a
//! leader that hangs up does not cut the others off. Followers never see
//! the end of a body before the content was verified: the last byte is held
//! back until the fill is committed, and a failed fill fails their bodies.
//! An upstream body silent for `upstream.body_timeout` fails the fill. A
//! fill that cannot write (a full disk) hands its readers over to the
//! upstream instead of failing them (`spill.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header;
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::spill::{Handover, Readers};
use super::{space::Reservation, store::Writer, CacheError, ContentCache, FileBody};
use crate::credentials::CredKey;
use crate::oci::{Digest, RepoName};

/// Where a fill stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum FillState {
    /// The leader is waiting for the upstream's answer.
    Connecting,
    /// Bytes are arriving; `written` are in the temp file.
    Writing { written: u64 },
    /// Verified and committed; `len` bytes.
    Done { len: u64 },
    /// The fetch failed or the bytes did not match: nothing was cached.
    Failed(String),
    /// The temp file could not be written past `at` bytes: nothing will be
    /// cached, and readers get the rest from their channel.
    Spilling { at: u64 },
    /// The upstream did not give the leader the content (401, 404, a
    /// redirect it could not follow…): followers must ask for themselves.
    Abandoned,
}

/// One digest being fetched.
pub(super) struct Fill {
    digest: Digest,
    /// Who the leader is, so followers with the same credentials on the same
    /// repository are authorized by the leader's answer.
    leader: (RepoName, CredKey),
    state: watch::Receiver<FillState>,
    /// Set once the upstream answered 200. The lock is held only to clone.
    opened: Mutex<Option<Opened>>,
    handover: Handover,
}

/// The read side of the temp file, its declared length, the content type.
#[derive(Clone)]
struct Opened {
    file: Arc<File>,
    len: Option<u64>,
    content_type: Option<String>,
}

impl Fill {
    fn opened(&self) -> Option<Opened> {
        self.opened.lock().expect("fill poisoned").clone()
    }

    /// Waits until the leader has the upstream's answer (or gave up).
    async fn settled(&self) -> FillState {
        let mut rx = self.state.clone();
        loop {
            let s = rx.borrow_and_update().clone();
            if s != FillState::Connecting {
                return s;
            }
            if rx.changed().await.is_err() {
                return FillState::Failed("fill task ended".into());
            }
        }
    }

    /// A reader's body; `None` once the fill handed over (a reader that
    /// comes now asks again).
    fn streaming(&self, opened: Opened) -> Option<Streaming> {
        let spill = self.handover.register()?;
        Some(Streaming {
            body: FileBody::following(opened.file, opened.len, self.state.clone(), spill),
            len: opened.len,
            content_type: opened.content_type,
        })
    }
}

/// The fills in flight.
#[derive(Default)]
pub(super) struct Fills {
    map: Mutex<HashMap<Digest, Arc<Fill>>>,
}

/// The claim of the first client to miss a digest.
pub(super) struct Lead {
    fill: Arc<Fill>,
    tx: watch::Sender<FillState>,
    fills: Arc<Fills>,
    started: bool,
}

pub(super) enum Claim {
    Lead(Lead),
    Follow(Arc<Fill>),
}

impl Fills {
    /// Leads the fill of `digest`, or follows the one in flight.
    pub(super) fn claim(
        self: &Arc<Self>,
        digest: &Digest,
        repo: &RepoName,
        cred: CredKey,
    ) -> Claim {
        let mut map = self.map.lock().expect("fills poisoned");
        if let Some(f) = map.get(digest) {
            return Claim::Follow(f.clone());
        }
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            leader: (repo.clone(), cred),
            state: rx,
            opened: Mutex::new(None),
            handover: Handover::default(),
        });
        map.insert(digest.clone(), fill.clone());
        Claim::Lead(Lead {
            fill,
            tx,
            fills: self.clone(),
            started: false,
        })
    }

    fn remove(&self, digest: &Digest) {
        self.map.lock().expect("fills poisoned").remove(digest);
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if !self.started {
            let _ = self.tx.send(FillState::Abandoned);
            self.fills.remove(&self.fill.digest);
        }
    }
}

/// A body being filled into the cache, as the client reads it.
pub(crate) struct Streaming {
    body: FileBody,
    len: Option<u64>,
    content_type: Option<String>,
}

impl Streaming {
    /// The body, its declared length and the upstream's content type.
    pub(crate) fn into_parts(self) -> (FileBody, Option<u64>, Option<String>) {
        (self.body, self.len, self.content_type)
    }
}

/// The miss handler: the leader's duty to fill. Dropping it without
/// [`Miss::fill`] abandons the fill, and followers ask for themselves.
pub(crate) struct Miss {
    lead: Lead,
    cache: Arc<ContentCache>,
    repo: RepoName,
}

impl Miss {
    pub(super) fn new(lead: Lead, cache: Arc<ContentCache>, repo: RepoName) -> Miss {
        Miss { lead, cache, repo }
    }

    /// The upstream answered 200 with the content: the repository holds it;
    /// stream the body into the cache in a task of its own, and return what
    /// the leader's client reads.
    ///
    /// When the cache cannot take the content (no temp file: a full or
    /// broken disk), the response comes back unread in [`Unfilled`], so the
    /// caller can stream it to its client without caching: a cache in
    /// trouble costs the hit rate, never the pull.
    pub(crate) async fn fill<B>(
        mut self,
        resp: http::Response<B>,
        body_timeout: Duration,
    ) -> Result<Streaming, Unfilled<B>>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let digest = self.lead.fill.digest.clone();
        let text = |h: header::HeaderName| {
            let v = resp.headers().get(h)?.to_str().ok()?;
            Some(v.to_string())
        };
        let len = text(header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let content_type = text(header::CONTENT_TYPE);
        self.cache.mark_present(&self.repo, &digest).await;
        let (cache, d) = (self.cache.clone(), digest.clone());
        let opened = ContentCache::blocking(move || {
            let reservation = cache.reserve(len)?;
            let w = cache.store.writer(&d)?;
            let f = File::open(w.path())?;
            Ok::<_, CacheError>((w, f, reservation))
        })
        .await
        .and_then(|r| r);
        let (writer, file, reservation) = match opened {
            Ok(wf) => wf,
            Err(error) => {
                // Dropping `self` without starting releases the followers.
                if matches!(error, CacheError::NoSpace(_)) {
                    self.cache.fill_skipped();
                } else {
                    self.cache.fill_failed();
                }
                return Err(Unfilled {
                    error,
                    response: resp,
                });
            }
        };
        let opened = Opened {
            file: Arc::new(file),
            len,
            content_type,
        };
        *self.lead.fill.opened.lock().expect("fill poisoned") = Some(opened.clone());
        self.lead.started = true;
        let _ = self.lead.tx.send(FillState::Writing { written: 0 });
        let Some(streaming) = self.lead.fill.streaming(opened.clone()) else {
            // Unreachable: only the job begins a hand-over, and it has not
            // started.
            return Err(Unfilled {
                error: CacheError::Upstream("fill handed over before it began".into()),
                response: resp,
            });
        };
        let job = Job {
            lead: self.lead,
            cache: self.cache,
            len,
            content_type: opened.content_type,
            body_timeout,
            _reservation: reservation,
        };
        tokio::spawn(job.run(writer, resp.into_body()));
        Ok(streaming)
    }
}

/// The upstream's answer, unread, that the cache could not take.
pub(crate) struct Unfilled<B> {
    error: CacheError,
    response: http::Response<B>,
}

impl<B> Unfilled<B> {
    pub(crate) fn into_parts(self) -> (CacheError, http::Response<B>) {
        (self.error, self.response)
    }
}

/// A fill in progress that another client leads.
pub(crate) struct Follow {
    fill: Arc<Fill>,
}

/// What a follower gets once the leader has the upstream's answer.
pub(crate) enum Followed {
    /// The leader got no content: ask the cache again (and lead, maybe).
    Abandoned,
    /// The fetch failed; nothing was cached.
    Failed(String),
    Streaming(Streaming),
}

impl Follow {
    pub(super) fn new(fill: Arc<Fill>) -> Follow {
        Follow { fill }
    }

    /// Whether the leader asked with these credentials on this repository
    /// (its 200 then answers for this client too).
    pub(crate) fn led_by(&self, repo: &RepoName, cred: CredKey) -> bool {
        self.fill.leader.0 == *repo && self.fill.leader.1 == cred
    }

    pub(crate) async fn wait(self) -> Followed {
        match self.fill.settled().await {
            FillState::Connecting | FillState::Abandoned | FillState::Spilling { .. } => {
                Followed::Abandoned
            }
            FillState::Failed(why) => Followed::Failed(why),
            FillState::Writing { .. } | FillState::Done { .. } => {
                match self.fill.opened().and_then(|o| self.fill.streaming(o)) {
                    Some(streaming) => Followed::Streaming(streaming),
                    None => Followed::Abandoned,
                }
            }
        }
    }
}

/// Bytes written to the temp file in one blocking-pool hop, at most.
const BATCH: usize = 512 * 1024;

/// The next data frame's bytes; `None` at the end of the body.
async fn next_data<B>(body: &mut B) -> Result<Option<Bytes>, CacheError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CacheError::Upstream(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// The task that writes one fill.
struct Job {
    lead: Lead,
    cache: Arc<ContentCache>,
    len: Option<u64>,
    content_type: Option<String>,
    body_timeout: Duration,
    /// Held until the fill ends (committed or not).
    _reservation: Reservation,
}

impl Job {
    async fn run<B>(self, writer: Writer, mut body: B)
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let digest = self.lead.fill.digest.clone();
        let mut slot = Some(writer);
        let pumped = self.pump(&mut slot, &mut body).await;
        let result = match (pumped, slot.take()) {
            (Err(Stop::Unwritable { error, rest }), Some(writer)) => {
                return self.hand_over(writer, error, rest, body).await;
            }
            (Ok(()), Some(writer)) => {
                let (cache, d, ct) = (
                    self.cache.clone(),
                    digest.clone(),
                    self.content_type.clone(),
                );
                ContentCache::blocking(move || {
                    let n = writer.commit()?;
                    cache.filled(&d, n, ct.as_deref());
                    Ok(n)
                })
                .await
                .and_then(|r| r)
            }
            (pumped, writer) => {
                // Dropping a writer deletes its temp file: blocking I/O.
                if let Some(w) = writer {
                    let _ = ContentCache::blocking(move || drop(w)).await;
                }
                match pumped {
                    Err(stop) => Err(stop.into_error()),
                    Ok(()) => Err(CacheError::Upstream("the writer was lost".into())),
                }
            }
        };
        // Out of the map first: a request arriving from now on starts a
        // fresh fetch (or hits the committed file) instead of joining this
        // one's end.
        self.lead.fills.remove(&digest);
        match result {
            Ok(n) => {
                self.lead.tx.send_replace(FillState::Done { len: n });
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cache fill failed; nothing cached");
                self.cache.fill_failed();
                self.lead.tx.send_replace(FillState::Failed(e.to_string()));
            }
        }
    }

    /// The temp file cannot be written: abandon it and relay the rest of
    /// the upstream's body to the readers (`spill.rs`).
    async fn hand_over<B>(self, writer: Writer, error: CacheError, rest: Vec<Bytes>, mut body: B)
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let digest = self.lead.fill.digest.clone();
        self.lead.fills.remove(&digest);
        let mut readers = self.lead.fill.handover.begin();
        // Deleting the temp file is blocking I/O.
        let (mut hasher, at) = match ContentCache::blocking(move || writer.abandon()).await {
            Ok(abandoned) => abandoned,
            Err(e) => {
                self.cache.fill_failed();
                self.lead.tx.send_replace(FillState::Failed(e.to_string()));
                return;
            }
        };
        tracing::warn!(%digest, %error, at, "cannot write a cache fill; its clients keep streaming from the upstream, and nothing is cached");
        self.cache.fill_failed();
        self.lead.tx.send_replace(FillState::Spilling { at });
        let outcome = self
            .relay(&mut readers, &mut hasher, at, rest, &mut body)
            .await;
        if let Err(why) = &outcome {
            tracing::warn!(%digest, why, "relaying a handed-over fill failed");
        }
        readers.finish(outcome, self.body_timeout).await;
    }

    /// Relays `rest`, then the body, to the readers, hashing as it goes;
    /// `Ok` when the whole matched the digest and the declared length.
    async fn relay<B>(
        &self,
        readers: &mut Readers,
        hasher: &mut Sha256,
        at: u64,
        rest: Vec<Bytes>,
        body: &mut B,
    ) -> Result<(), String>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let mut total = at;
        let mut pending = std::collections::VecDeque::from(rest);
        loop {
            let data = match pending.pop_front() {
                Some(d) => d,
                None => match tokio::time::timeout(self.body_timeout, next_data(body)).await {
                    Err(_) => {
                        return Err("the upstream body stalled (upstream.body_timeout)".into())
                    }
                    Ok(Err(e)) => return Err(e.to_string()),
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(d))) => d,
                },
            };
            total += data.len() as u64;
            if self.len.is_some_and(|l| total > l) {
                return Err("the upstream sent more than its Content-Length".into());
            }
            hasher.update(&data);
            if !readers.send(&data, self.body_timeout).await {
                return Err("every reader hung up".into());
            }
        }
        if self.len.is_some_and(|l| total != l) {
            return Err(format!("the upstream body ended after {total} bytes"));
        }
        let actual = hex::encode(std::mem::take(hasher).finalize());
        if actual != self.lead.fill.digest.encoded() {
            return Err(format!(
                "content does not match its digest (got sha256:{actual})"
            ));
        }
        Ok(())
    }

    /// Copies the body into the writer, publishing progress to the readers.
    /// Frames already arrived are written together (up to [`BATCH`] bytes):
    /// one blocking-pool hop, and one wake-up of the readers, per batch.
    async fn pump<B>(&self, slot: &mut Option<Writer>, body: &mut B) -> Result<(), Stop>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let mut written = 0u64;
        let mut ended = false;
        while !ended {
            let first = match tokio::time::timeout(self.body_timeout, next_data(body)).await {
                Err(_) => {
                    return Err(Stop::Failed(CacheError::Upstream(format!(
                        "no byte for {} (upstream.body_timeout)",
                        humantime::format_duration(self.body_timeout)
                    ))))
                }
                Ok(r) => r?,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            let mut size = batch[0].len();
            while size < BATCH {
                match next_data(body).now_or_never() {
                    None => break,
                    Some(Ok(Some(data))) => {
                        size += data.len();
                        batch.push(data);
                    }
                    Some(Ok(None)) => ended = true,
                    Some(Err(e)) => return Err(Stop::Failed(e)),
                }
                if ended {
                    break;
                }
            }
            written += size as u64;
            if let Some(l) = self.len.filter(|l| written > *l) {
                return Err(Stop::Failed(CacheError::Upstream(format!(
                    "upstream sent more than its Content-Length of {l}"
                ))));
            }
            let mut w = slot.take().expect("the writer is back after every write");
            let (w, wrote, batch) = ContentCache::blocking(move || {
                let r = batch.iter().try_for_each(|data| w.write(data));
                (w, r, batch)
            })
            .await?;
            let held = w.written();
            *slot = Some(w);
            if let Err(error) = wrote {
                // What the file does not hold of this batch goes to the
                // readers another way.
                let skip = (held - (written - size as u64)) as usize;
                return Err(Stop::Unwritable {
                    error,
                    rest: after(batch, skip),
                });
            }
            self.lead.tx.send_replace(FillState::Writing { written });
        }
        match self.len {
            Some(l) if written != l => Err(Stop::Failed(CacheError::Upstream(format!(
                "upstream body ended after {written} of {l} bytes"
            )))),
            _ => Ok(()),
        }
    }
}

/// Why a fill's pump stopped before the end of the body.
enum Stop {
    Failed(CacheError),
    /// The temp file could not be written; `rest` are the bytes already
    /// read from the upstream that it does not hold.
    Unwritable {
        error: CacheError,
        rest: Vec<Bytes>,
    },
}

impl Stop {
    fn into_error(self) -> CacheError {
        match self {
            Stop::Failed(e) | Stop::Unwritable { error: e, .. } => e,
        }
    }
}

impl From<CacheError> for Stop {
    fn from(e: CacheError) -> Self {
        Stop::Failed(e)
    }
}

/// The chunks of `batch` from byte `skip` on.
fn after(batch: Vec<Bytes>, mut skip: usize) -> Vec<Bytes> {
    let mut rest = Vec::with_capacity(batch.len());
    for mut chunk in batch {
        if skip >= chunk.len() {
            skip -= chunk.len();
            continue;
        }
        rest.push(chunk.split_off(skip));
        skip = 0;
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_of_a_batch_starts_where_the_file_stopped() {
        let batch = || {
            vec![
                Bytes::from_static(b"abc"),
                Bytes::from_static(b"de"),
                Bytes::from_static(b"fgh"),
            ]
        };
        let joined = |v: Vec<Bytes>| v.concat();
        assert_eq!(joined(after(batch(), 0)), b"abcdefgh");
        assert_eq!(joined(after(batch(), 3)), b"defgh");
        assert_eq!(joined(after(batch(), 4)), b"efgh");
        assert_eq!(joined(after(batch(), 8)), b"");
    }
}
