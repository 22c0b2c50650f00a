#!/usr/bin/env bash
# Where an every-step step's time goes beyond the compute (docs/CLUSTER.md, "What an every-step step costs"): the same
# compute and stream cluster as bench/every-step.sh (tiny, batch 32 per process, 1 torch thread per process), each
# under a system-wide `perf record` (499 Hz on each CPU, .NET's JIT-ted frames named through DOTNET_PerfMapEnabled).
# Over the steps between the second metrics line and the last (the start-up left out), it prints the samples of a
# replica step (each is 2 ms of one CPU) by where they fell: MKL's sgemm, the rest of libtorch, the JIT, the idle CPU
# (a replica and its teacher both waiting) and everything else (the runtime, the kernel's socket copies and page faults,
# memcpy). ORDER says which of the two runs first (cs or sc), so that alternated runs show the machine's drift.
# Needs perf (Debian: linux-perf) and the right to sample the whole system (root, or kernel.perf_event_paranoid <= 0).
# Usage: bash bench/every-step-profile.sh [STEPS=60] [ORDER=cs]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
ORDER=${2:-cs}
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 2; }
OUT=$(mktemp -d /tmp/mamo-every-step-profile-XXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
export DOTNET_PerfMapEnabled=1
COMMON=(--plain --dashboard off --max-steps "$STEPS" --set torch-threads=1 --set eval.every-steps=0 --set metrics.every-steps=10
  --set checkpoint.every-steps=0)

profiled() {   # name, then the command that starts the run's processes in the background
  local name=$1; shift
  perf record -a -F 499 -o "$OUT/$name.perf" >/dev/null 2>&1 &
  local recorder=$!
  "$@"
  wait $(jobs -p | grep -vx "$recorder")
  kill -INT "$recorder"; wait "$recorder" || true
}
compute() {
  for i in 1 2; do "${MAMO[@]}" pretrain --run-dir "$OUT/compute-$i" "${COMMON[@]}" >"$OUT/compute-$i.log" 2>&1 & done
}
source bench/every-step-nodes.sh
stream() { every_step_nodes stream stream 1; }
if [ "$ORDER" = sc ]; then profiled stream stream; profiled compute compute; else profiled compute compute; profiled stream stream; fi

python3 - "$OUT" <<'EOF'
import collections, datetime, json, re, subprocess, sys, time
out = sys.argv[1]
# perf stamps samples with the monotonic clock; the metrics lines carry wall time.
offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
def monotonic(stamp): return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - offset
sample = re.compile(r"\s*(.*?)\s+([0-9.]+):\s+\S+\s+(.*)\s+\((.*)\)\s*$")
def where(comm, symbol, dso):
    if comm == "swapper": return "idle"
    if "sgemm" in symbol: return "sgemm"
    if "libtorch" in dso: return "libtorch"
    if "clrjit" in dso: return "jit"
    return "other"
for run, metrics in (("compute", "compute-1/metrics.jsonl"), ("stream", "stream/metrics.jsonl")):
    lines = [json.loads(l) for l in open(f"{out}/{metrics}") if '"kind":"train"' in l]
    start, end = monotonic(lines[1]["time"]), monotonic(lines[-1]["time"])
    steps = lines[-1]["step"] - lines[1]["step"]
    script = subprocess.run(["perf", "script", "-i", f"{out}/{run}.perf", "-F", "time,comm,ip,sym,dso"], capture_output=True, text=True).stdout
    counts = collections.Counter()
    for line in script.splitlines():
        m = sample.match(line)
        if m and start <= float(m.group(2)) < end: counts[where(m.group(1), m.group(3), m.group(4))] += 1
    # Two processes: two replica steps (or two compute steps) a step.
    per = {k: counts[k] / (2 * steps) for k in ("sgemm", "libtorch", "jit", "idle", "other")}
    print("%-7s %.3f s a step; samples a replica step: %s, all %.0f" % (run, (end - start) / steps,
          ", ".join(f"{k} {v:.1f}" for k, v in per.items()), sum(per.values())))
EOF
echo "(runs in $OUT)"
trap - EXIT
