#!/usr/bin/env bash
# The sold-out path of several builds beside nginx's static 410, in one rig,
# alternated: is a sold-out ratio a property of the code or of the machine?
# (docs/BENCHMARKS.md, "The sold-out target and the machine".)
#
# Each build is a checkout with a release build of `seckill-worker` and of
# the `bench_setup` example in its target/release (or a CARGO_TARGET_DIR
# given after a colon). Every build gets its own redis-server (its own
# data model, set up by its own bench_setup with 5,000,000 coupons) on
# BENCH_CLIENT_CPU; every worker (`command --no-query`) and nginx (2 worker
# processes, answering the first build's 410 body) on BENCH_WORKER_CPU, the
# placement of scripts/bench.sh. Each worker first takes 2 s of the load
# (it loads the holders' set). Then ROUNDS times, each server in turn (each
# round starting one server later):
# `wrk -t1 -c64 -dSECONDSs -s bench/sold-out.lua` on the client CPU, with
# the server's user and system CPU per request from /proc (nginx's workers
# included), and its rate over nginx's of the same round.
#
# Beside them, unless HYPER_FLOOR=0, `hyper-floor`: the first build's
# `hyper_floor` example (workers/examples/hyper_floor.rs: hyper alone with
# the worker's HTTP/1 settings answering the same 410, the body read), the
# floor of any server built on hyper here.
#
# Usage: bash bench/sold-out-builds.sh LABEL=CHECKOUT[:TARGET_DIR] ...
#   e.g. bash bench/sold-out-builds.sh head=. base=../base:../base/target-own
# Env: ROUNDS (default 3), SECONDS_PER_RUN (default 5), BENCH_WORKER_CPU
# (default 1), BENCH_CLIENT_CPU (default 0), HYPER_FLOOR (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
RUN_SECS="${SECONDS_PER_RUN:-5}"
WORKER_CPU="${BENCH_WORKER_CPU:-1}"
CLIENT_CPU="${BENCH_CLIENT_CPU:-0}"
[ $# -ge 1 ] || { sed -n '2,28p' "$0" >&2; exit 2; }
for tool in wrk redis-server redis-cli curl nginx taskset python3; do
  command -v "$tool" >/dev/null || { echo "sold-out-builds: $tool is missing" >&2; exit 2; }
done

source scripts/lib/scratch.sh
source scripts/lib/nginx.sh
scratch seckill-sold-out-builds

labels=()
declare -A port server
for spec in "$@"; do
  label=${spec%%=*}
  rest=${spec#*=}
  checkout=${rest%%:*}
  target="$checkout/target"
  [[ "$rest" != *:* ]] || target=${rest#*:}
  worker="$target/release/seckill-worker"
  # (The data model is the checkout's; any of its builds sets it up.)
  setup="$target/release/examples/bench_setup"
  [ -x "$setup" ] || setup="$checkout/target/release/examples/bench_setup"
  for b in "$worker" "$setup"; do
    [ -x "$b" ] || { echo "sold-out-builds: $label: no $b (cargo build --release -p seckill-workers --bin seckill-worker --example bench_setup)" >&2; exit 2; }
  done
  mkdir -p "$work/$label"
  redis_port=$(free_port)
  taskset -c "$CLIENT_CPU" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work/$label" --logfile "$work/$label/redis.log" --daemonize no &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  "$setup" "redis://127.0.0.1:$redis_port/" 5000000 >"$work/$label/setup.out"
  port[$label]=$(free_port)
  RUST_LOG=warn taskset -c "$WORKER_CPU" "$worker" command --listen "127.0.0.1:${port[$label]}" \
    --redis-url "redis://127.0.0.1:$redis_port/" --no-query 2>"$work/$label/worker.log" &
  server[$label]=$!
  pids+=($!)
  await_ready "http://127.0.0.1:${port[$label]}" "$work/$label/worker.log"
  labels+=("$label")
  [ -n "${floor:-}" ] || floor="$target/release/examples/hyper_floor"
done
# The floor: hyper alone, with the first build's settings, answering its 410.
if [ "${HYPER_FLOOR:-1}" = 1 ]; then
  [ -x "$floor" ] || { echo "sold-out-builds: no $floor (cargo build --release -p seckill-workers --example hyper_floor; HYPER_FLOOR=0 to leave it out)" >&2; exit 2; }
  port[hyper-floor]=$(free_port)
  taskset -c "$WORKER_CPU" "$floor" --listen "127.0.0.1:${port[hyper-floor]}" 2>"$work/hyper-floor.log" &
  server[hyper-floor]=$!
  pids+=($!)
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:${port[hyper-floor]}/" 2>/dev/null && break; sleep 0.05; done
  labels+=(hyper-floor)
fi

url() { echo "http://127.0.0.1:$1/api/v1/promotions/bench/sold-out/grab"; }
answer() { curl -s -X POST -H 'content-type: application/json' -d '{"customerId":"probe"}' -w ' %{http_code}' "$(url "$1")"; }
BODY=$(answer "${port[${labels[0]}]}")
BODY=${BODY% 410}
case "$BODY" in
  *'"error":"sold_out"'*) ;;
  *) echo "sold-out-builds: ${labels[0]} does not answer 410 sold_out: $BODY" >&2; exit 1 ;;
esac
for label in "${labels[@]}"; do
  [ "$(answer "${port[$label]}")" = "$BODY 410" ] || { echo "sold-out-builds: $label answers another 410: $(answer "${port[$label]}")" >&2; exit 1; }
done

port[nginx]=$(free_port)
nginx_static_410 "$work/nginx" "${port[nginx]}" "$BODY" || exit 1
taskset -c "$WORKER_CPU" nginx -p "$work/nginx" -e "$work/nginx/logs/error.log" -c "$work/nginx/nginx.conf" &
server[nginx]=$!
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "$(url "${port[nginx]}")" 2>/dev/null && break; sleep 0.05; done
[ "$(answer "${port[nginx]}")" = "$BODY 410" ] || { echo "sold-out-builds: nginx answers another 410" >&2; exit 1; }

wrk_run() { taskset -c "$CLIENT_CPU" wrk -t1 -c64 -d"$1s" -s bench/sold-out.lua "$(url "$2")"; }
# user and system clock ticks of a server and its children (nginx's workers).
ticks() {
  local p u=0 s=0 a b
  for p in "$1" $(pgrep -P "$1" || true); do
    read -r a b < <(awk '{ print $14, $15 }' "/proc/$p/stat")
    u=$((u + a)); s=$((s + b))
  done
  echo "$u $s"
}
for label in "${labels[@]}"; do wrk_run 2 "${port[$label]}" >/dev/null; done

HZ=$(getconf CLK_TCK)
echo "sold-out-builds: $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p' | head -1)); servers on CPU $WORKER_CPU, wrk and Redis on CPU $CLIENT_CPU; ${RUN_SECS}s per run"
for round in $(seq "$ROUNDS"); do
  declare -A rate line
  # Each round starts one server later, so none is always measured first.
  servers=("${labels[@]}" nginx)
  shift_by=$(((round - 1) % ${#servers[@]}))
  for label in "${servers[@]:shift_by}" "${servers[@]:0:shift_by}"; do
    read -r u0 s0 < <(ticks "${server[$label]}")
    out=$(wrk_run "$RUN_SECS" "${port[$label]}")
    read -r u1 s1 < <(ticks "${server[$label]}")
    n=$(awk '/requests in/ { print $1 }' <<<"$out")
    non2xx=$(awk '/Non-2xx/ { print $5 }' <<<"$out")
    [ "${non2xx:-0}" = "$n" ] || { echo "sold-out-builds: $label answered $((n - ${non2xx:-0})) of $n with a 2xx" >&2; exit 1; }
    rate[$label]=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
    line[$label]=$(awk -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" \
      'BEGIN { printf "user %.2f, system %.2f µs per request", u / hz / n * 1e6, s / hz / n * 1e6 }')
  done
  for label in "${labels[@]}" nginx; do
    printf 'round %d  %-12s %9.0f/s  %s  %.2f of nginx\n' "$round" "$label" "${rate[$label]}" "${line[$label]}" \
      "$(awk -v a="${rate[$label]}" -v b="${rate[nginx]}" 'BEGIN { print a / b }')"
  done
done
