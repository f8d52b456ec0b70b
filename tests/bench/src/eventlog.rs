//! The event log's read side at size: fills `ECWID_LOG` and `ECWID_LOG_INDEX` with `n` records
//! shaped like the deliverer's (one attempt each, five records per objectId), straight into
//! JetStream (the write path's cost is measured by the pipeline phases with the log on and off),
//! then times `GET /events/{id}` and `GET /events?objectId=` through the real admin API.
//!
//! A lookup by id reads the record, then its envelope from `ECWID_EVENTS` by the record's
//! `envelopeSeq`. The filled records point at the envelopes the pipeline phases left there
//! (record `i` at the `i mod stored`-th), so every lookup pays that read as in production;
//! the envelope found is another event's, which the API does not return (its message id differs),
//! but its read costs the same. `bench log` alone leaves `ECWID_EVENTS` empty, so its lookups
//! read the record only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use model::record::{Attempt, Record, Status};
use shared::eventlog::{self};

/// Acks in flight while filling.
const WINDOW: usize = 4096;

/// What the lookups measured.
pub(crate) struct Lookups {
    pub(crate) records: u64,
    pub(crate) fill_secs: f64,
    pub(crate) by_id_us: Vec<u32>,
    pub(crate) by_object_us: Vec<u32>,
    /// The two reads a lookup by id makes, timed straight against NATS on the same ids once
    /// nats-server has dropped the blocks the lookups loaded (its cache lets go of a block
    /// idle for 10 s): the record, then its envelope. Which of them makes the tail.
    pub(crate) cold_record_us: Vec<u32>,
    pub(crate) cold_envelope_us: Vec<u32>,
    /// Then the same lookups by id through the API once more: what they cost once nats-server
    /// has met their blocks before.
    pub(crate) again_us: Vec<u32>,
}

/// How long nats-server keeps a block it loaded once nobody reads it (its
/// `defaultCacheBufferExpiration`, 10 s), and a margin.
const BLOCK_CACHE_IDLE: Duration = Duration::from_secs(12);

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

/// The sequences `ECWID_EVENTS` holds.
type Envelopes = std::ops::RangeInclusive<u64>;

/// The envelope record `i` points at: the `i mod stored`-th one `ECWID_EVENTS` holds.
fn envelope_seq(i: u64, envelopes: &Envelopes) -> u64 {
    let stored = (envelopes.end() + 1).saturating_sub(*envelopes.start());
    envelopes.start() + i % stored.max(1)
}

fn record(i: u64, objects: u64, envelopes: &Envelopes, now_ms: i64) -> Record {
    let at = model::time_fmt::unix_ms_to_rfc3339(now_ms);
    let mut r = Record {
        id: id_of(i),
        instance_id: Some("bench-log-instance".to_owned()),
        store_id: "9999".to_owned(),
        object_type: "orders".to_owned(),
        object_id: object_of(i, objects),
        event_type: "UPDATED".to_owned(),
        ecwid_event_id: format!("bench-log-{i}"),
        format: "v3".to_owned(),
        verified: true,
        request_id: format!("{i:032x}"),
        received_at: at.clone(),
        status: Status::Delivered,
        delivered_at: Some(at.clone()),
        envelope_seq: Some(envelope_seq(i, envelopes)),
        ..Record::default()
    };
    r.push_attempt(Attempt {
        number: 1,
        started_at: at,
        duration_ms: 3,
        status: Some(200),
        error_class: None,
        error: None,
        response: "{\"ok\":true}".to_owned(),
    });
    r
}

/// Publishes `n` records and their index entries, `WINDOW` acks in flight. Returns the
/// sequences of `ECWID_EVENTS` their envelopes point at.
async fn fill(js: &jetstream::Context, n: u64, objects: u64) -> anyhow::Result<Envelopes> {
    let now_ms = model::time_fmt::now_unix_ms();
    let mut events = js.get_stream(shared::nats::EVENTS_STREAM).await?;
    let held = &events.info().await?.state;
    let envelopes = held.first_sequence.max(1)..=held.last_sequence;
    let mut acks = FuturesUnordered::new();
    for i in 0..n {
        let r = record(i, objects, &envelopes, now_ms);
        let entry = serde_json::to_vec(&shared::eventlog::index_entry(&r))?;
        let body = serde_json::to_vec(&r)?;
        for (subject, payload) in [
            (shared::eventlog::record_index_subject(&r), entry),
            (eventlog::record_subject(&r.id), body),
        ] {
            let ack = js.publish(subject, payload.into()).await?;
            acks.push(async move { ack.await });
            while acks.len() >= WINDOW {
                acks.next().await.context("ack")??;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(envelopes)
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

/// Waits (at most 60 s) until nats-server has finished with the bulk fill, a million records in
/// well under a minute, far above any steady write rate: until it uses less than a tenth of a
/// core over a second. The lookups are timed against the log at size, not against that burst.
async fn settle(nats_pid: u32) {
    let cpu = || crate::procinfo::read(nats_pid).map_or(0.0, |u| u.cpu_secs);
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut last = cpu();
    while Instant::now() < give_up {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu();
        if now - last < 0.1 {
            return;
        }
        last = now;
    }
}

/// Fills the log with `n` records, then times `samples` lookups of each kind against `admin`.
pub(crate) async fn measure(
    nats_url: &str,
    admin: SocketAddr,
    nats_pid: u32,
    token: &str,
    n: u64,
    samples: u64,
) -> anyhow::Result<Lookups> {
    let js = jetstream::new(integration_tests::connect(nats_url).await);
    let objects = (n / 5).max(1);
    let started = Instant::now();
    let envelopes = fill(&js, n, objects).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    settle(nats_pid).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // Spread over the whole log, oldest to newest, by a fixed stride (repeatable).
    let stride = (n / samples.max(1)).max(1) | 1;
    let picks: Vec<u64> = (0..samples).map(|k| (k * stride * 7919) % n).collect();
    let mut by_id = Vec::new();
    let mut by_object = Vec::new();
    for &i in &picks {
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
    }
    tokio::time::sleep(BLOCK_CACHE_IDLE).await;
    let log = js.get_stream_no_info(eventlog::LOG_STREAM).await?;
    let events = js.get_stream_no_info(shared::nats::EVENTS_STREAM).await?;
    let (mut cold_record, mut cold_envelope) = (Vec::new(), Vec::new());
    for &i in &picks {
        let started = Instant::now();
        log.direct_get_last_for_subject(eventlog::record_subject(&id_of(i)))
            .await?;
        cold_record.push(elapsed_us(started));
        let started = Instant::now();
        // Not found when the pipeline phases left no envelope: then nothing is timed.
        if events.direct_get(envelope_seq(i, &envelopes)).await.is_ok() {
            cold_envelope.push(elapsed_us(started));
        }
    }
    let mut again = Vec::new();
    for &i in &picks {
        again.push(timed_get(&http, &format!("http://{admin}/events/{}", id_of(i)), token).await?);
    }
    for v in [
        &mut by_id,
        &mut by_object,
        &mut cold_record,
        &mut cold_envelope,
        &mut again,
    ] {
        v.sort_unstable();
    }
    Ok(Lookups {
        records: n,
        fill_secs,
        by_id_us: by_id,
        by_object_us: by_object,
        cold_record_us: cold_record,
        cold_envelope_us: cold_envelope,
        again_us: again,
    })
}

/// What finding a record's index entry by id alone would cost (`bench log` only): the read path
/// a log without the normalizer's pending snapshot would need for events never attempted and
/// for every 404 (RESULTS.md, "Next steps"). Times `samples` of each of the two ways JetStream
/// offers over the log `measure` filled: the subjects matching `ecwid.logidx.*.*.*.<id>` (a
/// stream info request, the subject tree matched with three leading wildcards), and a direct
/// get of the last message on that wildcard subject.
pub(crate) async fn find_by_id(
    nats_url: &str,
    n: u64,
    samples: u64,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let js = jetstream::new(integration_tests::connect(nats_url).await);
    let index = js.get_stream(eventlog::INDEX_STREAM).await?;
    let stride = (n / samples.max(1)).max(1) | 1;
    let (mut listed, mut direct) = (Vec::new(), Vec::new());
    for k in 0..samples {
        let id = id_of((k * stride * 104_729 + 1) % n);
        let filter = eventlog::index_subject("*", "*", "*", &id);
        let started = Instant::now();
        let mut subjects = index.info_with_subjects(&filter).await?;
        let mut found = 0;
        while let Some(next) = subjects.next().await {
            next?;
            found += 1;
        }
        anyhow::ensure!(found == 1, "{filter}: {found} subjects");
        listed.push(elapsed_us(started));
        let started = Instant::now();
        index.direct_get_last_for_subject(&filter).await?;
        direct.push(elapsed_us(started));
    }
    listed.sort_unstable();
    direct.sort_unstable();
    Ok((listed, direct))
}
