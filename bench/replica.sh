#!/usr/bin/env bash
# One cluster replica's throughput against a single node's (docs/CLUSTER.md, "A replica is the single-node pipeline"):
# the same steps of tiny on the built-in emoji data, 1 torch thread each, one after the other, REPEATS times, alternating.
# A replica is a one-node DiLoCo cluster (min-replicas 1), so its rounds are its own: θ arrives, INNER steps run, the
# delta goes back and the cluster checkpoint is written. Prints each run's pairs/s (the median of its train lines after the
# first) and the replica's ratio to the single node.
# Usage: bash bench/replica.sh [STEPS=150] [INNER=50] [REPEATS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-150}
INNER=${2:-50}
REPEATS=${3:-2}
OUT=$(mktemp -d /tmp/mamo-replica-bench-XXXX)
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
COMMON=(--plain --max-steps "$STEPS" --set torch-threads=1 --set eval.every-steps=0 --set metrics.every-steps=10 --dashboard off)

# The median pairs/s of a metrics.jsonl's train lines, the first left out (start-up).
rate() { python3 -c "
import json, statistics, sys
r = [json.loads(l)['pairs_per_s'] for l in open(sys.argv[1]) if '\"kind\":\"train\"' in l][1:]
print(f'{statistics.median(r):.2f}')" "$1"; }

for i in $(seq 1 "$REPEATS"); do
  "${MAMO[@]}" pretrain --run-dir "$OUT/single-$i" "${COMMON[@]}" >/dev/null 2>&1
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${MAMO[@]}" pretrain --run-dir "$OUT/replica-$i" "${COMMON[@]}" --cluster "127.0.0.1:$PORT" --seed-nodes "127.0.0.1:$PORT" --node-name n0 \
    --set "cluster.inner-steps=$INNER" --set cluster.min-replicas=1 >/dev/null 2>&1
  single=$(rate "$OUT/single-$i/metrics.jsonl")
  replica=$(rate "$OUT/replica-$i/nodes/n0/metrics.jsonl")
  echo "run $i: single node $single pairs/s, replica $replica pairs/s, ratio $(python3 -c "print(f'{$replica / $single:.3f}')")"
done
rm -rf "$OUT"
