#!/usr/bin/env bash
# Grab throughput on a three-master Redis Cluster beside a single Redis, in one
# run on this machine (issue 8): one promotion, twenty promotions at once, and
# the durable grab on a cluster with one replica per master. Writes the output
# and the exact command into docs/BENCHMARKS.md (between its bench:cluster
# markers). Set BENCH_NO_DOC=1 to leave the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SECONDS_PER=${CLUSTER_BENCH_SECONDS:-5}
TASKS=${CLUSTER_BENCH_TASKS:-128}
# shellcheck source=lib/example-bench.sh
source scripts/lib/example-bench.sh
run_example_bench cluster "## Redis Cluster beside a single Redis" cluster_bench "$SECONDS_PER" "$TASKS"
