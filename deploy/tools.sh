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
# kubectl (for `kubectl kustomize`) and nats-server are taken from PATH.

# shellcheck shell=bash

TOOLS_ROOT="${TOOLS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
TOOLS_DIR="$TOOLS_ROOT/.tools"
VENV="$TOOLS_DIR/venv"
VENV_PY="$VENV/bin/python"
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3

tools_log() { printf '   [tools] %s\n' "$*"; }

# apt-get download into $1; runs `apt-get update` once (as root) if the package
# lists do not know the packages yet.
_apt_download() {
    local dest=$1
    shift
    command -v apt-get >/dev/null 2>&1 || return 1
    mkdir -p "$dest"
    if ! (cd "$dest" && apt-get download "$@" >/dev/null 2>&1); then
        [ "$(id -u)" = 0 ] || return 1
        tools_log "apt-get update"
        apt-get update -qq >/dev/null 2>&1 || return 1
        (cd "$dest" && apt-get download "$@" >/dev/null 2>&1) || return 1
    fi
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
    mkdir -p "$TOOLS_DIR/prometheus" "$TOOLS_DIR/bin"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$TOOLS_DIR/prometheus"
    rm -rf "$tmp"
    ln -sf ../prometheus/usr/bin/promtool "$TOOLS_DIR/bin/promtool"
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
    if [ ! -f "$root/.complete" ]; then
        [ -x /usr/bin/python3 ] || return 0
        tools_log "fetching Debian's docker-compose (1.29) and its Python packages into $root"
        local tmp pkgs
        tmp=$(mktemp -d)
        # The Python packages docker-compose needs, whatever this machine has installed.
        pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
                 --no-breaks --no-replaces --no-enhances --no-pre-depends docker-compose 2>/dev/null \
               | grep -E '^(docker-compose|python3-[a-z0-9.-]+)$' \
               | grep -vE '^python3-(minimal|distutils|lib2to3)$' | sort -u) || true
        if [ -z "$pkgs" ] || ! _apt_download "$tmp" $pkgs; then
            tools_log "docker-compose unavailable; the compose file gets the structural checks only"
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
