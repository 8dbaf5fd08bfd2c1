//! Renewed certificates are taken up without a restart: the control API
//! serves the new certificate once its files change (swapped as a
//! Kubernetes Secret volume swaps them: a symlink to a new directory),
//! keeps the last good one when the new files are bad, and the proxy's
//! refresh task does both on its own and counts them in
//! `agiproxy_credential_reloads_total`. Certificates are made in the test.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agiproxy::control::ControlHandle;
use agiproxy::credentials::{self, Followed};
use agiproxy_control::client::{Client, Target};
use agiproxy_control::server::ServeOptions;
use agiproxy_control::tls::{connector, ClientTls, Refresh, TlsFiles};
use agiproxy_control::ControlServer;
use common::*;

/// A CA (its certificate written to `dir/ca.pem`) and a certificate for
/// `localhost` it signed, with its key, PEM.
fn issue(dir: &Path) -> (PathBuf, String, String) {
    let ca = TestCa::new();
    std::fs::create_dir_all(dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = ca.issue(&["localhost"]);
    (ca_file, cert, key)
}

/// Points `live/..data` at a new directory holding `cert` and `key`, in
/// one rename, as the kubelet updates a mounted Secret; `live/tls.crt` and
/// `live/tls.key` are symlinks through `..data`.
fn publish(live: &Path, version: &str, cert: &str, key: &str) {
    let dir = live.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    let tmp = live.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, live.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        let link = live.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).unwrap();
        }
    }
}

/// A client that trusts only the CA in `ca`.
fn trusting(ca: &Path) -> Client {
    Client {
        token: None,
        tls: Some(
            connector(&ClientTls {
                ca: Some(ca.to_path_buf()),
                cert: None,
                key: None,
            })
            .unwrap(),
        ),
        timeout: Duration::from_secs(5),
    }
}

async fn healthz(c: &Client, t: &Target) -> bool {
    matches!(c.call(t, "GET", "/healthz", &[], None).await, Ok(r) if r.status == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_serves_a_renewed_certificate_and_keeps_the_last_good_one() {
    let tmp = tempfile::TempDir::with_prefix("agiproxy-tls-reload").unwrap();
    let live = tmp.path().join("live");
    let (old_ca, cert, key) = issue(&tmp.path().join("old"));
    publish(&live, "v1", &cert, &key);
    let p = proxy("").await;
    let api = ControlServer::bind(
        ControlHandle::new(p.server.clone()),
        ServeOptions {
            address: Some("127.0.0.1:0".parse().unwrap()),
            socket: None,
            token: None,
            tls: Some(TlsFiles {
                cert: live.join("tls.crt"),
                key: live.join("tls.key"),
                client_ca: None,
            }),
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let target = Target::https(api.local_addr().unwrap(), "localhost");
    let tls = api.tls().expect("TLS settings");
    tokio::spawn(api.serve(std::future::pending()));

    let (old, new_ca) = (trusting(&old_ca), tmp.path().join("new"));
    assert!(healthz(&old, &target).await);
    assert_eq!(tls.refresh(), Refresh::Unchanged, "nothing changed yet");

    // Renewed by another CA (so a client tells the two apart).
    let (new_ca, cert, key) = issue(&new_ca);
    publish(&live, "v2", &cert, &key);
    assert_eq!(tls.refresh(), Refresh::Reloaded);
    let new = trusting(&new_ca);
    assert!(
        healthz(&new, &target).await,
        "the renewed certificate is served"
    );
    assert!(!healthz(&old, &target).await, "the old one is not");

    // A broken renewal: refused, naming the file; the last good one stays.
    publish(
        &live,
        "v3",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
        &key,
    );
    match tls.refresh() {
        Refresh::Refused(e) => assert!(e.contains("tls.crt"), "{e}"),
        other => panic!("a broken certificate was not refused: {other:?}"),
    }
    assert!(
        healthz(&new, &target).await,
        "the last good certificate still serves"
    );
    assert_eq!(tls.refresh(), Refresh::Unchanged, "refused once per change");
    // A key that does not belong to the certificate: refused too.
    let (_, other_cert, _) = issue(&tmp.path().join("other"));
    publish(&live, "v4", &other_cert, &key);
    assert!(matches!(tls.refresh(), Refresh::Refused(_)));
    assert!(healthz(&new, &target).await);
}

/// The proxy's refresh task finds a change by itself and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_task_reloads_changed_files_and_counts_what_it_did() {
    let tmp = tempfile::TempDir::with_prefix("agiproxy-tls-refresh").unwrap();
    let live = tmp.path().join("live");
    let (ca, cert, key) = issue(&tmp.path().join("a"));
    publish(&live, "v1", &cert, &key);
    let files = ClientTls {
        ca: Some(ca),
        cert: Some(live.join("tls.crt")),
        key: Some(live.join("tls.key")),
    };
    let r = Arc::new(agiproxy_control::tls::reloading_connector(&files).unwrap());
    let p = proxy("").await;
    let reloads = p.server.metrics().credential_reloads.clone();
    let expiry = p.server.metrics().credential_expiry.clone();
    credentials::spawn(
        reloads.clone(),
        expiry.clone(),
        vec![Followed::tls("peer_tls", r.clone())],
        Duration::from_millis(50),
    );
    let expires = || expiry.with_label_values(&["peer_tls"]).get();
    assert_eq!(Some(expires()), r.validity().map(|v| v.not_after));
    assert!(expires() > 1_700_000_000, "{}", expires());
    let count = |result: &str| reloads.with_label_values(&["peer_tls", result]).get();
    let until = |result: &'static str, n: u64| {
        let count = &count;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while count(result) < n {
                assert!(Instant::now() < deadline, "{result} never reached {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let before = Arc::as_ptr(&r.current());
    let (_, cert, key) = issue(&tmp.path().join("b"));
    publish(&live, "v2", &cert, &key);
    until("reloaded", 1).await;
    assert_ne!(Arc::as_ptr(&r.current()), before, "new settings in use");
    let renewed = r.validity();
    assert_eq!(Some(expires()), renewed.map(|v| v.not_after));
    publish(&live, "v3", "not a certificate", &key);
    until("refused", 1).await;
    // An expired certificate in place of a valid one is refused too: every
    // client would fail at once (audit).
    let ca = TestCa::new();
    let (old, old_key) = ca.issue_expired(&["localhost"]);
    publish(&live, "v4", &old, &old_key);
    until("refused", 2).await;
    assert_eq!(r.validity(), renewed);
    assert_eq!(Some(expires()), renewed.map(|v| v.not_after));
    // One valid in 2 s is refused until then, then taken with no other
    // change to the files (it waited for one: review).
    let (soon, soon_key) = ca.issue_valid_in(&["localhost"], 2);
    publish(&live, "v5", &soon, &soon_key);
    until("refused", 3).await;
    assert_eq!(r.validity(), renewed);
    until("reloaded", 2).await;
    assert_ne!(r.validity(), renewed);
    // Read again at every look (50 ms) for 2 s, it was refused, and
    // warned of, once (before: at every look, 37 times here, a WARN each
    // 30 s in production for as long as it was not valid). Not exactly 3: a
    // look between the swap of the certificate and of the key (two opens)
    // may refuse a mismatched pair once more.
    assert!(count("refused") <= 4, "{}", count("refused"));
    // Nothing more changes: nothing more is counted.
    let counted = count("refused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((count("reloaded"), count("refused")), (2, counted));
}
