//! A fault-injecting TCP shim in front of the real registry: it relays
//! bytes both ways and can slow, corrupt or cut what the registry sends
//! back, so tests see how graft treats a slow or broken upstream. Runs on
//! its own runtime thread; `Drop` stops it.

use std::net::SocketAddr;
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
}

pub struct Shim {
    addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
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
                    _ = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else { continue };
                            tokio::spawn(relay(client, upstream, f.clone()));
                        }
                    } => {}
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Shim {
            addr,
            fault,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the fault for connections opened from now on.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().expect("fault") = fault;
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

/// Relays one connection. The fault is read per chunk, and offsets count
/// from when it was last changed, so pooled connections that outlive a
/// `set_fault` get the new fault too.
async fn relay(client: TcpStream, upstream: SocketAddr, faults: Arc<Mutex<Fault>>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent: u64 = 0;
    let mut current = *faults.lock().expect("fault");
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let fault = *faults.lock().expect("fault");
        if fault != current {
            current = fault;
            sent = 0;
        }
        let chunk = &mut buf[..n];
        match fault {
            Fault::None => {}
            Fault::Throttle(bps) => {
                let wait = Duration::from_secs_f64(n as f64 / bps as f64);
                tokio::time::sleep(wait).await;
            }
            Fault::FlipByteAt(at) => {
                if at >= sent && at < sent + n as u64 {
                    chunk[(at - sent) as usize] ^= 0xff;
                }
            }
            Fault::CutAfter(limit) => {
                if sent + n as u64 > limit {
                    let keep = (limit - sent.min(limit)) as usize;
                    let _ = cw.write_all(&chunk[..keep]).await;
                    break;
                }
            }
            Fault::StallAfter(limit) => {
                if sent + n as u64 > limit {
                    let keep = (limit - sent.min(limit)) as usize;
                    let _ = cw.write_all(&chunk[..keep]).await;
                    while *faults.lock().expect("fault") == fault {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    break;
                }
            }
        }
        if cw.write_all(chunk).await.is_err() {
            break;
        }
        sent += n as u64;
    }
    up.abort();
}
