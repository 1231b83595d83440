//! Rough timing of the core without Python, in the scenario of bench/test_bench_core.py (a
//! 3-level cascade whose nodes all hold the posterior, 5 variants): `cargo run --release -p
//! allocsvc-core --example decide_timing`.
use allocsvc_core::keys::{key_hash, path_keys};
use allocsvc_core::{Engine, ExperimentConfig};
use std::time::Instant;

mod support;
use support::best_of;

const POSTERIOR: [(u64, u64); 5] = [
    (10_000, 500),
    (10_000, 520),
    (10_000, 480),
    (10_000, 610),
    (10_000, 450),
];

fn main() {
    let engine = Engine::new();
    let dimensions = ["country", "device", "source"];
    let values = ["us", "mobile", "instagram"];
    engine
        .configure(
            1,
            ExperimentConfig::thompson(5, &dimensions, vec![1000, 500, 200]),
        )
        .unwrap();
    let rows: Vec<_> = path_keys(&dimensions, &values)
        .unwrap()
        .iter()
        .flat_map(|k| {
            POSTERIOR
                .iter()
                .enumerate()
                .map(move |(v, &(n, c))| (1, key_hash(k), v as u32, n, c, 0.0))
        })
        .collect();
    engine.store().load(&rows, false);
    assert_eq!(engine.decide(1, "u", &values, false).unwrap().level, 3);
    let mut key = String::new();
    for record in [false, true] {
        let (ns, acc) = best_of(200_000, || {
            engine
                .decide_into(1, "user-1", &values, record, &mut key)
                .unwrap()
                .0
        });
        println!("decide record={record}: {ns:.0} ns per decision ({acc})");
    }
    // For comparison: the Beta draws a decision no longer makes (it picks by the kept state's
    // selection probabilities, the same distribution), and the key building it does make.
    let (ns, acc) = best_of(200_000, || {
        allocsvc_core::beta::with_thread_sampler(|rng, memo| {
            let mut best = 0;
            let mut best_score = f64::NEG_INFINITY;
            for (i, &(n, c)) in POSTERIOR.iter().enumerate() {
                let a = 1.0 + c as f64 + 5.0;
                let b = 1.0 + (n - c) as f64 + 5.0;
                let x = allocsvc_core::beta::beta_sample_memo(rng, memo, a, b);
                if x > best_score {
                    best_score = x;
                    best = i;
                }
            }
            best
        })
    });
    println!("not a part: 5 memo Beta draws + argmax: {ns:.0} ns ({acc})");
    let (ns, acc) = best_of(200_000, || {
        key.clear();
        let mut h = 0;
        for (d, v) in dimensions.iter().zip(values) {
            key.push_str(d);
            allocsvc_core::keys::push_canonical_value(v, &mut key);
            h ^= key_hash(&key);
        }
        h as usize & 1
    });
    println!("part: key building and 3 hashes: {ns:.0} ns ({acc})");
    let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let batch: Vec<&[&str]> = vec![&values[..]; 1000];
    for record in [false, true] {
        let (ns, acc) = best_of(200, || {
            let out = engine.decide_batch_rows(1, &users, &batch, record).unwrap();
            out.items.iter().map(|x| x.0).sum::<usize>()
        });
        println!(
            "batch record={record}: {:.0} ns per item ({acc})",
            ns / 1000.0
        );
    }
    let t = Instant::now();
    let mut s = 0.0;
    allocsvc_core::beta::with_thread_rng(|rng| {
        for _ in 0..10_000_000 {
            s += allocsvc_core::beta::beta_sample(rng, 30.0, 970.0);
        }
    });
    println!("beta: {:.1} M/s ({s})", 10.0 / t.elapsed().as_secs_f64());
}
