#!/usr/bin/env bash
# The operator at fleet scale (issue 16): 1,000 Promotions through the real
# `seckill-operator run` against a real kube-apiserver v1.26 with etcd (the
# one in ../shared/kube unless SECKILL_KUBE_APISERVER names another), with a
# redis-server; operator/examples/fleet_bench.rs creates the fleet, runs the
# operator and measures (see its doc). Each operator binary gets a fresh
# control plane and Redis. With BENCH_OPERATOR_BASE=<git revision>, that
# revision's operator is built and measured first, in the same run, for
# comparison. Writes the table and the exact commands into docs/BENCHMARKS.md
# (between its bench:operator markers); BENCH_NO_DOC=1 leaves the doc alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PWD/.tools/bin:$PATH"
QUIET=${OPERATOR_BENCH_QUIET_SECS:-30}
GRABS=${OPERATOR_BENCH_GRAB_SECS:-30}
BASE=${BENCH_OPERATOR_BASE:-}

apiserver=${SECKILL_KUBE_APISERVER:-}
if [ -z "$apiserver" ] && [ -x ../shared/kube/kube-apiserver ]; then
  apiserver=$(cd ../shared/kube && pwd)/kube-apiserver
fi
if [ -z "$apiserver" ] || [ ! -x "$apiserver" ]; then
  echo "bench-operator: skipped: no kube-apiserver (set SECKILL_KUBE_APISERVER, or put one in ../shared/kube)"
  exit 0
fi
kube_up_script="$(dirname "$apiserver")/kube-up.sh"
[ -f "$kube_up_script" ] || { echo "bench-operator: no kube-up.sh beside $apiserver" >&2; exit 1; }
export SECKILL_KUBE_APISERVER=$apiserver KUBE_APISERVER=$apiserver
bash scripts/install-deps.sh kube
# shellcheck source=/dev/null
source "$kube_up_script"

target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet -p seckill-operator --bin seckill-operator --example fleet_bench
driver="$target/release/examples/fleet_bench"
work=$(mktemp -d)
cp "$target/release/seckill-operator" "$work/seckill-operator.after"
labels=(after)
if [ -n "$BASE" ]; then
  base_rev=$(git rev-parse --short "$BASE")
  mkdir -p "$work/base-src"
  git archive "$base_rev" | tar -x -C "$work/base-src"
  (cd "$work/base-src" && CARGO_TARGET_DIR="$target" cargo build --release --quiet -p seckill-operator --bin seckill-operator)
  cp "$target/release/seckill-operator" "$work/seckill-operator.before"
  # Leave target/release/seckill-operator this tree's build, not the base's.
  cp "$work/seckill-operator.after" "$target/release/seckill-operator"
  labels=(before after)
fi
head_rev=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- operator || echo "+changes")

redis_pid=
# kube_down (from kube-up.sh) is not written for `set -e`.
stop_kube() { set +e; kube_down; set -e; }
cleanup() {
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
  stop_kube
}
trap cleanup EXIT

declare -A result
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for label in "${labels[@]}"; do
  echo "bench-operator: $label: control plane, CRD, redis-server"
  kube_up "$work/kube-$label"
  kubectl apply --validate=false -f crds/ >/dev/null 2>&1
  until kubectl get promotions.seckill.io -A >/dev/null 2>&1; do sleep 0.5; done
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis-$label.log" 2>&1 &
  redis_pid=$!
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
  echo "bench-operator: $label: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  out=$(FLEET_BENCH_LOG="$work/operator-$label.log" "$driver" "$work/seckill-operator.$label" "$KUBECONFIG" "redis://127.0.0.1:$port/" "$QUIET" "$GRABS")
  echo "$out" | sed "s/^/  $label: /"
  while read -r key value; do result[$label.$key]=$value; done <<<"$out"
  result[$label.load]=$(cut -d' ' -f1-3 /proc/loadavg)
  kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; redis_pid=
  stop_kube
done

# One row per figure: its value for each binary, and the target.
row() { # key label target
  local line="| $2 |"
  for l in "${labels[@]}"; do line="$line ${result[$l.$1]:-n/a} |"; done
  echo "$line $3 |"
}
ratio() { # key limit: after / limit
  python3 -c "import sys; v=float(sys.argv[1]); print(f'{v/float(sys.argv[2]):.2f}')" "${result[after.$1]:-nan}" "$2"
}
header="| figure, 1,000 Promotions |"
sep="|---|"
for l in "${labels[@]}"; do
  case $l in before) header="$header today ($base_rev) |" ;; after) header="$header this change ($head_rev) |" ;; esac
  sep="$sep---|"
done
table=$(cat <<MD
$header target |
$sep---|
$(row quiet_apiserver_rps "API server requests/s, nothing changing (all of them)" "<= 2")
$(row apiserver_background_rps "... of which the API server's own background (before any client)" "")
$(row quiet_promotions_events_rps "... on Promotions and Events (the operator's)" "")
$(row quiet_leases_rps "... on Leases (leader election, and the server's own)" "")
$(row quiet_status_writes_per_s "status writes/s, nothing changing" "")
$(row quiet_operator_cpu_cores "operator CPU (cores), nothing changing" "<= 0.02")
$(row quiet_operator_rss_mib "operator RSS (MiB), nothing changing" "<= 150")
$(row grabs_per_s "grabs/s in the 600 running sales (load)" "")
$(row grabs_status_writes_per_s "status writes/s while 600 sales run with grabs" "<= 300 (600 / 2 s)")
$(row grabs_apiserver_rps "API server requests/s while 600 sales run with grabs" "")
$(row grabs_operator_cpu_cores "operator CPU (cores) while 600 sales run with grabs" "")
$(row started_shown_after_publish_p50_s "Started in status after publishTime, p50 (s), 20 at one instant" "")
$(row started_shown_after_publish_max_s "Started in status after publishTime, max (s)" "<= 1")
$(row started_at_after_publish_max_s "... startedAt (Redis' clock) after publishTime, max (s)" "")
$(row finished_shown_after_finish_p50_s "Finished in status after finishTime, p50 (s)" "")
$(row finished_shown_after_finish_max_s "Finished in status after finishTime, max (s)" "<= 1")
$(row operator_rss_peak_mib "operator peak RSS (MiB)" "<= 150")
$(row fleet_reported_secs "seconds until all 1,000 statuses were reported" "")
$(row load "load average after the run" "")
MD
)
ratios="Ratios to the limits (this change, same run): API server requests/s nothing changing / 2 = $(ratio quiet_apiserver_rps 2) (all of the server's requests, its own background included); status writes/s with grabs / 300 = $(ratio grabs_status_writes_per_s 300); CPU nothing changing / 0.02 = $(ratio quiet_operator_cpu_cores 0.02); peak RSS / 150 MiB = $(ratio operator_rss_peak_mib 150); Started max / 1 s = $(ratio started_shown_after_publish_max_s 1); Finished max / 1 s = $(ratio finished_shown_after_finish_max_s 1)."
echo
echo "$table"
echo "$ratios"
[ "${BENCH_NO_DOC:-0}" = 1 ] && exit 0
base_cmd=""
[ -n "$BASE" ] && base_cmd="BENCH_OPERATOR_BASE=$base_rev "
section=$(cat <<MD
<!-- bench:operator:start (written by scripts/bench-operator.sh; do not edit by hand) -->
Run on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average before the run: $load_before.
kube-apiserver v1.26.1 with etcd $(etcd --version 2>/dev/null | head -1 | awk '{print $3}'), both on loopback; one
redis-server; the operator built with \`--release\`, run with its defaults (leader election on,
\`--status-interval 2s\`, \`--redis-poll-interval 500ms\` where it has them).

\`\`\`
${base_cmd}bash scripts/bench-operator.sh    # make bench runs it too
# per binary: kube_up (../shared/kube/kube-up.sh); kubectl apply --validate=false -f crds/;
# redis-server --save '' --appendonly no; then
target/release/examples/fleet_bench OPERATOR_BIN \$KUBECONFIG redis://127.0.0.1:PORT/ $QUIET $GRABS
\`\`\`

$table

$ratios
<!-- bench:operator:end -->
MD
)
printf '%s\n' "$section" |
  python3 scripts/write-doc-section.py operator docs/BENCHMARKS.md - "## Operator at fleet scale (1,000 Promotions)"
echo "bench-operator: wrote docs/BENCHMARKS.md"
