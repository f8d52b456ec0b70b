#!/usr/bin/env python3
"""Writes the PrometheusRule for the Prometheus Operator from deploy/prometheus/alerts.yml.

alerts.yml is the source; the PrometheusRule's spec is its `groups:` document,
indented under `spec:`. Standard library only, so it runs anywhere:

    python3 deploy/sync-rules.py          # rewrite the PrometheusRule
    python3 deploy/sync-rules.py --check  # exit 1 if it is out of date
"""
import pathlib
import sys

DEPLOY = pathlib.Path(__file__).resolve().parent
SOURCE = DEPLOY / "prometheus" / "alerts.yml"
TARGET = DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/sync-rules.py: edit
# that file, then run `python3 deploy/sync-rules.py`. deploy/check.sh fails when
# the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: ecwid-events
spec:
"""


def render() -> str:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    # Drop the source's leading comment block; keep everything from `groups:` on.
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = [("  " + line) if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main() -> int:
    wanted = render()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != wanted:
            print(f"{TARGET.relative_to(DEPLOY.parent)} is out of date: run python3 deploy/sync-rules.py")
            return 1
        return 0
    TARGET.write_text(wanted, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
