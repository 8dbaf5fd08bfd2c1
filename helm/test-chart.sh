#!/usr/bin/env bash
# Checks the agiproxy Helm chart: `helm lint --strict`, `helm template` with
# the default values, with every helm/agiproxy/ci/*-values.yaml and with each
# values file given as an argument, and `agiproxy check` on the config file
# each rendering puts in the ConfigMap.
#
#   bash helm/test-chart.sh [MY-VALUES.yaml ...]
#
# Exit 0: every check passed, or helm is not installed (then it says
# "helm not installed, skipped" and checks nothing). Exit 1: a check failed.
#
# Environment:
#   HELM      the helm binary (default: helm on PATH)
#   AGIPROXY  the agiproxy binary for `check` (default: agiproxy on PATH, else
#             built with `cargo build -p agiproxy` in the repository)
#   KEEP=1    keep the rendered files (their directory is printed)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
chart="$here/agiproxy"
helm="${HELM:-helm}"

if ! command -v "$helm" >/dev/null 2>&1; then
    echo "test-chart: helm not installed, skipped"
    exit 0
fi

if [[ -n "${AGIPROXY:-}" ]]; then
    agiproxy="$AGIPROXY"
elif command -v agiproxy >/dev/null 2>&1; then
    agiproxy="$(command -v agiproxy)"
else
    echo "test-chart: building agiproxy (cargo build -p agiproxy)"
    if ! (cd "$repo" && cargo build -q -p agiproxy); then
        echo "test-chart: FAIL: cannot build agiproxy" >&2
        exit 1
    fi
    agiproxy="${CARGO_TARGET_DIR:-$repo/target}/debug/agiproxy"
fi

work="$(mktemp -d)"
if [[ "${KEEP:-}" == 1 ]]; then
    echo "test-chart: rendered files kept in $work"
else
    trap 'rm -rf "$work"' EXIT
fi

failures=0
fail() {
    echo "test-chart: FAIL: $*" >&2
    failures=$((failures + 1))
}

# The config file inside the ConfigMap: the lines of the `agiproxy.yaml: |`
# block scalar, without their 4-space indentation.
extract_config() {
    awk '
        /^  agiproxy\.yaml: \|/ { inside = 1; next }
        inside && /^    / { print substr($0, 5); next }
        inside && /^[[:space:]]*$/ { print ""; next }
        inside { exit }
    ' "$1"
}

echo "test-chart: $("$helm" version --short 2>/dev/null || echo "$helm")"

# Value sets: the defaults, then every ci/*-values.yaml.
sets=(default)
for f in "$chart"/ci/*-values.yaml; do
    [[ -e "$f" ]] && sets+=("$f")
done
for f in "$@"; do
    if [[ ! -r "$f" ]]; then
        echo "test-chart: cannot read values file $f" >&2
        exit 1
    fi
    sets+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
done

for set in "${sets[@]}"; do
    name="$(basename "$set" .yaml)"
    [[ -e "$work/$name.all.yaml" ]] && name="$name-$RANDOM"
    args=()
    [[ "$set" != default ]] && args=(-f "$set")
    echo "== $name"

    if "$helm" lint --strict "$chart" ${args[@]+"${args[@]}"} >"$work/$name.lint" 2>&1; then
        echo "   helm lint: ok"
    else
        cat "$work/$name.lint" >&2
        fail "$name: helm lint"
    fi

    if "$helm" template t "$chart" --namespace telephony ${args[@]+"${args[@]}"} \
        >"$work/$name.all.yaml" 2>"$work/$name.template.err"; then
        echo "   helm template: ok ($(grep -c '^kind: ' "$work/$name.all.yaml") objects)"
    else
        cat "$work/$name.template.err" >&2
        fail "$name: helm template"
        continue
    fi

    if ! "$helm" template t "$chart" --namespace telephony ${args[@]+"${args[@]}"} \
        --show-only templates/configmap.yaml >"$work/$name.configmap.yaml" 2>&1; then
        cat "$work/$name.configmap.yaml" >&2
        fail "$name: no ConfigMap rendered"
        continue
    fi
    extract_config "$work/$name.configmap.yaml" >"$work/$name.agiproxy.yaml"
    if [[ ! -s "$work/$name.agiproxy.yaml" ]]; then
        fail "$name: no agiproxy.yaml in the ConfigMap"
        continue
    fi

    if "$agiproxy" check -c "$work/$name.agiproxy.yaml" >"$work/$name.check" 2>&1; then
        sed 's/^/   /' "$work/$name.check"
    else
        cat "$work/$name.check" >&2
        fail "$name: agiproxy check refused the rendered config"
    fi
done

if ((failures > 0)); then
    echo "test-chart: $failures check(s) failed"
    exit 1
fi
echo "test-chart: all checks passed"
