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
REPS=${SHARDS_BENCH_REPS:-5}
PER_SHARD=${SHARDS_BENCH_PER_SHARD:-20000}
SMALL=${SHARDS_BENCH_SMALL:-1000}
TASKS=${SHARDS_BENCH_TASKS:-16}
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
cargo build --release --quiet -p seckill-workers --example shards_bench
bin="${CARGO_TARGET_DIR:-target}/release/examples/shards_bench"
out=$("$bin" "$REPS" "$PER_SHARD" "$SMALL" "$TASKS")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo "$out"
[ "${BENCH_NO_DOC:-0}" = 1 ] && exit 0
section=$(cat <<MD
<!-- bench:shards:start (written by scripts/bench-shards.sh; do not edit by hand) -->
Run on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average before the run: $load_before; after: $load_after.

\`\`\`
cargo build --release -p seckill-workers --example shards_bench
target/release/examples/shards_bench $REPS $PER_SHARD $SMALL $TASKS
\`\`\`

\`\`\`
$out
\`\`\`
<!-- bench:shards:end -->
MD
)
printf '%s\n' "$section" |
  python3 scripts/write-doc-section.py shards docs/BENCHMARKS.md - "## Stock shards (issue 14)"
echo "bench-shards: wrote docs/BENCHMARKS.md"
