//! What one session did: the access-log line, and what tests and the demo
//! observe.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::outcome::{Outcome, Reason};
use crate::logging::{self, AccessLog, LogFormat};
use crate::pool::BackendLive;

/// What happened in one session: the access-log line, and what tests and
/// the demo observe.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// The Asterisk: the connection's peer, or the caller a load balancer's
    /// PROXY header named (then the balancer is `via`).
    pub peer: SocketAddr,
    pub via: Option<SocketAddr>,
    pub listener: Arc<str>,
    /// Generation of the config snapshot the session ran on.
    pub generation: u64,
    /// `agi_network_script` as Asterisk sent it.
    pub script: String,
    pub route: Option<Arc<str>>,
    pub pool: Option<Arc<str>>,
    pub backend: Option<SocketAddr>,
    pub attempts: u32,
    pub connect_time: Option<Duration>,
    pub first_command_time: Option<Duration>,
    pub duration: Duration,
    pub bytes_from_asterisk: u64,
    pub bytes_to_asterisk: u64,
    pub commands: u64,
    pub caller_hung_up: bool,
    pub outcome: Outcome,
    pub reason: Option<Reason>,
    pub header_error: Option<&'static str>,
    /// The committed backend, for its preformatted metric label.
    pub(crate) live_backend: Option<Arc<BackendLive>>,
    /// A rollout route's colour; counted for judgement when the session ends.
    pub(crate) rollout: Option<(Arc<super::rollout::RolloutLive>, super::rollout::Pick)>,
}

impl SessionRecord {
    pub(crate) fn new(peer: SocketAddr, listener: Arc<str>, generation: u64) -> SessionRecord {
        SessionRecord {
            peer,
            via: None,
            listener,
            generation,
            script: String::new(),
            route: None,
            pool: None,
            backend: None,
            attempts: 0,
            connect_time: None,
            first_command_time: None,
            duration: Duration::ZERO,
            bytes_from_asterisk: 0,
            bytes_to_asterisk: 0,
            commands: 0,
            caller_hung_up: false,
            outcome: Outcome::Completed,
            reason: None,
            header_error: None,
            live_backend: None,
            rollout: None,
        }
    }

    /// A PROXY header named the Asterisk behind the connection's peer.
    pub(crate) fn called_by(&mut self, caller: Option<SocketAddr>) {
        if let Some(caller) = caller {
            // An IPv4 Asterisk named IPv4-mapped (`::ffff:192.0.2.6`) is
            // logged as routing and `${remote_ip}` see it: 192.0.2.6.
            let caller = SocketAddr::new(caller.ip().to_canonical(), caller.port());
            self.via = Some(std::mem::replace(&mut self.peer, caller));
        }
    }

    pub(crate) fn log(&self) {
        // A connect closed before any header byte is a port probe (a load
        // balancer's TCP check, a scanner): counted in metrics
        // (header_errors_total{reason="closed"}), not worth a log line each.
        if self.header_error == Some("closed") {
            return;
        }
        match logging::access_log() {
            AccessLog::Off => {}
            AccessLog::Direct(format) => LINE.with(|line| {
                // Reused per thread: a line is built without allocating.
                let mut line = line.borrow_mut();
                line.clear();
                match format {
                    LogFormat::Text => self.write_text(&mut line, SystemTime::now()),
                    LogFormat::Json => self.write_json(&mut line, SystemTime::now()),
                }
                logging::write_access(&line);
            }),
            AccessLog::Tracing => self.log_event(),
        }
    }

    fn reason(&self) -> &'static str {
        self.reason
            .map_or(self.header_error.unwrap_or("-"), |r| r.as_str())
    }

    /// The line tracing's text format would write, in a fixed field order:
    /// `<time>  INFO agiproxy::access: session peer=… reason="-"`.
    fn write_text(&self, b: &mut Vec<u8>, now: SystemTime) {
        timestamp(b, now);
        b.extend_from_slice(b"  INFO agiproxy::access: session peer=");
        socket_addr(b, self.peer);
        if let Some(via) = self.via {
            b.extend_from_slice(b" via=");
            socket_addr(b, via);
        }
        b.extend_from_slice(b" listener=");
        b.extend_from_slice(self.listener.as_bytes());
        b.extend_from_slice(b" generation=");
        int(b, self.generation);
        b.extend_from_slice(b" script=");
        script_text(b, &self.script);
        b.extend_from_slice(b" route=");
        quoted(b, self.route.as_deref().unwrap_or("-"));
        b.extend_from_slice(b" pool=");
        quoted(b, self.pool.as_deref().unwrap_or("-"));
        b.extend_from_slice(b" backend=");
        match self.backend {
            Some(a) => socket_addr(b, a),
            None => b.push(b'-'),
        }
        b.extend_from_slice(b" attempts=");
        int(b, self.attempts);
        if let Some(d) = self.connect_time {
            b.extend_from_slice(b" connect_ms=");
            millis(b, d);
        }
        if let Some(d) = self.first_command_time {
            b.extend_from_slice(b" first_command_ms=");
            millis(b, d);
        }
        b.extend_from_slice(b" duration_ms=");
        millis(b, self.duration);
        b.extend_from_slice(b" bytes_in=");
        int(b, self.bytes_from_asterisk);
        b.extend_from_slice(b" bytes_out=");
        int(b, self.bytes_to_asterisk);
        b.extend_from_slice(b" commands=");
        int(b, self.commands);
        b.extend_from_slice(if self.caller_hung_up {
            b" hangup=true outcome="
        } else {
            b" hangup=false outcome="
        });
        quoted(b, self.outcome.as_str());
        b.extend_from_slice(b" reason=");
        quoted(b, self.reason());
        b.push(b'\n');
    }

    /// The object tracing's flattened JSON format would write, keys in the
    /// same order.
    fn write_json(&self, b: &mut Vec<u8>, now: SystemTime) {
        b.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(b, now);
        b.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"session\",\"peer\":\"");
        socket_addr(b, self.peer);
        if let Some(via) = self.via {
            b.extend_from_slice(b"\",\"via\":\"");
            socket_addr(b, via);
        }
        b.extend_from_slice(b"\",\"listener\":");
        json_str(b, &self.listener);
        b.extend_from_slice(b",\"generation\":");
        int(b, self.generation);
        b.extend_from_slice(b",\"script\":");
        json_str(b, &self.script);
        b.extend_from_slice(b",\"route\":");
        json_str(b, self.route.as_deref().unwrap_or("-"));
        b.extend_from_slice(b",\"pool\":");
        json_str(b, self.pool.as_deref().unwrap_or("-"));
        b.extend_from_slice(b",\"backend\":\"");
        match self.backend {
            Some(a) => socket_addr(b, a),
            None => b.push(b'-'),
        }
        b.extend_from_slice(b"\",\"attempts\":");
        int(b, self.attempts);
        if let Some(d) = self.connect_time {
            b.extend_from_slice(b",\"connect_ms\":");
            millis(b, d);
        }
        if let Some(d) = self.first_command_time {
            b.extend_from_slice(b",\"first_command_ms\":");
            millis(b, d);
        }
        b.extend_from_slice(b",\"duration_ms\":");
        millis(b, self.duration);
        b.extend_from_slice(b",\"bytes_in\":");
        int(b, self.bytes_from_asterisk);
        b.extend_from_slice(b",\"bytes_out\":");
        int(b, self.bytes_to_asterisk);
        b.extend_from_slice(b",\"commands\":");
        int(b, self.commands);
        b.extend_from_slice(if self.caller_hung_up {
            b",\"hangup\":true,\"outcome\":"
        } else {
            b",\"hangup\":false,\"outcome\":"
        });
        json_str(b, self.outcome.as_str());
        b.extend_from_slice(b",\"reason\":");
        json_str(b, self.reason());
        b.extend_from_slice(b",\"target\":\"agiproxy::access\"}\n");
    }

    /// The same line as a `tracing` event, when no log writer of ours runs.
    fn log_event(&self) {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        tracing::info!(
            target: "agiproxy::access",
            peer = %self.peer,
            via = self.via.map(tracing::field::display),
            listener = %self.listener,
            generation = self.generation,
            // A string value: quoted and escaped by tracing's text format,
            // a JSON string in its JSON format (quoting it here quoted it
            // twice there: review).
            script = &*self.script,
            route = self.route.as_deref().unwrap_or("-"),
            pool = self.pool.as_deref().unwrap_or("-"),
            backend = %self.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
            attempts = self.attempts,
            connect_ms = ms(self.connect_time),
            first_command_ms = ms(self.first_command_time),
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_from_asterisk,
            bytes_out = self.bytes_to_asterisk,
            commands = self.commands,
            hangup = self.caller_hung_up,
            outcome = self.outcome.as_str(),
            reason = self.reason(),
            "session"
        );
    }
}

thread_local! {
    /// One access line's buffer per thread, sized for a typical line.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

fn int(b: &mut Vec<u8>, n: impl itoa::Integer) {
    b.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Milliseconds with three decimals (microsecond precision), rounded:
/// `12.270`, never `12.269169999999999`.
fn millis(b: &mut Vec<u8>, d: Duration) {
    let micros = (d.as_nanos() + 500) / 1000;
    int(b, micros / 1000);
    let frac = (micros % 1000) as u16;
    b.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `2026-11-27T10:51:56.431140Z`, as tracing's default timer writes it.
fn timestamp(b: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let two = |b: &mut Vec<u8>, n: u64, sep: u8| {
        b.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8, sep]);
    };
    int(b, y);
    b.push(b'-');
    two(b, m, b'-');
    two(b, d, b'T');
    two(b, sod / 3600, b':');
    two(b, sod / 60 % 60, b':');
    two(b, sod % 60, b'.');
    let mut frac = since.subsec_micros();
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    b.extend_from_slice(&digits);
    b.push(b'Z');
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe as i64 + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn socket_addr(b: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(a) => {
            let [o1, o2, o3, o4] = a.ip().octets();
            for (o, sep) in [(o1, b'.'), (o2, b'.'), (o3, b'.'), (o4, b':')] {
                int(b, o);
                b.push(sep);
            }
            int(b, a.port());
        }
        // IPv6 text form has zero-run compression rules: left to std's
        // formatter, a rarer peer than IPv4 on a PBX network.
        SocketAddr::V6(_) => {
            use std::io::Write;
            let _ = write!(b, "{a}");
        }
    }
}

/// A value as tracing's text format shows a `&str` field: `Debug`-quoted.
fn quoted(b: &mut Vec<u8>, s: &str) {
    b.push(b'"');
    for c in s.chars() {
        match c {
            '"' => b.extend_from_slice(b"\\\""),
            '\\' => b.extend_from_slice(b"\\\\"),
            '\n' => b.extend_from_slice(b"\\n"),
            '\r' => b.extend_from_slice(b"\\r"),
            '\t' => b.extend_from_slice(b"\\t"),
            c if c.is_control() => {
                use std::io::Write;
                let _ = write!(b, "\\u{{{:x}}}", c as u32);
            }
            c => {
                let mut utf8 = [0; 4];
                b.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    b.push(b'"');
}

/// The script in the text line: bare when it is printable ASCII without a
/// space, quote or backslash (what script paths and queries are made of),
/// else quoted and escaped. The header is the peer's: written raw, a space
/// would let it forge fields (`script=x route="admin"`) and a control byte
/// send terminal escapes into the log.
fn script_text(b: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
    {
        b.extend_from_slice(s.as_bytes());
    } else {
        quoted(b, s);
    }
}

/// A JSON string (RFC 8259): quote, backslash and control characters escaped.
fn json_str(b: &mut Vec<u8>, s: &str) {
    b.push(b'"');
    for &byte in s.as_bytes() {
        match byte {
            b'"' => b.extend_from_slice(b"\\\""),
            b'\\' => b.extend_from_slice(b"\\\\"),
            b'\n' => b.extend_from_slice(b"\\n"),
            b'\r' => b.extend_from_slice(b"\\r"),
            b'\t' => b.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                b.extend_from_slice(b"\\u00");
                b.push(HEX[usize::from(byte >> 4)]);
                b.push(HEX[usize::from(byte & 15)]);
            }
            _ => b.push(byte),
        }
    }
    b.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> (SessionRecord, SystemTime) {
        let mut r = SessionRecord::new("127.0.0.1:58554".parse().unwrap(), "asterisk".into(), 1);
        r.script = "ivr/main?lang=de".into();
        r.route = Some("ivr".into());
        r.pool = Some("ivr".into());
        r.backend = Some("127.0.0.1:15001".parse().unwrap());
        r.attempts = 1;
        r.connect_time = Some(Duration::from_nanos(482_706));
        r.first_command_time = Some(Duration::from_nanos(12_269_600));
        r.duration = Duration::from_micros(7_907_383);
        r.bytes_from_asterisk = 33;
        r.bytes_to_asterisk = 23;
        r.commands = 2;
        let at = UNIX_EPOCH + Duration::from_micros(1_795_776_716_431_140);
        (r, at)
    }

    #[test]
    fn text_line_has_tracings_shape_with_microsecond_decimals() {
        let (r, at) = record();
        let mut b = Vec::new();
        r.write_text(&mut b, at);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "2026-11-27T10:51:56.431140Z  INFO agiproxy::access: session peer=127.0.0.1:58554 \
             listener=asterisk generation=1 script=ivr/main?lang=de route=\"ivr\" pool=\"ivr\" \
             backend=127.0.0.1:15001 attempts=1 connect_ms=0.483 first_command_ms=12.270 \
             duration_ms=7907.383 bytes_in=33 bytes_out=23 commands=2 hangup=false \
             outcome=\"completed\" reason=\"-\"\n"
        );
    }

    /// The script is the peer's: in the text line it cannot add a field or
    /// carry a control byte, and a plain one stays bare as before.
    #[test]
    fn a_script_with_spaces_quotes_or_control_bytes_is_quoted_in_the_text_line() {
        let (mut r, at) = record();
        for (script, field) in [
            ("ivr/main?lang=de&x=1", r#"ivr/main?lang=de&x=1"#),
            ("", ""),
            ("x route=\"admin\"", r#""x route=\"admin\"""#),
            ("a\rb\u{1b}[31mc", r#""a\rb\u{1b}[31mc""#),
            ("a\\b", r#""a\\b""#),
            ("stra\u{df}e", "\"stra\u{df}e\""),
        ] {
            r.script = script.into();
            let mut b = Vec::new();
            r.write_text(&mut b, at);
            let line = String::from_utf8(b).unwrap();
            assert!(
                line.contains(&format!(" script={field} route=\"ivr\" ")),
                "{script:?}: {line}"
            );
            assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line}");
            // Split as a logfmt reader would: spaces outside quotes.
            let (mut keys, mut quote, mut escaped, mut token) =
                (vec![], false, false, String::new());
            for c in line.trim_end().chars().chain([' ']) {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quote => escaped = true,
                    '"' => quote = !quote,
                    ' ' if !quote => {
                        if let Some((k, _)) = token.split_once('=') {
                            keys.push(k.to_string());
                        }
                        token.clear();
                        continue;
                    }
                    _ => {}
                }
                token.push(c);
            }
            assert_eq!(keys.iter().filter(|k| *k == "route").count(), 1, "{line}");
            assert_eq!(keys.len(), 17, "{keys:?}");
        }
    }

    #[test]
    fn json_line_parses_whatever_the_names_hold() {
        let (mut r, at) = record();
        r.script = "a\"b\\c\u{1}d\té/ü\u{7f}".into();
        r.listener = "l\"x".into();
        r.peer = "[::ffff:127.0.0.1]:5".parse().unwrap();
        r.backend = None;
        r.first_command_time = None;
        r.outcome = Outcome::Failed;
        r.reason = Some(Reason::ConnectFailed);
        let mut b = Vec::new();
        r.write_json(&mut b, at);
        assert_eq!(b.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["script"], "a\"b\\c\u{1}d\té/ü\u{7f}");
        assert_eq!(v["listener"], "l\"x");
        assert_eq!(v["peer"], "[::ffff:127.0.0.1]:5");
        assert_eq!(v["timestamp"], "2026-11-27T10:51:56.431140Z");
        assert_eq!(v["connect_ms"].as_f64(), Some(0.483));
        assert!(v.get("first_command_ms").is_none());
        assert_eq!(v["backend"], "-");
        assert_eq!(v["reason"], "connect_failed");
        assert_eq!(v["target"], "agiproxy::access");
    }

    /// Behind a balancer: `peer` is the Asterisk its PROXY header named,
    /// `via` the balancer, right after `peer` in both formats.
    #[test]
    fn a_balancers_caller_is_the_peer_and_the_balancer_via() {
        let (mut r, at) = record();
        r.called_by(Some("192.0.2.7:40001".parse().unwrap()));
        let mut b = Vec::new();
        r.write_text(&mut b, at);
        let line = String::from_utf8(b).unwrap();
        assert!(
            line.contains(" session peer=192.0.2.7:40001 via=127.0.0.1:58554 listener=asterisk "),
            "{line}"
        );
        let mut b = Vec::new();
        r.write_json(&mut b, at);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["peer"], "192.0.2.7:40001");
        assert_eq!(v["via"], "127.0.0.1:58554");
        // Named IPv4-mapped: logged in its IPv4 form.
        let (mut r, at) = record();
        r.called_by(Some("[::ffff:192.0.2.6]:40004".parse().unwrap()));
        let mut b = Vec::new();
        r.write_text(&mut b, at);
        let line = String::from_utf8(b).unwrap();
        assert!(line.contains(" peer=192.0.2.6:40004 via="), "{line}");
        // No header named anyone: nothing changes, no `via`.
        let (mut r, at) = record();
        r.called_by(None);
        let mut b = Vec::new();
        r.write_json(&mut b, at);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["peer"], "127.0.0.1:58554");
        assert!(v.get("via").is_none());
    }

    #[test]
    fn dates_and_rounding() {
        let mut b = Vec::new();
        timestamp(&mut b, UNIX_EPOCH + Duration::from_secs(951_868_799));
        assert_eq!(b, b"2000-02-29T23:59:59.000000Z");
        for (nanos, text) in [
            (0, "0.000"),
            (999_499, "0.999"),
            (999_500, "1.000"),
            (1_000_000_000, "1000.000"),
        ] {
            b.clear();
            millis(&mut b, Duration::from_nanos(nanos));
            assert_eq!(String::from_utf8_lossy(&b), text);
        }
    }

    /// What an access line costs to build, next to the ~90 µs of CPU a short
    /// session costs the proxy (docs/benchmarks.md): prints ns per line.
    /// `cargo test --release -p agiproxy --lib access_line_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn access_line_cost() {
        let (r, at) = record();
        let mut b = Vec::with_capacity(512);
        for (name, json) in [("text", false), ("json", true)] {
            let n = 200_000u32;
            let started = std::time::Instant::now();
            for _ in 0..n {
                b.clear();
                let now = SystemTime::now().max(at);
                if json {
                    r.write_json(&mut b, now);
                } else {
                    r.write_text(&mut b, now);
                }
                std::hint::black_box(&b);
            }
            println!(
                "{name}: {:?} a line ({} bytes)",
                started.elapsed() / n,
                b.len()
            );
        }
    }
}
