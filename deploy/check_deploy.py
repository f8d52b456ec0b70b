"""Structural checks of deploy/, run by deploy/check.sh inside .tools/venv.

Each subcommand prints one line per thing it checked and exits 1 if anything
is wrong. The variables and metric names come from the binaries themselves
(`<service> --print-contract`, gathered by deploy/check.sh into ECWID_CONTRACT);
ports, value rules and JetStream names are written out below.

    check_deploy.py k8s-files DIR                 every manifest file under DIR
    check_deploy.py k8s-rendered NAME FILE        one rendered overlay
    check_deploy.py compose FILE
    check_deploy.py prometheus-config FILE
    check_deploy.py rules-sync ALERTS PROMETHEUSRULE
    check_deploy.py metric-names FILE...           every ecwid_* name is in the contract
    check_deploy.py dashboard FILE OUT_RULES       also writes its queries as a rules file for promtool
    check_deploy.py dockerfile FILE
    check_deploy.py readme ROOT                    the README's tables against the binaries' contract
    check_deploy.py metric-source ROOT             the metric names against the services' code
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
from typing import Any, Iterable

import kubernetes_validate
import yaml

# --------------------------------------------------------------------------- contract

def load_contract() -> dict:
    """The services' contract as the binaries print it (`<service> --print-contract`, gathered by
    deploy/check.sh into the JSON list named by ECWID_CONTRACT): what each reads and exports.
    Nothing here keeps its own list of variables or metric names."""
    path = os.environ.get("ECWID_CONTRACT")
    if not path:
        sys.exit("ECWID_CONTRACT is not set: run deploy/check.sh, which gathers the binaries' --print-contract")
    return {c["service"]: c for c in json.loads(pathlib.Path(path).read_text(encoding="utf-8"))}


CONTRACT = load_contract()
# Every variable each service reads.
SERVICE_ENV = {svc: set(c["variables"]) for svc, c in CONTRACT.items()}
# Containers that are not ours, and the variables their manifests may set.
OTHER_ENV = {"nats": {"POD_NAME", "GOMEMLIMIT"}, "exporter": set()}

# Where each service serves /metrics, /healthz, /readyz.
OPS_PORT = {"ingest": 8081, "normalizer": 9101, "deliverer": 9102, "poller": 9103}
LISTEN_VALUE = {
    ("ingest", "INGEST_LISTEN"): "0.0.0.0:8080",
    ("ingest", "ADMIN_LISTEN"): "0.0.0.0:8081",
    ("normalizer", "OPS_LISTEN"): "0.0.0.0:9101",
    ("deliverer", "OPS_LISTEN"): "0.0.0.0:9102",
    ("poller", "OPS_LISTEN"): "0.0.0.0:9103",
}
# Settings a manifest must set for a service, beyond its listen addresses: the
# poller's API URL, so where it sends store tokens is written down, not defaulted.
REQUIRED_ENV = {"poller": {"ECWID_API_URL"}}
# Variables whose default is a whole number take only whole numbers.
NUMERIC_ENV = {
    name
    for c in CONTRACT.values()
    for name, read in c["variables"].items()
    if re.fullmatch(r"\d+", read.get("default") or "")
}
ENUM_ENV = {"LOG_FORMAT": {"text", "json"}, "INGEST_REQUIRE_SIGNATURE": {"true", "false"}}
# Durations as shared::config::parse_duration reads them: a number and a unit (ms, s, m, h, d;
# none = seconds). DELIVER_DISABLE_AFTER=0 means never.
DURATION_ENV = {"DELIVER_DISABLE_AFTER", "EVENT_LOG_RETENTION"}
DURATION_RE = re.compile(r"^\d+\s*(ms|s|m|h|d)?$")

# SHUTDOWN_GRACE_MS is the whole shutdown of a service, from SIGTERM to exit (the
# work in hand, then the NATS drain; shared/src/shutdown.rs). What an orchestrator
# waits before SIGKILL must exceed it by this margin: signal delivery, the
# runtime's stop, a slow node. Kubernetes counts a preStop hook inside
# terminationGracePeriodSeconds, so that comes on top. Documented in
# deploy/README.md ("Shutdown").
TERMINATION_MARGIN_SECONDS = 5
# The services' default when SHUTDOWN_GRACE_MS is not set.
DEFAULT_SHUTDOWN_GRACE_MS = 20000
# One NATS_URL entry: nats:// or tls://, or a bare host:port; comma-separated for a cluster.
NATS_URL_ENTRY = re.compile(r"^((nats|tls)://)?([^\s:/@,]+(:[^\s@/,]*)?@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:\d{1,5})?$")


def nats_url_ok(value: str) -> bool:
    return all(NATS_URL_ENTRY.match(e.strip()) for e in value.split(","))


def shutdown_budget_seconds(env: dict) -> float:
    return int(env.get("SHUTDOWN_GRACE_MS") or DEFAULT_SHUTDOWN_GRACE_MS) / 1000


def parse_compose_duration(value: Any) -> float | None:
    """Compose durations: 30s, 1m30s, 500ms, or a bare number of seconds."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s|us)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * scale[u] for n, u in parts)


# JetStream: stream -> its durable pull consumer.
CONSUMERS = {"ECWID_RAW": "normalizer", "ECWID_EVENTS": "deliverer"}

# Metric names by type, as the binaries register them.
def metrics_of(kind: str) -> set[str]:
    return {name for c in CONTRACT.values() for name, k in c["metrics"].items() if k == kind}


COUNTERS = metrics_of("counter")
GAUGES = metrics_of("gauge")
HISTOGRAMS = metrics_of("histogram")
METRIC_NAMES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# Label values the contract fixes, for selectors that name them.
LABEL_VALUES = {
    "outcome": {
        "accepted", "duplicate", "unauthorized", "invalid", "unknown_store", "too_large",
        "unsupported_media_type", "unavailable", "stream_full",  # ingest
        "normalized", "filtered", "dead_lettered", "retried", "order_wait",  # normalizer
        "success", "failure",  # deliverer
        "ok", "rate_limited", "refused", "server_error", "timeout", "error",  # poller requests
        "unchanged", "backing_off", "failed",  # poller cycles (also ok, refused)
    },
    "format": {"v3", "ion", "unknown"},
    "stage": {"normalize", "deliver"},
    "status_class": {"2xx", "3xx", "4xx", "5xx", "timeout", "connect_error", "refused"},
    "reason": None,  # free (bounded by the code)
    "consumer": {"normalizer", "deliverer"},
    "state": {"active", "paused", "disabled"},  # ecwid_instances
    "stream": {  # ecwid_stream_usage_ratio: the streams STREAM_MAX_BYTES / STREAM_MAX_MSGS name
        "ECWID_RAW", "ECWID_EVENTS", "ECWID_DEAD", "ECWID_HELD", "ECWID_RETRYING", "ECWID_LOG_SPOOL",
    },
    # ecwid_deliver_breaker_transitions_total; ecwid_instance_transitions_total
    "to": {"open", "half_open", "closed", "paused", "active", "disabled"},
}


def pinned_nats_tag() -> str:
    """`<NATS_VERSION>-alpine`: the release scripts/nats-versions.env pins (one source of truth)."""
    env = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "nats-versions.env"
    found = re.search(r"^NATS_VERSION=(\S+)$", env.read_text(encoding="utf-8"), re.M)
    return f"{found.group(1) if found else 'missing-from-scripts/nats-versions.env'}-alpine"


# The event log's PostgreSQL in compose: a pinned release of the official image.
POSTGRES_COMPOSE_TAG = "17.6-alpine"
# Images each deployment may use (repository -> allowed tags, None = any tag).
COMPOSE_IMAGES = {
    "ecwid-events": {"latest"},
    "nats": {pinned_nats_tag()},
    "postgres": {POSTGRES_COMPOSE_TAG},
    "prom/prometheus": None,
    "natsio/prometheus-nats-exporter": None,
    # The `tracing` profile only.
    "otel/opentelemetry-collector": None,
    "jaegertracing/all-in-one": None,
}

BUILTIN_KINDS_SKIPPED = set()
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule", "Cluster"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PersistentVolume"}
# Oldest supported Kubernetes (preStop `sleep` needs 1.30) and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Created by the operator, not by any overlay (see overlays/*/*.example.yaml).
EXTERNAL_SECRETS = {"ecwid-events-admin", "ecwid-events-database"}

# --------------------------------------------------------------------------- the event log's database

# The variables naming the database (EVENT_LOG_DATABASE_URL wins; DATABASE_URL is the fallback).
DATABASE_URL_ENV = ("EVENT_LOG_DATABASE_URL", "DATABASE_URL")
DATABASE_CA_ENV = "EVENT_LOG_DATABASE_CA_FILE"
DATABASE_POOL_ENV = "EVENT_LOG_DATABASE_POOL"
DEFAULT_DATABASE_POOL = 8
# What a URL may say (the services' parser: scheme, sslmode).
DATABASE_URL_RE = re.compile(r"^postgres(ql)?://[^\s/@]+(:[^\s/@]*)?@[^\s/:@?]+(:\d{1,5})?/[A-Za-z0-9_]+(\?\S*)?$")
SSLMODES = {"disable", "prefer", "require", "verify-ca", "verify-full"}
# PostgreSQL port, and what a CloudNativePG cluster's pods are labelled with.
POSTGRES_PORT = 5432
CNPG_CLUSTER_LABEL = "cnpg.io/cluster"
# CloudNativePG's instance manager status port: the operator and the other instances reach it.
CNPG_STATUS_PORT = 8000
# The namespace the CloudNativePG operator runs in (its default).
CNPG_OPERATOR_NAMESPACE = "cnpg-system"
# Connections a CloudNativePG cluster keeps for itself besides the services' pools:
# superuser_reserved_connections (3) and the instance manager's own (a few per instance).
CNPG_RESERVED_CONNECTIONS = 10
# The fields of a CloudNativePG Cluster's spec these manifests may use (postgresql.cnpg.io/v1,
# operator 1.25+). A name outside the list is a typo the API server would prune in silence.
CNPG_CLUSTER_SPEC_FIELDS = {
    "instances", "imageName", "imagePullPolicy", "primaryUpdateStrategy", "primaryUpdateMethod",
    "bootstrap", "postgresql", "storage", "walStorage", "resources", "affinity", "backup",
    "plugins", "monitoring", "certificates", "enableSuperuserAccess", "superuserSecret",
    "managed", "description", "inheritedMetadata", "priorityClassName", "startDelay", "stopDelay",
    "smartShutdownTimeout", "switchoverDelay", "failoverDelay", "logLevel", "enablePDB",
    "topologySpreadConstraints", "env", "envFrom", "serviceAccountTemplate", "projectedVolumeTemplate",
    "ephemeralVolumeSource", "ephemeralVolumesSizeLimit", "tablespaces", "externalClusters",
    "replica", "replicationSlots", "maxSyncReplicas", "minSyncReplicas", "postgresUID", "postgresGID",
    "seccompProfile", "probes", "livenessProbeTimeout",
}
CNPG_POSTGRESQL_FIELDS = {
    "parameters", "synchronous", "pg_hba", "pg_ident", "shared_preload_libraries", "ldap",
    "promotionTimeout", "enableAlterSystem", "syncReplicaElectionConstraint", "extensions",
}
QUANTITY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
# initdb names the Secret `<cluster>-app` after the owner's credentials; `<cluster>-ca` is the CA.
CNPG_SECRETS = ("{}-app", "{}-ca")


def cluster_secrets(cluster: dict) -> set[str]:
    """The Secrets the operator creates for one Cluster and the services may use."""
    name = dig(cluster, "metadata", "name")
    made = {CNPG_SECRETS[1].format(name)}
    if not dig(cluster, "spec", "bootstrap", "initdb", "secret", "name"):
        made.add(CNPG_SECRETS[0].format(name))
    return made


def validate_cnpg_cluster(doc: dict) -> str | None:
    """The CloudNativePG Cluster's fields these manifests rely on, checked without the CRD's schema."""
    spec = doc.get("spec") or {}
    if doc.get("apiVersion") != "postgresql.cnpg.io/v1":
        return "apiVersion must be postgresql.cnpg.io/v1"
    unknown = sorted(set(spec) - CNPG_CLUSTER_SPEC_FIELDS)
    if unknown:
        return f"spec has fields CloudNativePG does not define: {unknown}"
    instances = spec.get("instances")
    if not (isinstance(instances, int) and instances >= 1):
        return "spec.instances must be an integer >= 1"
    image = spec.get("imageName")
    if image is not None:
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        if not re.match(r"^\d+(\.\d+)?", tag):
            return f"spec.imageName {image!r}: the tag must start with the PostgreSQL version (the operator reads the major from it)"
    if spec.get("primaryUpdateStrategy", "unsupervised") not in ("unsupervised", "supervised"):
        return "spec.primaryUpdateStrategy must be unsupervised or supervised"
    if not QUANTITY_RE.match(str(dig(spec, "storage", "size", default=""))):
        return "spec.storage.size must be a quantity such as 20Gi"
    initdb = dig(spec, "bootstrap", "initdb")
    if not isinstance(initdb, dict) or not initdb.get("database") or not initdb.get("owner"):
        return "spec.bootstrap.initdb needs database and owner"
    pg = spec.get("postgresql") or {}
    unknown = sorted(set(pg) - CNPG_POSTGRESQL_FIELDS)
    if unknown:
        return f"spec.postgresql has fields CloudNativePG does not define: {unknown}"
    params = pg.get("parameters") or {}
    bad = sorted(k for k, v in params.items() if not isinstance(v, str))
    if bad:
        return f"spec.postgresql.parameters must be strings (the CRD is a map of strings): {bad}"
    sync = pg.get("synchronous")
    if sync is not None:
        if sync.get("method") not in ("any", "first"):
            return "spec.postgresql.synchronous.method must be any or first"
        number = sync.get("number")
        if not (isinstance(number, int) and 1 <= number < instances):
            return f"spec.postgresql.synchronous.number must be 1..instances-1 ({instances - 1})"
        if sync.get("dataDurability", "required") not in ("required", "preferred"):
            return "spec.postgresql.synchronous.dataDurability must be required or preferred"
    anti = dig(spec, "affinity", "podAntiAffinityType", default="preferred")
    if anti not in ("preferred", "required"):
        return "spec.affinity.podAntiAffinityType must be preferred or required"
    res = spec.get("resources") or {}
    if not (dig(res, "requests", "memory") and dig(res, "limits", "memory")):
        return "spec.resources needs a memory request and limit"
    return None

# --------------------------------------------------------------------------- reporting


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"   ok   {what}")

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"   FAIL {what}")

    def check(self, cond: bool, what: str, why: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(f"{what}{': ' + why if why else ''}")
        return cond

    def exit(self) -> int:
        print(f"   {self.passed} passed, {len(self.failures)} failed")
        counts = os.environ.get("CHECK_COUNTS")
        if counts:
            with open(counts, "a", encoding="utf-8") as f:
                f.write(f"{self.passed} {len(self.failures)}\n")
        return 1 if self.failures else 0


def load_docs(path: pathlib.Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dig(obj: Any, *keys: Any, default: Any = None) -> Any:
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return default
    return obj


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{dig(doc, 'metadata', 'name', default='?')}"


# --------------------------------------------------------------------------- kubernetes


def validate_builtin(doc: dict) -> str | None:
    """Schema-validates one object against every version in K8S_VERSIONS (strict)."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            return e.message
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path) or "(top)"
            return f"Kubernetes {version}: {path}: {e.message}"
    return None


def validate_crd(doc: dict) -> str | None:
    """Required fields of the custom resources we use (no schema is shipped for them)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if not dig(doc, "metadata", "name"):
        return "metadata.name missing"
    if kind == "Cluster":
        return validate_cnpg_cluster(doc)
    if kind == "ScaledObject":
        if doc.get("apiVersion") != "keda.sh/v1alpha1":
            return "apiVersion must be keda.sh/v1alpha1"
        if not dig(spec, "scaleTargetRef", "name"):
            return "spec.scaleTargetRef.name missing"
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            return "minReplicaCount/maxReplicaCount must be integers with min <= max"
        triggers = spec.get("triggers")
        if not triggers:
            return "spec.triggers empty"
        for t in triggers:
            md = t.get("metadata") or {}
            if t.get("type") != "nats-jetstream":
                return f"unexpected trigger type {t.get('type')!r}"
            for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"):
                if not isinstance(md.get(key), str) or not md[key]:
                    return f"trigger metadata.{key} missing (KEDA wants strings)"
            if not md["lagThreshold"].isdigit():
                return "lagThreshold must be an integer string"
            if CONSUMERS.get(md["stream"]) != md["consumer"]:
                return f"stream {md['stream']} has no consumer {md['consumer']!r} in the contract"
            if not re.fullmatch(r"[a-z0-9.-]+:\d+", md["natsServerMonitoringEndpoint"]):
                return "natsServerMonitoringEndpoint must be host:port"
        return None
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        return "apiVersion must be monitoring.coreos.com/v1"
    if kind == "ServiceMonitor":
        if not isinstance(spec.get("selector"), dict):
            return "spec.selector missing"
        if not spec.get("endpoints") or not all(e.get("port") for e in spec["endpoints"]):
            return "spec.endpoints must name a port each"
        return None
    if kind == "PodMonitor":
        if not isinstance(spec.get("selector"), dict):
            return "spec.selector missing"
        eps = spec.get("podMetricsEndpoints")
        if not eps or not all(e.get("port") for e in eps):
            return "spec.podMetricsEndpoints must name a port each"
        return None
    if kind == "PrometheusRule":
        groups = spec.get("groups")
        if not groups:
            return "spec.groups empty"
        for g in groups:
            if not g.get("name") or not g.get("rules"):
                return "every group needs a name and rules"
            for r in g["rules"]:
                if not (r.get("alert") or r.get("record")) or not r.get("expr"):
                    return "every rule needs alert or record, and expr"
        return None
    return f"unknown custom kind {kind}"


def validate_object(rep: Report, where: str, doc: dict) -> None:
    what = f"{where}: {name_of(doc)}"
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        rep.fail(f"{where}: a document without kind/apiVersion")
        return
    if doc["kind"] in CRD_KINDS:
        err = validate_crd(doc)
        rep.check(err is None, f"{what} (custom resource: required fields)", err or "")
    else:
        err = validate_builtin(doc)
        rep.check(err is None, f"{what} (schema {', '.join(K8S_VERSIONS)}, strict)", err or "")


def cmd_k8s_files(root: str) -> int:
    rep = Report()
    base = pathlib.Path(root)
    files = sorted(p for p in base.rglob("*.yaml") if p.name != "kustomization.yaml")
    if not files:
        rep.fail(f"no manifests under {root}")
    for path in files:
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            rep.fail(f"{path}: YAML: {e}")
            continue
        if not docs:
            rep.fail(f"{path}: empty")
        for doc in docs:
            validate_object(rep, str(path), doc)
    for path in sorted(base.rglob("kustomization.yaml")):
        try:
            k = load_docs(path)[0]
            kind = k.get("kind")
            rep.check(kind in ("Kustomization", "Component"), f"{path}: parses ({kind})")
        except (yaml.YAMLError, IndexError, AttributeError) as e:
            rep.fail(f"{path}: {e}")
    return rep.exit()


def pod_templates(docs: list[dict]) -> Iterable[tuple[dict, dict]]:
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, dig(d, "spec", "template", default={})


def service_of(container: dict) -> str | None:
    """Which of our binaries a container runs (by its command), or None."""
    cmd = container.get("command") or []
    if cmd and cmd[0].startswith("/usr/local/bin/"):
        return cmd[0].rsplit("/", 1)[1]
    return None


def selector_matches(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        val, op, vals = labels.get(expr["key"]), expr["operator"], expr.get("values") or []
        if op == "In" and val not in vals:
            return False
        if op == "NotIn" and val in vals:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def probe_port(probe: dict, ports: dict) -> int | None:
    port = dig(probe, "httpGet", "port")
    return ports.get(port, port) if isinstance(port, str) else port


def policy_allows(policies: Iterable[dict], direction: str, labels: dict, port: int, peer_ok) -> bool:
    """Whether a NetworkPolicy selecting pods with `labels` lets traffic through in
    `direction` ("ingress" or "egress") on TCP `port` to or from a peer `peer_ok` accepts."""
    peers_key = "from" if direction == "ingress" else "to"
    for pol in policies:
        if not selector_matches(dig(pol, "spec", "podSelector", default={}), labels):
            continue
        for rule in dig(pol, "spec", direction, default=[]) or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, None) and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            peers = rule.get(peers_key)
            if not peers or any(peer_ok(peer) for peer in peers):
                return True
    return False


def uses_database(svc: str, env: dict) -> bool:
    """Whether a service needs the event log's database: it reads the URL (its contract) and
    the log is on (EVENT_LOG, default on)."""
    return DATABASE_URL_ENV[0] in SERVICE_ENV.get(svc, set()) and str(env.get("EVENT_LOG", "on")) != "off"


def check_database_url(rep: Report, who: str, url: str) -> None:
    """A literal URL (compose): the form the services parse, and an sslmode they know."""
    ok = bool(DATABASE_URL_RE.match(url))
    mode = re.search(r"[?&]sslmode=([^&]*)", url)
    rep.check(ok and (mode is None or mode.group(1) in SSLMODES),
              f"{who}: the database URL is postgres://user:password@host:port/db[?sslmode={'|'.join(sorted(SSLMODES))}]",
              f"got {re.sub(r':[^:@/]*@', ':***@', url)!r}")


def check_database_env(rep: Report, cwho: str, c: dict, env: dict, env_secrets: dict, volumes: dict, clusters: dict) -> None:
    """One container of a service that uses the event log's database (Kubernetes)."""
    url_var = next((v for v in DATABASE_URL_ENV if v in env), None)
    if not rep.check(url_var is not None, f"{cwho}: the event log is on and {' or '.join(DATABASE_URL_ENV)} is set"):
        return
    ref = env_secrets.get(url_var)
    rep.check(ref is not None, f"{cwho}: {url_var} comes from a Secret (it carries the password), not a ConfigMap or a literal")
    if ref is not None and clusters:
        wanted = {(CNPG_SECRETS[0].format(n), "uri") for n in clusters}
        rep.check(ref in wanted, f"{cwho}: {url_var} is the Cluster's Secret {sorted(wanted)[0][0]}, key uri", f"got {ref}")
    elif ref is not None:
        rep.check(ref[0] in EXTERNAL_SECRETS and ref[1] == "uri",
                  f"{cwho}: {url_var} is key uri of a Secret documented as external (no Cluster in this rendering)", f"got {ref}")
    ca = env.get(DATABASE_CA_ENV)
    if clusters:
        # The operator signs the server's certificate with its own CA, which no system store has.
        rep.check(ca is not None, f"{cwho}: {DATABASE_CA_ENV} is set (the Cluster's certificate is signed by its own CA)")
    if ca is None:
        return
    mounts = [m for m in c.get("volumeMounts") or [] if str(ca).startswith(m["mountPath"].rstrip("/") + "/")]
    if not rep.check(len(mounts) == 1, f"{cwho}: {DATABASE_CA_ENV}={ca} lies in a mounted volume"):
        return
    vol = volumes.get(mounts[0]["name"]) or {}
    src = vol.get("secret") or vol.get("configMap")
    file_name = str(ca)[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
    items = (src or {}).get("items")
    rep.check(
        src is not None and (items is None or any(i.get("path") == file_name for i in items)),
        f"{cwho}: volume {mounts[0]['name']} (a Secret or ConfigMap) provides {file_name}",
    )
    if clusters and src is not None:
        # The Secret also holds the CA's private key (ca.key): mount ca.crt alone.
        want = {CNPG_SECRETS[1].format(n) for n in clusters}
        rep.check(vol.get("secret", {}).get("secretName") in want and [i.get("key") for i in items or []] == ["ca.crt"],
                  f"{cwho}: {DATABASE_CA_ENV} is ca.crt of the Cluster's Secret {sorted(want)[0]}, mounted alone (not its ca.key)")


def max_pods(by_kind: dict, deployment: dict) -> int:
    """The most pods a Deployment runs at once: its autoscaler's maximum (or replicas), plus the
    rolling update's surge."""
    dep_name = deployment["metadata"]["name"]
    most = dig(deployment, "spec", "replicas", default=1)
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        if dig(hpa, "spec", "scaleTargetRef", "name") == dep_name:
            most = dig(hpa, "spec", "maxReplicas", default=most)
    for so in by_kind.get("ScaledObject", {}).values():
        if dig(so, "spec", "scaleTargetRef", "name") == dep_name:
            most = dig(so, "spec", "maxReplicaCount", default=100)
    surge = dig(deployment, "spec", "strategy", "rollingUpdate", "maxSurge", default="25%")
    extra = -(-most * int(surge[:-1]) // 100) if isinstance(surge, str) and surge.endswith("%") else int(surge)
    return most + extra


def check_database_rendered(rep: Report, name: str, by_kind: dict, clusters: dict, db_users: dict) -> None:
    """The database against the services that use it: connections, network paths."""
    policies = list(by_kind.get("NetworkPolicy", {}).values())
    for cl_name, cl in clusters.items():
        pods = {CNPG_CLUSTER_LABEL: cl_name}
        limit = int(dig(cl, "spec", "postgresql", "parameters", "max_connections", default="100"))
        need = sum(max_pods(by_kind, dep) * pool for dep, pool, _ in db_users.values())
        rep.check(
            need + CNPG_RESERVED_CONNECTIONS <= limit,
            f"{name}: Cluster {cl_name}: max_connections {limit} >= the services' pools at their most pods "
            f"(rolling updates included) {need} + {CNPG_RESERVED_CONNECTIONS} for the operator",
        )
        if not policies:
            continue
        for svc, (_, _, labels) in sorted(db_users.items()):
            rep.check(
                policy_allows(policies, "egress", labels, POSTGRES_PORT,
                              lambda peer: "podSelector" in peer and selector_matches(peer["podSelector"], pods)),
                f"{name}: NetworkPolicy lets {svc} out to the Cluster {cl_name} on {POSTGRES_PORT}",
            )
            rep.check(
                policy_allows(policies, "ingress", pods, POSTGRES_PORT,
                              lambda peer, l=labels: "podSelector" in peer and "namespaceSelector" not in peer
                              and selector_matches(peer["podSelector"], l)),
                f"{name}: NetworkPolicy lets the Cluster {cl_name} admit {svc} on {POSTGRES_PORT}",
            )
        for port in (POSTGRES_PORT, CNPG_STATUS_PORT):
            rep.check(
                policy_allows(policies, "ingress", pods, port,
                              lambda peer: dig(peer, "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name") == CNPG_OPERATOR_NAMESPACE),
                f"{name}: NetworkPolicy lets the operator ({CNPG_OPERATOR_NAMESPACE}) reach the Cluster {cl_name} on {port}",
            )
            rep.check(
                policy_allows(policies, "ingress", pods, port,
                              lambda peer: "podSelector" in peer and "namespaceSelector" not in peer and selector_matches(peer["podSelector"], pods))
                and policy_allows(policies, "egress", pods, port,
                                  lambda peer: "podSelector" in peer and selector_matches(peer["podSelector"], pods)),
                f"{name}: NetworkPolicy lets the Cluster {cl_name}'s instances reach each other on {port}",
            )
        rep.check(
            policy_allows(policies, "egress", pods, 443, lambda peer: "ipBlock" in peer) or
            policy_allows(policies, "egress", pods, 6443, lambda peer: "ipBlock" in peer),
            f"{name}: NetworkPolicy lets the Cluster {cl_name} out to the Kubernetes API",
        )
    if not clusters and db_users and policies:
        for svc, (_, _, labels) in sorted(db_users.items()):
            rep.check(
                policy_allows(policies, "egress", labels, POSTGRES_PORT, lambda peer: "ipBlock" in peer),
                f"{name}: no Cluster: NetworkPolicy lets {svc} out to the external database on {POSTGRES_PORT}",
            )


def check_stream_limits(rep: Report, who: str, env: dict) -> None:
    """STREAM_MAX_BYTES / STREAM_MAX_MSGS name only streams that take a limit."""
    for var in ("STREAM_MAX_BYTES", "STREAM_MAX_MSGS"):
        value = env.get(var)
        if not value:
            continue
        names = {pair.split("=", 1)[0].strip() for pair in str(value).split(",") if pair.strip()}
        unknown = sorted(names - LABEL_VALUES["stream"])
        rep.check(not unknown, f"{who}: {var} names only streams that take a limit", f"unknown {unknown}")


def cmd_k8s_rendered(name: str, path: str) -> int:
    rep = Report()
    docs = load_docs(pathlib.Path(path))
    rep.check(bool(docs), f"{name}: renders to {len(docs)} objects")
    for doc in docs:
        validate_object(rep, name, doc)

    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED}
    rep.check(
        namespaces == {"ecwid-events"},
        f"{name}: every namespaced object is in namespace ecwid-events",
        f"found {sorted(map(str, namespaces))}",
    )
    rep.check("ecwid-events" in by_kind.get("Namespace", {}), f"{name}: defines Namespace ecwid-events")

    configmaps = by_kind.get("ConfigMap", {})
    clusters = by_kind.get("Cluster", {})
    secrets = set(by_kind.get("Secret", {})) | EXTERNAL_SECRETS
    for cluster in clusters.values():
        secrets |= cluster_secrets(cluster)
    rep.check(len(clusters) <= 1, f"{name}: at most one PostgreSQL Cluster", f"found {sorted(clusters)}")
    # Services that use the event log's database: deployment, pool size, their pod labels.
    db_users: dict[str, tuple[dict, int, dict]] = {}
    services_seen = set()
    service_labels: dict[str, dict] = {}
    common = None
    for cm_name, cm in configmaps.items():
        if cm_name.startswith("ecwid-common"):
            common = cm.get("data") or {}

    for owner, tmpl in pod_templates(docs):
        spec = tmpl.get("spec") or {}
        who = f"{name}: {name_of(owner)}"
        pod_sc = spec.get("securityContext") or {}
        rep.check(
            pod_sc.get("runAsNonRoot") is True and dig(pod_sc, "seccompProfile", "type") == "RuntimeDefault",
            f"{who}: pod runs as non-root with seccomp RuntimeDefault",
        )
        rep.check(spec.get("automountServiceAccountToken") is False, f"{who}: no service account token mounted")
        rep.check(
            selector_matches(dig(owner, "spec", "selector", default={}), dig(tmpl, "metadata", "labels", default={})),
            f"{who}: selector matches its pod template",
        )
        grace = spec.get("terminationGracePeriodSeconds", 30)
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        for vol_name, vol in volumes.items():
            sec = dig(vol, "secret", "secretName")
            if sec is not None:
                rep.check(sec in secrets, f"{who}: Secret {sec} of volume {vol_name} exists or is documented as external")
        for c in spec.get("containers", []):
            cwho = f"{who} container {c['name']}"
            sc = c.get("securityContext") or {}
            rep.check(
                sc.get("readOnlyRootFilesystem") is True
                and sc.get("allowPrivilegeEscalation") is False
                and dig(sc, "capabilities", "drop") == ["ALL"],
                f"{cwho}: read-only root, no privilege escalation, all capabilities dropped",
            )
            res = c.get("resources") or {}
            rep.check(
                bool(dig(res, "requests", "cpu")) and bool(dig(res, "requests", "memory")) and bool(dig(res, "limits", "memory")),
                f"{cwho}: cpu/memory requests and a memory limit",
            )
            svc = service_of(c)
            env_names: dict[str, str | None] = {}
            for ref in c.get("envFrom") or []:
                cm = dig(ref, "configMapRef", "name")
                if cm is not None:
                    if rep.check(cm in configmaps, f"{cwho}: envFrom ConfigMap {cm} exists"):
                        for k, v in (configmaps[cm].get("data") or {}).items():
                            env_names[k] = v
                else:
                    rep.fail(f"{cwho}: envFrom other than a ConfigMap")
            env_secrets: dict[str, tuple[str, str]] = {}
            for e in c.get("env") or []:
                env_names[e["name"]] = e.get("value")
                sk = dig(e, "valueFrom", "secretKeyRef", "name")
                if sk is not None:
                    env_secrets[e["name"]] = (sk, dig(e, "valueFrom", "secretKeyRef", "key"))
                    rep.check(sk in secrets, f"{cwho}: Secret {sk} for {e['name']} exists or is documented as external")
            allowed = SERVICE_ENV.get(svc) if svc else OTHER_ENV.get(c["name"])
            if allowed is None:
                rep.fail(f"{cwho}: neither one of our binaries nor a known container")
                continue
            extra = sorted(set(env_names) - allowed)
            rep.check(not extra, f"{cwho}: every environment variable is in the contract", f"unknown {extra}")
            if svc is None:
                continue
            services_seen.add(svc)
            service_labels[svc] = dig(tmpl, "metadata", "labels", default={})
            for var, value in env_names.items():
                if value is None:
                    continue
                if var in NUMERIC_ENV and not str(value).isdigit():
                    rep.fail(f"{cwho}: {var}={value!r} is not a number")
                if var in ENUM_ENV and value not in ENUM_ENV[var]:
                    rep.fail(f"{cwho}: {var}={value!r} not in {sorted(ENUM_ENV[var])}")
                if var in DURATION_ENV and not DURATION_RE.match(str(value).strip()):
                    rep.fail(f"{cwho}: {var}={value!r} is not a duration such as 30m, 72h or 7d")
                if (svc, var) in LISTEN_VALUE:
                    rep.check(value == LISTEN_VALUE[(svc, var)], f"{cwho}: {var}={value}", f"want {LISTEN_VALUE[(svc, var)]}")
            if svc == "ingest":
                rep.check("ADMIN_TOKEN" in env_names, f"{cwho}: ADMIN_TOKEN is set (from a Secret)")
                rep.check(
                    "ADMIN_TOKEN" not in {k for ref in c.get("envFrom") or [] for k in (configmaps.get(dig(ref, "configMapRef", "name"), {}).get("data") or {})},
                    f"{cwho}: ADMIN_TOKEN is not in a ConfigMap",
                )
            for var in sorted({v for (s, v) in LISTEN_VALUE if s == svc} | REQUIRED_ENV.get(svc, set())):
                rep.check(env_names.get(var) is not None, f"{cwho}: sets {var}", "missing from its ConfigMaps and env")
            rep.check(env_names.get("LOG_FORMAT") == "json", f"{cwho}: LOG_FORMAT=json")
            if uses_database(svc, env_names):
                check_database_env(rep, cwho, c, env_names, env_secrets, volumes, clusters)
                pool = env_names.get(DATABASE_POOL_ENV)
                db_users[svc] = (owner, int(pool) if str(pool or "").isdigit() else DEFAULT_DATABASE_POOL,
                                 dig(tmpl, "metadata", "labels", default={}))
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
            ops = OPS_PORT[svc]
            rep.check(ops in ports.values(), f"{cwho}: exposes ops port {ops}")
            for kind, path_ in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                probe = c.get(kind) or {}
                rep.check(
                    dig(probe, "httpGet", "path") == path_ and probe_port(probe, ports) == ops,
                    f"{cwho}: {kind} GET {path_} on {ops}",
                )
            budget = shutdown_budget_seconds(env_names)
            pre = dig(c, "lifecycle", "preStop", "sleep", "seconds", default=0)
            rep.check(
                grace >= budget + pre + TERMINATION_MARGIN_SECONDS,
                f"{cwho}: terminationGracePeriodSeconds {grace} >= SHUTDOWN_GRACE_MS {budget:g}s"
                f" + preStop {pre}s + margin {TERMINATION_MARGIN_SECONDS}s",
            )
            nats_url = env_names.get("NATS_URL")
            rep.check(
                nats_url is not None and nats_url_ok(nats_url),
                f"{cwho}: NATS_URL={nats_url} is nats://host:port (comma-separated for a cluster)",
            )
    rep.check(services_seen == set(OPS_PORT), f"{name}: runs {', '.join(sorted(OPS_PORT))}", f"found {sorted(services_seen)}")
    if common is not None:
        check_stream_limits(rep, f"{name}: ConfigMap ecwid-common", common)
    check_database_rendered(rep, name, by_kind, clusters, db_users)

    # NetworkPolicies: each service reaches NATS and NATS admits it; Prometheus reaches
    # its ops port; the poller reaches HTTPS (Ecwid's API). A service added without
    # its rules would otherwise start, fail to connect and only show as unready.
    policies = list(by_kind.get("NetworkPolicy", {}).values())
    if policies:
        nats_labels = {"app.kubernetes.io/name": "nats"}
        for svc, labels in sorted(service_labels.items()):
            rep.check(
                policy_allows(policies, "egress", labels, 4222,
                              lambda peer: "podSelector" in peer and selector_matches(peer["podSelector"], nats_labels)),
                f"{name}: NetworkPolicy lets {svc} out to NATS 4222",
            )
            rep.check(
                policy_allows(policies, "ingress", nats_labels, 4222,
                              lambda peer, l=labels: "podSelector" in peer and "namespaceSelector" not in peer
                              and selector_matches(peer["podSelector"], l)),
                f"{name}: NetworkPolicy lets NATS admit {svc} on 4222",
            )
            rep.check(
                policy_allows(policies, "ingress", labels, OPS_PORT[svc],
                              lambda peer: dig(peer, "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name") == "monitoring"),
                f"{name}: NetworkPolicy lets monitoring scrape {svc} on {OPS_PORT[svc]}",
            )
        if "poller" in service_labels:
            rep.check(
                policy_allows(policies, "egress", service_labels["poller"], 443,
                              lambda peer: dig(peer, "ipBlock", "cidr") in ("0.0.0.0/0", "::/0")),
                f"{name}: NetworkPolicy lets the poller out to HTTPS 443 (Ecwid's API has no fixed addresses)",
            )

    # NATS: replicas vs STREAM_REPLICAS, a headless Service for the routes.
    nats = by_kind.get("StatefulSet", {}).get("nats")
    if rep.check(nats is not None, f"{name}: StatefulSet nats exists"):
        replicas = dig(nats, "spec", "replicas", default=1)
        sr = int((common or {}).get("STREAM_REPLICAS", "1"))
        rep.check(1 <= sr <= replicas, f"{name}: STREAM_REPLICAS={sr} <= NATS servers ({replicas})")
        rep.check(bool(dig(nats, "spec", "volumeClaimTemplates")), f"{name}: NATS servers have persistent volumes")
        headless = by_kind.get("Service", {}).get(dig(nats, "spec", "serviceName"))
        rep.check(
            headless is not None and dig(headless, "spec", "clusterIP") == "None",
            f"{name}: NATS serviceName {dig(nats, 'spec', 'serviceName')} is a headless Service",
        )

    # Services select pods and name ports those pods expose.
    pods = [(dig(t, "metadata", "labels", default={}), t) for _, t in pod_templates(docs)]
    for svc_name, svc in by_kind.get("Service", {}).items():
        sel = {"matchLabels": dig(svc, "spec", "selector", default={})}
        matched = [t for labels, t in pods if selector_matches(sel, labels)]
        if not rep.check(bool(matched), f"{name}: Service {svc_name} selects pods"):
            continue
        names = {p.get("name") for t in matched for c in t["spec"]["containers"] for p in c.get("ports") or []}
        nums = {p["containerPort"] for t in matched for c in t["spec"]["containers"] for p in c.get("ports") or []}
        for p in dig(svc, "spec", "ports", default=[]):
            tp = p.get("targetPort", p["port"])
            rep.check(tp in names or tp in nums, f"{name}: Service {svc_name} port {p['port']} -> {tp} exists on its pods")

    # The Ingress reaches the webhook port only.
    for ing_name, ing in by_kind.get("Ingress", {}).items():
        for rule in dig(ing, "spec", "rules", default=[]):
            for p in dig(rule, "http", "paths", default=[]):
                be = dig(p, "backend", "service", default={})
                svc = by_kind.get("Service", {}).get(be.get("name"))
                port = dig(be, "port", "name") or dig(be, "port", "number")
                target = None
                for sp in dig(svc, "spec", "ports", default=[]) if svc else []:
                    if port in (sp.get("name"), sp.get("port")):
                        target = sp.get("targetPort")
                rep.check(
                    svc is not None and target in ("webhook", 8080),
                    f"{name}: Ingress {ing_name} {p.get('path')} -> {be.get('name')}:{port} is the webhook port",
                )

    # Autoscalers target existing Deployments, and never two on one Deployment.
    targets: dict[str, list[str]] = {}
    for hpa_name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        targets.setdefault(dig(hpa, "spec", "scaleTargetRef", "name"), []).append(f"HPA {hpa_name}")
    for so_name, so in by_kind.get("ScaledObject", {}).items():
        targets.setdefault(dig(so, "spec", "scaleTargetRef", "name"), []).append(f"ScaledObject {so_name}")
    for target, scalers in sorted(targets.items()):
        rep.check(target in by_kind.get("Deployment", {}), f"{name}: {', '.join(scalers)} targets Deployment {target}")
        rep.check(len(scalers) == 1, f"{name}: Deployment {target} has one autoscaler", f"has {scalers}")
    for dep_name, dep in by_kind.get("Deployment", {}).items():
        if dep_name in targets:
            rep.check("replicas" not in dep["spec"], f"{name}: autoscaled Deployment {dep_name} leaves replicas to its autoscaler")
    rep.check("ingest" in targets, f"{name}: ingest has an autoscaler")

    # PodDisruptionBudgets and monitors select something.
    for kind, field in (("PodDisruptionBudget", "selector"), ("PodMonitor", "selector")):
        for obj_name, obj in by_kind.get(kind, {}).items():
            sel = dig(obj, "spec", field, default={})
            rep.check(any(selector_matches(sel, labels) for labels, _ in pods), f"{name}: {kind} {obj_name} selects pods")
    for obj_name, obj in by_kind.get("ServiceMonitor", {}).items():
        sel = dig(obj, "spec", "selector", default={})
        svcs = [s for s in by_kind.get("Service", {}).values() if selector_matches(sel, dig(s, "metadata", "labels", default={}))]
        ports = {p.get("name") for s in svcs for p in dig(s, "spec", "ports", default=[])}
        rep.check(
            bool(svcs) and all(e["port"] in ports for e in dig(obj, "spec", "endpoints", default=[])),
            f"{name}: ServiceMonitor {obj_name} selects a Service with its port",
        )
    # With the monitoring component, every service is scraped: by a PodMonitor selecting
    # its pods on its ops port, or through a Service a ServiceMonitor selects.
    if by_kind.get("PodMonitor") or by_kind.get("ServiceMonitor"):
        for svc, labels in sorted(service_labels.items()):
            by_pod = any(
                selector_matches(dig(m, "spec", "selector", default={}), labels)
                for m in by_kind.get("PodMonitor", {}).values()
            )
            by_service = any(
                selector_matches(dig(m, "spec", "selector", default={}), dig(s, "metadata", "labels", default={}))
                and selector_matches({"matchLabels": dig(s, "spec", "selector", default={})}, labels)
                for m in by_kind.get("ServiceMonitor", {}).values()
                for s in by_kind.get("Service", {}).values()
            )
            rep.check(by_pod or by_service, f"{name}: a PodMonitor or ServiceMonitor scrapes {svc}")
    for so_name, so in by_kind.get("ScaledObject", {}).items():
        for t in dig(so, "spec", "triggers", default=[]):
            host = t["metadata"]["natsServerMonitoringEndpoint"].split(":")[0]
            svc = host.split(".")[0]
            rep.check(
                svc in by_kind.get("Service", {}) and host.split(".")[1:2] == ["ecwid-events"],
                f"{name}: ScaledObject {so_name} monitoring endpoint {host} is a Service in ecwid-events",
            )
            rep.check(t["metadata"]["consumer"] == dig(so, "spec", "scaleTargetRef", "name"),
                      f"{name}: ScaledObject {so_name} scales the consumer's own worker")
    return rep.exit()


# --------------------------------------------------------------------------- compose / prometheus


def split_image(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    return repo, tag


# Containers in compose that are not ours, and the variables they may get.
OTHER_COMPOSE_ENV = {"postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}}
COMPOSE_DEFAULT_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_default(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default (what runs when unset)."""
    return COMPOSE_DEFAULT_RE.sub(lambda m: m.group(2) or "", str(value))


def check_compose_database(rep: Report, who: str, svc: dict, env: dict, postgres: dict) -> None:
    """A compose service that uses the event log's database: its URL names the postgres service,
    with that service's user, database and password, and it waits for it to be healthy."""
    url_var = next((v for v in DATABASE_URL_ENV if v in env), None)
    if not rep.check(url_var is not None, f"{who}: the event log is on and {' or '.join(DATABASE_URL_ENV)} is set"):
        return
    raw = str(env[url_var])
    url = compose_default(raw)
    check_database_url(rep, who, url)
    m = re.match(r"^postgres(?:ql)?://([^:/@]+):([^@]*)@([^:/?]+)(?::(\d+))?/([^?]+)", url)
    host = m.group(3) if m else None
    pg = postgres.get(host)
    if not rep.check(pg is not None, f"{who}: {url_var} points at the compose service running postgres", f"host {host!r}"):
        return
    pg_env = pg.get("environment") or {}
    rep.check(m.group(1) == compose_default(pg_env.get("POSTGRES_USER", "postgres"))
              and m.group(5) == compose_default(pg_env.get("POSTGRES_DB", pg_env.get("POSTGRES_USER", "postgres"))),
              f"{who}: {url_var} uses the postgres service's POSTGRES_USER and POSTGRES_DB")
    pw = str(pg_env.get("POSTGRES_PASSWORD", ""))
    rep.check(bool(pw) and f":{pw}@" in raw, f"{who}: {url_var} carries the postgres service's POSTGRES_PASSWORD ({pw})")
    rep.check(dig(svc, "depends_on", host, "condition") == "service_healthy", f"{who}: waits for {host} to be healthy")


def cmd_compose(path: str) -> int:
    rep = Report()
    text = pathlib.Path(path).read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        rep.fail(f"{path}: YAML: {e}")
        return rep.exit()
    rep.ok(f"{path}: parses")
    services = doc.get("services") or {}
    rep.check(
        {"nats", "postgres", "ingest", "normalizer", "deliverer", "poller", "prometheus"} <= set(services),
        f"{path}: has nats, postgres, ingest, normalizer, deliverer, poller, prometheus",
    )
    postgres = {n: s for n, s in services.items() if split_image(str(s.get("image", "")))[0] == "postgres"}
    for name, svc in services.items():
        image = svc.get("image")
        if not rep.check(bool(image), f"{path}: {name} names an image"):
            continue
        repo, tag = split_image(image)
        allowed = COMPOSE_IMAGES.get(repo, False)
        rep.check(
            allowed is None or (allowed is not False and tag in allowed),
            f"{path}: {name} image {image} is one of the listed images",
        )
        cmd = svc.get("command") or []
        binary = cmd[0].rsplit("/", 1)[1] if cmd and str(cmd[0]).startswith("/usr/local/bin/") else None
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        if binary:
            rep.check(repo == "ecwid-events", f"{path}: {name} runs {binary} from the project image")
            extra = sorted(set(env) - SERVICE_ENV[binary])
            rep.check(not extra, f"{path}: {name}: every environment variable is in the contract", f"unknown {extra}")
            for (svc_, var), want in LISTEN_VALUE.items():
                if svc_ == binary:
                    rep.check(env.get(var) == want, f"{path}: {name}: {var}={want}")
            rep.check(env.get("LOG_FORMAT") == "json", f"{path}: {name}: LOG_FORMAT=json")
            rep.check(env.get("NATS_URL") == "nats://nats:4222", f"{path}: {name}: NATS_URL=nats://nats:4222")
            budget = shutdown_budget_seconds(env)
            stop = parse_compose_duration(svc.get("stop_grace_period", "10s"))
            rep.check(
                stop is not None and stop >= budget + TERMINATION_MARGIN_SECONDS,
                f"{path}: {name}: stop_grace_period {svc.get('stop_grace_period', '10s (default)')} >= "
                f"SHUTDOWN_GRACE_MS {budget:g}s + margin {TERMINATION_MARGIN_SECONDS}s",
            )
            hc = dig(svc, "healthcheck", "test", default=[])
            rep.check(hc == ["CMD", f"/usr/local/bin/{binary}", "healthcheck"], f"{path}: {name}: health check is `{binary} healthcheck`")
            for var in sorted(REQUIRED_ENV.get(binary, set())):
                rep.check(bool(env.get(var)), f"{path}: {name}: sets {var}")
            if binary == "ingest":
                rep.check("ADMIN_TOKEN" in env, f"{path}: ingest gets ADMIN_TOKEN")
            check_stream_limits(rep, f"{path}: {name}", env)
            if uses_database(binary, env):
                check_compose_database(rep, f"{path}: {name}", svc, env, postgres)
        else:
            allowed_env = OTHER_COMPOSE_ENV.get(repo, set())
            rep.check(not (set(env) - allowed_env), f"{path}: {name} sets no environment variables but {sorted(allowed_env)}",
                      f"sets {sorted(set(env) - allowed_env)}")
        if repo == "postgres":
            rep.check(any(str(v).endswith(":/var/lib/postgresql/data") for v in svc.get("volumes") or []),
                      f"{path}: {name} keeps /var/lib/postgresql/data on a volume")
            hc = dig(svc, "healthcheck", "test", default=[])
            rep.check(hc[:2] == ["CMD", "pg_isready"], f"{path}: {name}: health check is pg_isready")
            for var in ("POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"):
                rep.check(bool(env.get(var)), f"{path}: {name}: sets {var}")
        if repo == "nats":
            rep.check(
                cmd[:4] == ["-js", "-sd", "/data", "-m"] and str(cmd[4]) == "8222",
                f"{path}: nats runs with -js -sd /data -m 8222",
            )
            rep.check(any(str(v).endswith(":/data") for v in svc.get("volumes") or []), f"{path}: nats keeps /data on a volume")
    return rep.exit()


def cmd_prometheus_config(path: str) -> int:
    rep = Report()
    doc = load_docs(pathlib.Path(path))[0]
    targets = {
        t for sc in doc.get("scrape_configs") or [] for st in sc.get("static_configs") or [] for t in st.get("targets") or []
    }
    for want in ("ingest:8081", "normalizer:9101", "deliverer:9102", "poller:9103", "nats-exporter:7777"):
        rep.check(want in targets, f"{path}: scrapes {want}")
    rep.check(not any(t.endswith(":8222") for t in targets), f"{path}: does not scrape NATS' JSON port 8222 directly")
    return rep.exit()


def cmd_rules_sync(alerts: str, prometheusrule: str) -> int:
    rep = Report()
    a = load_docs(pathlib.Path(alerts))[0]
    pr = load_docs(pathlib.Path(prometheusrule))[0]
    rep.check(
        a.get("groups") == dig(pr, "spec", "groups"),
        f"{prometheusrule}: spec.groups equals the groups of {alerts}",
        "run python3 deploy/sync-rules.py",
    )
    names = [r.get("alert") for g in a.get("groups", []) for r in g.get("rules", [])]
    for n in names:
        rep.check(bool(re.fullmatch(r"Ecwid[A-Za-z0-9]+", n or "")), f"{alerts}: alert {n} is named Ecwid*")
    rep.check(len(names) == len(set(names)), f"{alerts}: alert names are unique")
    return rep.exit()


METRIC_RE = re.compile(r"\becwid_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(ecwid_[a-z0-9_]+)\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def cmd_metric_names(files: list[str]) -> int:
    rep = Report()
    for f in files:
        text = pathlib.Path(f).read_text(encoding="utf-8")
        found = set(METRIC_RE.findall(text))
        unknown = sorted(found - METRIC_NAMES)
        rep.check(bool(found) and not unknown, f"{f}: {len(found)} metric names, all in the contract", f"unknown {unknown}")
        for metric, matchers in SELECTOR_RE.findall(text):
            for label, op, value in MATCHER_RE.findall(matchers.replace('\\"', '"')):
                allowed = LABEL_VALUES.get(label, "unknown-label")
                if allowed == "unknown-label":
                    rep.fail(f"{f}: {metric} selects on unknown label {label}")
                elif allowed is not None and op in ("=", "!="):
                    rep.check(value in allowed, f"{f}: {metric}{{{label}=\"{value}\"}} is a value of the contract")
                elif allowed is not None:
                    vals = value.split("|")
                    rep.check(all(v in allowed for v in vals), f"{f}: {metric}{{{label}=~\"{value}\"}} are values of the contract")
    return rep.exit()


def cmd_dashboard(path: str, out_rules: str) -> int:
    rep = Report()
    try:
        dash = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        rep.fail(f"{path}: JSON: {e}")
        return rep.exit()
    rep.ok(f"{path}: parses")
    panels = dash.get("panels") or []
    ids = [p.get("id") for p in panels]
    rep.check(len(ids) == len(set(ids)) and None not in ids, f"{path}: {len(panels)} panels with unique ids")
    rep.check(bool(dash.get("uid")) and bool(dash.get("title")), f"{path}: has uid and title")
    exprs = [t["expr"] for p in panels for t in p.get("targets") or [] if t.get("expr")]
    text = "\n".join(exprs)
    for metric, what in (
        ("ecwid_ingest_requests_total", "ingest rate and outcomes"),
        ("ecwid_deliver_end_to_end_seconds_bucket", "end-to-end latency"),
        ("ecwid_deliver_attempts_total", "delivery outcomes"),
        ("ecwid_deliver_retries_total", "retries"),
        ("ecwid_dead_letters_total", "dead letters"),
        ("ecwid_consumer_pending_messages", "consumer lag"),
        ("ecwid_deliver_breakers_open", "breaker states"),
        ("ecwid_instances", "instances by state"),
        ("ecwid_instance_transitions_total", "instance state changes"),
        ("ecwid_deliver_held_total", "envelopes held"),
        ("ecwid_deliver_released_total", "envelopes released"),
        ("ecwid_poller_requests_total", "poller requests by outcome"),
        ("ecwid_poller_events_emitted_total", "poll events emitted"),
        ("ecwid_poller_lag_seconds", "poll lag"),
        ("ecwid_event_log_lag_seconds", "event log lag"),
        ("ecwid_event_log_spooled", "event log rows spooled"),
    ):
        rep.check(metric in text, f"{path}: shows {what} ({metric})")
    for q in ("0.5", "0.9", "0.99"):
        rep.check(
            f"histogram_quantile({q}, sum by (le) (rate(ecwid_deliver_end_to_end_seconds_bucket" in text,
            f"{path}: end-to-end p{q[2:].ljust(2, '0') if q != '0.5' else '50'}",
        )
    # Grafana's variables, replaced by a legal duration, so promtool can parse every query.
    rules = {"groups": [{"name": "dashboard-queries", "rules": []}]}
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{i}", "expr": e})
    pathlib.Path(out_rules).write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    rep.ok(f"{path}: {len(exprs)} queries written to {out_rules} for promtool")
    return rep.exit()




def readme_table_names(text: str, heading: str, pattern: str) -> set[str]:
    """The backticked names matching `pattern` in the first column of the tables under
    `## heading` (up to the next `## `)."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names |= {n for n in re.findall(r"`([^`]+)`", first) if re.fullmatch(pattern, n)}
    return names


def cmd_readme(root: str) -> int:
    """The README's configuration and metrics tables against what the binaries read and export
    (their --print-contract): a variable or metric added to a binary and not to the README, or a
    row the binaries no longer have, fails. Also the value rules above name only variables some
    service reads."""
    rep = Report()
    text = (pathlib.Path(root) / "README.md").read_text(encoding="utf-8")
    read = set().union(*SERVICE_ENV.values())
    listed = readme_table_names(text, "Configuration", r"[A-Z][A-Z0-9_]+")
    rep.check(not (read - listed), f"README: every variable the binaries read ({len(read)}) has a row", f"no row for {sorted(read - listed)}")
    rep.check(not (listed - read), f"README: every variable row ({len(listed)}) is read by a binary", f"read by none {sorted(listed - read)}")
    exported = COUNTERS | GAUGES | HISTOGRAMS
    rows = readme_table_names(text, "Metrics", r"ecwid_[a-z0-9_]+")
    rep.check(not (exported - rows), f"README: every metric the binaries export ({len(exported)}) has a row", f"no row for {sorted(exported - rows)}")
    rep.check(not (rows - exported), f"README: every metric row ({len(rows)}) is exported by a binary", f"exported by none {sorted(rows - exported)}")
    ruled = set(ENUM_ENV) | DURATION_ENV | {v for (_, v) in LISTEN_VALUE} | set().union(*REQUIRED_ENV.values())
    rep.check(not (ruled - read), "the value rules name only variables the binaries read", f"read by none {sorted(ruled - read)}")
    for (svc, var) in LISTEN_VALUE:
        rep.check(var in SERVICE_ENV.get(svc, set()), f"{svc} reads {var}")
    return rep.exit()


METRIC_CONST_RE = re.compile(r'"(ecwid_[a-z0-9_]+)"')
# Where the services name their metrics (constants; shared::metrics and each crate's metrics.rs).
METRIC_SOURCES = ("model/src", "shared/src", "admin/src", "ingest/src", "normalizer/src", "deliverer/src", "poller/src")


def cmd_metric_source(root: str) -> int:
    """The contract's metric names against the string literals `"ecwid_..."` in the services'
    code: a name the code dropped or renamed would leave an alert or a panel without data; a
    name the code added and the contract lacks could not be used in an alert or panel."""
    rep = Report()
    in_code: set[str] = set()
    for d in METRIC_SOURCES:
        for f in sorted((pathlib.Path(root) / d).rglob("*.rs")):
            in_code |= set(METRIC_CONST_RE.findall(f.read_text(encoding="utf-8")))
    contract = COUNTERS | GAUGES | HISTOGRAMS
    rep.check(not (contract - in_code), f"every metric of the contract ({len(contract)}) is named in the code", f"not in the code {sorted(contract - in_code)}")
    rep.check(not (in_code - contract), f"every metric the code names ({len(in_code)}) is in the contract", f"not in the contract {sorted(in_code - contract)}")
    return rep.exit()


def cmd_dockerfile(path: str) -> int:
    rep = Report()
    lines = [l.strip() for l in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]
    joined = []
    buf = ""
    for l in lines:
        if l.startswith("#") and not buf:
            continue
        buf += l[:-1] + " " if l.endswith("\\") else l
        if not l.endswith("\\"):
            if buf:
                joined.append(buf)
            buf = ""
    froms = [l for l in joined if l.upper().startswith("FROM ")]
    rep.check(len(froms) >= 2, f"{path}: multi-stage ({len(froms)} stages)")
    rep.check(froms and froms[0].split()[1] == "rust:1-bookworm", f"{path}: builds in rust:1-bookworm")
    final = froms[-1].split()[1] if froms else ""
    rep.check(
        final in ("gcr.io/distroless/cc-debian12:nonroot",) or final.startswith("debian:"),
        f"{path}: final stage is {final}",
    )
    build = [l for l in joined if "cargo build" in l]
    rep.check(
        bool(build) and all(s in build[0] for s in ("--release", "--locked", *(f"-p {b}" for b in OPS_PORT))),
        f"{path}: cargo build --release --locked {' '.join(f'-p {b}' for b in OPS_PORT)}",
    )
    for b in OPS_PORT:
        rep.check(bool(build) and f"target/release/{b}" in build[0], f"{path}: copies target/release/{b} out of the cache mount")
    expose = [l for l in joined if l.upper().startswith("EXPOSE ")]
    rep.check(
        bool(expose) and {str(p) for p in OPS_PORT.values()} <= set(expose[-1].split()[1:]),
        f"{path}: EXPOSE lists every ops port {sorted(OPS_PORT.values())}",
    )
    last = joined[joined.index(froms[-1]):] if froms else []
    user = [l for l in last if l.upper().startswith("USER ")]
    rep.check(bool(user) and user[-1].split()[1].split(":")[0] not in ("root", "0"), f"{path}: final stage runs as a non-root user")
    rep.check(bool(re.search(r"COPY --from=\S+ /out/ /usr/local/bin/", "\n".join(last))), f"{path}: binaries land in /usr/local/bin")
    hc = [l for l in last if l.upper().startswith("HEALTHCHECK ")]
    rep.check(bool(hc) and 'CMD ["' in hc[-1], f"{path}: HEALTHCHECK in exec form (no shell)")
    rep.check(not any(l.upper().startswith(("RUN ",)) for l in last), f"{path}: no RUN in the final stage (nothing to run it with)")
    return rep.exit()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "k8s-files":
        return cmd_k8s_files(*args)
    if cmd == "k8s-rendered":
        return cmd_k8s_rendered(*args)
    if cmd == "compose":
        return cmd_compose(*args)
    if cmd == "prometheus-config":
        return cmd_prometheus_config(*args)
    if cmd == "rules-sync":
        return cmd_rules_sync(*args)
    if cmd == "metric-names":
        return cmd_metric_names(args)
    if cmd == "dashboard":
        return cmd_dashboard(*args)
    if cmd == "dockerfile":
        return cmd_dockerfile(*args)
    if cmd == "readme":
        return cmd_readme(*args)
    if cmd == "metric-source":
        return cmd_metric_source(*args)
    print(f"unknown subcommand {cmd}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
