#!/usr/bin/env bash
# User-space instructions a worker spends per sold-out rejection, under
# callgrind: unlike wall-clock rates on a shared 2-core machine, the count
# repeats to within a fraction of a percent from run to run, so two builds
# can be compared on a busy machine (docs/BENCHMARKS.md).
#
# The worker (`seckill-worker command --no-query`, default the release build)
# runs under `valgrind --tool=callgrind` twice, answering 3,000 and then 9,000
# sold-out grabs sent over 16 keep-alive connections by a small Python
# client; instructions per rejection = (total of the long run - total of the
# short run) / 6,000, so start-up and shutdown cancel out.
#
# Usage: bash bench/callgrind-sold-out.sh [WORKER_BINARY]
# Needs valgrind, redis-server, curl, python3 and the release build of
# bench_setup (cargo build --release -p seckill-workers --example bench_setup).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKER="${1:-target/release/seckill-worker}"
SETUP=target/release/examples/bench_setup
for tool in valgrind callgrind_annotate redis-server curl python3; do
  command -v "$tool" >/dev/null || { echo "callgrind: $tool is missing" >&2; exit 2; }
done
[ -x "$SETUP" ] || { echo "callgrind: build $SETUP first" >&2; exit 2; }

source scripts/lib/scratch.sh
scratch seckill-callgrind

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis.log" --daemonize no &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
"$SETUP" "redis://127.0.0.1:$REDIS_PORT/" 1000 >/dev/null

cat >"$work/client.py" <<'EOF'
# Sends N sold-out grabs over 16 keep-alive connections, one at a time each.
import asyncio, sys
port, total, conns = int(sys.argv[1]), int(sys.argv[2]), 16
body = b'{"customerId":"late-customer"}'
request = (b"POST /api/v1/promotions/bench/sold-out/grab HTTP/1.1\r\nHost: bench\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
async def connection(n):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(n):
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 410"), head
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length"))
        await reader.readexactly(length)
    writer.close()
async def main():
    await asyncio.gather(*(connection(total // conns) for _ in range(conns)))
asyncio.run(main())
EOF

# Instructions of one run of the worker answering $1 rejections.
run() {
  local requests=$1 port pid
  port=$(free_port)
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/out.$requests" \
    "$WORKER" command --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$REDIS_PORT/" \
    --no-query 2>"$work/worker.$requests.log" &
  pid=$!
  for _ in $(seq 600); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  # The first grab learns from Redis that the promotion is sold out.
  curl -s -X POST -H 'content-type: application/json' -d '{"customerId":"first"}' \
    "http://127.0.0.1:$port/api/v1/promotions/bench/sold-out/grab" >/dev/null
  python3 "$work/client.py" "$port" "$requests"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  callgrind_annotate "$work/out.$requests" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}
short=$(run 3008)
long=$(run 9008)
echo "$WORKER: $short instructions for 3008 rejections, $long for 9008"
awk -v a="$short" -v b="$long" 'BEGIN { printf "%.0f instructions per sold-out rejection\n", (b - a) / 6000 }'
