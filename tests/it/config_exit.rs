//! A bad or missing setting stops a service at start-up with status 64 and a message naming the
//! variable, before it binds a port or talks to NATS.

use std::net::TcpListener;
use std::process::Command;

use integration_tests::procs::binary;

/// Runs `name` with only `env`, and returns its status and stderr.
fn run(name: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    run_with(name, &[], env)
}

fn run_with(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    // The event log's database is required with the log on: named here, so that each case
    // finds the mistake it makes (a case may set it again, or empty it).
    let out = Command::new(binary(name))
        .args(args)
        .env_clear()
        .env(
            "EVENT_LOG_DATABASE_URL",
            "postgres://ecwid@127.0.0.1:9/ecwid_events",
        )
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (service, environment, the variable the message must name)
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_settings_exit_64_naming_the_variable() {
    // A port we hold: a service that bound it before checking its config would fail differently.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let cases: &[Case<'_>] = &[
        ("ingest", &[("INGEST_LISTEN", &listen)], "ADMIN_TOKEN"),
        (
            "ingest",
            &[
                ("ADMIN_TOKEN", "0123456789abcdefXYZ"),
                ("INGEST_LISTEN", "8080"),
            ],
            "INGEST_LISTEN",
        ),
        (
            "ingest",
            &[
                ("ADMIN_TOKEN", "0123456789abcdefXYZ"),
                ("INGEST_PUBLISH_TIMEOUT_MS", "soon"),
            ],
            "INGEST_PUBLISH_TIMEOUT_MS",
        ),
        (
            "normalizer",
            &[("OPS_LISTEN", &listen), ("NORMALIZER_CONCURRENCY", "0")],
            "NORMALIZER_CONCURRENCY",
        ),
        (
            "deliverer",
            &[
                ("OPS_LISTEN", &listen),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            "ingest",
            &[
                ("ADMIN_TOKEN", "0123456789abcdefXYZ"),
                ("INGEST_LISTEN", &listen),
                ("OTEL_TRACES_SAMPLER", "sometimes"),
            ],
            "OTEL_TRACES_SAMPLER",
        ),
        (
            "normalizer",
            &[("NATS_URL", "http://nats:4222")],
            "NATS_URL",
        ),
        // A cluster list with one bad entry: refused at start-up, not retried forever.
        (
            "ingest",
            &[
                ("ADMIN_TOKEN", "0123456789abcdefXYZ"),
                ("INGEST_LISTEN", &listen),
                ("NATS_URL", "nats://127.0.0.1:4222,nats://127.0.0.1:42x3"),
            ],
            "NATS_URL",
        ),
        (
            "deliverer",
            &[
                ("OPS_LISTEN", &listen),
                ("NATS_URL", "nats://127.0.0.1:4222,,nats://127.0.0.1:4223"),
            ],
            "NATS_URL",
        ),
        (
            "deliverer",
            &[
                ("OPS_LISTEN", &listen),
                ("DELIVER_RETRY_SCHEDULE", "5s,later"),
            ],
            "DELIVER_RETRY_SCHEDULE",
        ),
        (
            "deliverer",
            &[("DELIVER_ALLOW_NETWORKS", "the office")],
            "DELIVER_ALLOW_NETWORKS",
        ),
        ("deliverer", &[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
        (
            "normalizer",
            &[("OPS_LISTEN", &listen), ("EVENT_LOG_DATABASE_URL", "")],
            "EVENT_LOG_DATABASE_URL",
        ),
        (
            "ingest",
            &[
                ("ADMIN_TOKEN", "0123456789abcdefXYZ"),
                ("EVENT_LOG_DATABASE_URL", "postgres://ecwid@db"),
            ],
            "EVENT_LOG_DATABASE_URL",
        ),
        (
            "deliverer",
            &[("OPS_LISTEN", &listen), ("EVENT_LOG_DATABASE_POOL", "0")],
            "EVENT_LOG_DATABASE_POOL",
        ),
        // Tokio's own variable: checked by the service, not left to Tokio's panic.
        (
            "deliverer",
            &[("OPS_LISTEN", &listen), ("TOKIO_WORKER_THREADS", "0")],
            "TOKIO_WORKER_THREADS",
        ),
        (
            "poller",
            &[("OPS_LISTEN", &listen), ("ECWID_API_URL", "ftp://ecwid")],
            "ECWID_API_URL",
        ),
        ("poller", &[("POLLER_RATE_LIMIT", "1")], "POLLER_RATE_LIMIT"),
        (
            "poller",
            &[("POLLER_LEASE_TTL_MS", "soon")],
            "POLLER_LEASE_TTL_MS",
        ),
    ];
    for (service, env, var) in cases {
        let (code, stderr) = run(service, env);
        assert_eq!(code, Some(64), "{service} with {env:?}: {stderr}");
        assert!(
            stderr.contains(var),
            "{service}: the message names {var}: {stderr}"
        );
    }
    drop(held);
}

/// Every binary's `healthcheck` subcommand (the image's and compose's health check) with the
/// variable naming its ops address: the ingest serves /healthz on its admin port.
const HEALTHCHECKS: &[(&str, &str)] = &[
    ("ingest", "ADMIN_LISTEN"),
    ("normalizer", "OPS_LISTEN"),
    ("deliverer", "OPS_LISTEN"),
    ("poller", "OPS_LISTEN"),
];

#[test]
fn healthcheck_answers_for_the_ops_port() {
    for (service, ops_var) in HEALTHCHECKS {
        // Nothing listens: exit 1.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (code, stderr) = run_with(service, &["healthcheck"], &[(ops_var, &free.to_string())]);
        assert_eq!(code, Some(1), "{service} with nothing on {free}: {stderr}");

        // Something answers 200 on /healthz: exit 0; anything else: exit 1.
        for (reply, expected) in [
            ("HTTP/1.1 200 OK", 0),
            ("HTTP/1.1 503 Service Unavailable", 1),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let (sent, request) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = conn.read(&mut buf).unwrap();
                let _ = sent.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                conn.write_all(format!("{reply}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .unwrap();
            });
            let (code, stderr) =
                run_with(service, &["healthcheck"], &[(ops_var, &addr.to_string())]);
            assert_eq!(code, Some(expected), "{service} answered {reply}: {stderr}");
            // The thread is left blocked in accept() if the binary never connected: wait bounded.
            let request = request
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("{service} healthcheck never reached {addr}"));
            assert!(request.starts_with("GET /healthz "), "{service}: {request}");
        }
    }
}
