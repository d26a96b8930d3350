# shellcheck shell=bash
# One way for the bench scripts that run a single workers example
# (bench-cluster.sh, bench-shards.sh) to build it, run it, print its output
# and write that output with the exact command and the machine's load into
# docs/BENCHMARKS.md between the script's markers (scripts/write-doc-section.py).
# Sourced from the repository root; BENCH_NO_DOC=1 leaves the doc alone.
#
#   run_example_bench MARKER "## Heading" EXAMPLE [ARG...]
run_example_bench() {
  local marker=$1 heading=$2 example=$3
  shift 3
  local load_before load_after out
  load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  cargo build --release --quiet -p seckill-workers --example "$example"
  out=$("${CARGO_TARGET_DIR:-target}/release/examples/$example" "$@")
  load_after=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "$out"
  [ "${BENCH_NO_DOC:-0}" = 1 ] && return 0
  cat <<MD | python3 scripts/write-doc-section.py "$marker" docs/BENCHMARKS.md - "$heading"
<!-- bench:$marker:start (written by scripts/$(basename "$0"); do not edit by hand) -->
Run on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average before the run: $load_before; after: $load_after.

\`\`\`
cargo build --release -p seckill-workers --example $example
target/release/examples/$example $*
\`\`\`

\`\`\`
$out
\`\`\`
<!-- bench:$marker:end -->
MD
  echo "$(basename "$0" .sh): wrote docs/BENCHMARKS.md"
}
