#!/usr/bin/env python3
"""What the event log would cost in PostgreSQL, on this machine (`make bench-pglog`; not a test).

Issue 11 keeps JetStream the only stateful service unless a measured reason says it cannot serve.
The lookup's tail says JetStream misses one target (nats-server's first read of a block); this
measures the other store the machine has, PostgreSQL, against the log's other target, its cost:
CPU per record of every PostgreSQL process for the two writes the log makes per envelope (the
normalizer's creation, the deliverer's snapshot after an attempt), with a million records in the
table, and the two lookups the bench times (by id, by objectId).

The schema is the leanest that answers the API's filters from an index: the primary key (id,
`GET /events/{id}`), (instance, time) and (store, time) for the searches newest first, objectId,
and a BRIN index on the time for the unfiltered listing and retention (`ecwidEventId` is found by
computed ids, as today). fillfactor 60 leaves room for the update to stay on its page (HOT).
Durable settings (synchronous_commit on: a delivered record must survive a crash), 1 GB of shared
buffers. Writes go in batches of 100 rows, each column one array parameter, as a Rust writer
would batch them; one statement and one commit per batch.

PostgreSQL runs privately: its own data directory under a temp dir and its own socket, never the
machine's server. As root it runs as the `postgres` user (PostgreSQL refuses root).
"""

import argparse
import glob
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

HZ = os.sysconf("SC_CLK_TCK")


def bindir():
    try:
        return subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not found:
            sys.exit("bench-pglog: no PostgreSQL server binaries (Debian: apt-get install postgresql)")
        return found[-1]


class Server:
    def __init__(self, root):
        self.bin = bindir()
        self.dir = root
        self.data = os.path.join(root, "data")
        # No TCP listener (`listen_addresses=''`): the port only names the socket file in this
        # private directory, so any number does and none can be taken.
        self.port = 5432
        self.as_user = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                sys.exit("bench-pglog: PostgreSQL refuses to run as root, and there is no `postgres` user to run it as")
            os.chown(root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", quiet=True)
        opts = (
            f"-p {self.port} -k {root} -c listen_addresses='' -c shared_buffers=1GB "
            "-c max_wal_size=8GB"
        )
        self.run("pg_ctl", "-D", self.data, "-o", opts, "-l", os.path.join(root, "pg.log"), "-w", "start", quiet=True)
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def run(self, tool, *args, quiet=False):
        out = subprocess.DEVNULL if quiet else None
        subprocess.run(self.as_user + [os.path.join(self.bin, tool), *args], check=True, stdout=out)

    def stop(self):
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "stop", quiet=True)

    def psql(self, *args):
        return ["psql", "-X", "-q", "-h", self.dir, "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", *args]

    def sql(self, text):
        return subprocess.run(self.psql("-At", "-c", text), check=True, capture_output=True, text=True).stdout

    def cpu_secs(self):
        """CPU of the postmaster, of the backends it has reaped, and of its live children."""

        def stat(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                return 0, 0
            return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])

        own, reaped = stat(self.pid)
        total = own + reaped
        kids = subprocess.run(["ps", "--ppid", str(self.pid), "-o", "pid="], capture_output=True, text=True).stdout
        for kid in kids.split():
            total += stat(int(kid))[0]
        return total / HZ

    def script_cpu(self, path):
        """Runs a SQL file; the CPU PostgreSQL spent on it and the wall time."""
        time.sleep(1.0)
        before, started = self.cpu_secs(), time.monotonic()
        subprocess.run(self.psql("-f", path), check=True, stdout=subprocess.DEVNULL)
        wall = time.monotonic() - started
        time.sleep(1.5)  # the backend exits and is reaped; background writers catch up
        return self.cpu_secs() - before, wall

    def timed(self, queries):
        """Runs queries in one session with \\timing; each one's milliseconds."""
        text = "\\timing on\n" + "\n".join(queries) + "\n"
        out = subprocess.run(self.psql("-At"), input=text, check=True, capture_output=True, text=True).stdout
        ms = [float(line.split()[1]) for line in out.splitlines() if line.startswith("Time: ")]
        assert len(ms) == len(queries), (len(ms), len(queries))
        return sorted(ms)


SCHEMA = """
CREATE TABLE event_log (
  id uuid PRIMARY KEY,
  instance_id text, store_id text NOT NULL, object_type text NOT NULL, object_id text NOT NULL,
  event_type text NOT NULL, ecwid_event_id text NOT NULL, format text NOT NULL,
  verified bool NOT NULL, request_id text NOT NULL, received_at timestamptz NOT NULL,
  status text NOT NULL, attempts int NOT NULL DEFAULT 0, last_status text, last_error text,
  last_attempt_at timestamptz, next_attempt_at timestamptz, delivered_at timestamptz,
  envelope_seq bigint, attempt_log jsonb NOT NULL DEFAULT '[]'
) WITH (fillfactor = 60);
CREATE INDEX event_log_instance ON event_log (instance_id, received_at DESC, id);
CREATE INDEX event_log_store ON event_log (store_id, received_at DESC, id);
CREATE INDEX event_log_object ON event_log (object_id);
CREATE INDEX event_log_received ON event_log USING brin (received_at);
"""

def objects(n):
    """How many objectIds n records have: five records each."""
    return max(n // 5, 1)


INSTANCES = [f"00000000-0000-4000-8000-0000000000{i:02d}" for i in range(1, 21)]


def prefill(n):
    """n delivered records, five per objectId, 10 ms apart, built by the server."""
    return f"""
INSERT INTO event_log (id, instance_id, store_id, object_type, object_id, event_type,
  ecwid_event_id, format, verified, request_id, received_at, status, attempts, last_status,
  last_attempt_at, delivered_at, envelope_seq, attempt_log)
SELECT md5('r' || g)::uuid, '00000000-0000-4000-8000-0000000000' || lpad((g % 20 + 1)::text, 2, '0'),
  (1000000 + g % 50)::text, 'order', 'LOG' || (g % {objects(n)}), 'UPDATED',
  (1000000 + g % 50) || '_' || md5('e' || g), 'v3', true, md5('q' || g)::uuid::text,
  now() - ({n} - g) * interval '10 ms', 'delivered', 1, '200', now(), now(), g,
  jsonb_build_array(jsonb_build_object('number', 1, 'startedAt', '2026-12-06T08:00:00.123Z',
    'durationMs', 3, 'status', 200, 'response', '{{"ok":true}}'))
FROM generate_series(0, {n - 1}) g;
VACUUM ANALYZE event_log;
"""


def literal(values, cast):
    """One array parameter, as text: ARRAY['a','b']::cast[]."""
    quoted = ",".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"ARRAY[{quoted}]::{cast}[]"


def writes(ids, batch):
    """The normalizer's creations, then the deliverer's snapshots, `batch` rows a statement."""
    creates, updates = [], []
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch]
        rows = len(chunk)
        creates.append(
            "INSERT INTO event_log (id, instance_id, store_id, object_type, object_id, event_type,"
            " ecwid_event_id, format, verified, request_id, received_at, status, envelope_seq) "
            "SELECT id, inst, store, 'order', obj, 'UPDATED', eid, 'v3', true, rid, now(), 'pending', seq "
            "FROM unnest("
            + ", ".join(
                [
                    literal(chunk, "uuid"),
                    literal([random.choice(INSTANCES) for _ in range(rows)], "text"),
                    literal([str(1000000 + random.randrange(50)) for _ in range(rows)], "text"),
                    literal([f"XJ{random.randrange(200000)}" for _ in range(rows)], "text"),
                    literal([f"1000001_{uuid.uuid4().hex}" for _ in range(rows)], "text"),
                    literal([str(uuid.uuid4()) for _ in range(rows)], "text"),
                    literal([str(s + i) for i in range(rows)], "bigint"),
                ]
            )
            + ") AS t(id, inst, store, obj, eid, rid, seq) ON CONFLICT (id) DO NOTHING;"
        )
        attempts = [
            json.dumps(
                [
                    {
                        "number": 1,
                        "startedAt": "2026-12-06T08:00:00.123Z",
                        "durationMs": random.randrange(1, 50),
                        "status": 200,
                        "response": '{"ok":true}',
                    }
                ]
            )
            for _ in range(rows)
        ]
        updates.append(
            "UPDATE event_log e SET status = 'delivered', attempts = 1, last_status = '200', "
            "last_attempt_at = now(), delivered_at = now(), next_attempt_at = NULL, attempt_log = v.a "
            f"FROM unnest({literal(chunk, 'uuid')}, {literal(attempts, 'jsonb')}) AS v(id, a) "
            "WHERE e.id = v.id;"
        )
    return creates, updates


def pct(sorted_ms, p):
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records in the table first")
    ap.add_argument("--writes", type=int, default=50_000, help="records created, then updated, timed")
    ap.add_argument("--batch", type=int, default=100, help="rows a statement")
    ap.add_argument("--samples", type=int, default=500, help="lookups of each kind")
    args = ap.parse_args()
    random.seed(11)
    root = tempfile.mkdtemp(prefix="bench-pglog-")
    server = None
    try:
        server = Server(root)
        print(f"PostgreSQL: {server.sql('SHOW server_version').strip()} ({server.bin}), private, {root}")
        server.sql(SCHEMA)
        started = time.monotonic()
        subprocess.run(server.psql(), input=prefill(args.records), text=True, check=True, stdout=subprocess.DEVNULL)
        size = server.sql("SELECT pg_size_pretty(pg_total_relation_size('event_log'))").strip()
        print(f"filled {args.records} records in {time.monotonic() - started:.1f} s ({size} with indexes)")
        ids = [str(uuid.uuid4()) for _ in range(args.writes)]
        creates, updates = writes(ids, args.batch)
        figures = {}
        for name, statements in (("create", creates), ("update", updates)):
            path = os.path.join(root, f"{name}.sql")
            with open(path, "w") as f:
                f.write("\n".join(statements))
            cpu, wall = server.script_cpu(path)
            figures[name] = cpu / args.writes * 1e6
            print(f"{name}: {figures[name]:.1f} us of PostgreSQL CPU per record, {args.writes / wall:.0f} records/s")
        hot = server.sql("SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'event_log'").strip()
        print(f"updates that stayed on their page (HOT): {hot} of {args.writes}")
        n = args.records
        picks = [random.randrange(n) for _ in range(args.samples)]
        by_id = server.timed([f"SELECT * FROM event_log WHERE id = md5('r' || {i})::uuid;" for i in picks])
        by_object = server.timed(
            [
                f"SELECT * FROM event_log WHERE object_id = 'LOG{i % objects(n)}' ORDER BY received_at DESC LIMIT 50;"
                for i in picks
            ]
        )
        for name, ms in (("by id", by_id), ("by objectId", by_object)):
            print(f"lookup {name}: p50 {pct(ms, 0.5):.2f} ms, p99 {pct(ms, 0.99):.2f} ms (psql's \\timing: a round trip from a client on this machine)")
        print(
            f"PGLOG create_us={figures['create']:.1f} update_us={figures['update']:.1f} "
            f"per_envelope_us={figures['create'] + figures['update']:.1f} "
            f"lookup_p99_ms={pct(by_id, 0.99):.2f} search_p99_ms={pct(by_object, 0.99):.2f} records={n}"
        )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
