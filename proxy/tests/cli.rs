//! The binary's command line: `check`, `--version`, `demo`.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agiproxy"))
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("agiproxy-cli-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_a_good_config_and_prints_routes() {
    let path = write_config(
        "good",
        "version: 1\nroutes:\n  - name: ivr\n    match: { script: { prefix: \"ivr/\" } }\n    pool: ivr\npools:\n  - name: ivr\n    backends:\n      - { address: \"127.0.0.1:5001\" }\n",
    );
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("route 0: ivr"), "{stdout}");
    assert!(stdout.contains("ivr/"), "{stdout}");
}

#[test]
fn check_rejects_a_bad_config_with_every_error_and_its_path() {
    let path = write_config(
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

#[test]
fn demo_serves_with_one_worker_thread() {
    demo_once(&["--workers", "1"]);
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
}

/// Issue 18: a pool of one backend address without active checks is
/// valid, but passive ejection cannot tell a dead service from one bad
/// connection there: `check` says so, and where to look.
#[test]
fn check_warns_about_a_single_address_pool_without_health_checks() {
    let pools = "pools:\n  - name: one\n    backends:\n      - { address: \"127.0.0.1:5001\" }\n  - name: checked\n    health: { type: agi, script: healthz }\n    backends:\n      - { address: \"127.0.0.1:5002\" }\n  - name: two\n    backends:\n      - { address: \"127.0.0.1:5003\" }\n      - { address: \"127.0.0.1:5004\" }\n";
    let path = write_config(
        "single",
        &format!("version: 1\nroutes:\n  - name: all\n    pool: one\n{pools}"),
    );
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
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
    let path = write_config(
        "rollout",
        &format!("version: 1\nroutes:\n  - name: ivr\n    rollout:\n      from: blue\n      to: green\n      steps: [5, 50, 100]\n      step_duration: 1h\n      start: \"{start}\"\npools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:5001\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:5002\" }}]\n"),
    );
    let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
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
}
