#!/usr/bin/env bash
# Benchmark of the command path (`make bench`), on this machine, loopback only.
# Each round measures, one after the other, on one Redis:
#   1. the yardstick: ../shared/bench/ref-grab.lua (see its README; never
#      edited) by EVALSHA through redis-benchmark, 64 connections, unpipelined,
#      a random customer per call;
#   2. HTTP grabs/s through one `seckill-worker command` (wrk, 64 connections,
#      distinct customers; group commit on, --grab-batch-max default), with
#      Redis CPU per granted grab from INFO commandstats (FCALL usec / grants),
#      worker CPU per grab (from /proc), p50/p99, and the mean batch size
#      (the worker's seckill_grab_batch_size histogram);
#   3. right after it, the same through a second worker with
#      --durable-replicas 1 (a replica of the same Redis attached):
#      durable / plain; then 2 again with wrk beside the worker;
#   4. the same through `seckill up` (every role in one process);
#   5. our grab function unbatched (one customer per FCALL) by redis-benchmark,
#      for its Redis CPU per call beside the batched one;
#   6. sold-out rejections/s through the worker (holders' set loaded), and the
#      yardstick of that path: nginx answering a static 410 with the same JSON
#      body (2 worker processes, a minimal nginx.conf generated in the temp
#      dir), same wrk command and connections, same CPU placement.
# Every ratio compares figures of the same round. Each measurement starts
# once `seckill up`'s projector has applied every event so far (settle), with
# the customers hashes empty (fresh_customers), and `seckill up` is paused
# while anything but itself is measured (quiet).
#
# CPU placement (a 2-core machine; see docs/BENCHMARKS.md): processes are pinned
# with taskset, identically in every run: the servers measured (worker, durable
# worker, seckill up, nginx) on BENCH_WORKER_CPU (default 1; each idle while
# another is measured), wrk and redis-server (and its replica) on
# BENCH_CLIENT_CPU (default 0), and redis-benchmark on the worker's CPU (the
# worker is idle then), so the yardstick has the same client-core / Redis-core
# split.
#
# Writes the numbers and the exact commands into the command-path section of
# docs/BENCHMARKS.md (between its bench:command markers).
#
# Env: BENCH_ROUNDS (default 1), BENCH_DURATION (seconds per wrk run, default 10),
# BENCH_CEILING_REQUESTS (redis-benchmark requests, default 300000),
# BENCH_REF_GRAB (default ../shared/bench/ref-grab.lua, relative to this
# checkout's root), BENCH_WORKER_CPU / BENCH_CLIENT_CPU (CPU numbers),
# BENCH_PIN=0 (no pinning), BENCH_NO_DOC=1 to leave the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${BENCH_ROUNDS:-1}"
DURATION="${BENCH_DURATION:-10}"
CEILING_REQUESTS="${BENCH_CEILING_REQUESTS:-300000}"
WORKER_CPU="${BENCH_WORKER_CPU:-1}"
CLIENT_CPU="${BENCH_CLIENT_CPU:-0}"
REF_GRAB="${BENCH_REF_GRAB:-../shared/bench/ref-grab.lua}"
COUPONS=10000000
# wrk runs on one CPU, so one wrk thread (a second would only time-share it).
THREADS=1
CONNECTIONS=64

for tool in wrk redis-benchmark redis-server redis-cli curl python3 nginx; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (make bench installs it)" >&2; exit 2; }
done
[ -f "$REF_GRAB" ] || { echo "bench: no yardstick at $REF_GRAB (../shared/bench/ref-grab.lua; set BENCH_REF_GRAB)" >&2; exit 2; }
if [ "${BENCH_PIN:-1}" = 1 ] && command -v taskset >/dev/null; then
  ON_WORKER_CPU=(taskset -c "$WORKER_CPU")
  ON_CLIENT_CPU=(taskset -c "$CLIENT_CPU")
  PLACEMENT="servers measured (worker, durable worker, seckill up, nginx with 2 workers) and redis-benchmark on CPU $WORKER_CPU; wrk and redis-server (and its replica) on CPU $CLIENT_CPU"
else
  ON_WORKER_CPU=()
  ON_CLIENT_CPU=()
  PLACEMENT="not pinned (BENCH_PIN=0 or no taskset): every process may use every core"
fi

echo "bench: building release binaries"
cargo build -q --release -p seckill-workers --bin seckill-worker --example bench_setup
cargo build -q --release -p seckill-cli --bin seckill
WORKER=target/release/seckill-worker
UP=target/release/seckill
SETUP=target/release/examples/bench_setup

source scripts/lib/scratch.sh
source scripts/lib/nginx.sh
scratch seckill-bench

REDIS_PORT=$(free_port)
REPLICA_PORT=$(free_port)
HTTP_PORT=$(free_port)
DURABLE_PORT=$(free_port)
UP_PORT=$(free_port)
NGINX_PORT=$(free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
BASE="http://127.0.0.1:$HTTP_PORT"

mkdir -p "$work/replica"
# AOF on as in production, but no automatic rewrite: a run appends a few
# hundred MB, so Redis' own trigger (the AOF doubled past 64 MB) fired in the
# middle of a measure about once a round, and its forked child, pinned to
# Redis' CPU with wrk, took CPU from wrk (the sold-out rounds where the
# worker idled at 67-70 % of its core). `settle` rewrites it between
# measures instead (`compact_aof`), and `measured` warns of any fork.
"${ON_CLIENT_CPU[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
  --appendfsync everysec --auto-aof-rewrite-percentage 0 --dir "$work" --logfile "$work/redis.log" --daemonize no &
REDIS_PID=$!
pids+=("$REDIS_PID")
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
"${ON_CLIENT_CPU[@]}" redis-server --port "$REPLICA_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --replicaof 127.0.0.1 "$REDIS_PORT" --dir "$work/replica" --logfile "$work/replica.log" --daemonize no &
pids+=($!)

RUST_LOG=warn "${ON_WORKER_CPU[@]}" "$WORKER" command --listen "127.0.0.1:$HTTP_PORT" \
  --redis-url "$REDIS_URL" --no-query 2>"$work/worker.log" &
WORKER_PID=$!
pids+=("$WORKER_PID")
RUST_LOG=warn "${ON_WORKER_CPU[@]}" "$WORKER" command --listen "127.0.0.1:$DURABLE_PORT" \
  --redis-url "$REDIS_URL" --no-query --durable-replicas 1 2>"$work/durable.log" &
DURABLE_PID=$!
pids+=("$DURABLE_PID")
RUST_LOG=warn "${ON_WORKER_CPU[@]}" "$UP" up --listen "127.0.0.1:$UP_PORT" \
  --redis-url "$REDIS_URL" 2>"$work/up.log" >/dev/null &
UP_PID=$!
pids+=("$UP_PID")
await_ready "$BASE" "$work/worker.log"
await_ready "http://127.0.0.1:$DURABLE_PORT" "$work/durable.log"
await_ready "http://127.0.0.1:$UP_PORT" "$work/up.log"
# A field of Redis' INFO (e.g. total_forks, aof_current_size).
redis_info() {
  local v
  v=$(redis-cli -p "$REDIS_PORT" INFO | tr -d '\r' | awk -F: -v f="$1" '$1 == f { print $2 }' | head -1)
  echo "${v:-0}"
}
for _ in $(seq 200); do
  [ "$(redis_info connected_slaves)" = 1 ] && break
  sleep 0.05
done

# Promotions, the grab function's FCALL arguments and the stream keys, from
# the protocol module.
mapfile -t SETUP_OUT < <("$SETUP" "$REDIS_URL" "$COUPONS")
read -r -a FCALL_ARGS <<<"${SETUP_OUT[0]}"
HTTP_EVENTS_KEY="${SETUP_OUT[1]}"
DURABLE_EVENTS_KEY="${SETUP_OUT[2]}"
UP_EVENTS_KEY="${SETUP_OUT[3]}"
# `HGET <state> granted` of each: a stream entry holds a grab call's whole
# batch, so grants are counted from the promotion's state, not XLEN.
HTTP_GRANTED="${SETUP_OUT[4]}"
DURABLE_GRANTED="${SETUP_OUT[5]}"
UP_GRANTED="${SETUP_OUT[6]}"
# The customers hashes of the measured promotions, and the yardstick's.
read -r -a CUSTOMER_HASHES <<<"${SETUP_OUT[7]}"
CUSTOMER_HASHES+=('{ref}:cust')

REF_SHA=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$(cat "$REF_GRAB")")
redis-cli -p "$REDIS_PORT" HSET '{ref}:meta' state active stock 1000000000 >/dev/null

GRAB_URL="$BASE/api/v1/promotions/bench/http/grab"
DURABLE_URL="http://127.0.0.1:$DURABLE_PORT/api/v1/promotions/bench/durable/grab"
UP_URL="http://127.0.0.1:$UP_PORT/api/v1/promotions/bench/up/grab"
SOLD_OUT_URL="$BASE/api/v1/promotions/bench/sold-out/grab"
# (Positional arguments after -- go to bench/grab.lua: a label keeping customer ids distinct per run.)
# WRK_ON (default: the client CPU, beside Redis) says where wrk runs.
wrk_grab() { # url label
  local on=("${ON_CLIENT_CPU[@]}")
  [ "${WRK_ON:-client}" = worker ] && on=("${ON_WORKER_CPU[@]}")
  WRK=("${on[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency
    -s bench/grab.lua "$1" -- "$2")
}
YARDSTICK=("${ON_WORKER_CPU[@]}" redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNECTIONS" -P 1
  -n "$CEILING_REQUESTS" -r 1000000000 -q EVALSHA "$REF_SHA" 3 '{ref}:meta' '{ref}:cust' '{ref}:events' __rand_int__)
UNBATCHED=("${ON_WORKER_CPU[@]}" redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNECTIONS" -P 1
  -n "$CEILING_REQUESTS" -r 1000000000 -q FCALL "${FCALL_ARGS[@]}" "c-__rand_int__")
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
nginx_static_410 "$work/nginx" "$NGINX_PORT" "$SOLD_OUT_BODY" || exit 1
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
# Rewrites the AOF (BGREWRITEAOF) once it is past 64 MB, Redis' own
# threshold, and waits for the rewrite to end: between measures, never
# during one (automatic rewrites are off, see where Redis starts).
compact_aof() {
  local i
  [ "$(redis_info aof_current_size)" -gt $((64 * 1024 * 1024)) ] || return 0
  redis-cli -p "$REDIS_PORT" BGREWRITEAOF >/dev/null
  for i in $(seq 1200); do
    if [ "$(redis_info aof_rewrite_in_progress)" = 0 ] && [ "$(redis_info aof_rewrite_scheduled)" = 0 ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "bench: the AOF rewrite did not end within 120 s; measuring anyway" >&2
}
# One `INFO commandstats` figure: calls or usec of a command (0 when never called).
cmdstat() { # command field
  local v
  v=$(redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' |
    awk -F'[:,=]' -v c="cmdstat_$1" -v f="$2" '$1 == c { for (i = 2; i < NF; i += 2) if ($i == f) print $(i + 1) }' | head -1)
  echo "${v:-0}"
}
# How many coupons a promotion has granted: $1 is its `HGET <state> granted`.
granted() { local v; v=$(redis-cli -p "$REDIS_PORT" $1 | tr -d '\r'); echo "${v:-0}"; }
# A metric of a server's /metrics (the sum of the lines of that name).
metric() { curl -fs "$1/metrics" | awk -v m="$2" '$1 == m { s += $2 } END { printf "%.0f", s }'; }
# Runs "$@" (one load run) with its output into file $1 while server $2 (a
# pid) is measured: sets S_CPU_S (its CPU seconds, children included),
# R_CPU_S (Redis'), L_CPU_S (the load generator's, "$@" itself) and DT
# (wall seconds).
measured() {
  local out=$1 server=$2; shift 2
  local s0 r0 t0 l0 l1 f0 f1
  f0=$(redis_info total_forks)
  s0=$(cpu_secs "$server"); r0=$(cpu_secs "$REDIS_PID"); t0=$(now)
  children_cpu_into l0
  "$@" >"$out" 2>&1
  children_cpu_into l1
  f1=$(redis_info total_forks)
  if [ "$f1" != "$f0" ]; then
    echo "bench: warning: Redis forked during this measure ($*): its child shared wrk's CPU" >&2
  fi
  L_CPU_S=$(awk -v a="$l0" -v b="$l1" 'BEGIN { print b - a }')
  DT=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
  S_CPU_S=$(awk -v a="$s0" -v b="$(cpu_secs "$server")" 'BEGIN { print b - a }')
  R_CPU_S=$(awk -v a="$r0" -v b="$(cpu_secs "$REDIS_PID")" 'BEGIN { print b - a }')
}
# CPU seconds (user + system) of this shell's finished children so far
# (bash's `times`, second line: "0m1.234s 0m0.567s"). `times` runs in this
# shell, not in a $(...) subshell, whose own children would start from 0.
children_cpu_into() { # variable
  times >"$work/times.txt"
  printf -v "$1" '%s' "$(tail -1 "$work/times.txt" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub(/s$/, "", p[2]); t += p[1] * 60 + p[2] } print t }')"
}
pct_of() { awk -v c="$1" -v t="$DT" 'BEGIN { printf "%.0f", (t > 0) ? c / t * 100 : 0 }'; }

# wrk prints e.g. "Requests/sec:  23456.78" and "     50%  2.10ms"; normalise latencies to ms.
rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
pct() {
  awk -v p="$2%" '$1 == p {
    v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    if (u == "us") v = v / 1000; else if (u == "s") v = v * 1000; else if (u == "m") v = v * 60000;
    printf "%.2f", v }' "$1"
}
non2xx() { local n; n=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$1"); echo "${n:-0}"; }
total() { awk '/requests in/ {print $1}' "$1"; }
ratio() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { printf f, (b > 0) ? a / b : 0 }'; }
# met / NOT met: value $1 at least $2, or at most $2 when $3 is "le". Ratios
# are given to three decimals so that a value rounded up to the limit (0.798
# shown as 0.80) is not counted as met.
verdict() { awk -v v="$1" -v t="$2" -v le="${3:-}" 'BEGIN { if (le == "le") print (v <= t) ? "met" : "NOT met"; else print (v >= t) ? "met" : "NOT met" }'; }
bench_rate() { tr '\r' '\n' <"$1" | grep -o '[0-9.]* requests per second' | tail -1 | awk '{print $1}'; }

# One HTTP grab run against server URL $1 (pid $2, base URL $3, its
# promotion's `HGET <state> granted` $4, customer label $5). Sets G_RPS G_P50 G_P99 G_NON2XX G_TOTAL G_GRANTS,
# G_REDIS_US (FCALL usec per grant), G_SERVER_US (server CPU per request),
# G_BATCH (mean batch size), G_SERVER_PCT and G_REDIS_PCT.
http_run() {
  local url=$1 pid=$2 base=$3 count=$4 label=$5
  local u0 x0 bs0 bc0 u1 x1 bs1 bc1
  wrk_grab "$url" "$label"
  echo "bench: ${WRK[*]}"
  u0=$(cmdstat fcall usec); x0=$(granted "$count")
  bs0=$(metric "$base" seckill_grab_batch_size_sum); bc0=$(metric "$base" seckill_grab_batch_size_count)
  measured "$work/run.txt" "$pid" "${WRK[@]}"
  cat "$work/run.txt"
  u1=$(cmdstat fcall usec); x1=$(granted "$count")
  bs1=$(metric "$base" seckill_grab_batch_size_sum); bc1=$(metric "$base" seckill_grab_batch_size_count)
  G_RPS=$(rps "$work/run.txt"); G_P50=$(pct "$work/run.txt" 50); G_P99=$(pct "$work/run.txt" 99)
  G_NON2XX=$(non2xx "$work/run.txt"); G_TOTAL=$(total "$work/run.txt")
  G_GRANTS=$((x1 - x0))
  G_REDIS_US=$(awk -v u="$((u1 - u0))" -v g="$G_GRANTS" 'BEGIN { printf "%.2f", (g > 0) ? u / g : 0 }')
  G_SERVER_US=$(awk -v c="$S_CPU_S" -v n="$G_TOTAL" 'BEGIN { printf "%.2f", (n > 0) ? c / n * 1e6 : 0 }')
  G_BATCH=$(awk -v s="$((bs1 - bs0))" -v c="$((bc1 - bc0))" 'BEGIN { printf "%.1f", (c > 0) ? s / c : 0 }')
  G_SERVER_PCT=$(pct_of "$S_CPU_S"); G_REDIS_PCT=$(pct_of "$R_CPU_S"); G_WRK_PCT=$(pct_of "$L_CPU_S")
  G_WRK_US=$(awk -v c="$L_CPU_S" -v n="$G_TOTAL" 'BEGIN { printf "%.1f", (n > 0) ? c / n * 1e6 : 0 }')
}

# One row of a one-worker table: round, the yardstick cell ($1), then the
# figures of the http_run just done, each with its verdict.
worker_row() {
  local HTTP_RATIO
  HTTP_RATIO=$(ratio "$G_RPS" "$YARD_RPS" "%.3f")
  echo "| $round | $1 | **$G_RPS** | **$HTTP_RATIO** (>= 1.0: $(verdict "$HTTP_RATIO" 1.0)) | **$G_REDIS_US** µs (<= 8: $(verdict "$G_REDIS_US" 8 le)) | **$G_SERVER_US** µs (<= 15: $(verdict "$G_SERVER_US" 15 le)) | $G_P50 / **$G_P99** ms (p99 <= 5: $(verdict "$G_P99" 5 le)) | **$G_BATCH** | $G_NON2XX of $G_TOTAL | worker $G_SERVER_PCT %, wrk $G_WRK_PCT % ($G_WRK_US µs per request), redis $G_REDIS_PCT % |"
}

# Whether `seckill up`'s projector has applied every event appended so far:
# each bench stream's projector group has delivered its last entry and has
# nothing pending. (A stream without the group yet is not being projected.)
caught_up() {
  local key last
  for key in "$HTTP_EVENTS_KEY" "$DURABLE_EVENTS_KEY" "$UP_EVENTS_KEY"; do
    last=$(redis-cli -p "$REDIS_PORT" XREVRANGE "$key" + - COUNT 1 | head -1 | tr -d '\r')
    [ -n "$last" ] || continue
    redis-cli -p "$REDIS_PORT" XINFO GROUPS "$key" | tr -d '\r' | awk -v last="$last" '
      prev == "pending" && $0 != "0" { busy = 1 }
      prev == "last-delivered-id" && $0 != last { busy = 1 }
      { prev = $0 } END { exit busy }' || return 1
  done
}
# Waits until it has: the projector of `seckill up` runs on the servers' CPU
# and writes to Redis, so a backlog left by the grab runs would be projected
# during the next measurement (the worker got 67-69 % of its core in the
# sold-out rounds of a run that did not wait).
settle() {
  local i
  kill -CONT "$UP_PID"
  for i in $(seq 1200); do
    caught_up && break
    sleep 0.1
  done
  caught_up || echo "bench: seckill up's projector did not catch up within 120 s; measuring anyway" >&2
  compact_aof
}
# Empties the customers hashes (DEL, before a measure, never during one),
# so that every measure grows its hash from nothing, as a sale does. Left to
# grow, a hash reached millions of customers by round 3, and Redis' dict
# doubles (2^19 -> 2^20 ... -> 2^22 buckets, each rehashed during the
# measure that crossed it) fell in some rounds' measures and not others':
# the plain worker's Redis µs per grant was highest in round 2 (the 2M ->
# 4M doubling) and lowest in round 3 (none) in each of three runs, and its
# round-3 rate the highest. Every measure now crosses the same doublings.
# The replica frees them too, in its main thread: WAIT until it has, or it
# would do so during the measure (the durable grabs' p99 was 74-107 ms in
# the first run that emptied them without waiting).
# (WAIT counts from its own connection's last write, so DEL and WAIT go on
# one connection.)
fresh_customers() {
  local acked
  acked=$(printf 'DEL %s\nWAIT 1 30000\n' "${CUSTOMER_HASHES[*]}" | redis-cli -p "$REDIS_PORT" | tail -1 | tr -d '\r')
  [ "$acked" = 1 ] ||
    echo "bench: the replica did not apply the DEL within 30 s; measuring anyway" >&2
}
# Settles, then pauses `seckill up` (SIGSTOP) for a measure of something
# else: its projector would otherwise project the measured worker's grabs
# as they come, on both cores (about 4.7 µs of Redis per event, and its own
# CPU beside the worker's), a cost the yardstick does not pay. The read
# side's cost at the grab peak is measured by scripts/bench-read-side.sh.
quiet() {
  settle
  fresh_customers
  kill -STOP "$UP_PID"
}

# One redis-benchmark run ("$@", output into file $2) measured on Redis:
# sets B_RPS (its rate) and B_US (the usec per call of command $1 in
# INFO commandstats during the run).
redis_run() {
  local cmd=$1 out=$2 u0 c0 u1 c1
  shift 2
  u0=$(cmdstat "$cmd" usec); c0=$(cmdstat "$cmd" calls)
  measured "$out" "$REDIS_PID" "$@"
  u1=$(cmdstat "$cmd" usec); c1=$(cmdstat "$cmd" calls)
  B_RPS=$(bench_rate "$out")
  B_US=$(awk -v u="$((u1 - u0))" -v c="$((c1 - c0))" 'BEGIN { printf "%.1f", (c > 0) ? u / c : 0 }')
}

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench: CPU placement: $PLACEMENT"
echo "bench: warm-up (2 s each server)"
for url in "$GRAB_URL" "$DURABLE_URL" "$UP_URL"; do
  "${ON_CLIENT_CPU[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s bench/grab.lua "$url" -- warmup >/dev/null
done
# The sold-out path with its holders' set loaded (the first grabs after the
# worker learns of the sale go to Redis while it loads).
"${ON_CLIENT_CPU[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s bench/sold-out.lua "$SOLD_OUT_URL" >/dev/null

ROWS=""
ALONE_ROWS=""
DURABLE_ROWS=""
UP_ROWS=""
SOLD_ROWS=""
for round in $(seq "$ROUNDS"); do
  quiet
  echo "bench: round $round/$ROUNDS: yardstick: ${YARDSTICK[*]}"
  redis_run evalsha "$work/yardstick.txt" "${YARDSTICK[@]}"
  YARD_RPS=$B_RPS; YARD_US=$B_US
  echo "bench: yardstick $YARD_RPS/s, $YARD_US us of Redis per call"

  quiet
  http_run "$GRAB_URL" "$WORKER_PID" "$BASE" "$HTTP_GRANTED" "grab$round"
  PLAIN_RPS=$G_RPS
  ROWS+="$(worker_row "**$YARD_RPS** ($YARD_US µs Redis/call)")"$'\n'

  # Right after the plain worker, so that the ratio spans as little of
  # the machine's drift as possible.
  quiet
  http_run "$DURABLE_URL" "$DURABLE_PID" "http://127.0.0.1:$DURABLE_PORT" "$DURABLE_GRANTED" "durable$round"
  D_RATIO=$(ratio "$G_RPS" "$PLAIN_RPS" "%.3f")
  DURABLE_ROWS+="| $round | **$G_RPS** | **$PLAIN_RPS** | **$D_RATIO** (>= 0.8: $(verdict "$D_RATIO" 0.8)) | $G_P50 / $G_P99 ms | **$G_BATCH** | $G_REDIS_US µs | $G_NON2XX of $G_TOTAL |"$'\n'

  # The same worker with Redis alone on its core, as in the yardstick's
  # run (where redis-benchmark is on the other core): wrk beside the worker.
  quiet
  WRK_ON=worker http_run "$GRAB_URL" "$WORKER_PID" "$BASE" "$HTTP_GRANTED" "alone$round"
  ALONE_ROWS+="$(worker_row "**$YARD_RPS**")"$'\n'

  settle
  fresh_customers
  http_run "$UP_URL" "$UP_PID" "http://127.0.0.1:$UP_PORT" "$UP_GRANTED" "up$round"
  U_RATIO=$(ratio "$G_RPS" "$YARD_RPS" "%.3f")
  UP_ROWS+="| $round | **$G_RPS** | **$YARD_RPS** | **$U_RATIO** (>= 0.8: $(verdict "$U_RATIO" 0.8)) | $G_P50 / $G_P99 ms | **$G_BATCH** | $G_REDIS_US µs | $G_SERVER_US µs (every role) | $G_NON2XX of $G_TOTAL |"$'\n'

  quiet
  echo "bench: round $round/$ROUNDS: our grab function unbatched: ${UNBATCHED[*]}"
  redis_run fcall "$work/unbatched.txt" "${UNBATCHED[@]}"
  UNB_RPS=$B_RPS; UNB_US=$B_US

  quiet
  echo "bench: round $round/$ROUNDS: sold-out rejections: ${WRK_SOLD_OUT[*]}"
  measured "$work/sold-out.txt" "$WORKER_PID" "${WRK_SOLD_OUT[@]}"
  cat "$work/sold-out.txt"
  SOLD_CPU=$(pct_of "$S_CPU_S")
  quiet
  echo "bench: round $round/$ROUNDS: nginx static 410: ${WRK_NGINX[*]}"
  measured "$work/nginx.txt" "$NGINX_PID" "${WRK_NGINX[@]}"
  cat "$work/nginx.txt"
  NGINX_CPU=$(pct_of "$S_CPU_S")
  SOLD_RPS=$(rps "$work/sold-out.txt"); NGINX_RPS=$(rps "$work/nginx.txt")
  NGINX_RATIO=$(ratio "$SOLD_RPS" "$NGINX_RPS" "%.3f")
  SOLD_ROWS+="| $round | **$SOLD_RPS** ($(pct "$work/sold-out.txt" 50) / $(pct "$work/sold-out.txt" 99) ms; $(non2xx "$work/sold-out.txt") of $(total "$work/sold-out.txt") answered 410; worker $SOLD_CPU %) | **$NGINX_RPS** ($(pct "$work/nginx.txt" 50) / $(pct "$work/nginx.txt" 99) ms; nginx $NGINX_CPU %) | **$NGINX_RATIO** (>= 0.8: $(verdict "$NGINX_RATIO" 0.8)) | $UNB_RPS/s, $UNB_US µs Redis/call |"$'\n'
done
settle
LOADAFTER=$(cut -d' ' -f1-3 /proc/loadavg)
COMMANDS="${YARDSTICK[*]}"
for pair in "$GRAB_URL grab1" "$DURABLE_URL durable1" "$UP_URL up1"; do
  # shellcheck disable=SC2086
  wrk_grab $pair
  COMMANDS+=$'\n'"${WRK[*]}"
done
COMMANDS+=$'\n'"${UNBATCHED[*]}"$'\n'"${WRK_SOLD_OUT[*]}"$'\n'"${WRK_NGINX[*]}"

cat >"$work/section.md" <<SECTION
<!-- bench:command:start (written by scripts/bench.sh; do not edit by hand) -->
## Command path (grab)

Run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -m), $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
load average before the run: $LOADAVG; after: $LOADAFTER. CPU placement: $PLACEMENT.
Redis: a private \`redis-server\` $(redis-server --version | awk '{print $3}' | tr -d 'v='), AOF on, \`appendfsync everysec\` (rewritten between measures once past 64 MB, never during one), one replica attached
(for the durable worker). $ROUNDS round(s); each runs the measures one after the other and every ratio compares
figures of the same round; each measure starts once the projector of \`seckill up\` has applied every event
so far, and \`seckill up\` is paused (SIGSTOP) while anything but itself is measured, so that its projector
does not project the measured worker's grabs on the same cores (the yardstick's stream has no projector;
the read side's cost at the grab peak is scripts/bench-read-side.sh's). wrk: $THREADS thread, $CONNECTIONS connections, $DURATION s per run. Servers keep
their defaults (\`--grab-batch-max\` 64).

Columns: the **yardstick** is \`ref-grab.lua\` (../shared/bench) by EVALSHA through redis-benchmark, unbatched;
**Redis µs per grant** is the FCALL usec of \`INFO commandstats\` during the run divided by the grants (stream
entries added); **worker µs per grab** is the server's CPU time (from /proc) divided by the requests;
**mean batch** is the server's \`seckill_grab_batch_size\` sum / count during the run.

**One \`seckill-worker command\` beside the yardstick**

| round | yardstick/s | HTTP grabs/s | HTTP / yardstick | Redis µs per grant | worker µs per grab | p50 / p99 | mean batch | not 200 | CPU |
|---|---|---|---|---|---|---|---|---|---|
${ROWS}
**The same worker with Redis alone on its core**: wrk on the worker's CPU (taskset -c $WORKER_CPU) instead of
beside Redis, so that Redis has a core to itself as it has in the yardstick's run (where redis-benchmark is on
the other core); same yardstick figure as above.

| round | yardstick/s | HTTP grabs/s | HTTP / yardstick | Redis µs per grant | worker µs per grab | p50 / p99 | mean batch | not 200 | CPU |
|---|---|---|---|---|---|---|---|---|---|
${ALONE_ROWS}
**Durable grabs** (\`--durable-replicas 1\`: each grant answered once the replica holds it; the WAIT goes on a connection of its own once the batch's grab call returned, while the next batch is sent) **beside the plain worker** (measured right before it)

| round | durable grabs/s | plain grabs/s | durable / plain | p50 / p99 | mean batch | Redis µs per grant | not 200 |
|---|---|---|---|---|---|---|---|
${DURABLE_ROWS}
**\`seckill up\`** (operator, command, query and projector in one process, on the same Redis)

| round | HTTP grabs/s | yardstick/s | up / yardstick | p50 / p99 | mean batch | Redis µs per grant (FCALL only) | process µs per grab | not 200 |
|---|---|---|---|---|---|---|---|---|
${UP_ROWS}
**Sold-out rejections beside nginx answering a static 410** (the worker's holders' set loaded; the same
JSON body by \`return 410\` in a generated minimal nginx.conf, 2 nginx worker processes on the worker's CPU,
the same wrk command and connections). Last column: our grab function unbatched (one customer per FCALL)
by redis-benchmark, beside the batched Redis cost above.

| round | worker rejections/s | nginx static 410/s | worker / nginx | grab function unbatched |
|---|---|---|---|---|
${SOLD_ROWS}
Commands (ports are picked free at each run; the customer label is grab1, durable1, up1, ... per round):

\`\`\`
${COMMANDS}
\`\`\`
Servers: \`seckill-worker command --redis-url \$REDIS --no-query\`, the same with \`--durable-replicas 1\`,
and \`seckill up --redis-url \$REDIS\`.
<!-- bench:command:end -->
SECTION

if [ "${BENCH_NO_DOC:-0}" != 1 ]; then
  doc=docs/BENCHMARKS.md
  mkdir -p docs
  [ -f "$doc" ] || printf '# Benchmarks\n\nMeasured by `make bench` (scripts/bench.sh) on the machine it runs on; numbers from one run.\n\n' >"$doc"
  python3 scripts/write-doc-section.py command "$doc" "$work/section.md"
  echo "bench: wrote the command-path section of $doc"
fi
cat "$work/section.md"
