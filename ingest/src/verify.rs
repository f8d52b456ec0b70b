//! Ecwid's webhook signature: `X-Ecwid-Webhook-Signature` =
//! base64(HMAC-SHA256(key = the app's client secret, message = `"{eventCreated}.{eventId}"`)).
//! It does not cover the body.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-ecwid-webhook-signature";

/// The signature Ecwid sends for this event under `secret`.
pub fn sign(secret: &str, event_created: &str, event_id: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(mac(secret, event_created, event_id).finalize().into_bytes())
}

fn mac(secret: &str, event_created: &str, event_id: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(event_created.as_bytes());
    mac.update(b".");
    mac.update(event_id.as_bytes());
    mac
}

/// Whether `signature` matches under any of `secrets`, compared in constant time.
pub fn verify<'a>(
    secrets: impl IntoIterator<Item = &'a str>,
    event_created: &str,
    event_id: &str,
    signature: &str,
) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    secrets.into_iter().any(|secret| {
        mac(secret, event_created, event_id)
            .verify_slice(&given)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of DESIGN.md.
    const SECRET: &str = "abcde123456789";
    const CREATED: &str = "1234567";
    const ID: &str = "80aece08-40e8-4145-8764-6c2f0d38678";
    const SIGNATURE: &str = "lidx/4J5L2Pp4auvwGBp6DwPkpPmyVLI3oLB440X358=";

    #[test]
    fn design_test_vector() {
        assert_eq!(sign(SECRET, CREATED, ID), SIGNATURE);
        assert!(verify([SECRET], CREATED, ID, SIGNATURE));
    }

    #[test]
    fn any_of_several_secrets_passes_and_tampering_fails() {
        assert!(verify(["other", SECRET], CREATED, ID, SIGNATURE));
        assert!(!verify(["other"], CREATED, ID, SIGNATURE));
        assert!(!verify([SECRET], "1234568", ID, SIGNATURE));
        assert!(!verify(
            [SECRET],
            CREATED,
            ID,
            "lidx/4J5L2Pp4auvwGBp6DwPkpPmyVLI3oLB440X359="
        ));
        assert!(!verify([SECRET], CREATED, ID, "not base64!"));
        assert!(!verify([], CREATED, ID, SIGNATURE));
    }
}
