#!/usr/bin/env python3
"""Checks of the chart's Grafana dashboard and PrometheusRule, called by
scripts/test-monitoring.sh (which renders the chart, runs promtool and the
seckill processes whose /metrics are compared here).

  extract RENDER.yaml OUTDIR      rules.yaml (the PrometheusRule's groups) and
                                  dashboard.json (the ConfigMap's dashboard)
  dashboard DASHBOARD.json OUT    sanity of the dashboard; its queries, Grafana
                                  variables resolved, as recording rules in OUT
                                  (for `promtool check rules`)
  coverage RULES.yaml TESTS.yaml  every alert has a firing and a silent case
  runbook RULES.yaml RUNBOOK.md   every alert links to its own runbook section,
                                  which says what it means, how to confirm it
                                  and what to do
  names RULES.yaml DASHBOARD.json NAME=SCRAPE.txt...
                                  every metric a panel or an alert uses is in
                                  the /metrics of a seckill process (or is
                                  listed below as coming from elsewhere), with
                                  the labels and label values it selects
"""

import json
import re
import sys

import yaml

# Metrics the dashboard or the alerts use that no seckill process exposes,
# and who does. Keep it exact: an entry nothing uses fails the check.
FROM_ELSEWHERE = {
    "kube_horizontalpodautoscaler_status_current_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_status_desired_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics",
}

# Labels Prometheus adds to every scraped series (target labels): never in
# the /metrics text itself.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container"}

# What the dashboard must show (the sale on one screen): one metric each.
DASHBOARD_MUST_USE = {
    "seckill_http_requests_total": "grabs/s by outcome, 5xx",
    "seckill_http_request_duration_seconds_bucket": "grab latency",
    "seckill_operator_promotion_coupons_remaining": "coupons remaining per promotion",
    "seckill_projector_lag_seconds_bucket": "projection lag",
    "seckill_redis_errors_total": "Redis errors and timeouts",
    "seckill_operator_reconcile_failures_total": "operator reconcile errors",
    "kube_horizontalpodautoscaler_status_current_replicas": "HPA replicas",
}

# Grafana's built-in interval variables, replaced by a plausible value so the
# query can be parsed as PromQL.
GRAFANA_INTERVALS = {
    "${__rate_interval}": "5m",
    "$__rate_interval": "5m",
    "${__interval}": "1m",
    "$__interval": "1m",
    "${__range}": "1h",
    "$__range": "1h",
}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}")


def ok(msg):
    print(f"  ok   {msg}")


def finish():
    if failures:
        sys.exit(1)


# --- PromQL: just enough of a lexer to find selectors -----------------------

TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<comment>\#[^\n]*)
    |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|s|m|h|d|w|y)?(?:\d+(?:ms|s|m|h|d|w|y))*|0x[0-9a-fA-F]+)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){}\[\],=<>@])""",
    re.X,
)
AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
               "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "Inf", "NaN"}


def lex(expr):
    pos, out = 0, []
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            out.append((kind, m.group()))
    return out


def unquote(s):
    if s[0] == "`":
        return s[1:-1]
    return re.sub(r"\\(.)", r"\1", s[1:-1])


def parse_promql(expr):
    """(selectors, grouping labels): selectors as (metric, [(label, op, value)])."""
    toks = lex(expr)
    selectors, grouping = [], []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "op" and text == "[":
            while toks[i][1] != "]":
                i += 1
        elif kind == "op" and text == "{":
            raise ValueError("a selector without a metric name: the check needs names")
        elif kind == "ident":
            if text in LABEL_LISTS:
                if nxt == "(":
                    i += 2
                    while toks[i][1] != ")":
                        if toks[i][0] == "ident":
                            grouping.append(toks[i][1])
                        i += 1
            elif nxt == "(" or text in KEYWORDS or (text in AGGREGATORS and nxt in ("by", "without")):
                pass
            else:
                matchers = []
                if nxt == "{":
                    i += 2
                    while toks[i][1] != "}":
                        if toks[i][1] == ",":
                            i += 1
                            continue
                        label, op, value = toks[i][1], toks[i + 1][1], unquote(toks[i + 2][1])
                        matchers.append((label, op, value))
                        i += 3
                selectors.append((text, matchers))
        i += 1
    return selectors, grouping


def resolve_grafana(expr):
    for var, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


# --- rendered chart ---------------------------------------------------------

def cmd_extract(render, outdir):
    objs = [d for d in yaml.safe_load_all(open(render)) if d]
    rules = [o for o in objs if o.get("kind") == "PrometheusRule"]
    maps = [o for o in objs if o.get("kind") == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    if len(rules) != 1 or len(maps) != 1:
        fail(f"expected one PrometheusRule and one dashboard ConfigMap, got {len(rules)} and {len(maps)}")
        return
    assert rules[0]["apiVersion"] == "monitoring.coreos.com/v1"
    with open(f"{outdir}/rules.yaml", "w") as f:
        yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, f, sort_keys=False, width=1000)
    (key, text), = maps[0]["data"].items()
    with open(f"{outdir}/dashboard.json", "w") as f:
        f.write(text)
    ok(f"PrometheusRule {rules[0]['metadata']['name']} and ConfigMap {maps[0]['metadata']['name']} ({key}) extracted")


def alerts_of(rules_file):
    groups = yaml.safe_load(open(rules_file))["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def panels_of(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows


def cmd_dashboard(path, out):
    text = open(path).read()
    try:
        d = json.loads(text)
    except ValueError as e:
        fail(f"dashboard is not JSON: {e}")
        return
    if re.search(r"__[A-Z_]+__", text):
        fail(f"dashboard keeps a placeholder: {re.search(r'__[A-Z_]+__', text).group()}")
    if not d.get("uid") or len(d["uid"]) > 40 or not d.get("title"):
        fail(f"dashboard uid {d.get('uid')!r} (1..40 characters) and title {d.get('title')!r} must be set")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("dashboard needs a 'datasource' variable of type datasource (query prometheus)")
    templated = {"type": "prometheus", "uid": "${datasource}"}
    rules, ids, cells, used = [], set(), set(), set()
    panels = [p for p in panels_of(d) if p.get("type") != "row"]
    for p in panels:
        name = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            fail(f"{name}: duplicate id")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] + g["w"] > 24:
            fail(f"{name}: gridPos {g} must have x, y, w, h with x + w <= 24")
            continue
        if g["y"] + g["h"] > 24:
            fail(f"{name}: below the first screen (y + h = {g['y'] + g['h']} > 24)")
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        if mine & cells:
            fail(f"{name}: overlaps another panel")
        cells |= mine
        if p.get("datasource") != templated:
            fail(f"{name}: datasource {p.get('datasource')} is not the templated {templated}")
        targets = p.get("targets") or []
        if not targets:
            fail(f"{name}: no query")
        for t in targets:
            if t.get("datasource") != templated:
                fail(f"{name} {t.get('refId')}: datasource {t.get('datasource')} is not templated")
            expr = (t.get("expr") or "").strip()
            if not expr:
                fail(f"{name} {t.get('refId')}: empty query")
                continue
            try:
                resolved = resolve_grafana(expr)
                used.update(m for m, _ in parse_promql(resolved)[0])
            except ValueError as e:
                fail(f"{name} {t.get('refId')}: {e}")
                continue
            rules.append({"record": f"dashboard:panel{p.get('id')}_{t.get('refId')}", "expr": resolved})
    for metric, what in DASHBOARD_MUST_USE.items():
        if metric not in used:
            fail(f"dashboard shows no {what} (no panel uses {metric})")
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f, sort_keys=False, width=1000)
    if not failures:
        ok(f"dashboard {d.get('title')!r}: {len(panels)} panels, {len(rules)} queries, datasource templated, "
           f"on one screen, shows {', '.join(DASHBOARD_MUST_USE.values())}")


def cmd_coverage(rules_file, tests_file):
    tests = yaml.safe_load(open(tests_file))["tests"]
    firing, silent = {}, {}
    for t in tests:
        for case in t.get("alert_rule_test", []):
            bucket = firing if case.get("exp_alerts") else silent
            bucket.setdefault(case["alertname"], []).append(t["name"])
    names = [a["alert"] for a in alerts_of(rules_file)]
    for name in names:
        if not firing.get(name) or not silent.get(name):
            fail(f"{name}: needs a firing and a silent case in {tests_file} (firing {len(firing.get(name, []))}, silent {len(silent.get(name, []))})")
    for name in set(firing) | set(silent):
        if name not in names:
            fail(f"{tests_file} tests {name}, which is no alert")
    if not failures:
        ok(f"{len(names)} alerts, each with a firing and a silent promtool case")


def cmd_runbook(rules_file, runbook):
    text = open(runbook).read()
    sections = {}
    for m in re.finditer(r"^## (\S+)\s*$([\s\S]*?)(?=^## |\Z)", text, re.M):
        sections[m.group(1).lower()] = (m.group(1), m.group(2))
    alerts = alerts_of(rules_file)
    for a in alerts:
        url = a.get("annotations", {}).get("runbook_url", "")
        base, _, anchor = url.partition("#")
        if not base.endswith("docs/RUNBOOK.md") or anchor != a["alert"].lower():
            fail(f"{a['alert']}: runbook_url {url!r} is not docs/RUNBOOK.md#{a['alert'].lower()}")
            continue
        if anchor not in sections:
            fail(f"{a['alert']}: no section '## {a['alert']}' in {runbook}")
            continue
        body = sections[anchor][1]
        for part in ("What it means", "How to confirm", "What to do"):
            if not re.search(rf"^### {part}\s*$\n+\S", body, re.M):
                fail(f"{a['alert']}: its runbook section has no '### {part}' with text")
        if not re.search(r"`[^`]*seckill_[a-z_]+", body):
            fail(f"{a['alert']}: its runbook section names no metric to look at")
    names = {a["alert"].lower() for a in alerts}
    for key, (title, _) in sections.items():
        if key.startswith("seckill") and key not in names:
            fail(f"{runbook}: section '## {title}' belongs to no alert")
    if not failures:
        ok(f"{len(alerts)} alerts link to their own {runbook} section (what it means, how to confirm, what to do)")


# --- /metrics ---------------------------------------------------------------

SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+\S+")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
SUFFIXES = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
            "gaugehistogram": ["_bucket", "_gsum", "_gcount"], "summary": ["", "_sum", "_count", "_created"],
            "info": ["_info"], "stateset": [""], "gauge": [""], "unknown": [""]}


def read_exposition(path):
    """{sample name: (family, type, [label dicts])} of one /metrics text."""
    types, out = {}, {}
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
            for suffix in SUFFIXES.get(kind, [""]):
                out.setdefault(family + suffix, (family, kind, []))
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            if not m:
                raise ValueError(f"{path}: cannot read {line!r}")
            name = m.group(1)
            family = next((f for f in types if name.startswith(f) and name[len(f):] in SUFFIXES[types[f]]), name)
            entry = out.setdefault(name, (family, types.get(family, "untyped"), []))
            entry[2].append(dict(LABEL.findall(m.group(2) or "")))
    return out


def cmd_names(rules_file, dashboard_file, scrapes):
    exposed = {}  # sample name -> {source: (family, type, samples)}
    for arg in scrapes:
        source, _, path = arg.partition("=")
        for name, entry in read_exposition(path).items():
            exposed.setdefault(name, {})[source] = entry
    queries = [(f"alert {a['alert']}", a["expr"]) for a in alerts_of(rules_file)]
    d = json.load(open(dashboard_file))
    queries += [(f"panel {p.get('title')!r} {t.get('refId')}", resolve_grafana(t["expr"]))
                for p in panels_of(d) for t in p.get("targets", []) if t.get("expr")]
    used_elsewhere, checked = set(), {}
    for where, expr in queries:
        try:
            selectors, grouping = parse_promql(expr)
        except ValueError as e:
            fail(f"{where}: {e}")
            continue
        samples_here = []
        for metric, matchers in selectors:
            if metric in FROM_ELSEWHERE:
                used_elsewhere.add(metric)
                continue
            if metric not in exposed:
                hint = ""
                for name, by in exposed.items():
                    family, kind, _ = next(iter(by.values()))
                    if family == metric and kind != "gauge":
                        hint = f" ({metric} is a {kind}: query {', '.join(family + s for s in SUFFIXES[kind] if s and s != '_created')})"
                fail(f"{where}: {metric} is in no /metrics ({', '.join(s.split('=')[0] for s in scrapes)}){hint}")
                continue
            by = exposed[metric]
            samples = [s for (_, _, ss) in by.values() for s in ss]
            samples_here += samples
            checked.setdefault(metric, set()).update(by)
            if not samples:
                print(f"       note: {metric} is declared but has no sample: its labels are not checked")
                continue
            for label, op, value in matchers:
                if label in TARGET_LABELS:
                    continue
                values = {s[label] for s in samples if label in s}
                if not values:
                    fail(f"{where}: {metric} has no label {label!r} (its labels: {sorted({k for s in samples for k in s})})")
                elif op == "=" and value not in values:
                    fail(f"{where}: no {metric} sample has {label}={value!r} (seen: {sorted(values)})")
                elif op == "=~" and not any(re.fullmatch(value, v) for v in values):
                    fail(f"{where}: no {metric} sample has {label} matching {value!r} (seen: {sorted(values)})")
        for label in grouping:
            if label not in TARGET_LABELS and samples_here and not any(label in s for s in samples_here):
                fail(f"{where}: groups by {label!r}, a label none of its metrics has")
    for metric in FROM_ELSEWHERE:
        if metric not in used_elsewhere:
            fail(f"{metric} is listed as coming from {FROM_ELSEWHERE[metric]} but nothing uses it: remove it")
    for metric, sources in sorted(checked.items()):
        family, kind, _ = next(iter(exposed[metric].values()))
        print(f"       {metric:55} {kind} {family}, from {', '.join(sorted(sources))}")
    for metric in sorted(used_elsewhere):
        print(f"       {metric:55} from {FROM_ELSEWHERE[metric]} (not a seckill process)")
    if not failures:
        ok(f"{len(queries)} queries: {len(checked)} metrics found in the seckill /metrics with the labels and values they select; {len(used_elsewhere)} from kube-state-metrics")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"extract": cmd_extract, "dashboard": cmd_dashboard, "coverage": cmd_coverage,
     "runbook": cmd_runbook, "names": lambda r, d, *s: cmd_names(r, d, s)}[cmd](*args)
    finish()


if __name__ == "__main__":
    main()
