#!/usr/bin/env bash
# The main job: set up, build, start a local kvd cluster (NODES nodes, 3 by
# default, on 127.0.0.1 ports PORT, PORT+1, ...; data in ./data/nodeN), make
# sure a dictfs volume exists in it, mount it at a directory (./mnt unless MNT
# is set), and keep serving until Ctrl-C, which unmounts (committing
# everything written) and stops the nodes.
#
#   PORT=7379 NODES=3 DATA=./data MNT=./mnt ./scripts/run.sh
#
# The nodes form one kvd cluster (`kvd --cluster`): every key on 3 of them
# (so with 3 nodes on all of them). Node 1 founds it on its first start and
# the others join through node 1 (`--seed`); stop any one node, the one the
# mount talks to included, and the file system goes on. NODES=1 runs a
# single kvd. The cluster secret is made once and kept in DATA/cluster-secret.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p kvd -p fsclient

port="${PORT:-7379}"
nodes="${NODES:-3}"
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
  # Before the one cluster mode, the default kept its nodes in
  # DATA/replicated/nodeN: carry them over.
  for i in $(seq 1 "$nodes"); do
    if [ -d "$data/replicated/node$i" ] && [ ! -e "$data/node$i" ]; then
      mv "$data/replicated/node$i" "$data/node$i"
    fi
  done
  if [ -e "$data/node1/cluster-slots" ]; then
    echo "run: $data/node1 holds data of the old sharded --cluster mode, which kvd no longer runs;" >&2
    echo "run: move $data away (or set DATA=) and copy your files into the new mount." >&2
    exit 1
  fi
  for i in $(seq 0 $((nodes - 1))); do
    p=$((port + i))
    dir="$data/node$((i + 1))"
    seed="--seed 127.0.0.1:$port"
    if [ "$i" -eq 0 ]; then
      # Node 1 founds the cluster on its first start; later it knows its
      # members (and, if it was taken out while away, asks node 2).
      seed=""
      [ -e "$dir/replica-config" ] && seed="--seed 127.0.0.1:$((port + 1))"
    fi
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    KVD_LOG=warn ./target/release/kvd --port "$p" --dir "$dir" --cluster $seed &
    pids+=($!)
  done
fi

for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
if [ "$nodes" -gt 1 ]; then
  echo "run: waiting for the $nodes nodes to join..."
  for _ in $(seq 600); do
    info="$(redis-cli -p "$port" info cluster 2>/dev/null || true)"
    members="$(echo "$info" | sed -n 's/^kvd_replica_members:\([^\r]*\).*/\1/p' | tr ',' '\n' | grep -c . || true)"
    [ "$members" = "$nodes" ] && echo "$info" | grep -q "^kvd_replica_change_in_progress:0" && break
    sleep 0.1
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

A $nodes-node kvd cluster is serving 127.0.0.1:$port..$((port + nodes - 1)) (data in
$data), and the dictfs volume 'main' is mounted at:

  $mnt

Use it like any directory, in another terminal:

  cp -a ~/some/files $mnt/ && ls -l $mnt
  $fs log                      # every commit (fsync, close of a written file, each second)
  $fs snapshot create before-cleanup
  redis-cli -p $port cluster nodes
  redis-cli -p $port info cluster

A node can be stopped (kill -9) and started again by hand; it needs the
cluster's secret:

  KVD_CLUSTER_SECRET=\$(cat $data/cluster-secret) ./target/release/kvd --cluster --port $((port + nodes - 1)) --dir $data/node$nodes --seed 127.0.0.1:$port &

Stop with Ctrl-C (unmounts, then stops the nodes).
TXT
wait "$mounter"
