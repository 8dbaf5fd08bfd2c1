//! A load balancer in front of agiproxy that speaks the PROXY protocol: the
//! caller it names is the Asterisk for routing, templates and the record;
//! only the listed balancers may name one; a balancer that forgets the
//! header, or sends a broken one, costs its call a FAILURE (the dialplan's
//! fallback), never a silent SUCCESS or a misrouted call.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use agiproxy::Server;
use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};
use common::*;
use ppp::v2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The balancer's address (a loopback alias); Asterisks are elsewhere.
const BALANCER: &str = "127.0.0.2";

fn config(from: &str, seven: SocketAddr, other: SocketAddr) -> String {
    format!(
        r#"version: 1
listeners:
  - name: behind-lb
    address: "127.0.0.1:0"
    proxy_protocol: {{ from: [{from}] }}
timeouts: {{ header: 30s }}
routes:
  - name: from-7
    match: {{ source: ["127.0.0.7/32"] }}
    pool: seven
    set: {{ agi_x_caller: "${{remote_ip}}:${{remote_port}}" }}
  - name: all
    pool: other
pools:
  - name: seven
    backends: [{{ address: "{seven}" }}]
  - name: other
    backends: [{{ address: "{other}" }}]
"#
    )
}

struct Lab {
    server: Server,
    addr: SocketAddr,
    seven: FakeBackend,
    other: FakeBackend,
}

async fn lab(from: &str) -> Lab {
    let seven = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let other = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let text = config(from, seven.addr(), other.addr());
    let cfg = agiproxy_config::from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let server = Server::start(cfg).await.expect("proxy starts");
    let addr = server.local_addrs()[0];
    Lab {
        server,
        addr,
        seven,
        other,
    }
}

fn via_balancer(script: &str, preamble: &[u8]) -> FakeAsterisk {
    caller(script, "1700000000.1")
        .source(BALANCER.parse().unwrap())
        .preamble(preamble)
        .call_timeout(Duration::from_secs(10))
}

/// How an unlisted peer's PROXY header is refused: once the header behind
/// it is in, with FAILURE `proxy_protocol` (the Asterisk behind a balancer
/// left out of `proxy_protocol.from` falls back; before, the line was a
/// malformed Asterisk header, closed without a word, which its dialplan
/// read as SUCCESS), and the caller it names is not believed. At once, not
/// at the 30 s header timeout nor at the caller's 10 s limit.
fn assert_untrusted_failure(out: &chaos_tests::CallOutcome) {
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(
        out.variables.get("AGIPROXY_ERROR").map(String::as_str),
        Some("proxy_protocol"),
        "{out:?}"
    );
    assert!(out.violations.is_empty(), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(5), "{out:?}");
}

fn v2_header(command: u8, from: &str, to: &str) -> Vec<u8> {
    let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
    v2::Builder::with_addresses(0x20 | command, v2::Protocol::Stream, (from, to))
        // AWS and GCP add TLVs; they are skipped.
        .write_tlv(0xEA_u8, b"vpce-0123456789abcdef0")
        .unwrap()
        .build()
        .unwrap()
}

/// v1 and v2 name the caller; routes, templates and the record use it,
/// the backend gets Asterisk's header without the PROXY header, and the
/// record keeps the balancer as `via`. A v2 `LOCAL` speaks for itself.
#[tokio::test]
async fn the_caller_a_balancer_names_is_the_asterisk() {
    let l = lab(&format!("\"{BALANCER}/32\"")).await;
    let mut rx = l.server.subscribe();

    let v1 = b"PROXY TCP4 127.0.0.7 127.0.0.1 40001 4573\r\n";
    let out = via_balancer("ivr", v1).run(l.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.route.as_deref(), Some("from-7"));
    assert_eq!(rec.peer, "127.0.0.7:40001".parse().unwrap());
    assert_eq!(rec.via.map(|v| v.ip()), Some(BALANCER.parse().unwrap()));
    let header = String::from_utf8(l.seven.stats().headers()[0].clone()).unwrap();
    assert!(header.starts_with("agi_"), "{header}");
    assert!(!header.contains("PROXY"), "{header}");
    assert!(
        header.contains("agi_x_caller: 127.0.0.7:40001\n"),
        "{header}"
    );

    // v2 naming an IPv6 caller, TLVs and all: not 127.0.0.7, so `all`.
    let h = v2_header(1, "[2001:db8::7]:5060", "[2001:db8::1]:4573");
    let out = via_balancer("ivr", &h).run(l.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.route.as_deref(), Some("all"));
    assert_eq!(rec.peer, "[2001:db8::7]:5060".parse().unwrap());

    // v2 naming 127.0.0.7 routes like v1 did.
    let h = v2_header(1, "127.0.0.7:40002", "127.0.0.1:4573");
    let out = via_balancer("ivr", &h).run(l.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(next_record(&mut rx).await.route.as_deref(), Some("from-7"));

    // LOCAL: the balancer itself (its health check), not a caller.
    let h = v2_header(0, "127.0.0.7:1", "127.0.0.1:4573");
    let out = via_balancer("ivr", &h).run(l.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.route.as_deref(), Some("all"));
    assert_eq!(rec.peer.ip(), BALANCER.parse::<IpAddr>().unwrap());
    assert_eq!(rec.via, None);

    assert_eq!(l.seven.stats().accepted(), 2);
    assert_eq!(l.other.stats().accepted(), 2);
}

/// A listed balancer that sends no PROXY header, or a broken one: the
/// Asterisk behind it hears FAILURE with the reason, at once (the header
/// timeout is 30 s here), and no backend is asked.
#[tokio::test]
async fn a_balancer_without_a_valid_proxy_header_fails_the_call() {
    let l = lab(&format!("\"{BALANCER}/32\"")).await;
    let mut rx = l.server.subscribe();

    // v2 with version 3 in place of 2, otherwise whole (IPv4, 12 bytes).
    let mut v3 = v2_header(1, "127.0.0.7:1", "127.0.0.1:2");
    v3[12] = 0x31;
    let mut long = v2_header(1, "127.0.0.7:1", "127.0.0.1:2");
    long.truncate(16 + 12);
    long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut over_tlvs = long.clone();
    over_tlvs[14..16].copy_from_slice(&300u16.to_be_bytes());
    // One TLV claiming 255 bytes, 3 sent, in a header declaring it whole.
    let mut bad_tlv = long.clone();
    bad_tlv.extend_from_slice(&[0x04, 0x00, 0xff, b'a', b'b', b'c']);
    bad_tlv[14..16].copy_from_slice(&(12u16 + 6).to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("none", vec![], "proxy_missing"),
        (
            "bad address",
            b"PROXY TCP4 127.0.0.300 127.0.0.1 40001 4573\r\n".to_vec(),
            "proxy_invalid",
        ),
        (
            "LF only",
            b"PROXY TCP4 127.0.0.7 127.0.0.1 40001 4573\n".to_vec(),
            "proxy_invalid",
        ),
        ("v2, version 3", v3, "proxy_invalid"),
        // v2 declaring 65,535 bytes of addresses and TLVs, sending 12: it
        // would swallow Asterisk's header and wait (an audit: a silent
        // close at the header timeout). Longer than any header may be.
        ("v2, declared longer than it is", long, "proxy_invalid"),
        // Declaring 300 bytes, within the header bound, sending the 12 of
        // its addresses: Asterisk's header was read as TLVs, then a silent
        // close at the header timeout (audit). TLVs must fit.
        (
            "v2, Asterisk's header read as TLVs",
            over_tlvs,
            "proxy_invalid",
        ),
        ("v2, a TLV past the header's end", bad_tlv, "proxy_invalid"),
    ];
    for (what, preamble, reason) in cases {
        let before = l.server.metrics().render();
        let out = via_balancer("ivr", &preamble).run(l.addr).await;
        assert_failure(&out, "proxy_protocol");
        assert!(out.elapsed < Duration::from_secs(5), "{what}: {out:?}");
        let rec = next_record(&mut rx).await;
        assert_eq!(rec.header_error, Some(reason), "{what}");
        let after = l.server.metrics().render();
        let name = format!("agiproxy_header_errors_total{{reason=\"{reason}\"}}");
        assert_eq!(
            counter(&after, &name),
            counter(&before, &name) + 1,
            "{what}"
        );
    }
    assert_eq!(l.seven.stats().accepted() + l.other.stats().accepted(), 0);
}

/// A peer that is not a listed balancer cannot name a caller: its PROXY
/// header is not an Asterisk header, and it reaches no backend. Asterisks
/// that connect directly are served as before.
#[tokio::test]
async fn only_listed_balancers_may_name_a_caller() {
    let l = lab(&format!("\"{BALANCER}/32\"")).await;
    let mut rx = l.server.subscribe();

    let spoof = caller("ivr", "1700000000.2")
        .source("127.0.0.3".parse().unwrap())
        .preamble(b"PROXY TCP4 127.0.0.7 127.0.0.1 40001 4573\r\n")
        .call_timeout(Duration::from_secs(10));
    let out = spoof.run(l.addr).await;
    assert_untrusted_failure(&out);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.header_error, Some("proxy_untrusted"));
    assert_eq!(rec.route, None);
    // The address it claims is not believed.
    assert_eq!(rec.peer.ip().to_string(), "127.0.0.3");
    assert_eq!(rec.via, None);
    // The same with a v2 header.
    let v2 = v2_header(0x1, "127.0.0.7:40001", "127.0.0.1:4573");
    let out = caller("ivr", "1700000000.21")
        .source("127.0.0.3".parse().unwrap())
        .preamble(&v2)
        .call_timeout(Duration::from_secs(10))
        .run(l.addr)
        .await;
    assert_untrusted_failure(&out);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.header_error, Some("proxy_untrusted"));
    assert_eq!(rec.peer.ip().to_string(), "127.0.0.3");
    // A broken one from a peer not listed is garbage: closed without a
    // word, as before (only a well-formed header is answered).
    let out = caller("ivr", "1700000000.22")
        .source("127.0.0.3".parse().unwrap())
        .preamble(b"PROXY TCP4 not-an-address\r\n")
        .call_timeout(Duration::from_secs(10))
        .run(l.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.bytes_received, 0, "{out:?}");
    assert!(out.elapsed < Duration::from_secs(5), "{out:?}");
    assert_eq!(next_record(&mut rx).await.header_error, Some("malformed"));

    // A direct Asterisk at 127.0.0.7 (not a balancer) routes on its own address.
    let direct = caller("ivr", "1700000000.3").source("127.0.0.7".parse().unwrap());
    let out = direct.run(l.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.route.as_deref(), Some("from-7"));
    assert_eq!(rec.via, None);
    assert_eq!(l.seven.stats().accepted(), 1);
    assert_eq!(l.other.stats().accepted(), 0);
}

/// The header may arrive a byte at a time; a balancer's health check (a
/// PROXY header, then a close) counts as a closed connection, not an error.
#[tokio::test]
async fn a_proxy_header_in_pieces_and_a_health_check() {
    let l = lab(&format!("\"{BALANCER}/32\"")).await;
    let mut rx = l.server.subscribe();

    let mut bytes = b"PROXY TCP4 127.0.0.7 127.0.0.1 40003 4573\r\n".to_vec();
    bytes.extend_from_slice(&AgiHeader::realistic("ivr", &[], "1700000000.4").to_bytes());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{BALANCER}:0").parse().unwrap())
        .unwrap();
    let mut s = socket.connect(l.addr).await.unwrap();
    for b in &bytes {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut reply = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut reply))
        .await
        .expect("the backend's first command within 10 s")
        .unwrap();
    assert_eq!(&reply[..n], b"NOOP\n");
    s.write_all(b"200 result=0\n").await.unwrap();
    drop(s);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.peer, "127.0.0.7:40003".parse().unwrap());
    assert_eq!(rec.route.as_deref(), Some("from-7"));

    let before = l.server.metrics().render();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{BALANCER}:0").parse().unwrap())
        .unwrap();
    let mut s = socket.connect(l.addr).await.unwrap();
    s.write_all(&v2_header(0, "127.0.0.2:1", "127.0.0.1:4573"))
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.header_error, Some("closed"));
    let after = l.server.metrics().render();
    let closed = "agiproxy_header_errors_total{reason=\"closed\"}";
    assert_eq!(counter(&after, closed), counter(&before, closed) + 1);
}

/// `proxy_protocol` changes by reload, for the next connection, on the
/// same socket.
#[tokio::test]
async fn the_list_of_balancers_changes_without_a_restart() {
    let l = lab("\"127.0.0.99/32\"").await;
    let mut rx = l.server.subscribe();
    let v1 = b"PROXY TCP4 127.0.0.7 127.0.0.1 40004 4573\r\n";

    // Not yet listed: refused, with FAILURE.
    let out = via_balancer("ivr", v1).run(l.addr).await;
    assert_untrusted_failure(&out);
    assert_eq!(
        next_record(&mut rx).await.header_error,
        Some("proxy_untrusted")
    );

    let text = config(&format!("\"{BALANCER}\""), l.seven.addr(), l.other.addr());
    l.server
        .apply(&text, "test", false, None)
        .await
        .expect("reload");
    assert_eq!(l.server.local_addrs()[0], l.addr, "the listener was kept");
    let out = via_balancer("ivr", v1).run(l.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.route.as_deref(), Some("from-7"));
    assert_eq!(rec.peer, "127.0.0.7:40004".parse().unwrap());
}
