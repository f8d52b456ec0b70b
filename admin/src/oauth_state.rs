//! The OAuth `state` of an install: a nonce and an expiry, signed with a key derived from the
//! app's client secret, so the callback knows the install started here and recently. Pure; the
//! callback remembers each nonce it took (a KV bucket whose entries outlive the state) so that
//! a state is good once, on every replica.
//!
//! `<base64url(nonce "." expiry ms)>.<base64url(HMAC-SHA256(key, that))>`

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a merchant has between `GET /ecwid/install` and the callback.
pub const STATE_TTL_MS: i64 = 10 * 60 * 1000;

/// Why a state is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// Not a state this service signed (changed, or made up).
    Forged,
    /// Signed here, but too long ago.
    Expired,
}

fn mac(secret: &str) -> Hmac<Sha256> {
    // The key is the client secret's, for this one purpose: the state never carries a value
    // that the secret itself signs elsewhere (webhook signatures).
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"ecwid-events oauth state\n");
    mac
}

/// A fresh state for `nonce`, valid until `now_ms` + [`STATE_TTL_MS`].
pub fn sign(secret: &str, nonce: &str, now_ms: i64) -> String {
    let body = format!("{nonce}.{}", now_ms + STATE_TTL_MS);
    let mut mac = mac(secret);
    mac.update(body.as_bytes());
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(body.as_bytes()),
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// The nonce of a state this service signed and that has not expired at `now_ms`.
pub fn verify(secret: &str, state: &str, now_ms: i64) -> Result<String, StateError> {
    let (body, signature) = state.split_once('.').ok_or(StateError::Forged)?;
    let body = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| StateError::Forged)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| StateError::Forged)?;
    let mut mac = mac(secret);
    mac.update(&body);
    mac.verify_slice(&signature)
        .map_err(|_| StateError::Forged)?;
    let body = String::from_utf8(body).map_err(|_| StateError::Forged)?;
    let (nonce, expiry) = body.rsplit_once('.').ok_or(StateError::Forged)?;
    let expiry: i64 = expiry.parse().map_err(|_| StateError::Forged)?;
    if now_ms > expiry {
        return Err(StateError::Expired);
    }
    Ok(nonce.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "app-client-secret";

    #[test]
    fn a_state_signed_here_is_good_until_it_expires() {
        let state = sign(SECRET, "n-1", 1_000);
        assert_eq!(verify(SECRET, &state, 1_000), Ok("n-1".to_owned()));
        assert_eq!(
            verify(SECRET, &state, 1_000 + STATE_TTL_MS),
            Ok("n-1".to_owned())
        );
        assert_eq!(
            verify(SECRET, &state, 1_001 + STATE_TTL_MS),
            Err(StateError::Expired)
        );
    }

    #[test]
    fn a_changed_or_foreign_state_is_forged() {
        let state = sign(SECRET, "n-1", 1_000);
        assert_eq!(verify("other", &state, 1_000), Err(StateError::Forged));
        let (body, sig) = state.split_once('.').unwrap();
        let later = URL_SAFE_NO_PAD.encode(format!("n-1.{}", i64::MAX));
        assert_eq!(
            verify(SECRET, &format!("{later}.{sig}"), 1_000),
            Err(StateError::Forged)
        );
        for bad in ["", "x", "x.y", &format!("{body}."), &format!(".{sig}")] {
            assert_eq!(verify(SECRET, bad, 1_000), Err(StateError::Forged), "{bad}");
        }
    }
}
