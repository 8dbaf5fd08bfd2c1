#!/usr/bin/env bash
# The container image test: builds the image's `prebuilt` target
# (Containerfile) from the agiproxy binary cargo built for the tests, and
# runs chaos-tests/tests/image.rs against it with podman (a FastAGI call
# through the container to a backend on loopback, non-root, read-only root
# filesystem, SIGTERM drains and exits 0).
#
#   bash .ci/image-test.sh            # from .ci/run, after cargo test
#
# No base image can be pulled on these machines: the `prebuilt` target is
# FROM scratch. The debug binary is used (stripped, about 17 MB) because
# `cargo test` has built it already; a release build would add minutes.
#
# Skipped, saying why, only where podman is missing and cannot be installed
# (apt-get, as root under CI=true). Any other failure fails.
#
# Environment: AGIPROXY_BINARY (default: TARGET/debug/agiproxy, built if
# missing), KEEP_IMAGE=1 keeps the image.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
image="localhost/agiproxy:ci-test"

if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    if [[ "${CI:-}" == true && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "image-test: installing podman and runc (apt-get)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc; } \
            >"$target/image-test-apt.log" 2>&1; then
            tail -20 "$target/image-test-apt.log" >&2
            echo "image-test: SKIPPED: podman cannot be installed (apt-get failed, log above)"
            exit 0
        fi
    else
        echo "image-test: SKIPPED: podman/runc not installed (install them: apt-get install podman runc; .ci/run does under CI=true as root)"
        exit 0
    fi
fi

# crun (podman's default) fails on this host's cgroups, and the default
# ulimits exceed the hard limits here: a config of our own, not the system's.
hard_nofile="$(ulimit -Hn)"
[[ "$hard_nofile" == unlimited ]] && hard_nofile=1048576
conf="$target/image-test-containers.conf"
mkdir -p "$target"
cat >"$conf" <<CONF
[containers]
default_ulimits = ["nofile=$hard_nofile:$hard_nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$conf"

binary="${AGIPROXY_BINARY:-$target/debug/agiproxy}"
if [[ ! -x "$binary" ]]; then
    echo "image-test: building agiproxy (cargo build -p agiproxy)"
    cargo build -q -p agiproxy
fi

# The build context: the stripped binary and the libraries ldd lists, at
# their paths (the Containerfile's `prebuilt` stage copies rootfs/ to /).
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs"
strip -o "$ctx/rootfs/agiproxy" "$binary"
for lib in $(ldd "$ctx/rootfs/agiproxy" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
done

# The untagged image of the `runtime` stage is left behind by the build:
# remove those that were not there before.
dangling_before="$(podman images -q --filter dangling=true | sort)"
start=$SECONDS
podman build -q --target prebuilt --file Containerfile --tag "$image" \
    --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || true)" "$ctx" >/dev/null
size="$(podman image inspect --format '{{.Size}}' "$image")"
echo "image-test: built $image in $((SECONDS - start)) s, $((size / 1000000)) MB"

status=0
AGIPROXY_IMAGE="$image" cargo test -p chaos-tests --test image -- --nocapture || status=$?
if [[ "${KEEP_IMAGE:-}" != 1 ]]; then
    podman rmi --force "$image" >/dev/null 2>&1 || true
    for id in $(comm -13 <(echo "$dangling_before") <(podman images -q --filter dangling=true | sort)); do
        podman rmi --force "$id" >/dev/null 2>&1 || true
    done
fi
exit "$status"
