//! The test harness itself: what the other suites rely on when they start services as processes.

use std::net::TcpListener;

use integration_tests::procs::*;
use integration_tests::*;

/// `free_port` finds a port free, and another process may bind it before the service does (a
/// clean-clone `make test` failed once that way). A first start that loses its port moves to
/// fresh ones instead of failing the test; the service is then ready where the harness says.
#[tokio::test]
async fn a_port_taken_before_the_first_start_moves_the_service_to_free_ones() {
    let nats = NatsServer::start().await;
    let mut proc = ServiceProc::new(Service::Normalizer, process_env(&nats.url(), &[]));
    let taken = proc.ops;
    let _squatter = TcpListener::bind(taken).expect("take the service's port first");
    proc.spawn();
    proc.wait_ready().await;
    assert_ne!(proc.ops, taken, "{}", proc.log_tail(10));
    assert_eq!(proc.starts, 2, "{}", proc.log_tail(10));
    assert!(
        proc.log_tail(40).contains("Address already in use"),
        "the first start should have met the taken port:\n{}",
        proc.log_tail(40)
    );
    assert!(
        !proc.metrics().await.is_empty(),
        "the service answers on its new port"
    );
}
