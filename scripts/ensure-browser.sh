#!/usr/bin/env bash
# Makes sure the console's browser test can run: Debian's Chromium, Node.js, and playwright-core
# (tests/browser/package-lock.json) in tests/browser/node_modules. Idempotent: a second run only
# checks. Prints the Chromium binary. Playwright's own browser download is never used: it needs
# hosts we cannot reach; playwright-core drives Debian's Chromium instead.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/tests/browser"

need_apt=()
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_apt[*]} from Debian's packages" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") >&2
  else
    echo "the console's browser test needs: ${need_apt[*]} (Debian: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

# npm ci when node_modules is missing or older than the lockfile.
stamp="$dir/node_modules/.installed-from-lock"
if [ ! -f "$stamp" ] || [ "$dir/package-lock.json" -nt "$stamp" ]; then
  echo "installing playwright-core (tests/browser/package-lock.json)" >&2
  (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts >&2)
  touch "$stamp"
fi
command -v chromium 2>/dev/null || echo /usr/bin/chromium
