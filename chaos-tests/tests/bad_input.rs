//! Bad input costs nothing else: an oversized header, a stalled header
//! (slowloris), binary garbage and a flood of connects that close at once
//! are each refused and counted, while other sessions keep being served.

mod common;

use std::time::{Duration, Instant};

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the proxy closes; returns what it sent and how long it took.
async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("proxy closes");
    (got, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_counted_and_harmless() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  header: 300ms\nlimits:\n  max_header_bytes: 4096\n",
    ))
    .await;

    // A well-behaved caller keeps calling through all of it.
    let addr = p.addr;
    let good = tokio::spawn(async move {
        let mut n = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let out = caller("ivr/main", &format!("9.{n}")).run(addr).await;
            assert_eq!(
                out.status,
                AgiStatus::Success,
                "a good call failed during the abuse: {out:?}"
            );
            n += 1;
        }
        n
    });

    // 1. Oversized header from a real-looking Asterisk (many long arguments):
    //    FAILURE, so its dialplan falls back.
    let long = "x".repeat(200);
    let args: Vec<&str> = (0..40).map(|_| long.as_str()).collect();
    let out = FakeAsterisk::new()
        .header(AgiHeader::realistic("ivr/main", &args, "1.1"))
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(
        out.variables.get("AGIPROXY_ERROR").map(String::as_str),
        Some("header_too_large")
    );

    // 2. Slowloris: half a header, then silence. Closed at the header deadline.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"agi_network: yes\nagi_network_script: ivr/main\n")
        .await
        .unwrap();
    let (got, took) = read_until_closed(&mut s).await;
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "{took:?}"
    );

    // 3. Binary garbage: closed at once, nothing sent back.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0xff, 0x00, b'\n', b'\n'])
        .await
        .unwrap();
    let (got, took) = read_until_closed(&mut s).await;
    assert!(got.is_empty());
    assert!(took < Duration::from_millis(200), "{took:?}");
    // An HTTP request (a port scanner, a misdirected health check) likewise.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_until_closed(&mut s).await.0.is_empty());

    // 4. 10,000 connects that close at once, 200 at a time.
    let flood_start = Instant::now();
    for _ in 0..50 {
        let batch: Vec<_> = (0..200)
            .map(|_| tokio::spawn(async move { drop(TcpStream::connect(addr).await) }))
            .collect();
        for t in batch {
            t.await.unwrap();
        }
    }
    assert!(flood_start.elapsed() < Duration::from_secs(60));

    let served = good.await.unwrap();
    assert!(served > 5, "the good caller was starved: {served} calls");

    // Every case was counted, by reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = p.server.metrics().render();
        let closed = counter(&m, "agiproxy_header_errors_total{reason=\"closed\"}")
            + counter(&m, "agiproxy_header_errors_total{reason=\"io\"}");
        if closed >= 10_000 || Instant::now() > deadline {
            assert_eq!(closed, 10_000, "{m}");
            assert_eq!(
                counter(&m, "agiproxy_header_errors_total{reason=\"too_large\"}"),
                1,
                "{m}"
            );
            assert_eq!(
                counter(&m, "agiproxy_header_errors_total{reason=\"timeout\"}"),
                1,
                "{m}"
            );
            assert_eq!(
                counter(&m, "agiproxy_header_errors_total{reason=\"malformed\"}"),
                2,
                "{m}"
            );
            assert_eq!(
                counter(
                    &m,
                    "agiproxy_failures_sent_total{reason=\"header_too_large\"}"
                ),
                1,
                "{m}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        b.stats().accepted(),
        served,
        "bad input never reached a backend"
    );
}

/// A value with a newline in it (`AGI(agi://p/s,${VAR})` where VAR holds
/// one) splits a header line in two. Asterisk sent it and waits, as for any
/// header: it hears FAILURE with the reason once its blank line is in, not
/// a silent close (SUCCESS) and not the header deadline, and no backend is
/// asked.
#[tokio::test]
async fn a_value_with_a_newline_is_told_failure_at_once() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  header: 30s\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    // The bad line last (the blank line follows in its own write), and in
    // the middle.
    for args in [&["a\nb"][..], &["a\nb", "c"]] {
        let out = FakeAsterisk::new()
            .header(AgiHeader::realistic("ivr/main", args, "1.2"))
            .call_timeout(Duration::from_secs(10))
            .run(p.addr)
            .await;
        assert_failure(&out, "header_malformed");
        assert!(out.elapsed < Duration::from_secs(5), "{out:?}");
        let rec = next_record(&mut rx).await;
        assert_eq!(rec.header_error, Some("malformed"), "{args:?}");
    }
    assert_eq!(b.stats().accepted(), 0);
}

/// Sends `lines` one write each, 20 ms apart, then the blank line (`blank`)
/// alone, as Asterisk does; answers the proxy's `SET VARIABLE`. Returns the
/// reason told and how long after the blank line it came.
async fn refusal_after_blank_line(
    addr: std::net::SocketAddr,
    lines: &[Vec<u8>],
    blank: &[u8],
) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for line in lines {
        s.write_all(line).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.write_all(blank).await.unwrap();
    let sent = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\n") {
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
            .await
            .expect("the proxy answers within its header timeout")
            .unwrap();
        assert!(n > 0, "closed without a word: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let waited = sent.elapsed();
    let set = String::from_utf8(got).unwrap();
    s.write_all(b"200 result=1\n").await.unwrap();
    let (rest, _) = read_until_closed(&mut s).await;
    assert!(rest.starts_with(b"FAILURE\n"), "{rest:?}");
    (set, waited)
}

/// An oversized header refused before its blank line came, where the blank
/// line then comes in its own write (Asterisk writes one line a write): it
/// is told FAILURE at once, not after the (10 s) header timeout.
#[tokio::test]
async fn an_oversized_header_whose_blank_line_comes_alone_is_told_at_once() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let told = "SET VARIABLE AGIPROXY_ERROR \"header_too_large\"\n";
    let cases: [(&str, Vec<Vec<u8>>, &str); 2] = [
        // One line over `max_header_lines`.
        (
            "max_header_lines: 8",
            (1..=9)
                .map(|i| format!("agi_arg_{i}: v\n").into_bytes())
                .collect(),
            "too_many_lines",
        ),
        // The last line ends exactly at `max_header_bytes`: 8 lines of 64 bytes.
        (
            "max_header_bytes: 512",
            (1..=8)
                .map(|i| format!("agi_arg_{i}: {}\n", "v".repeat(52)).into_bytes())
                .collect(),
            "too_large",
        ),
    ];
    assert_eq!(cases[1].1.concat().len(), 512);
    for (limit, lines, reason) in cases {
        let p = proxy(&one_pool(
            "round_robin",
            &[b.addr()],
            &format!("timeouts:\n  header: 10s\nlimits:\n  {limit}\n"),
        ))
        .await;
        let mut rx = p.server.subscribe();
        let (set, waited) = refusal_after_blank_line(p.addr, &lines, b"\n").await;
        assert_eq!(set, told, "{limit}");
        assert!(waited < Duration::from_secs(2), "{limit}: {waited:?}");
        let rec = next_record(&mut rx).await;
        assert_eq!(rec.header_error, Some(reason));
    }
    assert_eq!(b.stats().accepted(), 0);
}

/// Headers a real Asterisk never sends, where routing and a backend could
/// read different things (audit: with `agi_network_script` twice, routing
/// took the first copy and a backend keeping the last ran `admin`), and
/// CRLF endings, whose header never ended: waited for the 5 s header
/// timeout, then a silent close (SUCCESS). Each is told FAILURE
/// `header_malformed` as soon as its blank line is in, counted as
/// `malformed`, and no backend is asked.
#[tokio::test]
async fn duplicate_mixed_case_and_crlf_headers_are_told_failure_at_once() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  header: 5s\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let told = "SET VARIABLE AGIPROXY_ERROR \"header_malformed\"\n";
    let base = [
        "agi_network: yes",
        "agi_network_script: spoof/x",
        "agi_request: agi://127.0.0.1/spoof/x",
        "agi_channel: SIP/100-00000001",
        "agi_uniqueid: 1795769496.1",
    ];
    let lines = |extra: &str, end: &str| -> Vec<Vec<u8>> {
        base.iter()
            .copied()
            .chain((!extra.is_empty()).then_some(extra))
            .map(|l| format!("{l}{end}").into_bytes())
            .collect()
    };
    let cases = [
        (
            "duplicate script",
            lines("agi_network_script: admin", "\n"),
            "\n",
        ),
        (
            "duplicate channel",
            lines("agi_channel: SIP/200-2", "\n"),
            "\n",
        ),
        ("mixed case", lines("agi_X_ROUTE: evil3", "\n"), "\n"),
        ("crlf", lines("", "\r\n"), "\r\n"),
        ("empty name", lines("agi_: x", "\n"), "\n"),
    ];
    for (case, lines, blank) in &cases {
        let (set, waited) = refusal_after_blank_line(p.addr, lines, blank.as_bytes()).await;
        assert_eq!(set, told, "{case}");
        assert!(waited < Duration::from_secs(1), "{case}: {waited:?}");
        let rec = next_record(&mut rx).await;
        assert_eq!(rec.header_error, Some("malformed"), "{case}");
    }
    let m = p.server.metrics().render();
    let errors = |r: &str| {
        counter(
            &m,
            &format!("agiproxy_header_errors_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!((errors("malformed"), errors("timeout")), (5, 0), "{m}");
    // Too large with CRLF endings: its `\r\n` blank line is found by the
    // discard too (before: the header timeout, then FAILURE).
    let mut big = lines("", "\r\n");
    big.insert(
        0,
        format!("agi_network_script: {}\r\n", "y".repeat(20_000)).into_bytes(),
    );
    let (set, waited) = refusal_after_blank_line(p.addr, &big, b"\r\n").await;
    assert_eq!(set, "SET VARIABLE AGIPROXY_ERROR \"header_too_large\"\n");
    assert!(
        waited < Duration::from_secs(1),
        "too large, CRLF: {waited:?}"
    );
    assert_eq!(b.stats().accepted(), 0);
}
