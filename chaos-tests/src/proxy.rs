//! A TCP proxy between the coordinator and one shard, for network faults.
//!
//! - `Pass`: forward bytes both ways.
//! - `Delay(ms)`: forward, but hold every chunk for `ms` first.
//! - `BlackHole`: accept and keep connections, forward nothing (a partition that
//!   drops packets silently: callers see timeouts, not errors).
//! - `Drop`: reset every open connection and refuse new ones (a crashed link).
//!
//! Only ever listens on and connects to 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes read per chunk.
const CHUNK_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Fault {
    Pass,
    Delay { ms: u64 },
    BlackHole,
    Drop,
}

pub struct Proxy {
    listen: SocketAddr,
    mode: watch::Sender<Fault>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        assert!(
            upstream.ip().is_loopback(),
            "the proxy only targets loopback addresses"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let (mode, watch_rx) = watch::channel(Fault::Pass);
        let watch_rx = Arc::new(watch_rx);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mode = (*watch_rx).clone();
                if *mode.borrow() == Fault::Drop {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream, mode));
            }
        });
        Ok(Proxy { listen, mode, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, mode: watch::Receiver<Fault>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // When either direction ends (EOF, error, or Drop), both sockets close.
    tokio::select! {
        _ = pipe(cr, sw, mode.clone()) => {},
        _ = pipe(sr, cw, mode) => {},
    }
}

async fn pipe<R, W>(mut from: R, mut to: W, mut mode: watch::Receiver<Fault>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Fault::Drop { return; }
                continue;
            }
        };
        // Hold the chunk while the link is black-holed; give up if it is dropped.
        loop {
            let current = *mode.borrow();
            match current {
                Fault::Pass => break,
                Fault::Delay { ms } => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    break;
                }
                Fault::Drop => return,
                Fault::BlackHole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
