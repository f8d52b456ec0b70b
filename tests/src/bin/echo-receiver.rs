//! A callback receiver for trying the pipeline by hand (`make run` starts one): prints every
//! envelope it receives, checks `Elements-Webhook-Signature` when `SIGNATURE_KEY` is set, and
//! answers 200. Listens on `RECEIVER_LISTEN` (default 127.0.0.1:9999).

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

async fn receive(headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers
        .get("elements-webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let signature = match (
        std::env::var("SIGNATURE_KEY").ok(),
        headers.get("elements-webhook-signature"),
    ) {
        (Some(key), Some(given)) => {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
            mac.update(&body);
            let expected = format!(
                "sha256={}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            );
            if given.as_bytes() == expected.as_bytes() {
                "signature ok"
            } else {
                "SIGNATURE MISMATCH"
            }
        }
        (Some(_), None) => "SIGNATURE MISSING",
        (None, _) => "signature not checked (set SIGNATURE_KEY)",
    };
    println!(
        "--- delivery {id} ({signature})\n{}",
        String::from_utf8_lossy(&body)
    );
    StatusCode::OK
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("RECEIVER_LISTEN").unwrap_or_else(|_| "127.0.0.1:9999".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echo-receiver listening on http://{addr}/");
    axum::serve(listener, Router::new().fallback(receive)).await?;
    Ok(())
}
