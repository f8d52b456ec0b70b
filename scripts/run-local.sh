#!/usr/bin/env bash
# `make run`: the whole pipeline on this machine. Starts a nats-server with JetStream when
# NATS_URL is unset and nothing answers on 127.0.0.1:$NATS_PORT (store in .data/nats), and a
# private PostgreSQL for the event log when EVENT_LOG_DATABASE_URL (and DATABASE_URL) is unset and
# EVENT_LOG is not off (data in .data/postgres, a socket there and 127.0.0.1:$PG_PORT [5433];
# never the machine's own server; Debian's binaries, scripts/ensure-postgres.sh), builds the
# four services and an echo receiver, starts them, waits until each answers /readyz, and prints
# how to try it. Ctrl-C stops everything.
#
# Ports (defaults in brackets) come from the environment, so a second pipeline (or a test) can
# run beside the first: NATS_PORT [4222], NATS_MONITOR_PORT [8222], INGEST_LISTEN [0.0.0.0:8080],
# ADMIN_LISTEN [127.0.0.1:8081], NORMALIZER_OPS_LISTEN [0.0.0.0:9101], DELIVERER_OPS_LISTEN
# [0.0.0.0:9102], POLLER_OPS_LISTEN [0.0.0.0:9103], RECEIVER_LISTEN [127.0.0.1:9999].
# PROFILE [release] is the cargo profile; CARGO_TARGET_DIR is honoured.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
profile="${PROFILE:-release}"
nats_port="${NATS_PORT:-4222}"
nats_monitor_port="${NATS_MONITOR_PORT:-8222}"
export INGEST_LISTEN="${INGEST_LISTEN:-0.0.0.0:8080}"
export ADMIN_LISTEN="${ADMIN_LISTEN:-127.0.0.1:8081}"
normalizer_ops="${NORMALIZER_OPS_LISTEN:-0.0.0.0:9101}"
deliverer_ops="${DELIVERER_OPS_LISTEN:-0.0.0.0:9102}"
poller_ops="${POLLER_OPS_LISTEN:-0.0.0.0:9103}"
export RECEIVER_LISTEN="${RECEIVER_LISTEN:-127.0.0.1:9999}"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
fail() { echo "make run: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
# host:port as a client reaches it: a listener on 0.0.0.0 answers on loopback.
local_addr() { echo "${1/#0.0.0.0:/127.0.0.1:}"; }
# The status line's code of GET http://$1$2, or nothing (bash's /dev/tcp: no curl needed).
http_status() (
  addr="$(local_addr "$1")"
  exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}" || exit 0
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$addr" >&3
  IFS= read -r -t 2 line <&3 || true
  line="${line#HTTP/1.? }"; echo "${line%% *}"
) 2>/dev/null

if [ -z "${NATS_URL:-}" ]; then
  export NATS_URL="nats://127.0.0.1:$nats_port"
  if port_open 127.0.0.1 "$nats_port"; then
    echo "Using the NATS server already on 127.0.0.1:$nats_port."
  else
    bin="$(scripts/ensure-nats-server.sh)"
    mkdir -p .data/nats
    echo "Starting $bin with JetStream (store: .data/nats)."
    "$bin" -a 127.0.0.1 -p "$nats_port" -js -sd .data/nats -m "$nats_monitor_port" >.data/nats.log 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do port_open 127.0.0.1 "$nats_port" && break; sleep 0.1; done
    port_open 127.0.0.1 "$nats_port" ||
      fail "nats-server did not listen on 127.0.0.1:$nats_port; its log (.data/nats.log) ends:
$(tail -n 5 .data/nats.log)"
  fi
fi

if [ -z "${EVENT_LOG_DATABASE_URL:-}${DATABASE_URL:-}" ] && [ "${EVENT_LOG:-on}" != off ]; then
  pg_port="${PG_PORT:-5433}"
  pg_bin="$(scripts/ensure-postgres.sh)"
  pg_data="$root/.data/postgres"
  # PostgreSQL refuses to run as root: then it runs as the `postgres` user.
  as_pg=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || fail "running as root needs a postgres user to run PostgreSQL as"
    as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  fi
  mkdir -p "$pg_data"
  [ "$(id -u)" = 0 ] && chown postgres: "$pg_data"
  if [ ! -f "$pg_data/PG_VERSION" ]; then
    echo "Creating a private PostgreSQL in .data/postgres."
    "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_data" -A trust -U postgres >.data/postgres-init.log 2>&1 ||
      fail "initdb failed; see .data/postgres-init.log"
  fi
  if "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; then
    echo "Using the PostgreSQL already on 127.0.0.1:$pg_port."
  else
    echo "Starting PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') (data: .data/postgres, port $pg_port)."
    "${as_pg[@]}" "$pg_bin/postgres" -D "$pg_data" -p "$pg_port" -k "$pg_data" \
      -c listen_addresses=127.0.0.1 >.data/postgres.log 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break; sleep 0.1; done
    "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" ||
      fail "PostgreSQL did not start; its log (.data/postgres.log) ends:
$(tail -n 5 .data/postgres.log)"
  fi
  "$pg_bin/psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'ecwid_events'" | grep -q 1 ||
    "$pg_bin/psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "CREATE DATABASE ecwid_events"
  export EVENT_LOG_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/ecwid_events?sslmode=disable"
fi

services=(ingest normalizer deliverer poller)
# `--bin` selects binaries across the packages named with `-p`; name every one (a lone
# `--bin echo-receiver` would build only that one).
cargo build --locked --profile "$profile" -p ingest -p normalizer -p deliverer -p poller \
  -p integration-tests $(printf -- '--bin %s ' "${services[@]}") --bin echo-receiver
dir="${CARGO_TARGET_DIR:-target}/$profile"; [ "$profile" = dev ] && dir="${CARGO_TARGET_DIR:-target}/debug"
for name in "${services[@]}" echo-receiver; do
  [ -x "$dir/$name" ] || fail "$dir/$name was not built; nothing started."
done

export ADMIN_TOKEN="${ADMIN_TOKEN:-local-admin-token-change-me}"
export DELIVER_ALLOW_NETWORKS="${DELIVER_ALLOW_NETWORKS:-127.0.0.0/8,::1/128}"
export RUST_LOG="${RUST_LOG:-info}"
"$dir/ingest" & pids+=($!); ingest_pid=$!
OPS_LISTEN="$normalizer_ops" "$dir/normalizer" & pids+=($!); normalizer_pid=$!
OPS_LISTEN="$deliverer_ops" "$dir/deliverer" & pids+=($!); deliverer_pid=$!
# Polls https://app.ecwid.com/api/v3 (ECWID_API_URL) for instances with event.vendor.type=polling.
OPS_LISTEN="$poller_ops" "$dir/poller" & pids+=($!); poller_pid=$!
SIGNATURE_KEY=local-signature-key "$dir/echo-receiver" & pids+=($!); receiver_pid=$!

# Ready means /readyz answers 200 (NATS connected, instances loaded), or for the receiver (which
# would print any request) that it listens; 60 s each.
wait_ready() {
  local name="$1" pid="$2" addr="$3" path="${4:-}" local_
  local_="$(local_addr "$addr")"
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || fail "$name exited while starting (see its output above)."
    if [ -n "$path" ]; then
      [ "$(http_status "$addr" "$path")" = 200 ] && return 0
    else
      port_open "${local_%:*}" "${local_##*:}" && return 0
    fi
    sleep 0.1
  done
  fail "$name did not get ready on http://$local_$path within 60 s."
}
wait_ready ingest "$ingest_pid" "$ADMIN_LISTEN" /readyz
wait_ready normalizer "$normalizer_pid" "$normalizer_ops" /readyz
wait_ready deliverer "$deliverer_pid" "$deliverer_ops" /readyz
wait_ready poller "$poller_pid" "$poller_ops" /readyz
wait_ready echo-receiver "$receiver_pid" "$RECEIVER_LISTEN"

webhooks="$(local_addr "$INGEST_LISTEN")"
admin="$(local_addr "$ADMIN_LISTEN")"
receiver="$(local_addr "$RECEIVER_LISTEN")"
cat <<MSG

ecwid-events is running:
  webhooks   http://$webhooks/events/ecwid   (alias /elements/api-v2/events/ecwid)
  admin API  http://$admin                (Authorization: Bearer $ADMIN_TOKEN; also /metrics /healthz /readyz)
  console    http://$admin/ui/            (sign in with $ADMIN_TOKEN; API described at /openapi.json)
  normalizer http://$(local_addr "$normalizer_ops")/metrics
  deliverer  http://$(local_addr "$deliverer_ops")/metrics
  poller     http://$(local_addr "$poller_ops")/metrics
  receiver   http://$receiver/               (prints what it receives)
  NATS       $NATS_URL
  event log  ${EVENT_LOG_DATABASE_URL:-${DATABASE_URL:-off}}

Try it:
  curl -s -X POST http://$admin/instances -H "Authorization: Bearer $ADMIN_TOKEN" \\
    -H 'Content-Type: application/json' -d '{"element":{"key":"ecwid"},"configuration":{"ecwid.order.key":"","ecwid.product.key":"","ecwid.store.id":"1003","event.notification.enabled":"true","event.notification.callback.url":"http://$receiver/hook","event.notification.signature.key":"local-signature-key"},"tags":[],"name":"demo"}'
  curl -s -X POST http://$webhooks/events/ecwid -H 'Content-Type: application/json' \\
    -d '{"eventId":"demo-1","eventCreated":1764000000,"storeId":1003,"entityId":42,"eventType":"order.created","data":{"orderId":"XJ12H"}}'

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
