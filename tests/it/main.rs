//! The integration tests, one binary (the harness links once; svix-webhooks' `tests/it`
//! layout): a module per suite, each against a real `nats-server` (and real HTTP receivers, a
//! fake Ecwid REST API, the services in-process or as processes) started by the test itself.
//! Run one suite with `cargo test -p integration-tests --test it <suite>::`.

mod app;
mod cluster;
mod config_exit;
mod console;
mod control;
mod delivery;
mod eventlog;
mod eventlog_pg;
mod fanout;
mod faults;
mod hardening;
mod harness;
mod ingest;
mod ingest_props;
mod limits;
mod openapi;
mod ordered;
mod pipeline;
mod poller;
mod receivers;
mod retry_schedule;
mod run_local;
mod sigterm;
mod topology;
mod traces;
