"""The table of chaos-tests/bench/phases: per phase, each path's medians and
the median of per-round ratios (CPU per session). Usage: phases-report.py RUNS_DIR"""

import json
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

runs = defaultdict(lambda: defaultdict(dict))  # phase -> path -> round -> report
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    phase, path, rnd = f.stem.split("--")
    try:
        runs[phase][path][int(rnd)] = json.loads(f.read_text())
    except ValueError:
        print(f"- {f.name}: no report (the run failed; see log/), left out", file=sys.stderr)


def cpu_ms_per_1000(r):
    """Proxy CPU per 1,000 sessions (FAILUREs count as sessions), ms."""
    proxy = next(p for p in r["processes"] if p["name"] == "proxy")
    n = r["sessions"] + r["errors"]["failure"]
    return proxy["cpu_secs"] * 1e6 / n if n else float("nan")


def ratio(phase, a, b):
    """Median and range of the per-round CPU/session ratios a/b."""
    rs = [
        cpu_ms_per_1000(runs[phase][a][k]) / cpu_ms_per_1000(runs[phase][b][k])
        for k in runs[phase][a]
        if k in runs[phase][b]
    ]
    if not rs:
        return "-"
    return f"**{st.median(rs):.2f}×** ({min(rs):.2f}–{max(rs):.2f}, {len(rs)} rounds)"


def med(phase, path, f):
    return st.median(f(r) for r in runs[phase][path].values())


print("| phase | path | sessions/s | proxy CPU ms / 1,000 sessions | setup p50 µs | errors |")
print("|---|---|---|---|---|---|")
for phase, paths in runs.items():
    for path in paths:
        rs = paths[path].values()
        print(
            f"| {phase} | {path} | {med(phase, path, lambda r: r['sessions_per_sec']):,.0f}"
            f" | {med(phase, path, cpu_ms_per_1000):.0f}"
            f" | {med(phase, path, lambda r: r['setup_us']['p50']):.0f}"
            f" | {sum(r['errors_total'] - r['errors']['failure'] for r in rs)} |"
        )
print()
print("| comparison (CPU per session, median of per-round ratios) | ratio |")
print("|---|---|")
pairs = [
    ("short", "agi-def", "ha-def", "short sessions, defaults: agiproxy / HAProxy"),
    ("short", "agi-tuned", "ha-tuned", "short sessions, tuned: agiproxy / HAProxy"),
    ("long", "agi-def", "ha-def", "10-command sessions, defaults: agiproxy / HAProxy"),
    ("long", "agi-tuned", "ha-tuned", "10-command sessions, tuned: agiproxy / HAProxy"),
    ("setup", "agi-tuned", "ha-tuned", "2 clients, tuned: agiproxy / HAProxy"),
    ("log", "agi-tuned-log", "agi-tuned", "access log on / off (tuned agiproxy)"),
    ("log", "agi-tuned-json", "agi-tuned", "JSON access log on / off (tuned agiproxy)"),
    ("short-h2h", "agi-def", "ha-def", "short sessions, defaults, head to head: agiproxy / HAProxy"),
    ("short-h2h", "agi-tuned", "ha-tuned", "short sessions, tuned, head to head: agiproxy / HAProxy"),
    ("long-h2h", "agi-def", "ha-def", "10-command sessions, defaults, head to head: agiproxy / HAProxy"),
    ("long-h2h", "agi-tuned", "ha-tuned", "10-command sessions, tuned, head to head: agiproxy / HAProxy"),
    ("log-h2h", "agi-tuned-log", "agi-tuned", "access log on / off, head to head (tuned agiproxy)"),
    ("log-h2h", "agi-tuned-json", "agi-tuned", "JSON access log on / off, head to head (tuned agiproxy)"),
    ("ab", "b-tuned", "a-tuned", "build B / build A (tuned, short sessions)"),
    ("ab-def", "b-def", "a-def", "build B / build A (defaults, short sessions)"),
    ("ab-h2h", "b-def", "a-def", "build B / build A (defaults, short sessions, head to head)"),
    ("ab-failure", "failure-b", "failure-a", "build B / build A (CPU per FAILURE)"),
]
for kind in ("exact", "prefix", "regex"):
    big = [p for p in runs.get("routes", {}) if p.startswith(f"routes-{kind}-") and not p.endswith("-10")]
    for p in big:
        pairs.append(("routes", p, f"routes-{kind}-10", f"{p.split('-')[-1]} vs 10 {kind} routes"))
    big = [p for p in runs.get("routes-h2h", {}) if p.startswith(f"routes-{kind}-") and not p.endswith("-10")]
    for p in big:
        pairs.append(("routes-h2h", p, f"routes-{kind}-10", f"{p.split('-')[-1]} vs 10 {kind} routes, head to head"))
for phase in sorted((p for p in runs if p.startswith("paced-")), key=lambda p: int(p.split("-")[1])):
    pairs.append((phase, "agi-def", "ha-def", f"short sessions offered at {int(phase.split('-')[1]):,}/s, defaults: agiproxy / HAProxy"))
for phase, a, b, what in pairs:
    if a in runs.get(phase, {}) and b in runs.get(phase, {}):
        print(f"| {what} | {ratio(phase, a, b)} |")
if "setup" in runs:
    diffs = [
        runs["setup"]["agi-tuned"][k]["setup_us"]["p50"] - runs["setup"]["ha-tuned"][k]["setup_us"]["p50"]
        for k in runs["setup"]["agi-tuned"]
        if k in runs["setup"]["ha-tuned"]
    ]
    print(f"| setup p50 at 2 clients, agiproxy − HAProxy (median of per-round differences) | {st.median(diffs):+.0f} µs |")
if "failure" in runs:
    for path, what in (("failure", "pool known to be down (checks failed)"), ("failure-unchecked", "only backend refuses, no checks")):
        if path in runs["failure"]:
            rates = [r["errors"]["failure"] / r["window_secs"] for r in runs["failure"][path].values()]
            print(f"| FAILUREs/s, {what}, one worker on one core (median of {len(rates)} runs) | **{st.median(rates):,.0f}/s** |")
if "ab-failure" in runs:
    for path in ("failure-a", "failure-b"):
        rates = [r["errors"]["failure"] / r["window_secs"] for r in runs["ab-failure"][path].values()]
        print(f"| FAILUREs/s, {path}, one worker on one core (median of {len(rates)} runs) | **{st.median(rates):,.0f}/s** |")
