//! The normalizer's pure path for one ~1 KB `order.updated` webhook: parse and map it
//! (`normalize_v3`, which also takes the raw payload), build one instance's envelope and serialize
//! it (`to_json`). No I/O.
//!
//! `cargo bench -p normalizer --bench normalize -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use model::normalize::{envelope, normalize_v3};

/// A realistic `order.updated` of about 1 KB: Ecwid's fields plus the kind of `data` a store
/// integration adds.
fn order_updated() -> Vec<u8> {
    let body = serde_json::json!({
        "eventId": "80aece08-40e8-4145-8764-6c2f0d38678",
        "eventCreated": 1_795_342_500,
        "storeId": 1003,
        "entityId": 22222,
        "eventType": "order.updated",
        "data": {
            "orderId": "XJ12H",
            "oldPaymentStatus": "AWAITING_PAYMENT",
            "newPaymentStatus": "PAID",
            "oldFulfillmentStatus": "AWAITING_PROCESSING",
            "newFulfillmentStatus": "SHIPPED",
            "customerEmail": "ec.apps@lightspeedhq.com",
            "total": 129.5,
            "currency": "USD",
            "items": [
                {"sku": "SKU-00017", "name": "Ceramic mug, 350 ml, matte black", "quantity": 2, "price": 14.25},
                {"sku": "SKU-00342", "name": "Pour-over coffee dripper, size 02", "quantity": 1, "price": 32.0},
                {"sku": "SKU-01007", "name": "Single-origin beans, Ethiopia Guji, 1 kg", "quantity": 2, "price": 34.5}
            ],
            "shippingPerson": {
                "name": "Ada Lovelace", "street": "12 St James's Square", "city": "London",
                "postalCode": "SW1Y 4JH", "countryCode": "GB", "phone": "+44 20 7946 0000"
            },
            "shippingOption": {"shippingMethodName": "Royal Mail Tracked 48", "shippingRate": 4.0},
            "orderComments": "Please leave the parcel with the concierge if nobody answers the door."
        }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let body = order_updated();
    let mut group = c.benchmark_group("normalize");
    group.throughput(Throughput::Elements(1));
    group.bench_function(
        format!("normalize_v3 ({} B order.updated)", body.len()),
        |b| b.iter(|| normalize_v3(black_box(&body))),
    );
    let normalized = normalize_v3(&body).ok();
    group.bench_function("envelope + to_json (one instance)", |b| {
        b.iter(|| match &normalized {
            Some(n) => envelope(n, black_box("inst-1"), true).to_json(),
            None => Vec::new(),
        })
    });
    group.bench_function("whole pure path (normalize + envelope + to_json)", |b| {
        b.iter(|| {
            let body = black_box(&body);
            match normalize_v3(body) {
                Ok(n) => envelope(&n, "inst-1", true).to_json(),
                Err(_) => Vec::new(),
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
