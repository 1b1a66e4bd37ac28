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

echo "== cargo build"
# The integration tests run the kvd binary, so build it before testing.
cargo build --workspace

echo "== cargo test"
cargo test --workspace
