//! Rough timing of the core without Python: `cargo run --release --example decide_timing`.
use allocsvc_core::{Engine, ExperimentConfig, Policy};
use std::time::Instant;

fn main() {
    let engine = Engine::new();
    engine
        .configure(
            1,
            ExperimentConfig {
                variants: 5,
                dimensions: vec!["country".into(), "device".into(), "source".into()],
                min_samples: vec![1000, 500, 200],
                policy: Policy::Thompson,
                weights: vec![],
                prior_alpha: 1.0,
                prior_beta: 1.0,
                warm_start: 10.0,
                exploration: 0.0,
                salt: 0,
            },
        )
        .unwrap();
    let values = ["us", "mobile", "instagram"];
    for _ in 0..5000 {
        engine.decide(1, "u", &values, true).unwrap();
    }
    for record in [false, true] {
        let n = 1_000_000;
        let t = Instant::now();
        let mut acc = 0;
        for _ in 0..n {
            acc += engine.decide(1, "u", &values, record).unwrap().variant;
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("record={record}: {ns:.0} ns per decision ({acc})");
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
