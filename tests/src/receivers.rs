//! Real counterparts for the receivers' features (issue 29), all on loopback: a receiver that
//! answers 401 unless a request passes a check ([`GuardedReceiver`]), an HTTP CONNECT proxy with
//! Basic credentials ([`ConnectProxy`]), an HTTPS receiver that demands a client certificate
//! ([`TlsReceiver`], certificates made by [`Pki`] with rcgen), and an OAuth2 token endpoint
//! ([`TokenEndpoint`]). Each records what it saw and stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use base64::Engine as _;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::serve_until;

type Check = Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync>;

#[derive(Default)]
struct Seen {
    accepted: Vec<HeaderMap>,
    refused: usize,
}

/// A receiver on 127.0.0.1 that answers 200 to requests `check` accepts and 401 to the others.
#[derive(Clone)]
pub struct GuardedReceiver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for GuardedReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedReceiver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl GuardedReceiver {
    pub async fn start(check: impl Fn(&HeaderMap) -> bool + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let check: Check = Arc::new(check);
        let app = Router::new()
            .fallback(guarded)
            .with_state((Arc::clone(&seen), check));
        let cancel = CancellationToken::new();
        serve_until(listener, app, &cancel);
        Self { addr, seen, cancel }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    /// The headers of the requests it accepted.
    pub fn accepted(&self) -> Vec<HeaderMap> {
        self.seen.lock().expect("lock").accepted.clone()
    }

    pub fn refused(&self) -> usize {
        self.seen.lock().expect("lock").refused
    }
}

impl Drop for GuardedReceiver {
    fn drop(&mut self) {
        if Arc::strong_count(&self.seen) == 2 {
            self.cancel.cancel();
        }
    }
}

async fn guarded(
    State((seen, check)): State<(Arc<Mutex<Seen>>, Check)>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let ok = check(&headers);
    let mut seen = seen.lock().expect("lock");
    if ok {
        seen.accepted.push(headers);
        StatusCode::OK
    } else {
        seen.refused += 1;
        StatusCode::UNAUTHORIZED
    }
}

/// An HTTP CONNECT proxy on `ip` (a loopback address) that asks for Basic credentials and
/// records the targets it was asked for.
#[derive(Debug)]
pub struct ConnectProxy {
    pub addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    refused: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl ConnectProxy {
    pub async fn start(ip: [u8; 4], user: &str, password: &str) -> Self {
        let listener = TcpListener::bind(SocketAddr::from((ip, 0)))
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("addr");
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let targets = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let (t, r, stop) = (Arc::clone(&targets), Arc::clone(&refused), cancel.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    () = stop.cancelled() => return,
                    conn = listener.accept() => conn,
                };
                let Ok((conn, _)) = conn else { continue };
                let (t, r, expected) = (Arc::clone(&t), Arc::clone(&r), expected.clone());
                tokio::spawn(async move {
                    let _ = tunnel(conn, &expected, &t, &r).await;
                });
            }
        });
        Self {
            addr,
            targets,
            refused,
            cancel,
        }
    }

    /// `http://user:password@ip:port`.
    pub fn url(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    /// The `host:port` of every CONNECT it carried out.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("lock").clone()
    }

    /// CONNECTs it answered 407.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn tunnel(
    conn: TcpStream,
    expected: &str,
    targets: &Mutex<Vec<String>>,
    refused: &AtomicUsize,
) -> std::io::Result<()> {
    let mut conn = BufReader::new(conn);
    let mut request_line = String::new();
    conn.read_line(&mut request_line).await?;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == expected {
                authorized = true;
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        conn.get_mut()
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    if !authorized {
        refused.fetch_add(1, Ordering::SeqCst);
        conn.get_mut()
            .write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  proxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n",
            )
            .await?;
        return Ok(());
    }
    let mut upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => {
            conn.get_mut()
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        }
    };
    targets.lock().expect("lock").push(target.to_owned());
    conn.get_mut()
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let mut conn = conn.into_inner();
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    Ok(())
}

/// A test CA and certificates it signs, made with rcgen.
pub struct Pki {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

/// A certificate (PEM) and its private key (PEM, PKCS#8).
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn ca_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A server certificate for 127.0.0.1.
    pub fn server(&self) -> Issued {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for `name` that expires at `not_after`.
    pub fn client(&self, name: &str, not_after: time::OffsetDateTime) -> Issued {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_after = not_after;
        self.issue(params)
    }

    fn issue(&self, params: rcgen::CertificateParams) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }
}

/// An HTTPS receiver on 127.0.0.1 that only completes a handshake with a client certificate
/// signed by `client_ca`, and answers 200 to every request.
#[derive(Debug)]
pub struct TlsReceiver {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    handshakes_refused: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl TlsReceiver {
    pub async fn start(server: &Issued, client_ca: &Pki) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(client_ca.ca_der()))
            .expect("client CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone())),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let handshakes_refused = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let (r, h, stop) = (
            Arc::clone(&requests),
            Arc::clone(&handshakes_refused),
            cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    () = stop.cancelled() => return,
                    conn = listener.accept() => conn,
                };
                let Ok((tcp, _)) = conn else { continue };
                let (acceptor, r, h) = (acceptor.clone(), Arc::clone(&r), Arc::clone(&h));
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            h.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |_req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        async {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            handshakes_refused,
            cancel,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/hook", self.addr.port())
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Handshakes it refused (no client certificate, or one its CA did not sign).
    pub fn handshakes_refused(&self) -> usize {
        self.handshakes_refused.load(Ordering::SeqCst)
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Default)]
struct TokenState {
    requests: usize,
    issued: Vec<String>,
    revoked: Vec<String>,
}

/// An OAuth2 token endpoint (client credentials, client authenticated with HTTP Basic) that
/// issues tokens living `expires_in` seconds, counts its requests, and can revoke what it issued.
#[derive(Clone)]
pub struct TokenEndpoint {
    pub addr: SocketAddr,
    state: Arc<Mutex<TokenState>>,
    failing: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct TokenApp {
    state: Arc<Mutex<TokenState>>,
    failing: Arc<AtomicBool>,
    basic: String,
    expires_in: u64,
}

impl TokenEndpoint {
    pub async fn start(client_id: &str, client_secret: &str, expires_in: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(TokenState::default()));
        let failing = Arc::new(AtomicBool::new(false));
        let app = Arc::new(TokenApp {
            state: Arc::clone(&state),
            failing: Arc::clone(&failing),
            basic: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{client_id}:{client_secret}"))
            ),
            expires_in,
        });
        let router = Router::new().fallback(issue).with_state(app);
        let cancel = CancellationToken::new();
        serve_until(listener, router, &cancel);
        Self {
            addr,
            state,
            failing,
            cancel,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/oauth/token", self.addr.port())
    }

    pub fn requests(&self) -> usize {
        self.state.lock().expect("lock").requests
    }

    pub fn issued(&self) -> Vec<String> {
        self.state.lock().expect("lock").issued.clone()
    }

    /// Whether `authorization` carries a token issued here and not revoked.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return false;
        };
        let state = self.state.lock().expect("lock");
        state.issued.iter().any(|t| t == token) && !state.revoked.iter().any(|t| t == token)
    }

    /// Revokes every token issued so far (a receiver then answers 401 to them).
    pub fn revoke_all(&self) {
        let mut state = self.state.lock().expect("lock");
        state.revoked = state.issued.clone();
    }

    /// From now on answers 500 to every request.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        if Arc::strong_count(&self.state) == 2 {
            self.cancel.cancel();
        }
    }
}

async fn issue(
    State(app): State<Arc<TokenApp>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let mut state = app.state.lock().expect("lock");
    state.requests += 1;
    if app.failing.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let grant = form
        .iter()
        .any(|(k, v)| k == "grant_type" && v == "client_credentials");
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == app.basic);
    if !grant || !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let token = format!("tok-{}-{}", state.requests, uuid_like());
    state.issued.push(token.clone());
    axum::Json(json!({"access_token": token, "token_type": "Bearer",
                      "expires_in": app.expires_in}))
    .into_response()
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(7);
    format!("{:016x}", h.finish())
}
