#!/usr/bin/env bash
# `make run`: the whole pipeline on this machine. Starts a nats-server with JetStream when
# NATS_URL is unset and nothing answers on 127.0.0.1:4222 (store in .data/nats), builds the three
# services, starts them and an echo receiver, and prints how to try it. Ctrl-C stops everything.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
profile="${PROFILE:-release}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if [ -z "${NATS_URL:-}" ]; then
  export NATS_URL="nats://127.0.0.1:4222"
  if port_open 127.0.0.1 4222; then
    echo "Using the NATS server already on 127.0.0.1:4222."
  else
    bin="$(scripts/ensure-nats-server.sh)"
    mkdir -p .data/nats
    echo "Starting $bin with JetStream (store: .data/nats)."
    "$bin" -a 127.0.0.1 -p 4222 -js -sd .data/nats -m 8222 >.data/nats.log 2>&1 &
    pids+=($!)
    for _ in $(seq 1 50); do port_open 127.0.0.1 4222 && break; sleep 0.1; done
  fi
fi

cargo build --locked --profile "$profile" -p ingest -p normalizer -p deliverer -p poller -p integration-tests --bin echo-receiver
dir="target/$profile"; [ "$profile" = dev ] && dir="target/debug"

export ADMIN_TOKEN="${ADMIN_TOKEN:-local-admin-token-change-me}"
export DELIVER_ALLOW_NETWORKS="${DELIVER_ALLOW_NETWORKS:-127.0.0.0/8,::1/128}"
export RUST_LOG="${RUST_LOG:-info}"
"$dir/ingest" & pids+=($!)
"$dir/normalizer" & pids+=($!)
"$dir/deliverer" & pids+=($!)
# Polls https://app.ecwid.com/api/v3 (ECWID_API_URL) for instances with event.vendor.type=polling.
"$dir/poller" & pids+=($!)
SIGNATURE_KEY=local-signature-key "$dir/echo-receiver" & pids+=($!)

cat <<MSG

ecwid-events is running:
  webhooks   http://127.0.0.1:8080/events/ecwid   (alias /elements/api-v2/events/ecwid)
  admin API  http://127.0.0.1:8081                (Authorization: Bearer $ADMIN_TOKEN; also /metrics /healthz /readyz)
  console    http://127.0.0.1:8081/ui/            (sign in with $ADMIN_TOKEN; API described at /openapi.json)
  normalizer http://127.0.0.1:9101/metrics
  deliverer  http://127.0.0.1:9102/metrics
  poller     http://127.0.0.1:9103/metrics
  receiver   http://127.0.0.1:9999/               (prints what it receives)
  NATS       $NATS_URL

Try it:
  curl -s -X POST http://127.0.0.1:8081/instances -H "Authorization: Bearer $ADMIN_TOKEN" \\
    -H 'Content-Type: application/json' -d '{"element":{"key":"ecwid"},"configuration":{"ecwid.order.key":"","ecwid.product.key":"","ecwid.store.id":"1003","event.notification.enabled":"true","event.notification.callback.url":"http://127.0.0.1:9999/hook","event.notification.signature.key":"local-signature-key"},"tags":[],"name":"demo"}'
  curl -s -X POST http://127.0.0.1:8080/events/ecwid -H 'Content-Type: application/json' \\
    -d '{"eventId":"demo-1","eventCreated":1764000000,"storeId":1003,"entityId":42,"eventType":"order.created","data":{"orderId":"XJ12H"}}'

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
