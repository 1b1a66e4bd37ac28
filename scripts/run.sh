#!/usr/bin/env bash
# The main job: set up, build, start a local kvd cluster (NODES nodes, 3 by
# default, on 127.0.0.1 ports PORT, PORT+1, ...; data in ./data/nodeN), make
# sure a dictfs volume exists in it, mount it at a directory (./mnt unless MNT
# is set), and keep serving until Ctrl-C, which unmounts (committing
# everything written) and stops the nodes.
#
#   PORT=7379 NODES=3 DATA=./data MNT=./mnt ./scripts/run.sh
#
# The nodes form a replicated cluster: every key on REPLICAS of them (3 by
# default, so with 3 nodes every key is on all of them): stop any one node,
# the one the mount talks to included, and the file system goes on (data in
# DATA/replicated/nodeN). REPLICAS=1 runs the sharded `--cluster` mode instead
# (one copy of each slot: a node down makes its share of the files fail until
# it is back; data in DATA/nodeN). NODES=1 runs a single kvd. The cluster
# secret is made once and kept in DATA/cluster-secret.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p kvd -p fsclient

port="${PORT:-7379}"
nodes="${NODES:-3}"
replicas="${REPLICAS:-3}"
[ "$replicas" = 1 ] && replicas=""
data="${DATA:-$PWD/data}"
mnt="${MNT:-$PWD/mnt}"
mkdir -p "$data" "$mnt"
fs="./target/release/fsclient --store redis://127.0.0.1:$port"

pids=()
mounter=""
stop() {
  trap - INT TERM EXIT
  if [ -n "$mounter" ]; then
    kill -TERM "$mounter" 2>/dev/null || true # unmounts after committing
    wait "$mounter" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop INT TERM EXIT

if [ "$nodes" -le 1 ]; then
  ./target/release/kvd --port "$port" --dir "$data" &
  pids+=($!)
else
  [ -s "$data/cluster-secret" ] || (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$data/cluster-secret")
  export KVD_CLUSTER_SECRET="$(cat "$data/cluster-secret")"
  peers="$(seq -s, -f "127.0.0.1:%g" "$port" $((port + nodes - 1)))"
  for i in $(seq 0 $((nodes - 1))); do
    p=$((port + i))
    if [ -n "$replicas" ]; then
      dir="$data/replicated/node$((i + 1))"
      mkdir -p "$dir"
      KVD_LOG=warn ./target/release/kvd --port "$p" --dir "$dir" --replicas "$replicas" --peers "$peers" &
      pids+=($!)
      continue
    fi
    dir="$data/node$((i + 1))"
    mkdir -p "$dir"
    if [ "$i" -eq 0 ]; then
      # The first node founds the cluster on its first start; later it finds
      # the others through node 2.
      seed=""
      [ -e "$dir/cluster-slots" ] && seed="--seed 127.0.0.1:$((port + 1))"
    else
      seed="--seed 127.0.0.1:$port"
    fi
    # shellcheck disable=SC2086
    KVD_LOG=warn ./target/release/kvd --port "$p" --dir "$dir" --cluster $seed &
    pids+=($!)
  done
fi

for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
if [ "$nodes" -gt 1 ] && [ -z "$replicas" ]; then
  echo "run: waiting for the $nodes nodes to share the slots..."
  for _ in $(seq 300); do
    settled=yes
    for i in $(seq 0 $((nodes - 1))); do
      info="$(redis-cli -p $((port + i)) info cluster 2>/dev/null || true)"
      echo "$info" | grep -q "kvd_cluster_nodes:$nodes" || settled=no
      echo "$info" | grep -q "kvd_cluster_slots_to_import:0" || settled=no
      echo "$info" | grep -q "kvd_cluster_slots_importing:0" || settled=no
      redis-cli -p $((port + i)) cluster info 2>/dev/null | grep -q "cluster_state:ok" || settled=no
    done
    [ "$settled" = yes ] && break
    sleep 0.2
  done
fi
$fs ls / >/dev/null 2>&1 || $fs mkfs

$fs mount "$mnt" &
mounter=$!
for _ in $(seq 150); do
  grep -q " $(realpath "$mnt") fuse" /proc/self/mounts && break
  kill -0 "$mounter" 2>/dev/null || { echo "run: the mount failed" >&2; exit 1; }
  sleep 0.1
done

cat <<TXT

A $nodes-node kvd cluster${replicas:+ (every key on $replicas nodes)} is serving 127.0.0.1:$port..$((port + nodes - 1)) (data in
$data), and the dictfs volume 'main' is mounted at:

  $mnt

Use it like any directory, in another terminal:

  cp -a ~/some/files $mnt/ && ls -l $mnt
  $fs log                      # every commit (fsync, close of a written file, each second)
  $fs snapshot create before-cleanup
  redis-cli -p $port cluster nodes
  redis-cli -p $port info cluster

Stop with Ctrl-C (unmounts, then stops the nodes).
TXT
wait "$mounter"
