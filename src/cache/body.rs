//! Response bodies read from cache files: a committed file (a hit), or the
//! temp file of a fill in progress, following its growth — and, when the
//! fill handed its readers over to the upstream (`spill.rs`), the rest of
//! the content from the fill's channel.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::fill::FillState;
use super::spill::Spill;
use crate::body::BoxError;

/// Large reads keep the per-chunk cost (one blocking-pool hop) small
/// relative to the bytes moved.
const CHUNK: u64 = 512 * 1024;

/// The wait for a fill to move; `false` when its task ended (the sender
/// was dropped) — no more bytes will come.
type Wait = Pin<Box<dyn Future<Output = (watch::Receiver<FillState>, bool)> + Send>>;

/// Streams `[pos, end)` of a file. With a fill attached, bytes are sent only
/// as far as the fill has written them, and the last byte only once the
/// fill is committed — a body that ends cleanly always matches its digest.
pub(crate) struct FileBody {
    file: Arc<File>,
    pos: u64,
    end: u64,
    fill: Option<watch::Receiver<FillState>>,
    /// The fill's task ended: whatever it did not finish never will be.
    orphaned: bool,
    waiting: Option<Wait>,
    reading: Option<JoinHandle<std::io::Result<Bytes>>>,
    /// Where the rest comes from if the fill hands over (see `spill.rs`).
    spill: Option<mpsc::Receiver<Spill>>,
    /// Set once the fill handed over: the file holds this many bytes.
    spilled_at: Option<u64>,
    /// The last chunk from the channel, held until the next (or the end).
    held: Option<Bytes>,
}

impl FileBody {
    /// A committed file, `[start, end)`.
    pub(super) fn committed(file: Arc<File>, start: u64, end: u64) -> FileBody {
        FileBody {
            file,
            pos: start,
            end,
            fill: None,
            orphaned: false,
            waiting: None,
            reading: None,
            spill: None,
            spilled_at: None,
            held: None,
        }
    }

    /// The temp file of a fill; `len` when the upstream declared it.
    pub(super) fn following(
        file: Arc<File>,
        len: Option<u64>,
        fill: watch::Receiver<FillState>,
        spill: mpsc::Receiver<Spill>,
    ) -> FileBody {
        FileBody {
            file,
            pos: 0,
            end: len.unwrap_or(u64::MAX),
            fill: Some(fill),
            orphaned: false,
            waiting: None,
            reading: None,
            spill: Some(spill),
            spilled_at: None,
            held: None,
        }
    }

    /// How far bytes may be sent now, or the fill's failure.
    fn available(&mut self) -> Result<u64, BoxError> {
        if let Some(at) = self.spilled_at {
            return Ok(at);
        }
        let Some(rx) = self.fill.as_mut() else {
            return Ok(self.end);
        };
        // Marks this version seen, so the wait below wakes on any newer one.
        let state = rx.borrow_and_update().clone();
        match state {
            FillState::Done { len } => {
                self.end = self.end.min(len);
                self.fill = None;
                Ok(self.end)
            }
            FillState::Writing { .. } if self.orphaned => {
                Err("cache fill ended without finishing".into())
            }
            FillState::Writing { written } => Ok(written.min(self.end.saturating_sub(1))),
            FillState::Spilling { at } => {
                self.spilled_at = Some(at);
                self.fill = None;
                Ok(at)
            }
            FillState::Failed(why) => Err(format!("cache fill failed: {why}").into()),
            FillState::Connecting | FillState::Abandoned => Err("cache fill was abandoned".into()),
        }
    }
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(reading) = self.reading.as_mut() {
                let res = match Pin::new(reading).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                self.reading = None;
                return match res {
                    Ok(Ok(bytes)) if bytes.is_empty() => {
                        Poll::Ready(Some(Err("cache file shorter than expected".into())))
                    }
                    Ok(Ok(bytes)) => {
                        self.pos += bytes.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(bytes))))
                    }
                    Ok(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                    Err(e) => Poll::Ready(Some(Err(e.into()))),
                };
            }
            if let Some(waiting) = self.waiting.as_mut() {
                let (rx, alive) = match waiting.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                self.waiting = None;
                self.fill = Some(rx);
                self.orphaned = !alive;
            }
            let available = match self.available() {
                Ok(a) => a,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            if self.spilled_at.is_some_and(|at| self.pos >= at) {
                return self.poll_spill(cx);
            }
            if self.pos >= self.end && self.fill.is_none() {
                return Poll::Ready(None);
            }
            if available > self.pos {
                let n = (available - self.pos).min(CHUNK) as usize;
                let file = self.file.clone();
                let at = self.pos;
                self.reading = Some(tokio::task::spawn_blocking(move || {
                    let mut buf = BytesMut::zeroed(n);
                    let mut filled = 0;
                    while filled < n {
                        let got = file.read_at(&mut buf[filled..], at + filled as u64)?;
                        if got == 0 {
                            break;
                        }
                        filled += got;
                    }
                    buf.truncate(filled);
                    Ok(buf.freeze())
                }));
                continue;
            }
            // Nothing new yet: wait for the fill to move.
            let mut rx = self
                .fill
                .take()
                .expect("a fill is attached when bytes are pending");
            self.waiting = Some(Box::pin(async move {
                let alive = rx.changed().await.is_ok();
                (rx, alive)
            }));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.fill.is_none()
            && self.spilled_at.is_none()
            && self.pos >= self.end
            && self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.end == u64::MAX {
            SizeHint::default()
        } else {
            SizeHint::with_exact(self.end - self.pos)
        }
    }
}

impl FileBody {
    /// After a hand-over: the next chunk from the fill's channel, one
    /// chunk behind, so the last is sent only once the job vouched for
    /// the whole.
    fn poll_spill(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(rx) = self.spill.as_mut() else {
            return Poll::Ready(Some(Err("cache fill handed over without a channel".into())));
        };
        loop {
            let next = match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(next) => next,
            };
            match next {
                Some(Spill::Data(bytes)) => {
                    self.pos += bytes.len() as u64;
                    if let Some(prev) = self.held.replace(bytes) {
                        return Poll::Ready(Some(Ok(Frame::data(prev))));
                    }
                }
                Some(Spill::End) => {
                    self.spill = None;
                    self.spilled_at = None;
                    self.end = self.pos;
                    return match self.held.take() {
                        Some(last) => Poll::Ready(Some(Ok(Frame::data(last)))),
                        None => Poll::Ready(None),
                    };
                }
                Some(Spill::Failed(why)) => {
                    return Poll::Ready(Some(Err(format!("upstream relay failed: {why}").into())))
                }
                None => return Poll::Ready(Some(Err("upstream relay ended unfinished".into()))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A follower's body over a temp file with `written` bytes.
    fn following(written: u64) -> (FileBody, watch::Sender<FillState>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fill");
        std::fs::write(&path, vec![7u8; written as usize]).expect("write");
        let file = Arc::new(File::open(&path).expect("open"));
        let (tx, rx) = watch::channel(FillState::Writing { written });
        let (_, spill) = mpsc::channel(1);
        (FileBody::following(file, Some(100), rx, spill), tx, dir)
    }

    #[tokio::test]
    async fn a_fill_whose_task_ends_unfinished_ends_its_readers_with_an_error() {
        let (mut body, tx, _dir) = following(10);
        let first = body.frame().await.expect("a frame").expect("bytes");
        assert_eq!(first.into_data().expect("data").len(), 10);
        drop(tx);
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
            .await
            .expect("the body ends instead of waiting forever");
        assert!(matches!(end, Some(Err(_))), "ended without an error");
    }

    #[tokio::test]
    async fn a_failed_fill_ends_its_readers_with_an_error() {
        let (mut body, tx, _dir) = following(10);
        body.frame().await.expect("a frame").expect("bytes");
        tx.send_replace(FillState::Failed("stalled".into()));
        assert!(matches!(body.frame().await, Some(Err(_))));
    }
}
