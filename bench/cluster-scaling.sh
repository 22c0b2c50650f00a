#!/usr/bin/env bash
# Time to quality (docs/CLUSTER.md, "Time to quality"): the same wall-time budget for
#   single-1: one node, 1 torch thread;
#   cluster:  NODES nodes on this machine, 1 torch thread each: DiLoCo (H inner steps a round) or every-step;
#   single-N: one node with all the machine's threads;
# tiny, batch 32, the built-in emoji data; run it with nothing else on the machine. Each run keeps its checkpoints (a
# single node and an every-step cluster every EVERY of wall time, 30s by default; a DiLoCo cluster every round), and each
# checkpoint is evaluated (teacher and student on emoji test, k = 4) at the wall time it became durable; the last one
# also on OpenMoji test. Prints quality against wall time, and each run's speedup to single-1's final teacher r_mean:
# the budget over the first wall time it reached it, and over the time it crossed that level between two checkpoints.
# PIN=1 pins single-1 to core 0 and cluster node i to core i-1 (taskset): each process then has one core, where unpinned
# single-1's pipelined teacher takes about a third of the second core (docs/CLUSTER.md); single-N is never pinned.
# Usage: [REUSE=/tmp/mamo-scaling-XXXX] [EVERY=30s] [PIN=1] bash bench/cluster-scaling.sh [BUDGET_MIN=8] [NODES=2] [H=50] [SYNC=diloco|every-step]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-8}
NODES=${2:-2}
H=${3:-50}
SYNC=${4:-diloco}
# The evaluations' grid: fixed wall times for single nodes and every-step; a DiLoCo cluster checkpoints every round.
GRID=(--set checkpoint.every-steps=0 --set "checkpoint.every=${EVERY:-30s}")
CLUSTER_GRID=()
[ "$SYNC" = every-step ] && CLUSTER_GRID=("${GRID[@]}")
OUT=$(mktemp -d /tmp/mamo-scaling-XXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
# A node that crashes (a native fault) leaves a crash report with every thread's stack in the run's folder.
export DOTNET_DbgEnableMiniDump=1 DOTNET_DbgMiniDumpType=1 DOTNET_EnableCrashReport=1 DOTNET_DbgMiniDumpName="$OUT/crash.%p"
EMOJI=$("${MAMO[@]}" datasets fetch emoji >/dev/null 2>&1; echo ~/.cache/mamo/emoji/test.jsonl)
OPENMOJI=$("${MAMO[@]}" datasets fetch emoji-openmoji >/dev/null 2>&1; echo ~/.cache/mamo/emoji-openmoji/test.jsonl)
COMMON=(--plain --dashboard off --set eval.every-steps=0 --set checkpoint.keep-last=100000 --set metrics.every-steps=10)
# Under PIN, the prefix that keeps a process on core $1; nothing otherwise. A prefix, not a wrapper function: a node
# started in the background must be the job itself, or the SIGTERM at the budget's end reaches only a subshell.
on_core() { if [ -n "${PIN:-}" ]; then echo "taskset -c $1"; fi; }
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

single() {   # name threads [core]
  date +%s.%N >"$OUT/$1.start"
  ${3:+$(on_core "$3")} "${MAMO[@]}" pretrain --run-dir "$OUT/$1" "${COMMON[@]}" --time-budget "${BUDGET}m" --set "torch-threads=$2" \
    "${GRID[@]}" >"$OUT/$1.log" 2>&1
}

cluster() {
  local seed
  seed=$(port)
  date +%s.%N >"$OUT/cluster.start"
  for i in $(seq 1 "$NODES"); do
    local here=$seed
    [ "$i" = 1 ] || here=$(port)
    $(on_core $(( (i - 1) % $(nproc) ))) "${MAMO[@]}" pretrain --run-dir "$OUT/cluster" "${COMMON[@]}" --max-steps 1000000 --cluster "127.0.0.1:$here" \
      --seed-nodes "127.0.0.1:$seed" --node-name "n$i" --set torch-threads=1 --set "cluster.sync=$SYNC" --set "cluster.inner-steps=$H" \
      --set "cluster.min-replicas=$NODES" "${CLUSTER_GRID[@]}" >"$OUT/cluster-n$i.log" 2>&1 &
    [ "$i" = 1 ] && sleep 1   # the seed first: its node forms the cluster and holds the coordinator
  done
  sleep $((BUDGET * 60))
  kill -TERM $(jobs -p) 2>/dev/null || true   # each node hands in its part of the round and leaves
  # A node that has not left a minute after SIGTERM is killed: what the measure counts is durable already.
  for _ in $(seq 1 60); do [ -z "$(jobs -pr)" ] && break; sleep 1; done
  kill -KILL $(jobs -pr) 2>/dev/null || true
  wait || true
}

# REUSE: the single-node runs (and their evaluations) of an earlier run of this script, same budget and machine; only
# the cluster runs now.
[ -n "${REUSE:-}" ] || single single-1 1 0
cluster
[ -n "${REUSE:-}" ] || single "single-$(nproc)" "$(nproc)"

# Every checkpoint durable within the budget, evaluated (a reused run's evaluations are taken as they were).
for run in single-1 cluster "single-$(nproc)"; do
  if [ -n "${REUSE:-}" ] && [ "$run" != cluster ]; then
    grep "^$run " "$REUSE/curve.txt" >>"$OUT/curve.txt"
    grep "^$run " "$REUSE/openmoji.txt" >>"$OUT/openmoji.txt"
    continue
  fi
  start=$(cat "$OUT/$run.start")
  last=
  for dir in "$OUT/$run"/checkpoints/step-*; do
    [ -f "$dir/state.json" ] || continue
    at=$(python3 -c "import os, sys; print(f'{os.path.getmtime(sys.argv[1]) - float(sys.argv[2]):.0f}')" "$dir/state.json" "$start")
    [ "$at" -le $((BUDGET * 60 + 30)) ] || continue
    last=$dir   # the last one within the budget goes to OpenMoji too
    line="$run $at $(basename "$dir")"
    for w in teacher student; do
      line="$line $("${MAMO[@]}" eval --checkpoint "$dir" --manifest "$EMOJI" --k 4 --json --weights "$w" 2>/dev/null | tail -1 \
        | python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)["r_mean"])' 2>/dev/null || echo nan)"
    done
    echo "$line" >>"$OUT/curve.txt"
  done
  for w in teacher student; do
    echo "$run $w openmoji r_mean $("${MAMO[@]}" eval --checkpoint "$last" --manifest "$OPENMOJI" --k 4 --json --weights "$w" 2>/dev/null | tail -1 \
      | python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)["r_mean"])' 2>/dev/null || echo nan)" >>"$OUT/openmoji.txt"
  done
done

python3 - "$OUT/curve.txt" "$BUDGET" "$OUT/openmoji.txt" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1])]
budget = float(sys.argv[2]) * 60
runs = {}
for run, at, step, teacher, student in rows:
    runs.setdefault(run, []).append((int(at), step, float(teacher), float(student)))
print("| run | wall s | checkpoint | teacher r_mean (emoji test, k = 4) | student r_mean |")
print("|---|---|---|---|---|")
for run, points in runs.items():
    for at, step, teacher, student in sorted(points):
        print(f"| {run} | {at} | {step} | {teacher:.2f} | {student:.2f} |")
target = max(runs["single-1"])[2]
print(f"\ntarget: single-1's final teacher r_mean {target:.2f}")
for run, points in runs.items():
    points = sorted(points)
    first = next((i for i, p in enumerate(points) if p[2] >= target), None)
    if first is None:
        print(f"{run}: did not reach it within the budget")
        continue
    at = points[first][0]
    line = f"{run}: reached it at {at} s: speedup {budget / at:.2f}"
    if first > 0:   # where the level is crossed, linear between the checkpoint below it and the first above
        (t0, _, r0, _), (t1, _, r1, _) = points[first - 1], points[first]
        crossed = t0 + (target - r0) / (r1 - r0) * (t1 - t0)
        line += f"; crossed at about {crossed:.0f} s, interpolated: {budget / crossed:.2f}"
    print(line)
print()
print(open(sys.argv[3]).read().strip())
EOF
echo "(runs in $OUT)"
trap - EXIT
