//! A fault-injecting TCP shim in front of the real registry: it relays
//! bytes both ways and can slow, corrupt or cut what the registry sends
//! back, answer in the registry's place (500, 429) or refuse connections,
//! so tests see how graft treats a slow or broken upstream. Runs on its own
//! runtime thread; `Drop` stops it.
//!
//! Offsets of the byte faults count from when the fault was last changed
//! on that connection; the `…InBody` faults count from the end of the
//! first response head seen since then, so that small bodies (manifests,
//! tag lists) can be hit without knowing their head's length.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// What happens to the registry's bytes on their way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// At most this many bytes per second per connection.
    Throttle(u64),
    /// XOR one byte at this offset of a connection's response stream.
    FlipByteAt(u64),
    /// Close the connection after this many response bytes.
    CutAfter(u64),
    /// Send this many response bytes, then nothing (the connection stays
    /// open) until the fault is changed; then close it.
    StallAfter(u64),
    /// Refuse new connections (the listening socket is closed until the
    /// fault changes); connections already open are closed when they next
    /// carry a request.
    Refuse,
    /// Send the response head and this many body bytes, then reset the
    /// connection (RST, not a clean close).
    ResetInBody(u64),
    /// Send the response head and this many body bytes, then close the
    /// connection cleanly (FIN): a body shorter than its `Content-Length`.
    CutInBody(u64),
    /// Send the response head and this many body bytes, then nothing until
    /// the fault is changed; then close it.
    StallInBody(u64),
    /// XOR the body byte at this offset.
    FlipInBody(u64),
    /// Answer every request on new connections with `500` and an OCI error
    /// body, without asking the registry.
    Answer500,
    /// Answer every request on new connections with `429` and
    /// `Retry-After: 7`, without asking the registry.
    Answer429,
}

/// The `Retry-After` value [`Fault::Answer429`] sends.
pub const RETRY_AFTER: &str = "7";

impl Fault {
    /// The canned answer of the faults that answer in the registry's place.
    fn canned(self) -> Option<String> {
        let (status, extra, code) = match self {
            Fault::Answer500 => ("500 Internal Server Error", "", "UNKNOWN"),
            Fault::Answer429 => (
                "429 Too Many Requests",
                "Retry-After: 7\r\n",
                "TOOMANYREQUESTS",
            ),
            _ => return None,
        };
        let body = format!(r#"{{"errors":[{{"code":"{code}","message":"shim fault"}}]}}"#);
        Some(format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    /// The body offset of the `…InBody` faults.
    fn in_body(self) -> Option<u64> {
        match self {
            Fault::ResetInBody(n)
            | Fault::CutInBody(n)
            | Fault::StallInBody(n)
            | Fault::FlipInBody(n) => Some(n),
            _ => None,
        }
    }
}

pub struct Shim {
    addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    /// Whether the listening socket is open (it is closed under
    /// [`Fault::Refuse`]).
    listening: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Shim {
    /// A shim relaying to `upstream` (`127.0.0.1:port`).
    pub fn start(upstream: &str, fault: Fault) -> Shim {
        let upstream: SocketAddr = upstream.parse().expect("upstream socket address");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind shim");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("shim addr");
        let fault = Arc::new(Mutex::new(fault));
        let (stop, stopped) = oneshot::channel::<()>();
        let f = fault.clone();
        let listening = Arc::new(AtomicBool::new(true));
        let l = listening.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("shim runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = stopped => {}
                    _ = accept_loop(listener, addr, upstream, f, l) => {}
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Shim {
            addr,
            fault,
            listening,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the fault for connections opened from now on. Returns once
    /// the listening socket is closed (under [`Fault::Refuse`]) or open
    /// again (otherwise), so the next request meets the new fault.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().expect("fault") = fault;
        let want = fault != Fault::Refuse;
        super::wait_until(Duration::from_secs(10), "the shim's listener", || {
            self.listening.load(Ordering::SeqCst) == want
        });
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fault_now(faults: &Mutex<Fault>) -> Fault {
    *faults.lock().expect("fault")
}

/// Accepts connections while the fault is not [`Fault::Refuse`]; under it
/// the listening socket is closed (connections are refused), and bound
/// again on the same address when the fault changes.
async fn accept_loop(
    mut listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    faults: Arc<Mutex<Fault>>,
    listening: Arc<AtomicBool>,
) {
    loop {
        if fault_now(&faults) == Fault::Refuse {
            drop(listener);
            listening.store(false, Ordering::SeqCst);
            while fault_now(&faults) == Fault::Refuse {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            listener = loop {
                // The port was ours a moment ago; retry while the kernel
                // still holds it.
                match TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            listening.store(true, Ordering::SeqCst);
        }
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        if let Ok(Ok((client, _))) = accepted {
            match fault_now(&faults).canned() {
                Some(answer) => tokio::spawn(answer_canned(client, answer)),
                None => tokio::spawn(relay(client, upstream, faults.clone())),
            };
        }
    }
}

/// Answers every request on `client` with `answer` (which closes the
/// connection).
async fn answer_canned(mut client: TcpStream, answer: String) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let _ = client.write_all(answer.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// Copies requests to the registry; a connection that carries a request
/// while connections are refused is closed instead.
async fn forward_requests(
    mut cr: tokio::net::tcp::OwnedReadHalf,
    mut sw: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Mutex<Fault>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if fault_now(&faults) == Fault::Refuse || sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = sw.shutdown().await;
}

/// Where the first response head since the last fault change ends.
#[derive(Default)]
struct HeadScan {
    /// Body bytes seen so far (`None` while still in the head).
    body: Option<u64>,
    /// The last bytes of the head seen, to find `\r\n\r\n` across chunks.
    tail: Vec<u8>,
}

impl HeadScan {
    /// The offset in `chunk` where the body starts, if it does in `chunk`
    /// (0 when the body started before it).
    fn body_start(&mut self, chunk: &[u8]) -> Option<usize> {
        if self.body.is_some() {
            return Some(0);
        }
        let mut joined = std::mem::take(&mut self.tail);
        let carried = joined.len();
        joined.extend_from_slice(chunk);
        match joined.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(at) => {
                self.body = Some(0);
                Some(at + 4 - carried)
            }
            None => {
                self.tail = joined[joined.len().saturating_sub(3)..].to_vec();
                None
            }
        }
    }
}

/// Relays one connection. The fault is read per chunk, and offsets count
/// from when it was last changed, so pooled connections that outlive a
/// `set_fault` get the new fault too.
async fn relay(client: TcpStream, upstream: SocketAddr, faults: Arc<Mutex<Fault>>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (cr, mut cw) = client.into_split();
    let (mut sr, sw) = server.into_split();
    let up = tokio::spawn(forward_requests(cr, sw, faults.clone()));
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent: u64 = 0;
    let mut scan = HeadScan::default();
    let mut current = fault_now(&faults);
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let fault = fault_now(&faults);
        if fault != current {
            current = fault;
            sent = 0;
            scan = HeadScan::default();
        }
        let chunk = &mut buf[..n];
        if let Some(at) = fault.in_body() {
            match in_body(fault, at, chunk, &mut scan, &mut cw, &faults).await {
                Flow::Go => {}
                Flow::Stop => break,
                Flow::Reset => {
                    // Dropping the write half would send FIN first; with it
                    // forgotten, the read half's drop (the aborted task)
                    // closes the socket, and SO_LINGER 0 makes that a RST.
                    cw.forget();
                    up.abort();
                    return;
                }
            }
            if cw.write_all(chunk).await.is_err() {
                break;
            }
            continue;
        }
        let end = sent + n as u64;
        match fault {
            Fault::Throttle(bps) => {
                let wait = Duration::from_secs_f64(n as f64 / bps as f64);
                tokio::time::sleep(wait).await;
            }
            Fault::FlipByteAt(at) if at >= sent && at < end => {
                chunk[(at - sent) as usize] ^= 0xff;
            }
            Fault::CutAfter(limit) if end > limit => {
                let keep = (limit - sent.min(limit)) as usize;
                let _ = cw.write_all(&chunk[..keep]).await;
                break;
            }
            Fault::StallAfter(limit) if end > limit => {
                let keep = (limit - sent.min(limit)) as usize;
                let _ = cw.write_all(&chunk[..keep]).await;
                while fault_now(&faults) == fault {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                break;
            }
            // No fault, or not at this chunk; the others are handled above.
            _ => {}
        }
        if cw.write_all(chunk).await.is_err() {
            break;
        }
        sent += n as u64;
    }
    up.abort();
}

enum Flow {
    /// Send the (possibly altered) chunk and go on.
    Go,
    /// The connection is finished (cut, or released from a stall).
    Stop,
    /// Reset the connection.
    Reset,
}

/// Applies an `…InBody` fault at body offset `at` to `chunk`: sends what
/// comes before the fault point itself and says whether to go on.
async fn in_body(
    fault: Fault,
    at: u64,
    chunk: &mut [u8],
    scan: &mut HeadScan,
    cw: &mut tokio::net::tcp::OwnedWriteHalf,
    faults: &Mutex<Fault>,
) -> Flow {
    let Some(start) = scan.body_start(chunk) else {
        return Flow::Go;
    };
    let seen = scan.body.unwrap_or(0);
    let body_len = (chunk.len() - start) as u64;
    scan.body = Some(seen + body_len);
    if at < seen || at >= seen + body_len {
        return Flow::Go;
    }
    let point = start + (at - seen) as usize;
    if let Fault::FlipInBody(_) = fault {
        chunk[point] ^= 0xff;
        return Flow::Go;
    }
    let _ = cw.write_all(&chunk[..point]).await;
    let _ = cw.flush().await;
    match fault {
        Fault::ResetInBody(_) => {
            // SO_LINGER 0: closing sends RST instead of FIN.
            let _ = cw.as_ref().set_zero_linger();
            return Flow::Reset;
        }
        Fault::StallInBody(_) => {
            while fault_now(faults) == fault {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        _ => {}
    }
    Flow::Stop
}
