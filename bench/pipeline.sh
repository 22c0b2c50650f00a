#!/usr/bin/env bash
# Actor pipeline against the bare loop (issue 6, item 5): alternates `mamo bench step` (the same step with no actors,
# synthetic batches) with `mamo pretrain` on the built-in data, teacher pipelined and not, ROUNDS times, and prints
# pairs/s of each. pretrain's rate is taken over its steps after WARM (metrics.jsonl), so start-up is left out.
# Usage: bench/pipeline.sh [ROUNDS=3] [STEPS=60] [WARM=20]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3} STEPS=${2:-60} WARM=${3:-20}
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rate() {   # pairs/s over steps WARM..STEPS of a run's metrics.jsonl
  python3 - "$1" "$WARM" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
warm = int(sys.argv[2])
a = next(r for r in rows if r["step"] == warm); b = rows[-1]
print(f'{(b["step"] - a["step"]) * 32 / (b["elapsed_s"] - a["elapsed_s"]):.2f}')
PY
}
printf '| round | bare loop pairs/s | actors, teacher pipelined | actors, not pipelined |\n|---|---|---|---|\n'
for round in $(seq 1 "$ROUNDS"); do
  bare=$("$MAMO" bench step --preset tiny --batch-size 32 --steps $((STEPS - WARM)) --warmup 3 --peak-seconds 0.1 --json \
         | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["pairs_per_s"])')
  for p in on off; do
    "$MAMO" pretrain --plain --run-dir "$work/$round-$p" --max-steps "$STEPS" --set eval.every-steps=0 \
      --set checkpoint.every-steps=0 --set checkpoint.every=0s --set teacher.pipelined=$p >"$work/$round-$p.log" 2>&1
    declare "r_$p=$(rate "$work/$round-$p/metrics.jsonl")"
  done
  printf '| %s | %s | %s | %s |\n' "$round" "$bare" "$r_on" "$r_off"
done
