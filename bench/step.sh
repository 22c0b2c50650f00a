#!/usr/bin/env bash
# The training step, TorchSharp against PyTorch eager (Debian's python3-torch 1.13 on OpenBLAS), for the tiny and
# small presets: the same shapes, parameter count, losses and thread count, the two sides alternating within one
# invocation. Then the parity check: one C# step exported and replayed in PyTorch.
#   bench/step.sh [ROUNDS=2] [THREADS=2]
# Batch and step counts per preset: TINY="32 8 2" SMALL="16 5 2" (batch, timed steps, warm-up steps).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}; threads=${2:-2}
read -r -a tiny <<< "${TINY:-32 8 2}"
read -r -a small <<< "${SMALL:-16 5 2}"

# Debian's interpreter, which python3-torch installs into (a pyenv or venv python3 earlier on PATH lacks it).
py=${PYTHON:-/usr/bin/python3}
# Without libopenblas0-pthread, torch 1.13 falls back to the reference BLAS (one thread, about 3 GFLOP/s).
if ! $py -c 'import torch' 2>/dev/null || ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then
  apt-get install -y python3-torch libopenblas0-pthread >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y python3-torch libopenblas0-pthread >/dev/null; }
fi

# Both sides get the same thread count: libtorch's intra-op pool (--threads) and, on the PyTorch side, OpenBLAS's too.
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
mamo="dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
tag() {  # preset side round: adds them to the JSON line on stdin
  $py -c 'import json, sys; r = json.load(sys.stdin); r.update(preset=sys.argv[1], side=sys.argv[2], round=int(sys.argv[3])); print(json.dumps(r))' "$@"
}

for preset in tiny small; do
  declare -n shape=$preset
  batch=${shape[0]}; steps=${shape[1]}; warmup=${shape[2]}
  $mamo bench step --preset "$preset" --batch-size "$batch" --steps 0 --json \
    | $py -c 'import json, sys; json.dump(json.load(sys.stdin)["config"], sys.stdout)' > "$out/$preset.config.json"
  for round in $(seq "$rounds"); do
    $mamo bench step --preset "$preset" --batch-size "$batch" --steps "$steps" --warmup "$warmup" --threads "$threads" --json \
      | tag "$preset" cs "$round" >> "$out/runs.jsonl"
    $py bench/pytorch/mamo_ref.py bench --config "$out/$preset.config.json" --batch-size "$batch" --steps "$steps" \
        --warmup "$warmup" --threads "$threads" --json \
      | tag "$preset" py "$round" >> "$out/runs.jsonl"
  done
done

$py - "$out/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print("| preset | batch | round | C# ms/step | PyTorch ms/step | ratio C#/PyTorch | C# pairs/s | PyTorch pairs/s | C# peak GFLOP/s | PyTorch peak GFLOP/s | GFLOP/step | C# GFLOP/s | PyTorch GFLOP/s | C# MFU | PyTorch MFU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for preset in dict.fromkeys(r["preset"] for r in runs):
    cs = [r for r in runs if r["preset"] == preset and r["side"] == "cs"]
    py = [r for r in runs if r["preset"] == preset and r["side"] == "py"]
    for a, b in zip(cs, py):
        # Same model on both sides, or the ratio means nothing.
        assert a["parameters"] == b["parameters"], (preset, a["parameters"], b["parameters"])
        assert abs(a["step_gflop"] - b["step_gflop"]) < 1e-9 * a["step_gflop"], (preset, a["step_gflop"], b["step_gflop"])
        print(f"| {preset} | {a['batch']} | {a['round']} | {a['median_ms']:.0f} | {b['median_ms']:.0f} | {a['median_ms'] / b['median_ms']:.2f} "
              f"| {a['pairs_per_s']:.1f} | {b['pairs_per_s']:.1f} | {a['peak_gflops']:.0f} | {b['peak_gflops']:.0f} | {a['step_gflop']:.1f} | {a['achieved_gflops']:.1f} | {b['achieved_gflops']:.1f} "
              f"| {100 * a['mfu']:.0f}% | {100 * b['mfu']:.0f}% |")
    m = lambda rs, k: statistics.median(r[k] for r in rs)
    print(f"| {preset} | {cs[0]['batch']} | median | {m(cs, 'median_ms'):.0f} | {m(py, 'median_ms'):.0f} | {m(cs, 'median_ms') / m(py, 'median_ms'):.2f} "
          f"| {m(cs, 'pairs_per_s'):.1f} | {m(py, 'pairs_per_s'):.1f} | {m(cs, 'peak_gflops'):.0f} | {m(py, 'peak_gflops'):.0f} | {cs[0]['step_gflop']:.1f} | {m(cs, 'achieved_gflops'):.1f} | {m(py, 'achieved_gflops'):.1f} "
          f"| {100 * m(cs, 'mfu'):.0f}% | {100 * m(py, 'mfu'):.0f}% |")
r = runs[0]
print(f"\n{r['threads']} threads; parameters: " + ", ".join(f"{p} {next(x['parameters'] for x in runs if x['preset'] == p):,}" for p in dict.fromkeys(x['preset'] for x in runs))
      + f"; PyTorch {next(x['torch'] for x in runs if x['side'] == 'py')}")
PY

echo
$mamo bench export --preset tiny --batch-size 8 --out "$out/parity" >/dev/null
$py bench/pytorch/mamo_ref.py parity "$out/parity" --threads "$threads"
