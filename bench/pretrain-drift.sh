#!/usr/bin/env bash
# Pre-training drift. The same emoji in three styles streamed one after another through `pretrain`: Noto, then
# Twemoji, then OpenMoji (the emoji-labels train splits). Each stage starts from the previous stage's checkpoint
# (--init: warm-up again, and the replay reservoir comes along) and trains STEPS steps; after each stage `mamo eval`
# (teacher, k = 16) scores retrieval on the three test splits. Prints the matrices of IR@1 and r_mean, R[stage][style],
# with ACC (mean of the last row) and BWT (Lopez-Paz and Ranzato 2017: the mean of R[last][i] - R[i][i] over the
# earlier styles; negative is forgetting).
#
#   FROM=runs/default bash bench/pretrain-drift.sh     # STEPS=300 per stage; REPLAY=0; OUT=/tmp/mamo-pretrain-drift
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mamo-pretrain-drift}
source bench/drift-common.sh
from=$FROM
for i in 0 1 2; do
  start=$SECONDS
  "${MAMO[@]}" pretrain --init "$from" \
    --source "dataset:emoji-labels/${train[$i]}" --run-dir "$OUT/${styles[$i]}" --max-steps "$STEPS" --plain \
    --set eval.every-steps=0 --set replay.fraction="$REPLAY" --dashboard off > "$OUT/${styles[$i]}.log" 2>&1
  echo "stage ${styles[$i]}: $((SECONDS - start)) s"
  for j in 0 1 2; do
    "${MAMO[@]}" eval --checkpoint "$OUT/${styles[$i]}" --manifest "$DATA/emoji-labels/${test[$j]}.jsonl" --k 16 --json > "$OUT/R-$i-$j.json"
  done
  from=$OUT/${styles[$i]}
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
styles = ["Noto", "Twemoji", "OpenMoji"]
for metric in ["ir1", "r_mean"]:
    R = [[json.load(open(f"{out}/R-{i}-{j}.json"))[metric] for j in range(3)] for i in range(3)]
    print(f"\n{metric}:")
    print("| after training on | " + " | ".join(f"{s} test" for s in styles) + " |")
    print("| --- | " + " | ".join("---:" for _ in styles) + " |")
    for i, row in enumerate(R):
        print(f"| {styles[i]} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    acc = sum(R[2]) / 3
    bwt = sum(R[2][i] - R[i][i] for i in range(2)) / 2
    print(f"ACC {acc:.2f}   BWT {bwt:+.2f}")
PY
