"""The ledger check of bench/chaos.sh: reads OUT/records.txt (partition offset id, from kcat), the nodes' ledgers and
logs under OUT/run/nodes, and the final cluster checkpoint, and prints one JSON object.

- covered: the records at or before the final checkpoint's offset of their partition;
- applied: the step lines of the attempts a coordinator applied. A replica's ledger says so after each durable cluster
  checkpoint ({"attempt": A, "applied": true}); a node killed before that word reached it is covered by the
  coordinator's log line "round R done with N replicas (a,b); attempts A,B";
- expired: records the broker's retention deleted before the group read them (the group fell behind the feed), as the
  nodes' sources reported them ("Kafka pairs/P: records A..B (N) were deleted by the broker's retention");
- lost: covered records in no applied step and not expired (must be 0: exits 1 otherwise);
- twice: records in two applied steps, with the rounds of both; wasted: records trained only in attempts that were never
  applied (a node killed mid-round, or a round abandoned)."""
import collections, glob, json, os, re, sys

out = sys.argv[1]
run = os.path.join(out, "run")
records = {}
for line in open(os.path.join(out, "records.txt")):
    parts = line.split()
    if len(parts) == 3:
        records[parts[2]] = (int(parts[0]), int(parts[1]))

checkpoints = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*", "state.json")))
final = json.load(open(checkpoints[-1]))
extra = final.get("Extra") or final.get("extra") or {}
offsets = {int(k.rsplit("/", 1)[1]): int(v) for k, v in extra.items() if k.startswith("position:pairs/")}
covered = {i for i, (p, o) in records.items() if o <= offsets.get(p, -1)}

applied, rounds, expired = set(), set(), set()
done = re.compile(r"round (\d+) done with \d+ replicas \([^)]*\); attempts ([\d,]+)")
deleted = re.compile(r"Kafka \"?pairs/(\d+)\"?: records (\d+)\.\.(\d+) \(\d+\) were deleted by the broker's retention")
at = {po: i for i, po in records.items()}
for log in glob.glob(os.path.join(run, "nodes", "*", "mamo.log")):
    for line in open(log, errors="replace"):
        if m := done.search(line):
            rounds.add(int(m.group(1)))
            applied.update(int(a) for a in m.group(2).split(","))
        elif m := deleted.search(line):
            p = int(m.group(1))
            expired.update(at[(p, o)] for o in range(int(m.group(2)), int(m.group(3)) + 1) if (p, o) in at)

steps = []   # (node, round, attempt, ids)
for ledger in glob.glob(os.path.join(run, "nodes", "*", "ledger.jsonl")):
    node = os.path.basename(os.path.dirname(ledger))
    for line in open(ledger, errors="replace"):
        if not line.rstrip().endswith("}"):   # a line cut by SIGKILL
            continue
        e = json.loads(line)
        if "step" in e:
            steps.append((node, e["round"], e["attempt"], e["ids"]))
        elif e.get("applied"):
            applied.add(e["attempt"])

trained = collections.defaultdict(list)
unapplied = set()
for node, rnd, attempt, ids in steps:
    for i in ids:
        if attempt in applied:
            trained[i].append((rnd, node))
        else:
            unapplied.add(i)

lost = sorted(covered - trained.keys() - expired)
twice = {i: t for i, t in trained.items() if len(t) > 1}
gaps = collections.Counter(max(r for r, _ in t) - min(r for r, _ in t) for t in twice.values())
def ranges(ids):
    """Records as partition: [first, last] offset runs, for a reader to find them in the ledgers and logs."""
    runs = collections.defaultdict(list)
    for p, o in sorted(records[i] for i in ids):
        if runs[p] and runs[p][-1][1] == o - 1:
            runs[p][-1][1] = o
        else:
            runs[p].append([o, o])
    return {f"pairs/{p}": r[:10] for p, r in sorted(runs.items())}

kills = [l.strip() for l in open(os.path.join(out, "kills.log"))]
print(json.dumps({
    "kills": len(kills), "rounds_committed": len(rounds), "final_checkpoint": os.path.dirname(checkpoints[-1]),
    "records": len(records), "covered": len(covered), "expired": len(expired), "lost": len(lost), "twice": len(twice),
    "lost_ranges": ranges(lost), "twice_round_gaps": dict(sorted(gaps.items())), "wasted": len(unapplied - trained.keys()),
}, indent=1))
sys.exit(1 if lost else 0)
