//! A scripted upstream on raw TCP, for what a real registry cannot show:
//! the exact request head graft forwards, and an upstream that accepts
//! connections but never answers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often idle threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// A request head as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `GET /v2/ HTTP/1.1`
    pub request_line: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// Every value of header `name` (case-insensitive).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The request target (path and query).
    pub fn target(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or_default()
    }
}

#[derive(Clone)]
enum Behavior {
    /// Read requests, never write a byte back.
    Hang,
    /// Answer every request with these bytes (a whole HTTP/1.1 response).
    Respond(Arc<Vec<u8>>),
}

/// A fake upstream; `Drop` closes its connections and joins its threads.
pub struct FakeUpstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Accepts connections and reads requests but never answers (upstream
    /// response timeouts).
    pub fn hanging() -> FakeUpstream {
        FakeUpstream::start(Behavior::Hang)
    }

    /// Answers every request with `response`, a complete HTTP/1.1 response
    /// (status line, headers, blank line, body).
    pub fn responding(response: &str) -> FakeUpstream {
        FakeUpstream::start(Behavior::Respond(Arc::new(response.as_bytes().to_vec())))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for `config.upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request heads received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Waits (without blocking the test's runtime) until a request for
    /// `target` has arrived, failing the test after `timeout`.
    pub async fn wait_for_request(&self, target: &str, timeout: Duration) {
        let what = format!("a request for {target} to reach the fake upstream");
        super::eventually(timeout, &what, || {
            let seen = self.requests().iter().any(|r| r.target() == target);
            async move { seen }
        })
        .await;
    }

    fn start(behavior: Behavior) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        listener
            .set_nonblocking(true)
            .expect("non-blocking fake upstream");
        let addr = listener.local_addr().expect("fake upstream address");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, requests, threads) = (stop.clone(), requests.clone(), threads.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (stop, requests, behavior) =
                                (stop.clone(), requests.clone(), behavior.clone());
                            let handle = std::thread::spawn(move || {
                                serve(stream, &behavior, &stop, &requests)
                            });
                            threads.lock().expect("threads lock").push(handle);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                        Err(_) => std::thread::sleep(POLL),
                    }
                }
            })
        };
        FakeUpstream {
            addr,
            stop,
            requests,
            threads,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Reads request heads (skipping `Content-Length` bodies) and answers or
/// not, until the peer closes or the fake stops.
fn serve(
    mut stream: TcpStream,
    behavior: &Behavior,
    stop: &AtomicBool,
    requests: &Mutex<Vec<RecordedRequest>>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    while !stop.load(Ordering::Relaxed) {
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            let request = parse_head(&buffer[..end]);
            let body_len: usize = request
                .header_values("content-length")
                .first()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buffer.len() < end + 4 + body_len {
                // Wait for the rest of the body.
            } else {
                buffer.drain(..end + 4 + body_len);
                requests.lock().expect("requests lock").push(request);
                if let Behavior::Respond(response) = behavior {
                    if stream.write_all(response).is_err() {
                        return;
                    }
                }
                continue;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn parse_head(head: &[u8]) -> RecordedRequest {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    RecordedRequest {
        request_line,
        headers,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
