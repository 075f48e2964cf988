//! Upload sessions: what graft knows of each blob upload passing through,
//! and the write-through of its bytes into the cache.
//!
//! graft remembers, per upload it saw start, who started it, the offset the
//! upstream has reached, and the `Location` (with distribution's signed
//! `_state`) it last handed out, so that it can answer the spec's chunk
//! rules itself (see `proxy::upload`). The bytes are teed into a temp file
//! as they stream to the upstream, and become a cache entry when the
//! upstream accepts the upload and the bytes hash to its digest. Only
//! uploads whose every byte graft saw, in order, are kept: anything else
//! drops the tee (the upload itself is unaffected).
//!
//! Abandoned uploads cost nothing lasting: the temp file is created at the
//! first byte and closed at the end of every request (no descriptor is held
//! between chunks), and a session idle past `cache.upload_idle_timeout` (or
//! older than `cache.upload_session_ttl`) is forgotten and its file
//! deleted by the cache's upkeep. Sessions are capped per client
//! (`cache.max_upload_sessions_per_client`: its own least recently active
//! session is forgotten first) and in total (`cache.max_upload_sessions`:
//! the least recently active of all). A forgotten session's upload passes
//! through untouched; graft never refuses an upload the upstream would take.
//!
//! Each request's bytes are written by a task of its own on the blocking
//! pool, fed through a small bounded channel: the request body waits for
//! room in it, so a slow disk slows the upload rather than filling memory.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};

use super::{store::Writer, ContentCache, Store};
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::credentials::CredKey;
use crate::oci::Digest;

/// Chunks in flight between a request body and its writer task.
const QUEUE: usize = 4;

/// `_state` values remembered per session: a client may retry with the
/// `Location` of a request or two ago.
const STATES: usize = 8;

/// Who started an upload: its credentials, or its address when it sent
/// none (anonymous clients share one credential key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    Credentials(CredKey),
    Anonymous(IpAddr),
}

enum Msg {
    Chunk(Bytes),
    /// The request ended; `true`: the upstream took its bytes.
    End(bool, oneshot::Sender<()>),
}

/// One upload graft saw start.
pub(crate) struct Session {
    owner: Owner,
    store: Arc<Store>,
    state: Mutex<State>,
    /// Set when the tee was given up; the temp file is then dropped.
    gave_up: AtomicBool,
    /// A request on this session is in flight (requests on one session are
    /// sequential by the spec; a concurrent one makes graft step aside).
    busy: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Bytes the upstream holds; `None` once graft lost track.
    offset: Option<u64>,
    /// The `Location` last handed to the client.
    location: Option<HeaderValue>,
    /// `_state` values handed out, newest last.
    states: VecDeque<String>,
    /// The temp file (closed between requests), from the first byte on.
    writer: Option<Writer>,
    /// Unix seconds of the last request.
    active: u64,
    /// Unix seconds of the start, for `cache.upload_session_ttl`.
    started: u64,
}

impl Session {
    pub(super) fn new(store: &Arc<Store>, clock: &Clock, owner: Owner) -> Arc<Session> {
        let now = clock.now_secs();
        Arc::new(Session {
            owner,
            store: store.clone(),
            state: Mutex::new(State {
                offset: Some(0),
                active: now,
                started: now,
                ..State::default()
            }),
            gave_up: AtomicBool::new(false),
            busy: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Bytes the upstream holds, when graft knows.
    pub(crate) fn offset(&self) -> Option<u64> {
        self.lock().offset
    }

    /// The `Location` last handed out for this session.
    pub(crate) fn location(&self) -> Option<HeaderValue> {
        self.lock().location.clone()
    }

    /// The `_state` graft handed out last.
    pub(crate) fn latest_state(&self) -> Option<String> {
        self.lock().states.back().cloned()
    }

    /// Whether `state` is a `_state` graft handed out for this session.
    pub(crate) fn issued(&self, state: &str) -> bool {
        self.lock().states.iter().any(|s| s == state)
    }

    /// The upstream answered a request on the session: where it stands now
    /// (`offset`, `None`: unknown) and the `Location` it gave.
    pub(crate) fn answered(&self, offset: Option<u64>, location: Option<HeaderValue>) {
        let mut st = self.lock();
        st.offset = offset;
        if let Some(state) = location.as_ref().and_then(state_of) {
            if !st.states.contains(&state) {
                st.states.push_back(state);
                if st.states.len() > STATES {
                    st.states.pop_front();
                }
            }
        }
        if location.is_some() {
            st.location = location;
        }
    }

    /// Claims the session for one request; `None` when another is in
    /// flight. Until the request reports [`Session::answered`], graft does
    /// not know the offset (a request cut midway leaves it unknown).
    pub(crate) fn claim(self: &Arc<Self>, clock: &Clock) -> Option<Claimed> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return None;
        }
        self.lock().active = clock.now_secs();
        Some(Claimed(self.clone()))
    }

    /// Graft will forward bytes the upstream may take in part.
    pub(crate) fn unsure(&self) {
        self.lock().offset = None;
    }

    pub(crate) fn give_up(&self) {
        self.gave_up.store(true, Ordering::SeqCst);
    }

    fn teeing(&self) -> bool {
        !self.gave_up.load(Ordering::SeqCst)
    }

    /// Tees one request's body into the session; `Teed::end` reports the
    /// upstream's answer to it.
    pub(crate) fn tee<B>(self: &Arc<Self>, body: B) -> (Tee<B>, Teed) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write(self.clone(), rx));
        let seen = Arc::new(AtomicU64::new(0));
        let tee = Tee {
            inner: body,
            session: self.clone(),
            tx: tx.clone(),
            seen: seen.clone(),
            permit: None,
            reserving: None,
        };
        let teed = Teed {
            tx,
            task,
            seen,
            session: self.clone(),
        };
        (tee, teed)
    }

    /// The upload completed with `digest`: commits what was teed when the
    /// upstream accepted it.
    pub(crate) async fn finish(&self, cache: &Arc<ContentCache>, digest: &Digest, accepted: bool) {
        let writer = self.lock().writer.take();
        match writer {
            Some(w) if accepted && self.teeing() => cache.commit_upload(w, digest).await,
            w => discard(w).await,
        }
    }

    /// Drops the tee and its temp file (the upload ended or was forgotten).
    pub(crate) async fn discard(&self) {
        self.give_up();
        let w = self.lock().writer.take();
        discard(w).await;
    }
}

/// A session claimed by one request; released when dropped.
pub(crate) struct Claimed(Arc<Session>);

impl std::ops::Deref for Claimed {
    type Target = Arc<Session>;
    fn deref(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

/// The `_state` query parameter of a `Location`.
fn state_of(location: &HeaderValue) -> Option<String> {
    let query = location.to_str().ok()?.split_once('?')?.1;
    crate::oci::query::pairs(query)
        .find(|(k, _)| *k == "_state")
        .map(|(_, v)| v.into_owned())
}

/// One request's part of the tee, kept by the handler.
pub(crate) struct Teed {
    tx: mpsc::Sender<Msg>,
    task: tokio::task::JoinHandle<()>,
    seen: Arc<AtomicU64>,
    session: Arc<Session>,
}

impl Teed {
    /// Body bytes that passed so far (teed or not).
    pub(crate) fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// The upstream answered: `took` says whether it accepted the bytes.
    /// Returns once they are on disk and the file is closed again.
    pub(crate) async fn end(self, took: bool) {
        if !took {
            self.session.give_up();
        }
        let (reply, done) = oneshot::channel();
        if self.tx.send(Msg::End(took, reply)).await.is_ok() {
            let _ = done.await;
        }
        let _ = self.task.await;
    }
}

/// A request's writer task: takes the session's temp file (creating it at
/// the first byte), appends the request's chunks, and on `End` closes it
/// and gives it back. A request that ends otherwise (cut, refused) drops
/// the tee; a dropped writer deletes its file, on the blocking pool.
async fn write(session: Arc<Session>, mut rx: mpsc::Receiver<Msg>) {
    let mut writer = session.lock().writer.take();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Chunk(data) => {
                if !session.teeing() {
                    discard(writer.take()).await;
                    continue;
                }
                writer = append(&session, writer.take(), data).await;
            }
            Msg::End(took, reply) => {
                let keep = took && session.teeing();
                match writer.take() {
                    Some(mut w) if keep => {
                        let w = ContentCache::blocking(move || {
                            w.close();
                            w
                        })
                        .await
                        .ok();
                        session.lock().writer = w;
                        // Forgotten meanwhile: the file goes now, on this
                        // pool, not when the last handle drops.
                        if !session.teeing() {
                            let w = session.lock().writer.take();
                            discard(w).await;
                        }
                    }
                    w => discard(w).await,
                }
                let _ = reply.send(());
                return;
            }
        }
    }
    session.give_up();
    discard(writer).await;
}

/// Writes one chunk on the blocking pool; `None` (and the tee given up)
/// when it cannot.
async fn append(session: &Session, writer: Option<Writer>, data: Bytes) -> Option<Writer> {
    let store = session.store.clone();
    let wrote = ContentCache::blocking(move || {
        let mut w = match writer {
            Some(w) => w,
            None => match store.upload_writer() {
                Ok(w) => w,
                Err(e) => return (None, Err(e)),
            },
        };
        let r = w.write(&data);
        (Some(w), r)
    })
    .await;
    match wrote {
        Ok((w, Ok(()))) => w,
        Ok((w, Err(e))) => {
            tracing::warn!(error = %e, "upload tee failed; not caching this upload");
            session.give_up();
            discard(w).await;
            None
        }
        Err(_) => {
            session.give_up();
            None
        }
    }
}

async fn discard(writer: Option<Writer>) {
    if let Some(w) = writer {
        let _ = ContentCache::blocking(move || drop(w)).await;
    }
}

/// The upload sessions graft knows, by upload id.
#[derive(Default)]
pub(super) struct Uploads {
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// Sessions forgotten for a cap, their age or idleness.
    dropped: AtomicU64,
}

impl Uploads {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers upload `id`, started by `owner`. Returns the sessions it
    /// forgot to make room; the caller drops them off the async workers
    /// (a dropped session deletes its temp file).
    pub(super) fn begin(
        &self,
        store: &Arc<Store>,
        clock: &Clock,
        cfg: &CacheConfig,
        id: &str,
        owner: Owner,
    ) -> (Option<Arc<Session>>, Vec<Arc<Session>>) {
        if cfg.max_upload_sessions == 0 {
            return (None, Vec::new());
        }
        let session = Session::new(store, clock, owner.clone());
        let mut map = self.map();
        let mut gone = expired(&mut map, clock, cfg);
        let per_client = cfg.max_upload_sessions_per_client.max(1);
        while map.values().filter(|s| s.owner == owner).count() >= per_client {
            let Some(s) = forget_idlest(&mut map, |s| s.owner == owner) else {
                break;
            };
            gone.push(s);
        }
        while map.len() >= cfg.max_upload_sessions {
            let Some(s) = forget_idlest(&mut map, |_| true) else {
                break;
            };
            gone.push(s);
        }
        map.insert(id.to_string(), session.clone());
        drop(map);
        self.count_dropped(&gone);
        (Some(session), gone)
    }

    /// Forgets sessions idle or old past their limits (the cache's upkeep
    /// calls this on the blocking pool, where dropping them may delete files).
    pub(super) fn sweep(&self, clock: &Clock, cfg: &CacheConfig) -> Vec<Arc<Session>> {
        let gone = expired(&mut self.map(), clock, cfg);
        self.count_dropped(&gone);
        gone
    }

    fn count_dropped(&self, gone: &[Arc<Session>]) {
        if !gone.is_empty() {
            self.dropped.fetch_add(gone.len() as u64, Ordering::Relaxed);
            tracing::debug!(
                dropped = gone.len(),
                "upload sessions forgotten (caps, cache.upload_idle_timeout, cache.upload_session_ttl)"
            );
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub(super) fn end(&self, id: &str) -> Option<Arc<Session>> {
        self.map().remove(id)
    }

    pub(super) fn len(&self) -> usize {
        self.map().len()
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Takes out the sessions idle past `cache.upload_idle_timeout` or older
/// than `cache.upload_session_ttl` (a request in flight is not idle).
fn expired(
    map: &mut HashMap<String, Arc<Session>>,
    clock: &Clock,
    cfg: &CacheConfig,
) -> Vec<Arc<Session>> {
    let mut gone = Vec::new();
    map.retain(|_, s| {
        let keep = s.busy.load(Ordering::SeqCst) || {
            let st = s.lock();
            clock.within(st.active, cfg.upload_idle_timeout)
                && clock.within(st.started, cfg.upload_session_ttl)
        };
        if !keep {
            s.give_up();
            gone.push(s.clone());
        }
        keep
    });
    gone
}

/// Takes out the least recently active session among those `which` picks
/// (never one with a request in flight: its upload is clearly alive).
fn forget_idlest(
    map: &mut HashMap<String, Arc<Session>>,
    which: impl Fn(&Session) -> bool,
) -> Option<Arc<Session>> {
    let key = map
        .iter()
        .filter(|(_, s)| which(s) && !s.busy.load(Ordering::SeqCst))
        .min_by_key(|(_, s)| s.lock().active)
        .map(|(k, _)| k.clone())?;
    let s = map.remove(&key)?;
    s.give_up();
    Some(s)
}

type Reserve = Pin<
    Box<dyn Future<Output = Result<mpsc::OwnedPermit<Msg>, mpsc::error::SendError<()>>> + Send>,
>;

/// A request body that counts its bytes and copies them into an upload
/// session. It reads the next chunk only once the writer has room for it.
pub(crate) struct Tee<B> {
    inner: B,
    session: Arc<Session>,
    tx: mpsc::Sender<Msg>,
    seen: Arc<AtomicU64>,
    permit: Option<mpsc::OwnedPermit<Msg>>,
    reserving: Option<Reserve>,
}

impl<B> Tee<B> {
    /// Room for the next chunk; `Pending` while the writer is behind.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.is_some() || !self.session.teeing() {
            return Poll::Ready(());
        }
        let tx = self.tx.clone();
        let reserving = self
            .reserving
            .get_or_insert_with(|| Box::pin(tx.reserve_owned()));
        match reserving.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.reserving = None;
                match r {
                    Ok(p) => self.permit = Some(p),
                    Err(_) => self.session.give_up(),
                }
                Poll::Ready(())
            }
        }
    }
}

impl<B> http_body::Body for Tee<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen.fetch_add(data.len() as u64, Ordering::SeqCst);
                    if let Some(permit) = this.permit.take() {
                        if this.session.teeing() {
                            permit.send(Msg::Chunk(data.clone()));
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.session.give_up(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn anonymous(last: u8) -> Owner {
        Owner::Anonymous(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    #[tokio::test]
    async fn sessions_past_a_cap_or_idle_are_forgotten_least_active_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let clock = Clock::skewable();
        let cfg = CacheConfig {
            max_upload_sessions: 3,
            max_upload_sessions_per_client: 2,
            upload_idle_timeout: Duration::from_secs(600),
            upload_session_ttl: Duration::from_secs(3600),
            ..crate::Config::default().cache
        };
        let uploads = Uploads::default();
        let begin = |id: &str, owner: Owner| uploads.begin(&store, &clock, &cfg, id, owner);
        let (a, _) = begin("a", anonymous(1));
        clock.advance(Duration::from_secs(1));
        begin("b", anonymous(1));
        clock.advance(Duration::from_secs(1));
        // a is used again: b is now the client's least active.
        let busy = a.expect("a").claim(&clock).expect("claim");
        let (_, gone) = begin("c", anonymous(1));
        assert_eq!(gone.len(), 1, "the client's own cap");
        assert!(uploads.get("b").is_none() && uploads.get("a").is_some());
        clock.advance(Duration::from_secs(1));
        begin("d", anonymous(2));
        clock.advance(Duration::from_secs(1));
        let (_, gone) = begin("e", anonymous(3));
        assert_eq!(gone.len(), 1, "the total cap");
        assert!(
            uploads.get("c").is_none(),
            "c was the least active idle one"
        );
        assert_eq!((uploads.len(), uploads.dropped()), (3, 2));

        // a is busy (claimed, never released): not idle however long.
        clock.advance(Duration::from_secs(601));
        let gone = uploads.sweep(&clock, &cfg);
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|s| !s.teeing()));
        assert!(uploads.get("a").is_some());
        assert_eq!((uploads.len(), uploads.dropped()), (1, 4));
        drop(busy);
        clock.advance(Duration::from_secs(601));
        assert_eq!(uploads.sweep(&clock, &cfg).len(), 1, "released, then idle");
    }

    #[test]
    fn the_state_of_a_location_is_its_query_parameter() {
        let loc = HeaderValue::from_static("http://h/v2/a/blobs/uploads/u?_state=x%3D&b=1");
        assert_eq!(state_of(&loc).as_deref(), Some("x="));
        let bare = HeaderValue::from_static("/v2/a/blobs/uploads/u");
        assert_eq!(state_of(&bare), None);
    }
}
