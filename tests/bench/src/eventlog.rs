//! The event log's read side at size, in PostgreSQL: fills the pipeline's log database with `n`
//! records shaped like the deliverer's (an event row and one delivered attempt row each, five
//! records per objectId, received over the last week in daily partitions), server-side in one
//! statement per million rows (the same rows the
//! writer's batches make; the write path's cost is measured by the pipeline phases with the log
//! on and off), then times `GET /events/{id}`, `GET /events?objectId=` and
//! `GET /events?instance=&status=&since=&until=` through the real admin API, and reports the
//! database's size per million records, nats-server's memory before and after the fill, and
//! what dropping one day's partitions takes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What the lookups measured.
pub(crate) struct Lookups {
    pub(crate) records: u64,
    pub(crate) fill_secs: f64,
    pub(crate) by_id_us: Vec<u32>,
    pub(crate) by_object_us: Vec<u32>,
    pub(crate) by_status_us: Vec<u32>,
    /// The database's size after the fill, per million records.
    pub(crate) bytes_per_million: f64,
    /// nats-server's resident memory before and after the fill (the log no longer lives there).
    pub(crate) nats_rss_before: u64,
    pub(crate) nats_rss_after: u64,
    /// One full day of the fill, dropped as retention drops it: its records, its partitions'
    /// size and how long the `DROP TABLE` of both took.
    pub(crate) day_records: u64,
    pub(crate) day_bytes: u64,
    pub(crate) day_drop_ms: f64,
}

fn id_of(i: u64) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        i >> 32,
        i & 0xffff_ffff_ffff
    )
}

fn object_of(i: u64, objects: u64) -> String {
    format!("LOG{}", i % objects)
}

const INSTANCE: &str = "bench-log-instance";

/// How far back the filled records' receipts go: a week, the default retention.
const SPAN_MS: i64 = 7 * 86_400_000;

/// The daily partitions of the filled week (the services make only yesterday's on).
const PAST_PARTITIONS: &str = "SET TIME ZONE 'UTC'; DO $$ DECLARE d date; t text; BEGIN \
     FOR d IN SELECT generate_series(current_date - 8, current_date, interval '1 day')::date LOOP \
       FOREACH t IN ARRAY ARRAY['event_log_events', 'event_log_attempts'] LOOP \
         EXECUTE format('CREATE TABLE IF NOT EXISTS %s_p%s PARTITION OF %s FOR VALUES FROM (%L) TO (%L)', \
           t, to_char(d, 'YYYYMMDD'), t, d::timestamptz, (d + 1)::timestamptz); \
       END LOOP; \
     END LOOP; END $$";

/// Drops the partitions of the oldest full day of the fill (both tables, in one statement, as
/// the services' retention does) and answers "records bytes milliseconds".
const DROP_A_DAY: &str = "SET TIME ZONE 'UTC'; \
     CREATE FUNCTION pg_temp.drop_day(d text) RETURNS text AS $$ \
     DECLARE t0 timestamptz; n bigint; bytes bigint; BEGIN \
       EXECUTE format('SELECT count(*) FROM event_log_events_p%s', d) INTO n; \
       EXECUTE format('SELECT pg_total_relation_size(''event_log_events_p%s'') + pg_total_relation_size(''event_log_attempts_p%s'')', d, d) INTO bytes; \
       t0 := clock_timestamp(); \
       EXECUTE format('DROP TABLE event_log_events_p%s, event_log_attempts_p%s', d, d); \
       RETURN n || ' ' || bytes || ' ' || extract(epoch FROM clock_timestamp() - t0) * 1000; \
     END $$ LANGUAGE plpgsql; \
     SELECT pg_temp.drop_day(to_char(current_date - 6, 'YYYYMMDD'));";

/// Records `lo..hi` of `n` (event rows and their attempt rows), their receipts spread evenly
/// over the week before `now_ms`.
fn fill_sql(lo: u64, hi: u64, n: u64, objects: u64, now_ms: i64) -> [String; 2] {
    let step = SPAN_MS / n.max(1) as i64;
    let ms = format!("({now_ms}::bigint - {SPAN_MS} + i * {step})");
    let at = format!("to_timestamp({ms} / 1000.0)");
    [
        format!(
            "INSERT INTO event_log_events (id, received_at, instance_id, store_id, object_type, \
             object_id, event_type, ecwid_event_id, format, verified, request_id, status, seq) \
             SELECT lpad(to_hex(i >> 32), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i & 281474976710655), 12, '0'), \
             {at}, '{INSTANCE}', '9999', 'orders', 'LOG' || (i % {objects}), 'UPDATED', \
             'bench-log-' || i, 'v3', true, lpad(to_hex(i), 32, '0'), 'pending', \
             ({ms} << 20) | (i & 1048575) \
             FROM generate_series({lo}::bigint, {hi}::bigint - 1) AS i"
        ),
        format!(
            "INSERT INTO event_log_attempts (event_id, received_at, key, store_id, attempted, \
             started_at, settled_at, duration_ms, status, http_status, response) \
             SELECT lpad(to_hex(i >> 32), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i & 281474976710655), 12, '0'), \
             {at}, md5(i::text), '9999', true, {at}, {at}, 3, 'delivered', 200, '{{\"ok\":true}}' \
             FROM generate_series({lo}::bigint, {hi}::bigint - 1) AS i"
        ),
    ]
}

fn elapsed_us(started: Instant) -> u32 {
    started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

async fn timed_get(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<u32> {
    let started = Instant::now();
    let resp = http.get(url).bearer_auth(token).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(elapsed_us(started))
}

/// Fills the log of the pipeline on `nats_url` with `n` records, then times `samples` lookups
/// of each kind against `admin`.
pub(crate) async fn measure(
    nats_url: &str,
    admin: SocketAddr,
    nats_pid: u32,
    token: &str,
    n: u64,
    samples: u64,
) -> anyhow::Result<Lookups> {
    let rss = || crate::procinfo::read(nats_pid).map_or(0, |u| u.rss_kib * 1024);
    let nats_rss_before = rss();
    let objects = (n / 5).max(1);
    let started = Instant::now();
    let now_ms = model::time_fmt::now_unix_ms();
    integration_tests::pg::psql_for(nats_url, PAST_PARTITIONS);
    let step = 1_000_000;
    let mut lo = 0;
    while lo < n {
        let hi = (lo + step).min(n);
        for sql in fill_sql(lo, hi, n, objects, now_ms) {
            integration_tests::pg::psql_for(nats_url, &sql);
        }
        lo = hi;
    }
    integration_tests::pg::psql_for(nats_url, "ANALYZE");
    let fill_secs = started.elapsed().as_secs_f64();
    let size: f64 =
        integration_tests::pg::psql_for(nats_url, "SELECT pg_database_size(current_database())")
            .parse()
            .unwrap_or(f64::NAN);
    let bytes_per_million = size / (n as f64 / 1e6);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // Spread over the whole log, oldest to newest, by a fixed stride (repeatable).
    let stride = (n / samples.max(1)).max(1) | 1;
    let picks: Vec<u64> = (0..samples).map(|k| (k * stride * 7919) % n).collect();
    let (mut by_id, mut by_object, mut by_status) = (Vec::new(), Vec::new(), Vec::new());
    for (k, &i) in picks.iter().enumerate() {
        by_id.push(timed_get(&http, &format!("http://{admin}/events/{}", id_of(i)), token).await?);
        let object = object_of(i, objects);
        by_object.push(
            timed_get(
                &http,
                &format!("http://{admin}/events?objectId={object}"),
                token,
            )
            .await?,
        );
        // A window of ten minutes somewhere in the filled week.
        let from = now_ms - SPAN_MS + k as i64 * (SPAN_MS - 600_000) / samples.max(1) as i64;
        let window = format!(
            "instance={INSTANCE}&status=delivered&since={}&until={}",
            model::time_fmt::unix_ms_to_rfc3339(from),
            model::time_fmt::unix_ms_to_rfc3339(from + 600_000)
        );
        by_status.push(timed_get(&http, &format!("http://{admin}/events?{window}"), token).await?);
    }
    for v in [&mut by_id, &mut by_object, &mut by_status] {
        v.sort_unstable();
    }
    let nats_rss_after = rss();
    let dropped = integration_tests::pg::psql_for(nats_url, DROP_A_DAY);
    let mut parts = dropped.split_whitespace();
    let mut next = || parts.next().unwrap_or("nan").to_owned();
    let (day_records, day_bytes, day_drop_ms) = (
        next().parse().unwrap_or(0),
        next().parse().unwrap_or(0),
        next().parse().unwrap_or(f64::NAN),
    );
    Ok(Lookups {
        records: n,
        fill_secs,
        by_id_us: by_id,
        by_object_us: by_object,
        by_status_us: by_status,
        bytes_per_million,
        nats_rss_before,
        nats_rss_after,
        day_records,
        day_bytes,
        day_drop_ms,
    })
}
