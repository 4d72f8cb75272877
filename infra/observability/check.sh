#!/usr/bin/env bash
# Checks infra/observability: the Prometheus config and rules (promtool check config,
# promtool check rules, promtool test rules), the YAML and JSON of every file, the Grafana
# dashboards (datasource variable, service variable, every expression naming only convoy's
# metrics), the rules' metric names, and the OpenTelemetry collector's pipelines.
#
#   infra/observability/check.sh
#
# infra/local/test.sh runs it. Installs promtool (Debian's prometheus package) and PyYAML
# (infra/local/requirements.txt) when missing.
#
# The metric names the dashboards and rules may use are METRICS below: keep it in step with
# the services' metrics (grep -rn 'counter!\|gauge!\|histogram!' libs services).
set -euo pipefail

# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"
OBS="$CONVOY_ROOT/infra/observability"
cd "$OBS"

# --- tools ---
if ! command -v promtool >/dev/null 2>&1; then
    sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 || die "promtool not found; install it as root: apt-get install -y prometheus"
        sudo=(sudo)
    fi
    log "promtool not found: installing Debian's prometheus package with apt-get"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
    command -v promtool >/dev/null 2>&1 || die "prometheus installed but promtool still not on PATH"
fi
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    pyyaml="$(grep -i '^pyyaml' "$CONVOY_ROOT/infra/local/requirements.txt")"
    log "installing $pyyaml"
    if ! out="$(python3 -m pip install --quiet "$pyyaml" 2>&1)"; then
        grep -q 'externally-managed-environment' <<<"$out" || {
            printf '%s\n' "$out" >&2
            die "pip install $pyyaml failed"
        }
        python3 -m pip install --quiet --break-system-packages "$pyyaml"
    fi
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/convoy-obs.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# --- Prometheus config ---
log "promtool check config prometheus/prometheus.yml"
if ! out="$(promtool check config prometheus/prometheus.yml 2>&1)"; then
    if grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
        # Debian builds Prometheus without Kubernetes service discovery: check a copy whose
        # kubernetes_sd_configs are replaced by empty static_configs (the relabelling is still
        # checked) and check the discovery blocks below in Python.
        log "this promtool lacks Kubernetes discovery (Debian's build): checking a copy with kubernetes_sd_configs swapped for static_configs"
        python3 - "$tmp/prometheus.yml" <<'EOF'
import os, sys, yaml
with open("prometheus/prometheus.yml") as f:
    config = yaml.safe_load(f)
config["rule_files"] = [os.path.abspath(os.path.join("prometheus", p)) for p in config.get("rule_files", [])]
for job in config["scrape_configs"]:
    sds = job.pop("kubernetes_sd_configs", None)
    if sds is not None:
        for sd in sds:
            assert sd.get("role") in {"pod", "service", "endpoints", "endpointslice", "node", "ingress"}, sd
        job["static_configs"] = [{"targets": []}]
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
        promtool check config "$tmp/prometheus.yml"
    else
        printf '%s\n' "$out" >&2
        die "promtool check config failed"
    fi
else
    printf '%s\n' "$out"
fi

# --- rules ---
log "promtool check rules prometheus/rules/convoy.rules.yml"
promtool check rules prometheus/rules/convoy.rules.yml
log "promtool test rules prometheus/rules/convoy.rules.test.yml"
(cd prometheus/rules && promtool test rules convoy.rules.test.yml)

# --- YAML, JSON, metric names, dashboards, collector ---
log "checking YAML, dashboards, metric names and the collector's pipelines"
python3 - <<'EOF'
import glob, json, re, sys
import yaml

# The metrics convoy's services export ("up" is Prometheus's own).
METRICS = {
    "up",
    "convoy_server_in_flight", "convoy_server_queued", "convoy_server_shed_total",
    "convoy_client_retries_total", "convoy_client_requests_total", "convoy_client_failfast_total",
    "convoy_client_reconnects_total", "convoy_client_keyed_unavailable_total",
    "convoy_breaker_transitions_total", "convoy_breaker_state",
    "convoy_cache_lookups_total", "convoy_conversation_reads_total",
    "convoy_cache_bus_dropped_total", "convoy_cache_bus_flushes_total", "convoy_cache_bus_current",
    "convoy_store_replica_lag_bytes", "convoy_store_replica_lag_seconds",
    "convoy_db_pool_connections", "convoy_db_pool_max_connections",
    "convoy_db_slow_statements_total",
    "convoy_conversation_fenced_total", "convoy_conversation_replica_fallbacks_total",
    "convoy_consistency_checks_total", "convoy_consistency_inconsistent_total",
    "convoy_analytics_shard_queries_total", "convoy_analytics_missing_shards_total",
    "convoy_analytics_cache_total",
}
HISTOGRAMS = {
    "convoy_rpc_server_duration_seconds", "convoy_rpc_client_duration_seconds",
    "convoy_cache_bus_lag_seconds", "convoy_db_pool_acquire_duration_seconds",
    "convoy_db_statement_duration_seconds", "convoy_shard_router_write_pause_seconds",
}
for h in HISTOGRAMS:
    METRICS |= {h + "_bucket", h + "_count", h + "_sum"}

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "atan2"}
errors = []


def metric_names(expr):
    """The metric (series) names a PromQL expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"(?<![\w:])\d[\w.]*", "", e)  # numbers and durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if re.match(r"\s*\(", e[m.end():]) or m.group(0).lower() in KEYWORDS:
            continue  # a function, an aggregation or a keyword
        names.add(m.group(0))
    return names


def check_expr(where, expr, allowed):
    names = metric_names(expr)
    if not names:
        errors.append(f"{where}: no metric found in {expr!r}")
    for name in sorted(names - allowed):
        errors.append(f"{where}: unknown metric {name!r} in {expr!r}")


# Every YAML file parses.
docs = {}
for path in sorted(glob.glob("**/*.y*ml", recursive=True)):
    try:
        with open(path) as f:
            docs[path] = yaml.safe_load(f)
    except yaml.YAMLError as e:
        errors.append(f"{path}: {e}")

# Rules: only known metrics and names recorded in the same file.
rules = docs["prometheus/rules/convoy.rules.yml"]
recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
alerts = 0
for group in rules["groups"]:
    for rule in group["rules"]:
        name = rule.get("record") or rule.get("alert")
        check_expr(f"rules {name}", rule["expr"], METRICS | recorded)
        if "alert" in rule:
            alerts += 1
            if "for" not in rule or "severity" not in rule.get("labels", {}):
                errors.append(f"rules {name}: an alert needs for: and a severity label")
            ann = rule.get("annotations", {})
            if not ann.get("summary") or not ann.get("description"):
                errors.append(f"rules {name}: an alert needs summary and description annotations")

# Prometheus config: the convoy jobs and the Kubernetes discovery.
prom = docs["prometheus/prometheus.yml"]
jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
for service in ("conversation", "cache", "shard-router", "analytics"):
    if service not in jobs:
        errors.append(f"prometheus.yml: no scrape job {service!r}")
k8s = [j for j in prom["scrape_configs"] if j.get("kubernetes_sd_configs")]
if not k8s or k8s[0]["kubernetes_sd_configs"][0].get("role") != "pod":
    errors.append("prometheus.yml: no kubernetes_sd_configs job with role: pod")
else:
    targets = {r.get("target_label") for r in k8s[0].get("relabel_configs", [])}
    for label in ("namespace", "pod", "service", "job", "__address__"):
        if label not in targets:
            errors.append(f"prometheus.yml: the Kubernetes job does not set {label!r}")

# Dashboards.
panels_seen = exprs_seen = 0
for path in sorted(glob.glob("grafana/dashboards/*.json")):
    with open(path) as f:
        try:
            dash = json.load(f)
        except json.JSONDecodeError as e:
            errors.append(f"{path}: {e}")
            continue
    if not 36 <= dash.get("schemaVersion", 0) <= 41:
        errors.append(f"{path}: schemaVersion {dash.get('schemaVersion')} is not ~39")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append(f"{path}: no `datasource` variable of type datasource, query prometheus")
    svc = variables.get("service")
    if not svc or svc.get("type") != "query":
        errors.append(f"{path}: no `service` query variable")
    else:
        q = svc["query"]["query"] if isinstance(svc["query"], dict) else svc["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
        if not m:
            errors.append(f"{path}: the service variable is not label_values(...): {q!r}")
        else:
            check_expr(f"{path} variable service", m.group(1), METRICS)

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for panel in walk(dash.get("panels", [])):
        if panel.get("type") == "row":
            continue
        panels_seen += 1
        where = f"{path} panel {panel.get('title')!r}"
        uid = (panel.get("datasource") or {}).get("uid")
        if uid != "${datasource}":
            errors.append(f"{where}: datasource uid {uid!r}, not ${{datasource}}")
        if not panel.get("targets"):
            errors.append(f"{where}: no targets")
        for t in panel.get("targets", []):
            if (t.get("datasource") or {}).get("uid") not in (None, "${datasource}"):
                errors.append(f"{where}: a target's datasource is not ${{datasource}}")
            exprs_seen += 1
            check_expr(where, t.get("expr", ""), METRICS)

# Grafana provisioning.
for path, doc in docs.items():
    if path.startswith("grafana/provisioning/"):
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1:
            errors.append(f"{path}: not a provisioning file (apiVersion: 1)")
        elif "datasources" not in doc and "providers" not in doc:
            errors.append(f"{path}: neither datasources nor providers")

# OpenTelemetry collector: every pipeline's components are defined, receivers take OTLP on
# 4317 and 4318, traces go to Jaeger.
col = docs["otel/collector.yaml"]
for name, pipeline in col["service"]["pipelines"].items():
    for kind in ("receivers", "processors", "exporters"):
        for component in pipeline.get(kind, []):
            if component not in (col.get(kind) or {}):
                errors.append(f"otel/collector.yaml: pipeline {name} uses undefined {kind[:-1]} {component!r}")
    if pipeline.get("processors", [""])[0] != "memory_limiter":
        errors.append(f"otel/collector.yaml: pipeline {name} does not start with memory_limiter")
for ext in col["service"].get("extensions", []):
    if ext not in (col.get("extensions") or {}):
        errors.append(f"otel/collector.yaml: undefined extension {ext!r}")
protocols = col["receivers"]["otlp"]["protocols"]
if not protocols["grpc"]["endpoint"].endswith(":4317") or not protocols["http"]["endpoint"].endswith(":4318"):
    errors.append("otel/collector.yaml: OTLP receivers not on 4317 (gRPC) and 4318 (HTTP)")
if "traces" not in col["service"]["pipelines"]:
    errors.append("otel/collector.yaml: no traces pipeline")

for e in errors:
    print(f"[convoy] error: {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(docs)} YAML files, {len(recorded)} recording rules and {alerts} alerts, "
      f"{panels_seen} panels with {exprs_seen} expressions: all use known metrics")
EOF
log "infra/observability: all checks passed"
