//! The one-instance phases (issue 28): every webhook to one store, whose one instance has the
//! default limits (`event.notification.max.in.flight` 16, no rate limit), the common deployment
//! of one integration and one store. The other phases spread their load over four instances
//! whose limit is raised to 1000, so they never meet an instance's limit; these do.
//!
//! Two phases on the running pipeline: max load (closed loop) and 2,000/s, then the deliverer's
//! put-backs (`ecwid_deliver_deferred_total`, every reason) over the deliveries of both.

use std::sync::Arc;

use integration_tests::procs::sample_sum;

use crate::load::{Pace, Store, Webhooks};
use crate::track::quantile_ms;
use crate::{pipeline_phase, Ctx, Opts, Phase, Pipeline};

/// The phases' ledgers, after every other phase's.
pub(crate) const ONE_MAX: &str = "one instance (max)";
pub(crate) const ONE_PACED: &str = "one instance (2000/s)";
/// The paced phase's rate.
pub(crate) const ONE_RATE: f64 = 2000.0;

/// `deliverer::metrics::DEFERRED_TOTAL` (the bench does not link the deliverer): deliveries put
/// back without an attempt, by reason.
const DEFERRED_TOTAL: &str = "ecwid_deliver_deferred_total";

/// The store whose instance takes all of these phases' load.
const STORE: u64 = 7_100_001;

/// What the one-instance phases measured.
pub(crate) struct OneInstance {
    pub phases: [Phase; 2],
    /// Put-backs per delivery over both phases.
    pub putbacks_per_delivery: f64,
}

impl OneInstance {
    /// `one_instance_eps=… one_instance_p99_ms_at_2000=… putbacks_per_delivery=…`.
    pub(crate) fn fields(&self) -> String {
        format!(
            " one_instance_eps={:.0} one_instance_p99_ms_at_2000={:.1} putbacks_per_delivery={:.3}",
            self.phases[0].e2e_eps,
            quantile_ms(&self.phases[1].summary.latencies_us, 0.99),
            self.putbacks_per_delivery
        )
    }
}

/// Adds the store's instance (default limits, a receiver of its own) to `pipeline`, runs the two
/// phases and reads the deliverer's put-backs around them.
pub(crate) async fn run(opts: &Opts, pipeline: &mut Pipeline) -> anyhow::Result<OneInstance> {
    println!("\n## One instance, default limits");
    let store = Store {
        id: STORE,
        client_secret: "bench-client-secret-one".to_owned(),
    };
    let key = "bench-signature-key-one";
    let addr = crate::receive::start(
        key,
        pipeline.ctx.trackers.clone(),
        pipeline.anomalies.clone(),
    )
    .await?;
    pipeline
        .cluster
        .create_instance(
            &STORE.to_string(),
            &format!("http://{addr}/hook"),
            &[
                ("ecwid.client.secret", &store.client_secret),
                ("event.notification.signature.key", key),
            ],
        )
        .await;
    // One more instance: the idle phase counts its instances from here.
    pipeline.stores += 1;
    let index = |name: &str| {
        pipeline
            .ctx
            .trackers
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| anyhow::anyhow!("no ledger named {name}"))
    };
    let (max_index, paced_index) = (index(ONE_MAX)?, index(ONE_PACED)?);
    let ctx = Ctx {
        ingest: pipeline.ctx.ingest,
        webhooks: Arc::new(Webhooks::new(vec![store])),
        trackers: pipeline.ctx.trackers.clone(),
        pids: pipeline.ctx.pids.clone(),
        nats_monitor: pipeline.ctx.nats_monitor,
        connections: pipeline.ctx.connections,
        perf: None,
    };
    let deliverer = &pipeline.cluster.deliverers[0];
    let putbacks = |text: &str| sample_sum(text, DEFERRED_TOTAL, &[]);
    let before = putbacks(&deliverer.metrics().await);
    let max = pipeline_phase(&ctx, max_index, Pace::Max, opts.max_secs, &[], None).await;
    let paced = pipeline_phase(
        &ctx,
        paced_index,
        Pace::Rate(ONE_RATE),
        opts.fixed_secs,
        &[],
        None,
    )
    .await;
    let after = putbacks(&deliverer.metrics().await);
    let delivered = (max.summary.delivered + paced.summary.delivered).max(1);
    let putbacks_per_delivery = (after - before) / delivered as f64;
    println!(
        "one instance: {:.0} events/s delivered at max load; p99 {:.1} ms at {ONE_RATE}/s; {:.0} put-backs for {delivered} deliveries ({putbacks_per_delivery:.3} each)",
        max.e2e_eps,
        quantile_ms(&paced.summary.latencies_us, 0.99),
        after - before,
    );
    Ok(OneInstance {
        phases: [max, paced],
        putbacks_per_delivery,
    })
}
