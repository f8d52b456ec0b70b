//! On-demand backfills, asked by the ingest's admin API over core NATS request/reply
//! ([`shared::nats::BACKFILL_SUBJECT`], queue group [`shared::nats::POLLER_QUEUE`]: one replica
//! answers each request). Why here and not in the ingest: only the poller talks to Ecwid (one
//! egress rule, one shared request budget, one client), and the ingest stays free of Ecwid's
//! latency. A backfill polls its window once, for one instance, outside the store's lease and
//! without moving any cursor; its messages are deduplicated per (instance, entity version), so
//! the same window twice stores nothing new.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use model::ecwid::PollEntity;
use serde::{Deserialize, Serialize};
use shared::directory::Directory;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::PollError;
use crate::poll::{Allowance, Counts, Poller, Resume, Window};

/// Backfills one replica runs at once; more wait.
const CONCURRENT_BACKFILLS: usize = 4;

/// What the ingest asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub instance_id: String,
    /// Unix seconds, inclusive.
    pub since: i64,
    pub until: i64,
    /// objectTypes (`orders`, `abandonedCarts`, …); all the instance takes when absent.
    pub objects: Option<Vec<String>>,
}

/// The answer: counts, or an error with the HTTP status the admin API should answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    pub counts: Option<Counts>,
    pub error: Option<String>,
    /// `refused` (Ecwid refused the token or store), `invalid` (the request cannot run),
    /// `unavailable` (try again).
    pub kind: Option<String>,
}

pub async fn serve(
    client: async_nats::Client,
    poller: Poller,
    directory: Directory,
    cancel: CancellationToken,
) {
    let mut sub = match client
        .queue_subscribe(
            shared::nats::BACKFILL_SUBJECT,
            shared::nats::POLLER_QUEUE.into(),
        )
        .await
    {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "Cannot subscribe to backfill requests; backfills are unavailable.");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(CONCURRENT_BACKFILLS));
    loop {
        let message = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            () = cancel.cancelled() => return,
        };
        let Some(reply_to) = message.reply.clone() else {
            continue;
        };
        let (client, poller, directory, cancel, slots) = (
            client.clone(),
            poller.clone(),
            directory.clone(),
            cancel.clone(),
            Arc::clone(&slots),
        );
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            let reply = match serde_json::from_slice::<Request>(&message.payload) {
                Ok(request) => run(&poller, &directory, request, &cancel).await,
                Err(e) => error("invalid", format!("not a backfill request: {e}")),
            };
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(error) = client.publish(reply_to, body.into()).await {
                tracing::warn!(%error, "Could not answer a backfill request.");
            }
        });
    }
}

fn error(kind: &str, message: String) -> Reply {
    Reply {
        counts: None,
        error: Some(message),
        kind: Some(kind.to_owned()),
    }
}

async fn run(
    poller: &Poller,
    directory: &Directory,
    request: Request,
    cancel: &CancellationToken,
) -> Reply {
    let Some(instance) = directory.get(&request.instance_id) else {
        return error("invalid", format!("no instance {}", request.instance_id));
    };
    let (Some(store), Some(token)) = (instance.store_id(), instance.api_token()) else {
        return error(
            "invalid",
            "the instance has no store id or ecwid.api.token".into(),
        );
    };
    let wanted: Option<BTreeSet<String>> = request.objects.map(|o| o.into_iter().collect());
    let entities: Vec<PollEntity> = PollEntity::ALL
        .into_iter()
        .filter(|e| {
            let object_type = model::normalize::poll_object_type(*e);
            instance.accepts_object(&object_type)
                && wanted.as_ref().is_none_or(|w| w.contains(&object_type))
        })
        .collect();
    let mut counts = Counts::default();
    let mut allowance = Allowance::new(poller.cycle_max_pages, poller.cycle_max_time);
    // A backfill of an instance deleted meanwhile stops at the next page.
    let keep_going = || directory.get(&instance.id).is_some();
    for entity in entities {
        let window = Window {
            store,
            token,
            entity,
            from: request.since,
            to: request.until,
            skip_seen: instance.takes_webhooks(),
            named: Some(&instance.id),
            start: Resume::default(),
        };
        match poller
            .poll_window(&window, &mut allowance, &keep_going, cancel)
            .await
        {
            Ok((c, None)) => counts += c,
            Ok((c, Some(_))) => {
                counts += c;
                return error(
                    "invalid",
                    format!(
                        "the window holds more than one backfill reads ({} pages, \
                         POLLER_CYCLE_MAX_PAGES, or {} s, POLLER_CYCLE_MAX_MS); {} stored so \
                         far; ask again for shorter windows",
                        poller.cycle_max_pages,
                        poller.cycle_max_time.as_secs(),
                        counts.stored
                    ),
                );
            }
            Err(PollError::Refused { status, message }) => {
                return error("refused", format!("Ecwid answered {status}: {message}"))
            }
            Err(PollError::Cancelled) if directory.get(&instance.id).is_none() => {
                return error("invalid", "the instance was deleted meanwhile".into())
            }
            Err(e) => return error("unavailable", e.to_string()),
        }
    }
    tracing::info!(instance_id = %instance.id, store_id = store, stored = counts.stored, duplicates = counts.duplicates, "Backfill done.");
    Reply {
        counts: Some(counts),
        error: None,
        kind: None,
    }
}
