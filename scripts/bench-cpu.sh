#!/usr/bin/env bash
# `make bench-cpu`: instructions per event of the ingest, the normalizer and the deliverer, each
# under valgrind's callgrind, on a fixed workload (tests/bench/src/cpu.rs says how). Needs the
# release binaries (`make bench-cpu` builds them) and valgrind, which it installs from Debian's
# packages when missing and we are root. Arguments go to `bench cpu` (--events, --rate, ...).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_control >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing valgrind from Debian's packages" >&2
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >&2
  else
    echo "bench-cpu needs valgrind (with callgrind_control): apt-get install valgrind" >&2
    exit 1
  fi
fi
NATS_SERVER_BIN="${NATS_SERVER_BIN:-$(scripts/ensure-nats-server.sh)}"
export NATS_SERVER_BIN
ECWID_TEST_PG_DURABLE=1 exec ./target/release/bench cpu "$@"
