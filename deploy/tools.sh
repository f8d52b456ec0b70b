# Sourced by deploy/check.sh and deploy/check-metrics.sh: finds the tools the
# checks use and, on the first run only, installs them under .tools/ in the
# repository root. Nothing here runs during the checks themselves, which use
# only what is already on disk.
#
#   .tools/venv                Python venv: kubernetes-validate (ships the
#                              Kubernetes JSON schemas), PyYAML   (PyPI)
#   .tools/bin/promtool        from Debian's package `prometheus`, unpacked
#                              (apt-get download; no daemon is installed)
#   .tools/compose-v1          Debian's `docker-compose` (1.29) and its Python
#                              packages, unpacked; used only to run
#                              `docker-compose config` when no `docker compose`
#                              plugin exists. Optional.
#
# kubectl (for `kubectl kustomize`) is taken from PATH; nats-server is the pinned release
# scripts/ensure-nats-server.sh installs (scripts/nats-versions.env).

# shellcheck shell=bash disable=SC2034  # the variables set here are read by the callers

TOOLS_ROOT="${TOOLS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
TOOLS_DIR="$TOOLS_ROOT/.tools"
VENV="$TOOLS_DIR/venv"
VENV_PY="$VENV/bin/python"
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3

tools_log() { printf '   [tools] %s\n' "$*"; }

# Makes sure apt's package lists know package $1: runs `apt-get update` (as
# root, at most once per run) when they do not.
_APT_UPDATED=""
_apt_lists() {
    command -v apt-get >/dev/null 2>&1 || return 1
    # No `| grep -q` here: under pipefail its early exit can fail the pipeline.
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null || true)
    if [[ $policy == *"Candidate: "[0-9]* ]]; then
        return 0
    fi
    [ "$(id -u)" = 0 ] && [ -z "$_APT_UPDATED" ] || return 1
    tools_log "apt-get update"
    _APT_UPDATED=1
    apt-get update -qq >/dev/null 2>&1 || return 1
    policy=$(apt-cache policy "$1" 2>/dev/null || true)
    [[ $policy == *"Candidate: "[0-9]* ]]
}

# apt-get download PACKAGE... into directory $1 (no root needed once the lists
# are there).
_apt_download() {
    local dest=$1
    shift
    _apt_lists "$1" || return 1
    mkdir -p "$dest"
    (cd "$dest" && apt-get download "$@" >/dev/null 2>&1)
}

ensure_venv() {
    if [ -x "$VENV_PY" ] && "$VENV_PY" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
        return 0
    fi
    tools_log "creating $VENV (kubernetes-validate==$KUBERNETES_VALIDATE_VERSION, PyYAML==$PYYAML_VERSION from PyPI)"
    command -v python3 >/dev/null 2>&1 || { echo "python3 is required" >&2; return 1; }
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML==$PYYAML_VERSION"
}

# Sets PROMTOOL.
ensure_promtool() {
    if [ -x "$TOOLS_DIR/bin/promtool" ]; then
        PROMTOOL="$TOOLS_DIR/bin/promtool"
        return 0
    fi
    if command -v promtool >/dev/null 2>&1; then
        PROMTOOL=$(command -v promtool)
        return 0
    fi
    tools_log "fetching promtool from Debian's package prometheus into $TOOLS_DIR/bin"
    local tmp
    tmp=$(mktemp -d)
    if ! _apt_download "$tmp" prometheus; then
        rm -rf "$tmp"
        cat >&2 <<'EOF'
promtool not found, and Debian's package `prometheus` (which ships it) could not
be downloaded with apt-get. No PyPI package ships promtool. Install it with
`apt-get install prometheus`, or put a promtool on PATH, and run again.
EOF
        return 1
    fi
    mkdir -p "$TOOLS_DIR/bin"
    # Only promtool, out of the whole server package.
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    mv "$tmp/usr/bin/promtool" "$TOOLS_DIR/bin/promtool"
    rm -rf "$tmp"
    PROMTOOL="$TOOLS_DIR/bin/promtool"
    "$PROMTOOL" --version >/dev/null
}

# Sets COMPOSE (a command, as an array) or leaves it empty when no compose CLI
# can be had. `docker compose config` needs no Docker engine.
COMPOSE=()
COMPOSE_NAME=""
ensure_compose() {
    COMPOSE=()
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
        COMPOSE_NAME="docker compose"
        return 0
    fi
    if command -v docker-compose >/dev/null 2>&1; then
        COMPOSE=(docker-compose)
        COMPOSE_NAME="docker-compose"
        return 0
    fi
    local root="$TOOLS_DIR/compose-v1"
    # Tried before and not available here: do not try again on every run.
    [ -f "$TOOLS_DIR/compose-v1.unavailable" ] && return 0
    if [ ! -f "$root/.complete" ]; then
        tools_log "fetching Debian's docker-compose (1.29) and its Python packages into $root"
        local tmp pkgs=""
        tmp=$(mktemp -d)
        mkdir -p "$TOOLS_DIR"
        # The Python packages docker-compose needs, whatever this machine has installed.
        if [ -x /usr/bin/python3 ] && _apt_lists docker-compose; then
            pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
                     --no-breaks --no-replaces --no-enhances --no-pre-depends docker-compose 2>/dev/null \
                   | grep -E '^(docker-compose|python3-[a-z0-9.-]+)$' \
                   | grep -vE '^python3-(minimal|distutils|lib2to3)$' | sort -u) || true
        fi
        # shellcheck disable=SC2086 # one word per package
        if [ -z "$pkgs" ] || ! _apt_download "$tmp" $pkgs; then
            tools_log "docker-compose unavailable; the compose file gets the structural checks only"
            tools_log "(remove $TOOLS_DIR/compose-v1.unavailable to try again)"
            touch "$TOOLS_DIR/compose-v1.unavailable"
            rm -rf "$tmp"
            return 0
        fi
        rm -rf "$root"
        mkdir -p "$root"
        local deb
        for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$root"; done
        rm -rf "$tmp"
        touch "$root/.complete"
    fi
    COMPOSE=(env "PYTHONPATH=$root/usr/lib/python3/dist-packages" /usr/bin/python3 "$root/usr/bin/docker-compose")
    COMPOSE_NAME="docker-compose 1.29 (Debian's, unpacked in .tools/compose-v1)"
}
