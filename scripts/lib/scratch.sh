# shellcheck shell=bash
# What every script that starts its own processes shares, sourced rather
# than copied: a scratch directory ($work), the processes started into it
# ($pids: append each background pid; killed and reaped on exit, then the
# directory is removed), free loopback ports, and the wait until a server
# started into it answers its readiness probe.
#
#   source scripts/lib/scratch.sh
#   scratch seckill-bench          # sets $work and the EXIT trap
#   REDIS_PORT=$(free_port)
#   redis-server --port "$REDIS_PORT" ... & pids+=($!)

pids=()

scratch() {
  work=$(mktemp -d -t "$1.XXXXXX")
  trap scratch_cleanup EXIT
}

scratch_cleanup() {
  # (CONT: a process a script paused would not act on TERM until resumed.)
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; kill -CONT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (at most 10 s) until URL/readyz answers; else prints the server's log
# and exits. await_ready URL LOG
await_ready() {
  for _ in $(seq 200); do curl -fs "$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "$(basename "$0"): $1 is not ready" >&2; cat "$2" >&2; exit 1
}
