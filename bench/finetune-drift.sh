#!/usr/bin/env bash
# Domain drift. The same labels (the emoji's group) in three styles, one after another:
# Noto, then Twemoji, then OpenMoji. Each stage fine-tunes the previous stage's classifier (head and label map
# included) for STEPS steps on its style's train split; after each stage `mamo predict` scores all three test splits.
# Prints the accuracy matrix R[stage][style], ACC (mean of the last row) and BWT (Lopez-Paz and Ranzato 2017: the mean
# of R[last][i] - R[i][i] over the earlier styles; negative is forgetting).
#
# REPLAY=F replays a share F of each batch from the reservoir, which each stage carries on to the next (--from), so
# that the later stages replay the earlier styles (docs/LEARNING.md).
#
#   FROM=runs/default bash bench/finetune-drift.sh     # STEPS=300 per stage; REPLAY=0; OUT=/tmp/mamo-drift
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mamo-drift}
source bench/drift-common.sh
from=$FROM
for i in 0 1 2; do
  "${MAMO[@]}" finetune --task classify --from "$from" --source "dataset:emoji-labels/${train[$i]}" --run-dir "$OUT/${styles[$i]}" \
    --max-steps "$STEPS" --plain --set eval.every-steps=0 --set replay.fraction="$REPLAY" > "$OUT/${styles[$i]}.log" 2>&1
  for j in 0 1 2; do
    "${MAMO[@]}" predict --checkpoint "$OUT/${styles[$i]}" --manifest "$DATA/emoji-labels/${test[$j]}.jsonl" --json --out "$OUT/$i-$j.jsonl" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])' > "$OUT/R-$i-$j"
  done
  from=$OUT/${styles[$i]}
done
python3 - "$OUT" <<'PY'
import sys
out = sys.argv[1]
styles = ["Noto", "Twemoji", "OpenMoji"]
R = [[float(open(f"{out}/R-{i}-{j}").read()) for j in range(3)] for i in range(3)]
print("| after training on | " + " | ".join(f"{s} test %" for s in styles) + " |")
print("| --- | " + " | ".join("---:" for _ in styles) + " |")
for i, row in enumerate(R):
    print(f"| {styles[i]} | " + " | ".join(f"{100*v:.1f}" for v in row) + " |")
acc = sum(R[2]) / 3
bwt = sum(R[2][i] - R[i][i] for i in range(2)) / 2
print(f"\nACC {100*acc:.1f}%   BWT {100*bwt:+.1f} points")
PY
