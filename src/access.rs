//! Who may read what from the cache (DESIGN.md, "Security model").
//!
//! graft does not widen access: a cache hit for repository R is served only
//! after the upstream said yes to this client's own credentials on R, and
//! only when the upstream confirmed R holds the digest — so content cached
//! through repository A never leaks to B, nor to anonymous clients. A yes is
//! remembered per (key of the credentials, repository), never the
//! credentials themselves: within `auth_ttl` it answers without asking the
//! upstream; while the upstream cannot be reached it stands for up to
//! `max_stale`; a no (401/403) always stands and forgets the yes. Both
//! judgements are made on [`Clock`] time, so tests move the clock instead of
//! sleeping.
//!
//! The remembered yeses are a bounded cache (`cache.auth_cache_capacity`
//! entries, none kept past `max(auth_ttl, max_stale)`): a CI fleet rotating
//! short-lived tokens must not grow graft's memory without end. A yes is
//! also written to the index (as a key, at most every 30 s per key) so the
//! offline rule holds across a restart; that copy is read on the blocking
//! pool, and only when memory has nothing.
//!
//! A yes for a Bearer token never outlives the token's own `exp`, read from
//! its claims unverified ([`jwt::unverified_expiry`]): past it graft asks
//! the upstream again, and while the upstream is unreachable it refuses.
//! Offline, a token graft never saw a yes for is honoured only when the
//! operator configured the registry's token-signing certificate
//! (`upstream.token_certificate`) and the token validates against it and
//! grants pull on the repository ([`jwt::TokenVerifier`]). Online the
//! upstream stays the only judge: a token that validates is still checked
//! with the upstream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::credentials::{CredKey, CredentialKeys};
use crate::error::Error;
use crate::index::Index;
use crate::jwt::{self, TokenVerifier};
use crate::metrics::{self, Metrics};
use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;

/// A yes is written to the index at most this often per key, to keep index
/// writes off busy paths (the offline rule only needs it roughly current).
const PERSIST_EVERY: Duration = Duration::from_secs(30);

/// The upstream's answer for this client, or what stands in for it.
pub enum Decision {
    /// Fresh from the upstream, remembered within `auth_ttl`, or (upstream
    /// unreachable) remembered within `max_stale`.
    Allowed,
    /// The upstream's own no (401, 403) or "not here" (404).
    Denied,
    /// The upstream could not be asked and no remembered yes stands.
    Unreachable(Error),
}

/// Which endpoint family to ask about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub fn path(self, repo: &RepoName, reference: &str) -> String {
        match self {
            Kind::Blob => format!("/v2/{repo}/blobs/{reference}"),
            Kind::Manifest => format!("/v2/{repo}/manifests/{reference}"),
        }
    }
}

type Key = (RepoName, CredKey);

/// A remembered answer of the upstream, in [`Clock::now_millis`].
#[derive(Clone, Copy, Debug)]
struct Yes {
    at_ms: u64,
    /// The token's `exp` (`u64::MAX` for credentials without one): past it
    /// the yes stands for nothing. [`Yes::NO`] marks a no.
    until_ms: u64,
}

impl Yes {
    /// `until_ms` of a remembered no (401/403): it stands for nothing, and
    /// while it is remembered a token is not validated offline either —
    /// the upstream's last word on these credentials was no.
    const NO: u64 = 0;
}

fn until_ms(until_secs: Option<u64>) -> u64 {
    until_secs.map_or(u64::MAX, |s| s.saturating_mul(1000))
}

pub struct AccessCache {
    upstream: Upstream,
    index: Index,
    metrics: Arc<Metrics>,
    keys: CredentialKeys,
    /// Judges every yes; moka's own clock only bounds memory.
    clock: Clock,
    ttl: Duration,
    max_stale: Duration,
    /// The last yes per key. Bounded by count and by a time-to-live past
    /// which no yes could stand anyway.
    yes: moka::sync::Cache<Key, Yes>,
    /// Validates tokens offline (`upstream.token_certificate`); `None`: only
    /// a remembered yes stands offline.
    tokens: Option<TokenVerifier>,
    /// Offline answers decided by validating a token: allowed, refused.
    offline_tokens: [AtomicU64; 2],
}

/// The upstream failed in a way that is not an answer about access.
pub fn is_outage(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

impl AccessCache {
    /// `config` gives `auth_ttl`, `max_stale` and `auth_cache_capacity`.
    pub fn new(
        upstream: Upstream,
        index: Index,
        metrics: Arc<Metrics>,
        keys: CredentialKeys,
        config: &CacheConfig,
        clock: Clock,
        tokens: Option<TokenVerifier>,
    ) -> AccessCache {
        let yes = moka::sync::Cache::builder()
            .max_capacity(config.auth_cache_capacity)
            .time_to_live(config.auth_ttl.max(config.max_stale))
            .build();
        AccessCache {
            upstream,
            index,
            metrics,
            keys,
            clock,
            ttl: config.auth_ttl,
            max_stale: config.max_stale,
            yes,
            tokens,
            offline_tokens: Default::default(),
        }
    }

    /// Offline pulls allowed on a validated token (metric
    /// `graft_auth_offline_token_pulls_total`).
    pub fn offline_token_pulls(&self) -> u64 {
        self.offline_tokens[0].load(Ordering::Relaxed)
    }

    /// Offline pulls refused because the token did not validate or grant
    /// pull (metric `graft_auth_offline_token_refusals_total`).
    pub fn offline_token_refusals(&self) -> u64 {
        self.offline_tokens[1].load(Ordering::Relaxed)
    }

    /// The key these credentials are remembered under.
    pub fn key(&self, auth: Option<&HeaderValue>) -> CredKey {
        self.keys.key(auth)
    }

    /// How many yeses are remembered in memory (metric
    /// `graft_auth_remembered_entries`); at most `cache.auth_cache_capacity`
    /// once moka's pending evictions ran, which this lets happen first.
    pub fn remembered(&self) -> u64 {
        self.yes.run_pending_tasks();
        self.yes.entry_count()
    }

    /// Whether a moment `at_ms` (clock millis) is less than `window` ago.
    fn within(&self, at_ms: u64, window: Duration) -> bool {
        u128::from(self.clock.now_millis().saturating_sub(at_ms)) < window.as_millis()
    }

    /// Whether a moment `until_ms` (clock millis) is still ahead.
    fn before(&self, until_ms: u64) -> bool {
        self.clock.now_millis() < until_ms
    }

    /// The upstream said yes to these credentials on `repo`.
    pub fn remember_yes(&self, repo: &RepoName, auth: Option<&HeaderValue>) {
        self.remember(repo, self.key(auth), jwt::unverified_expiry(auth));
    }

    /// Remembers a yes for `cred`, standing until `until_secs` at the
    /// latest (a token's `exp`).
    fn remember(&self, repo: &RepoName, cred: CredKey, until_secs: Option<u64>) {
        let now = self.clock.now_millis();
        let yes = Yes {
            at_ms: now,
            until_ms: until_ms(until_secs),
        };
        if !self.before(yes.until_ms) {
            // A token the registry still took within its leeway: nothing
            // to remember.
            return;
        }
        let key = (repo.clone(), cred);
        let previous = self.yes.get(&key);
        self.yes.insert(key, yes);
        // Persisted (a key, never the credentials) so offline pulls survive
        // a restart.
        if previous.is_none_or(|p| p.until_ms == Yes::NO || !self.within(p.at_ms, PERSIST_EVERY)) {
            // Best effort: the index logs and counts its own failures.
            self.index
                .access()
                .remember_until(repo, &cred, now / 1000, until_secs);
        }
    }

    /// The upstream said no to these credentials on `repo`.
    pub fn forget(&self, repo: &RepoName, cred: CredKey) {
        let no = Yes {
            at_ms: self.clock.now_millis(),
            until_ms: Yes::NO,
        };
        self.yes.insert((repo.clone(), cred), no);
        self.index.access().forget(repo, &cred);
    }

    /// Whether a yes within `auth_ttl` (and before the token's `exp`)
    /// stands (no upstream round trip).
    pub fn fresh_yes(&self, repo: &RepoName, cred: CredKey) -> bool {
        self.yes
            .get(&(repo.clone(), cred))
            .is_some_and(|y| self.within(y.at_ms, self.ttl) && self.before(y.until_ms))
    }

    /// Whether these credentials may read cached content of `repo` while
    /// the upstream cannot be asked: a remembered yes within `max_stale`
    /// (and before the token's `exp`), or else, when configured, a token
    /// that validates against the registry's signing certificate and grants
    /// pull on `repo`.
    pub async fn stale_yes(&self, repo: &RepoName, auth: Option<&HeaderValue>) -> bool {
        let cred = self.key(auth);
        let remembered = self.yes.get(&(repo.clone(), cred));
        if remembered.is_some_and(|y| y.until_ms == Yes::NO) {
            return false;
        }
        self.remembered_stale(repo, cred, remembered).await || self.token_grants_pull(repo, auth)
    }

    /// The offline judgement of a token graft never vouched for (or whose
    /// remembered yes lapsed), counted and logged without the token.
    fn token_grants_pull(&self, repo: &RepoName, auth: Option<&HeaderValue>) -> bool {
        let Some(tokens) = &self.tokens else {
            return false;
        };
        match tokens.grants_pull(auth, repo.as_str(), self.clock.now_secs()) {
            Ok(()) => {
                self.offline_tokens[0].fetch_add(1, Ordering::Relaxed);
                tracing::info!(%repo, "upstream unreachable; the client's token validates and grants pull");
                true
            }
            // Basic or no credentials: no token to judge.
            Err(jwt::JwtError::NotBearer) => false,
            Err(why) => {
                self.offline_tokens[1].fetch_add(1, Ordering::Relaxed);
                tracing::info!(%repo, %why, "upstream unreachable; the client's token does not authorize this pull");
                false
            }
        }
    }

    /// Whether a yes within `max_stale` stands (upstream unreachable),
    /// including one persisted before a restart (or evicted from memory):
    /// that one is read from the index on the blocking pool, only when
    /// memory holds no yes at all (the index copy is never newer than
    /// memory's). It is not copied back into memory: a no arriving while
    /// the read runs would otherwise be undone by the copy.
    /// `in_memory`: what memory holds for the key, already looked up.
    async fn remembered_stale(
        &self,
        repo: &RepoName,
        cred: CredKey,
        in_memory: Option<Yes>,
    ) -> bool {
        let stands = |y: Yes| self.within(y.at_ms, self.max_stale) && self.before(y.until_ms);
        if let Some(yes) = in_memory {
            return stands(yes);
        }
        let (index, repo) = (self.index.clone(), repo.clone());
        tokio::task::spawn_blocking(move || index.access().remembered_until(&repo, &cred))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .is_some_and(|(at_secs, until_secs)| {
                stands(Yes {
                    at_ms: at_secs.saturating_mul(1000),
                    until_ms: until_ms(until_secs),
                })
            })
    }

    /// Whether the upstream confirmed `repo` holds `digest` (a sled read,
    /// so on the blocking pool); with `within`, a confirmation younger than
    /// that only.
    async fn present(&self, repo: &RepoName, digest: &Digest, within: Option<Duration>) -> bool {
        let present = self.index.present();
        let known = match within {
            Some(w) => present.known_within(repo, digest, w),
            None => present.known(repo, digest),
        };
        if known {
            return true;
        }
        let (index, repo, digest) = (self.index.clone(), repo.clone(), digest.clone());
        tokio::task::spawn_blocking(move || {
            let present = index.present();
            match within {
                Some(w) => present.contains_within(&repo, &digest, w),
                None => present.contains(&repo, &digest),
            }
            .unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }

    /// May this client read `digest` from `repo`? Asks the upstream (a HEAD
    /// with the client's own `Authorization`) unless a fresh yes stands and
    /// the upstream already confirmed `repo` holds `digest`.
    pub async fn check(
        &self,
        kind: Kind,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Decision {
        let metrics = &*self.metrics;
        let cred = self.key(auth);
        // A manifest deleted straight at the registry (or collected with
        // its index) must not be served for longer than `auth_ttl`: its
        // presence counts without asking only while as young as a fresh yes.
        let window = (kind == Kind::Manifest).then_some(self.ttl);
        if self.fresh_yes(repo, cred) && self.present(repo, digest, window).await {
            metrics::inc(&metrics.auth_remembered);
            return Decision::Allowed;
        }
        metrics::inc(&metrics.auth_checks);
        let path = kind.path(repo, digest.as_str());
        let accept = [(header::ACCEPT, crate::oci::media::ACCEPT_MANIFESTS)];
        let headers: &[(header::HeaderName, &str)] =
            if kind == Kind::Manifest { &accept } else { &[] };
        let outcome = self
            .upstream
            .call(Method::HEAD, &path, auth, headers, Bytes::new())
            .await;
        let unreachable = match outcome {
            Ok(resp) if resp.status().is_success() => {
                self.remember_yes(repo, auth);
                self.index.present().mark(repo, digest);
                return Decision::Allowed;
            }
            Ok(resp) if is_outage(resp.status()) => {
                Error::UpstreamUnreachable(format!("upstream answered {}", resp.status()))
            }
            Ok(resp) => {
                let status = resp.status();
                if crate::upstream::is_denial(status) {
                    self.forget(repo, cred);
                }
                if status == StatusCode::NOT_FOUND {
                    self.index.present().forget(repo, digest);
                }
                return Decision::Denied;
            }
            Err(e) if e.is_outage() => e.into(),
            Err(e) => return Decision::Unreachable(e.into()),
        };
        self.offline(repo, digest, auth, unreachable).await
    }

    /// The upstream could not be asked: a remembered yes within `max_stale`
    /// (or a validated token, when configured) stands for content the
    /// upstream confirmed `repo` holds.
    async fn offline(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
        e: Error,
    ) -> Decision {
        if self.present(repo, digest, None).await && self.stale_yes(repo, auth).await {
            metrics::inc(&self.metrics.cache_stale_hits);
            tracing::info!(%repo, %digest, "upstream unreachable; serving on a remembered authorization");
            Decision::Allowed
        } else {
            Decision::Unreachable(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// An access cache over a fresh index, with a skewable clock; the
    /// upstream is never asked in these tests.
    fn access(dir: &std::path::Path, index: Index, tune: impl FnOnce(&mut Config)) -> AccessCache {
        let mut config = Config::default();
        config.storage.data_dir = dir.to_path_buf();
        config.clock = Clock::skewable();
        tune(&mut config);
        AccessCache::new(
            Upstream::new(&config.upstream).expect("upstream client"),
            index,
            Arc::new(Metrics::default()),
            CredentialKeys::with_secret([3; 32]),
            &config.cache,
            config.clock.clone(),
            None,
        )
    }

    /// Whether a remembered yes stands offline for `cred` (no token).
    async fn stale(cache: &AccessCache, repo: &RepoName, cred: CredKey) -> bool {
        let in_memory = cache.yes.get(&(repo.clone(), cred));
        cache.remembered_stale(repo, cred, in_memory).await
    }

    fn repo(name: &str) -> RepoName {
        RepoName::parse(name).expect("valid repository name")
    }

    fn cred(i: u64) -> CredKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn remembered_yeses_are_capped_by_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let cache = access(dir.path(), index, |c| c.cache.auth_cache_capacity = 1_000);
        let app = repo("app");
        for i in 0..100_000 {
            cache.remember(&app, cred(i), None);
        }
        let n = cache.remembered();
        assert!(n <= 1_000, "{n} yeses remembered past a capacity of 1000");
        assert!(n > 0, "recent yeses are remembered");
    }

    #[tokio::test]
    async fn a_yes_is_fresh_within_auth_ttl_and_stale_usable_within_max_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let cache = access(dir.path(), index, |c| {
            c.cache.auth_ttl = Duration::from_secs(60);
            c.cache.max_stale = Duration::from_secs(3600);
        });
        let (app, alice) = (repo("app"), cred(1));
        assert!(!cache.fresh_yes(&app, alice));
        assert!(!stale(&cache, &app, alice).await);

        cache.remember(&app, alice, None);
        assert!(cache.fresh_yes(&app, alice));
        assert!(!cache.fresh_yes(&repo("other"), alice), "per repository");
        assert!(!cache.fresh_yes(&app, cred(2)), "per credentials");

        cache.clock.advance(Duration::from_secs(60));
        assert!(!cache.fresh_yes(&app, alice), "auth_ttl passed");
        assert!(stale(&cache, &app, alice).await);

        cache.clock.advance(Duration::from_secs(3540));
        assert!(!stale(&cache, &app, alice).await, "max_stale passed");
    }

    #[tokio::test]
    async fn a_persisted_yes_stands_offline_after_a_restart_and_a_no_forgets_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let (app, alice) = (repo("app"), cred(1));
        let before = access(dir.path(), index.clone(), |_| {});
        before.remember(&app, alice, None);
        drop(before);

        let after = access(dir.path(), index.clone(), |c| {
            c.cache.max_stale = Duration::from_secs(3600);
        });
        assert_eq!(after.remembered(), 0, "memory starts empty");
        assert!(stale(&after, &app, alice).await, "read from the index");
        assert!(
            !after.fresh_yes(&app, alice),
            "never fresh without the upstream"
        );
        assert!(!stale(&after, &app, cred(2)).await);

        after.forget(&app, alice);
        assert!(!stale(&after, &app, alice).await);
        let again = access(dir.path(), index, |_| {});
        assert!(
            !stale(&again, &app, alice).await,
            "forgotten in the index too"
        );
    }

    #[test]
    fn a_yes_is_persisted_at_most_every_30_seconds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let cache = access(dir.path(), index.clone(), |_| {});
        let (app, alice) = (repo("app"), cred(1));
        cache.remember(&app, alice, None);
        let first = index
            .access()
            .remembered(&app, &alice)
            .expect("read")
            .expect("persisted");
        cache.clock.advance(Duration::from_secs(10));
        cache.remember(&app, alice, None);
        assert_eq!(
            index.access().remembered(&app, &alice).expect("read"),
            Some(first)
        );
        cache.clock.advance(Duration::from_secs(30));
        cache.remember(&app, alice, None);
        assert!(index
            .access()
            .remembered(&app, &alice)
            .expect("read")
            .is_some_and(|at| at >= first + 40));
    }

    /// `Authorization` of a Bearer JWT expiring at `exp` (unsigned: only
    /// its claims are read here).
    fn token_expiring(exp: u64) -> HeaderValue {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let claims = URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        HeaderValue::from_str(&format!("Bearer eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln"))
            .expect("header")
    }

    #[tokio::test]
    async fn a_yes_for_a_token_never_outlives_its_exp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let cache = access(dir.path(), index.clone(), |c| {
            c.cache.auth_ttl = Duration::from_secs(600);
            c.cache.max_stale = Duration::from_secs(3600);
        });
        let app = repo("app");
        let exp = cache.clock.now_secs() + 120;
        let token = token_expiring(exp);
        let basic = HeaderValue::from_static("Basic YWxpY2U6czNjcmV0");
        cache.remember_yes(&app, Some(&token));
        cache.remember_yes(&app, Some(&basic));
        let (t, b) = (cache.key(Some(&token)), cache.key(Some(&basic)));
        assert!(cache.fresh_yes(&app, t));
        assert!(cache.stale_yes(&app, Some(&token)).await);

        cache.clock.advance(Duration::from_secs(121));
        assert!(!cache.fresh_yes(&app, t), "past exp, within auth_ttl");
        assert!(
            !cache.stale_yes(&app, Some(&token)).await,
            "past exp, within max_stale"
        );
        assert!(cache.fresh_yes(&app, b), "Basic keeps auth_ttl");
        assert!(cache.stale_yes(&app, Some(&basic)).await);

        let restarted = access(dir.path(), index, |c| {
            c.cache.max_stale = Duration::from_secs(3600);
        });
        restarted.clock.advance(Duration::from_secs(121));
        assert!(
            !restarted.stale_yes(&app, Some(&token)).await,
            "the persisted yes keeps the exp"
        );
        assert!(restarted.stale_yes(&app, Some(&basic)).await);
    }

    #[test]
    fn a_yes_right_after_a_no_is_persisted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let cache = access(dir.path(), index.clone(), |_| {});
        let (app, alice) = (repo("app"), cred(1));
        cache.forget(&app, alice);
        assert!(!cache.fresh_yes(&app, alice), "a no is no yes");
        cache.remember(&app, alice, None);
        assert!(cache.fresh_yes(&app, alice));
        assert!(index
            .access()
            .remembered(&app, &alice)
            .expect("read")
            .is_some());
    }

    #[test]
    fn a_token_already_past_its_exp_is_not_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index")).expect("index");
        let cache = access(dir.path(), index.clone(), |_| {});
        let app = repo("app");
        let token = token_expiring(cache.clock.now_secs() - 30);
        cache.remember_yes(&app, Some(&token));
        assert!(!cache.fresh_yes(&app, cache.key(Some(&token))));
        assert_eq!(
            index
                .access()
                .remembered(&app, &cache.key(Some(&token)))
                .expect("read"),
            None
        );
    }
}
