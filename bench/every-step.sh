#!/usr/bin/env bash
# What every-step's communication adds to a step (docs/CLUSTER.md, "What an every-step step costs"): tiny, the built-in
# emoji data, batch 32 per process, 1 torch thread per process, STEPS steps, run one after the other with nothing else:
#   compute:  two single-node processes at once, the teacher pipelined as an every-step replica's is (since
#             2026-12-07; before, both ran with teacher.pipelined = off): each process's step is a replica's compute in
#             the same crowding;
#   stream:   two every-step nodes, weights and gradients on the data plane's stream (cluster.data-plane = stream);
#   remoting: the same over Akka remoting in 256 KiB chunks (cluster.data-plane = remoting), the way before the stream.
# Prints each run's seconds per step (the median over its metrics lines after the first) and what the cluster adds to the
# compute; the every-step lines also say how long a replica waited for its peers' gradients after handing in its own.
# Usage: bash bench/every-step.sh [STEPS=80]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-80}
OUT=$(mktemp -d /tmp/mamo-every-step-XXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
# A node that crashes (a native fault) leaves a crash report with every thread's stack in the run's folder.
export DOTNET_DbgEnableMiniDump=1 DOTNET_DbgMiniDumpType=1 DOTNET_EnableCrashReport=1 DOTNET_DbgMiniDumpName="$OUT/crash.%p"
COMMON=(--plain --dashboard off --max-steps "$STEPS" --set torch-threads=1 --set eval.every-steps=0 --set metrics.every-steps=10
  --set checkpoint.every-steps=0)

for i in 1 2; do
  "${MAMO[@]}" pretrain --run-dir "$OUT/compute-$i" "${COMMON[@]}" >"$OUT/compute-$i.log" 2>&1 &
done
wait

source bench/every-step-nodes.sh
cluster() { every_step_nodes "$1" "$2" 3; wait; }   # name data-plane
cluster stream stream
cluster remoting remoting

python3 - "$OUT" <<'EOF'
import json, re, statistics, sys
out = sys.argv[1]
def median(xs): return statistics.median(xs[1:])   # the first line holds the start-up
compute = [median([32 / json.loads(l)["pairs_per_s"] for l in open(f"{out}/compute-{i}/metrics.jsonl") if '"kind":"train"' in l]) for i in (1, 2)]
c = statistics.mean(compute)
print("compute (two single-node processes at once): %.3f s a step (%.3f, %.3f)" % (c, *compute))
step_line = re.compile(r"a step took ([0-9.]+) s over the last \d+")
wait_line = re.compile(r"its peers' gradients were here ([0-9.]+) s after its own")
for run in ("stream", "remoting"):
    logs = [open(f"{out}/{run}-n{n}.log").read() for n in (1, 2)]
    step = median([float(m.group(1)) for log in logs for m in step_line.finditer(log)])
    waited = median([float(m.group(1)) for log in logs for m in wait_line.finditer(log)])
    print("every-step, %s: %.3f s a step (a replica waited %.3f s for its peers' gradients after its own): %+.0f%% on the compute"
          % (run, step, waited, 100 * (step / c - 1)))
EOF
echo "(runs in $OUT)"
trap - EXIT
