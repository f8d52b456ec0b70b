#!/usr/bin/env bash
# Checks everything in deploy/ without a cluster, a Docker engine or the network.
#
#   bash deploy/check.sh                 # from the repository root (or anywhere)
#   bash deploy/check.sh --install-only  # only set up the tools, e.g. in a CI setup step
#
# The first run installs its tools under .tools/ (see deploy/tools.sh); every
# run after that is offline. Prints what it checked; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/tools.sh
source deploy/tools.sh

step() { printf '\n== %s\n' "$*"; }
FAILED=()
PASSED=0
# run NAME CMD...: runs one check, counts it, records a failure and carries on.
run() {
    local name=$1
    shift
    if "$@"; then
        PASSED=$((PASSED + 1))
        return 0
    fi
    FAILED+=("$name")
    printf '   FAIL %s\n' "$name"
}
# run_py NAME SUBCOMMAND ARGS...: check_deploy.py, which counts its own checks.
run_py() {
    local name=$1
    shift
    if CHECK_COUNTS="$WORK/counts" "${PY[@]}" "$@"; then
        return 0
    fi
    FAILED+=("$name")
}
ok() {
    PASSED=$((PASSED + 1))
    echo "   ok   $*"
}

step "tools"
ensure_venv
ensure_promtool
ensure_compose
KUBECTL=$(command -v kubectl || true)
# The pinned release (scripts/nats-versions.env), the one the manifests run.
NATS_SERVER=$(scripts/ensure-nats-server.sh || true)
printf '   python     %s (%s)\n' "$VENV_PY" "$("$VENV_PY" -c 'import kubernetes_validate.version as v, yaml; print("kubernetes-validate", v.__version__, "PyYAML", yaml.__version__)')"
printf '   promtool   %s (%s)\n' "$PROMTOOL" "$("$PROMTOOL" --version 2>&1 | head -1)"
printf '   kubectl    %s\n' "${KUBECTL:-not found}"
printf '   nats-server %s\n' "${NATS_SERVER:-not found}"
printf '   compose    %s\n' "${COMPOSE_NAME:-not found (structural checks only)}"
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi

PY=("$VENV_PY" deploy/check_deploy.py)
FAILS=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step "the contract: what each binary reads and exports (<service> --print-contract)"
# The one source of the variables and metric names every check below holds the manifests,
# dashboards, alerts and README against. cargo builds the binaries when they are missing.
{
    echo "["
    sep=""
    for svc in ingest normalizer deliverer poller; do
        printf '%s' "$sep"
        cargo run --quiet --locked -p "$svc" --bin "$svc" -- --print-contract
        sep=","
    done
    echo "]"
} >"$WORK/contract.json"
export ECWID_CONTRACT="$WORK/contract.json"
ok "contract of ingest, normalizer, deliverer, poller ($(wc -c <"$WORK/contract.json") bytes)"

step "Dockerfile"
run_py dockerfile dockerfile deploy/Dockerfile

step "the README's configuration and metrics tables against the contract"
run_py readme readme .

step "compose file: parses, images and environment variables from the contract"
run_py compose compose deploy/compose.yaml
run_py prometheus-config prometheus-config deploy/prometheus/prometheus.yml
if [ ${#COMPOSE[@]} -gt 0 ]; then
    # `config` resolves and validates the file against compose's schema; it
    # needs no Docker engine. ADMIN_TOKEN is required by the file.
    if ADMIN_TOKEN=check-only "${COMPOSE[@]}" -f deploy/compose.yaml config -q >"$WORK/compose.out" 2>&1; then
        ok "$COMPOSE_NAME: config -f deploy/compose.yaml"
    else
        cat "$WORK/compose.out"
        FAILED+=("compose config")
    fi
else
    echo "   skip compose config: no docker compose / docker-compose available"
fi

step "Prometheus: promtool check config / rules / test rules"
# The compose config mounts alerts.yml at /etc/prometheus; check it with a
# copy whose rule_files path points at the file here.
sed "s#/etc/prometheus/alerts.yml#$ROOT/deploy/prometheus/alerts.yml#" deploy/prometheus/prometheus.yml >"$WORK/prometheus.yml"
run "promtool check config" "$PROMTOOL" check config "$WORK/prometheus.yml"
run "promtool check rules" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
run "promtool test rules" "$PROMTOOL" test rules deploy/prometheus/alerts.test.yml
run "PrometheusRule in sync" "$VENV_PY" deploy/sync-rules.py --check
run_py "rules sync" rules-sync deploy/prometheus/alerts.yml deploy/k8s/components/monitoring/prometheusrule.yaml

step "Grafana dashboard"
run_py dashboard dashboard deploy/grafana/ecwid-events.json "$WORK/dashboard-rules.yml"
run "promtool check rules (dashboard queries)" "$PROMTOOL" check rules "$WORK/dashboard-rules.yml"

step "metric names and label values are the contract's; the contract's metrics are the code's"
run_py metric-names metric-names deploy/prometheus/alerts.yml deploy/grafana/ecwid-events.json
run_py metric-source metric-source .

step "NATS versions: the manifests run the release scripts/nats-versions.env pins"
run "NATS versions" scripts/check-nats-versions.sh

step "NATS configuration (nats-server -t, the pinned release)"
if [ -n "$NATS_SERVER" ]; then
    for conf in deploy/k8s/base/config/nats.conf deploy/k8s/overlays/dev/nats.conf; do
        if POD_NAME=nats-0 "$NATS_SERVER" -t -c "$conf" >"$WORK/nats.out" 2>&1; then
            ok "$conf"
        else
            cat "$WORK/nats.out"
            FAILED+=("nats-server -t $conf")
        fi
    done
else
    echo "   FAIL no nats-server: scripts/ensure-nats-server.sh could not install the pinned release"
    FAILED+=("nats-server")
fi

step "Kubernetes manifests, file by file (kubernetes-validate schemas; custom resources: required fields)"
run_py k8s-files k8s-files deploy/k8s

step "Kubernetes overlays rendered with kubectl kustomize, then validated"
if [ -z "$KUBECTL" ]; then
    echo "   FAIL kubectl not on PATH: it renders the overlays (kubectl kustomize)."
    echo "        No Debian or PyPI package here provides kustomize; install kubectl."
    FAILED+=("kubectl")
else
    for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
        dir=${dir%/}
        name=${dir#deploy/k8s/}
        out="$WORK/${name//\//-}.yaml"
        if ! "$KUBECTL" kustomize "$dir" >"$out" 2>"$WORK/kustomize.err"; then
            cat "$WORK/kustomize.err"
            FAILED+=("kustomize $name")
            continue
        fi
        ok "kubectl kustomize $dir"
        run_py "rendered $name" k8s-rendered "$name" "$out"
    done
fi

step "summary"
while read -r p f; do
    PASSED=$((PASSED + p))
    FAILS=$((FAILS + f))
done < <(cat "$WORK/counts" 2>/dev/null || true)
# Failures outside check_deploy.py (promtool, kustomize, ...) count one each.
for name in "${FAILED[@]}"; do
    case "$name" in
        dockerfile | config-source | metric-source | compose | prometheus-config | "rules sync" | dashboard | metric-names | k8s-files | "rendered "*) ;;
        *) FAILS=$((FAILS + 1)) ;;
    esac
done
if [ ${#FAILED[@]} -gt 0 ]; then
    printf '   failed: %s\n' "${FAILED[@]}"
fi
echo "deploy: $PASSED passed, $FAILS failed"
[ ${#FAILED[@]} -eq 0 ]
