#!/usr/bin/env bash
# Benchmark of the command path (`make bench`), on this machine, loopback only.
# Each round measures, one after the other:
#   1. HTTP grabs/s through `seckill-worker command` (wrk, 64 connections, distinct customers);
#   2. the ceiling: the same grab script straight into Redis by EVALSHA (redis-benchmark,
#      64 connections, unpipelined), same machine, same round;
#   3. sold-out rejections/s through the worker (its in-memory fast path);
#   4. the yardstick of that path: nginx answering a static 410 with the same
#      JSON body (2 worker processes, a minimal nginx.conf generated in the temp
#      dir), same wrk command and connections, same CPU placement as the worker.
# Every ratio compares figures of the same round.
#
# CPU placement (a 2-core machine; see docs/BENCHMARKS.md): processes are pinned
# with taskset, identically in every run: the worker alone on BENCH_WORKER_CPU
# (default 1; nginx's master and its 2 workers there too: each of the two
# servers is idle while the other is measured), wrk and redis-server on
# BENCH_CLIENT_CPU (default 0), and
# redis-benchmark on the worker's CPU (the worker is idle then), so the ceiling
# has the same client-core / Redis-core split. The CPU time the worker and Redis
# used in each run is read from /proc and reported beside the rates.
#
# Writes the numbers and the exact commands into the command-path section of
# docs/BENCHMARKS.md (between its bench:command markers). About 50 s per round.
#
# Env: BENCH_ROUNDS (default 3), BENCH_DURATION (seconds per wrk run, default 10),
# BENCH_CEILING_REQUESTS (redis-benchmark requests, default 300000),
# BENCH_WORKER_CPU / BENCH_CLIENT_CPU (CPU numbers), BENCH_PIN=0 (no pinning),
# BENCH_NO_DOC=1 to leave the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${BENCH_ROUNDS:-3}"
DURATION="${BENCH_DURATION:-10}"
CEILING_REQUESTS="${BENCH_CEILING_REQUESTS:-300000}"
WORKER_CPU="${BENCH_WORKER_CPU:-1}"
CLIENT_CPU="${BENCH_CLIENT_CPU:-0}"
COUPONS=10000000
# wrk runs on one CPU, so one wrk thread (a second would only time-share it).
THREADS=1
CONNECTIONS=64

for tool in wrk redis-benchmark redis-server redis-cli curl python3 nginx; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (make bench installs it)" >&2; exit 2; }
done
if [ "${BENCH_PIN:-1}" = 1 ] && command -v taskset >/dev/null; then
  ON_WORKER_CPU=(taskset -c "$WORKER_CPU")
  ON_CLIENT_CPU=(taskset -c "$CLIENT_CPU")
  PLACEMENT="worker on CPU $WORKER_CPU; wrk and redis-server on CPU $CLIENT_CPU; redis-benchmark and nginx (2 workers) on CPU $WORKER_CPU"
else
  ON_WORKER_CPU=()
  ON_CLIENT_CPU=()
  PLACEMENT="not pinned (BENCH_PIN=0 or no taskset): every process may use every core"
fi

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
NGINX_PORT=$(free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
BASE="http://127.0.0.1:$HTTP_PORT"

"${ON_CLIENT_CPU[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
  --appendfsync everysec --dir "$work" --logfile "$work/redis.log" --daemonize no &
REDIS_PID=$!
pids+=("$REDIS_PID")
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

RUST_LOG=warn "${ON_WORKER_CPU[@]}" "$WORKER" command --listen "127.0.0.1:$HTTP_PORT" \
  --redis-url "$REDIS_URL" --no-query 2>"$work/worker.log" &
WORKER_PID=$!
pids+=("$WORKER_PID")
for _ in $(seq 100); do curl -fs "$BASE/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
curl -fs "$BASE/readyz" >/dev/null || { echo "bench: the worker is not ready" >&2; cat "$work/worker.log" >&2; exit 1; }

# Promotions and the grab script's EVALSHA arguments, from the protocol module.
mapfile -t SETUP_OUT < <("$SETUP" "$REDIS_URL" "$COUPONS")
read -r -a EVALSHA_ARGS <<<"${SETUP_OUT[0]}"
HTTP_EVENTS_KEY="${SETUP_OUT[1]}"

GRAB_URL="$BASE/api/v1/promotions/bench/http/grab"
SOLD_OUT_URL="$BASE/api/v1/promotions/bench/sold-out/grab"
# (Positional arguments after -- go to bench/grab.lua: a label keeping customer ids distinct per run.)
wrk_grab() {
  WRK_GRAB=("${ON_CLIENT_CPU[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency
    -s bench/grab.lua "$GRAB_URL" -- "grab$1")
}
CEILING=("${ON_WORKER_CPU[@]}" redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNECTIONS" -P 1
  -n "$CEILING_REQUESTS" -r 1000000000 -q EVALSHA "${EVALSHA_ARGS[@]}" "c-__rand_int__")
WRK_SOLD_OUT=("${ON_CLIENT_CPU[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency
  -s bench/sold-out.lua "$SOLD_OUT_URL")

# The yardstick of the sold-out path: nginx answering the worker's own 410
# body (asked of the worker: bench_setup leaves the promotion sold out) as a
# static `return`, with 2 worker processes on the worker's CPU.
SOLD_OUT_BODY=$(curl -s -X POST -H 'content-type: application/json' -d '{"customerId":"probe"}' "$SOLD_OUT_URL")
case "$SOLD_OUT_BODY" in
  *'"error":"sold_out"'*) ;;
  *) echo "bench: the sold-out promotion does not answer 410 sold_out: $SOLD_OUT_BODY" >&2; exit 1 ;;
esac
case "$SOLD_OUT_BODY" in
  *"'"*|*'\\'*|*'$'*) echo "bench: cannot quote the 410 body for nginx: $SOLD_OUT_BODY" >&2; exit 1 ;;
esac
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
cat >"$work/nginx/nginx.conf" <<NGINX
# Generated by scripts/bench.sh: a static 410, the yardstick of the sold-out path.
worker_processes 2;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp/body;
  proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fastcgi;
  uwsgi_temp_path $work/nginx/tmp/uwsgi;
  scgi_temp_path $work/nginx/tmp/scgi;
  # The worker never closes a keep-alive connection after N requests; nor does this.
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    default_type application/json;
    location / { return 410 '$SOLD_OUT_BODY'; }
  }
}
NGINX
"${ON_WORKER_CPU[@]}" nginx -p "$work/nginx" -e "$work/nginx/logs/error.log" -c "$work/nginx/nginx.conf" &
NGINX_PID=$!
pids+=("$NGINX_PID")
NGINX_URL="http://127.0.0.1:$NGINX_PORT/api/v1/promotions/bench/sold-out/grab"
for _ in $(seq 100); do curl -s -o /dev/null "$NGINX_URL" 2>/dev/null && break; sleep 0.05; done
NGINX_ANSWER=$(curl -s -X POST -H 'content-type: application/json' -d '{"customerId":"probe"}' -w ' %{http_code}' "$NGINX_URL") || true
[ "$NGINX_ANSWER" = "$SOLD_OUT_BODY 410" ] || { echo "bench: nginx does not answer the same 410: $NGINX_ANSWER" >&2; cat "$work/nginx/logs/error.log" >&2; exit 1; }
WRK_NGINX=("${ON_CLIENT_CPU[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency
  -s bench/sold-out.lua "$NGINX_URL")

# CPU seconds (user + system) a process and its children (nginx's workers)
# have used so far.
cpu_secs() {
  local p total=0
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$(awk -v t="$total" -v hz="$(getconf CLK_TCK)" '{ print t + ($14 + $15) / hz }' "/proc/$p/stat")
  done
  echo "$total"
}
now() { date +%s.%N; }
# Runs "$@" (one load run) with its output into file $1, and sets W_CPU and
# R_CPU and N_CPU: percent of one core the worker, Redis and nginx (its two
# workers together) used meanwhile.
measured() {
  local out=$1; shift
  local w0 r0 n0 t0 dt
  w0=$(cpu_secs "$WORKER_PID"); r0=$(cpu_secs "$REDIS_PID"); n0=$(cpu_secs "$NGINX_PID"); t0=$(now)
  "$@" >"$out" 2>&1
  dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
  W_CPU=$(awk -v a="$w0" -v b="$(cpu_secs "$WORKER_PID")" -v t="$dt" 'BEGIN { printf "%.0f", (b - a) / t * 100 }')
  N_CPU=$(awk -v a="$n0" -v b="$(cpu_secs "$NGINX_PID")" -v t="$dt" 'BEGIN { printf "%.0f", (b - a) / t * 100 }')
  R_CPU=$(awk -v a="$r0" -v b="$(cpu_secs "$REDIS_PID")" -v t="$dt" 'BEGIN { printf "%.0f", (b - a) / t * 100 }')
}

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
ratio() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { printf f, (b > 0) ? a / b : 0 }'; }
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v >= t) ? "met" : "NOT met" }'; }

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench: CPU placement: $PLACEMENT"
echo "bench: warm-up (2 s)"
"${ON_CLIENT_CPU[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s bench/grab.lua "$GRAB_URL" -- warmup >/dev/null

GRAB_ROWS=""
SOLD_ROWS=""
NGINX_ROWS=""
MULTIPLES=()
HTTP_RATIOS=()
NGINX_RATIOS=()
for round in $(seq "$ROUNDS"); do
  wrk_grab "$round"
  echo "bench: round $round/$ROUNDS: HTTP grabs: ${WRK_GRAB[*]}"
  measured "$work/grab.txt" "${WRK_GRAB[@]}"
  cat "$work/grab.txt"
  GRAB_W=$W_CPU GRAB_R=$R_CPU
  echo "bench: round $round/$ROUNDS: ceiling: ${CEILING[*]}"
  measured "$work/ceiling-raw.txt" "${CEILING[@]}"
  CEIL_R=$R_CPU
  tr '\r' '\n' <"$work/ceiling-raw.txt" | grep -v '^$' | tail -n 3 >"$work/ceiling.txt"
  cat "$work/ceiling.txt"
  echo "bench: round $round/$ROUNDS: sold-out rejections: ${WRK_SOLD_OUT[*]}"
  measured "$work/sold-out.txt" "${WRK_SOLD_OUT[@]}"
  cat "$work/sold-out.txt"
  SOLD_W=$W_CPU
  echo "bench: round $round/$ROUNDS: nginx static 410: ${WRK_NGINX[*]}"
  measured "$work/nginx.txt" "${WRK_NGINX[@]}"
  cat "$work/nginx.txt"
  NGINX_CPU=$N_CPU

  GRAB_RPS=$(rps "$work/grab.txt")
  GRAB_NON2XX=$(non2xx "$work/grab.txt"); GRAB_NON2XX=${GRAB_NON2XX:-0}
  CEILING_RPS=$(grep -o '[0-9.]* requests per second' "$work/ceiling.txt" | tail -1 | awk '{print $1}')
  CEILING_P50=$(grep -o 'p50=[0-9.]* msec' "$work/ceiling.txt" | tail -1 | sed 's/p50=//; s/ msec//')
  SOLD_RPS=$(rps "$work/sold-out.txt")
  SOLD_NON2XX=$(non2xx "$work/sold-out.txt"); SOLD_NON2XX=${SOLD_NON2XX:-0}
  NGINX_RPS=$(rps "$work/nginx.txt")
  NGINX_NON2XX=$(non2xx "$work/nginx.txt"); NGINX_NON2XX=${NGINX_NON2XX:-0}
  NGINX_RATIO=$(ratio "$SOLD_RPS" "$NGINX_RPS" "%.2f")
  # Per CPU-second of the server: what one answer costs each, whoever else
  # took the core meanwhile (on a busy machine the rates alone say more
  # about the scheduler than about the servers).
  NGINX_PER_CPU=$(awk -v r="$NGINX_RPS" -v c="$NGINX_CPU" 'BEGIN { printf "%.0f", (c > 0) ? r / (c / 100) : 0 }')
  RATIO=$(ratio "$GRAB_RPS" "$CEILING_RPS" "%.2f")
  MULTIPLE=$(ratio "$SOLD_RPS" "$GRAB_RPS" "%.1f")
  # Requests per second of worker CPU: what one request costs the worker on each path.
  GRAB_PER_CPU=$(awk -v r="$GRAB_RPS" -v c="$GRAB_W" 'BEGIN { printf "%.0f", (c > 0) ? r / (c / 100) : 0 }')
  SOLD_PER_CPU=$(awk -v r="$SOLD_RPS" -v c="$SOLD_W" 'BEGIN { printf "%.0f", (c > 0) ? r / (c / 100) : 0 }')
  MULTIPLES+=("$MULTIPLE")
  HTTP_RATIOS+=("$RATIO")
  NGINX_RATIOS+=("$NGINX_RATIO")
  GRAB_ROWS+="| $round | **$GRAB_RPS** | $(pct "$work/grab.txt" 50) / $(pct "$work/grab.txt" 99) ms | $GRAB_NON2XX of $(total "$work/grab.txt") | worker $GRAB_W %, redis $GRAB_R % | **$CEILING_RPS** (p50 $CEILING_P50 ms; redis $CEIL_R %) | **$RATIO** (>= 0.5: $(verdict "$RATIO" 0.5)) |"$'\n'
  SOLD_ROWS+="| $round | **$SOLD_RPS** | $(pct "$work/sold-out.txt" 50) / $(pct "$work/sold-out.txt" 99) ms | $SOLD_NON2XX of $(total "$work/sold-out.txt") | worker $SOLD_W % | **${MULTIPLE}x** (>= 5: $(verdict "$MULTIPLE" 5)) | $GRAB_PER_CPU / $SOLD_PER_CPU ($(ratio "$SOLD_PER_CPU" "$GRAB_PER_CPU" "%.1f")x) |"$'\n'
  NGINX_ROWS+="| $round | **$SOLD_RPS** (worker $SOLD_W %) | **$NGINX_RPS** ($(pct "$work/nginx.txt" 50) / $(pct "$work/nginx.txt" 99) ms; $NGINX_NON2XX of $(total "$work/nginx.txt") answered 410; nginx $NGINX_CPU %) | **$NGINX_RATIO** (>= 0.8: $(verdict "$NGINX_RATIO" 0.8)) | $SOLD_PER_CPU / $NGINX_PER_CPU (**$(ratio "$SOLD_PER_CPU" "$NGINX_PER_CPU" "%.2f")**) |"$'\n'
done
GRANTED=$(redis-cli -p "$REDIS_PORT" XLEN "$HTTP_EVENTS_KEY")
MET=$(printf '%s\n' "${MULTIPLES[@]}" | awk '$1 >= 5 { n++ } END { print n + 0 }')
HTTP_MET=$(printf '%s\n' "${HTTP_RATIOS[@]}" | awk '$1 >= 0.5 { n++ } END { print n + 0 }')
NGINX_MET=$(printf '%s\n' "${NGINX_RATIOS[@]}" | awk '$1 >= 0.8 { n++ } END { print n + 0 }')

cat >"$work/section.md" <<EOF
<!-- bench:command:start (written by scripts/bench.sh; do not edit by hand) -->
## Command path (grab)

Run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -m), $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
load average before the run: $LOADAVG. CPU placement: $PLACEMENT.
Redis: a private \`redis-server\` $(redis-server --version | awk '{print $3}' | tr -d 'v='), AOF on, \`appendfsync everysec\`.
$ROUNDS rounds; each round runs the four measures one after the other, and every ratio
compares figures of the same round. wrk: $THREADS thread, $CONNECTIONS connections, $DURATION s per run.
CPU columns: percent of one core the process used during that run (from /proc).

**Grabs and the Redis ceiling** (HTTP / ceiling >= 0.5 met in $HTTP_MET of $ROUNDS rounds)

| round | HTTP grabs/s | p50 / p99 | not 200 | CPU during grabs | ceiling: grab script by EVALSHA/s | HTTP / ceiling |
|---|---|---|---|---|---|---|
${GRAB_ROWS}
**Sold-out rejections** (>= 5x the grab rate of the same round met in $MET of $ROUNDS rounds)

| round | rejections/s (410 from memory) | p50 / p99 | answers 410 | CPU | rejections / grabs | per worker CPU-second: grabs / rejections |
|---|---|---|---|---|---|---|
${SOLD_ROWS}
**Sold-out rejections beside nginx answering a static 410** (the same JSON body, \`return 410\` in a
generated minimal nginx.conf, 2 worker processes on the worker's CPU, the same wrk command and
connections; worker / nginx >= 0.8 met in $NGINX_MET of $ROUNDS rounds)

| round | worker rejections/s | nginx static 410/s | worker / nginx | per CPU-second: worker / nginx |
|---|---|---|---|---|
${NGINX_ROWS}
Entries in the \`bench/http\` stream after the run (PromotionStarted plus one CouponGrabbed per 200, warm-up included): $GRANTED.

Commands (ports are picked free at each run; the grab label is grab1, grab2, ... per round):

\`\`\`
${WRK_GRAB[*]}
${CEILING[*]}
${WRK_SOLD_OUT[*]}
${WRK_NGINX[*]}
\`\`\`
<!-- bench:command:end -->
EOF

if [ "${BENCH_NO_DOC:-0}" != 1 ]; then
  doc=docs/BENCHMARKS.md
  mkdir -p docs
  [ -f "$doc" ] || printf '# Benchmarks\n\nMeasured by `make bench` (scripts/bench.sh) on the machine it runs on; numbers from one run.\n\n' >"$doc"
  python3 scripts/write-doc-section.py command "$doc" "$work/section.md"
  echo "bench: wrote the command-path section of $doc"
fi
cat "$work/section.md"
