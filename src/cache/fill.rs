//! Coalesced misses: one upstream fetch per digest, however many clients
//! ask at once.
//!
//! The first client to miss claims the digest and becomes the leader: it
//! asks the upstream. Everyone else follows the fill. The fetch runs in its
//! own task, writing a temp file; every client — the leader included — reads
//! that file as it grows, so bytes reach all of them as they arrive, and a
//! leader that hangs up does not cut the others off. Followers never see the
//! end of a body before the content was verified: the last byte is held
//! back until the fill is committed, and a failed fill fails their bodies.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::{CacheError, Store, Writer};
use crate::oci::Digest;

/// Where a fill stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FillState {
    /// The leader is waiting for the upstream's answer.
    Connecting,
    /// Bytes are arriving; `written` are in the temp file.
    Writing { written: u64 },
    /// Verified and committed; `len` bytes.
    Done { len: u64 },
    /// The fetch failed or the bytes did not match: nothing was cached.
    Failed(String),
    /// The upstream did not give the leader the content (401, 404, a
    /// redirect it could not follow…): followers must ask for themselves.
    Abandoned,
}

/// One digest being fetched.
pub struct Fill {
    pub digest: Digest,
    /// Who the leader is, so followers with the same credentials on the same
    /// repository are authorized by the leader's answer.
    pub leader: (String, [u8; 32]),
    state: watch::Receiver<FillState>,
    /// Set once the upstream answered 200: the read side of the temp file,
    /// its declared length, and the content type.
    opened: Mutex<Option<Opened>>,
}

#[derive(Clone)]
pub struct Opened {
    pub file: Arc<File>,
    pub len: Option<u64>,
    pub content_type: Option<String>,
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.clone()
    }

    pub fn opened(&self) -> Option<Opened> {
        self.opened.lock().expect("fill poisoned").clone()
    }

    /// Waits until the leader has the upstream's answer (or gave up).
    pub async fn settled(&self) -> FillState {
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
}

/// The fills in flight.
#[derive(Default)]
pub struct Fills {
    map: Mutex<HashMap<Digest, Arc<Fill>>>,
}

/// The claim of the first client to miss a digest.
pub struct Lead {
    fill: Arc<Fill>,
    tx: watch::Sender<FillState>,
    fills: Arc<Fills>,
    started: bool,
}

pub enum Claim {
    Lead(Lead),
    Follow(Arc<Fill>),
}

/// Called once a fill ended: `Some((len, content type))` when it committed,
/// `None` when it was discarded.
pub type OnCommit = Box<dyn FnOnce(&Digest, Option<(u64, Option<&str>)>) + Send>;

impl Fills {
    /// Leads the fill of `digest`, or follows the one in flight.
    pub fn claim(self: &Arc<Self>, digest: &Digest, repo: &str, cred: [u8; 32]) -> Claim {
        let mut map = self.map.lock().expect("fills poisoned");
        if let Some(f) = map.get(digest) {
            return Claim::Follow(f.clone());
        }
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            leader: (repo.to_string(), cred),
            state: rx,
            opened: Mutex::new(None),
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

impl Lead {
    /// The upstream answered 200 with `body`: write it to the store in a
    /// task of its own and return the fill to read from.
    pub fn start<B>(
        mut self,
        store: &Arc<Store>,
        body: B,
        len: Option<u64>,
        content_type: Option<String>,
        on_commit: OnCommit,
    ) -> Result<Arc<Fill>, CacheError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let writer = store.writer(&self.fill.digest)?;
        let file = Arc::new(File::open(writer.path())?);
        *self.fill.opened.lock().expect("fill poisoned") = Some(Opened {
            file,
            len,
            content_type: content_type.clone(),
        });
        self.started = true;
        let _ = self.tx.send(FillState::Writing { written: 0 });
        let fill = self.fill.clone();
        tokio::spawn(run(self, writer, body, len, content_type, on_commit));
        Ok(fill)
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

async fn run<B>(
    lead: Lead,
    mut writer: Writer,
    mut body: B,
    len: Option<u64>,
    content_type: Option<String>,
    on_commit: OnCommit,
) where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let result: Result<u64, CacheError> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CacheError::Upstream(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                // Small writes into the page cache; the fsync happens once,
                // at commit, off the async threads.
                writer.write(&data)?;
                let written = writer.written();
                if len.is_some_and(|l| written > l) {
                    return Err(CacheError::Upstream(format!(
                        "upstream sent more than its Content-Length of {}",
                        len.unwrap_or_default()
                    )));
                }
                lead.tx.send_replace(FillState::Writing { written });
            }
        }
        if let Some(l) = len {
            if writer.written() != l {
                return Err(CacheError::Upstream(format!(
                    "upstream body ended after {} of {l} bytes",
                    writer.written()
                )));
            }
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| CacheError::Upstream(format!("commit task: {e}")))?
    }
    .await;
    let digest = lead.fill.digest.clone();
    match result {
        Ok(n) => {
            on_commit(&digest, Some((n, content_type.as_deref())));
            lead.tx.send_replace(FillState::Done { len: n });
        }
        Err(e) => {
            tracing::warn!(%digest, error = %e, "cache fill failed; nothing cached");
            on_commit(&digest, None);
            lead.tx.send_replace(FillState::Failed(e.to_string()));
        }
    }
    lead.fills.remove(&digest);
}
