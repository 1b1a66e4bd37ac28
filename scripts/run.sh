#!/usr/bin/env bash
# The main job: build and start kvd on 127.0.0.1, in the foreground, until Ctrl-C.
#
# Today this is a single kvd node. The kvd cluster and the mounted file system
# (fsclient) are being built in their own issues; this script will start them
# once they exist.
#
#   PORT=7379 DATA=./data ./scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p kvd

port="${PORT:-7379}"
data="${DATA:-$PWD/data}"
mkdir -p "$data"
echo "kvd listening on 127.0.0.1:$port (data dir $data). Try: redis-cli -p $port ping"
echo "Stop with Ctrl-C."
exec ./target/release/kvd --port "$port" --dir "$data"
