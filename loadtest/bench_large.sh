#!/usr/bin/env bash
# The issue-5 benchmark on the `large` preset (1,000,000 items), end to end, in a workspace
# of its own so it never touches ./data, ./releases or the committed model repository,
# with issue 13's in-process reference measured in the same sitting:
#
#   1. data generate --preset $PRESET (skipped when the workspace already holds it)
#   2. recstack train, timed per step, peak memory sampled every 2 s
#   3. Triton for the whole run; then REPEATS times, taking turns on the same release:
#      a. the orchestrator (Triton serving the models): the open-loop generator at RATE
#         req/s over gRPC for DURATION (after its warm-up), then at LOW_RATE (unsaturated
#         per-stage numbers); stopped;
#      b. the in-process reference (`recstack bench reference`, loadtest/reference.py: the
#         same pipeline and front with the models in its own process, no Triton) under
#         the same loads (same seeds, rates, durations) on its own ports; stopped.
#      Around each load: CPU ticks of the serving process and of Triton's process tree
#      (/proc), and the recstack_stage_seconds / recstack_stage_cpu_seconds histograms.
#   4. results under $BENCH_DIR/results/<UTC stamp>/: bench.json + bench.md with CPU per
#      request per process, per-stage CPU, latency and the ratio total-stack-CPU(recstack)
#      / CPU(reference), as medians and ranges over the repeats.
#
# Usage: loadtest/bench_large.sh            (or: make bench-large)
# Env:   BENCH_DIR (default /work/perf; falls back to ./.bench-large when not writable),
#        PRESET (large; small or demo for a quick try), REPEATS (3),
#        RATE (100), DURATION (60s), LOW_RATE (30), LOW_DURATION (40s), SCENARIO (steady),
#        PORT_BASE (30000, below the ephemeral range 32768-60999: Triton +0/+1/+2, orchestrator gRPC +51, HTTP +80, metrics +100,
#        admin +101; reference gRPC +52, HTTP +82, metrics +102, admin +103),
#        PYSPY (path to a py-spy binary: records a flame graph of the orchestrator under
#        load in the first repeat),
#        PERF (path to Linux perf, e.g. /usr/bin/perf: samples each service's CPU for 20 s
#        of the first repeat's main load, after the warm-up, and reports it per shared
#        object — the interpreter, numpy, FAISS, the kernel, gRPC's core — in bench.md),
#        KEEP_UP=1 leaves Triton running afterwards.
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
PORT_BASE="${PORT_BASE:-30000}"
REPEATS="${REPEATS:-3}"
case "$REPEATS" in '' | *[!0-9]* | 0) echo "REPEATS must be a positive integer" >&2; exit 2 ;; esac
# This checkout's code, whichever checkout the virtual environment was installed from.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

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
REF_GRPC_PORT=$((PORT_BASE + 52))
REF_HTTP_PORT=$((PORT_BASE + 82))
REF_METRICS_PORT=$((PORT_BASE + 102))
REF_ADMIN_PORT=$((PORT_BASE + 103))

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

# --- 3. servers: Triton throughout; the orchestrator and the reference take turns ------
"$BIN/recstack" stop >>"$OUT/bench.log" 2>&1 || true
log "serve triton --detach"
"$BIN/recstack" serve triton --detach >>"$OUT/bench.log" 2>&1
TRITON_PID=$(cat "$RECSTACK_RUN_DIR/triton.pid")

# The process under load: SVC (orchestrator|reference), its pid, gRPC port, metrics URL.
SVC="" SVC_PID="" SVC_PORT="" SVC_METRICS=""
start_service() { # start_service orchestrator|reference
    local t0
    t0=$(date +%s)
    if [ "$1" = orchestrator ]; then
        log "serve orchestrator --detach"
        "$BIN/recstack" serve orchestrator --detach >>"$OUT/bench.log" 2>&1
        SVC_PORT=$RECSTACK_ORCHESTRATOR_GRPC_PORT
        SVC_METRICS="http://127.0.0.1:${RECSTACK_ORCHESTRATOR_METRICS_PORT}/metrics"
    else
        log "bench reference --detach (gRPC $REF_GRPC_PORT)"
        "$BIN/recstack" bench reference --detach --port "$REF_GRPC_PORT" \
            --http-port "$REF_HTTP_PORT" --metrics-port "$REF_METRICS_PORT" \
            --admin-port "$REF_ADMIN_PORT" >>"$OUT/bench.log" 2>&1
        SVC_PORT=$REF_GRPC_PORT
        SVC_METRICS="http://127.0.0.1:${REF_METRICS_PORT}/metrics"
    fi
    SVC=$1
    SVC_PID=$(cat "$RECSTACK_RUN_DIR/$1.pid")
    echo "$1_start_seconds $(($(date +%s) - t0))" >>"$OUT/start_seconds.txt"
}
stop_service() { # SIGTERM (drain), then SIGKILL, of the process group, as `recstack stop`
    "$PY" -c "import sys; from orchestrator.processes import stop_process; \
from recstack.settings import get_settings; stop_process(get_settings(), sys.argv[1])" \
        "$SVC" >>"$OUT/bench.log" 2>&1
}

rss_note() { # rss_note SUFFIX: the serving process's and Triton's RSS now
    {
        echo "${SVC}_rss_kb_$1 $(awk '/^VmRSS/{print $2}' /proc/$SVC_PID/status)"
        echo "${SVC}_hwm_kb_$1 $(awk '/^VmHWM/{print $2}' /proc/$SVC_PID/status)"
        echo "triton_tree_rss_kb_${SVC}_$1 $(rss_tree_kb "$TRITON_PID")"
    } >>"$OUT/rss.txt"
}

# Voluntary context switches of a process, all its threads together (/proc/PID/task/*):
# each is a thread that blocked — on the GIL, a socket, a queue — and was woken again.
vcsw_total() {
    awk '/^voluntary_ctxt_switches/ {s += $2} END {print s + 0}' /proc/"$1"/task/*/status 2>/dev/null
}

# CPU ticks (user + system) of a pid and its children (Triton's Python-backend stubs).
cpu_tree_ticks() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" 2>/dev/null); do
        total=$((total + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

run_load() { # run_load DIR RATE DURATION SEED: the load on $SVC
    local d=$1 c0 c1 t0 t1
    mkdir -p "$d"
    echo "$SVC" >"$d/service"
    # tritonserver 2.51 can segfault when clients cancel calls under overload (gRPC
    # cancellation race, docs/benchmark.md): say so, and restart it so this run measures
    # the models rather than the fallbacks.
    if ! kill -0 "$TRITON_PID" 2>/dev/null; then
        log "WARNING: tritonserver (pid $TRITON_PID) died during the previous run; restarting it"
        "$BIN/recstack" serve triton --detach >>"$OUT/bench.log" 2>&1
        TRITON_PID=$(cat "$RECSTACK_RUN_DIR/triton.pid")
        echo "$d" >>"$OUT/triton_restarted_before"
    fi
    curl -s "$SVC_METRICS" >"$d/metrics_before.txt"
    c0=$(awk '{print $14+$15}' "/proc/$SVC_PID/stat")
    v0=$(vcsw_total "$SVC_PID")
    t0=$(cpu_tree_ticks "$TRITON_PID")
    if [ -n "${PYSPY:-}" ] && [ "$d" = "$OUT/rep1/orchestrator/main" ]; then
        "$PYSPY" record --pid "$SVC_PID" --duration 40 --rate 100 --nonblocking \
            --format speedscope --output "$d/orchestrator.speedscope.json" >"$d/pyspy.log" 2>&1 &
    fi
    if [ -n "${PERF:-}" ] && [ "$d" = "$OUT/rep1/$SVC/main" ]; then
        # Past the scenario's warm-up (steady: 10 s), on-CPU samples of every thread.
        (sleep 12 && "$PERF" record -F 999 -p "$SVC_PID" -o "$d/perf.data" -- sleep 20) \
            >"$d/perf.log" 2>&1 &
    fi
    log "$SVC: loadtest run $SCENARIO --rate $2 --duration $3 --seed $4 (gRPC 127.0.0.1:$SVC_PORT)"
    "$BIN/recstack" loadtest run "$SCENARIO" --rate "$2" --duration "$3" --seed "$4" \
        --address "127.0.0.1:$SVC_PORT" --out "$d/loadtest" \
        --no-progress 2>&1 | tee "$d/loadtest.log" || true
    wait || true
    if [ -f "$d/perf.data" ]; then
        "$PERF" report -i "$d/perf.data" --sort dso --stdio >"$d/perf_dso.txt" 2>>"$d/perf.log" || true
    fi
    c1=$(awk '{print $14+$15}' "/proc/$SVC_PID/stat")
    v1=$(vcsw_total "$SVC_PID")
    t1=$(cpu_tree_ticks "$TRITON_PID")
    curl -s "$SVC_METRICS" >"$d/metrics_after.txt"
    echo "$((c1 - c0))" >"$d/service_cpu_ticks"
    echo "$((v1 - v0))" >"$d/service_voluntary_switches"
    echo "$((t1 - t0))" >"$d/triton_cpu_ticks"
}

# --- 4. load, REPEATS times: the orchestrator, then the reference, on the same loads -----
# The main and low runs use different seeds: the second must not replay the first one's
# users (the services cache user embeddings, so a replay would be flattered by hits). Each
# service starts fresh per repeat, so every repeat replays the same two loads.
for rep in $(seq 1 "$REPEATS"); do
    for svc in orchestrator reference; do
        start_service "$svc"
        [ "$rep" = 1 ] && rss_note idle
        run_load "$OUT/rep$rep/$svc/main" "$RATE" "$DURATION" 1
        run_load "$OUT/rep$rep/$svc/low" "${LOW_RATE:-30}" "${LOW_DURATION:-40s}" 2
        [ "$rep" = 1 ] && rss_note loaded
        stop_service
    done
done

# --- 4b. capacity: the knee of each service (SWEEP=0 skips it) ----------------------------
# `recstack loadtest sweep $SWEEP_SCENARIO`: the rate stepped up until p99 > 50 ms, an error
# or >= 1 % degraded answers (loadtest/scenarios/knee.yaml), once per service.
if [ "${SWEEP:-1}" = "1" ]; then
    for svc in orchestrator reference; do
        start_service "$svc"
        log "$SVC: loadtest sweep ${SWEEP_SCENARIO:-knee} (gRPC 127.0.0.1:$SVC_PORT)"
        "$BIN/recstack" loadtest sweep "${SWEEP_SCENARIO:-knee}" --address "127.0.0.1:$SVC_PORT" \
            --out "$OUT/sweep/$svc" --no-progress 2>&1 | tee "$OUT/sweep/$svc.log" || true
        stop_service
    done
fi

# --- 5. summary: bench.json + bench.md ----------------------------------------------------
"$PY" - "$OUT" "$RECSTACK_DATA_DIR" <<'PYEOF'
"""Merge pipeline step times, memory, RSS, and per run (repeat x service x load) the
load-test result, the CPU ticks and the per-stage histogram deltas into bench.json +
bench.md, with medians and ranges over the repeats and the recstack / reference ratios."""

import json
import os
import statistics
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

out, data = Path(sys.argv[1]), Path(sys.argv[2])
TICK = os.sysconf("SC_CLK_TCK")
SERVICES = ("orchestrator", "reference")
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
                le = float(s.labels["le"])
                st["buckets"][le] = st["buckets"].get(le, 0.0) + s.value  # summed over releases
            elif s.name.endswith("_sum"):
                st["sum"] += s.value
            elif s.name.endswith("_count"):
                st["count"] += s.value
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


def thread_cpu(run: Path, rpcs: float) -> dict[str, float]:
    """CPU ms per request by thread group (recstack_thread_cpu_seconds_total deltas)."""
    fam = "recstack_thread_cpu_seconds"
    b, a = counter(run / "metrics_before.txt", fam), counter(run / "metrics_after.txt", fam)
    if not rpcs:
        return {}
    return {g: round(1000 * (v - b.get(g, 0.0)) / rpcs, 3) for g, v in sorted(a.items())}


def one_run(run: Path) -> dict:
    """CPU per request (the server's own count of every RPC it answered while the ticks
    were taken, warm-up included), latency from the generator, stage tables."""
    stages = stage_table(run)
    rpcs = sum(v["count"] for k, v in stages.items() if k.startswith("request:"))
    service_s = int((run / "service_cpu_ticks").read_text()) / TICK
    triton_s = int((run / "triton_cpu_ticks").read_text()) / TICK
    found = sorted((run / "loadtest").glob("**/result.json"))
    result = json.loads(found[0].read_text()) if found else {}
    lat = result.get("latency_ms", {})
    per = (lambda s: round(1000 * s / rpcs, 3)) if rpcs else (lambda s: None)
    vcsw = int((run / "service_voluntary_switches").read_text())
    return {
        "rpcs": rpcs,
        "service_cpu_seconds": round(service_s, 2),
        "triton_cpu_seconds": round(triton_s, 2),
        "service_cpu_ms_per_request": per(service_s),
        "triton_cpu_ms_per_request": per(triton_s),
        "service_voluntary_switches_per_request": (
            round(vcsw / rpcs, 1) if rpcs else None
        ),
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "achieved_rate": round(result.get("achieved_rate", 0.0), 1),
        "error_share": result.get("error_share"),
        "degraded_share": result.get("degraded_share"),
        "user_embedding_cache_hit_share": cache_hit_share(run),
        "thread_cpu_ms_per_request": thread_cpu(run, rpcs),
        "stages": stages,
        "result_json": str(found[0]) if found else None,
    }


def spread(values: list) -> dict | None:
    """Median and range of the repeats' values (None when no repeat has one)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
            "max": round(max(xs), 3), "n": len(xs)}


def show(s: dict | None, unit: str = "") -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:g}{unit}"
    return f"{s['median']:g}{unit} ({s['min']:g}–{s['max']:g})"


steps = {
    p.stem: json.loads(p.read_text())["seconds"]
    for p in sorted((data / "work" / ".steps").glob("*.json"))
}
mem = [int(x.split()[1]) for x in (out / "train_mem.log").read_text().splitlines() if x.strip()]
rss = dict(line.split() for line in (out / "rss.txt").read_text().splitlines())
starts = dict(line.split() for line in (out / "start_seconds.txt").read_text().splitlines())
reps = sorted(out.glob("rep*"), key=lambda p: int(p.name[3:]))

# runs[phase][service] = [one_run per repeat]
runs: dict[str, dict[str, list[dict]]] = {}
for rep in reps:
    for svc in SERVICES:
        for phase_dir in sorted((rep / svc).glob("*")):
            if (phase_dir / "service_cpu_ticks").exists():
                runs.setdefault(phase_dir.name, {}).setdefault(svc, []).append(one_run(phase_dir))

runs = dict(sorted(runs.items(), key=lambda kv: (kv[0] != "main", kv[0])))  # main first
summary: dict[str, dict] = {}
for phase, by_svc in runs.items():
    orch, ref = by_svc.get("orchestrator", []), by_svc.get("reference", [])
    total = [
        None if r["service_cpu_ms_per_request"] is None
        else r["service_cpu_ms_per_request"] + r["triton_cpu_ms_per_request"]
        for r in orch
    ]
    ref_cpu = [r["service_cpu_ms_per_request"] for r in ref]
    ratio = [t / c if t and c else None for t, c in zip(total, ref_cpu, strict=False)]  # per repeat
    cpu_stages = sorted({k for r in orch + ref for k in r["stages"] if k.startswith("cpu:")})
    wall_stages = sorted({k for r in orch + ref for k in r["stages"]
                          if ":" not in k and k != "fallback"})
    thread_groups = sorted({g for r in orch + ref for g in r["thread_cpu_ms_per_request"]})
    summary[phase] = {
        "repeats": len(orch),
        "cpu_ms_per_request": {
            "orchestrator": spread([r["service_cpu_ms_per_request"] for r in orch]),
            "triton_tree": spread([r["triton_cpu_ms_per_request"] for r in orch]),
            "recstack_total": spread(total),
            "reference": spread(ref_cpu),
            # Triton idles beside the reference (it is not stopped between turns).
            "triton_tree_idle_during_reference": spread(
                [r["triton_cpu_ms_per_request"] for r in ref]
            ),
        },
        "ratio_recstack_total_to_reference_cpu": spread(ratio),
        "voluntary_switches_per_request": {
            svc: spread([r["service_voluntary_switches_per_request"] for r in by_svc.get(svc, [])])
            for svc in SERVICES
        },
        "latency_ms": {
            svc: {q: spread([r[q] for r in by_svc.get(svc, [])]) for q in ("p50_ms", "p99_ms")}
            for svc in SERVICES
        },
        "error_share": {svc: spread([r["error_share"] for r in by_svc.get(svc, [])])
                        for svc in SERVICES},
        "degraded_share": {svc: spread([r["degraded_share"] for r in by_svc.get(svc, [])])
                           for svc in SERVICES},
        "stage_cpu_mean_ms": {
            k[4:]: {svc: spread([r["stages"].get(k, {}).get("mean_ms")
                                 for r in by_svc.get(svc, [])]) for svc in SERVICES}
            for k in cpu_stages
        },
        "stage_wall_p50_ms": {
            k: {svc: spread([r["stages"].get(k, {}).get("p50_ms")
                             for r in by_svc.get(svc, [])]) for svc in SERVICES}
            for k in wall_stages
        },
        "thread_cpu_ms_per_request": {
            g: {svc: spread([r["thread_cpu_ms_per_request"].get(g)
                             for r in by_svc.get(svc, [])]) for svc in SERVICES}
            for g in thread_groups
        },
    }

# The knee of each service (4b): the highest rate that met the knee SLO, and the first
# that did not, with why.
knees = {}
for svc in SERVICES:
    path = out / "sweep" / svc / "sweep.json"
    if path.exists():
        sw = json.loads(path.read_text())
        knees[svc] = {
            "max_sustainable_rate": sw["max_sustainable_rate"],
            "broke_at": sw["broke_at"],
            "generator_limited": sw["generator_limited"],
            "slo": sw["slo"],
            "steps": [
                {"rate": st["rate"], "p99_ms": st["latency_ms"]["p99"],
                 "degraded_share": st["degraded_share"], "error_share": st["error_share"]}
                for st in sw["steps"]
            ],
        }

# Where each service's CPU went by shared object (PERF=...: perf, first repeat, main load).
by_dso = {}
for svc in SERVICES:
    path = out / "rep1" / svc / "main" / "perf_dso.txt"
    if path.exists():
        shares = {}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].endswith("%") and not line.startswith("#"):
                shares[parts[1]] = float(parts[0].rstrip("%"))
        by_dso[svc] = shares

doc = {
    "cpu_share_by_shared_object": by_dso,
    "knees": knees,
    "pipeline_step_seconds": steps,
    "pipeline_total_seconds": round(sum(steps.values()), 1),
    "train_peak_rss_mb": round(max(mem, default=0) / 1024),
    "start_seconds": {k: int(v) for k, v in starts.items()},
    "rss_mb": {k.replace("_kb", ""): round(int(v) / 1024) for k, v in rss.items()},
    "summary": summary,
    "runs": runs,
}
(out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")

lines = ["# bench-large results", "", "## Offline pipeline (seconds per step)", ""]
lines += ["| step | s |", "| --- | --- |"]
lines += [f"| {k} | {v} |" for k, v in steps.items()]
lines += [f"| **total** | {doc['pipeline_total_seconds']} |", ""]
lines += [f"Peak RSS of `recstack train` (this run): {doc['train_peak_rss_mb']} MB", ""]
lines += ["## Memory (MB, first repeat)", "", "| what | MB |", "| --- | --- |"]
lines += [f"| {k} | {v} |" for k, v in doc["rss_mb"].items()]
for phase, s in summary.items():
    cpu = s["cpu_ms_per_request"]
    lines += [
        "",
        f"## Run `{phase}`: recstack vs the in-process reference ({s['repeats']} repeat(s):"
        " median (min–max))",
        "",
        "CPU per request: the process's ticks during the load (/proc, user + system)"
        " over every RPC the server answered meanwhile (Recommend and RecordEvent, warm-up"
        " included). Ratio: recstack's orchestrator + Triton tree over the reference, per"
        " repeat.",
        "",
        "| CPU ms / request | value |",
        "| --- | --- |",
        f"| recstack orchestrator | {show(cpu['orchestrator'])} |",
        f"| recstack Triton tree (server + stubs) | {show(cpu['triton_tree'])} |",
        f"| **recstack total** | {show(cpu['recstack_total'])} |",
        f"| **in-process reference** | {show(cpu['reference'])} |",
        f"| Triton tree, idle beside the reference | "
        f"{show(cpu['triton_tree_idle_during_reference'])} |",
        f"| **ratio recstack total / reference** | "
        f"{show(s['ratio_recstack_total_to_reference_cpu'], '×')} |",
        "",
        "Voluntary context switches per request (all the service's threads, /proc: a thread"
        " that blocked and was woken again): recstack orchestrator"
        f" {show(s['voluntary_switches_per_request']['orchestrator'])}, reference"
        f" {show(s['voluntary_switches_per_request']['reference'])}.",
        "",
        "| service | p50 ms | p99 ms | errors | degraded |",
        "| --- | --- | --- | --- | --- |",
    ]
    for svc in SERVICES:
        lat = s["latency_ms"][svc]
        lines.append(
            f"| {svc} | {show(lat['p50_ms'])} | {show(lat['p99_ms'])} | "
            f"{show(s['error_share'][svc])} | {show(s['degraded_share'][svc])} |"
        )
    lines += ["", "Per stage (worker-thread CPU, mean ms; wall-clock p50 ms):", ""]
    lines += ["| stage | CPU recstack | CPU reference | wall p50 recstack | wall p50 reference |"]
    lines += ["| --- | --- | --- | --- | --- |"]
    for stage in sorted(set(s["stage_cpu_mean_ms"]) | set(s["stage_wall_p50_ms"])):
        c = s["stage_cpu_mean_ms"].get(stage, {})
        w = s["stage_wall_p50_ms"].get(stage, {})
        lines.append(
            f"| {stage} | {show(c.get('orchestrator'))} | {show(c.get('reference'))} | "
            f"{show(w.get('orchestrator'))} | {show(w.get('reference'))} |"
        )
    # Groups under 0.01 ms per request in both services are left out of the table.
    shown = {g: t for g, t in s["thread_cpu_ms_per_request"].items()
             if any(v and v["median"] >= 0.01 for v in t.values())}
    if shown:
        lines += ["", "Per thread group (CPU ms per request, recstack_thread_cpu_seconds_total:"
                  " main = event loop + gRPC/HTTP fronts, recommend = workers, native:* ="
                  " threads without Python, e.g. gRPC's core):", ""]
        lines += ["| thread | recstack orchestrator | reference |", "| --- | --- | --- |"]
        for g, t in shown.items():
            lines.append(f"| {g} | {show(t.get('orchestrator'))} | {show(t.get('reference'))} |")
if knees:
    slo = next(iter(knees.values()))["slo"]
    lines += [
        "",
        f"## Capacity: the highest rate with p99 <= {slo['p99_ms']:g} ms, no errors and"
        f" <= {slo['max_degraded_share']:.0%} degraded (one sweep per service)",
        "",
        "| service | highest rate met | first rate missed (why) | steps: rate p99 ms / degraded |",
        "| --- | --- | --- | --- |",
    ]
    for svc, k in knees.items():
        broke = k["broke_at"]
        missed = "-" if broke is None else f"{broke['rate']:g}/s ({broke['reason']})"
        trail = "; ".join(
            f"{st['rate']:g}/s "
            + ("-" if st["p99_ms"] is None else f"{st['p99_ms']:.1f}")
            + f" / {st['degraded_share']:.1%}"
            for st in k["steps"]
        )
        limited = " (generator-limited)" if k["generator_limited"] else ""
        lines.append(f"| {svc} | {k['max_sustainable_rate'] or '-'}{limited} | {missed} | {trail} |")
if by_dso:
    top = sorted({k for v in by_dso.values() for k in v},
                 key=lambda k: -max(v.get(k, 0.0) for v in by_dso.values()))[:12]
    main_cpu = summary.get("main", {}).get("cpu_ms_per_request", {})
    lines += [
        "",
        "## Where the CPU goes, by shared object (perf, 20 s of the first repeat's main load)",
        "",
        "Share of each service's on-CPU samples; ms per request = the share × the median"
        " CPU per request above.",
        "",
        "| shared object | recstack orchestrator % (ms) | reference % (ms) |",
        "| --- | --- | --- |",
    ]
    for k in top:
        cells = []
        for svc in ("orchestrator", "reference"):
            share = by_dso.get(svc, {}).get(k)
            cpu = (main_cpu.get(svc) or {}).get("median")
            cells.append("-" if share is None else f"{share:.1f}"
                         + (f" ({share * cpu / 100:.2f})" if cpu else ""))
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
(out / "bench.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
log "results in $OUT (bench.json, bench.md; rep*/orchestrator|reference/main|low/ with the generator's JSON, Markdown, PNG)"
