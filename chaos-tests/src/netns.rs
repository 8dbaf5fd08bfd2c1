//! Test hosts in Linux network namespaces, for faults only a real network
//! makes (dropped SYNs, resets, black holes, loss, bandwidth, links down,
//! addresses moving). Needs root and `ip`/`iptables`/`tc`; every namespace,
//! link and address is created by the test and removed on drop, and nothing
//! in the root namespace is touched: the veth pairs are created straight
//! into their namespaces, and no namespace has a route off its own links.
//!
//! Sockets belong to the namespace of the thread that creates them, so each
//! namespace gets its own tokio runtime whose threads entered it with
//! `setns(2)` before the runtime was built ([`Netns::runtime`]); a worker
//! checks its namespace when it starts, so a socket can never be made in the
//! root namespace by mistake.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Why namespaces cannot be used here (not root, no `ip`, ...), or `None`.
pub fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    for tool in ["ip", "iptables", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables)"
            ));
        }
    }
    let probe = Netns::create("probe");
    match probe {
        Ok(_) => None,
        Err(e) => Some(format!("`ip netns add` fails: {e}")),
    }
}

fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One network namespace, deleted (with its links) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace with `lo` up. Names carry the process id, so tests
    /// run at the same time by several processes never collide.
    pub fn create(role: &str) -> io::Result<Netns> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "agx{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip netns exec NS PROGRAM ARGS`.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// A command that runs inside the namespace (for long-lived processes).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Connects `self` and `other` with a veth pair (`here` in self, `there`
    /// in other), addresses given in CIDR form, both ends up.
    pub fn link(
        &self,
        here: &str,
        here_addr: &str,
        other: &Netns,
        there: &str,
        there_addr: &str,
    ) -> io::Result<()> {
        self.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ])?;
        self.ip(&["addr", "add", here_addr, "dev", here])?;
        other.ip(&["addr", "add", there_addr, "dev", there])?;
        self.ip(&["link", "set", here, "up"])?;
        other.ip(&["link", "set", there, "up"])?;
        Ok(())
    }

    /// The namespace's inode, as `/proc/thread-self/ns/net` shows it.
    fn id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(self.path())?.ino())
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> io::Result<()> {
        let f = std::fs::File::open(self.path())?;
        // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A multi-thread tokio runtime whose every thread lives in this
    /// namespace: sockets made by its tasks are this host's. Run futures
    /// with `spawn` (a `block_on` future would run on the caller's thread,
    /// in the caller's namespace).
    pub fn runtime(&self, threads: usize) -> io::Result<tokio::runtime::Runtime> {
        let path = self.path();
        let want = self.id()?;
        let name = self.name.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                self.enter()?;
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .thread_name(format!("ns-{name}"))
                    .on_thread_start(move || {
                        use std::os::unix::fs::MetadataExt;
                        let here = std::fs::metadata("/proc/thread-self/ns/net")
                            .map(|m| m.ino())
                            .unwrap_or(0);
                        assert_eq!(here, want, "runtime thread outside {}", path.display());
                    })
                    .build()
            })
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veths (and their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
