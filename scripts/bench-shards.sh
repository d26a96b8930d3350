#!/usr/bin/env bash
# Stock shards (issue 14) on a three-master Redis Cluster started by the
# bench, in one run on this machine: Redis CPU per granted grab with S = 3
# (one shard per master) beside S = 1 at the same per-call batch and beside
# the same three shards on one master (the control), stock moves per 1,000
# grabs and their estimated share of Redis CPU with uniformly random
# arrivals, each master's share of the grants, and the per-core grant rate of
# docs/SHARDING.md's capacity model. Writes the output and the exact command
# into docs/BENCHMARKS.md (between its bench:shards markers). Set
# BENCH_NO_DOC=1 to leave the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# shellcheck source=lib/example-bench.sh
source scripts/lib/example-bench.sh
run_example_bench shards "## Stock shards (issue 14)" shards_bench \
  "${SHARDS_BENCH_REPS:-5}" "${SHARDS_BENCH_PER_SHARD:-20000}" "${SHARDS_BENCH_SMALL:-1000}" "${SHARDS_BENCH_TASKS:-16}"
