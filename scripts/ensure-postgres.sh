#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries are here and prints their directory. `make run` and the
# tests run a private server from them (their own data directory, never the machine's server).
#
#   PG_BIN_DIR    overrides the search (a directory with initdb, postgres, pg_isready, psql)
#   otherwise     the newest /usr/lib/postgresql/<major>/bin (Debian's layout); when there is none
#                 and we are root, Debian's `postgresql` package is installed with apt-get (the
#                 server binaries only: Debian starts no cluster when none is configured, and
#                 nothing here uses one)
#
# What it installs goes to stderr; stdout is only the directory.
set -euo pipefail
log() { echo "ensure-postgres: $*" >&2; }

usable() { [ -x "$1/initdb" ] && [ -x "$1/postgres" ] && [ -x "$1/pg_isready" ] && [ -x "$1/psql" ]; }

if [ -n "${PG_BIN_DIR:-}" ]; then
  usable "$PG_BIN_DIR" || { log "PG_BIN_DIR=$PG_BIN_DIR lacks initdb, postgres, pg_isready or psql"; exit 1; }
  echo "$PG_BIN_DIR"
  exit 0
fi

newest() {
  local dir best="" major best_major=0
  for dir in /usr/lib/postgresql/*/bin; do
    usable "$dir" || continue
    major="$(basename "$(dirname "$dir")")"
    [[ "$major" =~ ^[0-9]+$ ]] || continue
    if [ "$major" -gt "$best_major" ]; then best="$dir"; best_major="$major"; fi
  done
  [ -n "$best" ] && echo "$best"
}

if found="$(newest)"; then echo "$found"; exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian's postgresql package (server binaries for a private test server)"
  if ! apt-cache policy postgresql 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq >&2 || true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || true
  if found="$(newest)"; then echo "$found"; exit 0; fi
fi
log "no PostgreSQL server binaries found: install Debian's postgresql package or set PG_BIN_DIR"
exit 1
