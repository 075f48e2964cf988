//! Write-through of blob uploads: the bytes a client pushes through graft
//! are teed into a temp file as they stream to the upstream, and become a
//! cache entry when the upstream accepts the upload and the bytes hash to
//! its digest. A CI job that pushes then pulls never goes upstream for them.
//!
//! Only uploads whose every byte graft saw, in order, are kept: a session
//! started elsewhere, a chunk out of order, or any upstream refusal drops
//! the tee (the upload itself is unaffected). The file is written by a task
//! of the session's own, on the blocking pool, fed through a small bounded
//! channel: the request body waits for room in it, so a slow disk slows
//! the upload rather than filling memory. Sessions are capped in number
//! (`cache.max_upload_sessions`, the oldest tee dropped first) and in age
//! (`cache.upload_session_ttl`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};

use super::{store::Writer, ContentCache, Store};
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::oci::Digest;

/// Chunks in flight between a request body and the session's writer.
const QUEUE: usize = 4;

enum Msg {
    Chunk(Bytes),
    /// Hands the writer back (the upload completed).
    Finish(oneshot::Sender<Option<Writer>>),
}

/// One upload being teed.
pub(crate) struct Session {
    tx: mpsc::Sender<Msg>,
    /// Bytes handed to the writer so far: where the next chunk must start.
    offset: AtomicU64,
    /// Set when the tee was given up; the writer task then drops the file.
    gave_up: Arc<AtomicBool>,
    /// Unix seconds, for `cache.upload_session_ttl`.
    started: u64,
}

impl Session {
    pub(super) fn new(store: &Arc<Store>, clock: &Clock) -> Arc<Session> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let gave_up = Arc::new(AtomicBool::new(false));
        tokio::spawn(write(store.clone(), rx, gave_up.clone()));
        Arc::new(Session {
            tx,
            offset: AtomicU64::new(0),
            gave_up,
            started: clock.now_secs(),
        })
    }

    /// Bytes teed so far, or `None` when the tee was given up.
    pub(crate) fn offset(&self) -> Option<u64> {
        (!self.gave_up.load(Ordering::SeqCst)).then(|| self.offset.load(Ordering::SeqCst))
    }

    pub(crate) fn give_up(&self) {
        self.gave_up.store(true, Ordering::SeqCst);
    }

    /// The upstream answered the request that completes the upload:
    /// commit what was teed when it accepted it (201) as `digest`.
    pub(crate) async fn finish(&self, cache: &Arc<ContentCache>, digest: &Digest, accepted: bool) {
        if !accepted {
            self.give_up();
        }
        let (reply, writer) = oneshot::channel();
        if self.tx.send(Msg::Finish(reply)).await.is_err() {
            return;
        }
        if let Ok(Some(w)) = writer.await {
            cache.commit_upload(w, digest).await;
        }
    }
}

/// The session's writer task: creates the temp file, writes chunks in
/// order, and hands the writer back on `Finish`. A writer it drops (given
/// up, failed, abandoned) deletes its temp file, on the blocking pool.
async fn write(store: Arc<Store>, mut rx: mpsc::Receiver<Msg>, gave_up: Arc<AtomicBool>) {
    let created = ContentCache::blocking(move || store.upload_writer()).await;
    let mut writer = match created {
        Ok(Ok(w)) => Some(w),
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(error = %e, "cannot tee an upload into the cache");
            gave_up.store(true, Ordering::SeqCst);
            None
        }
    };
    while let Some(msg) = rx.recv().await {
        if gave_up.load(Ordering::SeqCst) {
            discard(writer.take()).await;
        }
        match msg {
            Msg::Chunk(data) => {
                let Some(w) = writer.take() else { continue };
                let mut w = w;
                let wrote = ContentCache::blocking(move || {
                    let r = w.write(&data);
                    (w, r)
                })
                .await;
                match wrote {
                    Ok((w, Ok(()))) => writer = Some(w),
                    Ok((w, Err(e))) => {
                        tracing::warn!(error = %e, "upload tee failed; not caching this upload");
                        gave_up.store(true, Ordering::SeqCst);
                        discard(Some(w)).await;
                    }
                    Err(_) => gave_up.store(true, Ordering::SeqCst),
                }
            }
            Msg::Finish(reply) => {
                if let Err(Some(w)) = reply.send(writer.take()) {
                    discard(Some(w)).await;
                }
                return;
            }
        }
    }
    discard(writer).await;
}

async fn discard(writer: Option<Writer>) {
    if let Some(w) = writer {
        let _ = ContentCache::blocking(move || drop(w)).await;
    }
}

/// The chunked uploads being teed, by upload id.
#[derive(Default)]
pub(super) struct Uploads {
    map: Mutex<HashMap<String, (u64, Arc<Session>)>>,
    /// Orders sessions by age when the cap drops the oldest.
    seq: AtomicU64,
    /// Sessions dropped for the cap or their age.
    dropped: AtomicU64,
}

impl Uploads {
    pub(super) fn begin(&self, store: &Arc<Store>, clock: &Clock, cfg: &CacheConfig, id: &str) {
        if cfg.max_upload_sessions == 0 {
            return;
        }
        let session = Session::new(store, clock);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.lock().expect("uploads poisoned");
        let before = map.len();
        map.retain(|_, (_, s)| {
            let keep = clock.within(s.started, cfg.upload_session_ttl);
            if !keep {
                s.give_up();
            }
            keep
        });
        while map.len() >= cfg.max_upload_sessions {
            let oldest = map
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(k, _)| k.clone());
            let Some((_, s)) = oldest.and_then(|k| map.remove(&k)) else {
                break;
            };
            s.give_up();
        }
        let dropped = before - map.len();
        map.insert(id.to_string(), (seq, session));
        drop(map);
        if dropped > 0 {
            self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::debug!(
                dropped,
                "upload tees dropped (cache.max_upload_sessions, cache.upload_session_ttl)"
            );
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Session>> {
        let map = self.map.lock().expect("uploads poisoned");
        map.get(id).map(|(_, s)| s.clone())
    }

    pub(super) fn end(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.map.lock().expect("uploads poisoned");
        map.remove(id).map(|(_, s)| s)
    }

    pub(super) fn len(&self) -> usize {
        self.map.lock().expect("uploads poisoned").len()
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

type Reserve = Pin<
    Box<dyn Future<Output = Result<mpsc::OwnedPermit<Msg>, mpsc::error::SendError<()>>> + Send>,
>;

/// A request body that copies its bytes into an upload session. It reads
/// the next chunk only once the session's queue has room for it.
pub(crate) struct Tee<B> {
    inner: B,
    session: Arc<Session>,
    permit: Option<mpsc::OwnedPermit<Msg>>,
    reserving: Option<Reserve>,
}

impl<B> Tee<B> {
    pub(crate) fn new(inner: B, session: Arc<Session>) -> Tee<B> {
        Tee {
            inner,
            session,
            permit: None,
            reserving: None,
        }
    }

    /// Room for the next chunk; `Pending` while the writer is behind.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.is_some() || self.session.offset().is_none() {
            return Poll::Ready(());
        }
        let tx = self.session.tx.clone();
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
                if let (Some(data), Some(permit)) = (frame.data_ref(), this.permit.take()) {
                    if this.session.offset().is_some() {
                        this.session
                            .offset
                            .fetch_add(data.len() as u64, Ordering::SeqCst);
                        permit.send(Msg::Chunk(data.clone()));
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
    use std::time::Duration;

    #[tokio::test]
    async fn sessions_past_the_cap_or_their_age_lose_their_tee() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let clock = Clock::skewable();
        let cfg = CacheConfig {
            max_upload_sessions: 2,
            upload_session_ttl: Duration::from_secs(3600),
            ..crate::Config::default().cache
        };
        let uploads = Uploads::default();
        uploads.begin(&store, &clock, &cfg, "a");
        let a = uploads.get("a").expect("session a");
        uploads.begin(&store, &clock, &cfg, "b");
        uploads.begin(&store, &clock, &cfg, "c");
        assert!(uploads.get("a").is_none(), "the oldest session stays");
        assert_eq!(a.offset(), None, "a dropped session still tees");
        assert!(uploads.get("b").is_some() && uploads.get("c").is_some());
        assert_eq!((uploads.len(), uploads.dropped()), (2, 1));

        clock.advance(Duration::from_secs(3601));
        uploads.begin(&store, &clock, &cfg, "d");
        assert!(uploads.get("b").is_none() && uploads.get("c").is_none());
        assert_eq!((uploads.len(), uploads.dropped()), (1, 3));
    }
}
