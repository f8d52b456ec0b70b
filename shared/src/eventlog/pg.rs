//! The event log's PostgreSQL side: connecting (a pool, TLS through rustls), the schema's
//! migrations (versioned, forward-only, applied at start under an advisory lock), and the
//! partitions (created ahead, dropped past retention, by whichever service gets the lock).

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use time::{Date, OffsetDateTime};
use tokio_postgres::config::SslMode;

use crate::config::DatabaseConfig;

/// The schema, in order. A released migration is never edited: a change is a new one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "event_log", include_str!("migrations/V1__event_log.sql")),
    (
        2,
        "search_indexes",
        include_str!("migrations/V2__search_indexes.sql"),
    ),
];

/// Advisory lock ids (any fixed numbers that other applications of the database do not use).
const MIGRATION_LOCK: i64 = 0x6563_7769_645f_6d31;
const MAINTENANCE_LOCK: i64 = 0x6563_7769_645f_6d32;

/// The partitioned tables; each has one partition per UTC day, `<table>_pYYYYMMDD`.
pub const TABLES: [&str; 2] = ["event_log_events", "event_log_attempts"];
/// Days of partitions made ahead of today.
pub const DAYS_AHEAD: i64 = 7;

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL connection pool: {0}")]
    Pool(String),
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::Postgres(e),
            other => DbError::Pool(other.to_string()),
        }
    }
}

pub use crate::config::parse_database_url as parse_url;

fn tls(config: &DatabaseConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| DbError::Tls(format!("{}: {e}", path.display())))?
            {
                let cert = cert.map_err(|e| DbError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| DbError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DbError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

/// A pool of at most `config.pool` connections, made as they are needed.
pub fn pool(config: &DatabaseConfig) -> Result<Pool, DbError> {
    let mut pg = parse_url(&config.url).map_err(DbError::Pool)?;
    pg.connect_timeout(Duration::from_secs(5));
    pg.application_name("ecwid-events");
    let manager = if pg.get_ssl_mode() == SslMode::Disable {
        Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        )
    } else {
        Manager::from_config(
            pg,
            tls(config)?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        )
    };
    Pool::builder(manager)
        .max_size(config.pool)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Applies the migrations the database lacks, up to `upto` (all: `i32::MAX`), in one
/// transaction under an advisory lock, so replicas starting together apply each once. Returns
/// the versions applied.
pub async fn migrate(pool: &Pool, upto: i32) -> Result<Vec<i32>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS event_log_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM event_log_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if *version > upto || done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO event_log_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// `<table>_pYYYYMMDD`.
pub fn partition_name(table: &str, day: Date) -> String {
    format!(
        "{table}_p{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// The day a partition's name says, when it is one of ours.
pub fn partition_day(table: &str, name: &str) -> Option<Date> {
    let digits = name.strip_prefix(table)?.strip_prefix("_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| digits[r].parse::<u32>().ok();
    let month = time::Month::try_from(u8::try_from(n(4..6)?).ok()?).ok()?;
    Date::from_calendar_date(
        i32::try_from(n(0..4)?).ok()?,
        month,
        u8::try_from(n(6..8)?).ok()?,
    )
    .ok()
}

fn day_start(day: Date) -> String {
    format!(
        "{:04}-{:02}-{:02} 00:00:00+00",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// What one round of partition upkeep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Upkeep {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    /// Rows of the default partitions older than retention, deleted.
    pub deleted_rows: u64,
    /// Whether another process held the lock (then nothing was done).
    pub skipped: bool,
}

/// Partitions from yesterday to [`DAYS_AHEAD`] days ahead exist; those whose whole day is
/// older than `retention` are dropped. One process at a time (a transaction-scoped advisory
/// lock; the others skip the round).
pub async fn upkeep(
    pool: &Pool,
    retention: Duration,
    now: OffsetDateTime,
) -> Result<Upkeep, DbError> {
    let mut client = pool.get().await?;
    let mut tx = client.transaction().await?;
    let mut done = Upkeep::default();
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&MAINTENANCE_LOCK])
        .await?
        .get(0);
    if !locked {
        done.skipped = true;
        return Ok(done);
    }
    let today = now.date();
    let existing: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
              WHERE p.relname = ANY($1)",
            &[&TABLES.to_vec()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in TABLES {
        for offset in -1..=DAYS_AHEAD {
            let day = today + time::Duration::days(offset);
            let name = partition_name(table, day);
            if existing.contains(&name) {
                continue;
            }
            let next = day + time::Duration::days(1);
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}')",
                day_start(day),
                day_start(next)
            );
            // A savepoint: a day whose rows already sit in the default partition cannot get
            // its own (they stay there, and are deleted with it past retention).
            let sp = tx.savepoint("partition").await;
            let Ok(sp) = sp else { continue };
            match sp.batch_execute(&sql).await {
                Ok(()) => {
                    sp.commit().await?;
                    done.created.push(name);
                }
                Err(error) => {
                    tracing::warn!(%error, partition = name, "Event log partition not created; its rows stay in the default partition.");
                    sp.rollback().await?;
                }
            }
        }
    }
    let cutoff = now - retention;
    for name in &existing {
        let Some((table, day)) = TABLES
            .iter()
            .find_map(|t| partition_day(t, name).map(|d| (*t, d)))
        else {
            continue;
        };
        let end = (day + time::Duration::days(1)).midnight().assume_utc();
        if end <= cutoff {
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                .await?;
            tracing::debug!(
                table,
                partition = name,
                "Event log partition past retention dropped."
            );
            done.dropped.push(name.clone());
        }
    }
    let cutoff_ms = cutoff.unix_timestamp() * 1000;
    for table in TABLES {
        done.deleted_rows += tx
            .execute(
                &format!(
                    "DELETE FROM {table}_default WHERE received_at < to_timestamp($1::bigint / 1000.0)"
                ),
                &[&cutoff_ms],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// Runs [`upkeep`] now and then every `every` until `cancel`; failures are logged and tried
/// again at the next round.
pub async fn keep_partitions(
    pool: Pool,
    retention: Duration,
    every: Duration,
    drop_seconds: prometheus::Histogram,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let started = Instant::now();
        match upkeep(&pool, retention, OffsetDateTime::now_utc()).await {
            Ok(done) => {
                if !done.dropped.is_empty() {
                    drop_seconds.observe(started.elapsed().as_secs_f64());
                }
                if !done.created.is_empty() || !done.dropped.is_empty() || done.deleted_rows > 0 {
                    tracing::info!(
                        created = done.created.len(),
                        dropped = ?done.dropped,
                        deleted_rows = done.deleted_rows,
                        took_ms = started.elapsed().as_millis() as u64,
                        "Event log partitions kept."
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, "Event log partition upkeep failed; trying again later.")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        let day = Date::from_calendar_date(2026, time::Month::December, 7).unwrap();
        let name = partition_name("event_log_events", day);
        assert_eq!(name, "event_log_events_p20261207");
        assert_eq!(partition_day("event_log_events", &name), Some(day));
        assert_eq!(partition_day("event_log_attempts", &name), None);
        assert_eq!(
            partition_day("event_log_events", "event_log_events_default"),
            None
        );
        assert_eq!(day_start(day), "2026-12-07 00:00:00+00");
    }

    #[test]
    fn urls_need_a_host_and_a_database() {
        assert!(parse_url("postgres://u:p@db:5432/ecwid?sslmode=verify-full").is_ok());
        assert!(parse_url("postgres://u:p@db:5432/ecwid?sslmode=require").is_ok());
        assert!(parse_url("postgres://u:p@db:5432")
            .unwrap_err()
            .contains("no database"));
        assert!(parse_url("mysql://x").is_err());
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
    }
}
