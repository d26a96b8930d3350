#!/usr/bin/env bash
# `make demo`: a flash sale on this machine. Builds in release mode, prints
# a promotion that opens a few seconds later with `seckill new promotion`,
# starts `seckill up` on it and the example promotions, sends a flash crowd
# at it with `seckill load --report`, prints the summary, writes the HTML
# report (target/demo/load-report.html unless REPORT says otherwise) and
# stops everything (the private redis-server included).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

CUSTOMERS=${CUSTOMERS:-20000}
COUPONS=${COUPONS:-1000}
OPENS_IN=${OPENS_IN:-5}
REPORT=${REPORT:-${CARGO_TARGET_DIR:-target}/demo/load-report.html}

echo "==> building (release)"
cargo build --release --quiet -p seckill-cli --bin seckill

bin="${CARGO_TARGET_DIR:-target}/release"
work=$(mktemp -d -t seckill-demo-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "==> seckill new promotion flash-sale --namespace demo --opens-in ${OPENS_IN}s --lasts 10m --coupons $COUPONS --discount 0.7"
"$bin/seckill" new promotion flash-sale --namespace demo --opens-in "${OPENS_IN}s" --lasts 10m \
  --coupons "$COUPONS" --discount 0.7 --description "make demo: opens ${OPENS_IN} s after start" \
  > "$work/flash-sale.yaml"
sed 's/^/    /' "$work/flash-sale.yaml"
publish=$(sed -n 's/^  publishTime: "\(.*\)"$/\1/p' "$work/flash-sale.yaml")
mkdir -p "$(dirname "$REPORT")"

up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

echo "==> seckill up -f examples/ -f $work/flash-sale.yaml --listen 127.0.0.1:$port (log: $work/up.log)"
"$bin/seckill" up -f examples/ -f "$work/flash-sale.yaml" --listen "127.0.0.1:$port" >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log"; echo "seckill up exited early" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/up.log"; exit 1; }
echo "==> active promotions before the sale opens: $(curl -fsS "http://127.0.0.1:$port/api/v1/promotions")"

echo "==> seckill load: $CUSTOMERS customers (10% retry) for $COUPONS coupons of demo/flash-sale, opening at $publish"
status=0
"$bin/seckill" load --target "http://127.0.0.1:$port" --promotion demo/flash-sale \
  --customers "$CUSTOMERS" --concurrency 64 --repeat-ratio 0.1 --duration 60s \
  --report "$REPORT" || status=$?

echo "==> demo/flash-sale as the query API reports it:"
curl -fsS "http://127.0.0.1:$port/api/v1/promotions/demo/flash-sale"; echo
# The operator notices the sell-out at its next status refresh (about a second).
for _ in $(seq 1 50); do grep -q "demo/flash-sale: Finished" "$work/up.log" && break; sleep 0.1; done
echo "==> what seckill up reported:"
grep -E "^[0-9]{2}:[0-9]{2}:[0-9]{2} " "$work/up.log" | tail -n 8
cleanup
up_pid=""
echo "==> stopped; data directory and logs in $work"
echo "==> the load report (open it in a browser): $(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")"
exit $status
