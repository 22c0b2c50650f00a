#!/usr/bin/env bash
# The tables of docs/FINETUNE.md, from one pre-trained run: on emoji-labels (label = the emoji's group), held-out
# accuracy of online fine-tuning against the majority class, zero-shot prompt ranking and a frozen linear probe, each
# probe and fine-tuning given the same steps; then retrieval fine-tuning on Twemoji's train split, with IR@1 on
# emoji-twitter test before and after, and the forgetting on Noto emoji test.
#
#   FROM=runs/default bash bench/finetune.sh          # STEPS=600 by default; OUT=/tmp/mamo-finetune
set -euo pipefail
cd "$(dirname "$0")/.."
FROM=${FROM:?set FROM to a pre-training run folder or checkpoint}
STEPS=${STEPS:-600}
OUT=${OUT:-/tmp/mamo-finetune}
MAMO=(${MAMO:-dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll})
[ -n "${MAMO_BUILT:-}" ] || dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
DATA=${MAMO_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/mamo}
"${MAMO[@]}" datasets fetch emoji-labels >/dev/null
"${MAMO[@]}" datasets fetch emoji-twitter >/dev/null
TEST=$DATA/emoji-labels/test.jsonl
mkdir -p "$OUT"
acc() { python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f | %.3f" % (100*r["accuracy"], r["macro_f1"]))'; }
ir1() { python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.2f | %.2f | %.2f" % (r["ir1"], r["tr1"], r["r_mean"]))'; }

majority=$(python3 -c '
import collections, json, sys
labels = [json.loads(l)["label"] for l in open(sys.argv[1])]
label, n = collections.Counter(labels).most_common(1)[0]
f1 = 2 * (n / len(labels)) / (n / len(labels) + 1)   # the majority class: precision n/N, recall 1; every other class 0
print(f"{100*n/len(labels):.1f} | {f1/len(set(labels)):.3f} ({label}, {n} of {len(labels)}; {len(set(labels))} classes)")' "$TEST")
zs_itm=$("${MAMO[@]}" predict --checkpoint "$FROM" --manifest "$TEST" --zero-shot "an emoji of the group {label}" --score itm --json --out "$OUT/zs-itm.jsonl" | acc)
zs_itc=$("${MAMO[@]}" predict --checkpoint "$FROM" --manifest "$TEST" --zero-shot "an emoji of the group {label}" --score itc --json --out "$OUT/zs-itc.jsonl" | acc)

COMMON=(--from "$FROM" --max-steps "$STEPS" --plain --set eval.every-steps="$STEPS")
rm -rf "$OUT/probe" "$OUT/classify" "$OUT/retrieval"
"${MAMO[@]}" finetune --task classify --run-dir "$OUT/probe" "${COMMON[@]}" --set finetune.probe=on > "$OUT/probe.log" 2>&1
probe=$("${MAMO[@]}" predict --checkpoint "$OUT/probe" --manifest "$TEST" --json --out "$OUT/probe.jsonl" | acc)
"${MAMO[@]}" finetune --task classify --run-dir "$OUT/classify" "${COMMON[@]}" > "$OUT/classify.log" 2>&1
classify=$("${MAMO[@]}" predict --checkpoint "$OUT/classify" --manifest "$TEST" --json --out "$OUT/classify.jsonl" | acc)

echo "## Classification, emoji-labels test (group), $STEPS steps of batch 32"
echo "| method | accuracy % | macro-F1 |"
echo "| --- | ---: | ---: |"
echo "| majority class | $majority |"
echo "| zero-shot, ITM ranks \"an emoji of the group X\" | $zs_itm |"
echo "| zero-shot, ITC ranks the same prompts | $zs_itc |"
echo "| frozen linear probe | $probe |"
echo "| online fine-tuning (MLP head, backbone trained) | $classify |"

"${MAMO[@]}" finetune --task retrieval --run-dir "$OUT/retrieval" "${COMMON[@]}" > "$OUT/retrieval.log" 2>&1
echo
echo "## Retrieval fine-tuning on Twemoji train, $STEPS steps (mamo eval, teacher weights, k=16)"
echo "| set | model | IR@1 | TR@1 | r_mean |"
echo "| --- | --- | ---: | ---: | ---: |"
for set in emoji-twitter/test emoji/test; do
  for model in "$FROM" "$OUT/retrieval"; do
    name=$([ "$model" = "$FROM" ] && echo "pre-trained (zero-shot)" || echo "retrieval fine-tuned")
    echo "| $set | $name | $("${MAMO[@]}" eval --checkpoint "$model" --manifest "$DATA/$set.jsonl" --json | ir1) |"
  done
done
echo
echo "## Forgetting, the classifier's own evaluations (metrics.jsonl of $OUT/classify): step 0, then step $STEPS"
python3 - "$OUT/classify/metrics.jsonl" <<'PY'
import json, sys
evals = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"eval"' in l]
for name in sorted({e["set"] for e in evals}):
    rows = sorted((e for e in evals if e["set"] == name), key=lambda e: e["step"])
    key = "accuracy" if "accuracy" in rows[0] else "ir1"
    print(f"- {name}: {key} " + " -> ".join(f"{r[key]:.3f} (step {r['step']})" for r in (rows[0], rows[-1])))
PY
