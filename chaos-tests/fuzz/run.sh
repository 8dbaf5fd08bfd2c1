#!/usr/bin/env bash
# Runs every fuzz target in turn for SECONDS each (default 600), niced (the
# machine is shared), then merges the inputs that add coverage into the
# committed corpus. Needs nightly and `cargo install cargo-fuzz`.
# A crash lands in artifacts/TARGET/: copy it to regressions/TARGET/, where
# chaos-tests/tests/fuzz_corpus.rs replays it on stable.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:-600}"
TARGETS="${TARGETS:-header proxy_protocol relay config control_api}"
for t in $TARGETS; do
    work="${WORK:-/tmp/agiproxy-fuzz}/$t"
    mkdir -p "$work"
    echo "== $t for ${SECONDS_EACH}s"
    nice -n 19 cargo +nightly fuzz run -O --fuzz-dir . "$t" "$work" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=30 -print_final_stats=1 || echo "== $t FAILED (see artifacts/$t)"
    nice -n 19 cargo +nightly fuzz run -O --fuzz-dir . "$t" "corpus/$t" "$work" -- -merge=1 >/dev/null 2>&1 || true
done
