#!/usr/bin/env bash
# Lints Prometheus exposition text with `promtool check metrics`.
#
#   bash deploy/check-metrics.sh FILE...
#
# Each FILE holds one scrape of a service's /metrics. Prints promtool's findings
# per file and exits 1 if any file has one. Installs promtool into .tools/ on
# first use (see deploy/tools.sh); offline after that.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 FILE..." >&2
    exit 2
fi
# shellcheck source=deploy/tools.sh
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
ensure_promtool

status=0
for file in "$@"; do
    if [ ! -s "$file" ]; then
        echo "FAIL $file: missing or empty"
        status=1
        continue
    fi
    if out=$("$PROMTOOL" check metrics <"$file" 2>&1); then
        echo "ok   $file"
    else
        echo "FAIL $file:"
        printf '%s\n' "$out" | sed 's/^/     /'
        status=1
    fi
done
exit $status
