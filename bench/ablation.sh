#!/usr/bin/env bash
# The paper's Table 6 ablation on the built-in emoji data: each row trains from scratch for the same
# wall-clock budget on one core (two rows at a time on a 2-core machine), then its final checkpoint is
# evaluated zero-shot on emoji `test` and `emoji-openmoji/test`.
#   bench/ablation.sh [BUDGET=15m] [OUT=runs/ablation] [K=4]
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-15m}; out=${2:-runs/ablation}; k=${3:-4}
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
mamo="dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll"
data=$($mamo datasets fetch emoji | awk '$1=="test"{print $2}')
openmoji=$($mamo datasets fetch emoji-openmoji | awk '$1=="test"{print $2}')

row() {  # name, then the loss weights itc itm mlm mim mrm
  local name=$1; shift
  $mamo pretrain --plain --time-budget "$budget" --run-dir "$out/$name" \
    --set torch-threads=1 --set data.preprocess-parallelism=1 --set eval.every-steps=0 \
    --set loss-weights.itc=$1 --set loss-weights.itm=$2 --set loss-weights.mlm=$3 \
    --set loss-weights.mim=$4 --set loss-weights.mrm=$5 > "$out/$name.log" 2>&1
}
mkdir -p "$out"
row itc+itm 1 1 0 0 0 & row itc+itm+mlm 1 1 1 0 0 & wait
row itc+itm+mlm+mrm 1 1 1 0 1 & row all 1 1 1 1 1 & wait

echo "| row | steps | emoji test TR@1 | IR@1 | r_mean | openmoji test TR@1 | IR@1 | r_mean |"
echo "|---|---|---|---|---|---|---|---|"
for name in itc+itm itc+itm+mlm itc+itm+mlm+mrm all; do
  a=$($mamo eval --checkpoint "$out/$name" --manifest "$data" --k "$k" --json)
  b=$($mamo eval --checkpoint "$out/$name" --manifest "$openmoji" --k "$k" --json)
  python3 - "$name" "$a" "$b" <<'PY'
import json, sys
name, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| {name} | {a['step']} | {a['tr1']:.1f} | {a['ir1']:.1f} | {a['r_mean']:.1f} | {b['tr1']:.1f} | {b['ir1']:.1f} | {b['r_mean']:.1f} |")
PY
done
