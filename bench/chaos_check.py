"""The ledger check of bench/chaos.sh: reads OUT/records.txt (partition offset id, from kcat), the nodes' ledgers and
logs under OUT/run/nodes, and the final cluster checkpoint, and prints one JSON object.

- covered: the records at or before the final checkpoint's offset of their partition;
- applied: the ledger entries of the (round, node) contributions that a coordinator committed (its log line
  "round R done with N replicas (a,b)"). A round that was given again (its coordinator died before the commit)
  repeats its number, so of a node's entries for that round only the last INNER_STEPS are the applied attempt's;
- lost: covered records in no applied entry (must be 0: exits 1 otherwise);
- twice: records in two applied entries, with the rounds of both; wasted: records trained only in contributions that
  were never applied (a node killed mid-round, or a round abandoned)."""
import collections, glob, json, os, re, sys

out, inner_steps = sys.argv[1], int(sys.argv[2])
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

applied = set()
done = re.compile(r"round (\d+) done with \d+ replicas \(([^)]*)\)")
for log in glob.glob(os.path.join(run, "nodes", "*", "mamo.log")):
    for line in open(log, errors="replace"):
        if m := done.search(line):
            for node in m.group(2).split(","):
                applied.add((int(m.group(1)), node))

attempts = collections.defaultdict(list)   # (round, node) -> its entries in the order the node wrote them
for ledger in glob.glob(os.path.join(run, "nodes", "*", "ledger.jsonl")):
    node = os.path.basename(os.path.dirname(ledger))
    for line in open(ledger, errors="replace"):
        if line.rstrip().endswith("}"):   # not a line cut by SIGKILL
            e = json.loads(line)
            attempts[(e["round"], node)].append(e)
trained = collections.defaultdict(list)
unapplied = set()
for key, entries in attempts.items():
    last = entries[-inner_steps:] if key in applied else []
    for e in last:
        for i in e["ids"]:
            trained[i].append(key)
    for e in entries[:len(entries) - len(last)]:
        unapplied.update(e["ids"])

lost = sorted(covered - trained.keys())
twice = {i: t for i, t in trained.items() if len(t) > 1}
gaps = collections.Counter(max(r for r, _ in t) - min(r for r, _ in t) for t in twice.values())
kills = [l.strip() for l in open(os.path.join(out, "kills.log"))]
print(json.dumps({
    "kills": len(kills), "rounds_committed": len({r for r, _ in applied}), "final_checkpoint": os.path.dirname(checkpoints[-1]),
    "records": len(records), "covered": len(covered), "lost": len(lost), "twice": len(twice),
    "twice_round_gaps": dict(sorted(gaps.items())), "wasted": len(unapplied - trained.keys()),
}, indent=1))
sys.exit(1 if lost else 0)
