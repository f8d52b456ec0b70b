//! The dead-letter API (admin listener, bearer token): list with filters and pages, show one,
//! replay (one, several, or all matching a filter) and delete.
//!
//! Replay republishes a dead letter to the subject it came from, as a new message (so it has a
//! fresh attempt budget), with `Nats-Msg-Id = replay:<seq>`: replaying the same dead letter twice
//! stores it once. The dead letter is deleted once the republish is acknowledged.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, message::StreamMessage};
use async_nats::HeaderMap;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::StreamExt;
use model::time_fmt::Rfc3339Time;
use serde::Deserialize;
use serde_json::{json, Value};
use shared::nats::{headers, DEAD_PREFIX, DEAD_STREAM};
use tracing::Instrument;

use crate::state::AdminState;
use shared::http::{self as error, ApiError, ApiId, ApiQuery, JS_TIMEOUT};

const MAX_REPLAY: usize = 1000;

/// The dead-letter routes, mounted by [`crate::router`] behind the token.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/replay", post(replay))
        .route("/dead-letters/{seq}", get(show).delete(remove))
}

/// Which dead letters a list or a replay is about.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// `normalize` or `deliver`.
    pub stage: Option<String>,
    /// Instance id (deliver stage).
    pub instance: Option<String>,
    /// Store id (normalize stage).
    pub store: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<Rfc3339Time>,
    /// Dead-lettered before.
    pub until: Option<Rfc3339Time>,
    /// Page cursor: only sequences greater than this.
    pub after: Option<u64>,
    pub limit: Option<usize>,
}

impl Filter {
    fn subject(&self) -> Result<String, ApiError> {
        let stage = match self.stage.as_deref() {
            None => "*",
            Some(s @ ("normalize" | "deliver")) => s,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("stage must be normalize or deliver, not `{other}`"),
                ))
            }
        };
        let id = match (self.instance.as_deref(), self.store.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    "give instance or store, not both",
                ))
            }
            (Some(id), None) | (None, Some(id)) => {
                if !shared::nats::is_subject_token(id) {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        "instance or store is not a valid id",
                    ));
                }
                id
            }
            (None, None) => "*",
        };
        Ok(format!("{DEAD_PREFIX}.{stage}.{id}"))
    }
}

async fn dead_stream(state: &AdminState) -> Result<jetstream::stream::Stream, ApiError> {
    error::within(
        "Reading the dead letters",
        state.inner.ctx.js.get_stream(DEAD_STREAM),
    )
    .await
}

/// Reads the dead letters matching `filter`, oldest first, up to `limit`. Returns them and
/// whether more match.
async fn scan(
    state: &AdminState,
    filter: &Filter,
    limit: usize,
) -> Result<(Vec<StreamMessage>, bool), ApiError> {
    let subject = filter.subject()?;
    let since = filter.since.map(Rfc3339Time::to_offset);
    let until = filter.until.map(Rfc3339Time::to_offset);
    let deliver_policy = match (filter.after, since) {
        (Some(after), _) => DeliverPolicy::ByStartSequence {
            start_sequence: after.checked_add(1).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    "after is past the last sequence there can be",
                )
            })?,
        },
        (None, Some(start_time)) => DeliverPolicy::ByStartTime { start_time },
        (None, None) => DeliverPolicy::All,
    };
    let stream = dead_stream(state).await?;
    let unavailable = |e: String| ApiError::Unavailable(e);
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut remaining = consumer
        .info()
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .num_pending;
    let mut found = Vec::new();
    if remaining == 0 {
        return Ok((found, false));
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    while remaining > 0 {
        let next = tokio::time::timeout(JS_TIMEOUT, messages.next()).await;
        let message = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(unavailable(e.to_string())),
            Ok(None) | Err(_) => {
                return Err(unavailable("reading the dead letters timed out".into()))
            }
        };
        let info = message.info().map_err(|e| unavailable(e.to_string()))?;
        remaining = info.pending;
        if until.is_some_and(|u| info.published >= u) {
            return Ok((found, false));
        }
        if found.len() == limit {
            return Ok((found, true));
        }
        found.push(StreamMessage {
            subject: message.subject.clone(),
            sequence: info.stream_sequence,
            headers: message.headers.clone().unwrap_or_default(),
            payload: message.payload.clone(),
            time: info.published,
        });
    }
    Ok((found, false))
}

fn header(h: &HeaderMap, name: async_nats::HeaderName) -> Option<String> {
    shared::nats::header(Some(h), name).map(str::to_owned)
}

/// A dead letter as JSON: where and why, plus the payload (JSON, or base64 when not JSON).
fn describe(m: &StreamMessage, with_payload: bool) -> Value {
    let h = &m.headers;
    let parts: Vec<&str> = m.subject.as_str().splitn(4, '.').collect();
    let mut v = json!({
        "seq": m.sequence,
        "subject": m.subject.as_str(),
        "stage": parts.get(2),
        "id": parts.get(3),
        "reason": header(h, headers::DEAD_REASON),
        "error": header(h, headers::DEAD_ERROR),
        "deadAt": header(h, headers::DEAD_AT),
        "attempts": header(h, headers::DEAD_ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
        "firstAttemptAt": header(h, headers::DEAD_FIRST_ATTEMPT_AT),
        "lastAttemptAt": header(h, headers::DEAD_LAST_ATTEMPT_AT),
        "lastStatus": header(h, headers::DEAD_LAST_STATUS),
        "originalSubject": header(h, headers::ORIGINAL_SUBJECT),
        "requestId": header(h, headers::REQUEST_ID),
        "size": m.payload.len(),
    });
    if with_payload {
        v["payload"] = match serde_json::from_slice::<Value>(&m.payload) {
            Ok(json) => json,
            Err(_) => {
                json!({"base64": base64::engine::general_purpose::STANDARD.encode(&m.payload)})
            }
        };
    }
    v
}

async fn list(
    State(state): State<AdminState>,
    ApiQuery(filter): ApiQuery<Filter>,
) -> Result<Json<Value>, ApiError> {
    let limit = error::page_limit(filter.limit, 100)?;
    let (found, more) = scan(&state, &filter, limit).await?;
    let next = if more {
        found.last().map(|m| m.sequence)
    } else {
        None
    };
    Ok(Json(json!({
        "deadLetters": found.iter().map(|m| describe(m, false)).collect::<Vec<_>>(),
        "next": next,
    })))
}

async fn get_one(state: &AdminState, seq: u64) -> Result<StreamMessage, ApiError> {
    let missing = || ApiError::NotFound {
        code: "not_found",
        message: format!("no dead letter {seq}"),
    };
    // Sequences start at 1; JetStream answers 0 with an error, not with "no message".
    if seq == 0 {
        return Err(missing());
    }
    let stream = dead_stream(state).await?;
    match tokio::time::timeout(JS_TIMEOUT, stream.get_raw_message(seq)).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            Err(missing())
        }
        Ok(Err(e)) => Err(ApiError::Unavailable(e.to_string())),
        Err(_) => Err(ApiError::Unavailable("JetStream did not answer".into())),
    }
}

async fn show(
    State(state): State<AdminState>,
    ApiId(seq): ApiId<u64>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(describe(&get_one(&state, seq).await?, true)))
}

async fn remove(
    State(state): State<AdminState>,
    ApiId(seq): ApiId<u64>,
) -> Result<StatusCode, ApiError> {
    get_one(&state, seq).await?;
    let stream = dead_stream(&state).await?;
    stream
        .delete_message(seq)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    tracing::info!(seq, "Dead letter deleted.");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /dead-letters/replay`: `{"seq": 12}`, `{"seqs": [12, 13]}`, a filter
/// (`{"stage": "deliver", "instance": "…", "since": "…"}`), or `{"all": true}`; up to 1000 a
/// call. What is replayed must be said: an empty body, `{}` or `{"seqs": []}` is a 422, not
/// "everything" (a script that builds an empty list must not replay and remove every letter).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReplayRequest {
    seq: Option<u64>,
    seqs: Option<Vec<u64>>,
    #[serde(default)]
    all: bool,
    stage: Option<String>,
    instance: Option<String>,
    store: Option<String>,
    since: Option<Rfc3339Time>,
    until: Option<Rfc3339Time>,
}

/// Which dead letters a replay names: listed, or matching a filter (the empty filter only when
/// `"all": true` said so).
#[derive(Debug)]
enum Selection {
    Listed(Vec<u64>),
    Matching(Filter),
}

impl ReplayRequest {
    fn selection(self) -> Result<Selection, ApiError> {
        let filter = Filter {
            stage: self.stage,
            instance: self.instance,
            store: self.store,
            since: self.since,
            until: self.until,
            after: None,
            limit: None,
        };
        let filtered = filter.stage.is_some()
            || filter.instance.is_some()
            || filter.store.is_some()
            || filter.since.is_some()
            || filter.until.is_some();
        let listed = self.seq.is_some() || self.seqs.is_some();
        if listed && (filtered || self.all) {
            return Err(ApiError::unprocessable(
                "seqs",
                "name dead letters by seq/seqs, or by a filter or \"all\": true, not both",
            ));
        }
        if filtered && self.all {
            return Err(ApiError::unprocessable(
                "all",
                "\"all\": true replays every dead letter; drop it to replay what the filter matches",
            ));
        }
        if listed {
            let seqs: Vec<u64> = self
                .seq
                .into_iter()
                .chain(self.seqs.into_iter().flatten())
                .collect();
            if seqs.is_empty() {
                return Err(ApiError::unprocessable(
                    "seqs",
                    "is empty: name at least one dead letter (to replay every one, send {\"all\": true})",
                ));
            }
            if seqs.len() > MAX_REPLAY {
                return Err(ApiError::unprocessable(
                    "seqs",
                    format!("at most {MAX_REPLAY} a call"),
                ));
            }
            if seqs.contains(&0) {
                return Err(ApiError::unprocessable("seq", "sequences start at 1"));
            }
            return Ok(Selection::Listed(seqs));
        }
        if !filtered && !self.all {
            return Err(ApiError::unprocessable(
                "body",
                "say which dead letters to replay: seq, seqs, a filter (stage, instance, store, \
                 since, until) or \"all\": true",
            ));
        }
        Ok(Selection::Matching(filter))
    }
}

async fn replay(State(state): State<AdminState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        shared::http::parse_json(&body)?
    };
    let (seqs, more) = match request.selection()? {
        Selection::Listed(seqs) => (seqs, false),
        Selection::Matching(filter) => {
            let (found, more) = scan(&state, &filter, MAX_REPLAY).await?;
            (found.iter().map(|m| m.sequence).collect(), more)
        }
    };
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for seq in seqs {
        match replay_one(&state, seq).await {
            Ok(()) => replayed.push(seq),
            Err(e) => {
                failed.push(json!({"seq": seq, "error": e.code(), "message": e.public_message()}))
            }
        }
    }
    tracing::info!(
        replayed = replayed.len(),
        failed = failed.len(),
        "Dead letters replayed."
    );
    Ok(Json(
        json!({"replayed": replayed, "failed": failed, "more": more}),
    ))
}

async fn replay_one(state: &AdminState, seq: u64) -> Result<(), ApiError> {
    let letter = get_one(state, seq).await?;
    let h = &letter.headers;
    let target = header(h, headers::ORIGINAL_SUBJECT)
        .filter(|s| shared::nats::is_work_subject(s))
        .ok_or_else(|| {
            ApiError::unprocessable("seq", "the dead letter does not say where it came from")
        })?;
    let mut out = HeaderMap::new();
    headers::carry(h, &mut out);
    out.insert(headers::MSG_ID, format!("replay:{seq}"));
    out.insert(headers::REPLAYED_FROM, seq.to_string());
    // The replay is a trace of its own, linked to the event's; the message keeps the event's
    // context, so its processing goes on in the event's trace.
    let span = shared::nats::publish_root_span(
        shared::nats::work_stream(&target),
        &target,
        &format!("replay:{seq}"),
    );
    shared::otel::link_to_headers(&span, Some(h));
    shared::nats::publish(
        &state.inner.ctx.js,
        target,
        out,
        letter.payload.clone(),
        JS_TIMEOUT,
    )
    .instrument(span)
    .await
    .map_err(|e| ApiError::Unavailable(shared::http::error_chain(&e)))?;
    let stream = dead_stream(state).await?;
    if let Err(error) = stream.delete_message(seq).await {
        // The republish is stored; a second replay of this letter is dropped as a duplicate.
        tracing::warn!(%error, seq, "Replayed dead letter could not be deleted.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(body: &str) -> Result<Selection, ApiError> {
        let request: ReplayRequest = if body.is_empty() {
            ReplayRequest::default()
        } else {
            shared::http::parse_json(body.as_bytes())?
        };
        request.selection()
    }

    #[test]
    fn a_replay_must_say_what_it_replays() {
        for unsaid in [
            "",
            "{}",
            r#"{"seqs": []}"#,
            r#"{"all": false}"#,
            r#"{"seq": 1, "all": true}"#,
            r#"{"seqs": [1], "stage": "deliver"}"#,
            r#"{"all": true, "stage": "deliver"}"#,
            r#"{"seqs": [0]}"#,
        ] {
            let e = selection(unsaid).expect_err(unsaid);
            assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY, "{unsaid}");
        }
        let too_many = format!(r#"{{"seqs": [{}]}}"#, vec!["7"; MAX_REPLAY + 1].join(","));
        assert!(selection(&too_many).is_err());
        assert!(matches!(
            selection(r#"{"seq": 3, "seqs": [4]}"#),
            Ok(Selection::Listed(s)) if s == [3, 4]
        ));
        assert!(matches!(
            selection(r#"{"all": true}"#),
            Ok(Selection::Matching(f)) if f.stage.is_none() && f.instance.is_none()
        ));
        assert!(matches!(
            selection(r#"{"stage": "deliver"}"#),
            Ok(Selection::Matching(f)) if f.stage.as_deref() == Some("deliver")
        ));
    }
}
