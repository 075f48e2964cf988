//! Write-through of blob uploads: the bytes a client pushes through graft
//! are teed into a temp file as they stream to the upstream, and become a
//! cache entry when the upstream accepts the upload and the bytes hash to
//! its digest. A CI job that pushes then pulls never goes upstream for them.
//!
//! Only uploads whose every byte graft saw, in order, are kept: a session
//! started elsewhere, a chunk out of order, or any upstream refusal drops
//! the tee (the upload itself is unaffected).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::{Store, Writer};

/// Sessions older than this are dropped (and their temp files removed).
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// One upload being teed.
pub struct Session {
    /// `None` once the tee was given up.
    writer: Option<Writer>,
    started: Instant,
}

pub type SharedSession = Arc<Mutex<Session>>;

#[derive(Default)]
pub struct Uploads {
    map: Mutex<HashMap<String, SharedSession>>,
}

impl Session {
    pub fn new(store: &Arc<Store>) -> SharedSession {
        let writer = match store.upload_writer() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tee an upload into the cache");
                None
            }
        };
        Arc::new(Mutex::new(Session {
            writer,
            started: Instant::now(),
        }))
    }

    /// Bytes teed so far, or `None` when the tee was given up.
    pub fn offset(&self) -> Option<u64> {
        self.writer.as_ref().map(Writer::written)
    }

    pub fn give_up(&mut self) {
        self.writer = None;
    }

    pub fn take_writer(&mut self) -> Option<Writer> {
        self.writer.take()
    }
}

impl Uploads {
    pub fn begin(&self, store: &Arc<Store>, id: &str) {
        let mut map = self.map.lock().expect("uploads poisoned");
        map.retain(|_, s| {
            s.lock()
                .map(|s| s.started.elapsed() < ABANDONED_AFTER)
                .unwrap_or(false)
        });
        map.insert(id.to_string(), Session::new(store));
    }

    pub fn get(&self, id: &str) -> Option<SharedSession> {
        self.map.lock().expect("uploads poisoned").get(id).cloned()
    }

    pub fn end(&self, id: &str) -> Option<SharedSession> {
        self.map.lock().expect("uploads poisoned").remove(id)
    }
}

/// A request body that copies its bytes into an upload session.
pub struct Tee<B> {
    inner: B,
    session: SharedSession,
}

impl<B> Tee<B> {
    pub fn new(inner: B, session: SharedSession) -> Tee<B> {
        Tee { inner, session }
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let mut s = self.session.lock().expect("upload session poisoned");
                    if let Some(w) = s.writer.as_mut() {
                        if let Err(e) = w.write(data) {
                            tracing::warn!(error = %e, "upload tee failed; not caching this upload");
                            s.give_up();
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.session
                    .lock()
                    .expect("upload session poisoned")
                    .give_up();
            }
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
