//! The memory a replica may need at worst, against the memory limit of its
//! container (cgroup), so that a config that would be OOM-killed under a
//! flood of slow headers says so when it is loaded, not when the kernel
//! kills every call of the replica at once.
//!
//! A session still reading its header holds its first 2 KiB of buffer, its
//! task, sockets and registrations, and whatever its buffer grew beyond
//! that, which all such sessions share within `limits.max_header_memory`.
//! Measured in a cgroup with 2,000 connections stalled mid-header: 8.9 KB
//! a connection with 2 KB headers, 26.3 KB with 15 KB headers (1.5 KB of
//! each the kernel's). A relayed session holds no header: about 3 KB.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use agiproxy_config::Limits;

use crate::session::header::INITIAL_BUFFER;

/// A session's cost beyond its header buffer, at worst (see above).
pub const SESSION_OVERHEAD: u64 = 10 * 1024;
/// The process itself: runtime, config, metrics (a fresh proxy is 10–25 MB).
pub const BASE: u64 = 32 * 1024 * 1024;

static LIMIT: OnceLock<Option<u64>> = OnceLock::new();

/// What [`Limits`] can make a replica hold at worst: every session slot
/// taken by a header still being sent, and as many of them grown to
/// `max_header_bytes` as `max_header_memory` allows.
pub fn worst_case(limits: &Limits) -> u64 {
    let (sessions, bytes) = (limits.max_sessions as u64, limits.max_header_bytes as u64);
    let first = bytes.min(INITIAL_BUFFER as u64);
    let grown = sessions
        .saturating_mul(bytes - first)
        .min(limits.max_header_memory as u64);
    sessions
        .saturating_mul(first.saturating_add(SESSION_OVERHEAD))
        .saturating_add(grown)
        .saturating_add(BASE)
}

/// Reads the memory limit of this process's cgroup, once (blocking file
/// reads: call it off the runtime's workers).
pub fn init() {
    LIMIT.get_or_init(|| read_limit(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup")));
}

/// The limit read by [`init`]; `None`: no limit, none found, or not read.
pub fn limit() -> Option<u64> {
    LIMIT.get().copied().flatten()
}

/// The warning for `limits` under `limit`, if the worst case exceeds it.
pub fn check(limits: &Limits, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let worst = worst_case(limits);
    (worst > limit).then(|| {
        let mib = |b: u64| b.div_ceil(1024 * 1024);
        format!(
            "limits.max_sessions ({}) with limits.max_header_bytes ({}) and \
             limits.max_header_memory ({} MiB) can hold {} MiB when every session is a header \
             still being sent (a flood of slow connections), above this container's memory \
             limit of {} MiB: the kernel would kill the process and every call on it. Raise \
             the memory limit to at least {} MiB, or lower limits.max_sessions or \
             limits.max_header_memory",
            limits.max_sessions,
            limits.max_header_bytes,
            mib(limits.max_header_memory as u64),
            mib(worst),
            mib(limit),
            mib(worst),
        )
    })
}

/// The limit of the memory cgroup named in `proc_cgroup` (the process's
/// `/proc/self/cgroup`) under `root`: cgroup v2's `memory.max`, else v1's
/// `memory.limit_in_bytes`; in a container with its own cgroup namespace
/// the process's path is `/`, and the files are at `root` itself.
fn read_limit(proc_cgroup: &Path, root: &Path) -> Option<u64> {
    let own = std::fs::read_to_string(proc_cgroup).unwrap_or_default();
    candidates(&own, root)
        .into_iter()
        .find_map(|file| parse_limit(&std::fs::read_to_string(file).ok()?))
}

/// Where the limit may be, most specific first.
fn candidates(proc_cgroup: &str, root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in proc_cgroup.lines() {
        // hierarchy-ID:controllers:path
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            files.push(root.join(rel).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(root.join("memory").join(rel).join("memory.limit_in_bytes"));
        }
    }
    files.push(root.join("memory.max"));
    files.push(root.join("memory/memory.limit_in_bytes"));
    files
}

/// A limit file's value; `max` (v2) and v1's "unlimited" (a page-rounded
/// `i64::MAX`) are no limit.
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_sessions: usize, max_header_bytes: usize, max_header_memory: usize) -> Limits {
        Limits {
            max_sessions,
            max_header_bytes,
            max_header_memory,
            ..Limits::default()
        }
    }

    #[test]
    fn the_worst_case_is_every_slot_holding_a_header_and_the_budget_used() {
        const MIB: u64 = 1 << 20;
        // The chart's defaults: 20,000 x 12 KiB, 64 MiB grown, 32 MiB: 331 MiB.
        let chart = limits(20_000, 16_384, 64 << 20);
        assert_eq!(worst_case(&chart), 20_000 * 12 * 1024 + 64 * MIB + 32 * MIB);
        assert!(check(&chart, Some(512 * MIB)).is_none());
        assert!(check(&chart, Some(256 * MIB)).is_some());
        assert!(check(&chart, None).is_none());
        // A budget larger than every buffer grown counts as what they can take.
        let small = limits(10, 16_384, 1 << 30);
        assert_eq!(worst_case(&small), 10 * (16_384 + 10 * 1024) + 32 * MIB);
        // Headers bounded below the first buffer never grow.
        let tiny = limits(10, 512, 1 << 30);
        assert_eq!(worst_case(&tiny), 10 * (512 + 10 * 1024) + 32 * MIB);
        assert!(check(&limits(usize::MAX, usize::MAX, usize::MAX), Some(1 << 40)).is_some());
    }

    #[test]
    fn the_warning_names_the_limits_and_what_is_needed() {
        let w = check(&limits(20_000, 16_384, 64 << 20), Some(256 * 1024 * 1024)).unwrap();
        assert!(w.contains("limits.max_sessions (20000)"), "{w}");
        assert!(w.contains("limits.max_header_memory (64 MiB)"), "{w}");
        assert!(w.contains("memory limit of 256 MiB"), "{w}");
        assert!(w.contains("at least 331 MiB"), "{w}");
    }

    #[test]
    fn limits_are_read_from_the_process_cgroup_v2_or_v1() {
        let dir = std::env::temp_dir().join(format!("agiproxy-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let write = |rel: &str, text: &str| {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        let proc = dir.join("proc-cgroup");
        // v2, the process in a nested cgroup.
        write("proc-cgroup", "0::/kubepods/pod1/c1\n");
        write("root/kubepods/pod1/c1/memory.max", "536870912\n");
        assert_eq!(read_limit(&proc, &dir.join("root")), Some(512 << 20));
        // v2 in its own namespace ("/"), no limit.
        write("proc-cgroup", "0::/\n");
        write("root/memory.max", "max\n");
        assert_eq!(read_limit(&proc, &dir.join("root")), None);
        // v1 (hybrid: v2's line names no controller and has no file).
        write(
            "proc-cgroup",
            "4:memory:/process_api/x\n2:cpuacct:/\n0::/\n",
        );
        std::fs::remove_file(dir.join("root/memory.max")).unwrap();
        write(
            "root/memory/process_api/x/memory.limit_in_bytes",
            "1073741824\n",
        );
        assert_eq!(read_limit(&proc, &dir.join("root")), Some(1 << 30));
        write(
            "root/memory/process_api/x/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(read_limit(&proc, &dir.join("root")), None);
        // Nothing readable at all.
        assert_eq!(read_limit(&dir.join("none"), &dir.join("none")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
