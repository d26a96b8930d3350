#!/usr/bin/env bash
# Tests the chart's Grafana dashboard and PrometheusRule (`make monitoring-test`,
# part of `make test`), without a cluster:
#   1. helm template with both on (release flash, namespace seckill);
#   2. promtool check rules on the rendered rules, and on the dashboard's
#      queries (as recording rules, Grafana's $__rate_interval resolved);
#   3. promtool test rules charts/seckill/tests/alerts.test.yaml, with a firing
#      and a silent case for every alert (checked);
#   4. the dashboard JSON: parsed, every panel with a query and the templated
#      datasource, on one screen, showing what the sale needs;
#   5. every alert's runbook_url is its own section of docs/RUNBOOK.md;
#   6. every metric name a panel or an alert uses is in the /metrics of the
#      running seckill processes (the labels and label values it selects
#      too), or is listed as coming from kube-state-metrics; and the check
#      fails on a renamed metric and on a wrong label value.
# The /metrics come from real processes on a private redis-server:
#   - `seckill-worker command`: a grab granted, a 404, a Redis timeout (CLIENT
#     PAUSE), then Redis killed (connection errors, failed readiness PING);
#   - `seckill-worker projector`: events applied, lag observed;
#   - `seckill up --roles operator`: the operator's reconcile core on a
#     promotion manifest, with the operator's metrics (promotion gauges, and
#     failed reconciliations once Redis is gone);
#   - `seckill-operator run`: the operator binary as a standby whose API
#     server never answers (a listening socket that accepts nothing), which
#     serves /metrics before leader election: its counters and leader gauge.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CHART=charts/seckill
RELEASE=flash
NAMESPACE=seckill
export PATH="$ROOT/.tools/bin:$ROOT/.tools/venv/bin:$PATH"

if [ ! -x .tools/bin/helm ] || [ ! -x .tools/venv/bin/python ]; then
  bash scripts/install-deps.sh helm python || { echo "test-monitoring: cannot install helm/python tools" >&2; exit 1; }
fi
command -v promtool >/dev/null || bash scripts/install-deps.sh prometheus || { echo "test-monitoring: cannot install promtool" >&2; exit 1; }
command -v redis-server >/dev/null || bash scripts/install-deps.sh redis || { echo "test-monitoring: cannot install redis" >&2; exit 1; }
PY=.tools/venv/bin/python
CHECK=(python3 scripts/check-monitoring.py)
[ -x "$PY" ] && CHECK=("$PY" scripts/check-monitoring.py)

source scripts/lib/scratch.sh
scratch seckill-monitoring
source scripts/lib/checks.sh
check() { # description, command...: the command prints its own ok/FAIL lines
  local what=$1; shift
  if "$@"; then :; else fail "$what"; fi
}

echo "== helm template (prometheusRule + grafanaDashboard on)"
if ! helm template "$RELEASE" "$CHART" -n "$NAMESPACE" --set redis.url=redis://redis.example:6379 \
    --set prometheusRule.enabled=true --set grafanaDashboard.enabled=true >"$work/render.yaml" 2>"$work/render.err"; then
  fail "helm template"; sed 's/^/       /' "$work/render.err"
  printf '  - %s\n' "${failures[@]}"; exit 1
fi
check "extract" "${CHECK[@]}" extract "$work/render.yaml" "$work" || true
[ -f "$work/rules.yaml" ] && [ -f "$work/dashboard.json" ] || { echo "test-monitoring: nothing to check"; exit 1; }

echo "== promtool"
if out=$(promtool check rules "$work/rules.yaml" 2>&1); then
  pass "promtool check rules (alerts): $(echo "$out" | grep -o 'SUCCESS.*')"
else
  fail "promtool check rules (alerts)"; echo "$out" | sed 's/^/       /'
fi
cp "$CHART/tests/alerts.test.yaml" "$work/alerts.test.yaml"
if out=$(cd "$work" && promtool test rules alerts.test.yaml 2>&1); then
  pass "promtool test rules $CHART/tests/alerts.test.yaml: $(grep -c '^  - name:' "$CHART/tests/alerts.test.yaml") test groups pass"
else
  fail "promtool test rules"; echo "$out" | sed 's/^/       /'
fi
check "alert test coverage" "${CHECK[@]}" coverage "$work/rules.yaml" "$CHART/tests/alerts.test.yaml"

echo "== dashboard"
check "dashboard" "${CHECK[@]}" dashboard "$work/dashboard.json" "$work/dashboard-rules.yaml"
if out=$(promtool check rules "$work/dashboard-rules.yaml" 2>&1); then
  pass "promtool check rules (the dashboard's queries): $(echo "$out" | grep -o 'SUCCESS.*')"
else
  fail "promtool check rules (the dashboard's queries)"; echo "$out" | sed 's/^/       /'
fi

echo "== runbook"
check "runbook" "${CHECK[@]}" runbook "$work/rules.yaml" docs/RUNBOOK.md

echo "== /metrics of running seckill processes"
cargo build -q -p seckill-workers -p seckill-operator --bins || { fail "cargo build"; printf '  - %s\n' "${failures[@]}"; exit 1; }
BIN=$(cargo metadata --format-version 1 --no-deps | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug

# Polls `$@` every 0.1 s until it succeeds, for at most $1 seconds.
eventually() {
  local secs=$1; shift
  local end=$(( $(date +%s) + secs ))
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.1
  done
}
ready() { curl -fs -o /dev/null "$1"; }
has_line() { curl -fs "$1" 2>/dev/null | grep -q "$2"; }
grab() { # customer, promotion: prints the status code
  curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -d "{\"customerId\":\"$1\"}" "$COMMAND/api/v1/promotions/shop/$2/grab"
}
granted() { [ "$(grab "$1" metrics-check)" = 200 ]; }
dump_logs() { for f in "$work"/*.log; do echo "       --- $f"; tail -20 "$f" | sed 's/^/       /'; done; }

REDIS_PORT=$(free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
mkdir -p "$work/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis" \
  --logfile "$work/redis.log" --daemonize no >/dev/null 2>&1 &
REDIS_PID=$!
pids+=("$REDIS_PID")
eventually 20 redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || { fail "redis-server did not start"; dump_logs; }

# A promotion open now, for an hour (Redis decides on its own clock).
cat >"$work/promotion.yaml" <<EOF
apiVersion: seckill.io/v1
kind: Promotion
metadata: {name: metrics-check, namespace: shop}
spec:
  publishTime: "$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)"
  finishTime: "$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)"
  numberOfCoupons: 5
  discount: 0.2
EOF

# An API server that accepts connections (the kernel's backlog) and never answers.
"$PY" -c '
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
while True: time.sleep(3600)' >"$work/silent-api.port" &
pids+=($!)
eventually 20 test -s "$work/silent-api.port" || fail "the silent API server did not start"
cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: silent, cluster: {server: "http://127.0.0.1:$(cat "$work/silent-api.port")"}}]
users: [{name: nobody, user: {token: none}}]
contexts: [{name: silent, context: {cluster: silent, user: nobody, namespace: seckill}}]
current-context: silent
EOF

UP_PORT=$(free_port); COMMAND_PORT=$(free_port); PROJECTOR_PORT=$(free_port); OPERATOR_PORT=$(free_port)
COMMAND="http://127.0.0.1:$COMMAND_PORT"
UP="http://127.0.0.1:$UP_PORT"
PROJECTOR="http://127.0.0.1:$PROJECTOR_PORT"
OPERATOR="http://127.0.0.1:$OPERATOR_PORT"
export RUST_LOG=warn
"$BIN/seckill" up --roles operator --redis-url "$REDIS_URL" --listen "127.0.0.1:$UP_PORT" -f "$work/promotion.yaml" >"$work/up.log" 2>&1 &
pids+=($!)
"$BIN/seckill-worker" command --listen "127.0.0.1:$COMMAND_PORT" --redis-url "$REDIS_URL" --redis-timeout-ms 300 >"$work/command.log" 2>&1 &
pids+=($!)
"$BIN/seckill-worker" projector --metrics-listen "127.0.0.1:$PROJECTOR_PORT" --redis-url "$REDIS_URL" --consumer-name metrics-check >"$work/projector.log" 2>&1 &
pids+=($!)
KUBECONFIG="$work/kubeconfig" "$BIN/seckill-operator" run --metrics-listen "127.0.0.1:$OPERATOR_PORT" --redis-url "$REDIS_URL" \
  --identity metrics-check --lease-name metrics-check --lease-namespace seckill >"$work/operator.log" 2>&1 &
pids+=($!)

scraped=0
if eventually 60 ready "$COMMAND/readyz" && eventually 60 ready "$PROJECTOR/readyz" && eventually 60 ready "$UP/readyz" \
    && eventually 60 ready "$OPERATOR/healthz"; then
  pass "command, projector, seckill up --roles operator and seckill-operator (standby) serve /metrics"
  # A grant (once seckill up has started the promotion), an unknown promotion (404).
  eventually 60 has_line "$UP/metrics" '^seckill_operator_active_promotion_finish_time_seconds{promotion="shop/metrics-check"}' \
    || fail "seckill up did not report the promotion Active within 60 s"
  if eventually 60 granted c-1 && [ "$(grab c-2 no-such-promotion)" = 404 ]; then
    pass "a grab granted, one answered 404"
  else
    fail "no grab was granted within 60 s"
  fi
  # The projector applied the grant; the operator core reports the promotion.
  eventually 30 has_line "$PROJECTOR/metrics" '^seckill_projector_events_applied_total{type="CouponGrabbed"}' \
    || fail "the projector applied no CouponGrabbed event within 30 s"
  eventually 30 has_line "$UP/metrics" '^seckill_operator_promotion_coupons_remaining{promotion="shop/metrics-check"} 4' \
    || fail "seckill up did not report 4 coupons remaining within 30 s"
  curl -fs "$PROJECTOR/metrics" >"$work/projector.metrics"
  curl -fs "$OPERATOR/metrics" >"$work/operator.metrics"
  grep -q '^seckill_operator_leader 0' "$work/operator.metrics" && pass "seckill-operator without its API server: seckill_operator_leader 0" \
    || fail "seckill-operator's /metrics has no 'seckill_operator_leader 0'"
  # Redis stalls past the 300 ms timeout (paused until it is killed), then dies.
  redis-cli -p "$REDIS_PORT" client pause 60000 all >/dev/null
  code=$(grab c-3 metrics-check)
  [ "$code" = 503 ] && pass "a grab while Redis is paused: 503" || fail "a grab while Redis is paused: $code, not 503"
  kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null
  curl -s -o /dev/null "$COMMAND/readyz"
  code=$(grab c-4 metrics-check)
  [ "$code" = 503 ] && pass "a grab with Redis gone: 503" || fail "a grab with Redis gone: $code, not 503"
  eventually 10 has_line "$COMMAND/metrics" '^seckill_redis_errors_total{operation="ping"' \
    || fail "the command worker counted no failed readiness PING"
  curl -fs "$COMMAND/metrics" >"$work/command.metrics"
  # The operator core refreshes the Active promotion every second: without
  # Redis those reconciliations fail.
  eventually 30 has_line "$UP/metrics" '^seckill_operator_reconcile_failures_total{error="RedisUnavailable"}' \
    || fail "seckill up counted no failed reconciliation within 30 s of Redis dying"
  curl -fs "$UP/metrics" >"$work/up.metrics"
  scraped=1
else
  fail "a seckill process did not become ready within 60 s"; dump_logs
fi

if [ $scraped = 1 ]; then
  SCRAPES=(command="$work/command.metrics" projector="$work/projector.metrics"
    operator="$work/operator.metrics" seckill-up-operator="$work/up.metrics")
  check "metric names" "${CHECK[@]}" names "$work/rules.yaml" "$work/dashboard.json" "${SCRAPES[@]}"
  # The check itself must fail on a renamed metric and on a wrong label value.
  sed 's/seckill_projector_lag_seconds_bucket/seckill_projector_lag_secs_bucket/' "$work/rules.yaml" >"$work/renamed.yaml"
  sed 's/outcome="granted"/outcome="grant"/' "$work/rules.yaml" >"$work/relabelled.yaml"
  if out=$("${CHECK[@]}" names "$work/renamed.yaml" "$work/dashboard.json" "${SCRAPES[@]}" 2>&1); then
    fail "the metric-name check accepts a renamed metric (seckill_projector_lag_secs_bucket)"
  elif echo "$out" | grep -q 'seckill_projector_lag_secs_bucket is in no /metrics'; then
    pass "the metric-name check refuses a renamed metric: $(echo "$out" | grep -m1 'lag_secs_bucket' | sed 's/^ *FAIL //')"
  else
    fail "the metric-name check fails on a renamed metric, but not naming it"; echo "$out" | sed 's/^/       /'
  fi
  if out=$("${CHECK[@]}" names "$work/relabelled.yaml" "$work/dashboard.json" "${SCRAPES[@]}" 2>&1); then
    fail "the metric-name check accepts outcome=\"grant\""
  elif echo "$out" | grep -q "outcome='grant'"; then
    pass "the metric-name check refuses a wrong label value: $(echo "$out" | grep -m1 "outcome='grant'" | sed 's/^ *FAIL //')"
  else
    fail "the metric-name check fails on outcome=\"grant\", but not naming it"; echo "$out" | sed 's/^/       /'
  fi
fi

checks_summary test-monitoring
