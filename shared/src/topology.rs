//! The streams and buckets every service needs, set up at start-up by every replica of every
//! service, possibly all at the same moment (a rollout, `docker compose up`). Each replica reads
//! what is stored first and writes only what is missing or different: a create that loses a race
//! to another replica's is read again, not retried as an update, and an update is sent only for a
//! stream whose stored settings differ from this replica's in a field the project sets. Every
//! such difference is logged (field, stored, wanted) and kept in a [`TopologyReport`] that the
//! service shows on `/readyz` and counts in `ecwid_topology_writes_total`.
//!
//! Why not `create_or_update_stream` at every start: it sends an update even when nothing
//! differs, and nats-server 2.9.10 panics on an update that arrives while another client's create
//! of the same stream is half done (issue 34: 4 of 32 simultaneous starts killed the server).

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, kv, stream};
use serde::Serialize;

use crate::nats::{
    APP_STATES_BUCKET, APP_STATES_MAX_AGE, CALLBACKS_BUCKET, DEAD_PREFIX, DEAD_STREAM,
    DELIVERERS_BUCKET, DELIVERERS_MAX_AGE, EVENTS_PREFIX, EVENTS_STREAM, INSTANCES_BUCKET,
    ORDERED_PREFIX, POLL_LEASES_BUCKET, POLL_STATE_BUCKET, RAW_PREFIX, RAW_STREAM, RETRYING_STREAM,
    STATE_BUCKET,
};
use model::retry::WORK_STREAM_MAX_AGE;

use crate::Error;

/// The most dead letters `ECWID_DEAD` keeps of one stage and instance (deliver) or store
/// (normalize); the oldest of them go first.
pub const DEAD_LETTERS_PER_SUBJECT: i64 = 100_000;

/// Stream and bucket settings.
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    pub replicas: usize,
    pub duplicate_window: Duration,
    /// `EVENT_LOG_RETENTION`.
    pub log_retention: Duration,
    /// `STREAM_MAX_BYTES`, `STREAM_MAX_MSGS`.
    pub limits: crate::config::StreamLimits,
}

impl From<&crate::config::CommonConfig> for TopologyConfig {
    fn from(c: &crate::config::CommonConfig) -> Self {
        Self {
            replicas: c.stream_replicas,
            duplicate_window: c.duplicate_window,
            log_retention: c.event_log_retention,
            limits: c.stream_limits.clone(),
        }
    }
}

/// One setting whose stored value differs from what this replica wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The stream (a bucket's is `KV_<bucket>`).
    pub name: String,
    pub field: &'static str,
    pub stored: String,
    pub wanted: String,
}

/// What setting up the topology wrote, for the log, `/readyz` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TopologyReport {
    /// Streams this replica created (a bucket's is `KV_<bucket>`).
    pub created: Vec<String>,
    /// Streams this replica updated, because their stored settings differed from its own.
    pub updated: Vec<String>,
    /// Each setting that differed, before the update.
    pub differences: Vec<Difference>,
}

fn work_stream(
    name: &str,
    subject: &str,
    cfg: &TopologyConfig,
    description: &str,
) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        subjects: vec![subject.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        max_age: WORK_STREAM_MAX_AGE,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        ..Default::default()
    }
}

/// Applies the operator's limits to a stream. At a limit, a work stream (whose messages are work
/// not done yet) refuses new messages, so the writer fails and retries (the ingest answers 503)
/// and nothing stored is dropped; `ECWID_RETRYING` (markers, rebuilt from the work streams) drops
/// its oldest.
pub fn limit(config: &mut stream::Config, limits: &crate::config::StreamLimits) {
    let (bytes, msgs) = limits.of(&config.name);
    config.max_bytes = bytes;
    config.max_messages = msgs;
    config.discard = if config.name == RETRYING_STREAM {
        stream::DiscardPolicy::Old
    } else {
        stream::DiscardPolicy::New
    };
}

/// Creates the streams and the buckets that are missing and updates those whose stored settings
/// differ from `cfg`'s; nothing is written when everything is as wanted. Safe to run from every
/// replica at every start, at the same moment. What it did goes into `report` (kept across a
/// retried attempt, so an attempt that failed half-way still shows what it created).
pub async fn setup_topology(
    js: &jetstream::Context,
    cfg: &TopologyConfig,
    report: &Mutex<TopologyReport>,
) -> Result<kv::Store, Error> {
    let streams = [
        work_stream(
            RAW_STREAM,
            &format!("{RAW_PREFIX}.>"),
            cfg,
            "Raw Ecwid webhooks as received by the ingest",
        ),
        stream::Config {
            max_age: WORK_STREAM_MAX_AGE.max(cfg.log_retention),
            subjects: vec![format!("{EVENTS_PREFIX}.>"), format!("{ORDERED_PREFIX}.>")],
            ..work_stream(
                EVENTS_STREAM,
                &format!("{EVENTS_PREFIX}.>"),
                cfg,
                "Open Connectors envelopes, one per instance",
            )
        },
        stream::Config {
            // Dead letters stay until an operator replays or deletes them, at most
            // DEAD_LETTERS_PER_SUBJECT of one stage and instance (or store): past that the
            // oldest of that subject go, so one runaway receiver cannot fill the stream.
            max_age: Duration::ZERO,
            max_messages_per_subject: DEAD_LETTERS_PER_SUBJECT,
            ..work_stream(
                DEAD_STREAM,
                &format!("{DEAD_PREFIX}.>"),
                cfg,
                "Messages a stage could not process",
            )
        },
    ];
    let spool = crate::eventlog::spool_stream_config(cfg.replicas);
    let held = crate::control::held_stream_config(cfg.replicas, cfg.duplicate_window);
    let retrying = crate::control::retrying_stream_config(cfg.replicas);
    for mut config in streams.into_iter().chain([spool, held, retrying]) {
        limit(&mut config, &cfg.limits);
        ensure_stream(js, "stream", config, report).await?;
    }
    let instances = ensure_bucket(
        js,
        Bucket {
            name: INSTANCES_BUCKET,
            description: "ecwid-events connector instances",
            history: 5,
            max_age: Duration::ZERO,
        },
        cfg.replicas,
        report,
    )
    .await?;
    for bucket in [
        Bucket {
            name: POLL_LEASES_BUCKET,
            description: "ecwid-events poller leases",
            history: 1,
            max_age: Duration::ZERO,
        },
        Bucket {
            name: POLL_STATE_BUCKET,
            description: "ecwid-events poller cursors, status, budgets",
            history: 1,
            max_age: Duration::ZERO,
        },
        Bucket {
            name: STATE_BUCKET,
            description: "ecwid-events instance states (paused, disabled)",
            history: 5,
            max_age: Duration::ZERO,
        },
        Bucket {
            name: CALLBACKS_BUCKET,
            description: "ecwid-events callback health shared by the deliverers",
            history: 1,
            max_age: Duration::ZERO,
        },
        Bucket {
            name: DELIVERERS_BUCKET,
            description: "ecwid-events live deliverer replicas",
            history: 1,
            max_age: DELIVERERS_MAX_AGE,
        },
        Bucket {
            name: APP_STATES_BUCKET,
            description: "ecwid-events OAuth states taken by the Ecwid app's installs",
            history: 1,
            max_age: APP_STATES_MAX_AGE,
        },
    ] {
        ensure_bucket(js, bucket, cfg.replicas, report).await?;
    }
    Ok(instances)
}

/// A key-value bucket's settings.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    pub name: &'static str,
    pub description: &'static str,
    /// Values kept per key.
    pub history: i64,
    /// How long a value lives; zero: forever.
    pub max_age: Duration,
}

/// Creates a key-value bucket when it is missing, or updates it when its settings differ (as
/// [`setup_topology`] does for streams). Its backing stream is written directly, with the
/// settings a KV client uses: the client's own bucket creation first asks for account details
/// in a shape that nats-server 2.9 does not send.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: Bucket,
    replicas: usize,
    report: &Mutex<TopologyReport>,
) -> Result<kv::Store, Error> {
    let topology = |e: String| Error::Topology {
        what: "key-value bucket",
        name: bucket.name.to_owned(),
        message: e,
    };
    let config = stream::Config {
        name: format!("KV_{}", bucket.name),
        description: Some(bucket.description.to_owned()),
        subjects: vec![format!("$KV.{}.>", bucket.name)],
        max_messages_per_subject: bucket.history,
        max_age: bucket.max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        // JetStream refuses a duplicate window longer than the messages live.
        duplicate_window: match bucket.max_age {
            Duration::ZERO => Duration::from_secs(120),
            max_age => max_age.min(Duration::from_secs(120)),
        },
        ..Default::default()
    };
    ensure_stream(js, "key-value bucket", config, report).await?;
    js.get_key_value(bucket.name)
        .await
        .map_err(|e| topology(e.to_string()))
}

/// Makes stream `wanted.name` exist with `wanted`'s settings, writing nothing when it already
/// does. `what` names it in errors (`stream`, `key-value bucket`).
async fn ensure_stream(
    js: &jetstream::Context,
    what: &'static str,
    wanted: stream::Config,
    report: &Mutex<TopologyReport>,
) -> Result<(), Error> {
    let name = wanted.name.clone();
    let failed = |message: String| Error::Topology {
        what,
        name: name.clone(),
        message,
    };
    let read = || async {
        js.get_stream(&name)
            .await
            .map(|s| s.cached_info().config.clone())
    };
    let stored = match read().await {
        Ok(stored) => stored,
        Err(e) if is_stream_not_found(e.kind()) => match js.create_stream(wanted.clone()).await {
            Ok(_) => {
                tracing::info!(stream = %name, "Created the stream.");
                lock(report).created.push(name.clone());
                return Ok(());
            }
            // Another replica created it between our read and our create (with other
            // settings, or the server would have answered with the stream): read it again.
            Err(e) if is_name_in_use(e.kind()) => {
                read().await.map_err(|e| failed(e.to_string()))?
            }
            Err(e) => return Err(failed(e.to_string())),
        },
        Err(e) => return Err(failed(e.to_string())),
    };
    let found = differences(&stored, &wanted);
    if found.is_empty() {
        return Ok(());
    }
    for d in &found {
        tracing::warn!(
            stream = %name, field = d.field, stored = %d.stored, wanted = %d.wanted,
            "Stored stream setting differs from this replica's configuration; updating it \
             (every replica shares it: the last one to start wins)."
        );
    }
    js.update_stream(&wanted)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if name == RETRYING_STREAM && stored.max_messages_per_subject == 1 {
        // An earlier version kept a marker subject per retrying envelope; they would stay in
        // nats-server's memory for their max age. The counts start again from zero: envelopes
        // waiting for a retry at the upgrade are not shown as retrying, but are retried.
        let purged = js
            .get_stream(&name)
            .await
            .map_err(|e| failed(e.to_string()))?
            .purge()
            .await
            .map_err(|e| failed(e.to_string()))?;
        tracing::info!(stream = %name, markers = purged.purged, "Removed the per-envelope retry markers of an earlier version.");
    }
    let mut report = lock(report);
    report.updated.push(name.clone());
    report.differences.extend(found);
    Ok(())
}

fn lock(report: &Mutex<TopologyReport>) -> std::sync::MutexGuard<'_, TopologyReport> {
    // A panic elsewhere while holding it leaves a report that is still worth showing.
    report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_stream_not_found(kind: GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn is_name_in_use(kind: CreateStreamErrorKind) -> bool {
    matches!(kind, CreateStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

/// The settings the project sets on a stream whose stored value differs from `wanted`'s.
/// Values nats-server fills in when a setting is left at its default are read as that default:
/// a limit of 0 or less is "none" (-1), zero replicas is one, and a duplicate window left at
/// zero is whatever the server chose.
pub fn differences(stored: &stream::Config, wanted: &stream::Config) -> Vec<Difference> {
    fn limit(n: i64) -> i64 {
        if n <= 0 {
            -1
        } else {
            n
        }
    }
    let replicas = |n: usize| n.max(1);
    let mut fields: Vec<(&'static str, String, String)> = vec![
        (
            "subjects",
            format!("{:?}", stored.subjects),
            format!("{:?}", wanted.subjects),
        ),
        (
            "description",
            format!("{:?}", stored.description),
            format!("{:?}", wanted.description),
        ),
        (
            "retention",
            format!("{:?}", stored.retention),
            format!("{:?}", wanted.retention),
        ),
        (
            "storage",
            format!("{:?}", stored.storage),
            format!("{:?}", wanted.storage),
        ),
        (
            "num_replicas",
            replicas(stored.num_replicas).to_string(),
            replicas(wanted.num_replicas).to_string(),
        ),
        (
            "max_age",
            format!("{:?}", stored.max_age),
            format!("{:?}", wanted.max_age),
        ),
        (
            "discard",
            format!("{:?}", stored.discard),
            format!("{:?}", wanted.discard),
        ),
        (
            "max_bytes",
            limit(stored.max_bytes).to_string(),
            limit(wanted.max_bytes).to_string(),
        ),
        (
            "max_messages",
            limit(stored.max_messages).to_string(),
            limit(wanted.max_messages).to_string(),
        ),
        (
            "max_messages_per_subject",
            limit(stored.max_messages_per_subject).to_string(),
            limit(wanted.max_messages_per_subject).to_string(),
        ),
        (
            "max_message_size",
            limit(i64::from(stored.max_message_size)).to_string(),
            limit(i64::from(wanted.max_message_size)).to_string(),
        ),
        (
            "allow_direct",
            stored.allow_direct.to_string(),
            wanted.allow_direct.to_string(),
        ),
        (
            "allow_rollup",
            stored.allow_rollup.to_string(),
            wanted.allow_rollup.to_string(),
        ),
        (
            "deny_delete",
            stored.deny_delete.to_string(),
            wanted.deny_delete.to_string(),
        ),
    ];
    if !wanted.duplicate_window.is_zero() {
        fields.push((
            "duplicate_window",
            format!("{:?}", stored.duplicate_window),
            format!("{:?}", wanted.duplicate_window),
        ));
    }
    fields
        .into_iter()
        .filter(|(_, old, new)| old != new)
        .map(|(field, old, new)| Difference {
            name: wanted.name.clone(),
            field,
            stored: old,
            wanted: new,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> stream::Config {
        crate::control::held_stream_config(1, Duration::from_secs(120))
    }

    #[test]
    fn what_the_server_fills_in_is_no_difference() {
        // As nats-server answers a stream created from `wanted()`: limits left at 0 are -1,
        // replicas 1, plus fields the project never sets.
        let stored = stream::Config {
            max_bytes: -1,
            max_messages: -1,
            max_messages_per_subject: -1,
            max_message_size: -1,
            num_replicas: 1,
            max_consumers: -1,
            ..wanted()
        };
        assert_eq!(differences(&stored, &wanted()), vec![]);
        let retrying = crate::control::retrying_stream_config(0);
        let stored = stream::Config {
            // Left at zero by the project: the server's choice is not a difference.
            duplicate_window: Duration::from_secs(120),
            num_replicas: 1,
            ..retrying.clone()
        };
        assert_eq!(differences(&stored, &retrying), vec![]);
    }

    #[test]
    fn each_setting_the_project_sets_is_compared() {
        let cases: Vec<(&str, stream::Config)> = vec![
            (
                "max_age",
                stream::Config {
                    max_age: Duration::from_secs(60),
                    ..wanted()
                },
            ),
            (
                "max_bytes",
                stream::Config {
                    max_bytes: 1 << 30,
                    ..wanted()
                },
            ),
            (
                "max_messages",
                stream::Config {
                    max_messages: 10,
                    ..wanted()
                },
            ),
            (
                "num_replicas",
                stream::Config {
                    num_replicas: 3,
                    ..wanted()
                },
            ),
            (
                "duplicate_window",
                stream::Config {
                    duplicate_window: Duration::from_secs(30),
                    ..wanted()
                },
            ),
            (
                "discard",
                stream::Config {
                    discard: stream::DiscardPolicy::Old,
                    ..wanted()
                },
            ),
            (
                "subjects",
                stream::Config {
                    subjects: vec!["ecwid.other.>".into()],
                    ..wanted()
                },
            ),
            (
                "allow_direct",
                stream::Config {
                    allow_direct: false,
                    ..wanted()
                },
            ),
            (
                "description",
                stream::Config {
                    description: None,
                    ..wanted()
                },
            ),
        ];
        for (field, stored) in cases {
            let found = differences(&stored, &wanted());
            assert_eq!(found.len(), 1, "{field}: {found:?}");
            assert_eq!(found[0].field, field);
            assert_eq!(found[0].name, "ECWID_HELD");
            assert_ne!(found[0].stored, found[0].wanted);
        }
    }

    #[test]
    fn a_difference_says_both_values() {
        let stored = stream::Config {
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..wanted()
        };
        let want = stream::Config {
            max_age: Duration::from_secs(10 * 24 * 3600),
            ..wanted()
        };
        assert_eq!(
            differences(&stored, &want),
            vec![Difference {
                name: "ECWID_HELD".into(),
                field: "max_age",
                stored: "604800s".into(),
                wanted: "864000s".into(),
            }]
        );
    }
}
