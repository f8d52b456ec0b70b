//! Payload filters (`event.notification.filter`): a CEL expression over the envelope that decides
//! whether an instance receives an event, such as `raw.data.newPaymentStatus == 'PAID'`.
//!
//! The expression sees `objectType`, `eventType`, `objectId`, `storeId` (strings) and `raw`, the
//! Ecwid payload exactly as received (a map). It must come out `true` for the event to be
//! delivered; `false`, another value, or an error while evaluating (a field the payload does not
//! have: `no such key`) filters the event out, and the event log says which of them it was.
//! Parsing and evaluating are the `cel` crate's (README, "Payload filters", says why).

use std::fmt;

use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program, Value};

/// CEL's standard environment (functions and macros), built once: building it is most of what
/// a fresh context costs, many times the evaluation of a filter.
fn stdlib() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

/// A parsed filter, ready to evaluate many times.
pub struct Filter {
    source: String,
    program: Program,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Filter").field(&self.source).finish()
    }
}

/// What a filter sees of one event.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub object_type: &'a str,
    pub event_type: &'a str,
    pub object_id: &'a str,
    pub store_id: &'a str,
    /// The Ecwid payload, parsed.
    pub raw: &'a serde_json::Value,
}

/// Why a filter kept an event from an instance (the event log's `lastError` of the record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped(pub String);

impl Filter {
    /// Parses `source`; the error is the parser's message (answered as a 422 naming the key).
    pub fn parse(source: &str) -> Result<Self, String> {
        let program = stdlib().compile(source).map_err(|e| {
            let text = e.to_string();
            let text = text.trim();
            if text.is_empty() {
                "is not a valid CEL expression".to_owned()
            } else {
                format!("is not a valid CEL expression: {text}")
            }
        })?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// `Ok` when the event passes; otherwise why it does not.
    pub fn check(&self, subject: &Subject<'_>) -> Result<(), Dropped> {
        let mut context = Context::with_env(Arc::clone(stdlib()));
        context.add_variable_from_value("objectType", subject.object_type);
        context.add_variable_from_value("eventType", subject.event_type);
        context.add_variable_from_value("objectId", subject.object_id);
        context.add_variable_from_value("storeId", subject.store_id);
        context.add_variable_from_value("raw", json_to_cel(subject.raw));
        match self.program.execute(&context) {
            Ok(Value::Bool(true)) => Ok(()),
            Ok(Value::Bool(false)) => Err(Dropped(format!(
                "event.notification.filter is false: {}",
                self.source
            ))),
            Ok(other) => Err(Dropped(format!(
                "event.notification.filter gave {:?}, not a boolean: {}",
                other.type_of(),
                self.source
            ))),
            Err(e) => Err(Dropped(format!(
                "event.notification.filter could not be evaluated ({e}): {}",
                self.source
            ))),
        }
    }
}

/// Parsed filters by their text, so that an expression is parsed once and not per event.
/// Bounded: emptied when it would hold more than [`MAX_CACHED`].
#[derive(Debug, Default)]
pub struct FilterCache(std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Filter>>>);

const MAX_CACHED: usize = 4096;

impl FilterCache {
    /// Whether the event passes `source` (a filter that no longer parses lets nothing through).
    pub fn check(&self, source: &str, subject: &Subject<'_>) -> Result<(), Dropped> {
        let filter = {
            let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match cached.get(source) {
                Some(f) => std::sync::Arc::clone(f),
                None => {
                    let parsed = Filter::parse(source)
                        .map_err(|e| Dropped(format!("event.notification.filter {e}")))?;
                    if cached.len() >= MAX_CACHED {
                        cached.clear();
                    }
                    let parsed = std::sync::Arc::new(parsed);
                    cached.insert(source.to_owned(), std::sync::Arc::clone(&parsed));
                    parsed
                }
            }
        };
        filter.check(subject)
    }
}

/// A JSON value as CEL sees it: numbers that are whole stay integers (`raw.storeId == 1003`),
/// others are doubles.
fn json_to_cel(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => {
            Value::List(std::sync::Arc::new(items.iter().map(json_to_cel).collect()))
        }
        J::Object(map) => {
            let entries: std::collections::HashMap<cel::objects::Key, Value> = map
                .iter()
                .map(|(k, v)| (cel::objects::Key::from(k.clone()), json_to_cel(v)))
                .collect();
            Value::Map(cel::objects::Map {
                map: std::sync::Arc::new(entries),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(source: &str, raw: &serde_json::Value) -> Result<(), Dropped> {
        Filter::parse(source).unwrap().check(&Subject {
            object_type: "orders",
            event_type: "UPDATED",
            object_id: "XJ12H",
            store_id: "1003",
            raw,
        })
    }

    #[test]
    fn the_issue_s_example_works_as_written() {
        let paid = json!({"eventType":"order.updated","storeId":1003,
            "data":{"newPaymentStatus":"PAID","oldPaymentStatus":"AWAITING_PAYMENT"}});
        let shipped = json!({"eventType":"order.updated","storeId":1003,
            "data":{"newFulfillmentStatus":"SHIPPED"}});
        let f = "raw.data.newPaymentStatus == 'PAID'";
        assert_eq!(check(f, &paid), Ok(()));
        let dropped = check(f, &shipped).unwrap_err();
        assert!(dropped.0.contains("could not be evaluated"), "{dropped:?}");
        let unpaid = json!({"data":{"newPaymentStatus":"AWAITING_PAYMENT"}});
        assert!(check(f, &unpaid).unwrap_err().0.contains("is false"));
    }

    #[test]
    fn envelope_fields_numbers_and_macros() {
        let raw = json!({"storeId":1003,"data":{"total":12.5,"items":[{"sku":"A"},{"sku":"B"}]}});
        for (source, passes) in [
            ("objectType == 'orders' && eventType == 'UPDATED'", true),
            ("objectType in ['products', 'categories']", false),
            ("raw.storeId == 1003 && storeId == '1003'", true),
            ("raw.data.total > 10.0", true),
            ("raw.data.items.exists(i, i.sku == 'B')", true),
            ("has(raw.data.newPaymentStatus)", false),
            ("objectId.startsWith('XJ')", true),
            ("raw.data.total", false),
        ] {
            assert_eq!(check(source, &raw).is_ok(), passes, "{source}");
        }
    }

    #[test]
    fn malformed_filters_are_refused_with_the_parser_s_message() {
        for bad in [
            "raw.data.status ==",
            "objectType = 'orders'",
            "(",
            "'unclosed",
        ] {
            let err = Filter::parse(bad).unwrap_err();
            assert!(
                err.starts_with("is not a valid CEL expression"),
                "{bad}: {err}"
            );
        }
    }
}
