//! Finishing what a crash interrupted, by asking the upstream: a push it
//! accepted becomes an index entry, a delete it did leaves the index, and
//! owed fallback-tag writes are written. Each settled item is safe to
//! settle again, so recovery may run any number of times.

use http::StatusCode;

use super::Referrers;
use crate::error::Error;
use crate::index::{Index, IndexError};

impl Referrers {
    /// Settles every intent and owed write it can. Returns how many items
    /// are still owed (to retry later).
    pub async fn recover(&self) -> Result<usize, Error> {
        self.recover_pushes().await?;
        self.recover_deletes().await?;
        if self.writes_tags() {
            let auth = self.own_auth.clone();
            let owed = self
                .index
                .blocking(|ix| ix.intents().owed_tag_writes())
                .await?;
            for (repo, subject) in owed {
                self.write_tag(&repo, &subject, auth.as_ref()).await;
            }
        }
        self.index.flush().await?;
        let writes_tags = self.writes_tags();
        let owed = self
            .index
            .blocking(move |ix| still_owed(ix, writes_tags))
            .await?;
        Ok(owed)
    }

    /// Pushes announced before a restart: accepted ones are recorded,
    /// refused ones dropped, undecidable ones kept.
    async fn recover_pushes(&self) -> Result<(), Error> {
        let auth = self.own_auth.clone();
        let intents = self
            .index
            .blocking(|ix| ix.intents().push_intents())
            .await?;
        for intent in intents {
            let (repo, subject, d) = (&intent.repo, &intent.subject, &intent.descriptor);
            if self.is_in_flight(repo, &d.digest) {
                continue;
            }
            let checked_at = self.index.clock().now_secs();
            match self.head_manifest(repo, &d.digest, auth.as_ref()).await {
                Ok(status) if status.is_success() => {
                    tracing::info!(%repo, %subject, referrer = %d.digest, "recovering a referrer the upstream accepted before a restart");
                    self.record(repo, subject, d, Some(checked_at)).await?;
                }
                Ok(StatusCode::NOT_FOUND) => {
                    let (r, s, dg) = (repo.clone(), subject.clone(), d.digest.clone());
                    self.index
                        .blocking(move |ix| ix.intents().remove_intent(&r, &s, &dg))
                        .await?;
                }
                Ok(status) => {
                    tracing::warn!(%status, %repo, "cannot check an interrupted push yet")
                }
                Err(e) => tracing::warn!(error = %e, "cannot check an interrupted push yet"),
            }
        }
        Ok(())
    }

    /// Deletes announced before a restart: done ones are finished, refused
    /// ones dropped, undecidable ones kept.
    async fn recover_deletes(&self) -> Result<(), Error> {
        let auth = self.own_auth.clone();
        let deletes = self
            .index
            .blocking(|ix| ix.intents().delete_intents())
            .await?;
        for (repo, digest) in deletes {
            if self.is_in_flight(&repo, &digest) {
                continue;
            }
            match self.head_manifest(&repo, &digest, auth.as_ref()).await {
                Ok(StatusCode::NOT_FOUND) => {
                    tracing::info!(%repo, referrer = %digest, "finishing a referrer delete the upstream did before a restart");
                    self.after_delete(&repo, &digest, true, auth.as_ref())
                        .await?;
                }
                Ok(status) if status.is_success() => {
                    let (r, d) = (repo.clone(), digest.clone());
                    self.index
                        .blocking(move |ix| ix.intents().remove_delete_intent(&r, &d))
                        .await?;
                }
                Ok(status) => {
                    tracing::warn!(%status, %repo, "cannot check an interrupted delete yet")
                }
                Err(e) => tracing::warn!(error = %e, "cannot check an interrupted delete yet"),
            }
        }
        Ok(())
    }
}

/// Items recovery could not settle yet.
fn still_owed(ix: &Index, writes_tags: bool) -> Result<usize, IndexError> {
    let i = ix.intents();
    let tags = if writes_tags {
        i.owed_tag_writes()?.len()
    } else {
        0
    };
    Ok(i.push_intents()?.len() + i.delete_intents()?.len() + tags)
}
