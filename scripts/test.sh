#!/usr/bin/env bash
# Sets up a fresh machine and runs every check and test of the workspace:
# formatting, clippy with warnings as errors, unit tests, and the integration
# tests that start real kvd and redis-server processes on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo build"
# The integration tests run the kvd binary, so build it before testing.
cargo build --workspace

echo "== loom model checks"
bash scripts/loom.sh | tee -a "$log"

echo "== cargo test"
cargo test --workspace 2>&1 | tee -a "$log"

echo "== the cluster suite again, its nodes linked by TLS (tls-cluster yes)"
KVD_TEST_TLS_LINKS=1 cargo test -p protocol-tests --test cluster 2>&1 | tee -a "$log"
# One closing line over every test binary (cargo's own last line is the last
# crate's doc-tests, often 0 of them).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
