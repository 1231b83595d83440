//! Beta sampling through Gamma variates, and the per-thread random generator.
//!
//! Gamma(shape >= 1) uses Marsaglia and Tsang, "A simple method for generating gamma variables"
//! (ACM TOMS 26(3), 2000). Shapes below one use the boost Gamma(a) = Gamma(a + 1) * U^(1/a),
//! carried in log space so that Beta(0.1, 0.1) draws never underflow to 0/0.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::cell::RefCell;

thread_local! {
    static THREAD_RNG: RefCell<(SmallRng, ShapeMemo)> =
        RefCell::new((SmallRng::from_entropy(), ShapeMemo::new()));
}

/// Reseed the calling thread's generator, for reproducible runs.
pub fn seed_thread_rng(seed: u64) {
    THREAD_RNG.with(|rng| rng.borrow_mut().0 = SmallRng::seed_from_u64(seed));
}

/// Run `f` with the calling thread's generator (xoshiro256++; not cryptographic).
pub fn with_thread_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    THREAD_RNG.with(|rng| f(&mut rng.borrow_mut().0))
}

/// Run `f` with the calling thread's generator and its memo of Gamma shapes.
pub fn with_thread_sampler<T>(f: impl FnOnce(&mut SmallRng, &mut ShapeMemo) -> T) -> T {
    THREAD_RNG.with(|cell| {
        let (rng, memo) = &mut *cell.borrow_mut();
        f(rng, memo)
    })
}

/// Marsaglia–Tsang constants of one shape >= 1: d = shape - 1/3, c = 1 / sqrt(9 d), and
/// k = 1 / (108 d) for the second squeeze.
#[derive(Debug, Clone, Copy)]
pub struct GammaShape {
    shape: f64,
    d: f64,
    c: f64,
    k: f64,
}

impl GammaShape {
    #[inline]
    pub fn new(shape: f64) -> Self {
        let d = shape - 1.0 / 3.0;
        GammaShape {
            shape,
            d,
            c: 1.0 / (9.0 * d).sqrt(),
            k: 1.0 / (108.0 * d),
        }
    }
}

const MEMO_SLOTS: usize = 64;

/// Recently used shapes with their constants (direct-mapped by the shape's bits): repeated
/// draws from an unchanged posterior skip the square root and the division. The constants are
/// exactly those `GammaShape::new` computes, so draws are the same with or without the memo.
#[derive(Debug, Clone)]
pub struct ShapeMemo {
    slots: [GammaShape; MEMO_SLOTS],
}

impl Default for ShapeMemo {
    fn default() -> Self {
        Self::new()
    }
}

impl ShapeMemo {
    pub fn new() -> Self {
        // NaN shapes never match a lookup.
        ShapeMemo {
            slots: [GammaShape {
                shape: f64::NAN,
                d: f64::NAN,
                c: f64::NAN,
                k: f64::NAN,
            }; MEMO_SLOTS],
        }
    }

    #[inline]
    pub fn get(&mut self, shape: f64) -> GammaShape {
        let bits = shape.to_bits();
        let slot = (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize;
        let s = &mut self.slots[slot];
        if s.shape.to_bits() != bits {
            *s = GammaShape::new(shape);
        }
        *s
    }
}

/// A Gamma(shape, 1) draw for shape >= 1 (Marsaglia–Tsang squeeze and rejection).
#[inline]
fn gamma_ge1<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    gamma_with(rng, GammaShape::new(shape))
}

/// `gamma_ge1` with the shape's constants computed already.
///
/// The draw is accepted iff ln u < x²/2 + d (1 - v + ln v) (Marsaglia–Tsang); two squeezes
/// accept without the logs, so they only save time and the accepted draws are the same.
/// Theirs is u < 1 - 0.0331 x⁴. The second is tight for large shapes: with t = c x > -1,
/// the right side is d h(t), h(t) = 3 ln(1 + t) - 3t + 1.5t² - t³, h(0) = 0 and
/// h'(t) = -3t³ / (1 + t), so h(t) >= -0.75 t⁴ / min(1, 1 + t); since d c⁴ = 1 / (81 d) and
/// ln u <= u - 1, u < 1 - k x⁴ / s with s = min(1, 1 + t) implies acceptance.
#[inline]
fn gamma_with<R: Rng + ?Sized>(rng: &mut R, shape: GammaShape) -> f64 {
    let GammaShape { d, c, k, .. } = shape;
    loop {
        let x: f64 = rng.sample(StandardNormal);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let s = v.min(1.0);
        let v = v * v * v;
        let u: f64 = rng.gen();
        let x2 = x * x;
        let x4 = x2 * x2;
        if u < 1.0 - 0.0331 * x4 || u * s < s - k * x4 {
            return d * v;
        }
        if u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// The natural log of a Gamma(shape, 1) draw; finite for every shape > 0.
#[inline]
pub fn ln_gamma_sample<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    if shape >= 1.0 {
        gamma_ge1(rng, shape).ln()
    } else {
        // U in (0, 1]: `gen` gives [0, 1), so flip it to keep ln finite.
        let u: f64 = 1.0 - rng.gen::<f64>();
        gamma_ge1(rng, shape + 1.0).ln() + u.ln() / shape
    }
}

/// A Gamma(shape, 1) draw.
#[inline]
pub fn gamma_sample<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    if shape >= 1.0 {
        gamma_ge1(rng, shape)
    } else {
        ln_gamma_sample(rng, shape).exp()
    }
}

/// A Beta(alpha, beta) draw as X / (X + Y) with X ~ Gamma(alpha), Y ~ Gamma(beta).
///
/// Both parameters must be finite and positive (callers validate; the binding raises ValueError).
#[inline]
pub fn beta_sample<R: Rng + ?Sized>(rng: &mut R, alpha: f64, beta: f64) -> f64 {
    if alpha >= 1.0 && beta >= 1.0 {
        let x = gamma_ge1(rng, alpha);
        let y = gamma_ge1(rng, beta);
        x / (x + y)
    } else {
        // Small shapes: X / (X + Y) = 1 / (1 + exp(ln Y - ln X)), exact in log space.
        let lx = ln_gamma_sample(rng, alpha);
        let ly = ln_gamma_sample(rng, beta);
        1.0 / (1.0 + (ly - lx).exp())
    }
}

/// `beta_sample` with the Gamma constants of shapes >= 1 taken from `memo`: the same draws
/// from the same generator state.
#[inline]
pub fn beta_sample_memo<R: Rng + ?Sized>(
    rng: &mut R,
    memo: &mut ShapeMemo,
    alpha: f64,
    beta: f64,
) -> f64 {
    if alpha >= 1.0 && beta >= 1.0 {
        let x = gamma_with(rng, memo.get(alpha));
        let y = gamma_with(rng, memo.get(beta));
        x / (x + y)
    } else {
        beta_sample(rng, alpha, beta)
    }
}

/// Whether (alpha, beta) are usable Beta parameters.
pub fn valid_params(alpha: f64, beta: f64) -> bool {
    alpha.is_finite() && beta.is_finite() && alpha > 0.0 && beta > 0.0
}

/// Index of the largest `Beta(alphas[i], betas[i]) + bonus[i]` draw (first index on ties).
pub fn thompson_select<R: Rng + ?Sized>(
    rng: &mut R,
    alphas: &[f64],
    betas: &[f64],
    bonus: Option<&[f64]>,
) -> usize {
    let mut best = 0;
    let mut best_score = f64::NEG_INFINITY;
    for i in 0..alphas.len() {
        let mut score = beta_sample(rng, alphas[i], betas[i]);
        if let Some(b) = bonus {
            score += b[i];
        }
        if score > best_score {
            best_score = score;
            best = i;
        }
    }
    best
}

/// Monte Carlo estimate of the probability that Thompson selection picks each variant.
///
/// Uses `draws` rounds of the same selection rule; the standard error of each probability is at
/// most 0.5 / sqrt(draws). Each share is smoothed as (wins + 1/K) / (draws + 1), so no variant
/// that can be chosen gets probability 0 and the shares still sum to 1. A check on the sampler
/// (and the Python `selection_probabilities`); the propensity a decision logs is the exact
/// `propensity::selection_probabilities`, which has neither the noise nor the floor.
pub fn selection_probabilities<R: Rng + ?Sized>(
    rng: &mut R,
    alphas: &[f64],
    betas: &[f64],
    bonus: Option<&[f64]>,
    draws: usize,
) -> Vec<f64> {
    // The same rounds as `thompson_select`, with the shapes' constants computed once.
    let mut memo = ShapeMemo::new();
    let mut wins = vec![0u32; alphas.len()];
    for _ in 0..draws {
        let mut best = 0;
        let mut best_score = f64::NEG_INFINITY;
        for i in 0..alphas.len() {
            let mut score = beta_sample_memo(rng, &mut memo, alphas[i], betas[i]);
            if let Some(b) = bonus {
                score += b[i];
            }
            if score > best_score {
                best_score = score;
                best = i;
            }
        }
        wins[best] += 1;
    }
    let prior = 1.0 / alphas.len() as f64;
    wins.iter()
        .map(|&w| (w as f64 + prior) / (draws as f64 + 1.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
        (m, v)
    }

    #[test]
    fn beta_moments_match_theory() {
        let mut rng = SmallRng::seed_from_u64(7);
        for &(a, b) in &[
            (0.1, 0.1),
            (0.5, 3.0),
            (2.0, 5.0),
            (50.0, 950.0),
            (1e7, 3e7),
        ] {
            let xs: Vec<f64> = (0..200_000).map(|_| beta_sample(&mut rng, a, b)).collect();
            assert!(
                xs.iter().all(|x| (0.0..=1.0).contains(x)),
                "({a},{b}) out of range"
            );
            let (m, v) = mean_var(&xs);
            let tm = a / (a + b);
            let tv = a * b / ((a + b) * (a + b) * (a + b + 1.0));
            assert!(
                (m - tm).abs() < 5.0 * (tv / 200_000.0).sqrt() + 1e-12,
                "mean ({a},{b}) {m}"
            );
            assert!(
                (v / tv - 1.0).abs() < 0.03,
                "variance ({a},{b}) {v} vs {tv}"
            );
        }
    }

    #[test]
    fn memo_draws_equal_plain_draws() {
        let mut plain = SmallRng::seed_from_u64(9);
        let mut memoized = SmallRng::seed_from_u64(9);
        let mut memo = ShapeMemo::new();
        // Repeated and colliding shapes, small shapes (no memo) and huge ones.
        let shapes = [
            (1.0, 1.0),
            (30.0, 970.0),
            (30.0, 971.0),
            (0.5, 3.0),
            (2.0, 0.2),
            (1e7, 3e7),
        ];
        for i in 0..20_000 {
            let (a, b) = shapes[i % shapes.len()];
            let a = a + (i % 7) as f64;
            let x = beta_sample(&mut plain, a, b).to_bits();
            assert_eq!(
                x,
                beta_sample_memo(&mut memoized, &mut memo, a, b).to_bits()
            );
        }
    }

    /// Marsaglia–Tsang with only their squeeze, as published.
    fn gamma_reference(rng: &mut SmallRng, shape: f64) -> f64 {
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x: f64 = rng.sample(StandardNormal);
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u: f64 = rng.gen();
            if u < 1.0 - 0.0331 * x * x * x * x {
                return d * v;
            }
            if u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return d * v;
            }
        }
    }

    #[test]
    fn second_squeeze_keeps_the_draws() {
        for shape in [1.0, 1.2, 2.5, 7.0, 31.0, 971.0, 9510.5, 1e7] {
            let mut a = SmallRng::seed_from_u64(21);
            let mut b = SmallRng::seed_from_u64(21);
            for _ in 0..200_000 {
                let x = gamma_ge1(&mut a, shape);
                assert_eq!(
                    x.to_bits(),
                    gamma_reference(&mut b, shape).to_bits(),
                    "{shape}"
                );
            }
        }
    }

    #[test]
    fn selection_rounds_are_thompson_selections() {
        let (alphas, betas, bonus) = ([3.0, 40.0, 0.5], [90.0, 900.0, 20.0], [0.0, 0.01, 0.0]);
        let mut a = SmallRng::seed_from_u64(4);
        let mut b = SmallRng::seed_from_u64(4);
        let p = selection_probabilities(&mut a, &alphas, &betas, Some(&bonus), 300);
        let mut wins = [0u32; 3];
        for _ in 0..300 {
            wins[thompson_select(&mut b, &alphas, &betas, Some(&bonus))] += 1;
        }
        let expected: Vec<f64> = wins
            .iter()
            .map(|&w| (w as f64 + 1.0 / 3.0) / 301.0)
            .collect();
        assert_eq!(p, expected);
    }

    #[test]
    fn seeded_thread_rng_repeats() {
        seed_thread_rng(42);
        let a: Vec<f64> = (0..10)
            .map(|_| with_thread_rng(|r| beta_sample(r, 2.0, 3.0)))
            .collect();
        seed_thread_rng(42);
        let b: Vec<f64> = (0..10)
            .map(|_| with_thread_rng(|r| beta_sample(r, 2.0, 3.0)))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn thompson_prefers_the_clear_winner() {
        let mut rng = SmallRng::seed_from_u64(1);
        let p = selection_probabilities(&mut rng, &[10.0, 100.0], &[990.0, 900.0], None, 2000);
        assert!(p[1] > 0.99, "{p:?}");
        let bonus = [1.0, 0.0];
        let p =
            selection_probabilities(&mut rng, &[10.0, 100.0], &[990.0, 900.0], Some(&bonus), 500);
        assert!(p[0] > 0.99, "bonus must dominate: {p:?}");
    }

    #[test]
    fn symmetric_arms_split_evenly() {
        let mut rng = SmallRng::seed_from_u64(3);
        let p = selection_probabilities(&mut rng, &[1.0; 4], &[1.0; 4], None, 40_000);
        for x in p {
            assert!((x - 0.25).abs() < 0.015, "{x}");
        }
    }
}
