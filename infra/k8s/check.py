#!/usr/bin/env python3
"""Checks of convoy's rendered Kubernetes manifests that no schema or policy tool makes:
that the parts agree with each other and with the services' own contract.

    check.py RENDERED_DIR    (base.yaml, dev.yaml, prod.yaml, from infra/k8s/check.sh)

Each check says what it found wrong; the script exits 1 if any did.
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# The services, their gRPC port and the health service name their readiness asks for
# (what libs/mesh's server registers for each).
SERVICES = {
    "conversation": (50051, "convoy.v1.ConversationService"),
    "cache": (50061, "convoy.v1.CacheService"),
    "shard-router": (50071, "convoy.v1.ShardRouterService"),
    "analytics": (50081, "convoy.v1.AnalyticsService"),
}
# Services that scale on CPU (the shard-router does not: one leader does its work).
AUTOSCALED = {"conversation", "cache", "analytics"}
# Services that read Postgres, and so need its password.
WITH_SHARDS = {"conversation", "shard-router", "analytics"}
# The services' own drain (CONVOY_DRAIN_TIMEOUT_SECS' default) and the preStop pause.
DRAIN_SECS = 20

failures = []


def fail(where, what):
    failures.append(f"{where}: {what}")


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def config_map(docs, prefix):
    """The generated ConfigMap whose name is `prefix` plus kustomize's hash."""
    found = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", d["metadata"]["name"])
    ]
    return found[0] if len(found) == 1 else None


def check_services(name, docs):
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    budgets = by_kind(docs, "PodDisruptionBudget")
    autoscalers = by_kind(docs, "HorizontalPodAutoscaler")
    for service, (port, health) in SERVICES.items():
        where = f"{name}: Deployment {service}"
        deployment = deployments.get(service)
        if deployment is None:
            fail(name, f"no Deployment {service}")
            continue
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if ports.get("grpc") != port or ports.get("metrics") != 9464:
            fail(where, f"ports {ports}, want grpc {port} and metrics 9464")
        readiness = container.get("readinessProbe", {}).get("grpc", {})
        if readiness != {"port": port, "service": health}:
            fail(where, f"readiness probe {readiness}, want gRPC health of {health} on {port}")
        liveness = container.get("livenessProbe", {}).get("grpc", {})
        if liveness != {"port": port}:
            fail(where, f"liveness probe {liveness}, want gRPC health of the server ('') on {port}")
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if not pause or grace <= pause + DRAIN_SECS:
            fail(where, f"grace period {grace} s must exceed preStop {pause} s + drain {DRAIN_SECS} s")
        env = env_of(container)
        advertise = env.get("CONVOY_ADVERTISE_ADDR", {}).get("value")
        if advertise != f"$(POD_IP):{port}":
            fail(where, f"CONVOY_ADVERTISE_ADDR {advertise!r}, want $(POD_IP):{port}")
        names = [e["name"] for e in container.get("env", [])]
        if "POD_IP" not in names or names.index("POD_IP") > names.index("CONVOY_ADVERTISE_ADDR"):
            fail(where, "POD_IP must be defined before CONVOY_ADVERTISE_ADDR refers to it")
        if env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
            fail(where, "POD_IP must come from the downward API (status.podIP)")
        threads = env.get("TOKIO_WORKER_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef", {})
        if threads.get("resource") != "limits.cpu":
            fail(where, "TOKIO_WORKER_THREADS must come from the CPU limit")
        password = env.get("PGPASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if bool(password) != (service in WITH_SHARDS):
            fail(where, f"PGPASSWORD {'given' if password else 'missing'}: only services with shards get it")
        if password and password != {"name": "convoy-postgres", "key": "password"}:
            fail(where, f"PGPASSWORD must come from the convoy-postgres Secret's password, not {password}")
        others = [e["name"] for e in container.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef") and e["name"] != "PGPASSWORD"]
        if others:
            fail(where, f"no other secret in the environment: {others}")
        resources = container.get("resources", {})
        if "cpu" not in resources.get("requests", {}) or "cpu" not in resources.get("limits", {}):
            fail(where, "CPU request and limit must be set")
        selector = deployment["spec"]["selector"]["matchLabels"]
        for kind, objects in (("Service", services), ("PodDisruptionBudget", budgets)):
            target = objects.get(service)
            wanted = target and (target["spec"].get("selector", {}).get("matchLabels") or target["spec"].get("selector"))
            if not target or wanted != selector:
                fail(where, f"{kind} {service} must select exactly its pods ({selector})")
        headless = services.get(f"{service}-headless")
        if not headless or headless["spec"].get("clusterIP") != "None":
            fail(where, f"no headless Service {service}-headless")
        hpa = autoscalers.get(service)
        if hpa is not None and "replicas" in deployment["spec"]:
            fail(where, "sets replicas although its autoscaler owns the count (an apply would reset it)")
        if (hpa is not None) != (service in AUTOSCALED):
            fail(where, "autoscaled" if hpa else "not autoscaled, but it is stateless")
        if hpa and hpa["spec"]["scaleTargetRef"]["name"] != service:
            fail(where, f"its autoscaler targets {hpa['spec']['scaleTargetRef']['name']}")
        if hpa and hpa["spec"]["minReplicas"] > hpa["spec"]["maxReplicas"]:
            fail(where, "autoscaler minReplicas over maxReplicas")


def check_etcd(name, docs):
    """etcd's member count, its initial cluster and the services' endpoints agree."""
    etcd = by_kind(docs, "StatefulSet").get("etcd")
    cluster = config_map(docs, "etcd-cluster")
    fleet = config_map(docs, "convoy-fleet")
    if not (etcd and cluster and fleet):
        fail(name, "etcd, its etcd-cluster ConfigMap and convoy-fleet must all exist")
        return
    members = etcd["spec"]["replicas"]
    pods = [f"etcd-{i}" for i in range(members)]
    initial = cluster["data"]["ETCD_INITIAL_CLUSTER"].split(",")
    want = [f"{pod}=http://{pod}.etcd:2380" for pod in pods]
    if initial != want:
        fail(name, f"ETCD_INITIAL_CLUSTER {initial} must list the {members} members: {want}")
    endpoints = fleet["data"]["CONVOY_ETCD_ENDPOINTS"].split(",")
    if endpoints != [f"http://{pod}.etcd:2379" for pod in pods]:
        fail(name, f"CONVOY_ETCD_ENDPOINTS {endpoints} must name the {members} members")
    budget = by_kind(docs, "PodDisruptionBudget").get("etcd", {}).get("spec", {})
    if members > 1 and budget.get("minAvailable") != members // 2 + 1:
        fail(name, f"etcd's disruption budget must keep a quorum of {members // 2 + 1}")


def check_shard_map(name, docs):
    """The shard-router's seed map names servers this rendering runs."""
    seed = config_map(docs, "convoy-shard-map")
    if seed is None:
        fail(name, "no convoy-shard-map ConfigMap")
        return
    shard_map = tomllib.loads(seed["data"]["shard-map.toml"])
    statefulsets = by_kind(docs, "StatefulSet")
    services = by_kind(docs, "Service")
    for shard in shard_map["shards"]:
        for dsn in [shard["primary"], *shard.get("replicas", [])]:
            match = re.fullmatch(r"postgres://(\w+)@([a-z0-9-]+)-0\.([a-z0-9-]+):5432/convoy", dsn)
            if not match:
                fail(name, f"{shard['id']}: {dsn} is not postgres://USER@POD.SERVICE:5432/convoy without a password")
                continue
            user, statefulset, service = match.groups()
            if statefulset != service or statefulset not in statefulsets or service not in services:
                fail(name, f"{shard['id']}: {dsn} names no StatefulSet and headless Service {statefulset}")
            if user != "convoy":
                fail(name, f"{shard['id']}: {dsn} must connect as convoy (POSTGRES_USER)")


def check_prices(name, docs):
    """analytics reads the convoy-prices ConfigMap where CONVOY_PRICES says, and its table
    is the local fleet's (infra/local/prices.toml), entry for entry."""
    prices = config_map(docs, "convoy-prices")
    if prices is None:
        fail(name, "no convoy-prices ConfigMap")
        return
    table = tomllib.loads(prices["data"]["prices.toml"])
    if table != tomllib.loads((ROOT / "infra/local/prices.toml").read_text()):
        fail(name, "convoy-prices differs from infra/local/prices.toml")
    analytics = by_kind(docs, "Deployment").get("analytics")
    if analytics is None:
        fail(name, "no analytics Deployment")
        return
    pod = analytics["spec"]["template"]["spec"]
    container = next((c for c in pod["containers"] if c["name"] == "analytics"), None)
    if container is None:
        fail(name, "the analytics Deployment has no analytics container")
        return
    path = env_of(container).get("CONVOY_PRICES", {}).get("value")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = [
        m
        for m in container.get("volumeMounts", [])
        if volumes.get(m["name"], {}).get("configMap", {}).get("name") == prices["metadata"]["name"]
    ]
    if not path or not any(path == f"{m['mountPath']}/prices.toml" for m in mounted):
        fail(name, f"analytics' CONVOY_PRICES ({path}) is not prices.toml of the mounted convoy-prices")


def check_security(name, docs):
    """Every pod: non-root, no escalation, no capabilities, read-only root, seccomp."""
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
        pod = doc["spec"]["template"]["spec"]
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            fail(where, "pod must run as non-root")
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(where, "pod must use the RuntimeDefault seccomp profile")
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container.get("securityContext", {})
            if context.get("allowPrivilegeEscalation") is not False:
                fail(where, f"container {container['name']} must not allow privilege escalation")
            if context.get("readOnlyRootFilesystem") is not True:
                fail(where, f"container {container['name']} must have a read-only root filesystem")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(where, f"container {container['name']} must drop ALL capabilities")
            if ":" not in container["image"] or container["image"].endswith(":latest"):
                if not container["image"].startswith("convoy/"):
                    fail(where, f"image {container['image']} must have a fixed tag")
        budgets = [
            b
            for b in by_kind(docs, "PodDisruptionBudget").values()
            if all(
                doc["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in b["spec"]["selector"]["matchLabels"].items()
            )
        ]
        if len(budgets) != 1:
            fail(where, f"{len(budgets)} disruption budgets select its pods; want exactly 1")


def check_prometheus_job():
    """The cluster's Prometheus job relabels as infra's Kubernetes job does."""
    infra = yaml.safe_load((ROOT / "infra/observability/prometheus/prometheus.yml").read_text())
    cluster = yaml.safe_load((ROOT / "k8s/observability/prometheus.yml").read_text())
    job = lambda config: next(j for j in config["scrape_configs"] if j["job_name"] == "kubernetes-pods")
    if job(infra)["relabel_configs"] != job(cluster)["relabel_configs"]:
        fail("k8s/observability/prometheus.yml", "its kubernetes-pods relabelling differs from infra's")
    if infra["global"] != cluster["global"]:
        fail("k8s/observability/prometheus.yml", "its global settings differ from infra's")


def main():
    rendered = Path(sys.argv[1])
    for name in ("base", "dev", "prod"):
        docs = load(rendered / f"{name}.yaml")
        check_services(name, docs)
        check_etcd(name, docs)
        check_shard_map(name, docs)
        check_prices(name, docs)
        check_security(name, docs)
    prod_images = {
        c["image"]
        for d in load(rendered / "prod.yaml")
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    for image in prod_images:
        if image.startswith("convoy/"):
            fail("prod", f"image {image} has no registry and tag")
    check_prometheus_job()
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print("k8s: services, probes, shutdown, registration, etcd membership, shard map, price table, security and budgets agree")


if __name__ == "__main__":
    main()
