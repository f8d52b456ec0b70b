//! A retry schedule that cannot be kept is refused where it is set: its last retry would come
//! after `ECWID_EVENTS` dropped the envelope (7 days), or a wait too long for the NATS server to
//! hold would be retried at once. The admin API answers 422 naming the field; the deliverer
//! exits 64 naming `DELIVER_RETRY_SCHEDULE`. An instance's schedule must also end before the event
//! log drops its records (`EVENT_LOG_RETENTION`), as the deliverer's is checked at start-up.

use std::time::Duration;

use integration_tests::procs::binary;
use integration_tests::*;
use reqwest::Method;
use serde_json::json;
use tokio::process::Command;

const FIELD: &str = "configuration.event.notification.retry.schedule";

/// Schedules no instance and no deliverer may have: a wait NATS cannot hold, one past the
/// retention, one past it only with its jitter, and a zero wait.
const UNKEEPABLE: [&str; 4] = ["3000000000h", "8d", "3d,3d", "5s,0s"];

#[tokio::test]
async fn the_admin_api_refuses_schedules_that_outlive_the_events() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[]).await;
    let instance = |schedule: &str| {
        json!({"element": {"key": "ecwid"}, "name": "schedules",
               "configuration": {"ecwid.store.id": "4101", "event.notification.enabled": "true",
                                 "event.notification.callback.url": "https://hooks.example.com/x",
                                 FIELD.trim_start_matches("configuration."): schedule}})
    };
    for schedule in UNKEEPABLE {
        let (status, body) = pipeline
            .admin_request(Method::POST, "/instances", Some(instance(schedule)))
            .await;
        assert_eq!(status, 422, "{schedule}: {body}");
        assert_eq!(body["field"], FIELD, "{schedule}: {body}");
    }
    // The longest sensible schedule (the default one) is taken, and a PATCH cannot spoil it.
    let (status, created) = pipeline
        .admin_request(
            Method::POST,
            "/instances",
            Some(instance("5s,30s,2m,10m,30m,1h,2h,4h,8h,9h")),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let path = format!("/instances/{}", created["id"].as_str().unwrap());
    for schedule in UNKEEPABLE {
        let patch =
            json!({"configuration": {FIELD.trim_start_matches("configuration."): schedule}});
        let (status, body) = pipeline
            .admin_request(Method::PATCH, &path, Some(patch))
            .await;
        assert_eq!(status, 422, "PATCH {schedule}: {body}");
        assert_eq!(body["field"], FIELD, "PATCH {schedule}: {body}");
    }
    let (status, shown) = pipeline.admin_request(Method::GET, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        shown["configuration"][FIELD.trim_start_matches("configuration.")],
        "5s,30s,2m,10m,30m,1h,2h,4h,8h,9h"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn a_deliverer_schedule_that_outlives_the_events_exits_64() {
    for schedule in UNKEEPABLE {
        let run = Command::new(binary("deliverer"))
            .env_clear()
            .env("DELIVER_RETRY_SCHEDULE", schedule)
            // Unreachable: a deliverer that got past its config would keep trying to connect.
            .env("NATS_URL", "nats://127.0.0.1:1")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap_or_else(|_| panic!("{schedule}: the deliverer started instead of exiting"))
            .expect("the deliverer runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{schedule}: {stderr}");
        assert!(
            stderr.contains("DELIVER_RETRY_SCHEDULE"),
            "{schedule}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_admin_api_refuses_schedules_that_outlast_the_event_log() {
    let nats = NatsServer::start().await;
    let pipeline = Pipeline::start(&nats.url(), &[("EVENT_LOG_RETENTION", "2h")]).await;
    let key = FIELD.trim_start_matches("configuration.");
    let instance = |schedule: &str| {
        json!({"element": {"key": "ecwid"}, "name": "retention",
               "configuration": {"ecwid.store.id": "4102", "event.notification.enabled": "true",
                                 "event.notification.callback.url": "https://hooks.example.com/x",
                                 key: schedule}})
    };
    // Two hours and a minute: the stream would keep it (7 days), the log would not.
    let outlasting = "1h,1h,1m";
    let (status, body) = pipeline
        .admin_request(Method::POST, "/instances", Some(instance(outlasting)))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], FIELD, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("EVENT_LOG_RETENTION")),
        "{body}"
    );

    let (status, created) = pipeline
        .admin_request(Method::POST, "/instances", Some(instance("1h,59m")))
        .await;
    assert_eq!(status, 201, "{created}");
    let path = format!("/instances/{}", created["id"].as_str().unwrap());
    let (status, body) = pipeline
        .admin_request(
            Method::PATCH,
            &path,
            Some(json!({"configuration": {key: outlasting}})),
        )
        .await;
    assert_eq!(status, 422, "PATCH: {body}");
    assert_eq!(body["field"], FIELD, "PATCH: {body}");
    pipeline.stop().await;
}
