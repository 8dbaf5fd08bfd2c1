//! CPU time and resident memory of processes, from `/proc/<pid>/stat`, and
//! of ourselves from `getrusage`: the report says how busy the generator
//! was and what the proxy under test cost.

use std::io;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// utime + stime, all threads (kernel clock ticks, usually 10 ms).
    pub cpu: Duration,
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat`.
pub fn sample(pid: u32) -> io::Result<Sample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text, clock_ticks_per_sec(), page_size()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected /proc/PID/stat format",
        )
    })
}

/// The fields after the command name, which may itself contain spaces and
/// parentheses, hence the search for the last `)`.
fn parse_stat(text: &str, ticks_per_sec: u64, page: u64) -> Option<Sample> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, rss 24.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)? + field(15)?;
    Some(Sample {
        cpu: Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / ticks_per_sec.max(1)),
        rss_bytes: field(24)?.saturating_mul(page),
    })
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Our own CPU time (user + system, all threads), microsecond resolution.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A process to watch during a run, e.g. `proxy=1234`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
        let pid = pid.parse().map_err(|_| format!("not a pid: {pid}"))?;
        Ok(Watched {
            name: name.to_owned(),
            pid,
        })
    }
}

/// What a watched process (or the generator itself) did over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub name: String,
    pub pid: u32,
    pub cpu_secs: f64,
    /// CPU time over wall time: 100 is one core fully busy.
    pub cpu_percent: f64,
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
}

/// Readings at the start and end of a measurement window.
#[derive(Debug)]
pub struct Watcher {
    watched: Vec<Watched>,
    start: Option<(Instant, Duration, Vec<Option<Sample>>)>,
    usage: Vec<Usage>,
}

impl Watcher {
    pub fn new(watched: Vec<Watched>) -> Self {
        Self {
            watched,
            start: None,
            usage: Vec::new(),
        }
    }

    fn read_all(&self) -> Vec<Option<Sample>> {
        self.watched.iter().map(|w| sample(w.pid).ok()).collect()
    }

    pub fn start(&mut self) {
        self.start = Some((Instant::now(), self_cpu(), self.read_all()));
    }

    /// Closes the window; the generator itself is the first entry.
    pub fn end(&mut self) {
        let Some((t0, cpu0, samples0)) = self.start.take() else {
            return;
        };
        let wall = t0.elapsed().as_secs_f64().max(1e-9);
        let own = (self_cpu().saturating_sub(cpu0)).as_secs_f64();
        let mut usage = vec![Usage {
            name: "generator".to_owned(),
            pid: std::process::id(),
            cpu_secs: own,
            cpu_percent: 100.0 * own / wall,
            ..Usage::default()
        }];
        for (w, s0) in self.watched.iter().zip(samples0) {
            let s1 = sample(w.pid).ok();
            let (cpu, rss0, rss1) = match (s0, s1) {
                (Some(a), Some(b)) => (
                    b.cpu.saturating_sub(a.cpu).as_secs_f64(),
                    a.rss_bytes,
                    b.rss_bytes,
                ),
                // The process is gone or was never there: say so with zeros
                // rather than fail the whole run.
                _ => (0.0, 0, 0),
            };
            usage.push(Usage {
                name: w.name.clone(),
                pid: w.pid,
                cpu_secs: cpu,
                cpu_percent: 100.0 * cpu / wall,
                rss_kib_start: rss0 / 1024,
                rss_kib_end: rss1 / 1024,
            });
        }
        self.usage = usage;
    }

    pub fn usage(&self) -> &[Usage] {
        &self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_the_command_name() {
        // A command name with spaces and a parenthesis, as /proc allows.
        let line = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194304 500 0 0 0 \
                    250 50 0 0 20 0 3 0 100 123456789 2560 18446744073709551615";
        let s = parse_stat(line, 100, 4096).unwrap();
        assert_eq!(s.cpu, Duration::from_secs(3));
        assert_eq!(s.rss_bytes, 2560 * 4096);
    }

    #[test]
    fn our_own_process_reads_back() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!("proxy=12".parse::<Watched>().unwrap().pid == 12);
        assert!("proxy".parse::<Watched>().is_err());
    }
}
