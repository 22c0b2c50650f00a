# Sourced by bench/every-step.sh and bench/every-step-profile.sh: starts two every-step nodes of one run in the
# background, the seed first, each on a free port. Needs MAMO, COMMON and OUT from the caller.
# Usage: every_step_nodes NAME DATA_PLANE SEED_HEAD_START_S
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
every_step_nodes() {
  local seed here
  seed=$(port)
  for i in 1 2; do
    here=$seed
    [ "$i" = 1 ] || here=$(port)
    "${MAMO[@]}" pretrain --run-dir "$OUT/$1" "${COMMON[@]}" --cluster "127.0.0.1:$here" --seed-nodes "127.0.0.1:$seed" --node-name "n$i" \
      --set cluster.sync=every-step --set cluster.min-replicas=2 --set "cluster.data-plane=$2" >"$OUT/$1-n$i.log" 2>&1 &
    if [ "$i" = 1 ]; then sleep "$3"; fi
  done
}
