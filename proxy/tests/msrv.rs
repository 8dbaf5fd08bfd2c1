//! The minimum Rust version we state is true: every workspace member inherits the workspace's
//! `rust-version` (so cargo enforces it), and no locked dependency needs a newer compiler.
//! Read from `cargo metadata`, since an older toolchain cannot be installed in CI.

use std::process::Command;

fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[test]
fn every_locked_dependency_builds_with_our_minimum_rust() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let ours = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("[workspace.package] rust-version in Cargo.toml")
        .trim_matches('"')
        .to_string();

    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();

    let mut wrong = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        let name = format!(
            "{} {}",
            p["name"].as_str().unwrap(),
            p["version"].as_str().unwrap()
        );
        let needs = p["rust_version"].as_str();
        if members.contains(&p["id"].as_str().unwrap()) {
            if needs != Some(ours.as_str()) {
                wrong.push(format!(
                    "{name}: rust-version {needs:?}; write `rust-version.workspace = true`"
                ));
            }
        } else if let Some(needs) = needs {
            if version(needs) > version(&ours) {
                wrong.push(format!("{name} needs Rust {needs}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the workspace says rust-version = {ours}, but:\n  {}\n\
         Raise rust-version (and the README, the chart's Dockerfile) or pin older releases.",
        wrong.join("\n  ")
    );
}
