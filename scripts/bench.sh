#!/usr/bin/env bash
# Benchmark of the command path (`make bench`), on this machine, loopback only:
#   1. HTTP grabs/s through `seckill-worker command` (wrk, 64 connections, distinct customers);
#   2. the ceiling: the same grab script straight into Redis by EVALSHA (redis-benchmark,
#      64 connections, unpipelined), same machine, same run;
#   3. sold-out rejections/s through the worker (its in-memory fast path).
# Writes the numbers and the exact commands into the command-path section of
# docs/BENCHMARKS.md (between its bench:command markers). About 1 minute once built.
#
# Env: BENCH_DURATION (seconds per wrk run, default 10), BENCH_CEILING_REQUESTS
# (redis-benchmark requests, default 300000), BENCH_NO_DOC=1 to leave the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${BENCH_DURATION:-10}"
CEILING_REQUESTS="${BENCH_CEILING_REQUESTS:-300000}"
COUPONS=10000000
THREADS=2
CONNECTIONS=64

for tool in wrk redis-benchmark redis-server redis-cli curl python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (make bench installs it)" >&2; exit 2; }
done

echo "bench: building release binaries"
cargo build -q --release -p seckill-workers --bin seckill-worker --example bench_setup
WORKER=target/release/seckill-worker
SETUP=target/release/examples/bench_setup

work=$(mktemp -d -t seckill-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port)
HTTP_PORT=$(free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
BASE="http://127.0.0.1:$HTTP_PORT"

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
  --appendfsync everysec --dir "$work" --logfile "$work/redis.log" --daemonize no &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

RUST_LOG=warn "$WORKER" command --listen "127.0.0.1:$HTTP_PORT" --redis-url "$REDIS_URL" --no-query \
  2>"$work/worker.log" &
pids+=($!)
for _ in $(seq 100); do curl -fs "$BASE/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
curl -fs "$BASE/readyz" >/dev/null || { echo "bench: the worker is not ready" >&2; cat "$work/worker.log" >&2; exit 1; }

# Promotions and the grab script's EVALSHA arguments, from the protocol module.
mapfile -t SETUP_OUT < <("$SETUP" "$REDIS_URL" "$COUPONS")
read -r -a EVALSHA_ARGS <<<"${SETUP_OUT[0]}"
HTTP_EVENTS_KEY="${SETUP_OUT[1]}"

GRAB_URL="$BASE/api/v1/promotions/bench/http/grab"
SOLD_OUT_URL="$BASE/api/v1/promotions/bench/sold-out/grab"
# (Positional arguments after -- go to bench/grab.lua: a label keeping customer ids distinct per run.)
WRK_GRAB=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s bench/grab.lua "$GRAB_URL" -- grab)
CEILING=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNECTIONS" -P 1 -n "$CEILING_REQUESTS"
  -r 1000000000 -q EVALSHA "${EVALSHA_ARGS[@]}" "c-__rand_int__")
WRK_SOLD_OUT=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s bench/sold-out.lua "$SOLD_OUT_URL")

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench: warm-up (2 s)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s bench/grab.lua "$GRAB_URL" -- warmup >/dev/null

echo "bench: HTTP grabs: ${WRK_GRAB[*]}"
"${WRK_GRAB[@]}" | tee "$work/grab.txt"
echo "bench: ceiling: ${CEILING[*]}"
"${CEILING[@]}" 2>&1 | tr '\r' '\n' | grep -v '^$' | tail -n 3 | tee "$work/ceiling.txt"
echo "bench: sold-out rejections: ${WRK_SOLD_OUT[*]}"
"${WRK_SOLD_OUT[@]}" | tee "$work/sold-out.txt"

# wrk prints e.g. "Requests/sec:  23456.78" and "     50%  2.10ms"; normalise latencies to ms.
rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
pct() {
  awk -v p="$2%" '$1 == p {
    v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    if (u == "us") v = v / 1000; else if (u == "s") v = v * 1000; else if (u == "m") v = v * 60000;
    printf "%.2f", v }' "$1"
}
non2xx() { awk '/Non-2xx or 3xx responses:/ {print $5}' "$1"; }
total() { awk '/requests in/ {print $1}' "$1"; }

GRAB_RPS=$(rps "$work/grab.txt")
GRAB_P50=$(pct "$work/grab.txt" 50)
GRAB_P99=$(pct "$work/grab.txt" 99)
GRAB_TOTAL=$(total "$work/grab.txt")
GRAB_NON2XX=$(non2xx "$work/grab.txt"); GRAB_NON2XX=${GRAB_NON2XX:-0}
CEILING_RPS=$(grep -o '[0-9.]* requests per second' "$work/ceiling.txt" | tail -1 | awk '{print $1}')
CEILING_P50=$(grep -o 'p50=[0-9.]* msec' "$work/ceiling.txt" | tail -1 | sed 's/p50=//; s/ msec//')
SOLD_RPS=$(rps "$work/sold-out.txt")
SOLD_P50=$(pct "$work/sold-out.txt" 50)
SOLD_P99=$(pct "$work/sold-out.txt" 99)
SOLD_TOTAL=$(total "$work/sold-out.txt")
SOLD_NON2XX=$(non2xx "$work/sold-out.txt"); SOLD_NON2XX=${SOLD_NON2XX:-0}
GRANTED=$(redis-cli -p "$REDIS_PORT" XLEN "$HTTP_EVENTS_KEY")
RATIO=$(awk -v a="$GRAB_RPS" -v b="$CEILING_RPS" 'BEGIN { printf "%.2f", a / b }')
MULTIPLE=$(awk -v a="$SOLD_RPS" -v b="$GRAB_RPS" 'BEGIN { printf "%.1f", a / b }')
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v >= t) ? "met" : "NOT met" }'; }

cat >"$work/section.md" <<EOF
<!-- bench:command:start (written by scripts/bench.sh; do not edit by hand) -->
## Command path (grab)

Run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -m), $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
load average before the run: $LOADAVG. wrk, redis-server and the worker share these cores.
Redis: a private \`redis-server\` $(redis-server --version | awk '{print $3}' | tr -d 'v='), AOF on, \`appendfsync everysec\`.

| measure | value | target |
|---|---|---|
| HTTP grabs/s (wrk, ${CONNECTIONS} connections, ${DURATION} s) | **$GRAB_RPS** | |
| grab latency p50 / p99 | $GRAB_P50 ms / $GRAB_P99 ms | |
| grab answers not 200 | $GRAB_NON2XX of $GRAB_TOTAL | 0 |
| ceiling: grab script by EVALSHA, redis-benchmark, ${CONNECTIONS} connections, unpipelined | **$CEILING_RPS**/s (p50 $CEILING_P50 ms) | |
| HTTP / ceiling | **$RATIO** | >= 0.5 ($(verdict "$RATIO" 0.5)) |
| sold-out rejections/s (410 from memory) | **$SOLD_RPS** (p50 $SOLD_P50 ms, p99 $SOLD_P99 ms; $SOLD_NON2XX of $SOLD_TOTAL answers were 410) | |
| sold-out rejections / grab rate | **${MULTIPLE}x** | >= 5 ($(verdict "$MULTIPLE" 5)) |

Entries in the \`bench/http\` stream after the run (PromotionStarted plus one CouponGrabbed per 200, warm-up included): $GRANTED.

Commands (ports are picked free at each run):

\`\`\`
${WRK_GRAB[*]}
${CEILING[*]}
${WRK_SOLD_OUT[*]}
\`\`\`
<!-- bench:command:end -->
EOF

if [ "${BENCH_NO_DOC:-0}" != 1 ]; then
  doc=docs/BENCHMARKS.md
  mkdir -p docs
  [ -f "$doc" ] || printf '# Benchmarks\n\nMeasured by `make bench` (scripts/bench.sh) on the machine it runs on; numbers from one run.\n\n' >"$doc"
  python3 - "$doc" "$work/section.md" <<'PY'
import re, sys
doc, section = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
text = open(doc).read()
pattern = re.compile(r"<!-- bench:command:start.*?<!-- bench:command:end -->", re.S)
text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
open(doc, "w").write(text)
PY
  echo "bench: wrote the command-path section of $doc"
fi
cat "$work/section.md"
