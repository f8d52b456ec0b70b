//! What happened to every webhook of a phase: when it was sent, what the ingest answered, and
//! its deliveries (counted by the envelope's `message.eventId`), with end-to-end latencies from
//! the moment the load generator sent the request to the moment a receiver got the delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench started (one monotonic clock for the sender and the receivers,
/// which share the process).
pub(crate) fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Debug, Default)]
struct Deliveries {
    by_event_id: HashMap<String, u32>,
    latencies_us: Vec<u32>,
    first_ns: u64,
    last_ns: u64,
}

/// One phase's ledger, sized for `capacity` webhooks.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub name: String,
    /// `now_ns() + 1` when sent; 0 when not.
    sent_at: Vec<AtomicU64>,
    /// The ingest's status; 0 when no answer.
    answer: Vec<AtomicU16>,
    delivered: Vec<AtomicU32>,
    deliveries: Mutex<Deliveries>,
}

/// A phase's ledger, summed up.
#[derive(Debug, Clone, Default)]
pub(crate) struct Summary {
    pub sent: u64,
    pub acked: u64,
    /// Acknowledged (200) and never delivered.
    pub lost: u64,
    /// Deliveries beyond the first of the same `message.eventId`.
    pub duplicates: u64,
    /// Not acknowledged (503, no answer) yet delivered: JetStream had stored it after all.
    pub delivered_unacked: u64,
    pub delivered: u64,
    /// End-to-end latencies of first deliveries, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    pub first_delivery_ns: u64,
    pub last_delivery_ns: u64,
}

impl Tracker {
    pub(crate) fn new(name: &str, capacity: usize) -> Self {
        Self {
            name: name.to_owned(),
            sent_at: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            answer: (0..capacity).map(|_| AtomicU16::new(0)).collect(),
            delivered: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            deliveries: Mutex::new(Deliveries::default()),
        }
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.sent_at.len() as u64
    }

    pub(crate) fn record_sent(&self, seq: u64) {
        if let Some(s) = self.sent_at.get(seq as usize) {
            s.store(now_ns() + 1, Ordering::Release);
        }
    }

    pub(crate) fn record_answer(&self, seq: u64, status: u16) {
        if let Some(a) = self.answer.get(seq as usize) {
            a.store(status, Ordering::Release);
        }
    }

    /// A delivery of webhook `seq` as envelope `message_event_id`, received at `at_ns`.
    pub(crate) fn record_delivery(&self, seq: u64, message_event_id: &str, at_ns: u64) {
        let Some(count) = self.delivered.get(seq as usize) else {
            return;
        };
        count.fetch_add(1, Ordering::AcqRel);
        let sent = self.sent_at[seq as usize].load(Ordering::Acquire);
        let mut d = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        let n = d
            .by_event_id
            .entry(message_event_id.to_owned())
            .or_insert(0);
        *n += 1;
        if *n == 1 && sent > 0 {
            let us = (at_ns.saturating_sub(sent - 1) / 1000).min(u32::MAX as u64) as u32;
            d.latencies_us.push(us);
        }
        if d.first_ns == 0 || at_ns < d.first_ns {
            d.first_ns = at_ns;
        }
        d.last_ns = d.last_ns.max(at_ns);
    }

    /// Acknowledged webhooks not delivered yet.
    pub(crate) fn missing(&self) -> u64 {
        self.answer
            .iter()
            .zip(&self.delivered)
            .filter(|(a, d)| a.load(Ordering::Acquire) == 200 && d.load(Ordering::Acquire) == 0)
            .count() as u64
    }

    /// Deliveries so far (all, duplicates included).
    pub(crate) fn deliveries(&self) -> u64 {
        self.delivered
            .iter()
            .map(|d| u64::from(d.load(Ordering::Acquire)))
            .sum()
    }

    pub(crate) fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for ((sent, answer), delivered) in
            self.sent_at.iter().zip(&self.answer).zip(&self.delivered)
        {
            let (sent, answer, delivered) = (
                sent.load(Ordering::Acquire),
                answer.load(Ordering::Acquire),
                delivered.load(Ordering::Acquire),
            );
            if sent > 0 {
                s.sent += 1;
            }
            if answer == 200 {
                s.acked += 1;
                if delivered == 0 {
                    s.lost += 1;
                }
            } else if delivered > 0 {
                s.delivered_unacked += 1;
            }
        }
        let d = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        s.delivered = d.by_event_id.len() as u64;
        s.duplicates = d
            .by_event_id
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum();
        s.latencies_us = d.latencies_us.clone();
        s.latencies_us.sort_unstable();
        s.first_delivery_ns = d.first_ns;
        s.last_delivery_ns = d.last_ns;
        s
    }
}

/// The `q` quantile (0..=1) of sorted microseconds, in milliseconds.
pub(crate) fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted_us[i.min(sorted_us.len() - 1)]) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_counts_lost_duplicates_and_unacknowledged() {
        let t = Tracker::new("t", 5);
        for seq in 0..4 {
            t.record_sent(seq);
        }
        t.record_answer(0, 200);
        t.record_answer(1, 200);
        t.record_answer(2, 200);
        t.record_answer(3, 503);
        t.record_delivery(0, "n-0", now_ns());
        t.record_delivery(0, "n-0", now_ns());
        t.record_delivery(1, "n-1", now_ns());
        t.record_delivery(3, "n-3", now_ns());
        assert_eq!(t.missing(), 1);
        let s = t.summary();
        assert_eq!((s.sent, s.acked, s.lost), (4, 3, 1));
        assert_eq!((s.delivered, s.duplicates, s.delivered_unacked), (3, 1, 1));
        assert_eq!(s.latencies_us.len(), 3, "first deliveries only");
    }

    #[test]
    fn quantiles() {
        let sorted: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(quantile_ms(&sorted, 0.5), 51.0);
        assert_eq!(quantile_ms(&sorted, 0.99), 99.0);
        assert_eq!(quantile_ms(&sorted, 1.0), 100.0);
        assert!(quantile_ms(&[], 0.5).is_nan());
    }
}
