#!/usr/bin/env bash
# Chaos soak of a DiLoCo cluster on Kafka (issue "Cluster fault tolerance", test 7).
#
# Three node processes train `tiny` from a 6-partition topic of the dev broker, fed live by `mamo ingest`. Every 1-3
# minutes one node, chosen at random (the coordinator's too), is SIGKILLed; its supervisor starts it again under its
# name and port.
# At the end every node is stopped with SIGTERM, and bench/chaos_check.py checks, against every record kcat saw arrive,
# the ledgers: no record up to the final checkpoint's offsets is lost, and each record trained twice into the model
# is reported with the rounds that trained it.
#
#   bash bench/chaos.sh                      # 20 minutes, results in /tmp/mamo-chaos
#   DURATION=300 OUT=/tmp/c bash bench/chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-1200}
OUT=${OUT:-/tmp/mamo-chaos}
NODES=3
SEED=${SEED:-7}
RANDOM=$SEED

dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
MAMO=(dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll)
rm -rf "$OUT" && mkdir -p "$OUT"

"${MAMO[@]}" dev-broker --port-file "$OUT/broker" --topics pairs --partitions 6 --session-timeout 10 >/dev/null 2>"$OUT/broker.log" &
BROKER=$!
while [ ! -s "$OUT/broker" ]; do sleep 0.2; done
B=$(cat "$OUT/broker")
echo "dev broker at $B; run in $OUT; $DURATION s"
# Every record's partition, offset and id, read as it arrives: the mock broker keeps only the newest part of a log.
kcat -C -b "$B" -t pairs -o beginning -u -q -f '%p %o %k\n' >"$OUT/records.txt" 2>>"$OUT/kcat.log" &
RECORDS=$!

# A live feed: the emoji train split again and again, 30 records a second; each pass renames its ids (id-PASS), so
# that every record of the topic has an id of its own for the check.
DATA=${MAMO_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/mamo}
"${MAMO[@]}" datasets fetch emoji >/dev/null
mkdir -p "$OUT/feed" && ln -s "$DATA/emoji/images" "$OUT/feed/images"
( pass=0; while true; do
    python3 -c 'import json,sys
for l in open(sys.argv[2]):
    d = json.loads(l); d["id"] += "-" + sys.argv[1]; print(json.dumps(d))' "$pass" "$DATA/emoji/train.jsonl" >"$OUT/feed/pass.jsonl"
    "${MAMO[@]}" ingest --input "manifest:$OUT/feed/pass.jsonl" --to "kafka://$B/pairs" --rate 30 >/dev/null 2>>"$OUT/ingest.log" || exit 0
    pass=$((pass + 1))
  done ) &
FEED=$!

PORT0=$(( 20000 + RANDOM % 20000 ))
SEEDS="127.0.0.1:$PORT0,127.0.0.1:$((PORT0 + 1))"
# Each node runs under a supervisor, as systemd or Kubernetes would run it: a node that exits other than 0 (SIGKILLed,
# or ended by itself: a downed node, one that could not join) is started again 5 s later under its name and port.
supervise() {
  while [ ! -e "$OUT/stopping" ]; do
    "${MAMO[@]}" pretrain --plain --ledger --source "kafka://$B/pairs?group=chaos" --run-dir "$OUT/run" \
      --cluster "127.0.0.1:$((PORT0 + $1))" --seed-nodes "$SEEDS" --node-name "n$1" \
      --set batch-size=8 --set cluster.inner-steps=10 --set cluster.min-replicas=2 --set torch-threads=1 \
      --set eval.every-steps=0 --set checkpoint.keep-last=3 >>"$OUT/n$1.out" 2>&1 &
    echo $! >"$OUT/n$1.pid"
    code=0; wait $! || code=$?
    [ "$code" = 0 ] && break
    echo "$(date -u +%FT%TZ) n$1 exited $code" >>"$OUT/exits.log"
    sleep 5
  done
}
declare -a SUPERVISOR
for i in $(seq 0 $((NODES - 1))); do supervise "$i" & SUPERVISOR[$i]=$!; done

: >"$OUT/kills.log"
END=$(( SECONDS + DURATION ))
while true; do
  PAUSE=$(( 60 + RANDOM % 121 ))
  [ $(( SECONDS + PAUSE )) -lt "$END" ] || break
  sleep "$PAUSE"
  i=$(( RANDOM % NODES ))
  pid=$(cat "$OUT/n$i.pid")
  kill -9 "$pid" 2>/dev/null || true
  echo "$(date -u +%FT%TZ) SIGKILL n$i (pid $pid)" | tee -a "$OUT/kills.log"
done
sleep $(( END > SECONDS ? END - SECONDS : 0 ))

pkill -P "$FEED" 2>/dev/null || true   # the feed's `mamo ingest` (its failure ends the loop)
kill "$FEED" 2>/dev/null || true
touch "$OUT/stopping"
for i in $(seq 0 $((NODES - 1))); do kill -TERM "$(cat "$OUT/n$i.pid")" 2>/dev/null || true; done
for i in $(seq 0 $((NODES - 1))); do wait "${SUPERVISOR[$i]}" 2>/dev/null || true; done
sleep 5   # the reader catches up with the last records fed
kill "$RECORDS" "$BROKER" 2>/dev/null || true
python3 bench/chaos_check.py "$OUT"
