//! Wall-clock time as graft reads it for everything that expires: tag
//! records (`cache.tag_ttl`, `cache.max_stale`), remembered authorizations
//! (`cache.auth_ttl`), index pruning, last-access times.
//!
//! Production uses the system clock. Tests take a [`Clock::skewable`] one
//! and [`Clock::advance`] it, so expiry is tested at the hour it happens
//! rather than by sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The system clock, plus a skew that only tests move.
#[derive(Clone, Default)]
pub struct Clock {
    skew_ms: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.skew_ms.is_some() {
            "Clock(skewable)"
        } else {
            "Clock(system)"
        })
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// The system clock, movable forward with [`Clock::advance`]; clones
    /// share the skew.
    pub fn skewable() -> Clock {
        Clock {
            skew_ms: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Moves a skewable clock forward (a no-op on the system clock).
    pub fn advance(&self, d: Duration) {
        if let Some(s) = &self.skew_ms {
            s.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
    }

    /// Unix milliseconds.
    pub fn now_millis(&self) -> u64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let skew = self
            .skew_ms
            .as_ref()
            .map_or(0, |s| s.load(Ordering::SeqCst));
        system.saturating_add(skew)
    }

    /// Unix seconds.
    pub fn now_secs(&self) -> u64 {
        self.now_millis() / 1000
    }

    /// Whether a moment `at_secs` (Unix seconds) is less than `ttl` ago.
    pub fn within(&self, at_secs: u64, ttl: Duration) -> bool {
        self.now_secs().saturating_sub(at_secs) < ttl.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewable_clock_moves_for_all_its_clones() {
        let c = Clock::skewable();
        let other = c.clone();
        let before = c.now_secs();
        assert!(c.within(before, Duration::from_secs(60)));
        other.advance(Duration::from_secs(3600));
        assert!(c.now_secs() >= before + 3600);
        assert!(!c.within(before, Duration::from_secs(60)));
        let sys = Clock::system();
        sys.advance(Duration::from_secs(3600));
        assert!(sys.now_secs() < before + 3600);
    }
}
