#!/usr/bin/env bash
# Installs the OpenAPI validator that checks admin/openapi.json (PyPI's openapi-spec-validator,
# written by others, supports 3.1) into .tools/openapi/ with the versions pinned in
# scripts/openapi-validator.txt. Idempotent. Prints the validator's path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.tools/openapi"
pins="$root/scripts/openapi-validator.txt"
bin="$venv/bin/openapi-spec-validator"
stamp="$venv/.installed"
if [ ! -x "$bin" ] || [ ! -f "$stamp" ] || [ "$pins" -nt "$stamp" ]; then
  echo "installing openapi-spec-validator into .tools/openapi" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$pins" >&2
  touch "$stamp"
fi
echo "$bin"
