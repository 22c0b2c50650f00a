#!/usr/bin/env bash
# DiLoCo after a synchronous warm start, at equal samples (docs/CLUSTER.md, "Learning at equal samples"): tiny, the
# built-in emoji data, batch 32 per process, 1 torch thread per process, 12,800 samples in all:
#   single: one node, 400 steps (beside the cluster, as the table's first rows ran; SINGLE=0 leaves it out and
#           evaluates the one of an earlier run in the same folder);
#   warm:   two nodes, every-step to step K (K global steps of 64 pairs), then DiLoCo rounds of H steps per replica
#           to step 200, on the same run folder.
# Prints `mamo eval`'s JSON (emoji test, k = 16) of the teacher and the student of each.
# Usage: bash bench/warm-start.sh [K=50] [H=50] [OUT=/tmp/mamo-warm-start]
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-50}
H=${2:-50}
OUT=${3:-/tmp/mamo-warm-start}
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
COMMON=(--plain --dashboard off --set torch-threads=1 --set eval.every-steps=0)
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$OUT"
WARM="$OUT/warm-k$K-h$H"
rm -rf "$WARM"

if [ "${SINGLE:-1}" = 1 ]; then
  rm -rf "$OUT/single"
  "${MAMO[@]}" pretrain --run-dir "$OUT/single" "${COMMON[@]}" --max-steps 400 --set checkpoint.every-steps=400 >"$OUT/single.log" 2>&1 &
  single=$!
fi

stage() {   # sync max-steps: both nodes, until both have left
  local seed here pids=()
  seed=$(port)
  for i in 1 2; do
    if [ "$i" = 1 ]; then here=$seed; else here=$(port); fi
    "${MAMO[@]}" pretrain --run-dir "$WARM" "${COMMON[@]}" --max-steps "$2" --cluster "127.0.0.1:$here" --seed-nodes "127.0.0.1:$seed" \
      --node-name "n$i" --set cluster.min-replicas=2 --set cluster.sync="$1" --set cluster.inner-steps="$H" >"$WARM-$1-n$i.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
}
echo "every-step to step $K: $(date +%T)"
stage every-step "$K"
echo "diloco, rounds of $H, to step 200: $(date +%T)"
stage diloco 200
echo "done: $(date +%T)"
[ -z "${single:-}" ] || wait "$single"

for run in "$OUT/single" "$WARM"; do
  for weights in teacher student; do
    echo "$(basename "$run") $weights $("${MAMO[@]}" eval --checkpoint "$run" --manifest ~/.cache/mamo/emoji/test.jsonl --json --weights "$weights" 2>/dev/null | tail -1)"
  done
done
