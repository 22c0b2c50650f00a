#!/usr/bin/env bash
# The single-node side of the recovery comparison in docs/CLUSTER.md: one `mamo pretrain` on a 4-partition topic of
# the dev broker, checkpointing every 2 steps (a DiLoCo round of the cluster kill test is 2 steps), is SIGKILLed after
# its checkpoint of step 4 and restarted at once, as a supervisor would. It prints the seconds from the kill to the
# restarted process's first durable checkpoint, and the records trained twice (read again after the kill).
#
#   bash bench/single-restart.sh            # 3 runs
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
OUT=${OUT:-/tmp/mamo-single-restart}
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
latest() { ls -d "$1"/checkpoints/step-* 2>/dev/null | sort | tail -1 | sed 's/.*step-0*//;s/^$/0/'; }

for run in $(seq 1 "$RUNS"); do
  rm -rf "$OUT" && mkdir -p "$OUT"
  "${MAMO[@]}" dev-broker --port-file "$OUT/broker" --topics pairs --partitions 4 >/dev/null 2>&1 &
  BROKER=$!
  while [ ! -s "$OUT/broker" ]; do sleep 0.2; done
  B=$(cat "$OUT/broker")
  "${MAMO[@]}" ingest --dataset emoji --to "kafka://$B/pairs" --limit 600 >/dev/null 2>&1
  ARGS=(pretrain --plain --ledger --source "kafka://$B/pairs?group=single" --run-dir "$OUT/run" --max-steps 40
    --set batch-size=4 --set checkpoint.every-steps=2 --set torch-threads=1 --set eval.every-steps=0)
  "${MAMO[@]}" "${ARGS[@]}" >"$OUT/first.log" 2>&1 &
  PID=$!
  until [ "$(latest "$OUT/run")" -ge 4 ] 2>/dev/null; do sleep 0.05; done
  kill -9 "$PID"; wait "$PID" 2>/dev/null || true
  KILLED=$(date +%s.%N); BEFORE=$(latest "$OUT/run")
  "${MAMO[@]}" "${ARGS[@]}" >"$OUT/second.log" 2>&1 &
  PID=$!
  until [ "$(latest "$OUT/run")" -gt "$BEFORE" ] 2>/dev/null; do sleep 0.05; done
  DONE=$(date +%s.%N)
  wait "$PID"
  kill "$BROKER"
  python3 - "$OUT" "$KILLED" "$DONE" "$BEFORE" <<'EOF'
import json, sys
out, killed, done, before = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ids = [i for l in open(f"{out}/run/ledger.jsonl") if l.rstrip().endswith("}") for i in json.loads(l)["ids"]]
print(json.dumps({"recovery_s": round(done - killed, 1), "checkpoint_before_kill": before,
                  "trained": len(ids), "distinct": len(set(ids)), "twice": len(ids) - len(set(ids))}))
EOF
done
