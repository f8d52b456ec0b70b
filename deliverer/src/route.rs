//! The way to a receiver that needs more than the plain client: through an HTTP CONNECT proxy
//! (`DELIVER_PROXY_URL`, or the instance's `event.notification.proxy.url`), presenting a client
//! certificate, or trusting the instance's own CA (`event.notification.tls.*`). rustls throughout.
//!
//! The SSRF guard judges the *target*: its name is resolved here, before the CONNECT, and the
//! proxy is asked for the address the guard allowed (`CONNECT 203.0.113.7:443`), never for the
//! name, so the proxy cannot resolve it somewhere else. The proxy's own address passes the guard
//! only when it is public or in `DELIVER_PROXY_ALLOW_NETWORKS`, which lets no target through.
//! A proxy that refuses (407, another status, no answer) fails the attempt as `proxy_error`,
//! saying so, so that the health page and the attempt log blame the proxy and not the receiver.
//!
//! One pooled client per route (proxy, certificate, key, CA), kept while routes are few.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use model::netguard::{self, AllowList};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::guard::{guarded_lookup, BoxError};

/// The longest answer a proxy may give to a CONNECT before the tunnel.
const MAX_CONNECT_ANSWER: usize = 16 * 1024;
/// Routes kept at most; emptied past that (instances rarely change their receiver settings).
const MAX_ROUTES: usize = 1024;

/// What a request's way is made of; borrowed from the instance and the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteSpec<'a> {
    pub proxy: Option<&'a str>,
    pub identity: Option<(&'a str, &'a str)>,
    pub ca: Option<&'a str>,
}

impl RouteSpec<'_> {
    fn key(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [
            self.proxy,
            self.identity.map(|(c, _)| c),
            self.identity.map(|(_, k)| k),
            self.ca,
        ] {
            match part {
                Some(p) => {
                    h.update([1]);
                    h.update((p.len() as u64).to_be_bytes());
                    h.update(p.as_bytes());
                }
                None => h.update([0]),
            }
        }
        h.finalize().into()
    }
}

/// A failure of the proxy rather than of the receiver.
#[derive(Debug, thiserror::Error)]
#[error("proxy: {0}")]
pub(crate) struct ProxyFailure(pub(crate) String);

pub(crate) type RouteClient = Client<Connector, Full<Bytes>>;

/// The clients of the routes in use.
#[derive(Debug)]
pub(crate) struct Routes {
    clients: Mutex<HashMap<[u8; 32], Result<RouteClient, String>>>,
    allow: AllowList,
    proxy_allow: AllowList,
    connect_timeout: Duration,
}

impl Routes {
    pub(crate) fn new(allow: AllowList, proxy_allow: AllowList, connect_timeout: Duration) -> Self {
        Self {
            clients: Mutex::default(),
            allow,
            proxy_allow,
            connect_timeout,
        }
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The client for `spec`, or why its settings cannot make one.
    pub(crate) fn client(&self, spec: &RouteSpec<'_>) -> Result<RouteClient, String> {
        let key = spec.key();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return client.clone();
        }
        let built = self.build(spec);
        if clients.len() >= MAX_ROUTES {
            clients.clear();
        }
        clients.insert(key, built.clone());
        built
    }

    fn build(&self, spec: &RouteSpec<'_>) -> Result<RouteClient, String> {
        let proxy = spec.proxy.map(Proxy::parse).transpose()?;
        let tls = Arc::new(tls_config(spec.identity, spec.ca)?);
        let proxy_tls = Arc::new(tls_config(None, None)?);
        let connector = Connector(Arc::new(Inner {
            proxy,
            tls,
            proxy_tls,
            allow: self.allow.clone(),
            proxy_allow: self.proxy_allow.clone(),
            connect_timeout: self.connect_timeout,
        }));
        Ok(Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build(connector))
    }
}

/// rustls settings for a receiver: its CA (or the public roots), and the client certificate.
pub(crate) fn tls_config(
    identity: Option<(&str, &str)>,
    ca: Option<&str>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for (der, _) in model::receiver::pem_certificates(pem)
                .map_err(|e| format!("event.notification.tls.ca {e}"))?
            {
                roots
                    .add(CertificateDer::from(der))
                    .map_err(|e| format!("event.notification.tls.ca: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = builder.with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = model::receiver::pem_certificates(cert)
                .map_err(|e| format!("event.notification.tls.client.certificate {e}"))?
                .into_iter()
                .map(|(der, _)| CertificateDer::from(der))
                .collect();
            let key = model::receiver::pem_private_key(key)
                .map_err(|e| format!("event.notification.tls.client.key {e}"))?;
            let key = match key.label.as_str() {
                "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(key.der.into()),
                "EC PRIVATE KEY" => PrivateKeyDer::Sec1(key.der.into()),
                _ => PrivateKeyDer::Pkcs8(key.der.into()),
            };
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key: {e}"))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Clone)]
struct Proxy {
    host: String,
    port: u16,
    https: bool,
    /// `Basic …` from the URL's user info.
    authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    fn parse(text: &str) -> Result<Self, String> {
        // The text may hold credentials: the message never quotes it.
        let url = model::receiver::check_proxy_url(text).map_err(|e| format!("proxy URL {e}"))?;
        let https = url.scheme() == "https";
        let host = match url.host() {
            Some(url::Host::Ipv6(v6)) => v6.to_string(),
            Some(h) => h.to_string(),
            None => return Err("proxy URL must name the proxy's host".to_owned()),
        };
        let authorization = (!url.username().is_empty()).then(|| {
            let pair = format!(
                "{}:{}",
                percent_decode(url.username()),
                percent_decode(url.password().unwrap_or(""))
            );
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(Self {
            host,
            port: url
                .port_or_known_default()
                .unwrap_or(if https { 443 } else { 80 }),
            https,
            authorization,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A byte stream the tunnel may be made of: TCP, TLS to the proxy, TLS to the receiver.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The connection hyper gets.
pub(crate) struct Tunnel(TokioIo<Box<dyn Io>>);

impl Connection for Tunnel {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[derive(Debug)]
struct Inner {
    proxy: Option<Proxy>,
    tls: Arc<rustls::ClientConfig>,
    proxy_tls: Arc<rustls::ClientConfig>,
    allow: AllowList,
    proxy_allow: AllowList,
    connect_timeout: Duration,
}

/// Opens connections for a route's client (hyper-util's connector).
#[derive(Debug, Clone)]
pub(crate) struct Connector(Arc<Inner>);

impl tower::Service<hyper::Uri> for Connector {
    type Response = Tunnel;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Tunnel, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.connect(uri).await })
    }
}

impl Inner {
    async fn connect(&self, uri: hyper::Uri) -> Result<Tunnel, BoxError> {
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .ok_or("the URL names no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        // The guard judges the target, whether or not a proxy carries the request.
        let targets = guarded_lookup(&host, port, &self.allow).await?;
        let stream: Box<dyn Io> = match &self.proxy {
            Some(proxy) => self.tunnel(proxy, targets[0]).await?,
            None => Box::new(self.tcp(&targets).await?),
        };
        let stream: Box<dyn Io> = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| format!("{host} is not a name TLS can check"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls));
            Box::new(tls.connect(name, stream).await?)
        } else {
            stream
        };
        Ok(Tunnel(TokioIo::new(stream)))
    }

    async fn tcp(&self, addrs: &[SocketAddr]) -> std::io::Result<tokio::net::TcpStream> {
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address to connect to")))
    }

    /// A tunnel through `proxy` to `target`, an address the guard allowed.
    async fn tunnel(&self, proxy: &Proxy, target: SocketAddr) -> Result<Box<dyn Io>, BoxError> {
        let fail = |why: String| -> BoxError { Box::new(ProxyFailure(why)) };
        let addrs = match tokio::net::lookup_host((proxy.host.as_str(), proxy.port)).await {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => return Err(fail(format!("{} did not resolve: {e}", proxy.host))),
        };
        let mut allowed = Vec::new();
        let mut refusal = None;
        for addr in addrs {
            let ip = addr.ip();
            if self.proxy_allow.contains(ip) || netguard::forbidden_reason(ip).is_none() {
                allowed.push(addr);
            } else if let Err(why) = netguard::check(ip, &self.proxy_allow) {
                refusal = Some(why.replace(
                    "callbacks to it are refused unless DELIVER_ALLOW_NETWORKS allows it",
                    "a proxy there needs DELIVER_PROXY_ALLOW_NETWORKS",
                ));
            }
        }
        if allowed.is_empty() {
            return Err(fail(format!(
                "{}: {}",
                proxy.host,
                refusal.unwrap_or_else(|| "did not resolve".to_owned())
            )));
        }
        let tcp = self
            .tcp(&allowed)
            .await
            .map_err(|e| fail(format!("could not connect to {}: {e}", proxy.host)))?;
        let stream: Box<dyn Io> = if proxy.https {
            let name = ServerName::try_from(proxy.host.clone())
                .map_err(|_| fail(format!("{} is not a name TLS can check", proxy.host)))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.proxy_tls));
            Box::new(
                tls.connect(name, tcp)
                    .await
                    .map_err(|e| fail(format!("TLS with {}: {e}", proxy.host)))?,
            )
        } else {
            Box::new(tcp)
        };
        let handshake = connect_through(stream, proxy, target);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(result) => result.map_err(fail),
            Err(_) => Err(fail(format!(
                "{} did not answer the CONNECT in time",
                proxy.host
            ))),
        }
    }
}

/// Asks the proxy on `stream` for a tunnel to `target`; the stream, once it answered 200.
async fn connect_through(
    stream: Box<dyn Io>,
    proxy: &Proxy,
    target: SocketAddr,
) -> Result<Box<dyn Io>, String> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(auth);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    // A buffered reader keeps any byte read past the answer's head for the tunnel.
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("could not send the CONNECT: {e}"))?;
    let mut status_line = String::new();
    let mut read = 0;
    loop {
        let mut line = String::new();
        let n = stream
            .read_line(&mut line)
            .await
            .map_err(|e| format!("no answer to the CONNECT: {e}"))?;
        read += n;
        if n == 0 {
            return Err("closed the connection without answering the CONNECT".to_owned());
        }
        if read > MAX_CONNECT_ANSWER {
            return Err("answered the CONNECT with an endless head".to_owned());
        }
        if status_line.is_empty() {
            status_line = line.trim().to_owned();
        } else if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(Box::new(stream)),
        Some(407) => Err(format!(
            "the proxy answered 407 Proxy Authentication Required: its credentials are {}",
            if proxy.authorization.is_some() {
                "wrong"
            } else {
                "missing"
            }
        )),
        Some(code) => Err(format!("the proxy refused the CONNECT with {code}")),
        None => Err("the proxy's answer to the CONNECT is not HTTP".to_owned()),
    }
}

/// How often the expiring client certificates are counted again, besides on every change of
/// the instances.
const CERTIFICATE_RECOUNT: Duration = Duration::from_secs(600);

/// Keeps `expiring` at the number of instances whose client certificate expires within
/// [`model::receiver::CERTIFICATE_WARNING_SECS`] (or has expired), until `cancel`.
pub(crate) fn spawn_certificate_watch(
    directory: shared::directory::Directory,
    expiring: prometheus::IntGauge,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut changes = directory.changes();
    tokio::spawn(async move {
        loop {
            let soon =
                model::time_fmt::now_unix_ms() / 1000 + model::receiver::CERTIFICATE_WARNING_SECS;
            let count = directory
                .all()
                .iter()
                .filter_map(|i| i.client_certificate_expires_at())
                .filter(|at| *at <= soon)
                .count();
            expiring.set(i64::try_from(count).unwrap_or(i64::MAX));
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(CERTIFICATE_RECOUNT) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_settings_take_a_matching_certificate_and_key_and_refuse_the_rest() {
        let (cert, key) = identity();
        assert!(tls_config(Some((&cert, &key)), Some(&cert)).is_ok());
        assert!(tls_config(None, None).is_ok());
        let (_, other_key) = identity();
        let err = tls_config(Some((&cert, &other_key)), None).unwrap_err();
        assert!(err.contains("client certificate and key"), "{err}");
        assert!(
            !err.contains("PRIVATE KEY"),
            "the key is never quoted: {err}"
        );
        assert!(tls_config(None, Some("not pem")).is_err());
    }

    #[test]
    fn proxy_credentials_become_basic_auth_and_stay_out_of_debug() {
        let p = Proxy::parse("http://us%40er:p%3Ass@proxy.example:3128").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.https),
            ("proxy.example", 3128, false)
        );
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(p.authorization, Some(format!("Basic {expected}")));
        assert!(!format!("{p:?}").contains("p:ss"));
        let p = Proxy::parse("https://[::1]").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.https), ("::1", 443, true));
        assert_eq!(p.authorization, None);
        let err = Proxy::parse("socks5://user:secret@p.example").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn routes_are_built_once_per_settings() {
        let routes = Routes::new(
            AllowList::default(),
            AllowList::default(),
            Duration::from_secs(1),
        );
        let spec = RouteSpec {
            proxy: Some("http://proxy.example:3128"),
            ..Default::default()
        };
        assert!(routes.client(&spec).is_ok());
        assert!(routes.client(&spec).is_ok());
        assert_eq!(routes.clients.lock().unwrap().len(), 1);
        let (cert, _) = identity();
        let (_, key) = identity();
        let bad = RouteSpec {
            identity: Some((&cert, &key)),
            ..Default::default()
        };
        assert!(routes.client(&bad).is_err());
        assert_eq!(routes.clients.lock().unwrap().len(), 2);
    }
}
