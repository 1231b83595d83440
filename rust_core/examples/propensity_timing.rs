//! Cost of one exact selection-probability computation (the propensity a decision logs on a
//! cache miss) against the Monte Carlo estimate it replaced (512 rounds of Thompson selection),
//! and what the recomputations add to a stream of recorded decisions on one node:
//! `cargo run --release -p allocsvc-core --example propensity_timing`.
use allocsvc_core::beta::{selection_probabilities as monte_carlo, with_thread_rng};
use allocsvc_core::keys::key_hash;
use allocsvc_core::propensity::selection_probabilities;
use allocsvc_core::{Engine, ExperimentConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;

mod support;
use support::{best_of, cpu_ns};

fn main() {
    // Posteriors of a node after ~3,000 and ~300,000 allocations at ~5% conversion, with the
    // default exploration bonus 0.01 / sqrt(n + 1).
    let cases: [(&str, Vec<f64>, Vec<f64>); 4] = [
        (
            "3 variants, n ~ 1e3",
            vec![41.0, 61.0, 51.0],
            vec![961.0, 941.0, 951.0],
        ),
        (
            "3 variants, n ~ 1e5",
            vec![5001.0, 5301.0, 4801.0],
            vec![95001.0, 94701.0, 95201.0],
        ),
        (
            "5 variants, n ~ 1e3",
            vec![31.0, 41.0, 36.0, 45.0, 38.0],
            vec![571.0, 561.0, 566.0, 557.0, 564.0],
        ),
        (
            "5 variants, n ~ 1e5",
            vec![3001.0, 3101.0, 2901.0, 3051.0, 2990.0],
            vec![57001.0, 56901.0, 57101.0, 56951.0, 57010.0],
        ),
    ];
    // Many variants: rates spread from 4% to 6%, n ~ 1e4 each.
    let mut many: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for k in [20usize, 100] {
        let alphas: Vec<f64> = (0..k)
            .map(|i| 1.0 + 400.0 + 200.0 * i as f64 / k as f64)
            .collect();
        let betas: Vec<f64> = alphas.iter().map(|a| 10_002.0 - a).collect();
        many.push((format!("{k} variants, n ~ 1e4"), alphas, betas));
    }
    println!("| posteriors | exact (ns) | Monte Carlo, 512 rounds (ns) |");
    println!("|---|---|---|");
    let all = cases
        .iter()
        .map(|(name, a, b)| (name.to_string(), a.clone(), b.clone()))
        .chain(many);
    for (name, alphas, betas) in all {
        let (alphas, betas) = (&alphas, &betas);
        let bonus: Vec<f64> = alphas
            .iter()
            .zip(betas)
            .map(|(a, b)| 0.01 / (a + b - 1.0).sqrt())
            .collect();
        let (exact, _) = best_of(2000, || {
            selection_probabilities(black_box(alphas), black_box(betas), black_box(&bonus))[0]
        });
        let (mc, _) = best_of(2000, || {
            with_thread_rng(|rng| monte_carlo(rng, alphas, betas, Some(&bonus), 512))[0]
        });
        println!("| {name} | {exact:.0} | {mc:.0} |");
    }

    println!();
    println!("| node (3 variants, ~5% conversion) | record=false (ns) | record=true, conversions recorded (ns) |");
    println!("|---|---|---|");
    for n in [1_000u64, 10_000, 100_000, 1_000_000] {
        let decisions = 50_000;
        let off = stream(n, false, decisions);
        let on = stream(n, true, decisions);
        println!("| n = {n} per variant | {off:.0} | {on:.0} |");
    }
}

/// Mean CPU ns per decision over `decisions` decisions on a node holding `n` allocations per
/// variant (rates 4%, 5%, 6%); with `record`, each decision is counted and converts at its rate.
fn stream(n: u64, record: bool, decisions: usize) -> f64 {
    let engine = Engine::new();
    engine
        .configure(
            1,
            ExperimentConfig {
                exploration: 0.01,
                ..ExperimentConfig::thompson(3, &[], vec![])
            },
        )
        .unwrap();
    let rates = [0.04, 0.05, 0.06];
    let g = key_hash("");
    let rows: Vec<_> = (0..3)
        .map(|v| (1, g, v as u32, n, (rates[v] * n as f64) as u64, 0.0))
        .collect();
    engine.store().load(&rows, false);
    let mut rng = SmallRng::seed_from_u64(1);
    let none: &[&str] = &[];
    let start = cpu_ns();
    for i in 0..decisions {
        let d = engine.decide(1, "u", none, record).unwrap();
        if record && rng.gen::<f64>() < rates[d.variant] {
            engine.record_conversion(1, "", d.variant, 1.0).unwrap();
        }
        black_box(i);
    }
    (cpu_ns() - start) / decisions as f64
}
