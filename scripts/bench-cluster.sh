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
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
cargo build --release --quiet -p seckill-workers --example cluster_bench
bin="${CARGO_TARGET_DIR:-target}/release/examples/cluster_bench"
out=$("$bin" "$SECONDS_PER" "$TASKS")
echo "$out"
[ "${BENCH_NO_DOC:-0}" = 1 ] && exit 0
section=$(cat <<MD
<!-- bench:cluster:start (written by scripts/bench-cluster.sh; do not edit by hand) -->
Run on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average before the run: $load_before.

\`\`\`
cargo build --release -p seckill-workers --example cluster_bench
target/release/examples/cluster_bench $SECONDS_PER $TASKS
\`\`\`

\`\`\`
$out
\`\`\`
<!-- bench:cluster:end -->
MD
)
printf '%s\n' "$section" |
  python3 scripts/write-doc-section.py cluster docs/BENCHMARKS.md - "## Redis Cluster beside a single Redis"
echo "bench-cluster: wrote docs/BENCHMARKS.md"
