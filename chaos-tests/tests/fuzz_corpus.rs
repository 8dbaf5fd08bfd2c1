//! Replays the fuzzers' seed corpora and every input they found
//! (`chaos-tests/fuzz/{corpus,regressions}/TARGET/`) through the same
//! property checks, on stable: a fixed crash stays fixed.

#[path = "../fuzz/src/lib.rs"]
mod props;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files.iter().filter(|f| f.is_file()) {
            let data = std::fs::read(file).expect("read corpus file");
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(result.is_ok(), "{target}: {} fails", file.display());
            count += 1;
        }
    }
    assert!(count > 0, "no corpus for {target} under {}", root.display());
    println!("{target}: {count} inputs replayed");
}

#[test]
fn header_corpus() {
    replay("header", props::header);
}

#[test]
fn relay_corpus() {
    replay("relay", props::relay);
}

#[test]
fn config_corpus() {
    replay("config", props::config);
}

#[test]
fn control_api_corpus() {
    replay("control_api", props::control_api);
}

#[test]
fn proxy_protocol_corpus() {
    replay("proxy_protocol", props::proxy_protocol);
}
