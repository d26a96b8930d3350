#!/usr/bin/env bash
# Benchmark of the read side (`make bench`), on this machine, loopback only:
#   1. projection throughput of READ_BENCH_EVENTS (default 1,000,000) CouponGrabbed events of
#      one stream, with one projector and with two sharing the consumer group, and the rebuild
#      (`projector --rebuild` code path), each against the raw XRANGE read of the same stream
#      in the same run (workers/examples/projection_bench.rs; it checks every read model it
#      produced, so a fast wrong projection cannot pass). The stream is written as the grab
#      function writes it, READ_BENCH_GRANTS_PER_ENTRY (default 32, about the mean batch of
#      scripts/bench.sh's grab run) grants per CouponGrabbed version 3 entry; then the same
#      events once more written as version 2, one entry per grant (the layout before), for the
#      comparison in the same run;
#   2. projection lag while the command-path load runs at full speed: `seckill-worker command`
#      under wrk (64 connections, distinct customers, bench/grab.lua) and one
#      `seckill-worker projector`; p99 of `projector_lag_seconds` (XADD to applied and
#      acknowledged) from its /metrics buckets, and the share of events applied within 250 ms;
#   3. Redis memory per granted coupon, every key included: INFO memory used_memory before and
#      after READ_BENCH_MEMORY_COUPONS (default 100,000) grants through `seckill-worker command`
#      (wrk until the promotion of exactly that many coupons is sold out), measured once the grabs
#      are in (customers hash + stream + state) and again once a `seckill-worker projector`
#      started afterwards applied every event (the read models), so the two parts are apart.
# Writes the numbers and the exact commands into docs/BENCHMARKS.md (between its
# bench:read-side markers). About 2-4 minutes once built.
#
# Env: READ_BENCH_EVENTS (events of the throughput run, default 1000000), READ_BENCH_DURATION
# (seconds of the wrk run, default 15), READ_BENCH_MEMORY_COUPONS (default 100000),
# BENCH_NO_DOC=1 to leave the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${READ_BENCH_EVENTS:-1000000}"
PER_ENTRY="${READ_BENCH_GRANTS_PER_ENTRY:-32}"
DURATION="${READ_BENCH_DURATION:-15}"
THREADS=2
CONNECTIONS=64
COUPONS=100000000
LAG_LIMIT=0.25
REBUILD_TARGET=100000
MEM_COUPONS="${READ_BENCH_MEMORY_COUPONS:-100000}"
MEM_LIMIT=300
PROJECT_CPU_LIMIT=4

for tool in wrk redis-server redis-cli curl python3; do
  command -v "$tool" >/dev/null || { echo "bench-read-side: $tool is missing (make bench installs it)" >&2; exit 2; }
done

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
UPTIME=$(uptime)
echo "bench-read-side: load before the run: $UPTIME"
echo "bench-read-side: building release binaries"
cargo build -q --release -p seckill-workers --bins --examples
WORKER=target/release/seckill-worker
PROJECTION_BENCH=target/release/examples/projection_bench
SETUP=target/release/examples/read_side_setup

source scripts/lib/scratch.sh
scratch seckill-bench-read


# A private redis-server like production's: AOF on, fsync every second, no RDB snapshots.
# Prints its pid; the caller records it.
start_redis() {
  local port=$1 dir=$2
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync everysec --dir "$dir" --logfile "$dir/redis.log" --daemonize no >/dev/null 2>&1 &
  echo $!
}
wait_redis() {
  for _ in $(seq 100); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "bench-read-side: redis-server on port $1 did not start" >&2; return 1
}

# --- 1. throughput -----------------------------------------------------------------------------
REDIS_PORT=$(free_port)
REDIS_PID=$(start_redis "$REDIS_PORT" "$work/redis-throughput")
pids+=("$REDIS_PID")
wait_redis "$REDIS_PORT"
THROUGHPUT=("$PROJECTION_BENCH" "redis://127.0.0.1:$REDIS_PORT/" "$EVENTS" "$PER_ENTRY")
echo "bench-read-side: throughput: ${THROUGHPUT[*]}"
started=$(date +%s)
"${THROUGHPUT[@]}" | tee "$work/throughput.json"
echo "bench-read-side: throughput run took $(( $(date +%s) - started )) s"
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true
# The same events as version 2 entries (one per grant), on a Redis of their own.
REDIS_PORT=$(free_port)
REDIS_PID=$(start_redis "$REDIS_PORT" "$work/redis-throughput-v2")
pids+=("$REDIS_PID")
wait_redis "$REDIS_PORT"
THROUGHPUT_V2=("$PROJECTION_BENCH" "redis://127.0.0.1:$REDIS_PORT/" "$EVENTS" 0)
echo "bench-read-side: throughput, version 2 entries: ${THROUGHPUT_V2[*]}"
"${THROUGHPUT_V2[@]}" | tee "$work/throughput-v2.json"
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true

# A private redis-server of its own for a part, with free ports for the workers beside it: sets
# REDIS_PORT, REDIS_URL, HTTP_PORT and METRICS_PORT.
fresh_redis() {
  REDIS_PORT=$(free_port)
  HTTP_PORT=$(free_port)
  METRICS_PORT=$(free_port)
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
  REDIS_PID=$(start_redis "$REDIS_PORT" "$work/$1")
  pids+=("$REDIS_PID")
  wait_redis "$REDIS_PORT"
}

# --- 2. lag under the command-path load ---------------------------------------------------------
fresh_redis redis-lag
PROMOTION=$("$SETUP" "$REDIS_URL" "$COUPONS")

# The command worker on $HTTP_PORT and the projector (consumer $1, metrics on
# $METRICS_PORT) of a part, on the Redis of fresh_redis: sets COMMAND,
# PROJECTOR, BASE (the command worker's), PROJECTOR_BASE and METRICS.
roles() {
  COMMAND=("$WORKER" command --listen "127.0.0.1:$HTTP_PORT" --redis-url "$REDIS_URL" --no-query)
  PROJECTOR=("$WORKER" projector --metrics-listen "127.0.0.1:$METRICS_PORT" --redis-url "$REDIS_URL"
    --consumer-name "$1")
  BASE="http://127.0.0.1:$HTTP_PORT"
  PROJECTOR_BASE="http://127.0.0.1:$METRICS_PORT"
  METRICS="$PROJECTOR_BASE/metrics"
}
# Starts "$@" (COMMAND or PROJECTOR) with its log in $work/LOG and waits
# until URL is ready. start LOG URL COMMAND...
start() {
  local log=$work/$1 url=$2; shift 2
  RUST_LOG=warn "$@" 2>"$log" &
  pids+=($!)
  await_ready "$url" "$log"
}
roles bench-lag
start command.log "$BASE" "${COMMAND[@]}"
start projector.log "$PROJECTOR_BASE" "${PROJECTOR[@]}"

GRAB_URL="$BASE/api/v1/promotions/$PROMOTION/grab"
WRK_GRAB=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s bench/grab.lua "$GRAB_URL" -- lag)
echo "bench-read-side: lag under load: ${WRK_GRAB[*]}"
"${WRK_GRAB[@]}" | tee "$work/grab.txt"

# Every granted grab is one CouponGrabbed, plus the PromotionStarted: wait (at most 20 s) until
# the projector applied them all, so the histogram holds every event of the run.
GRABS=$(awk '/requests in/ {print $1}' "$work/grab.txt")
NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$work/grab.txt"); NON2XX=${NON2XX:-0}
EXPECTED=$(( GRABS - NON2XX + 1 ))
applied_now() {
  curl -fs "$METRICS" | awk '/^seckill_projector_events_applied_total/ {s += $NF} END {printf "%d", s}'
}
for _ in $(seq 200); do
  [ "$(applied_now)" -ge "$EXPECTED" ] && break
  sleep 0.1
done
curl -fs "$METRICS" >"$work/metrics.txt"
APPLIED=$(applied_now)

# Part 2's processes stop here: part 3 starts from a Redis of its own.
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
pids=()
LAG_METRICS_PORT=$METRICS_PORT
LAG_REDIS_URL=$REDIS_URL
LAG_COMMAND=("${COMMAND[@]}")
LAG_PROJECTOR=("${PROJECTOR[@]}")

# --- 3. memory per granted coupon ----------------------------------------------------------------
fresh_redis redis-memory
MEM_PROMOTION=$("$SETUP" "$REDIS_URL" "$MEM_COUPONS")
roles bench-memory
MEM_COMMAND=("${COMMAND[@]}")
MEM_PROJECTOR=("${PROJECTOR[@]}")
MEM_METRICS=$METRICS
start memory-command.log "$BASE" "${MEM_COMMAND[@]}"
used_memory() { redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
MEM_BEFORE=$(used_memory)
MEM_GRAB_URL="$BASE/api/v1/promotions/$MEM_PROMOTION/grab"
# Grabs by new customers until the promotion is sold out (a new customer is told 410).
sold_out() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    -d "{\"customerId\":\"probe-$1\"}" "$MEM_GRAB_URL")" = 410 ]
}
MEM_WRK=(wrk -t"$THREADS" -c"$CONNECTIONS" -d5s -s bench/grab.lua "$MEM_GRAB_URL" -- "m<round>")
echo "bench-read-side: memory: ${MEM_WRK[*]} until sold out"
round=0
until sold_out "$round"; do
  round=$((round + 1))
  [ "$round" -le 20 ] || { echo "bench-read-side: $MEM_PROMOTION did not sell out" >&2; exit 1; }
  wrk -t"$THREADS" -c"$CONNECTIONS" -d5s -s bench/grab.lua "$MEM_GRAB_URL" -- "m$round" >/dev/null
done
MEM_GRABBED=$(used_memory)
start memory-projector.log "$PROJECTOR_BASE" "${MEM_PROJECTOR[@]}"
MEM_EXPECTED=$((MEM_COUPONS + 2))  # PromotionStarted, the grants, PromotionFinished{SoldOut}
mem_applied() {
  curl -fs "$MEM_METRICS" 2>/dev/null | awk '/^seckill_projector_events_applied_total/ {s += $NF} END {printf "%d", s}'
}
for _ in $(seq 600); do
  [ "$(mem_applied)" -ge "$MEM_EXPECTED" ] && break
  sleep 0.1
done
MEM_APPLIED=$(mem_applied)
[ "$MEM_APPLIED" -ge "$MEM_EXPECTED" ] || { echo "bench-read-side: the projector applied $MEM_APPLIED of $MEM_EXPECTED events" >&2; exit 1; }
MEM_AFTER=$(used_memory)
MEM_KEYS="$(redis-cli -p "$REDIS_PORT" -n 0 dbsize | tr -d '\r') / $(redis-cli -p "$REDIS_PORT" -n 1 dbsize | tr -d '\r')"

python3 - "$work/throughput.json" "$work/metrics.txt" "$work/grab.txt" "$LAG_LIMIT" "$REBUILD_TARGET" \
  "$APPLIED" "$EXPECTED" "$MEM_COUPONS" "$MEM_BEFORE" "$MEM_GRABBED" "$MEM_AFTER" "$MEM_LIMIT" \
  "$PROJECT_CPU_LIMIT" "$work/throughput-v2.json" >"$work/numbers.env" <<'PY'
import json, re, sys
throughput = json.load(open(sys.argv[1]))
v2 = json.load(open(sys.argv[14]))
metrics = open(sys.argv[2]).read()
grab = open(sys.argv[3]).read()
limit, target = float(sys.argv[4]), float(sys.argv[5])
applied, expected = int(sys.argv[6]), int(sys.argv[7])
coupons, before, grabbed, after = (int(a) for a in sys.argv[8:12])
mem_limit, cpu_limit = float(sys.argv[12]), float(sys.argv[13])
buckets = []
for m in re.finditer(r'^seckill_projector_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', metrics, re.M):
    le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
    buckets.append((le, float(m.group(2))))
buckets.sort()
count = buckets[-1][1] if buckets else 0.0
def quantile(q):
    # Linear interpolation inside the bucket that holds the q-th event (as Prometheus'
    # histogram_quantile does); the last finite bound when it falls in +Inf.
    rank, lower, below = q * count, 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if le == float("inf"):
                return lower
            inside = cum - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cum
    return lower
within = next((cum for le, cum in buckets if abs(le - limit) < 1e-9), 0.0)
rps = float(re.search(r"^Requests/sec:\s+(\S+)", grab, re.M).group(1))
x = throughput["xrange"]["eventsPerSec"]
one, two, rb = throughput["oneProjector"], throughput["twoProjectors"], throughput["rebuild"]
p99 = quantile(0.99)
values = {
    "EVENTS": throughput["events"], "PAGE": throughput["page"],
    "ENTRIES": throughput["entries"], "PER_ENTRY": throughput["grantsPerEntry"],
    "V2_ONE_RATE": f'{v2["oneProjector"]["eventsPerSec"]:.0f}',
    "V2_ONE_CMD": f'{v2["oneProjector"]["redisCommandMicrosPerEvent"]:.2f}',
    "V2_ONE_CPU": f'{v2["oneProjector"]["clientCpuMicrosPerEvent"]:.1f} / {v2["oneProjector"]["redisCpuMicrosPerEvent"]:.1f}',
    "V2_XRANGE_RATE": f'{v2["xrange"]["eventsPerSec"]:.0f}',
    "V2_REBUILD_RATE": f'{v2["rebuild"]["eventsPerSec"]:.0f}',
    "V2_ONE_SPLIT": ", ".join(f'{name} {c["usecPerEvent"]:.2f}'
                               for name, c in sorted(v2["oneProjector"]["commands"].items(), key=lambda kv: -kv[1]["usecPerEvent"])
                               if c["usecPerEvent"] >= 0.01),
    "XRANGE_RATE": f'{x:.0f}',
    "XRANGE_CPU": f'{throughput["xrange"]["clientCpuMicrosPerEvent"]:.1f} / {throughput["xrange"]["redisCpuMicrosPerEvent"]:.1f}',
    "ONE_RATE": f'{one["eventsPerSec"]:.0f}', "ONE_RATIO": f'{one["ratioToXrange"]:.2f}',
    "ONE_CPU": f'{one["clientCpuMicrosPerEvent"]:.1f} / {one["redisCpuMicrosPerEvent"]:.1f}',
    "TWO_RATE": f'{two["eventsPerSec"]:.0f}', "TWO_RATIO": f'{two["ratioToXrange"]:.2f}',
    "TWO_TO_ONE": f'{two["ratioToOne"]:.2f}',
    "TWO_CPU": f'{two["clientCpuMicrosPerEvent"]:.1f} / {two["redisCpuMicrosPerEvent"]:.1f}',
    "REBUILD_RATE": f'{rb["eventsPerSec"]:.0f}', "REBUILD_RATIO": f'{rb["eventsPerSec"] / target:.2f}',
    "REBUILD_TO_XRANGE": f'{rb["ratioToXrange"]:.2f}',
    "REBUILD_CPU": f'{rb["clientCpuMicrosPerEvent"]:.1f} / {rb["redisCpuMicrosPerEvent"]:.1f}',
    "REBUILD_MET": "met" if rb["eventsPerSec"] >= target else "NOT met",
    "LAG_EVENTS": f'{count:.0f}', "LAG_P50_MS": f'{quantile(0.5) * 1000:.1f}',
    "LAG_P99_MS": f'{p99 * 1000:.1f}', "LAG_RATIO": f'{p99 / limit:.2f}',
    "LAG_MET": "met" if count and p99 < limit else "NOT met",
    "WITHIN": f'{(within / count * 100) if count else 0:.2f}',
    "GRAB_RPS": f'{rps:.0f}', "APPLIED": applied, "EXPECTED": expected,
    "KEPT_UP": f'{applied / expected:.3f}' if expected else "0",
    "ONE_CMD": f'{one["redisCommandMicrosPerEvent"]:.2f}',
    "ONE_CMD_RATIO": f'{one["redisCommandMicrosPerEvent"] / cpu_limit:.2f}',
    "ONE_CMD_MET": "met" if one["redisCommandMicrosPerEvent"] <= cpu_limit else "NOT met",
    "ONE_CMD_SPLIT": ", ".join(f'{name} {c["usecPerEvent"]:.2f}'
                               for name, c in sorted(one["commands"].items(), key=lambda kv: -kv[1]["usecPerEvent"])
                               if c["usecPerEvent"] >= 0.01),
    "TWO_CMD": f'{two["redisCommandMicrosPerEvent"]:.2f}',
    "MEM_COMMAND_B": f'{(grabbed - before) / coupons:.0f}',
    "MEM_RM_B": f'{(after - grabbed) / coupons:.0f}',
    "MEM_TOTAL_B": f'{(after - before) / coupons:.0f}',
    "MEM_RATIO": f'{(after - before) / coupons / mem_limit:.2f}',
    "MEM_MET": "met" if (after - before) / coupons <= mem_limit else "NOT met",
    "MEM_BEFORE": before, "MEM_GRABBED": grabbed, "MEM_AFTER": after,
}
for k, v in values.items():
    print(f"{k}='{v}'")
PY
# shellcheck disable=SC1091
source "$work/numbers.env"

cat >"$work/section.md" <<EOF
<!-- bench:read-side:start (written by scripts/bench-read-side.sh; do not edit by hand) -->
## Read side (projection, rebuild, lag)

Run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -m), $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
load average before the run: $LOADAVG (other work may share the machine; no CPU pinning: with two
cores, pinning Redis and the clients apart would measure another deployment than the one shipped).
Redis: a private \`redis-server\` $(redis-server --version | awk '{print $3}' | tr -d 'v='), AOF on, \`appendfsync everysec\`, one per part.

Throughput, one stream of $EVENTS events (PromotionStarted, CouponGrabbed by distinct customers,
PromotionFinished), the grants written as the grab function writes them: $PER_ENTRY per CouponGrabbed
version 3 entry ($ENTRIES entries); every run's read model is checked (granted = N, the last
customer's coupon). Rates and CPU are per event (each grant one), CPU in microseconds, this
process / redis-server. XRANGE reads $PER_ENTRY grants per entry here, so it is the ceiling of reading
the stream, no longer of projecting it: the projectors' ratio to it is reported, not a target.

| measure | events/s | ratio to its limit (same run) | CPU µs/event |
|---|---|---|---|
| ceiling: raw XRANGE of the stream, pages of $PAGE | **$XRANGE_RATE** | 1 | $XRANGE_CPU |
| one projector (consumer group, XREADGROUP, apply, XACK) | **$ONE_RATE** | **$ONE_RATIO** of XRANGE | $ONE_CPU |
| two projectors sharing the group | **$TWO_RATE** | **$TWO_RATIO** of XRANGE ($TWO_TO_ONE x one) | $TWO_CPU |
| rebuild (\`projector --rebuild\`: replay into a database aside, SWAPDB, catch up, FLUSHDB ASYNC of the old) | **$REBUILD_RATE** | **$REBUILD_RATIO** of the 100,000/s target ($REBUILD_MET); $REBUILD_TO_XRANGE of XRANGE | $REBUILD_CPU |

Redis CPU per projected event from Redis' own accounting (\`CONFIG RESETSTAT\` before the phase,
\`INFO commandstats\` after it: the usec of every command but INFO/CONFIG, over the events applied):
one projector **$ONE_CMD µs**, **$ONE_CMD_RATIO** of the 4 µs limit ($ONE_CMD_MET); two projectors $TWO_CMD µs.
Per command, µs per event (one projector): $ONE_CMD_SPLIT.

The same $EVENTS events written as version 2 entries, one per grant (the layout before version 3),
in the same run: one projector **$V2_ONE_RATE** events/s (CPU $V2_ONE_CPU), Redis **$V2_ONE_CMD µs**
per event ($V2_ONE_SPLIT); XRANGE $V2_XRANGE_RATE events/s, rebuild $V2_REBUILD_RATE events/s.

Lag while the command path runs at full speed (wrk, ${CONNECTIONS} connections, ${DURATION} s, one grab
per new customer through \`seckill-worker command\`; one \`seckill-worker projector\`; all on this machine):

| measure | value | ratio to its limit (same run) |
|---|---|---|
| grabs/s through the command worker | **$GRAB_RPS** | |
| events applied by the projector / events appended (200s + PromotionStarted) | $APPLIED / $EXPECTED | **$KEPT_UP** |
| projection lag p99 (XADD to applied and acknowledged; from \`projector_lag_seconds\`, interpolated in its bucket) | **$LAG_P99_MS ms** (p50 $LAG_P50_MS ms, $LAG_EVENTS events) | **$LAG_RATIO** of 250 ms ($LAG_MET) |
| events applied within 250 ms | **$WITHIN %** | |

Redis memory per granted coupon, every key included: \`INFO memory\` \`used_memory\` of a private
redis-server before and after $MEM_COUPONS grants through \`seckill-worker command\` (wrk, new customers
\`m<round>-<thread>-<n>\`, until the promotion of $MEM_COUPONS coupons answers a new customer 410),
then after a \`seckill-worker projector\` started afterwards applied all $MEM_EXPECTED events. Keys
afterwards (streams' database / read models'): $MEM_KEYS.

| part | B per coupon | ratio to the 300 B limit (same run) |
|---|---|---|
| command side: customers hash + stream (+ the state) | $MEM_COMMAND_B | |
| read models (coupon buckets, promotion hash, progress) | $MEM_RM_B | |
| **every key** | **$MEM_TOTAL_B** | **$MEM_RATIO** ($MEM_MET) |

(used_memory: $MEM_BEFORE B before, $MEM_GRABBED B after the grabs, $MEM_AFTER B after the projection.)

Commands (ports are picked free at each run):

\`\`\`
${THROUGHPUT[*]}
${THROUGHPUT_V2[*]}
${LAG_COMMAND[*]}
${LAG_PROJECTOR[*]}
${SETUP} ${LAG_REDIS_URL} ${COUPONS}
${WRK_GRAB[*]}
curl -s http://127.0.0.1:${LAG_METRICS_PORT}/metrics   # seckill_projector_lag_seconds_bucket
# memory:
${SETUP} redis://127.0.0.1:<port>/ ${MEM_COUPONS}
${MEM_COMMAND[*]}
redis-cli -p <port> info memory   # used_memory, before
${MEM_WRK[*]}   # rounds until a new customer gets 410
redis-cli -p <port> info memory   # used_memory, after the grabs
${MEM_PROJECTOR[*]}
redis-cli -p <port> info memory   # used_memory, once it applied ${MEM_EXPECTED} events
\`\`\`
<!-- bench:read-side:end -->
EOF

if [ "${BENCH_NO_DOC:-0}" != 1 ]; then
  doc=docs/BENCHMARKS.md
  mkdir -p docs
  [ -f "$doc" ] || printf '# Read-side benchmark\n\nMeasured by `scripts/bench-read-side.sh` (part of `make bench`) on the machine it runs on; numbers from one run.\n\n' >"$doc"
  python3 scripts/write-doc-section.py read-side "$doc" "$work/section.md"
  echo "bench-read-side: wrote $doc"
fi
cat "$work/section.md"
