#!/usr/bin/env bash
# Tests the Helm chart charts/seckill without a cluster (`make chart-test`):
#   helm lint --strict; helm template of the default values and of every
#   optional part (the dashboard and alerts included: their content is tested
#   by scripts/test-monitoring.sh); kubernetes-validate (strict) of every rendered manifest
#   against Kubernetes $KUBE_VERSION; checkov on every render (failing on any
#   failed check not listed in charts/seckill/checkov-skips.yaml and justified
#   in the chart README); checkov on the Dockerfile; the chart CRD is the same
#   bytes as crds/; wrong values fail with a clear (schema or chart) message.
set -uo pipefail
# No pathname expansion: the --set flags below hold [ ] and { }.
set -f
cd "$(dirname "$0")/.."
ROOT=$PWD
CHART=charts/seckill
KUBE_VERSION=${KUBE_VERSION:-1.30.0}
RELEASE=flash
NAMESPACE=seckill
export PATH="$ROOT/.tools/bin:$ROOT/.tools/venv/bin:$PATH"

if [ ! -x .tools/bin/helm ] || [ ! -x .tools/venv/bin/kubernetes-validate ] || [ ! -x .tools/venv/bin/checkov ]; then
  bash scripts/install-deps.sh helm python || { echo "test-chart: cannot install helm/python tools" >&2; exit 1; }
fi
PY=.tools/venv/bin/python
# checkov runs with --skip-download: no call to the Bridgecrew platform.

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failures=()
pass() { echo "  ok   $*"; }
fail() { echo "  FAIL $*"; failures+=("$*"); }

EXTERNAL=(--set redis.url=redis://redis.example:6379)
CRD_TOP=crds/promotions.seckill.io.yaml
CRD_CHART=$CHART/crds/promotions.seckill.io.yaml

# name | flags. Each render is validated and scanned on its own.
declare -A RENDERS=(
  [default]="${EXTERNAL[*]}"
  [all-optional]="--set redis.bundled.enabled=true --set ingress.enabled=true --set ingress.className=nginx
    --set ingress.hosts={coupons.example.com} --set ingress.tls[0].secretName=seckill-tls
    --set ingress.tls[0].hosts={coupons.example.com} --set ingress.annotations.nginx\.ingress\.kubernetes\.io/proxy-body-size=16k
    --set serviceMonitor.enabled=true --set admissionPolicy.enabled=true
    --set query.separate=true --set query.commandServesReads=false
    --set-json networkPolicy.metricsFrom=[{\"namespaceSelector\":{\"matchLabels\":{\"kubernetes.io/metadata.name\":\"monitoring\"}}}]
    --set-json networkPolicy.workersFrom=[{\"namespaceSelector\":{\"matchLabels\":{\"kubernetes.io/metadata.name\":\"ingress-nginx\"}}}]
    --set-json commandWorker.rateLimit.perSec=2.5 --set commandWorker.rateLimit.burst=20
    --set commandWorker.rateLimit.key=ip --set commandWorker.rateLimit.trustForwardedFor=true
    --set commandWorker.durable.timeoutMs=150
    --set commandWorker.maxConnections=2000 --set commandWorker.headerReadTimeoutMs=5000
    --set commandWorker.maxInFlight=300 --set commandWorker.grabBatchMax=1
    --set query.maxConnections=1000 --set query.headerReadTimeoutMs=3000
    --set prometheusRule.enabled=true --set prometheusRule.labels.release=kube-prometheus-stack
    --set prometheusRule.alertLabels.team=sales
    --set grafanaDashboard.enabled=true --set grafanaDashboard.annotations.grafana_folder=Sales
    --set operator.statusInterval=5s --set operator.redisPollInterval=250ms"
  [watch-namespace]="--set redis.url=rediss://redis.example:6380/0 --set redis.existingSecret=redis-auth
    --set redis.tls.caSecret=redis-ca --set operator.watchNamespace=shop --set admissionPolicy.enabled=true
    --set-json networkPolicy.externalRedisTo=[{\"ipBlock\":{\"cidr\":\"10.20.0.0/16\"}}]
    --set-json networkPolicy.apiServer.to=[{\"ipBlock\":{\"cidr\":\"10.0.0.1/32\"}}]"
  [redis-cluster]="--set redis.cluster.nodes={redis-0.example:7000,redis-1.example:7001,redis-2.example:7002}
    --set redis.tls.enabled=true --set redis.username=seckill --set redis.existingSecret=redis-auth
    --set redis.existingSecretPasswordKey=password
    --set commandWorker.durable.replicas=1 --set commandWorker.durable.timeoutMs=300 --set redis.timeoutMs=500"
  [query-separate-no-hpa]="${EXTERNAL[*]} --set query.separate=true --set commandWorker.autoscaling.enabled=false
    --set query.autoscaling.enabled=false --set ingress.enabled=true --set logFormat=text --set customerIdHeader=X-Customer-Id"
  [monitoring-custom]="${EXTERNAL[*]} --set grafanaDashboard.enabled=true --set grafanaDashboard.label=seckill/dashboard
    --set grafanaDashboard.labelValue=sale --set grafanaDashboard.namespace=monitoring
    --set prometheusRule.enabled=true --set metricsSelector=namespace=\"shop\"\,app=\"seckill\""
)
ORDER=(default all-optional watch-namespace redis-cluster query-separate-no-hpa monitoring-custom)

echo "== helm lint --strict"
for name in default all-optional; do
  # shellcheck disable=SC2086
  if out=$(helm lint --strict "$CHART" --kube-version "$KUBE_VERSION" ${RENDERS[$name]} 2>&1); then
    pass "helm lint --strict ($name values)"
  else
    fail "helm lint --strict ($name values)"; echo "$out" | sed 's/^/       /'
  fi
done

echo "== CRD copy"
crd_flags=()
if [ ! -f "$CRD_TOP" ]; then
  fail "$CRD_TOP does not exist yet (generated by 'make crds' from the operator); the chart ships without the Promotion CRD"
elif [ ! -f "$CRD_CHART" ]; then
  fail "$CRD_CHART does not exist (run 'make crds'; it copies $CRD_TOP)"
elif cmp -s "$CRD_TOP" "$CRD_CHART"; then
  pass "$CRD_CHART is byte-identical to $CRD_TOP"
  crd_flags=(--include-crds)
else
  fail "$CRD_CHART differs from $CRD_TOP (run 'make crds')"
fi

echo "== helm template + kubernetes-validate $KUBE_VERSION (strict)"
for name in "${ORDER[@]}"; do
  dir="$WORK/$name"; mkdir -p "$dir"
  flags=()
  [ "$name" = default ] && flags=("${crd_flags[@]}")
  # shellcheck disable=SC2086
  if ! helm template "$RELEASE" "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_VERSION" "${flags[@]}" ${RENDERS[$name]} >"$WORK/$name.yaml" 2>"$WORK/$name.err"; then
    fail "helm template ($name)"; sed 's/^/       /' "$WORK/$name.err"; continue
  fi
  # One file per object; ServiceMonitor and PrometheusRule have no schema in
  # kubernetes-validate (CRDs of the Prometheus operator): they are checked for
  # their shape here instead (the rules themselves by scripts/test-monitoring.sh).
  summary=$("$PY" - "$WORK/$name.yaml" "$dir" <<'PYEOF'
import sys, yaml
src, out = sys.argv[1], sys.argv[2]
kinds, skipped = [], []
for i, doc in enumerate(d for d in yaml.safe_load_all(open(src)) if d):
    kind = doc.get("kind", "?")
    if doc.get("apiVersion") == "monitoring.coreos.com/v1" and kind == "ServiceMonitor":
        spec = doc.get("spec", {})
        assert spec.get("selector", {}).get("matchLabels"), "ServiceMonitor without selector"
        assert all(e.get("port") for e in spec.get("endpoints", [])), "ServiceMonitor endpoint without port"
        skipped.append(kind)
        continue
    if doc.get("apiVersion") == "monitoring.coreos.com/v1" and kind == "PrometheusRule":
        groups = doc.get("spec", {}).get("groups", [])
        assert groups and all(g.get("name") and g.get("rules") for g in groups), "PrometheusRule without named groups of rules"
        for r in (r for g in groups for r in g["rules"]):
            assert r.get("alert") and isinstance(r.get("expr"), str) and r["expr"].strip(), f"rule without alert name or expr: {r}"
            assert set(r.get("annotations", {})) >= {"summary", "description", "runbook_url"}, f"{r['alert']}: summary, description and runbook_url needed"
            assert r.get("labels", {}).get("severity") in ("critical", "warning"), f"{r['alert']}: severity critical or warning"
        skipped.append(kind)
        continue
    kinds.append(kind)
    with open(f"{out}/{i:03d}-{kind}.yaml", "w") as f:
        yaml.safe_dump(doc, f)
print(f"{len(kinds)} objects" + (f"; not schema-validated (no schema, shape-checked): {', '.join(skipped)}" if skipped else ""))
PYEOF
) || { fail "split render ($name)"; continue; }
  mapfile -t manifests < <(find "$dir" -name '*.yaml' | sort)
  if [ ${#manifests[@]} -gt 0 ] && out=$(kubernetes-validate -k "$KUBE_VERSION" --strict "${manifests[@]}" 2>&1) && ! echo "$out" | grep -qvE '^INFO .* passed for resource'; then
    pass "render '$name': $summary, all valid"
  else
    fail "kubernetes-validate ($name)"; echo "$out" | grep -vE '^INFO .* passed' | sed 's/^/       /'
  fi
done

echo "== expectations on the renders"
expect() { # render, python expression over `objs` (list of dicts), description
  if "$PY" - "$WORK/$1.yaml" "$2" <<'PYEOF'
import sys, yaml
objs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = lambda kind: [o for o in objs if o["kind"] == kind]
def pods():
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield o["metadata"]["name"], o["spec"]
def env(dep, name):
    for o in by("Deployment"):
        if o["metadata"]["name"].endswith(dep):
            for e in o["spec"]["template"]["spec"]["containers"][0].get("env", []):
                if e["name"] == name:
                    return e.get("value", e.get("valueFrom"))
def hardened(spec):
    psc = spec["securityContext"]
    ok = psc["runAsNonRoot"] and psc["runAsUser"] == 65532 and psc["runAsGroup"] == 65532 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    for c in spec["containers"]:
        sc = c["securityContext"]
        ok = ok and sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False \
            and sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault" \
            and c["resources"]["requests"] and c["resources"]["limits"]
    return ok
sys.exit(0 if eval(sys.argv[2]) else 1)
PYEOF
  then pass "$1: $3"; else fail "$1: $3"; fi
}
expect default 'all(hardened(s) for _, s in pods())' "every pod and container hardened (non-root 65532, read-only root, no escalation, drop ALL, RuntimeDefault, requests+limits)"
expect all-optional 'all(hardened(s) for _, s in pods())' "every pod hardened, bundled Redis included"
expect default 'all(s["automountServiceAccountToken"] == (n.endswith("-operator")) for n, s in pods())' "only the operator pod mounts a service account token"
expect default 'all(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz" for o in by("Deployment") for c in o["spec"]["template"]["spec"]["containers"])' "liveness /healthz and readiness /readyz on every seckill container"
expect default 'all(s["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname" for n, s in pods() if not n.endswith("test-readyz"))' "pods spread across nodes"
expect default '[o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] for o in by("Deployment") if o["metadata"]["name"].endswith("-command")] == [30] and env("-command", "SECKILL_DRAIN_TIMEOUT_SECS") == "20"' "command pods: grace 30 s, drain 20 s, preStop sleep"
expect default 'env("-operator", "POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}} and env("-operator", "POD_NAMESPACE") == {"fieldRef": {"fieldPath": "metadata.namespace"}} and [o["spec"]["replicas"] for o in by("Deployment") if o["metadata"]["name"].endswith("-operator")] == [2]' "operator: 2 replicas, POD_NAME/POD_NAMESPACE from the downward API"
expect default 'len(by("ClusterRole")) == 1 and {r["apiGroups"][0] + "/" + r["resources"][0]: r["verbs"] for r in by("ClusterRole")[0]["rules"]} == {"seckill.io/promotions": ["get", "list", "watch", "patch"], "seckill.io/promotions/status": ["patch"], "seckill.io/promotions/finalizers": ["update"], "events.k8s.io/events": ["create", "patch"], "/events": ["create", "patch"]} and all(o["metadata"]["namespace"] == "seckill" for o in by("Role"))' "ClusterRole with exactly the needed verbs; Lease Role in the release namespace"
expect default '[env("-operator", n) for n in ("SECKILL_STATUS_INTERVAL", "SECKILL_REDIS_POLL_INTERVAL")] == ["2s", "500ms"] and [o["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] for o in by("Deployment") if o["metadata"]["name"].endswith("-operator")] == ["128Mi"]' "operator: status and Redis poll intervals at the binary defaults, memory request 128Mi (above the measured 75-90 MiB)"
expect all-optional '[env("-operator", n) for n in ("SECKILL_STATUS_INTERVAL", "SECKILL_REDIS_POLL_INTERVAL")] == ["5s", "250ms"] and not [o["metadata"]["name"] for o in by("Deployment") if not o["metadata"]["name"].endswith("-operator") for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if e["name"] in ("SECKILL_STATUS_INTERVAL", "SECKILL_REDIS_POLL_INTERVAL")]' "operator: status and Redis poll intervals from the values, on the operator only"
expect watch-namespace 'not by("ClusterRole") and sorted(o["metadata"]["namespace"] for o in by("Role")) == ["seckill", "shop"] and env("-operator", "SECKILL_NAMESPACE") == "shop"' "watchNamespace: Role+RoleBinding in it, no ClusterRole"
expect default '{o["kind"] for o in objs} >= {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} and not by("Ingress") and not by("StatefulSet")' "defaults: HPA, PDBs, NetworkPolicies on; Ingress and bundled Redis off"
expect all-optional 'env("-command", "SECKILL_NO_QUERY") == "true" and [p["backend"]["service"]["name"] for p in by("Ingress")[0]["spec"]["rules"][0]["http"]["paths"]] == ["flash-seckill-query", "flash-seckill-command"]' "separate query: command runs SECKILL_NO_QUERY, Ingress sends /api/v1/customers to query"
expect all-optional 'by("StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["args"][5] == "everysec" and by("StatefulSet")[0]["spec"]["volumeClaimTemplates"] and by("Secret")[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" and env("-command", "SECKILL_REDIS_PASSWORD") == {"secretKeyRef": {"name": "flash-seckill-redis", "key": "redis-password"}}' "bundled Redis: AOF everysec on a PVC, kept generated password fed to the workers"
expect all-optional '[o["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["seckill.io/redis-client"] for o in by("NetworkPolicy") if o["metadata"]["name"].endswith("-redis")] == ["true"]' "bundled Redis only reachable from the chart's Redis clients"
expect all-optional 'by("ValidatingAdmissionPolicy")[0]["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["UPDATE"] and by("ValidatingAdmissionPolicyBinding")[0]["spec"]["validationActions"] == ["Deny"]' "admission policy and binding rendered"
expect redis-cluster 'env("-command", "SECKILL_REDIS_CLUSTER_NODES") == "redis-0.example:7000,redis-1.example:7001,redis-2.example:7002" and env("-command", "SECKILL_REDIS_TLS") == "true" and sorted(p["port"] for p in by("NetworkPolicy")[0]["spec"]["egress"][1]["ports"]) == [7000, 7001, 7002]' "Redis Cluster: nodes, TLS, and egress on the nodes' ports"
expect default '[env("-command", n) for n in ("SECKILL_RATE_LIMIT_PER_SEC", "SECKILL_RATE_LIMIT_BURST", "SECKILL_RATE_LIMIT_KEY", "SECKILL_TRUST_FORWARDED_FOR", "SECKILL_DURABLE_REPLICAS", "SECKILL_DURABLE_TIMEOUT_MS", "SECKILL_MAX_CONNECTIONS", "SECKILL_HEADER_READ_TIMEOUT_MS", "SECKILL_MAX_IN_FLIGHT", "SECKILL_GRAB_BATCH_MAX")] == ["0", "10", "customer", "false", "0", "200", "4096", "10000", "1024", "64"]' "command defaults: rate limiting off, durable grab off, limits and batch size at the binary defaults"
expect all-optional '[env("-command", n) for n in ("SECKILL_RATE_LIMIT_PER_SEC", "SECKILL_RATE_LIMIT_BURST", "SECKILL_RATE_LIMIT_KEY", "SECKILL_TRUST_FORWARDED_FOR", "SECKILL_DURABLE_REPLICAS", "SECKILL_DURABLE_TIMEOUT_MS", "SECKILL_MAX_CONNECTIONS", "SECKILL_HEADER_READ_TIMEOUT_MS", "SECKILL_MAX_IN_FLIGHT", "SECKILL_GRAB_BATCH_MAX")] == ["2.5", "20", "ip", "true", "0", "150", "2000", "5000", "300", "1"]' "command: rate limit 2.5/s burst 20 by ip (X-Forwarded-For trusted), durable timeout, connection and in-flight limits and batching off from the values"
expect all-optional 'env("-query", "SECKILL_MAX_CONNECTIONS") == "1000" and env("-query", "SECKILL_HEADER_READ_TIMEOUT_MS") == "3000"' "query: its own connection limits"
expect all-optional 'not [e["name"] for o in by("Deployment") + by("StatefulSet") if not o["metadata"]["name"].endswith("-command") for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if e["name"].startswith(("SECKILL_RATE_LIMIT", "SECKILL_TRUST_FORWARDED", "SECKILL_DURABLE"))] and not [o["metadata"]["name"] for o in by("Deployment") + by("StatefulSet") if not o["metadata"]["name"].endswith(("-command", "-query")) for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if e["name"] in ("SECKILL_MAX_CONNECTIONS", "SECKILL_HEADER_READ_TIMEOUT_MS")]' "rate-limit and durable env only on the command pods, connection limits only on command and query"
expect redis-cluster 'env("-command", "SECKILL_DURABLE_REPLICAS") == "1" and env("-command", "SECKILL_DURABLE_TIMEOUT_MS") == "300" and env("-command", "SECKILL_REDIS_TIMEOUT_MS") == "500"' "Redis Cluster: durable grab with 1 replica within 300 ms, below the 500 ms Redis timeout"
expect default 'all(env(d, "SECKILL_REDIS_READ_MODEL_DB") == "1" for d in ("-command", "-projector"))' "standalone Redis: the read models in database 1, given to command (its query endpoints) and projector"
expect redis-cluster 'not [e for o in by("Deployment") for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if e["name"] == "SECKILL_REDIS_READ_MODEL_DB"]' "Redis Cluster: no read-model database (a cluster has only database 0)"
expect watch-namespace '[p["port"] for p in by("NetworkPolicy")[0]["spec"]["egress"][1]["ports"]] == [6380] and env("-projector", "SECKILL_REDIS_CA_CERT") == "/etc/seckill/redis-ca/ca.crt"' "external Redis: egress on the URL's port, CA mounted"
expect default 'not by("PrometheusRule") and not [o for o in by("ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]' "defaults: no PrometheusRule, no dashboard"
expect all-optional '[(o["metadata"]["namespace"], o["metadata"]["labels"]["grafana_dashboard"], o["metadata"]["annotations"]) for o in by("ConfigMap") if o["metadata"]["name"] == "flash-seckill-dashboard"] == [("seckill", "1", {"grafana_folder": "Sales"})] and __import__("json").loads(by("ConfigMap")[0]["data"]["seckill.json"])["panels"]' "dashboard ConfigMap with the sidecar label grafana_dashboard=1 and its folder annotation, valid JSON"
expect all-optional 'by("PrometheusRule")[0]["metadata"]["labels"]["release"] == "kube-prometheus-stack" and all(r["labels"]["team"] == "sales" for g in by("PrometheusRule")[0]["spec"]["groups"] for r in g["rules"]) and all("job=~\"flash-seckill-(command|query|projector-metrics|operator-metrics)\"" in r["expr"] for g in by("PrometheusRule")[0]["spec"]["groups"] for r in g["rules"])' "PrometheusRule: its labels, the alert labels on every alert, every expression on this release's series"
expect monitoring-custom '[(o["metadata"]["namespace"], o["metadata"]["labels"].get("seckill/dashboard"), "grafana_dashboard" in o["metadata"]["labels"]) for o in by("ConfigMap") if o["metadata"]["name"].endswith("-dashboard")] == [("monitoring", "sale", False)]' "dashboard label key, value and namespace from the values"
expect monitoring-custom 'all("{namespace=\"shop\",app=\"seckill\"" in r["expr"] for g in by("PrometheusRule")[0]["spec"]["groups"] for r in g["rules"]) and "{namespace=\\\"shop\\\",app=\\\"seckill\\\"" in [o for o in by("ConfigMap") if o["metadata"]["name"].endswith("-dashboard")][0]["data"]["seckill.json"]' "metricsSelector replaces the series selector of every alert and panel"

# Numbers from a values file reach the templates as float64 (from --set as
# int64): the env values must stay plain integers, not 2e+06, or the binaries'
# integer parsers refuse them.
printf 'redis:\n  url: redis://redis.example:6379\n  timeoutMs: 2000000\nprojector:\n  claimIdleMs: 3000000\ncommandWorker:\n  maxConnections: 1000000\n  headerReadTimeoutMs: 300000\n  durable:\n    replicas: 2\n    timeoutMs: 60000\n  rateLimit:\n    perSec: 100000\n    burst: 100000\n' >"$WORK/large-numbers.values.yaml"
if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_VERSION" -f "$WORK/large-numbers.values.yaml" >"$WORK/large-numbers.yaml" 2>"$WORK/large-numbers.err"; then
  expect large-numbers '[env("-command", n) for n in ("SECKILL_REDIS_TIMEOUT_MS", "SECKILL_MAX_CONNECTIONS", "SECKILL_HEADER_READ_TIMEOUT_MS", "SECKILL_DURABLE_REPLICAS", "SECKILL_DURABLE_TIMEOUT_MS", "SECKILL_RATE_LIMIT_PER_SEC", "SECKILL_RATE_LIMIT_BURST")] == ["2000000", "1000000", "300000", "2", "60000", "100000", "100000"] and env("-projector", "SECKILL_CLAIM_IDLE_MS") == "3000000"' "large numbers from a values file render as plain integers"
else
  fail "helm template (large-numbers values file)"; sed 's/^/       /' "$WORK/large-numbers.err"
fi

echo "== checkov (kubernetes) on every render, skips from $CHART/checkov-skips.yaml"
for name in "${ORDER[@]}"; do
  [ -d "$WORK/$name" ] || continue
  checkov -d "$WORK/$name" --framework kubernetes --skip-download --output json >"$WORK/$name.checkov.json" 2>"$WORK/$name.checkov.err"
done
if out=$("$PY" - "$CHART/checkov-skips.yaml" "$CHART/README.md" "$WORK" "${ORDER[@]}" <<'PYEOF'
import fnmatch, json, os, re, sys, yaml
skips = yaml.safe_load(open(sys.argv[1]))["skips"]
readme = open(sys.argv[2]).read() if os.path.exists(sys.argv[2]) else ""
work, names = sys.argv[3], sys.argv[4:]
used, bad, passed = set(), [], 0
for name in names:
    path = f"{work}/{name}.checkov.json"
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as e:
        bad.append(name); print(f"{name}: no checkov report ({e})"); continue
    reports = data if isinstance(data, list) else [data]
    ran = 0
    for rep in reports:
        res = rep.get("results", {})
        ran += len(res.get("passed_checks", [])) + len(res.get("failed_checks", []))
        passed += len(res.get("passed_checks", []))
        for f in res.get("failed_checks", []):
            hit = [i for i, s in enumerate(skips) if s["id"] == f["check_id"] and any(fnmatch.fnmatch(f["resource"], g) for g in s["resources"])]
            if hit: used.update(hit)
            else: bad.append(f'{name}: {f["check_id"]} {f["check_name"]} on {f["resource"]}')
    if ran == 0:
        bad.append(name); print(f"{name}: checkov ran no check")
for line in bad:
    if ": CKV" in line: print("failed check not in the skip list:", line)
for i, s in enumerate(skips):
    if i not in used: bad.append(s["id"]); print(f"skip {s['id']} {s['resources']} matched no failure: remove it")
    if not re.search(r"Checkov skips[\s\S]*" + re.escape(s["id"]), readme): bad.append(s["id"]); print(f"skip {s['id']} is not justified in README.md (Checkov skips)")
print(f"{passed} checks passed, {len(used)} skip entries used")
sys.exit(1 if bad else 0)
PYEOF
); then
  pass "checkov: $out"
else
  fail "checkov"; echo "$out" | sed 's/^/       /'
  for name in "${ORDER[@]}"; do [ -s "$WORK/$name.checkov.err" ] && grep -iE 'error|Traceback' "$WORK/$name.checkov.err" | head -5 | sed "s/^/       $name: /"; done
fi
if out=$(checkov -f Dockerfile --framework dockerfile --skip-download --compact --quiet 2>&1); then
  pass "checkov (dockerfile) on Dockerfile"
else
  fail "checkov (dockerfile)"; echo "$out" | sed 's/^/       /'
fi

echo "== wrong values fail clearly"
reject() { # description, expected message regex, helm flags...
  local what=$1 want=$2; shift 2
  if out=$(helm template "$RELEASE" "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_VERSION" "$@" 2>&1); then
    fail "$what: helm template accepted it"
  elif echo "$out" | grep -qE "$want"; then
    pass "$what: $(echo "$out" | grep -E "$want" | head -1 | sed 's/^[- ]*//')"
  else
    fail "$what: unexpected message"; echo "$out" | sed 's/^/       /'
  fi
}
reject "commandWorker.replicas=-1" "/commandWorker/replicas.*minimum" "${EXTERNAL[@]}" --set commandWorker.replicas=-1
reject "a string where a number belongs" "/projector/replicas.*want integer" "${EXTERNAL[@]}" --set-string projector.replicas=two
reject "an unknown appendfsync" "/redis/bundled/appendfsync.*one of" --set redis.bundled.enabled=true --set redis.bundled.appendfsync=sometimes
reject "a misspelt key" "additional propert" "${EXTERNAL[@]}" --set commandWorker.replica=3
reject "no Redis configured" "no Redis configured" 
reject "two Redis choices" "exactly one of redis.url" "${EXTERNAL[@]}" --set redis.bundled.enabled=true
reject "a drain longer than the grace period" "preStopSleepSeconds \\(5\\) \\+ drainTimeoutSeconds \\(28\\) must be less" "${EXTERNAL[@]}" --set commandWorker.drainTimeoutSeconds=28
reject "a durable wait not below the Redis timeout" "commandWorker.durable.timeoutMs \\(200\\) must be below redis.timeoutMs \\(200\\)" "${EXTERNAL[@]}" --set commandWorker.durable.replicas=1 --set redis.timeoutMs=200
reject "a durable grab on the bundled Redis" "durable.replicas > 0 needs a replicated Redis" --set redis.bundled.enabled=true --set commandWorker.durable.replicas=1
reject "an unknown rate-limit key" "/commandWorker/rateLimit/key.*one of" "${EXTERNAL[@]}" --set commandWorker.rateLimit.key=host
reject "a negative rate" "/commandWorker/rateLimit/perSec.*minimum" "${EXTERNAL[@]}" --set-json commandWorker.rateLimit.perSec=-1
reject "a fractional rate given by --set (a string)" "/commandWorker/rateLimit/perSec.*want number" "${EXTERNAL[@]}" --set commandWorker.rateLimit.perSec=2.5
reject "a batch of zero grabs" "/commandWorker/grabBatchMax.*minimum" "${EXTERNAL[@]}" --set commandWorker.grabBatchMax=0
reject "zero connections on the query pods" "/query/maxConnections.*minimum" "${EXTERNAL[@]}" --set query.separate=true --set query.maxConnections=0
reject "a 5xx ratio above 1" "/prometheusRule/http5xxRatio.*maximum" "${EXTERNAL[@]}" --set prometheusRule.enabled=true --set-json prometheusRule.http5xxRatio=5
reject "a runbook URL that is no URL" "/prometheusRule/runbookBaseUrl.*does not match" "${EXTERNAL[@]}" --set prometheusRule.enabled=true --set prometheusRule.runbookBaseUrl=docs/RUNBOOK.md
reject "a zero status interval" "/operator/statusInterval.*does not match" "${EXTERNAL[@]}" --set operator.statusInterval=0s
reject "a Redis poll interval without a unit" "/operator/redisPollInterval.*does not match" "${EXTERNAL[@]}" --set-string operator.redisPollInterval=500
reject "an empty dashboard label" "/grafanaDashboard/label.*" "${EXTERNAL[@]}" --set grafanaDashboard.enabled=true --set grafanaDashboard.label=
if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_VERSION" "${EXTERNAL[@]}" --set redis.timeoutMs=100 >/dev/null 2>&1; then
  pass "durable grab off: a Redis timeout below durable.timeoutMs is accepted (the workers ignore it then)"
else
  fail "durable grab off: a Redis timeout below durable.timeoutMs is refused"
fi
reject "a Kubernetes older than 1.30" "requires kubeVersion: >=1.30" "${EXTERNAL[@]}" --set admissionPolicy.enabled=true --kube-version 1.29.0

echo
if [ ${#failures[@]} -eq 0 ]; then
  echo "test-chart: all checks passed"
else
  echo "test-chart: ${#failures[@]} failure(s):"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
