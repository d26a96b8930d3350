#!/usr/bin/env bash
# User-space instructions a worker spends per grab, under callgrind: unlike
# wall-clock rates on a shared 2-core machine, the count repeats to within a
# fraction of a percent from run to run, so two builds can be compared on a
# busy machine (docs/BENCHMARKS.md).
#
# ROUTE says which grab: `sold-out` (default), the same customer grabbing a
# sold-out promotion (the worker answers 410 from memory), or `grant`, a new
# customer per request on a promotion with coupons for all (group commit
# batches them: 200s, one Redis call per batch).
#
# The worker (`seckill-worker command --no-query`, default the release build)
# runs under `valgrind --tool=callgrind` twice, answering 3,000 and then 9,000
# grabs sent over 16 keep-alive connections by a small Python client;
# instructions per grab = (total of the long run - total of the short run) /
# 6,000, so start-up and shutdown cancel out. The worker is pinned to one CPU
# (taskset -c CALLGRIND_CPU, default 1) as `make bench` pins it: it then runs
# tokio's single-threaded runtime, the one measured there (unpinned, the
# multi-threaded one hands tasks and frees between threads, and counts more). With CALLGRIND_KEEP=DIR the
# long run's callgrind output is copied to DIR/callgrind.out.ROUTE (to read
# with callgrind_annotate --inclusive=yes).
#
# WORKER_BINARY may also be target/release/examples/hyper_floor (the floor
# of the sold-out path: hyper alone answering the same 410; see
# workers/examples/hyper_floor.rs).
#
# Usage: bash bench/callgrind.sh [sold-out|grant] [WORKER_BINARY]
# Needs valgrind, redis-server, curl, python3 and the release build of
# bench_setup (cargo build --release -p seckill-workers --example bench_setup).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTE="${1:-sold-out}"
WORKER="${2:-target/release/seckill-worker}"
case "$ROUTE" in
  sold-out) PROMOTION=sold-out STATUS=410 ;;
  grant) PROMOTION=http STATUS=200 ;;
  *) echo "callgrind: ROUTE is sold-out or grant, not $ROUTE" >&2; exit 2 ;;
esac
SETUP=target/release/examples/bench_setup
for tool in valgrind callgrind_annotate redis-server curl python3; do
  command -v "$tool" >/dev/null || { echo "callgrind: $tool is missing" >&2; exit 2; }
done
[ -x "$SETUP" ] || { echo "callgrind: build $SETUP first" >&2; exit 2; }

PIN=()
if command -v taskset >/dev/null; then PIN=(taskset -c "${CALLGRIND_CPU:-1}"); fi

source scripts/lib/scratch.sh
scratch seckill-callgrind

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis.log" --daemonize no &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
# Coupons for every granted grab of both runs (bench/http), and bench/sold-out.
"$SETUP" "redis://127.0.0.1:$REDIS_PORT/" 20000 >/dev/null

cat >"$work/client.py" <<'EOF'
# Sends N grabs over 16 keep-alive connections, one at a time each: the same
# late customer on a sold-out promotion, or a new customer each time.
import asyncio, sys
port, total, route, run, conns = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], 16
promotion, status = {"sold-out": ("sold-out", b"410"), "grant": ("http", b"200")}[route]
def request(customer):
    body = b'{"customerId":"%s"}' % customer.encode()
    return (b"POST /api/v1/promotions/bench/%s/grab HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (promotion.encode(), len(body), body))
async def connection(c, n):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(n):
        customer = "late-customer" if route == "sold-out" else "r%s-c%d-%d" % (run, c, i)
        writer.write(request(customer))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), head
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length"))
        await reader.readexactly(length)
    writer.close()
async def main():
    await asyncio.gather(*(connection(c, total // conns) for c in range(conns)))
asyncio.run(main())
EOF

# Instructions of one run of the worker answering $1 rejections.
run() {
  local requests=$1 port pid
  port=$(free_port)
  RUST_LOG=warn "${PIN[@]}" valgrind --tool=callgrind --callgrind-out-file="$work/out.$requests" \
    "$WORKER" command --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$REDIS_PORT/" \
    --no-query 2>"$work/worker.$requests.log" &
  pid=$!
  # (Ready, or the hyper_floor example, which answers 410 to every path.)
  for _ in $(seq 600); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" != 410 ] || break
    sleep 0.1
  done
  # The first grab learns from Redis that the promotion is sold out (or,
  # for grants, loads what the worker keeps of bench/http).
  curl -s -X POST -H 'content-type: application/json' -d "{\"customerId\":\"first-$requests\"}" \
    "http://127.0.0.1:$port/api/v1/promotions/bench/$PROMOTION/grab" >/dev/null
  python3 "$work/client.py" "$port" "$requests" "$ROUTE" "$requests"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  if [ -n "${CALLGRIND_KEEP:-}" ]; then cp "$work/out.$requests" "$CALLGRIND_KEEP/callgrind.out.$ROUTE"; fi
  callgrind_annotate "$work/out.$requests" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}
short=$(run 3008)
long=$(run 9008)
echo "$WORKER ($ROUTE, $STATUS): $short instructions for 3008 grabs, $long for 9008"
awk -v a="$short" -v b="$long" -v r="$ROUTE" 'BEGIN { printf "%.0f instructions per %s grab\n", (b - a) / 6000, r }'
