#!/usr/bin/env bash
# Fails when anything names a nats-server release other than the one pinned in
# scripts/nats-versions.env: the NATS images of the compose file and the Kubernetes manifests
# (`nats:<NATS_VERSION>-alpine`), kustomize image overrides, and the images the READMEs name.
# Run by deploy/check.sh (so by `make test`); offline, no tools but grep.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/nats-versions.env
source scripts/nats-versions.env
want="nats:$NATS_VERSION-alpine"
fails=0
fail() { echo "   FAIL $*"; fails=$((fails + 1)); }
ok() { echo "   ok   $*"; }

# Every `image: nats:…` (quoted or not) in the deploy files.
mapfile -t images < <(grep -rnoE --include='*.yaml' --include='*.yml' \
  "image:[[:space:]]*[\"']?(docker\.io/)?(library/)?nats:[^\"'[:space:]]+" deploy || true)
[ ${#images[@]} -gt 0 ] || fail "no nats image found in deploy/"
for hit in "${images[@]}"; do
  image="${hit##*nats:}"
  image="nats:${image}"
  where="${hit%%:image*}"
  if [ "$image" = "$want" ]; then ok "$where $image"; else fail "$where runs $image, the pinned release is $want (scripts/nats-versions.env)"; fi
done
for f in deploy/compose.yaml deploy/k8s/base/nats.yaml; do
  grep -qE "image:[[:space:]]*[\"']?$want" "$f" || fail "$f does not run $want"
done

# A kustomize `images:` override would replace the tag at render time.
if grep -rnE -A3 --include='kustomization.yaml' '^[[:space:]]*-?[[:space:]]*name:[[:space:]]*nats[[:space:]]*$' deploy/k8s |
  grep -E 'newTag|newName|digest' >/dev/null; then
  fail "a kustomization overrides the nats image; change scripts/nats-versions.env instead"
fi

# Image names in prose: `nats:2.x…` anywhere in the READMEs must be the pinned one.
while IFS= read -r hit; do
  image="$(echo "$hit" | grep -oE 'nats:[0-9][0-9.]*[0-9](-alpine)?' | head -n1)"
  if [ "$image" = "$want" ] || [ "$image" = "nats:$NATS_VERSION" ]; then ok "${hit%%:*} names $image"; else fail "${hit%%:*}: names $image, not $want"; fi
done < <(grep -rnoE 'nats:[0-9][0-9.]*[0-9](-alpine)?' README.md deploy/README.md tests/bench/RESULTS.md 2>/dev/null | cut -d: -f1,2,3- || true)

# The project-local server, when installed, is the pinned release.
if [ -x .tools/bin/nats-server ] && [ -z "${NATS_SERVER_BIN:-}" ]; then
  got="$(.tools/bin/nats-server --version 2>/dev/null || true)"
  if [ "$got" = "nats-server: v$NATS_VERSION" ]; then ok ".tools/bin/nats-server is v$NATS_VERSION"; else fail ".tools/bin/nats-server reports '$got' (run scripts/ensure-nats-server.sh)"; fi
fi

if [ "$fails" -gt 0 ]; then
  echo "   $fails NATS version mismatch(es); the pinned release is $NATS_VERSION"
  exit 1
fi
