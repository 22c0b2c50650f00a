#!/usr/bin/env bash
# `mamo serve --index` under load (docs/SERVING.md, "Measured"), on loopback with hey (Debian's `hey`): a tiny model
# trained briefly publishes the emoji test set (181 items) to a dev broker; the service follows it. Then, for
# POST /embed/text and GET /search?k=10, at 1, 8 and 32 concurrent clients for SECONDS each: p50 and p99 latency and
# requests/s, first with the machine otherwise idle, then with a training run (1 torch thread) beside it. Last, the
# index's recall@10 against exact search (`mamo bench ann`). Prints a markdown table.
# Usage: bash bench/serve.sh [SECONDS=10] [SERVE_THREADS=1]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-10}
SERVE_THREADS=${2:-1}
command -v hey >/dev/null || { echo "bench/serve.sh needs hey: apt-get install -y hey" >&2; exit 2; }
OUT=$(mktemp -d /tmp/mamo-serve-bench-XXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$OUT"; }
trap cleanup EXIT
dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)

"${MAMO[@]}" dev-broker --port-file "$OUT/broker" --topics catalogue,catalogue.versions --partitions 2 >/dev/null 2>"$OUT/broker.log" &
for _ in $(seq 100); do [ -s "$OUT/broker" ] && break; sleep 0.2; done
B=$(cat "$OUT/broker")
"${MAMO[@]}" pretrain --run-dir "$OUT/run" --plain --dashboard off --max-steps 40 --set checkpoint.every-steps=20 \
  --set eval.every-steps=0 --set "publish.output=kafka://$B/catalogue" --set publish.input=dataset:emoji/test >"$OUT/pretrain.log" 2>&1
"${MAMO[@]}" serve --run-dir "$OUT/run" --index "kafka://$B/catalogue" --listen 127.0.0.1:0 --set "torch-threads=$SERVE_THREADS" \
  >"$OUT/serve.out" 2>"$OUT/serve.log" &
for _ in $(seq 300); do grep -q '^serving: ' "$OUT/serve.out" 2>/dev/null && break; sleep 0.2; done
URL=$(sed -n 's/^serving: //p' "$OUT/serve.out")
for _ in $(seq 300); do [ "$(curl -s -o /dev/null -w '%{http_code}' "${URL}readyz")" = 200 ] && break; sleep 0.2; done
[ "$(curl -s -o /dev/null -w '%{http_code}' "${URL}readyz")" = 200 ] || { echo "mamo serve did not become ready:" >&2; cat "$OUT/serve.log" >&2; exit 1; }

# One hey run: "p50_ms p99_ms requests_per_s non_200_responses".
load() {
  local clients=$1; shift
  hey -z "${SECONDS_EACH}s" -c "$clients" "$@" >"$OUT/hey.txt"
  python3 - "$OUT/hey.txt" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def pct(p): return float(re.search(rf"\s{p}% in ([0-9.]+) secs", text).group(1)) * 1000
rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", text).group(1))
codes = dict((int(c), int(n)) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", text))
print(f"{pct(50):.1f} {pct(99):.1f} {rps:.0f} {sum(n for c, n in codes.items() if c != 200)}")
EOF
}

echo "| load | endpoint | clients | p50 ms | p99 ms | requests/s | not 200 |"
echo "|---|---|---|---|---|---|---|"
matrix() {
  local phase=$1
  for clients in 1 8 32; do
    read -r p50 p99 rps bad < <(load "$clients" -m POST -T application/json -d '{"text": "a red apple"}' "${URL}embed/text")
    echo "| $phase | POST /embed/text | $clients | $p50 | $p99 | $rps | $bad |"
    read -r p50 p99 rps bad < <(load "$clients" "${URL}search?q=a%20red%20apple&k=10")
    echo "| $phase | GET /search | $clients | $p50 | $p99 | $rps | $bad |"
  done
}
matrix idle
"${MAMO[@]}" pretrain --run-dir "$OUT/beside" --plain --dashboard off --max-steps 1000000 --set torch-threads=1 \
  --set eval.every-steps=0 >"$OUT/beside.log" 2>&1 &
BESIDE=$!
sleep 15   # past its start-up, into steady training
matrix "training beside"
kill "$BESIDE"
wait "$BESIDE" 2>/dev/null || true
VERSION=$(curl -s "${URL}search?q=last&k=1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])')
echo
echo "index version at the end $VERSION; serve torch threads $SERVE_THREADS; $(nproc) cores; ${SECONDS_EACH} s per row"
"${MAMO[@]}" bench ann --checkpoint "$OUT/run" --synthetic 20000
