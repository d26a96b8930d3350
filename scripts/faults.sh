#!/usr/bin/env bash
# `make faults`: the long versions of the fault scenarios of issue 7 (more
# customers, more rounds, the 10 s default header timeout), the Redis Cluster
# kill -9 failover soak, and the fuzzing of scripts/fuzz.sh when present.
# Every part runs even when an earlier one fails; the exit status is non-zero
# when any failed, and the summary names them. The per-scenario numbers are
# printed as `[faults] ...`, `[abuse] ...` and `[operator-faults] ...` lines
# (docs/RELIABILITY.md is written from them).
#
# Env: SECKILL_FAULTS_LONG (default 1 here), SECKILL_CLUSTER_FAILOVER_ROUNDS
# (default 3), FUZZ_SECONDS (passed on to scripts/fuzz.sh), SKIP_FUZZ=1.
set -uo pipefail
cd "$(dirname "$0")/.."
export SECKILL_FAULTS_LONG="${SECKILL_FAULTS_LONG:-1}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"

failed=()
run() {
  local name="$1"; shift
  echo "==> faults: $name: $*"
  local started=$SECONDS
  if "$@"; then
    echo "==> faults: $name passed in $((SECONDS - started)) s"
  else
    echo "==> faults: $name FAILED after $((SECONDS - started)) s"
    failed+=("$name")
  fi
}

# One scenario at a time: they start several processes each and measure latencies.
run worker-faults cargo test -p seckill-workers --test faults -- --test-threads=1 --nocapture
run http-abuse cargo test -p seckill-workers --test http_abuse -- --test-threads=1 --nocapture
run operator-faults cargo test -p seckill-cli --test operator_faults -- --test-threads=1 --nocapture
run cluster-failover env SECKILL_CLUSTER_FAILOVER_ROUNDS="${SECKILL_CLUSTER_FAILOVER_ROUNDS:-3}" \
  cargo test -p seckill-workers --test cluster -- kill_9 --nocapture
if [ -f scripts/fuzz.sh ] && [ "${SKIP_FUZZ:-0}" != 1 ]; then
  run fuzz bash scripts/fuzz.sh
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "faults: FAILED: ${failed[*]}"
  exit 1
fi
echo "faults: all passed"
