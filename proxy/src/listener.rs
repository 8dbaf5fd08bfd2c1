//! Listeners and the accept loop: binding (all or none), backoff on accept
//! errors, serving what the kernel queued when a listener closes, and the
//! hand-over of each accepted connection to its session (or to FAILURE when
//! the session cap or the descriptor reserve says no).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agiproxy_config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::session::{self, Shared};
use crate::snapshot::ListenerView;
use crate::Reason;

/// Pending connections the kernel may queue per listener.
const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // The OS error is in the message and not a `source`, so that a chain
    // printed with `{:#}` says it once.
    #[error(
        "listeners[{index}] ({name}): cannot listen on {addr}: {error}{}",
        bind_hint(error, *held_by)
    )]
    Bind {
        index: usize,
        name: String,
        addr: SocketAddr,
        error: io::Error,
        /// This replica's own socket that overlaps `addr`: the port is
        /// ours, not another process's.
        held_by: Option<Held>,
    },
}

/// A listener that is accepting: its sockets' loops stop with `stop`.
pub(crate) struct ListenerEntry {
    pub(crate) configured: SocketAddr,
    pub(crate) bound: SocketAddr,
    pub(crate) stop: CancellationToken,
    /// Ends (its sender dropped) once the socket is closed: a change that
    /// binds the address again waits for it.
    pub(crate) closed: tokio::sync::oneshot::Receiver<()>,
}

/// A configured listener, bound, not yet accepting.
pub(crate) struct Bound {
    configured: SocketAddr,
    socket: std::net::TcpListener,
}

/// A socket of this replica that holds a port: a running listener (by the
/// address it is bound to), or the control API, bound at start (both
/// families when it listens on `[::]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Listener(SocketAddr),
    ControlApi(SocketAddr),
}

impl Held {
    /// The same rules as `agiproxy check` uses on a config.
    fn overlaps(self, addr: SocketAddr) -> bool {
        match self {
            Held::Listener(own) => agiproxy_config::binds_clash(own, addr),
            Held::ControlApi(own) => agiproxy_config::control_takes(own, addr),
        }
    }
}

/// What to do about a failed bind, when there is a likely answer.
fn bind_hint(e: &io::Error, held_by: Option<Held>) -> String {
    match (e.kind(), held_by) {
        (io::ErrorKind::AddrInUse, Some(Held::ControlApi(own))) => format!(
            "; this replica's own control API (control.address, bound at start) holds that port \
             on {own}: give the listener another port"
        ),
        // A reload binds its new listeners before it closes the old ones,
        // so that a failure changes nothing: an address that overlaps a
        // running one (127.0.0.1:P to 0.0.0.0:P) cannot be taken in one
        // change (audit: the hint blamed another process).
        (io::ErrorKind::AddrInUse, Some(Held::Listener(own))) => format!(
            "; this replica's own listener on {own} holds that port, and stays open until the \
             new listeners are bound: restart the replica with the new address, or remove that \
             listener in one change and add the new one in the next (the port refuses calls \
             in between)"
        ),
        (io::ErrorKind::AddrInUse, None) => "; is another process using it?".into(),
        (io::ErrorKind::AddrNotAvailable, _) => {
            "; no interface of this host has that address".into()
        }
        (io::ErrorKind::PermissionDenied, _) => {
            "; ports below 1024 need CAP_NET_BIND_SERVICE".into()
        }
        _ => String::new(),
    }
}

/// Binds the listeners of `config` not already bound (`kept`, by configured
/// address), all or none; `held`: this replica's sockets, to name in an
/// error.
pub(crate) fn bind_all(
    config: &Config,
    kept: &[SocketAddr],
    held: &[Held],
) -> Result<Vec<Bound>, ServerError> {
    let mut bound = Vec::new();
    for (index, l) in config.listeners.iter().enumerate() {
        if kept.contains(&l.address) {
            continue;
        }
        let socket = bind(l.address).map_err(|error| ServerError::Bind {
            index,
            name: l.name.clone(),
            addr: l.address,
            held_by: held.iter().copied().find(|h| h.overlaps(l.address)),
            error,
        })?;
        bound.push(Bound {
            configured: l.address,
            socket,
        });
    }
    Ok(bound)
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux): set
    // once here rather than with a system call per session.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Starts accepting on `bound`, on the calling runtime.
pub(crate) fn spawn_listener(shared: &Arc<Shared>, bound: Bound) -> ListenerEntry {
    let configured = bound.configured;
    let addr = bound.socket.local_addr().unwrap_or(configured);
    let stop = shared.drain.stop_accepting.child_token();
    tracing::info!(address = %addr, "listening for Asterisk");
    let (closing, closed) = tokio::sync::oneshot::channel();
    // Tracked, so that a drain waits for it to serve its queue.
    shared.drain.listeners.spawn(accept_loop(
        shared.clone(),
        configured,
        bound.socket,
        stop.clone(),
        closing,
    ));
    ListenerEntry {
        configured,
        bound: addr,
        stop,
        closed,
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    configured: SocketAddr,
    socket: std::net::TcpListener,
    stop: CancellationToken,
    closing: tokio::sync::oneshot::Sender<()>,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %configured, error = %e, "cannot accept on this listener");
            return;
        }
    };
    let mut backoff = Duration::from_millis(5);
    // This listener's settings as last seen in a snapshot. A reload that
    // removes it swaps the snapshot before the loop stops, and the queue is
    // served after: those connections keep its name and `proxy_protocol`
    // (looked up in the new snapshot, a balancer's PROXY line was read as
    // Asterisk's first header line and the call closed silently: audit).
    let mut seen: Option<Arc<ListenerView>> = shared.snapshot.load().listener(configured).cloned();
    // Made once: a new `cancelled()` per accept would register and drop a
    // waiter under the token's lock for every call.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    spawn_session(&shared, configured, &mut seen, stream, peer);
                }
                Err(e) => {
                    // Out of descriptors or memory: slow down rather than spin.
                    if crate::fds::is_local(&e) {
                        shared.metrics.local_resource_errors.with_label_values(&["accept"]).inc();
                        crate::fds::warn("accept", &e);
                    } else {
                        tracing::warn!(address = %configured, error = %e, ?backoff, "accept failed");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    // Connections already queued by the kernel would be reset when the
    // listener closes, which Asterisk reads as SUCCESS: serve them too.
    // Asked of the socket itself, until it has none: tokio's `poll_accept`
    // answers from its cached readiness, and missed every connection queued
    // since its last look (an audit saw 74 calls reset in 150 listener
    // removals under load).
    let address = listener.local_addr().unwrap_or(configured);
    match listener.into_std() {
        Ok(listener) => {
            let served = accept_queued(&listener, |stream, peer| {
                spawn_session(&shared, configured, &mut seen, stream, peer)
            });
            tracing::info!(address = %address, queued = served, "listener closed");
        }
        Err(e) => {
            tracing::warn!(address = %address, error = %e, "listener closed; connections queued on it are reset")
        }
    }
    // The socket is closed by now: its address may be bound again.
    drop(closing);
}

/// Accepts every connection queued on `listener` (non-blocking) and hands
/// each to `serve`; returns how many.
fn accept_queued(
    listener: &std::net::TcpListener,
    mut serve: impl FnMut(TcpStream, SocketAddr),
) -> usize {
    let mut served = 0;
    if listener.set_nonblocking(true).is_err() {
        return 0;
    }
    // Bounded: the backlog, plus what arrives meanwhile, at most twice over.
    for _ in 0..2 * LISTEN_BACKLOG {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // WouldBlock: none left. Anything else (out of descriptors):
            // what is left is reset, as before.
            Err(_) => break,
        };
        let stream = match stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            Ok(s) => s,
            Err(_) => continue,
        };
        serve(stream, peer);
        served += 1;
    }
    served
}

fn spawn_session(
    shared: &Arc<Shared>,
    configured: SocketAddr,
    seen: &mut Option<Arc<ListenerView>>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    // TCP_NODELAY: inherited from the listener (see `bind`).
    // The one snapshot load of this session: it keeps this config to its end.
    let snap = shared.snapshot.load_full();
    if let Some(now) = snap.listener(configured) {
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, now)) {
            *seen = Some(now.clone());
        }
    }
    let (name, proxied) = match seen {
        Some(l) => l.settings(peer.ip()),
        None => (Arc::from("-"), false),
    };
    let max = snap.config.limits.max_sessions;
    let sh = shared.clone();
    let mut header = None;
    let admitted = if crate::fds::in_reserve(std::os::fd::AsRawFd::as_raw_fd(&stream)) {
        // Fewer than the reserve's descriptors left: they are for the
        // control API and health checks. The call hears FAILURE at once.
        shared
            .metrics
            .local_resource_errors
            .with_label_values(&["accept"])
            .inc();
        crate::fds::warn("accept", &crate::fds::reserve_error());
        Err(Reason::LocalResources)
    } else {
        let (slot, held) = shared.header_slot(peer.ip());
        if held > snap.config.limits.max_headers_per_peer && shared.active() >= max / 2 {
            // The replica is half full and this address already has
            // `max_headers_per_peer` connections sending their header: a
            // flood of slow ones, not an Asterisk (whose header takes a
            // round trip). Below half, a burst of calls is never refused.
            shared.metrics.peer_header_limit.inc();
            Err(Reason::Overloaded)
        } else {
            header = Some(slot);
            shared.admit(max).ok_or(Reason::Overloaded)
        }
    };
    let sessions = &shared.drain.sessions;
    match admitted {
        Ok(active) => {
            let admission = session::Admission {
                active,
                header,
                rollout: None,
            };
            sessions.spawn(session::serve(
                sh, snap, name, stream, peer, proxied, admission,
            ));
        }
        Err(reason) => {
            // Refusals are bounded too: in the reserve, to half of it (the
            // rest stays the control API's); over the cap, to an eighth of
            // it. A real Asterisk is told FAILURE in a millisecond, so only
            // a flood of slow connections fills them; beyond, a connection
            // is closed unanswered (counted) rather than let it take the
            // descriptors and memory the running calls need.
            let cap = match reason {
                Reason::LocalResources => {
                    crate::fds::limit().map_or(64, |l| (crate::fds::reserve(l) / 2).max(4))
                }
                _ => (max / 8).max(64),
            };
            match shared.refuse(cap, reason) {
                Some(refusal) => {
                    sessions.spawn(session::reject(
                        sh, snap, name, stream, peer, proxied, refusal,
                    ));
                }
                None => {
                    shared
                        .metrics
                        .refusals_dropped
                        .with_label_values(&[reason.as_str()])
                        .inc();
                    tracing::debug!(%peer, reason = reason.as_str(), "refused connection closed unanswered: too many refusals in flight");
                    drop(stream);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removed listener serves what the kernel queued on it. Tokio's
    /// `poll_accept`, asked with a no-op waker (the way it was done),
    /// answers from its cached readiness: once an accept had found the
    /// queue empty, connections queued after it were not seen, and were
    /// reset when the listener closed.
    #[tokio::test]
    async fn a_closing_listener_serves_every_queued_connection() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        // The accept loop's last look: nothing queued.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(listener.poll_accept(&mut cx).is_pending());
        // Five calls arrive (handshakes done by the kernel)...
        let clients: Vec<std::net::TcpStream> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // ...which the cached readiness does not know of.
        assert!(listener.poll_accept(&mut cx).is_pending());
        let mut peers = Vec::new();
        let served = accept_queued(&listener.into_std().unwrap(), |s, p| {
            peers.push((s, p));
        });
        assert_eq!(served, 5);
        let mine: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        for (_, p) in &peers {
            assert!(mine.contains(p), "{p}");
        }
    }

    /// Moving a listener from 127.0.0.1:P to 0.0.0.0:P in one reload fails,
    /// as the old one is still open: the message names it, not "another
    /// process" (audit).
    #[test]
    fn a_port_held_by_our_own_listener_is_named_as_such() {
        let running = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let held = running.local_addr().unwrap();
        let config = agiproxy_config::from_yaml_str(&format!(
            "version: 1\nlisteners:\n  - {{ name: moved, address: \"0.0.0.0:{}\" }}\n\
             routes: [{{ name: all, pool: p }}]\n\
             pools: [{{ name: p, backends: [{{ address: \"127.0.0.1:1\" }}] }}]\n",
            held.port()
        ))
        .unwrap();
        let ours = bind_all(&config, &[held], &[Held::Listener(held)])
            .err()
            .expect("the port is taken");
        let ours = ours.to_string();
        assert!(
            ours.contains(&format!(
                "this replica's own listener on {held} holds that port"
            )),
            "{ours}"
        );
        assert!(!ours.contains("another process"), "{ours}");
        // Held by a socket that is no listener of ours: another process.
        let theirs = bind_all(&config, &[], &[])
            .err()
            .expect("the port is taken");
        let control = bind_all(&config, &[], &[Held::ControlApi(held)])
            .err()
            .expect("the port is taken")
            .to_string();
        assert!(
            control.contains("this replica's own control API"),
            "{control}"
        );
        assert!(
            theirs.to_string().ends_with("is another process using it?"),
            "{theirs}"
        );
        let clash = agiproxy_config::binds_clash;
        assert!(clash("[::]:5".parse().unwrap(), "[::1]:5".parse().unwrap()));
        assert!(!clash(
            "[::]:5".parse().unwrap(),
            "0.0.0.0:5".parse().unwrap()
        ));
        assert!(!clash(
            "127.0.0.1:5".parse().unwrap(),
            "127.0.0.2:5".parse().unwrap()
        ));
        assert!(!clash(
            "0.0.0.0:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap()
        ));
        drop(running);
    }

    /// A reload that removes a listener swaps the snapshot before the accept
    /// loop stops, and the queue is served after that: a connection in
    /// between keeps the listener's name and `proxy_protocol`. Looked up in
    /// the new snapshot, a balancer's PROXY line was read as Asterisk's
    /// first header line and the call closed without a word (SUCCESS to
    /// Asterisk; an audit saw 3 in 6 removals under load).
    #[tokio::test]
    async fn a_removed_listener_keeps_its_settings_for_the_calls_it_still_takes() {
        use crate::snapshot::{ConfigMeta, Snapshot};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = |listener: &str| {
            agiproxy_config::from_yaml_str(&format!(
                "version: 1\nlisteners:\n  - {listener}\nroutes: [{{ name: all, pool: p }}]\n\
                 pools: [{{ name: p, backends: [{{ address: \"127.0.0.1:1\" }}] }}]\n"
            ))
            .unwrap()
        };
        let with = config(
            "{ name: lb, address: \"127.0.0.1:0\", proxy_protocol: { from: [127.0.0.1/32] } }",
        );
        let without = config("{ name: other, address: \"127.0.0.2:0\" }");
        let meta = || ConfigMeta::new(1, "test", Arc::from(""));
        let shared = Arc::new(Shared::new(Snapshot::build(with, meta(), None)));
        shared.snapshot.load().activate();
        let configured: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let socket = bind(configured).unwrap();
        let addr = socket.local_addr().unwrap();
        let entry = spawn_listener(&shared, Bound { configured, socket });
        tokio::task::yield_now().await;
        // The reload's swap; its `stop.cancel()` has not come yet.
        shared
            .snapshot
            .store(Arc::new(Snapshot::build(without, meta(), None)));
        let mut call = TcpStream::connect(addr).await.unwrap();
        call.write_all(
            b"PROXY TCP4 10.9.9.9 127.0.0.1 5555 4573\r\nagi_network: yes\n\
              agi_network_script: ivr\nagi_request: agi://p/ivr\n\n",
        )
        .await
        .unwrap();
        // Its only backend refuses: FAILURE, spoken, starting with the
        // reason, the PROXY line taken as the balancer's. Looked up in the
        // new snapshot, it would be an unlisted peer's: FAILURE
        // `proxy_protocol`.
        let mut first = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut byte = [0u8; 1];
            while !first.ends_with(b"\n") {
                call.read_exact(&mut byte).await?;
                first.push(byte[0]);
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("an answer within 5 s");
        assert!(read.is_ok(), "closed without a word");
        assert_eq!(
            String::from_utf8_lossy(&first),
            "SET VARIABLE AGIPROXY_ERROR \"connect_failed\"\n"
        );
        entry.stop.cancel();
    }

    /// Sessions rely on it: without TCP_NODELAY every command to Asterisk
    /// could wait for Nagle's algorithm.
    #[tokio::test]
    async fn accepted_sessions_have_nodelay_without_a_call_per_session() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
