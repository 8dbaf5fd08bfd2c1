//! A userspace TCP relay that adds the faults this kernel cannot (it has no
//! `netem`): latency with jitter, writes sliced into single bytes, a slow
//! close. Toxiproxy's toxics, in miniature. Put it in front of a backend;
//! the toxics can change while sessions run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the relay does to each direction of every connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Toxics {
    /// Added to every chunk.
    pub latency: Duration,
    /// Up to this much more, varying per chunk (order is kept).
    pub jitter: Duration,
    /// Write one byte per `write()`, with this pause between bytes.
    pub slice: Option<Duration>,
    /// Wait this long after EOF before passing the close on.
    pub slow_close: Duration,
}

/// A running relay; it stops with the runtime that runs it.
pub struct DelayRelay {
    addr: SocketAddr,
    toxics: Arc<Mutex<Toxics>>,
    delayed: Arc<AtomicU64>,
}

impl DelayRelay {
    /// Listens on `listen`, forwards each connection to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        toxics: Toxics,
    ) -> std::io::Result<DelayRelay> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let toxics = Arc::new(Mutex::new(toxics));
        let shared = toxics.clone();
        let delayed = Arc::new(AtomicU64::new(0));
        let counter = delayed.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let toxics = shared.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(
                        pipe(dr, uw, toxics.clone(), counter.clone(), 1),
                        pipe(ur, dw, toxics, counter, 2)
                    );
                });
            }
        });
        Ok(DelayRelay {
            addr,
            toxics,
            delayed,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Chunks that passed with a toxic on (latency, jitter or slicing).
    pub fn delayed_chunks(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }

    pub fn set(&self, toxics: Toxics) {
        *self.toxics.lock().expect("toxics lock") = toxics;
    }
}

/// A small deterministic jitter source (no extra crate for randomness).
fn jitter(seed: &mut u64, max: Duration) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let nanos = max.as_nanos() as u64;
    if nanos == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(*seed % nanos)
    }
}

/// One direction: a reader stamps each chunk with its delivery time, a
/// writer delivers in order. Bounded: at most 64 chunks wait.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    toxics: Arc<Mutex<Toxics>>,
    delayed: Arc<AtomicU64>,
    mut seed: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let t = toxics.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = Instant::now();
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let x = *t.lock().expect("toxics lock");
            if !x.latency.is_zero() || !x.jitter.is_zero() || x.slice.is_some() {
                delayed.fetch_add(1, Ordering::Relaxed);
            }
            // Never before the previous chunk: jitter must not reorder bytes.
            let at = (Instant::now() + x.latency + jitter(&mut seed, x.jitter)).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() || n == 0 {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let x = *toxics.lock().expect("toxics lock");
            if chunk.is_empty() {
                tokio::time::sleep(x.slow_close).await;
                let _ = to.shutdown().await;
                return;
            }
            let ok = match x.slice {
                Some(pause) => {
                    let mut ok = true;
                    for b in &chunk {
                        if to.write_all(std::slice::from_ref(b)).await.is_err() {
                            ok = false;
                            break;
                        }
                        tokio::time::sleep(pause).await;
                    }
                    ok
                }
                None => to.write_all(&chunk).await.is_ok(),
            };
            if !ok {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}
