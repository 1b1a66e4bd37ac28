#!/usr/bin/env bash
# The main job: set up, build, start kvd on 127.0.0.1 (data in ./data), make sure
# a dictfs volume exists in it, mount it at a directory (./mnt unless MNT is set),
# and keep serving until Ctrl-C, which unmounts (committing everything written)
# and stops kvd.
#
# Today kvd runs as one node; the kvd cluster is being built in its own issue and
# this script will start a local cluster once it exists.
#
#   PORT=7379 DATA=./data MNT=./mnt ./scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p kvd -p fsclient

port="${PORT:-7379}"
data="${DATA:-$PWD/data}"
mnt="${MNT:-$PWD/mnt}"
mkdir -p "$data" "$mnt"
fs="./target/release/fsclient --store redis://127.0.0.1:$port"

./target/release/kvd --port "$port" --dir "$data" &
kvd=$!
mounter=""
stop() {
  trap - INT TERM EXIT
  if [ -n "$mounter" ]; then
    kill -TERM "$mounter" 2>/dev/null || true # unmounts after committing
    wait "$mounter" 2>/dev/null || true
  fi
  kill "$kvd" 2>/dev/null || true
  wait "$kvd" 2>/dev/null || true
}
trap stop INT TERM EXIT

for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
$fs ls / >/dev/null 2>&1 || $fs mkfs

$fs mount "$mnt" &
mounter=$!
for _ in $(seq 150); do
  grep -q " $(realpath "$mnt") fuse" /proc/self/mounts && break
  kill -0 "$mounter" 2>/dev/null || { echo "run: the mount failed" >&2; exit 1; }
  sleep 0.1
done

cat <<TXT

kvd is serving 127.0.0.1:$port (data in $data), and the dictfs volume 'main'
is mounted at:

  $mnt

Use it like any directory, in another terminal:

  cp -a ~/some/files $mnt/ && ls -l $mnt
  $fs log                      # every commit (fsync, close of a written file, each second)
  $fs snapshot create before-cleanup
  redis-cli -p $port info persistence

Stop with Ctrl-C (unmounts, then stops kvd).
TXT
wait "$mounter"
