#!/usr/bin/env bash
# The main job: build, start kvd on 127.0.0.1 (data in ./data), make sure a dictfs
# volume exists in it, and keep serving until Ctrl-C.
#
# Today this is one kvd node and the fsclient command line. The kvd cluster and the
# FUSE mount are being built in their own issues; this script will start them once
# they exist.
#
#   PORT=7379 DATA=./data ./scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p kvd -p fsclient

port="${PORT:-7379}"
data="${DATA:-$PWD/data}"
mkdir -p "$data"
./target/release/kvd --port "$port" --dir "$data" &
kvd=$!
trap 'kill "$kvd" 2>/dev/null; wait "$kvd" 2>/dev/null || true' INT TERM EXIT

for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
fs="./target/release/fsclient --store redis://127.0.0.1:$port"
$fs ls / >/dev/null 2>&1 || $fs mkfs

cat <<TXT

kvd is serving 127.0.0.1:$port (data in $data), with the dictfs volume 'main'.
Try, in another terminal:

  $fs put ./README.md /README.md
  $fs ls -l /
  $fs cat /README.md
  $fs log
  redis-cli -p $port info persistence

Stop with Ctrl-C.
TXT
wait "$kvd"
