#!/usr/bin/env bash
# Model-checks kvd's concurrent storage core with loom.
#
# `--cfg loom` goes to kvd's own test build only (via `cargo rustc`), not to its
# dependencies: tokio has loom hooks of its own that do not build that way.
set -euo pipefail
cd "$(dirname "$0")/.."
exe=$(cargo rustc -q -p kvd --lib --profile test --message-format=json -- --cfg loom \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kvd":
        print(m["executable"])')
echo "== loom: $exe"
LOOM_MAX_PREEMPTIONS=3 "$exe" loom_tests --test-threads 1
