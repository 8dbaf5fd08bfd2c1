//! Shared set-up for the integration tests: a proxy from a YAML snippet,
//! listening on 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use agiproxy::{Server, SessionRecord};
use chaos_tests::{AgiHeader, AgiStatus, CallOutcome, FakeAsterisk};

pub struct Proxy {
    pub server: Server,
    pub addr: SocketAddr,
}

/// Starts a proxy. `body` is the config without `version` and `listeners`.
pub async fn proxy(body: &str) -> Proxy {
    let text =
        format!("version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\n{body}");
    let config = agiproxy_config::from_yaml_str(&text)
        .unwrap_or_else(|e| panic!("test config:\n{e}\n---\n{text}"));
    let server = Server::start(config).await.expect("proxy starts");
    let addr = server.local_addrs()[0];
    Proxy { server, addr }
}

/// A one-pool config: every call goes to `backends` with `balance`.
pub fn one_pool(balance: &str, backends: &[SocketAddr], extra_timeouts: &str) -> String {
    let list: String = backends
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\" }}\n"))
        .collect();
    format!(
        "{extra_timeouts}routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    balance: {balance}\n    backends:\n{list}"
    )
}

/// A FakeAsterisk calling `script` (no leading slash, as Asterisk sends it).
pub fn caller(script: &str, uniqueid: &str) -> FakeAsterisk {
    FakeAsterisk::new()
        .header(AgiHeader::realistic(script, &["a1"], uniqueid))
        .call_timeout(Duration::from_secs(20))
}

/// Waits for the next finished-session record.
pub async fn next_record(
    rx: &mut tokio::sync::broadcast::Receiver<SessionRecord>,
) -> SessionRecord {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a session record within 10 s")
        .expect("record channel open")
}

/// The call ended with AGISTATUS=FAILURE, the proxy's reason in
/// AGIPROXY_ERROR, and no protocol violation on the way.
pub fn assert_failure(out: &CallOutcome, reason: &str) {
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(
        out.variables.get("AGIPROXY_ERROR").map(String::as_str),
        Some(reason),
        "{out:?}"
    );
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}

/// The value of the series `name` (with its labels, as rendered) in a
/// Prometheus text exposition; 0 when absent.
pub fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls `cond` every 5 ms until it holds; panics after `within`.
pub async fn wait_until(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A certificate authority made for a test (rcgen).
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names; no extended key usage, so
    /// good for servers and clients alike) and its key, PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&key, &self.cert, &self.key)
                .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// As [`TestCa::issue`], valid from `secs` seconds from now.
    #[allow(dead_code)]
    pub fn issue_valid_in(&self, names: &[&str], secs: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + std::time::Duration::from_secs(now.as_secs() + secs);
        params.not_after = epoch + std::time::Duration::from_secs(now.as_secs() + 86_400);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// As [`TestCa::issue`], valid only in 2023: expired.
    #[allow(dead_code)]
    pub fn issue_expired(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2023, 1, 1);
        params.not_after = rcgen::date_time_ymd(2024, 1, 1);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A log written into memory, for a test to read what the proxy logged.
#[derive(Clone, Default)]
#[allow(dead_code)]
pub struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[allow(dead_code)]
impl LogSink {
    /// tracing's text format at `level` and above, without colours.
    fn subscriber(
        &self,
        level: tracing_subscriber::filter::LevelFilter,
    ) -> impl tracing::Subscriber + Send + Sync {
        let sink = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish()
    }

    /// This thread's log until the guard drops (a current-thread runtime's
    /// tasks log here too).
    pub fn install(
        &self,
        level: tracing_subscriber::filter::LevelFilter,
    ) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(self.subscriber(level))
    }

    /// The whole test binary's log, every thread's, for good.
    pub fn install_global(&self, level: tracing_subscriber::filter::LevelFilter) {
        tracing::subscriber::set_global_default(self.subscriber(level))
            .expect("the only global subscriber of this binary");
    }

    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
