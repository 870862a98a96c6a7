#!/usr/bin/env bash
# The issue-5 benchmark on the `large` preset (1,000,000 items), end to end, in a workspace
# of its own so it never touches ./data, ./releases or the committed model repository:
#
#   1. data generate --preset large (skipped when the workspace already holds it)
#   2. recstack train, timed per step, peak memory sampled every 2 s
#   3. Triton + orchestrator on the large release (non-default ports), their RSS
#   4. the open-loop generator at RATE req/s over gRPC for DURATION (after its warm-up),
#      then at LOW_RATE (unsaturated per-stage numbers); recstack_stage_seconds histograms
#      read before and after each run
#   5. recstack stop; results under $BENCH_DIR/results/<UTC stamp>/
#
# Usage: loadtest/bench_large.sh            (or: make bench-large)
# Env:   BENCH_DIR (default /work/perf; falls back to ./.bench-large when not writable),
#        RATE (100), DURATION (60s), LOW_RATE (30), LOW_DURATION (40s), SCENARIO (steady),
#        PRESET (large),
#        PORT_BASE (38000: Triton +0/+1/+2, orchestrator gRPC +51, HTTP +80, metrics +100),
#        PYSPY (path to a py-spy binary: records a flame graph of the orchestrator under load),
#        KEEP_UP=1 leaves the servers running afterwards.
# See docs/benchmark.md for the numbers this produced and how to read them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
PY="$BIN/python"

BENCH_DIR="${BENCH_DIR:-/work/perf}"
if ! mkdir -p "$BENCH_DIR" 2>/dev/null; then BENCH_DIR="$ROOT/.bench-large"; mkdir -p "$BENCH_DIR"; fi
RATE="${RATE:-100}"
DURATION="${DURATION:-60s}"
SCENARIO="${SCENARIO:-steady}"
PRESET="${PRESET:-large}"
PORT_BASE="${PORT_BASE:-38000}"

export RECSTACK_DATA_DIR="$BENCH_DIR/data"
export RECSTACK_MODEL_REPOSITORY="$BENCH_DIR/model_repository"
export RECSTACK_RELEASES_DIR="$BENCH_DIR/releases"
export RECSTACK_RUN_DIR="$BENCH_DIR/run"
export RECSTACK_TRITON_HTTP_PORT=$((PORT_BASE + 0))
export RECSTACK_TRITON_GRPC_PORT=$((PORT_BASE + 1))
export RECSTACK_TRITON_METRICS_PORT=$((PORT_BASE + 2))
export RECSTACK_ORCHESTRATOR_GRPC_PORT=$((PORT_BASE + 51))
export RECSTACK_ORCHESTRATOR_HTTP_PORT=$((PORT_BASE + 80))
export RECSTACK_ORCHESTRATOR_METRICS_PORT=$((PORT_BASE + 100))
export RECSTACK_ORCHESTRATOR_ADMIN_PORT=$((PORT_BASE + 101))
METRICS_URL="http://127.0.0.1:${RECSTACK_ORCHESTRATOR_METRICS_PORT}/metrics"

OUT="$BENCH_DIR/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT" "$RECSTACK_RUN_DIR"
log() { echo "[bench-large $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/bench.log"; }

# Sum of VmRSS (kB) of a pid and all its descendants.
rss_tree_kb() {
    local pid=$1 total=0 p r
    for p in $pid $(pgrep -P "$pid" 2>/dev/null); do
        r=$(awk '/^VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${r:-0}))
        if [ "$p" != "$pid" ]; then
            for c in $(pgrep -P "$p" 2>/dev/null); do
                r=$(awk '/^VmRSS/{print $2}' "/proc/$c/status" 2>/dev/null || echo 0)
                total=$((total + ${r:-0}))
            done
        fi
    done
    echo "$total"
}

# Sample the RSS of a process tree every 2 s into a file until it exits.
memwatch() {
    local pid=$1 out=$2
    while kill -0 "$pid" 2>/dev/null; do
        echo "$(date +%s) $(rss_tree_kb "$pid")" >>"$out"
        sleep 2
    done
}

stop_servers() {
    if [ "${KEEP_UP:-0}" != "1" ]; then "$BIN/recstack" stop >>"$OUT/bench.log" 2>&1 || true; fi
}
trap stop_servers EXIT

# --- 0. the workspace's model repository: committed configs + shims, no version folders ---
if [ ! -d "$RECSTACK_MODEL_REPOSITORY/_shims" ]; then
    mkdir -p "$RECSTACK_MODEL_REPOSITORY"
    cp -r model_repository/_shims "$RECSTACK_MODEL_REPOSITORY/"
    for cfg in model_repository/*/config.pbtxt; do
        m=$(basename "$(dirname "$cfg")")
        mkdir -p "$RECSTACK_MODEL_REPOSITORY/$m"
        cp "$cfg" "$RECSTACK_MODEL_REPOSITORY/$m/"
    done
fi

# --- 1. data ---------------------------------------------------------------------------
if grep -q "preset=$PRESET," "$RECSTACK_DATA_DIR/raw/meta.json" 2>/dev/null; then
    log "data: $PRESET preset already in $RECSTACK_DATA_DIR (delete raw/ to regenerate)"
else
    log "data generate --preset $PRESET"
    /usr/bin/time -v "$BIN/recstack" data generate --preset "$PRESET" >"$OUT/data_generate.log" 2>&1
fi

# --- 2. offline pipeline (resumable: finished steps of the same snapshot are skipped) ----
log "recstack train (log: $OUT/train.log)"
/usr/bin/time -v "$BIN/recstack" train >"$OUT/train.log" 2>&1 &
TRAIN_PID=$!
touch "$OUT/train_mem.log" # stays empty when every step was done earlier
sleep 1
memwatch "$(pgrep -P $TRAIN_PID -n || echo $TRAIN_PID)" "$OUT/train_mem.log" &
wait $TRAIN_PID

# --- 3. servers ------------------------------------------------------------------------
"$BIN/recstack" stop >>"$OUT/bench.log" 2>&1 || true
log "serve triton --detach"
"$BIN/recstack" serve triton --detach >>"$OUT/bench.log" 2>&1
log "serve orchestrator --detach"
t0=$(date +%s)
"$BIN/recstack" serve orchestrator --detach >>"$OUT/bench.log" 2>&1
echo $(($(date +%s) - t0)) >"$OUT/orchestrator_start_seconds"
ORCH_PID=$(cat "$RECSTACK_RUN_DIR/orchestrator.pid")
TRITON_PID=$(cat "$RECSTACK_RUN_DIR/triton.pid")

{
    echo "orchestrator_rss_kb_idle $(awk '/^VmRSS/{print $2}' /proc/$ORCH_PID/status)"
    echo "orchestrator_hwm_kb_idle $(awk '/^VmHWM/{print $2}' /proc/$ORCH_PID/status)"
    echo "triton_tree_rss_kb_idle $(rss_tree_kb "$TRITON_PID")"
} >"$OUT/rss.txt"


# --- 4. load: the target rate, then a lower one for unsaturated per-stage numbers -------
# CPU ticks (user + system) of a pid and its children (Triton's Python-backend stubs).
cpu_tree_ticks() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" 2>/dev/null); do
        total=$((total + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

run_load() { # run_load NAME RATE DURATION SEED
    local d="$OUT/$1" c0 c1 t0 t1
    mkdir -p "$d"
    # tritonserver 2.51 can segfault when clients cancel calls under overload (gRPC
    # cancellation race, docs/benchmark.md): say so, and restart it so this run measures
    # the models rather than the fallbacks.
    if ! kill -0 "$TRITON_PID" 2>/dev/null; then
        log "WARNING: tritonserver (pid $TRITON_PID) died during the previous run; restarting it"
        "$BIN/recstack" serve triton --detach >>"$OUT/bench.log" 2>&1
        TRITON_PID=$(cat "$RECSTACK_RUN_DIR/triton.pid")
        echo "$1" >>"$OUT/triton_restarted_before"
    fi
    curl -s "$METRICS_URL" >"$d/metrics_before.txt"
    c0=$(awk '{print $14+$15}' "/proc/$ORCH_PID/stat")
    t0=$(cpu_tree_ticks "$TRITON_PID")
    if [ -n "${PYSPY:-}" ] && [ "$1" = "main" ]; then
        "$PYSPY" record --pid "$ORCH_PID" --duration 40 --rate 100 --nonblocking \
            --format speedscope --output "$d/orchestrator.speedscope.json" >"$d/pyspy.log" 2>&1 &
    fi
    log "loadtest run $SCENARIO --rate $2 --duration $3 (gRPC 127.0.0.1:$RECSTACK_ORCHESTRATOR_GRPC_PORT)"
    "$BIN/recstack" loadtest run "$SCENARIO" --rate "$2" --duration "$3" --seed "$4" \
        --address "127.0.0.1:$RECSTACK_ORCHESTRATOR_GRPC_PORT" --out "$d/loadtest" \
        --no-progress 2>&1 | tee "$d/loadtest.log" || true
    wait || true
    c1=$(awk '{print $14+$15}' "/proc/$ORCH_PID/stat")
    t1=$(cpu_tree_ticks "$TRITON_PID")
    curl -s "$METRICS_URL" >"$d/metrics_after.txt"
    echo "$((c1 - c0))" >"$d/orchestrator_cpu_ticks"
    echo "$((t1 - t0))" >"$d/triton_cpu_ticks"
}
# Different seeds: the second run must not replay the first one's users (the orchestrator
# caches user embeddings, so a replay would be flattered by hits).
run_load main "$RATE" "$DURATION" 1
run_load low "${LOW_RATE:-30}" "${LOW_DURATION:-40s}" 2
{
    echo "orchestrator_rss_kb_loaded $(awk '/^VmRSS/{print $2}' /proc/$ORCH_PID/status)"
    echo "orchestrator_hwm_kb $(awk '/^VmHWM/{print $2}' /proc/$ORCH_PID/status)"
    echo "triton_tree_rss_kb_loaded $(rss_tree_kb "$TRITON_PID")"
} >>"$OUT/rss.txt"

# --- 5. summary: bench.json + bench.md ----------------------------------------------------
"$PY" - "$OUT" "$RECSTACK_DATA_DIR" <<'PYEOF'
"""Merge pipeline step times, memory, RSS, load-test results and the per-stage histogram
deltas of each run into bench.json + bench.md."""

import json
import os
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

out, data = Path(sys.argv[1]), Path(sys.argv[2])
TICK = os.sysconf("SC_CLK_TCK")
# family -> key prefix: wall time per stage, worker-thread CPU per stage, whole handler
FAMILIES = {
    "recstack_stage_seconds": "",
    "recstack_stage_cpu_seconds": "cpu:",
    "recstack_request_seconds": "request:",
}


def hist(path: Path) -> dict[str, dict]:
    """stage (or request:<method>) -> {buckets: {le: cumulative count}, sum, count}"""
    stages: dict[str, dict] = {}
    for fam in text_string_to_metric_families(path.read_text()):
        if fam.name not in FAMILIES:
            continue
        for s in fam.samples:
            key = FAMILIES[fam.name] + (s.labels.get("stage") or s.labels.get("method", ""))
            st = stages.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0.0})
            if s.name.endswith("_bucket"):
                st["buckets"][float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                st["sum"] = s.value
            elif s.name.endswith("_count"):
                st["count"] = s.value
    return stages


def quantile(buckets: dict[float, float], q: float) -> float:
    """Linear interpolation inside the bucket (as PromQL histogram_quantile)."""
    les = sorted(buckets)
    want, prev_le, prev_c = q * buckets[les[-1]], 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= want:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (want - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return les[-1]


def counter(path: Path, family: str) -> dict[str, float]:
    """label value -> count of a one-label counter family."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(path.read_text()):
        if fam.name == family:
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[next(iter(s.labels.values()), "")] = s.value
    return out


def cache_hit_share(run: Path) -> float | None:
    fam = "recstack_user_embedding_cache"
    b, a = counter(run / "metrics_before.txt", fam), counter(run / "metrics_after.txt", fam)
    d = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in ("hit", "miss")}
    total = d["hit"] + d["miss"]
    return round(d["hit"] / total, 3) if total else None


def stage_table(run: Path) -> dict[str, dict]:
    before, after = hist(run / "metrics_before.txt"), hist(run / "metrics_after.txt")
    stages = {}
    for name, a in after.items():
        b = before.get(name, {"buckets": {}, "sum": 0.0, "count": 0.0})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        d = {le: c - b["buckets"].get(le, 0.0) for le, c in a["buckets"].items()}
        stages[name] = {
            "count": int(n),
            "mean_ms": round(1000 * (a["sum"] - b["sum"]) / n, 3),
            **{f"p{q}_ms": round(1000 * quantile(d, q / 100), 3) for q in (50, 90, 99)},
        }
    return stages


steps = {
    p.stem: json.loads(p.read_text())["seconds"]
    for p in sorted((data / "work" / ".steps").glob("*.json"))
}
mem = [int(x.split()[1]) for x in (out / "train_mem.log").read_text().splitlines() if x.strip()]
rss = dict(line.split() for line in (out / "rss.txt").read_text().splitlines())
runs = {}
for name in ("main", "low"):
    run = out / name
    if not run.exists():
        continue
    found = sorted((run / "loadtest").glob("**/result.json"))
    runs[name] = {
        "stages": stage_table(run),
        "orchestrator_cpu_seconds": round(
            int((run / "orchestrator_cpu_ticks").read_text()) / TICK, 1
        ),
        "triton_cpu_seconds": round(int((run / "triton_cpu_ticks").read_text()) / TICK, 1),
        "user_embedding_cache_hit_share": cache_hit_share(run),
        "result_json": str(found[0]) if found else None,
    }
doc = {
    "pipeline_step_seconds": steps,
    "pipeline_total_seconds": round(sum(steps.values()), 1),
    "train_peak_rss_mb": round(max(mem, default=0) / 1024),
    "orchestrator_start_seconds": int((out / "orchestrator_start_seconds").read_text()),
    "rss_mb": {k: round(int(v) / 1024) for k, v in rss.items()},
    "runs": runs,
}
(out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")

lines = ["# bench-large results", "", "## Offline pipeline (seconds per step)", ""]
lines += ["| step | s |", "| --- | --- |"]
lines += [f"| {k} | {v} |" for k, v in steps.items()]
lines += [f"| **total** | {doc['pipeline_total_seconds']} |", ""]
lines += [f"Peak RSS of `recstack train` (this run): {doc['train_peak_rss_mb']} MB", ""]
lines += ["## Memory (MB)", "", "| what | MB |", "| --- | --- |"]
lines += [f"| {k} | {v} |" for k, v in doc["rss_mb"].items()]
for name, r in runs.items():
    lines += ["", f"## Run `{name}`: per-stage server time (histogram deltas)", ""]
    lines += [
        f"CPU during the run: orchestrator {r['orchestrator_cpu_seconds']} s, Triton (server"
        f" and stubs) {r['triton_cpu_seconds']} s. `cpu:` rows: the worker thread's CPU time"
        " in that stage.",
        "",
        f"User-embedding cache hits: {r['user_embedding_cache_hit_share']}",
        "",
    ]
    lines += ["| stage | n | mean ms | p50 ms | p90 ms | p99 ms |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for k, v in r["stages"].items():
        lines.append(
            f"| {k} | {v['count']} | {v['mean_ms']} | {v['p50_ms']} | {v['p90_ms']} | "
            f"{v['p99_ms']} |"
        )
    summary = sorted((out / name / "loadtest").glob("**/summary.md"))
    if summary:
        lines += ["", summary[0].read_text()]
(out / "bench.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
log "results in $OUT (bench.json, bench.md, main/ and low/ with the generator's JSON, Markdown, PNG)"
