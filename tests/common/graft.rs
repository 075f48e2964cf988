//! graft under test, in-process.
//!
//! `graft::run` gets its own multi-thread tokio runtime on a dedicated std
//! thread: a test may block its own thread (run `skopeo`, sleep, join)
//! without starving the proxy, and the test's runtime and graft's never
//! share a scheduler — as with a real client and a real server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::Duration;

use graft::Config;
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::Registry;

/// In tests in-flight requests get this long after shutdown (instead of
/// the production 30 s), so a test that drops graft mid-request still ends
/// quickly.
const TEST_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running graft; `Drop` triggers shutdown and joins its thread.
pub struct Graft {
    addr: SocketAddr,
    /// The configuration `run` was given, reused by [`Graft::restart`].
    config: Config,
    /// `data_dir` (index and cache); removed after the thread is joined.
    data_dir: TempDir,
    /// Dropping or sending on it resolves the `shutdown` future of `run`.
    shutdown: Option<oneshot::Sender<()>>,
    /// `run`'s outcome, sent by the thread when `run` returns.
    done: mpsc::Receiver<Result<(), String>>,
    /// Set once `done` delivered (it delivers only once).
    outcome: Option<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
}

impl Graft {
    /// graft in front of `registry` (trusting its test CA if it has one).
    pub fn start(registry: &Registry) -> Graft {
        Graft::start_with(registry, |_| {})
    }

    /// Like [`Graft::start`], letting the test adjust the configuration.
    pub fn start_with(registry: &Registry, configure: impl FnOnce(&mut Config)) -> Graft {
        let ca_file = registry.ca_file();
        Graft::start_for_upstream(&registry.url(), |config| {
            config.upstream.ca_file = ca_file;
            configure(config);
        })
    }

    /// graft in front of any origin (a closed port, a [`super::FakeUpstream`]).
    pub fn start_for_upstream(upstream_url: &str, configure: impl FnOnce(&mut Config)) -> Graft {
        init_tracing();
        let data_dir = tempfile::Builder::new()
            .prefix("graft-test-data-")
            .tempdir()
            .expect("create graft data dir");
        let mut config = Config::default();
        config.upstream.url = upstream_url.to_owned();
        config.storage.data_dir = data_dir.path().to_path_buf();
        config.server.shutdown_grace = TEST_SHUTDOWN_GRACE;
        config.server.listen = "127.0.0.1:0".parse().expect("literal address");
        configure(&mut config);

        let listener =
            std::net::TcpListener::bind(config.server.listen).expect("bind graft listener");
        let addr = listener.local_addr().expect("graft listener address");
        config.server.listen = addr;
        let (shutdown, done, thread) = spawn_server(listener, config.clone());
        Graft {
            addr,
            config,
            data_dir,
            shutdown: Some(shutdown),
            done,
            outcome: None,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Resolves `run`'s shutdown future and returns at once; in-flight
    /// requests go on (see [`Graft::wait_stopped`]).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `run` has returned.
    pub fn has_stopped(&mut self) -> bool {
        self.poll_outcome(Duration::ZERO).is_some()
    }

    /// Waits up to `timeout` for `run` to return and gives its result
    /// (errors as text); fails the test when it does not return in time.
    pub fn wait_stopped(&mut self, timeout: Duration) -> Result<(), String> {
        let outcome = self.poll_outcome(timeout).unwrap_or_else(|| {
            panic!("graft::run did not return within {timeout:?} after shutdown")
        });
        if let Some(thread) = self.thread.take() {
            thread.join().expect("graft thread panicked");
        }
        outcome
    }

    /// Shuts graft down and starts it again on the same address with the
    /// same configuration and data directory (a process restart).
    pub fn restart(&mut self) {
        self.begin_shutdown();
        if let Err(e) = self.wait_stopped(TEST_SHUTDOWN_GRACE + Duration::from_secs(10)) {
            panic!("graft::run failed before restart: {e}");
        }
        let listener = std::net::TcpListener::bind(self.addr).expect("rebind graft's address");
        let (shutdown, done, thread) = spawn_server(listener, self.config.clone());
        self.shutdown = Some(shutdown);
        self.done = done;
        self.outcome = None;
        self.thread = Some(thread);
    }

    fn poll_outcome(&mut self, timeout: Duration) -> Option<Result<(), String>> {
        if self.outcome.is_none() {
            self.outcome = match self.done.recv_timeout(timeout) {
                Ok(result) => Some(result),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(
                    "graft's thread ended without a result (panic?)".to_owned(),
                )),
            };
        }
        self.outcome.clone()
    }
}

impl Drop for Graft {
    fn drop(&mut self) {
        self.begin_shutdown();
        let Some(thread) = self.thread.take() else {
            return;
        };
        match self.poll_outcome(TEST_SHUTDOWN_GRACE + Duration::from_secs(10)) {
            Some(Ok(())) => {}
            Some(Err(e)) => eprintln!("graft::run returned an error: {e}"),
            None => {
                // Leave the thread behind rather than hang the test binary.
                eprintln!("graft::run did not return after shutdown; not joining its thread");
                return;
            }
        }
        let _ = thread.join();
    }
}

type Started = (
    oneshot::Sender<()>,
    mpsc::Receiver<Result<(), String>>,
    JoinHandle<()>,
);

/// Runs `graft::run` on `listener` in a new thread with its own runtime.
fn spawn_server(listener: std::net::TcpListener, config: Config) -> Started {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("graft-{}", config.server.listen))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("graft test runtime");
            let result = runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                // A dropped sender (graft dropped without shutdown) also stops it.
                let shutdown = async move {
                    let _ = shutdown_rx.await;
                };
                graft::run(listener, config, shutdown)
                    .await
                    .map_err(|e| e.to_string())
            });
            // Background tasks that outlive `run` must not keep the test waiting.
            runtime.shutdown_timeout(Duration::from_secs(2));
            let _ = done_tx.send(result);
        })
        .expect("spawn graft thread");
    (shutdown_tx, done_rx, thread)
}

/// Sends graft's tracing output to the test's captured output, filtered by
/// `GRAFT_TEST_LOG` (default: warnings, and graft's own info lines).
fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("GRAFT_TEST_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,graft=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_test_writer()
            .try_init();
    });
}
