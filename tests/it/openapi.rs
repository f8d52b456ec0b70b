//! The OpenAPI document against the admin listener it describes: every documented path and
//! method is routed (not the 404/405 fallbacks), every route in the code is documented, the
//! read-only token may make exactly the documented GETs, and the console and the document are
//! served on the admin listener only. (The document's own validity is checked by an independent
//! validator in `make test`: `scripts/ensure-openapi-validator.sh`.)

use std::collections::BTreeSet;
use std::path::Path;

use integration_tests::{NatsServer, Pipeline, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::Value;

const READ_TOKEN: &str = "read-only-token-0123456789";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn spec() -> Value {
    serde_json::from_str(admin::console::OPENAPI_JSON).expect("openapi.json is JSON")
}

/// (METHOD, path) for every operation the document describes.
fn documented(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// (METHOD, path) for every `.route("…", get(…).post(…))` in the code the admin listener serves:
/// the admin crate's modules and the shared ops router (tests excluded).
fn routed_in_code() -> BTreeSet<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Every admin module (the admin listener mounts their routes), so a new module's routes
    // cannot be missed.
    let mut files: Vec<String> = std::fs::read_dir(root.join("admin/src"))
        .expect("admin/src")
        .filter_map(|e| e.ok())
        .map(|e| format!("admin/src/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".rs"))
        .collect();
    files.sort();
    files.push("shared/src/ops.rs".to_owned());
    let mut out = BTreeSet::new();
    for file in &files {
        let file = file.as_str();
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        // A route call may span lines (rustfmt): take each `.route(` up to its closing paren.
        for rest in code.split(".route(").skip(1) {
            let call = balanced(rest);
            let path = call
                .trim_start()
                .strip_prefix('"')
                .and_then(|rest| rest.split('"').next())
                .expect("a route's path is a string literal");
            let methods: Vec<&str> = METHODS
                .into_iter()
                .filter(|m| {
                    [" ", ".", "(", "\n"]
                        .iter()
                        .any(|p| call.contains(&format!("{p}{m}(")))
                })
                .collect();
            assert!(!methods.is_empty(), "{file}: no method found for {path}");
            for m in methods {
                out.insert((m.to_ascii_uppercase(), path.to_owned()));
            }
        }
    }
    out
}

/// `text` up to the parenthesis that closes the one opened just before it.
fn balanced(text: &str) -> &str {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return &text[..i],
            ')' => depth -= 1,
            _ => {}
        }
    }
    text
}

#[test]
fn every_route_in_the_code_is_documented_and_the_reverse() {
    let code = routed_in_code();
    let doc = documented(&spec());
    let undocumented: Vec<_> = code.difference(&doc).collect();
    let unrouted: Vec<_> = doc.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "openapi.json describes routes the code lacks: {unrouted:?}"
    );
    // The scan found the routes we know of, so it is not vacuous.
    assert!(code.contains(&("POST".into(), "/events/{id}/redeliver".into())));
    assert!(code.contains(&("GET".into(), "/readyz".into())));
}

/// A concrete path for a documented one: ids that do not exist, so nothing is changed.
fn concrete(path: &str) -> String {
    path.replace("{id}", "no-such-id")
        .replace("{seq}", "999999")
        .replace("{file}", "console.js")
}

/// Whether an answer came from the router's fallbacks rather than a route.
fn is_fallback(status: u16, body: &str) -> bool {
    status == 405 || (status == 404 && body.contains("no such endpoint"))
}

async fn send(
    p: &Pipeline,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String, Option<String>) {
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    // Redirects are answers too (`/ui` → `/ui/`): not followed.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut req = http
        .request(method.clone(), p.admin_url(path))
        .timeout(std::time::Duration::from_secs(20));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if method == Method::POST || method == Method::PATCH {
        req = req.header("content-type", "application/json").body("{}");
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, resp.text().await.unwrap_or_default(), ct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_what_the_document_says_and_the_read_token_only_reads() {
    let nats = NatsServer::start().await;
    let p = Pipeline::start(&nats.url(), &[("ADMIN_READ_TOKEN", READ_TOKEN)]).await;
    let spec = spec();

    for (method, path) in documented(&spec) {
        let url = concrete(&path);
        let op = &spec["paths"][&path][method.to_ascii_lowercase()];
        let public = op
            .get("security")
            .is_some_and(|s| s == &serde_json::json!([]));

        let (status, body, _) = send(&p, &method, &url, Some(ADMIN_TOKEN)).await;
        assert!(
            !is_fallback(status, &body),
            "{method} {path}: {status} {body}"
        );
        let documented_status =
            op["responses"].get(status.to_string()).is_some() || matches!(status, 400 | 401 | 503);
        assert!(
            documented_status,
            "{method} {path}: {status} is not among its documented answers: {body}"
        );

        let (status, body, ct) = send(&p, &method, &url, Some(READ_TOKEN)).await;
        if method == "GET" {
            assert!(
                status != 401 && status != 403,
                "read token, {method} {path}: {status} {body}"
            );
        } else {
            assert_eq!(status, 403, "read token, {method} {path}: {body}");
            let err: Value = serde_json::from_str(&body).expect("JSON error");
            assert_eq!(err["error"], "forbidden", "{body}");
            assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(ct.as_deref(), Some("application/json"));
        }

        let (status, body, _) = send(&p, &method, &url, None).await;
        if public {
            assert_ne!(status, 401, "{method} {path} is documented as public");
        } else {
            assert_eq!(status, 401, "no token, {method} {path}: {body}");
        }
    }

    // The role the console reads.
    for (token, role) in [(ADMIN_TOKEN, "admin"), (READ_TOKEN, "read")] {
        let (status, body, _) = send(&p, "GET", "/whoami", Some(token)).await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["role"], role);
    }
    let (status, body, _) = send(&p, "GET", "/whoami", Some("not-a-token-at-all")).await;
    assert_eq!(status, 401, "{body}");

    // The document served is the one in the source tree; the console's files carry their types
    // and a policy that runs only their own script.
    let served: Value = p
        .http
        .get(p.admin_url("/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    assert_eq!(served, spec);
    for (path, ct) in [
        ("/ui/", "text/html"),
        ("/ui/console.js", "text/javascript"),
        ("/ui/console.css", "text/css"),
    ] {
        let r = p.http.get(p.admin_url(path)).send().await.expect("ui");
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap_or("").starts_with(ct));
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap_or("")
            .contains("script-src 'self'"));
    }
    for path in ["/ui/admin.rs", "/ui/%2e%2e%2fCargo.toml"] {
        let r = p.http.get(p.admin_url(path)).send().await.expect("ui");
        assert_eq!(r.status(), 404, "{path}");
    }

    // Nothing of it on the webhook listener.
    for path in ["/ui/", "/ui/console.js", "/openapi.json", "/whoami"] {
        let r = p
            .http
            .get(format!("http://{}{path}", p.webhook))
            .send()
            .await
            .expect("webhook listener");
        assert!(
            matches!(r.status().as_u16(), 404 | 405),
            "{path} on the webhook listener: {}",
            r.status()
        );
    }
    p.stop().await;
}

/// A read token too short, or the same as the admin token, stops the ingest at start-up with
/// status 64 and a message naming `ADMIN_READ_TOKEN`, before it binds a port.
#[test]
fn a_bad_read_token_exits_64_naming_it() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = held.local_addr().expect("addr").to_string();
    for read in ["too-short", ADMIN_TOKEN] {
        let out = std::process::Command::new(integration_tests::procs::binary("ingest"))
            .env_clear()
            .envs([
                ("ADMIN_TOKEN", ADMIN_TOKEN),
                ("ADMIN_READ_TOKEN", read),
                ("INGEST_LISTEN", listen.as_str()),
            ])
            .output()
            .expect("the ingest runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{read}: {stderr}");
        assert!(stderr.contains("ADMIN_READ_TOKEN"), "{stderr}");
    }
    drop(held);
}
