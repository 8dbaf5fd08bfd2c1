//! `agiproxy demo` as a user meets it: its address, and how it stops.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::Running;

/// Only a guard against a hang: nothing here is expected to take long.
const HANG: Duration = Duration::from_secs(60);

fn demo(listen: &str) -> (Running, mpsc::Receiver<String>) {
    let mut child = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_agiproxy"))
            .args(["demo", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a stdout line containing `needle`; returns it.
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + HANG;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?} from the demo: {e}"),
        }
    }
}

fn sigint(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
}

/// Waits for the child to exit; kills it after [`HANG`]. Returns its stderr.
fn exit_of(mut child: Running) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the demo did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// The address in `Serving on ADDR. ...`.
fn serving_addr(rx: &mpsc::Receiver<String>) -> std::net::SocketAddr {
    let line = wait_line(rx, "Serving on ");
    line["Serving on ".len()..]
        .split_once(". ")
        .unwrap()
        .0
        .parse()
        .unwrap()
}

#[test]
fn an_explicit_busy_listen_address_is_refused_not_replaced() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (child, _rx) = demo(&addr);
    let (status, stderr) = exit_of(child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("--listen"), "{stderr}");
    assert!(!stderr.contains("using a free port"), "{stderr}");
}

#[test]
fn ctrl_c_drains_and_says_so() {
    let (child, rx) = demo("127.0.0.1:0");
    let addr = serving_addr(&rx);
    sigint(&child);
    wait_line(&rx, "drained, exiting");
    let (status, stderr) = exit_of(child);
    assert!(status.success(), "{stderr}");
    // The listener is named by the port it had, not the configured port 0. (Its closing
    // line may come after the drain ends, so it may be missing at exit.)
    assert!(!stderr.contains("address=127.0.0.1:0"), "{stderr}");
    assert!(
        !stderr.contains("listener closed")
            || stderr.contains(&format!("listener closed address={addr}")),
        "{stderr}"
    );
}

#[test]
fn a_second_ctrl_c_stops_the_demo_at_once() {
    let (child, rx) = demo("127.0.0.1:0");
    let addr = serving_addr(&rx);
    // A call in progress, which holds the drain up to its 10 s deadline: the backend's
    // first command is never answered.
    let mut call = std::net::TcpStream::connect(addr).unwrap();
    call.set_read_timeout(Some(HANG)).unwrap();
    write!(
        call,
        "agi_network: yes\nagi_network_script: ivr/main?lang=en\nagi_request: agi://{addr}/ivr/main?lang=en\nagi_channel: Local/s@t-1;2\nagi_uniqueid: 1.1\n\n"
    )
    .unwrap();
    let mut first = String::new();
    BufReader::new(&call).read_line(&mut first).unwrap();
    assert!(first.starts_with("VERBOSE"), "{first:?}");

    sigint(&child);
    wait_line(&rx, "draining");
    let second = Instant::now();
    sigint(&child);
    wait_line(&rx, "second Ctrl-C: stopped at once (1 in flight cut)");
    let (status, stderr) = exit_of(child);
    assert!(status.success(), "{stderr}");
    // Well inside the 10 s drain deadline it would otherwise wait out.
    assert!(
        second.elapsed() < Duration::from_secs(8),
        "{:?}",
        second.elapsed()
    );
}
