//! The id of the request being handled, so that an internal error can
//! name it to the client and every log line of the request carries it.
//!
//! The server layer scopes each request's handling with [`scope`]; code
//! below it reads [`current`]. Outside a request (background work, admin
//! commands) there is no id.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// A new id: the process start time and a counter, short and unique enough
/// to find one request's log lines.
pub fn next() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    });
    format!("{epoch:x}-{:x}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Runs `fut` with `id` as the current request id.
pub async fn scope<F: Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// The id of the request whose handling is running, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_id_is_seen_inside_its_scope_only() {
        assert_eq!(current(), None);
        let id = next();
        assert_ne!(id, next());
        let seen = scope(id.clone(), async { current() }).await;
        assert_eq!(seen, Some(id));
        assert_eq!(current(), None);
    }
}
