//! Rough timing of the AllocateBatch bytes path without Python, in the scenario of
//! bench/load/batch_path.py (1,000 items, 5 variants segmented by source and device, an
//! iPhone/Instagram context, a new user id per item, a non-sticky experiment), and the same
//! batch with a different user agent in every item (nothing shared between items); then finish
//! with the new assignments held as the server holds them, in a bounded store that is full (every
//! new assignment evicts the oldest, as in a server after warm-up):
//! `cargo run --release -p allocsvc-core --example batch_timing`.
use allocsvc_core::batch::PreparedBatch;
use allocsvc_core::batch::{decode_batch, BatchLimits, Catalogue, ExperimentInfo, VariantInfo};
use allocsvc_core::context::{self, ContextLimits};
use allocsvc_core::held::Held;
use allocsvc_core::wire;
use allocsvc_core::{Engine, ExperimentConfig};
use std::collections::HashMap;

mod support;
use support::best_of;

const ITEMS: usize = 1000;
const CONTEXT: [(&str, &str); 3] = [
    ("utm_source", "instagram"),
    (
        "user_agent",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 \
         (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    ),
    ("country_code", "US"),
];

fn request(user: &str, user_agent: &str) -> Vec<u8> {
    request_in("e", user, user_agent)
}

fn request_in(experiment: &str, user: &str, user_agent: &str) -> Vec<u8> {
    let mut m = Vec::new();
    wire::put_str(&mut m, 1, experiment);
    wire::put_str(&mut m, 2, user);
    for (k, v) in CONTEXT {
        let v = if k == "user_agent" { user_agent } else { v };
        let mut e = Vec::new();
        wire::put_str(&mut e, 1, k);
        wire::put_str(&mut e, 2, v);
        wire::put_bytes(&mut m, 4, &e);
    }
    m
}

fn main() {
    let engine = Engine::new();
    let dimensions = ["source", "device"];
    let catalogue = Catalogue::new(BatchLimits {
        context: ContextLimits::default(),
        max_user_id_chars: 256,
        device_cache_size: 10_000,
    });
    // "e", and "s" the same but sticky.
    for (key, handle, sticky) in [("e", 1, false), ("s", 2, true)] {
        engine
            .configure(
                handle,
                ExperimentConfig::thompson(5, &dimensions, vec![100, 100]),
            )
            .unwrap();
        catalogue.put(ExperimentInfo {
            key: key.into(),
            handle,
            running: true,
            sticky,
            caller_segments: false,
            dimensions: dimensions.iter().map(|d| d.to_string()).collect(),
            variants: "ABCDE"
                .chars()
                .map(|v| VariantInfo {
                    id: v.to_string(),
                    name: String::new(),
                    payload_json: String::new(),
                })
                .collect(),
        });
    }
    let agents: Vec<String> = (0..ITEMS)
        .map(|i| format!("{} ({i})", CONTEXT[1].1))
        .collect();
    let mut learned: Vec<(&str, &str)> = agents.iter().map(|a| (a.as_str(), "mobile")).collect();
    learned.push((CONTEXT[1].1, "mobile"));
    catalogue.learn_devices(&learned).unwrap();
    let (mut data, mut varied, mut sticky) = (Vec::new(), Vec::new(), Vec::new());
    for (i, agent) in agents.iter().enumerate() {
        let user = format!("u{i}");
        wire::put_bytes(&mut data, 1, &request(&user, CONTEXT[1].1));
        wire::put_bytes(&mut varied, 1, &request(&user, agent));
        wire::put_bytes(&mut sticky, 1, &request_in("s", &user, CONTEXT[1].1));
    }
    let (given, errors): (HashMap<_, _>, HashMap<_, _>) = (HashMap::new(), HashMap::new());
    let per_item = |ns: f64| ns / ITEMS as f64;

    let (ns, acc) = best_of(50, || decode_batch(&data).unwrap().len());
    println!(
        "part: decode alone: {:.0} ns per item ({acc})",
        per_item(ns)
    );
    let raw = decode_batch(&data).unwrap();
    let (ns, acc) = best_of(50, || {
        raw.iter()
            .filter_map(|r| {
                context::extract(
                    r.channel,
                    &r.context,
                    &r.signals,
                    r.timestamp_ms,
                    1,
                    &ContextLimits::default(),
                )
            })
            .count()
    });
    println!(
        "part: extract alone: {:.0} ns per item ({acc})",
        per_item(ns)
    );
    let mut finishes = Vec::new();
    for (name, batch) in [
        ("one context", &data),
        ("a user agent per item", &varied),
        ("sticky experiment, one context", &sticky),
    ] {
        let (ns, acc) = best_of(50, || catalogue.prepare(batch, 1).unwrap().len());
        println!("{name}: prepare: {:.0} ns per item ({acc})", per_item(ns));
        let prepared = catalogue.prepare(batch, 1).unwrap();
        let (ns, acc) = best_of(50, || {
            let out = prepared
                .finish(
                    &engine, &catalogue, "local", "x", 1, 0, &given, &errors, true,
                )
                .unwrap();
            out.response.len()
        });
        println!(
            "{name}: finish: {:.0} ns per item ({acc} bytes)",
            per_item(ns)
        );
        finishes.push(per_item(ns));
    }
    // Finish without holding, one context: what holding adds to.
    let (finish_one, finish_varied) = (finishes[0], finishes[1]);
    // Finish and hold, as `PreparedBatch.finish` of the Python module does.
    let finish_and_hold = |prepared: &PreparedBatch, held: &mut Held, first_seq: u64| {
        let out = prepared
            .finish(
                &engine, &catalogue, "local", "x", first_seq, 0, &given, &errors, true,
            )
            .unwrap();
        held.add_made(&out.made);
        out.response.len() + out.made.len()
    };
    // The same 1,000 users in every batch (bench/load/h2.py's batch), a store of 1,000,000.
    let prepared = catalogue.prepare(&data, 1).unwrap();
    let mut held = Held::bounded("x", 1_000_000);
    let mut seq = 1;
    while held.evictions() == 0 {
        finish_and_hold(&prepared, &mut held, seq);
        seq += ITEMS as u64;
    }
    let (ns, acc) = best_of(50, || {
        seq += ITEMS as u64;
        finish_and_hold(&prepared, &mut held, seq - ITEMS as u64)
    });
    println!(
        "same users, store of 1,000,000 full: finish and hold: {:.0} ns per item ({acc}); holding {:.0} ns",
        per_item(ns),
        per_item(ns) - finish_one
    );
    // New users in every batch (128,000 in turn), a store of 100,000: each evicted assignment
    // is its user's only one.
    let batches: Vec<Vec<u8>> = (0..128)
        .map(|b| {
            let mut data = Vec::new();
            for i in 0..ITEMS {
                let user = format!("b{b}-u{i}");
                wire::put_bytes(&mut data, 1, &request(&user, CONTEXT[1].1));
            }
            data
        })
        .collect();
    let prepared: Vec<PreparedBatch> = batches
        .iter()
        .map(|b| catalogue.prepare(b, 1).unwrap())
        .collect();
    let mut held = Held::bounded("x", 100_000);
    let mut round = 0;
    while held.evictions() < 100_000 {
        finish_and_hold(&prepared[round % prepared.len()], &mut held, seq);
        seq += ITEMS as u64;
        round += 1;
    }
    let (ns, acc) = best_of(50, || {
        seq += ITEMS as u64;
        round += 1;
        finish_and_hold(
            &prepared[round % prepared.len()],
            &mut held,
            seq - ITEMS as u64,
        )
    });
    println!(
        "new users, store of 100,000 full: finish and hold: {:.0} ns per item ({acc}); holding {:.0} ns",
        per_item(ns),
        per_item(ns) - finish_one
    );
    let users: Vec<String> = (0..ITEMS).map(|i| format!("u{i}")).collect();
    let values = ["instagram", "mobile"];
    let rows: Vec<&[&str]> = vec![&values[..]; ITEMS];
    let (ns, acc) = best_of(50, || {
        let out = engine.decide_batch_rows(1, &users, &rows, true).unwrap();
        out.items.len()
    });
    println!(
        "part: decide_batch_rows: {:.0} ns per item ({acc}); finish with a user agent per item \
         beyond deciding: {:.0} ns",
        per_item(ns),
        finish_varied - per_item(ns)
    );
}
