//! Who may send events for a store: Ecwid's webhook signature and the rules around it. Pure.
//!
//! `X-Ecwid-Webhook-Signature` = base64(HMAC-SHA256(key = the app's client secret, message =
//! `"{eventCreated}.{eventId}"`)). It does not cover the body.
//!
//! The rules, for the instances of the event's store:
//! - a v3 webhook must carry a signature matching one of their client secrets when any of them
//!   holds one (`ecwid.client.secret`); otherwise it is accepted unverified;
//! - an Instant Order Notification carries no signature: it is accepted (unverified) only when
//!   some instance takes unverified events, i.e. has no client secret or opts in with
//!   `ecwid.ion.unsigned.allowed`;
//! - in app mode, a v3 webhook of a store the app provisioned must carry a signature matching
//!   the app's client secret (Ecwid signs every app webhook with it), unless the store's
//!   instances hold a client secret of their own, which takes precedence;
//! - with `INGEST_REQUIRE_SIGNATURE=true`, nothing unverified is accepted.

use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use model::instance::{keys, Instance, ProvisionedBy};
use sha2::Sha256;

use shared::http::ApiError;

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

/// What the rules are applied to.
#[derive(Debug, Clone, Copy)]
pub enum Claim<'a> {
    /// A v3 webhook: its `eventCreated`, `eventId` and the signature header, if sent.
    V3 {
        event_created: i64,
        event_id: &'a str,
        signature: Option<&'a str>,
    },
    /// An Instant Order Notification.
    Ion,
}

/// Applies the rules to an event of a store with `instances` (at least one). `Ok(verified)`, or
/// 401 saying what is missing.
pub fn check(
    instances: &[Arc<Instance>],
    claim: Claim<'_>,
    require_signature: bool,
) -> Result<bool, ApiError> {
    check_with_app(instances, claim, None, require_signature)
}

/// [`check`] in app mode: `app_secret` is the app's client secret, which verifies a v3 webhook
/// of a store with an instance the app provisioned when none of its instances holds a client
/// secret of its own.
pub fn check_with_app(
    instances: &[Arc<Instance>],
    claim: Claim<'_>,
    app_secret: Option<&str>,
    require_signature: bool,
) -> Result<bool, ApiError> {
    let verified = match claim {
        Claim::V3 {
            event_created,
            event_id,
            signature,
        } => {
            let mut secrets: Vec<&str> =
                instances.iter().filter_map(|i| i.client_secret()).collect();
            if secrets.is_empty()
                && instances
                    .iter()
                    .any(|i| i.provisioned_by == ProvisionedBy::App)
            {
                secrets.extend(app_secret);
            }
            if secrets.is_empty() {
                false
            } else {
                let signature = signature.ok_or_else(|| {
                    ApiError::Unauthorized("X-Ecwid-Webhook-Signature is missing".into())
                })?;
                if !verify(secrets, &event_created.to_string(), event_id, signature) {
                    return Err(ApiError::Unauthorized(
                        "X-Ecwid-Webhook-Signature does not match the store's client secret".into(),
                    ));
                }
                true
            }
        }
        Claim::Ion => {
            if !instances.iter().any(|i| i.accepts_unverified()) {
                return Err(ApiError::Unauthorized(format!(
                    "Instant Order Notifications carry no signature and this store's instances \
                     hold an ecwid.client.secret; set {} to \"true\" on an instance to take them",
                    keys::ION_UNSIGNED_ALLOWED
                )));
            }
            false
        }
    };
    if !verified && require_signature {
        return Err(ApiError::Unauthorized(format!(
            "unsigned events are refused (INGEST_REQUIRE_SIGNATURE=true){}",
            match claim {
                Claim::V3 { .. } => "; give the store's instance an ecwid.client.secret",
                Claim::Ion => "; Instant Order Notifications carry no signature",
            }
        )));
    }
    Ok(verified)
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

    fn instance(config: &[(&str, &str)]) -> Arc<Instance> {
        let mut i: Instance = serde_json::from_str(r#"{"configuration":{"ecwid.store.id":"1"}}"#)
            .expect("instance JSON");
        for (k, v) in config {
            i.configuration.insert((*k).into(), (*v).into());
        }
        Arc::new(i)
    }

    fn v3(signature: Option<&str>) -> Claim<'_> {
        Claim::V3 {
            event_created: 1234567,
            event_id: ID,
            signature,
        }
    }

    #[test]
    fn the_rules() {
        let plain = instance(&[]);
        let secret = instance(&[(keys::CLIENT_SECRET, SECRET)]);
        let opted_in = instance(&[
            (keys::CLIENT_SECRET, SECRET),
            (keys::ION_UNSIGNED_ALLOWED, "true"),
        ]);
        let unauthorized = |r: Result<bool, ApiError>| matches!(r, Err(ApiError::Unauthorized(_)));
        // No secret: accepted unverified, unless signatures are required.
        assert_eq!(
            check(std::slice::from_ref(&plain), v3(None), false).ok(),
            Some(false)
        );
        assert!(unauthorized(check(
            std::slice::from_ref(&plain),
            v3(None),
            true
        )));
        // A secret: the signature must match.
        assert_eq!(
            check(std::slice::from_ref(&secret), v3(Some(SIGNATURE)), true).ok(),
            Some(true)
        );
        assert!(unauthorized(check(
            std::slice::from_ref(&secret),
            v3(None),
            false
        )));
        assert!(unauthorized(check(
            std::slice::from_ref(&secret),
            v3(Some("eA==")),
            false
        )));
        // ION: refused for a store whose instances all hold a secret, unless one opts in.
        assert!(unauthorized(check(
            std::slice::from_ref(&secret),
            Claim::Ion,
            false
        )));
        assert_eq!(
            check(std::slice::from_ref(&plain), Claim::Ion, false).ok(),
            Some(false)
        );
        assert_eq!(
            check(&[secret.clone(), opted_in.clone()], Claim::Ion, false).ok(),
            Some(false)
        );
        assert!(unauthorized(check(&[opted_in], Claim::Ion, true)));
    }

    #[test]
    fn in_app_mode_app_stores_are_verified_with_the_app_secret() {
        let mut app = (*instance(&[])).clone();
        app.provisioned_by = ProvisionedBy::App;
        let app = Arc::new(app);
        let unauthorized = |r: Result<bool, ApiError>| matches!(r, Err(ApiError::Unauthorized(_)));
        fn with(
            instances: &[Arc<Instance>],
            secret: Option<&str>,
            signature: Option<&str>,
        ) -> Result<bool, ApiError> {
            check_with_app(instances, v3(signature), secret, false)
        }
        assert_eq!(
            with(std::slice::from_ref(&app), Some(SECRET), Some(SIGNATURE)).ok(),
            Some(true)
        );
        assert!(unauthorized(with(
            std::slice::from_ref(&app),
            Some("other"),
            Some(SIGNATURE)
        )));
        assert!(unauthorized(with(
            std::slice::from_ref(&app),
            Some(SECRET),
            None
        )));
        // Not in app mode, or a store an operator set up: as before.
        assert_eq!(
            with(std::slice::from_ref(&app), None, None).ok(),
            Some(false)
        );
        assert_eq!(with(&[instance(&[])], Some(SECRET), None).ok(), Some(false));
        // The store's own secret takes precedence.
        let own = instance(&[(keys::CLIENT_SECRET, "own")]);
        assert!(unauthorized(with(
            &[app, own],
            Some(SECRET),
            Some(SIGNATURE)
        )));
    }
}
