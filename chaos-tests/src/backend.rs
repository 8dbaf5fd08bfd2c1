//! `FakeBackend`: a scriptable FastAGI server on `127.0.0.1:0`.
//!
//! Each accepted connection runs on its own task with a snapshot of the
//! current [`Behaviour`]; `set_behaviour` affects later connections only.
//! `stop()` closes the listener and every live connection, so later connects
//! are refused; `restart()` listens again on the same port, for kill/restart
//! tests.

mod behaviour;
mod session;
mod stats;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

pub use self::behaviour::{Behaviour, Step, Then, FILLER_COMMAND, SPLIT_LINE_PAUSE};
pub use self::stats::{BackendStats, SessionLog};
pub use crate::net::{blackholed_listener, refused_addr, still_open, Blackhole};

use self::session::{serve, Conn};

/// A running accept loop and the way to stop it.
struct Server {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A fake FastAGI server. Dropping it stops it.
pub struct FakeBackend {
    name: String,
    addr: SocketAddr,
    behaviour: Arc<RwLock<Arc<Behaviour>>>,
    stats: Arc<BackendStats>,
    server: Mutex<Option<Server>>,
}

impl std::fmt::Debug for FakeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeBackend")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl FakeBackend {
    /// Binds `127.0.0.1:0` and serves `behaviour`.
    ///
    /// # Panics
    /// If no loopback port can be bound: the test cannot run at all then.
    pub async fn start(behaviour: Behaviour) -> FakeBackend {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("FakeBackend: cannot listen on 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("FakeBackend: listener has no address: {e}"));
        let backend = FakeBackend {
            name: format!("backend-{}", addr.port()),
            addr,
            behaviour: Arc::new(RwLock::new(Arc::new(behaviour))),
            stats: Arc::default(),
            server: Mutex::new(None),
        };
        backend.spawn(listener);
        backend
    }

    /// Like [`start`](Self::start), on a given loopback address (e.g.
    /// `127.0.0.2:<port>`, for several backends behind one DNS name and port).
    pub async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> io::Result<FakeBackend> {
        let listener = listen(addr)?;
        let addr = listener.local_addr()?;
        let backend = FakeBackend {
            name: format!("backend-{addr}"),
            addr,
            behaviour: Arc::new(RwLock::new(Arc::new(behaviour))),
            stats: Arc::default(),
            server: Mutex::new(None),
        };
        backend.spawn(listener);
        Ok(backend)
    }

    /// The same backend under another name (for demo output).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters and logs, shared across restarts.
    pub fn stats(&self) -> Arc<BackendStats> {
        Arc::clone(&self.stats)
    }

    /// What connections accepted from now on do.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.behaviour.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(behaviour);
    }

    pub fn is_running(&self) -> bool {
        self.server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Closes the listener (later connects are refused) and every live
    /// connection; returns once all are closed.
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Server { shutdown, task }) = server {
            let _ = shutdown.send(());
            let _ = task.await;
        }
    }

    /// Stops if running, then listens again on the same port.
    pub async fn restart(&self) -> io::Result<()> {
        self.stop().await;
        let listener = listen(self.addr)?;
        self.spawn(listener);
        Ok(())
    }

    fn spawn(&self, listener: TcpListener) {
        let (shutdown, stop) = oneshot::channel();
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.behaviour),
            Arc::clone(&self.stats),
            stop,
        ));
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(Server { shutdown, task });
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        // Dropping the sender ends the accept loop, which closes everything.
        if let Some(server) = self
            .server
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            drop(server.shutdown);
        }
    }
}

/// A listener with `SO_REUSEADDR`, so a restart can take the port back while
/// old connections sit in TIME_WAIT.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    behaviour: Arc<RwLock<Arc<Behaviour>>>,
    stats: Arc<BackendStats>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut sessions = JoinSet::new();
    let mut accepted_here = 0usize;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let mut behaviour = Arc::clone(&behaviour.read().unwrap_or_else(|e| e.into_inner()));
                    if let Behaviour::Cycle(list) = &*behaviour {
                        if !list.is_empty() {
                            behaviour = Arc::new(list[accepted_here % list.len()].clone());
                        }
                    }
                    accepted_here += 1;
                    // Counted as accepted here, so an abort before the first
                    // poll still files the session as finished.
                    let mut conn = Conn::new(stream, Arc::clone(&stats), records(&behaviour));
                    sessions.spawn(async move {
                        if let Err(e) = serve(&mut conn, &behaviour).await {
                            conn.set_error(&e);
                        }
                    });
                }
                // Out of descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(listener);
    sessions.shutdown().await;
}

/// Whether sessions keep header and reply texts (not the benchmark backend).
fn records(behaviour: &Behaviour) -> bool {
    match behaviour {
        Behaviour::Echo { .. } => false,
        Behaviour::FirstCommandAfter(_, inner) => records(inner),
        _ => true,
    }
}
