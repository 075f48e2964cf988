//! A fill that can no longer write (the disk filled up under it) hands its
//! readers over to the upstream: the bytes already in the temp file are
//! read from it, the rest arrive through a channel per reader as the job
//! keeps reading the upstream, and the fill itself is abandoned (its temp
//! file unlinked, nothing cached). So a write error costs the cache a
//! copy, never a client its body.
//!
//! The content is still verified: the job hashes what it relays, and a
//! reader holds back the last chunk until the job says the whole matched
//! its digest ([`Spill::End`]); a mismatch or an upstream failure fails
//! the body.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// What the job sends a reader after the hand-over.
#[derive(Debug)]
pub(super) enum Spill {
    Data(Bytes),
    /// Everything was sent, and it matched the digest.
    End,
    Failed(String),
}

/// Chunks a reader may be behind before the job waits for it.
const DEPTH: usize = 4;

/// The readers' channels, registered as they start; `None` once the
/// hand-over began (a reader arriving after it cannot have the bytes
/// already sent, and asks again instead).
pub(super) struct Handover {
    senders: Mutex<Option<Vec<mpsc::Sender<Spill>>>>,
}

impl Default for Handover {
    fn default() -> Self {
        Handover {
            senders: Mutex::new(Some(Vec::new())),
        }
    }
}

impl Handover {
    /// A channel for a new reader; `None` when the hand-over already began.
    pub(super) fn register(&self) -> Option<mpsc::Receiver<Spill>> {
        let mut senders = self.senders.lock().expect("handover poisoned");
        let list = senders.as_mut()?;
        let (tx, rx) = mpsc::channel(DEPTH);
        list.push(tx);
        Some(rx)
    }

    /// Begins the hand-over: no reader registers from now on.
    pub(super) fn begin(&self) -> Readers {
        let taken = self.senders.lock().expect("handover poisoned").take();
        Readers(taken.unwrap_or_default())
    }
}

/// The readers being relayed to.
pub(super) struct Readers(Vec<mpsc::Sender<Spill>>);

impl Readers {
    /// Sends to every reader still there, waiting for slow ones (they set
    /// the pace, as with any relay) up to `patience`: a reader that took
    /// nothing for that long is dropped (its body fails), so one stuck
    /// client cannot hold the others. Readers that hung up are dropped too.
    /// `false` when none is left.
    pub(super) async fn send(&mut self, data: &Bytes, patience: Duration) -> bool {
        let mut alive = Vec::with_capacity(self.0.len());
        for tx in self.0.drain(..) {
            let sent = tx.send_timeout(Spill::Data(data.clone()), patience).await;
            if sent.is_ok() {
                alive.push(tx);
            }
        }
        self.0 = alive;
        !self.0.is_empty()
    }

    /// Ends every reader's body: cleanly, or with `why`. A reader with a
    /// full channel gets `patience` as with any chunk, so a client that
    /// stopped reading cannot keep the job (and its reservation) alive.
    pub(super) async fn finish(self, outcome: Result<(), String>, patience: Duration) {
        for tx in self.0 {
            let last = match &outcome {
                Ok(()) => Spill::End,
                Err(why) => Spill::Failed(why.clone()),
            };
            let _ = tx.send_timeout(last, patience).await;
        }
    }
}
