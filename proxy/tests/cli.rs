//! The binary's command line: `check`, `--version`, `demo`.

use std::process::Command;

mod common;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agiproxy"))
}

/// `text` as a config file in a fresh directory, removed when the returned
/// `TempDir` drops: keep it as long as the file is used.
fn write_config(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    common::config_file("cli", &format!("agiproxy-cli-{name}.yaml"), text)
}

/// `agiproxy check` on `text` (written to a file named for `name`): what it
/// exited with and printed on stdout.
fn check_config(name: &str, text: &str) -> (std::process::Output, String) {
    let (_dir, path) = write_config(name, text);
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

#[test]
fn check_accepts_a_good_config_and_prints_routes() {
    let (out, stdout) = check_config("good", "version: 1\nroutes:\n  - name: ivr\n    match: { script: { prefix: \"ivr/\" } }\n    pool: ivr\npools:\n  - name: ivr\n    backends:\n      - { address: \"127.0.0.1:5001\" }\n");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("route 0: ivr"), "{stdout}");
    assert!(stdout.contains("ivr/"), "{stdout}");
    assert!(
        stdout.contains(
            "tcp keepalive: idle 60s, interval 10s, 6 probes (a vanished peer found within 120s"
        ),
        "{stdout}"
    );
}

#[test]
fn check_rejects_a_bad_config_with_every_error_and_its_path() {
    let (_dir, path) = write_config(
        "bad",
        "version: 1\ntimeouts:\n  budget: 15OOms\nroutes:\n  - name: ivr\n    pool: ivr-gren\n  - name: x\n    match: { args: { \"1\": \"([\" } }\n    pool: ivr-blue\npools:\n  - name: ivr-blue\n    backends:\n      - { address: \"10.0.0.1\" }\n  - name: ivr-green\n    backends:\n      - { address: \"127.0.0.1:5001\" }\n",
    );
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "timeouts.budget",
        "routes[0].pool: unknown pool \"ivr-gren\"",
        "ivr-blue, ivr-green",
        "routes[1].match.args",
        "pools[0].backends[0].address",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn check_names_a_missing_file() {
    let out = bin()
        .args(["check", "-c", "/nonexistent/agiproxy.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agiproxy.yaml"));
}

#[test]
fn version_and_help() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("agiproxy "));
    let out = bin().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "demo"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn demo_routes_real_fastagi_sessions() {
    demo_once(&[]);
}

/// Every serving option before `demo` (and so before `run`, parsed alike)
/// is still taken.
#[test]
fn demo_serves_with_one_worker_thread() {
    demo_once(&[
        "--workers",
        "1",
        "--log-level",
        "info",
        "--log-format",
        "text",
        "--log-buffer-lines",
        "100",
    ]);
}

/// `run` and `demo`'s options given before `check` or `ctl` did nothing,
/// silently: they are refused, naming the option, with clap's exit code.
/// From the environment they are not refused: containers export them for
/// every command of the image.
#[test]
fn serving_options_before_check_or_ctl_are_refused_but_not_from_the_environment() {
    let (_dir, path) = write_config(
        "serving-before",
        "version: 1\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    health: { type: tcp }\n    backends: [{ address: \"127.0.0.1:5001\" }]\n",
    );
    let path = path.to_str().unwrap();
    // Nothing listens on port 1: ctl fails on its own, after the parse.
    let ctl = [
        "ctl",
        "--url",
        "http://127.0.0.1:1",
        "--timeout",
        "1s",
        "status",
    ];
    let check = ["check", "-c", path];
    for (before, flag, cmd) in [
        (
            &["--log-level", "debug"][..],
            "--log-level <FILTER>",
            &check[..],
        ),
        (&["--workers", "2"][..], "--workers <N>", &check[..]),
        (
            &["--log-format", "json"][..],
            "--log-format <LOG_FORMAT>",
            &ctl[..],
        ),
        (
            &["--log-buffer-lines", "5"][..],
            "--log-buffer-lines <N>",
            &ctl[..],
        ),
    ] {
        let out = bin().args(before).args(cmd).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{before:?} {cmd:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "error: the argument '{flag}' applies to 'run' and 'demo', not to '{}'",
                cmd[0]
            )),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "{before:?} {cmd:?}");
    }
    let env = [
        ("AGIPROXY_WORKERS", "2"),
        ("AGIPROXY_LOG_BUFFER_LINES", "100"),
    ];
    let out = bin().args(check).envs(env).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ctl runs, and reports the replica it cannot reach (exit code 1).
    let out = bin().args(ctl).envs(env).output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(printed.contains("127.0.0.1:1: cannot connect"), "{printed}");
}

/// A container exports `AGIPROXY_WORKERS` and `AGIPROXY_LOG_BUFFER_LINES`
/// for every command of its image: a bad value fails neither `check` nor
/// `ctl`, where they do nothing; and the same option given before `run` on
/// the command line beats the environment's.
#[test]
fn the_environments_serving_options_are_for_run_and_demo_and_yield_to_the_command_line() {
    let (_dir, path) = run_config("env-serving", "  enabled: false\n");
    for (var, bad) in [
        ("AGIPROXY_WORKERS", "0"),
        ("AGIPROXY_LOG_BUFFER_LINES", "many"),
    ] {
        let out = bin()
            .args(["check", "-c"])
            .arg(&path)
            .env(var, bad)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{var}={bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = bin()
            .args([
                "ctl",
                "--url",
                "http://127.0.0.1:1",
                "--timeout",
                "1s",
                "status",
            ])
            .env(var, bad)
            .output()
            .unwrap();
        // 1: it ran, and could not reach the replica (2 would be the parse).
        assert_eq!(
            out.status.code(),
            Some(1),
            "{var}={bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `run` still refuses it, naming the option.
        let out = bin()
            .args(["run", "-c"])
            .arg(&path)
            .env(var, bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(var));
    }
    // Given on the command line, a bad value in the environment is not read.
    let out = bin()
        .args([
            "--workers",
            "1",
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--once",
        ])
        .env("AGIPROXY_WORKERS", "abc")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `--workers 1` before `run`: a current-thread runtime, no worker
    // threads, whatever the environment says.
    let mut child = common::Running::spawn(
        bin()
            .args(["--workers", "1", "run", "-c"])
            .arg(&path)
            .env("AGIPROXY_WORKERS", "3")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening for Asterisk") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "exited before listening");
    }
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("tokio-runtime-w")),
        "{names:?}"
    );
    child.kill().unwrap();
}

#[test]
fn zero_workers_is_refused_with_the_flag_named() {
    let out = bin()
        .args(["--workers", "0", "demo", "--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--workers"), "{stderr}");
    let out = bin()
        .args(["demo", "--once"])
        .env("AGIPROXY_WORKERS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--workers"), "{stderr}");
}

#[test]
fn a_log_buffer_of_zero_lines_is_refused_with_the_flag_named() {
    for (args, env) in [
        (&["--log-buffer-lines", "0", "demo", "--once"][..], None),
        (&["demo", "--once"][..], Some("0")),
    ] {
        let mut cmd = bin();
        cmd.args(args);
        if let Some(v) = env {
            cmd.env("AGIPROXY_LOG_BUFFER_LINES", v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--log-buffer-lines"), "{stderr}");
    }
}

fn demo_once(flags: &[&str]) {
    let out = bin()
        .args(flags)
        .args(["demo", "--listen", "127.0.0.1:0", "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("route ivr -> pool blue -> backend blue"),
        "{stdout}"
    );
    assert!(
        stdout.contains("route ivr-german -> pool green -> backend green"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("AGISTATUS=SUCCESS").count(), 2, "{stdout}");
    assert!(
        stdout.contains("AGISTATUS=FAILURE (AGIPROXY_ERROR=connect_failed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("AGISTATUS=FAILURE (AGIPROXY_ERROR=no_route)"),
        "{stdout}"
    );
    // The GotoIf it prints jumps to a label of README's dialplan (`?fallback`,
    // the `n(fallback)` priority): `?fallback,1` named an extension that
    // does not exist there, so a pasted line never ran the fallback.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut jumps = 0;
    for line in stdout.lines().filter(|l| l.contains("GotoIf(")) {
        let target = line.rsplit_once('?').unwrap().1.trim_end_matches(')');
        assert!(
            readme.contains(&format!(" same => n({target}),")),
            "{line}: README's dialplan has no label {target:?}"
        );
        jumps += 1;
    }
    assert_eq!(jumps, 2, "{stdout}");
}

/// Issue 18: a pool of one backend address without active checks is
/// valid, but passive ejection cannot tell a dead service from one bad
/// connection there: `check` says so, and where to look.
#[test]
fn check_warns_about_a_single_address_pool_without_health_checks() {
    let pools = "pools:\n  - name: one\n    backends:\n      - { address: \"127.0.0.1:5001\" }\n  - name: checked\n    health: { type: agi, script: healthz }\n    backends:\n      - { address: \"127.0.0.1:5002\" }\n  - name: two\n    backends:\n      - { address: \"127.0.0.1:5003\" }\n      - { address: \"127.0.0.1:5004\" }\n";
    let (out, stdout) = check_config(
        "single",
        &format!("version: 1\nroutes:\n  - name: all\n    pool: one\n{pools}"),
    );
    assert!(out.status.success(), "a warning is not an error: {stdout}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(warnings[0].contains("pools[0] (one)"), "{stdout}");
    assert!(warnings[0].contains("health:"), "{stdout}");
}

#[test]
fn check_explains_a_rollout_step_now_and_when_the_next_begins() {
    // Started an hour and a half ago, one hour a step: step 2 of 3 now.
    let start = std::time::SystemTime::now() - std::time::Duration::from_secs(5400);
    let start = humantime::format_rfc3339_seconds(start);
    let (out, stdout) = check_config("rollout", &format!("version: 1\nroutes:\n  - name: ivr\n    rollout:\n      from: blue\n      to: green\n      steps: [5, 50, 100]\n      step_duration: 1h\n      start: \"{start}\"\n      canary: {{ query: {{ canary: \"1\" }}, args: {{ \"2\": \"^qa$\" }}, vars: {{ agi_callerid: \"^\\\\+4930555\" }}, source: [\"10.9.0.0/24\"] }}\npools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:5001\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:5002\" }}]\n"));
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rollout blue"), "{stdout}");
    assert!(
        stdout.contains("rollout now: progressing, step 2 of 3, green 50% of new calls; the next step begins at"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(in 30m 0s)") || stdout.contains("(in 29m 59s)"),
        "{stdout}"
    );
    // The canary's criteria, under the rollout: why a test phone reaches
    // green (or does not) was not to be seen anywhere.
    assert!(
        stdout.contains(
            "\n    canary (any one matching goes to green until a rollback): query canary=1, \
             args 2~^qa$, vars agi_callerid~^\\+4930555, source 10.9.0.0/24\n"
        ),
        "{stdout}"
    );
}

/// Runs the binary with its stdout on a pipe whose reader has already gone, as
/// `agiproxy ... | head -1` ends up once head has read its line.
fn run_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = bin()
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

fn assert_quiet_exit(out: &std::process::Output, code: i32) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.is_empty(), "expected no output on stderr:\n{stderr}");
}

#[test]
fn check_into_a_closed_pipe_exits_quietly_with_its_verdict() {
    let (_dir, path) = write_config(
        "epipe",
        "version: 1\nroutes:\n  - name: ivr\n    pool: ivr\npools:\n  - name: ivr\n    backends:\n      - { address: \"127.0.0.1:5001\" }\n",
    );
    let out = run_into_closed_pipe(&["check", "-c", path.to_str().unwrap()]);
    assert_quiet_exit(&out, 0);
}

/// A stand-in control API: answers every request with `body`, for `requests` requests.
fn fake_control_api(body: String, requests: usize) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for _ in 0..requests {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn ctl_into_a_closed_pipe_exits_quietly() {
    let backends: Vec<String> = (0..50)
        .map(|i| format!(r#"{{"address":"127.0.0.1:{}","state":"up","weight":1,"active_sessions":0,"total_sessions":0,"consecutive_failures":0,"ejections":0,"draining":false}}"#, 5000 + i))
        .collect();
    let pools = format!(
        r#"[{{"name":"ivr","balance":"round_robin","active_sessions":0,"backends":[{}]}}]"#,
        backends.join(",")
    );
    let url = fake_control_api(pools, 2);
    let out = run_into_closed_pipe(&["ctl", "--url", &url, "--output", "json", "pools"]);
    assert_quiet_exit(&out, 0);
    let out = run_into_closed_pipe(&["ctl", "--url", &url, "pools"]);
    assert_quiet_exit(&out, 0);

    let text = "version: 1\n".repeat(200);
    let config = format!(
        r#"{{"generation":3,"hash":"abc","source":"file:x.yaml","text":{}}}"#,
        serde_json::to_string(&text).unwrap()
    );
    let url = fake_control_api(config, 1);
    let out = run_into_closed_pipe(&["ctl", "--url", &url, "config", "get"]);
    // Its one line on stderr says which config; nothing about the pipe.
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "# generation 3 hash abc from file:x.yaml\n"
    );

    // `rollout status` printed with println!, which panics (exit 101) on a
    // closed pipe (audit).
    let url = fake_control_api("[]".into(), 1);
    let out = run_into_closed_pipe(&["ctl", "--url", &url, "rollout", "status"]);
    assert_quiet_exit(&out, 0);
}

/// A rollout action a replica answers `unchanged` says why, when the
/// replica says (it said `unchanged` alone: why was not to be seen).
#[test]
fn ctl_rollout_says_why_an_action_changed_nothing() {
    let why = "the rollout is final by then: promote in force from 2026-12-06T09:00:02.000Z";
    for (body, line) in [
        (
            format!(
                r#"{{"generation":3,"hash":"abc","dry_run":false,"changed":false,"reason":"{why}"}}"#
            ),
            format!("unchanged: generation 3 hash abc ({why})\n"),
        ),
        // From a release without `reason`.
        (
            r#"{"generation":3,"hash":"abc","dry_run":false,"changed":false}"#.to_string(),
            "unchanged: generation 3 hash abc\n".to_string(),
        ),
    ] {
        let url = fake_control_api(body, 1);
        let out = bin()
            .args(["ctl", "--url", &url, "rollout", "rollback", "ivr"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, line);
    }
}

/// Runs `agiproxy run -c` and waits for it to exit (it must, on its own: the config cannot
/// start); a hang is killed after a generous deadline.
fn run_expecting_exit(config: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = bin();
    // SAFETY: setrlimit is async-signal-safe; it only lowers the child's own limit, to one
    // known here (the open-files warning depends on it), whatever the machine's hard limit.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = common::Running::spawn(
        cmd.envs(env.iter().copied())
            .args(["run", "-c"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.into_inner().wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_config(name: &str, control: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let port = common::free_port();
    write_config(
        name,
        &format!(
            "version: 1\nlisteners:\n  - {{ name: asterisk, address: \"127.0.0.1:{port}\" }}\nlimits: {{ max_sessions: 1000000 }}\nroutes:\n  - {{ name: all, pool: p }}\npools:\n  - name: p\n    backends:\n      - {{ address: \"127.0.0.1:1\" }}\ncontrol:\n{control}"
        ),
    )
}

#[test]
fn run_refuses_an_unreadable_token_file_before_listening_for_asterisk() {
    let port = common::free_port();
    let (_dir, config) = run_config(
        "token",
        &format!("  enabled: true\n  address: \"127.0.0.1:{port}\"\n  token_file: /nonexistent/agiproxy-token\n"),
    );
    let (code, stderr) = run_expecting_exit(&config, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("control.token_file"), "{stderr}");
    // Its limits.max_sessions of 1,000,000 needs 2,000,000 descriptors, not the 4,096 it
    // runs with: said as a warning, with the fix.
    assert!(
        stderr.contains("WARN") && stderr.contains("raise the hard limit to at least 2000064"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening for Asterisk"), "{stderr}");
}

/// A token or TLS file that names something endless (`/dev/zero`) is
/// refused at once, by what it is, before a byte is buffered: not read
/// until memory runs out.
#[test]
fn run_refuses_endless_token_and_tls_files_at_once() {
    let port = common::free_port();
    for (what, control, said) in [
        (
            "token-zero",
            format!("  address: \"127.0.0.1:{port}\"\n  token_file: /dev/zero\n"),
            "control.token_file: /dev/zero: not a regular file",
        ),
        (
            "tls-zero",
            format!(
                "  address: \"127.0.0.1:{port}\"\n  tls: {{ cert: /dev/zero, key: /dev/zero }}\n"
            ),
            "control.tls: /dev/zero: not a regular file",
        ),
    ] {
        let (_dir, config) = run_config(what, &control);
        let started = std::time::Instant::now();
        let (code, stderr) = run_expecting_exit(&config, &[]);
        assert_eq!(code, Some(1), "{what}: {stderr}");
        assert!(stderr.contains(said), "{what}: {stderr}");
        assert!(
            !stderr.contains("listening for Asterisk"),
            "{what}: {stderr}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn run_refuses_a_busy_control_port_before_listening_for_asterisk() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (_dir, config) = run_config(
        "busy-control",
        &format!(
            "  enabled: true\n  address: \"127.0.0.1:{port}\"\n  token_env: AGIPROXY_TEST_TOKEN\n"
        ),
    );
    let (code, stderr) = run_expecting_exit(&config, &[("AGIPROXY_TEST_TOKEN", "secret")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "control.address: cannot listen on 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    // The OS error is said once, not again as the error's cause.
    assert_eq!(stderr.matches("already in use").count(), 1, "{stderr}");
    assert!(!stderr.contains("listening for Asterisk"), "{stderr}");
    drop(busy);
}

#[test]
fn a_refused_config_is_logged_on_one_line_with_every_error() {
    use std::io::BufRead;
    let port = common::free_port();
    let good = format!(
        "version: 1\nlisteners:\n  - {{ name: asterisk, address: \"127.0.0.1:{port}\" }}\ncontrol: {{ enabled: false }}\nroutes:\n  - {{ name: all, pool: p }}\npools:\n  - name: p\n    backends:\n      - {{ address: \"127.0.0.1:1\" }}\n"
    );
    let (_dir, path) = write_config("refused", &good);
    let mut child = common::Running::spawn(
        bin()
            .args(["run", "-c"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    };
    // Two mistakes; the file watcher (started after the listeners) picks the change up.
    wait_for("watching the config file");
    let bad = good
        .replace("pool: p }", "pool: nope }")
        .replace("127.0.0.1:1\"", "127.0.0.1\"");
    std::fs::write(&path, bad).unwrap();
    let line = wait_for("config change refused");
    drop(child);
    assert!(
        line.contains("unknown pool \\\"nope\\\"") || line.contains("unknown pool \"nope\""),
        "{line}"
    );
    assert!(line.contains("has no port"), "{line}");
}

#[test]
fn help_lists_what_a_command_takes_each_with_a_description() {
    let helps: &[&[&str]] = &[
        &["-h"],
        &["check", "-h"],
        &["run", "-h"],
        &["demo", "-h"],
        &["ctl", "-h"],
        &["ctl", "status", "-h"],
        &["ctl", "config", "get", "-h"],
        &["ctl", "config", "apply", "-h"],
        &["ctl", "pools", "-h"],
        &["ctl", "drain", "-h"],
        &["ctl", "enable", "-h"],
        &["ctl", "split", "-h"],
    ];
    for args in helps {
        let out = bin().args(*args).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}");
        for line in help.lines() {
            let item = line.trim_start();
            if line.starts_with("  ")
                && (item.starts_with('-') || item.starts_with('<') || item.starts_with('['))
            {
                assert!(
                    item.contains("  "),
                    "{args:?}: {item:?} has no description:\n{help}"
                );
            }
        }
        // Only the commands that serve calls take the serving options.
        if matches!(args[0], "check" | "ctl") {
            for serving in [
                "--workers",
                "--log-buffer-lines",
                "--log-format",
                "--log-level",
            ] {
                assert!(!help.contains(serving), "{args:?} lists {serving}:\n{help}");
            }
        }
    }
    // Those options go before or after `run`; `check` refuses them.
    let out = bin()
        .args(["run", "-c", "/nonexistent.yaml", "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
}

#[test]
fn ctl_options_are_accepted_after_the_command() {
    // An answer `rollout status` reads: no rollout.
    let url = fake_control_api("[]".to_string(), 1);
    let out = bin()
        .args([
            "ctl", "rollout", "status", "--url", &url, "--output", "json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"replicas\""), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_failure_is_said_in_words() {
    let dns = chaos_tests::FakeDns::start().await;
    let server = dns.addr().to_string();
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args([
                "ctl",
                "--cluster",
                "dns:_control._tcp.nowhere.test",
                "--dns-server",
                &server,
                "status",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("_control._tcp.nowhere.test"), "{stderr}");
    assert!(stderr.contains("SRV"), "{stderr}");
    assert!(!stderr.contains("Query {"), "a Rust debug value: {stderr}");
}

/// `ctl` reads its token and config files within bounds too: a path naming
/// something endless is refused (the token file at once; `-f`, which may
/// be `/dev/stdin`, after 64 MiB), not read until memory runs out.
#[test]
fn ctl_refuses_endless_token_and_config_files() {
    for (args, said) in [
        (
            vec!["--token-file", "/dev/zero", "status"],
            "--token-file /dev/zero: not a regular file",
        ),
        (
            vec!["config", "apply", "-f", "/dev/zero"],
            "-f /dev/zero: larger than 67108864 bytes",
        ),
    ] {
        let out = bin()
            .args(["ctl", "--url", "http://127.0.0.1:1"])
            .args(&args)
            .env_remove("AGIPROXY_TOKEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
}

/// `config apply -f /dev/stdin` reads standard input (a pipe), as documented.
#[test]
fn ctl_config_apply_reads_standard_input() {
    use std::io::Write;
    let mut child = common::Running::spawn(
        bin()
            .args(["ctl", "--url", "http://127.0.0.1:1", "config", "apply"])
            .args(["-f", "/dev/stdin"])
            .env_remove("AGIPROXY_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"version: 1\n").unwrap();
    drop(stdin);
    let out = child.into_inner().wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Read, then sent: the error is the refused connection, not the file.
    assert!(!printed.contains("-f /dev/stdin"), "{printed}");
    assert!(
        printed.contains("http://127.0.0.1:1: cannot connect"),
        "{printed}"
    );
}

/// A config without routes is valid (every call gets FAILURE `no_route`)
/// but rarely meant: `check` says so (walkthrough: it said OK alone).
#[test]
fn check_warns_about_a_config_without_routes() {
    let (out, stdout) = check_config("noroutes", "version: 1\n");
    assert!(out.status.success(), "a warning is not an error: {stdout}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(warnings[0].contains("no_route"), "{stdout}");
}

/// A rollout that reads peers needs a control API with a token on every
/// replica: without one, judgement finds every peer missing at each tick
/// and `ctl rollout` cannot act (walkthrough: the blue-green example's
/// config had no control block, and `check` said OK).
#[test]
fn check_warns_about_rollout_peers_without_a_readable_control_api() {
    let body = |control: &str| {
        format!(
            "version: 1\n{control}routes:\n  - name: ivr\n    rollout: {{ from: blue, to: green, steps: [10, 100], step_duration: 5m, start: \"2026-12-06T09:00:00Z\", judge: {{ peers: [\"127.0.0.1:9090\"] }} }}\npools:\n  - name: blue\n    health: {{ type: agi, script: healthz }}\n    backends: [{{ address: \"127.0.0.1:5001\" }}]\n  - name: green\n    health: {{ type: agi, script: healthz }}\n    backends: [{{ address: \"127.0.0.1:5002\" }}]\n"
        )
    };
    let peers_warnings = |name: &str, control: &str| {
        let (out, stdout) = check_config(name, &body(control));
        assert!(out.status.success(), "a warning is not an error: {stdout}");
        stdout
            .lines()
            .filter(|l| l.contains("warning:") && l.contains("judge.peers"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let none = peers_warnings("nocontrol", "");
    assert_eq!(none.len(), 1, "{none:?}");
    assert!(none[0].contains("no control API listens"), "{none:?}");
    let no_token = peers_warnings("notoken", "control: { address: \"127.0.0.1:9090\" }\n");
    assert_eq!(no_token.len(), 1, "{no_token:?}");
    assert!(no_token[0].contains("has no token"), "{no_token:?}");
    let ok = peers_warnings(
        "readable",
        "control: { address: \"127.0.0.1:9090\", token_env: AGIPROXY_TEST_NO_SUCH_TOKEN }\n",
    );
    assert!(ok.is_empty(), "{ok:?}");
}

/// A route's timeout overrides are printed under it: a key mistyped or put
/// at the wrong level shows as missing (walkthrough: they were not shown).
#[test]
fn check_prints_a_routes_timeout_overrides() {
    let (out, stdout) = check_config("timeouts", "version: 1\ntimeouts: { next_command: 60s }\nroutes:\n  - name: dial-out\n    pool: p\n    timeouts: { first_command: 1s, next_command: 10m }\n  - name: quick\n    pool: p\n    timeouts: { budget: 400ms, connect: 100ms }\n  - name: plain\n    pool: p\npools:\n  - name: p\n    health: { type: agi, script: healthz }\n    backends: [{ address: \"127.0.0.1:5001\" }]\n");
    assert!(out.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let under = |route: &str| {
        let i = lines
            .iter()
            .position(|l| l.contains(&format!(": {route}:")))
            .unwrap();
        lines.get(i + 1).copied().unwrap_or("")
    };
    assert_eq!(
        under("dial-out").trim(),
        "timeouts first_command=1s next_command=10m",
        "{stdout}"
    );
    assert_eq!(
        under("quick").trim(),
        "timeouts budget=400ms connect=100ms",
        "{stdout}"
    );
    assert!(!under("plain").contains("timeouts"), "{stdout}");
}

/// A stand-in control API that answers `body` once and sends the request
/// line it got.
fn recording_control_api(body: String) -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let mut reader = std::io::BufReader::new(conn);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first.trim_end().to_string());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let _ = write!(
            reader.get_mut(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    (url, rx)
}

/// What ctl cannot read or write is a failure, not a silent exit 0: a 2xx
/// answer that is not the control API's (`--url` to another server), and
/// output a full disk refused (`ctl config get > backup.yaml`). And a name
/// typed with `/` or `?` is one path segment, never another request
/// (audit: `enable 'p/backends/ADDR/drain?' x` drained ADDR).
#[test]
fn ctl_fails_on_what_it_cannot_read_or_write_and_sends_names_as_one_segment() {
    let url = fake_control_api("<html>a web server</html>".into(), 1);
    let out = bin()
        .args(["ctl", "--url", &url, "status"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("unexpected answer (HTTP 200)"), "{stdout}");

    // JSON of another shape (a replica of another version): shown as it
    // came, not refused.
    let url = fake_control_api(r#"{"version":"9.9","new_field":1}"#.into(), 1);
    let out = bin()
        .args(["ctl", "--url", &url, "status"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("another agiproxy version?") && stdout.contains("\"new_field\": 1"),
        "{stdout}"
    );

    let config = r#"{"generation":3,"hash":"abc","source":"file:x.yaml","text":"version: 1\n"}"#;
    // The text alone on stdout, byte for byte (re-applied, the same hash).
    let url = fake_control_api(config.into(), 1);
    let out = bin()
        .args(["ctl", "--url", &url, "config", "get"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "version: 1\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("# generation 3 hash abc from file:x.yaml")
    );
    let url = fake_control_api(config.into(), 1);
    let out = bin()
        .args(["ctl", "--url", &url, "config", "get"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");

    // `-f -` reads standard input; a dry run says whether it would change.
    let url = fake_control_api(
        r#"{"generation":3,"hash":"abc","dry_run":true,"changed":true}"#.into(),
        1,
    );
    let mut child = bin()
        .args([
            "ctl",
            "--url",
            &url,
            "config",
            "apply",
            "-f",
            "-",
            "--dry-run",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"version: 1\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("it would change the running config"),
        "{stdout}"
    );
    // A token from the environment is checked as one from --token-file.
    let out = bin()
        .args(["ctl", "--url", "http://127.0.0.1:1", "status"])
        .env("AGIPROXY_TOKEN", "a\u{1}b")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--token-env AGIPROXY_TOKEN: the token must be visible ASCII"),
        "{stderr}"
    );

    let (url, seen) = recording_control_api("{}".into());
    let _ = bin()
        .args([
            "ctl",
            "--url",
            &url,
            "enable",
            "blue/backends/127.0.0.1:5/drain?",
            "[::1]:4573",
        ])
        .output()
        .unwrap();
    let line = seen
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        line,
        "POST /v1/pools/blue%2Fbackends%2F127.0.0.1:5%2Fdrain%3F/backends/%5B::1%5D:4573/enable HTTP/1.1"
    );
}
