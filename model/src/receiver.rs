//! How an instance's receiver is reached beyond a plain signed POST: its own headers
//! (`event.notification.headers`), an outbound proxy (`event.notification.proxy.url`), a client
//! certificate and a CA to trust (`event.notification.tls.*`), and OAuth2 client credentials
//! (`event.notification.oauth2.*`). The rules that check them and read them, with no I/O: the
//! deliverer does the connecting.

use base64::Engine as _;

use crate::redact::REDACTED;

/// At most this many custom headers.
pub const MAX_HEADERS: usize = 32;
/// At most this many bytes of custom header names and values together.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Headers an instance may not set: hop-by-hop and framing headers (HTTP itself, or the proxy,
/// owns them), and our own id, signature and content headers (the receiver checks them).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-type",
    "content-encoding",
    "elements-webhook-id",
    "elements-webhook-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// Parses `event.notification.headers` (a JSON object of name → value, written as a string) and
/// checks every rule; the error names the header and says what is wrong with it.
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|_| {
            "must be a JSON object of header name to value, such as {\"X-Api-Key\":\"…\"}"
                .to_owned()
        })?;
    if map.len() > MAX_HEADERS {
        return Err(format!("at most {MAX_HEADERS} headers"));
    }
    let mut headers = Vec::with_capacity(map.len());
    let mut total = 0;
    for (name, value) in map {
        let serde_json::Value::String(value) = value else {
            return Err(format!("header {name:?}: the value must be a string"));
        };
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!(
                "header {name:?}: a name is letters, digits and !#$%&'*+-.^_`|~ only"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            return Err(format!(
                "header {name:?} may not be set: HTTP, the proxy or the pipeline sets it"
            ));
        }
        if headers
            .iter()
            .any(|(n, _): &(String, String)| n.eq_ignore_ascii_case(&name))
        {
            return Err(format!("header {name:?} is named twice"));
        }
        // Visible ASCII, spaces and tabs: CR and LF would split the request.
        if !value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            return Err(format!(
                "header {name:?}: the value must be visible ASCII characters (no CR, LF or other control characters)"
            ));
        }
        total += name.len() + value.len();
        headers.push((name, value.trim().to_owned()));
    }
    if total > MAX_HEADER_BYTES {
        return Err(format!(
            "at most {MAX_HEADER_BYTES} bytes of header names and values together"
        ));
    }
    Ok(headers)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `event.notification.headers` as shown: the names, each value [`REDACTED`] (an API key is the
/// usual value). Text that is not such an object is shown as [`REDACTED`] whole.
pub fn redact_headers(text: &str) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
        Ok(map) => {
            let shown: serde_json::Map<String, serde_json::Value> = map
                .into_iter()
                .map(|(name, _)| (name, REDACTED.into()))
                .collect();
            serde_json::Value::Object(shown).to_string()
        }
        Err(_) => REDACTED.to_owned(),
    }
}

/// The headers a PATCH sends, with each value sent back as [`REDACTED`] replaced by the stored
/// value of the same header: headers can be added, changed or removed without typing the
/// others' secrets again.
pub fn merge_headers(stored: &str, sent: &str) -> String {
    let (Ok(stored), Ok(sent)) = (
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(stored),
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(sent),
    ) else {
        return sent.to_owned();
    };
    let merged: serde_json::Map<String, serde_json::Value> = sent
        .into_iter()
        .map(|(name, value)| match (&value, stored.get(&name)) {
            (serde_json::Value::String(v), Some(old)) if v == REDACTED => (name, old.clone()),
            _ => (name, value),
        })
        .collect();
    serde_json::Value::Object(merged).to_string()
}

/// Checks a proxy URL: `http://` or `https://`, a host, optional `user:password@`, nothing else.
pub fn check_proxy_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// proxy URL (HTTP CONNECT)".to_owned());
    }
    if url.host().is_none() {
        return Err("must name the proxy's host".to_owned());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("must be scheme://[user:password@]host[:port] only".to_owned());
    }
    Ok(url)
}

/// One PEM block: its label (`CERTIFICATE`, `PRIVATE KEY` …) and its DER bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemBlock {
    pub label: String,
    pub der: Vec<u8>,
}

/// Every PEM block of `text`, or what is wrong with it.
pub fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut b64 = String::new();
        loop {
            match lines.next() {
                None => return Err(format!("the PEM block {label} has no END line")),
                Some(l) if l == end => break,
                Some(l) => b64.push_str(l),
            }
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|_| format!("the PEM block {label} is not valid base64"))?;
        blocks.push(PemBlock {
            label: label.to_owned(),
            der,
        });
    }
    if blocks.is_empty() {
        return Err("holds no PEM block (-----BEGIN …-----)".to_owned());
    }
    Ok(blocks)
}

/// The certificates of a PEM text, each checked to be one (with its expiry, Unix seconds).
pub fn pem_certificates(text: &str) -> Result<Vec<(Vec<u8>, i64)>, String> {
    let certs: Vec<Vec<u8>> = pem_blocks(text)?
        .into_iter()
        .filter(|b| b.label == "CERTIFICATE")
        .map(|b| b.der)
        .collect();
    if certs.is_empty() {
        return Err("holds no CERTIFICATE PEM block".to_owned());
    }
    certs
        .into_iter()
        .map(|der| {
            let expiry = not_after(&der)
                .ok_or("holds a CERTIFICATE block that is not an X.509 certificate")?;
            Ok((der, expiry))
        })
        .collect::<Result<_, &str>>()
        .map_err(str::to_owned)
}

/// The private key of a PEM text (PKCS#8, PKCS#1 RSA or SEC1 EC): its label and DER bytes.
pub fn pem_private_key(text: &str) -> Result<PemBlock, String> {
    let mut keys = pem_blocks(text)?.into_iter().filter(|b| {
        matches!(
            b.label.as_str(),
            "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY"
        )
    });
    match (keys.next(), keys.next()) {
        (Some(key), None) => Ok(key),
        (None, _) => Err(
            "holds no unencrypted private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
                .to_owned(),
        ),
        (Some(_), Some(_)) => Err("holds more than one private key".to_owned()),
    }
}

/// When the certificate `der` expires (its `notAfter`), in Unix seconds.
///
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
/// signature, issuer, validity SEQUENCE { notBefore, notAfter }, … }, … }: the walk reads no more
/// than that path.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (tag, cert, _) = der_item(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = der_item(cert)?;
    if tag != 0x30 {
        return None;
    }
    // [0] EXPLICIT version, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = der_item(tbs)?.2;
    }
    for _ in 0..3 {
        // serialNumber, signature, issuer
        tbs = der_item(tbs)?.2;
    }
    let (tag, validity, _) = der_item(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = der_item(validity)?;
    let (tag, time, _) = der_item(rest)?;
    let time = std::str::from_utf8(time).ok()?;
    match tag {
        // UTCTime: YYMMDDHHMMSSZ, years 1950..=2049.
        0x17 => {
            let yy: i32 = time.get(0..2)?.parse().ok()?;
            let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
            unix_seconds(year, time.get(2..)?)
        }
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        0x18 => unix_seconds(time.get(0..4)?.parse().ok()?, time.get(4..)?),
        _ => None,
    }
}

/// `MMDDHHMMSSZ` of `year` as Unix seconds.
fn unix_seconds(year: i32, rest: &str) -> Option<i64> {
    if rest.len() != 11 || !rest.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| rest.get(r)?.parse::<u8>().ok();
    let month = time::Month::try_from(n(0..2)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, n(2..4)?).ok()?;
    let at = date.with_hms(n(4..6)?, n(6..8)?, n(8..10)?).ok()?;
    Some(at.assume_utc().unix_timestamp())
}

/// One DER item of `input`: its tag, its contents, and what follows it.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// How long before its client certificate expires an instance counts as expiring (the
/// `ecwid_deliver_client_certificates_expiring` gauge, and its alert).
pub const CERTIFICATE_WARNING_SECS: i64 = 14 * 86_400;

/// When a cached OAuth2 access token that `expires_in` seconds after it was issued stops being
/// used: a minute early, or a tenth of its life early when it lives less than ten minutes, so
/// that no request goes out with a token about to expire on the way.
pub fn token_lifetime(expires_in: Option<u64>) -> std::time::Duration {
    // A token endpoint that does not say: one hour, refreshed earlier on a 401.
    let secs = expires_in.unwrap_or(3600);
    let margin = if secs >= 600 { 60 } else { secs / 10 };
    std::time::Duration::from_secs(secs - margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_naming_the_header() {
        let ok = parse_headers(r#"{"X-Api-Key":"k1","Authorization":"Basic dTpw"}"#).unwrap();
        assert_eq!(ok.len(), 2);
        for (text, names) in [
            (r#"{"Host":"evil.example"}"#, "\"Host\""),
            (r#"{"content-length":"5"}"#, "\"content-length\""),
            (
                r#"{"Transfer-Encoding":"chunked"}"#,
                "\"Transfer-Encoding\"",
            ),
            (r#"{"Connection":"close"}"#, "\"Connection\""),
            (
                r#"{"Elements-Webhook-Signature":"x"}"#,
                "\"Elements-Webhook-Signature\"",
            ),
            (r#"{"webhook-id":"x"}"#, "\"webhook-id\""),
            (r#"{"X-Evil":"a\r\nHost: b"}"#, "\"X-Evil\""),
            (r#"{"X-Bell":"\u0007"}"#, "\"X-Bell\""),
            (r#"{"X-Umlaut":"ü"}"#, "\"X-Umlaut\""),
            (r#"{"Bad Name":"v"}"#, "\"Bad Name\""),
            (r#"{"X-Num":5}"#, "\"X-Num\""),
        ] {
            let err = parse_headers(text).unwrap_err();
            assert!(err.contains(names), "{text}: {err}");
        }
        assert!(parse_headers("[1]").unwrap_err().contains("JSON object"));
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_HEADERS)
            .map(|i| (format!("X-H{i}"), "v".into()))
            .collect();
        let err = parse_headers(&serde_json::Value::Object(many).to_string()).unwrap_err();
        assert!(err.contains("at most 32"), "{err}");
        let big = format!(
            r#"{{"X-A":"{}","X-B":"{}"}}"#,
            "a".repeat(4000),
            "b".repeat(4200)
        );
        assert!(parse_headers(&big).unwrap_err().contains("8192 bytes"));
    }

    #[test]
    fn header_values_are_redacted_and_kept_on_patch() {
        let stored = r#"{"X-Api-Key":"k-123","X-Tenant":"t-9"}"#;
        let shown = redact_headers(stored);
        assert_eq!(shown, r#"{"X-Api-Key":"********","X-Tenant":"********"}"#);
        assert_eq!(redact_headers("not json k-123"), REDACTED);
        // Sent back as shown, with one added and one changed.
        let sent = r#"{"X-Api-Key":"********","X-Tenant":"t-10","X-New":"n"}"#;
        let merged: serde_json::Value = serde_json::from_str(&merge_headers(stored, sent)).unwrap();
        assert_eq!(
            merged,
            serde_json::json!({"X-Api-Key":"k-123","X-Tenant":"t-10","X-New":"n"})
        );
    }

    #[test]
    fn proxy_urls_are_checked() {
        assert!(check_proxy_url("http://user:pw@proxy.example:3128").is_ok());
        assert!(check_proxy_url("https://proxy.example").is_ok());
        for bad in [
            "socks5://p.example",
            "http://p.example/path",
            "p.example:3128",
            "http://",
        ] {
            assert!(check_proxy_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn certificate_expiry_is_read_from_the_der() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client.example".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        let cert = params.self_signed(&key).unwrap();
        let certs = pem_certificates(&cert.pem()).unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].1, 1_941_321_600, "2031-07-09T00:00:00Z");
        // GeneralizedTime after 2049.
        params.not_after = rcgen::date_time_ymd(2060, 1, 1);
        let later = params.self_signed(&key).unwrap();
        assert_eq!(not_after(later.der()), Some(2_840_140_800));
        let pem_key = pem_private_key(&key.serialize_pem()).unwrap();
        assert_eq!(pem_key.label, "PRIVATE KEY");
        assert!(pem_certificates(&key.serialize_pem()).is_err());
        assert!(pem_private_key(&cert.pem()).is_err());
        assert!(pem_blocks("just text").is_err());
        assert!(pem_blocks("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----").is_err());
        assert_eq!(not_after(b"\x30\x03\x02\x01\x01"), None);
    }

    #[test]
    fn tokens_are_used_until_shortly_before_they_expire() {
        use std::time::Duration;
        assert_eq!(token_lifetime(Some(3600)), Duration::from_secs(3540));
        assert_eq!(token_lifetime(Some(60)), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(0)), Duration::ZERO);
        assert_eq!(token_lifetime(None), Duration::from_secs(3540));
    }
}
