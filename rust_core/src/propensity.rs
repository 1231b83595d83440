//! Exact selection probabilities of Thompson sampling with an additive exploration bonus.
//!
//! Variant i is chosen when its draw plus bonus is the largest, so with X_k ~ Beta(a_k, b_k)
//! independent and bonuses c_k,
//!
//! P(i) = P(X_i + c_i > X_j + c_j for all j != i) = ∫ f_i(y - c_i) Π_{j != i} F_j(y - c_j) dy.
//!
//! The integral is taken by composite Gauss–Legendre quadrature on one grid of panels shared by
//! all variants: every variant adds panel edges at its mean plus multiples of its standard
//! deviation (two apart near the mean, wider in the tails) out to where its density is negligible
//! or its support ends, with edges graded geometrically towards an end where the density is steep
//! or infinite. Where several variants' edges crowd, an edge closer to the previous one than half
//! the finer of their spacings is dropped. So the grid is fine wherever any posterior has mass,
//! whatever their scales, without multiplying panels for similar posteriors. Only the unnormalised
//! log-density is evaluated. Each Beta's CDF at the nodes is its density integrated from the left:
//! the mass of the panels before plus, inside a panel, the spectral integration matrix of the rule
//! (the integral of the interpolating polynomial from the panel's start to each node; Trefethen,
//! "Spectral Methods in MATLAB", 2000, ch. 12). Integrating from the left keeps small CDF values,
//! and so small probabilities, accurate to a relative error rather than an absolute one. Each
//! Beta's normalising constant is its numerically integrated mass. Where a density is infinite at
//! an end of its support (a or b below 1) the panel next to that end uses the substitution
//! y = start + h v^(1/a), which turns x^(a-1) dx into a smooth integrand in v.
//!
//! Deterministic: the same posteriors always give the same probabilities (unlike a Monte Carlo
//! estimate, which also needed a floor to keep rare choices above 0).

use std::sync::OnceLock;

/// Gauss–Legendre nodes per panel.
const NODES: usize = 8;
/// Multiples of a posterior's standard deviation, on each side of its mean, at which it puts
/// panel edges: two standard deviations apart near the mean, wider in the tails.
const STEPS: [f64; 9] = [2.0, 4.0, 6.0, 8.0, 11.0, 15.0, 20.0, 26.0, 33.0];
/// A posterior's effective support ends at the first edge where its density is below e^-CUTOFF
/// (about 2e-22) times its density at the mean.
const CUTOFF: f64 = 50.0;

/// The Gauss–Legendre rule on [0, 1]: nodes, weights and the integration matrix
/// `partial[k][m]` = ∫_0^{node_k} l_m(u) du for the Lagrange basis l_m of the nodes.
struct Rule {
    nodes: [f64; NODES],
    weights: [f64; NODES],
    partial: [[f64; NODES]; NODES],
}

/// P_0..P_n at x by the three-term recurrence.
fn legendre_all(x: f64) -> [f64; NODES + 2] {
    let mut p = [0.0; NODES + 2];
    p[0] = 1.0;
    p[1] = x;
    for k in 1..=NODES {
        let kf = k as f64;
        p[k + 1] = ((2.0 * kf + 1.0) * x * p[k] - kf * p[k - 1]) / (kf + 1.0);
    }
    p
}

fn rule() -> &'static Rule {
    static RULE: OnceLock<Rule> = OnceLock::new();
    RULE.get_or_init(|| {
        let n = NODES;
        let mut x = [0.0; NODES];
        let mut w = [0.0; NODES];
        for k in 0..n {
            // Newton on P_n from the usual asymptotic guess.
            let mut t = (std::f64::consts::PI * (k as f64 + 0.75) / (n as f64 + 0.5)).cos();
            for _ in 0..100 {
                let p = legendre_all(t);
                let dp = n as f64 * (t * p[n] - p[n - 1]) / (t * t - 1.0);
                let step = p[n] / dp;
                t -= step;
                if step.abs() < 1e-16 {
                    break;
                }
            }
            let p = legendre_all(t);
            let dp = n as f64 * (t * p[n] - p[n - 1]) / (t * t - 1.0);
            x[n - 1 - k] = t;
            w[n - 1 - k] = 2.0 / ((1.0 - t * t) * dp * dp);
        }
        // l_m(x) = w_m Σ_p (2p+1)/2 P_p(x_m) P_p(x) (exact discrete orthogonality), and
        // ∫_{-1}^{x} P_0 = x + 1, ∫_{-1}^{x} P_p = (P_{p+1}(x) - P_{p-1}(x)) / (2p + 1).
        let mut partial = [[0.0; NODES]; NODES];
        for (k, row) in partial.iter_mut().enumerate() {
            let pk = legendre_all(x[k]);
            for (m, cell) in row.iter_mut().enumerate() {
                let pm = legendre_all(x[m]);
                let mut s = 0.5 * (x[k] + 1.0);
                for p in 1..n {
                    s += 0.5 * pm[p] * (pk[p + 1] - pk[p - 1]);
                }
                // From [-1, 1] to [0, 1]: both the weight and the length halve.
                *cell = 0.5 * w[m] * s;
            }
        }
        Rule {
            nodes: x.map(|t| 0.5 * (t + 1.0)),
            weights: w.map(|v| 0.5 * v),
            partial,
        }
    })
}

/// One posterior, shifted by its bonus.
struct Arm {
    a: f64,
    b: f64,
    shift: f64,
    /// Effective support in y (shifted) coordinates; outside it the density is taken as 0.
    lo: f64,
    hi: f64,
    /// Unnormalised log-density at the mean, subtracted to keep values near 1.
    reference: f64,
}

impl Arm {
    /// The arm, with its panel edges pushed onto `edges`.
    fn new(a: f64, b: f64, shift: f64, edges: &mut Vec<Edge>) -> Self {
        let mean = a / (a + b);
        let sd = (a * b / ((a + b) * (a + b) * (a + b + 1.0))).sqrt();
        let mut arm = Arm {
            a,
            b,
            shift,
            lo: shift,
            hi: shift + 1.0,
            reference: 0.0,
        };
        arm.reference = arm.log_density(mean);
        edges.push(Edge::at(shift + mean, 2.0 * sd));
        for side in [-1.0, 1.0] {
            let mut previous = 0.0;
            let mut inside = true;
            for &z in &STEPS {
                let x = mean + side * z * sd;
                if x <= 0.0 || x >= 1.0 {
                    break;
                }
                edges.push(Edge::at(shift + x, (z - previous) * sd));
                previous = z;
                if arm.log_density(x) - arm.reference < -CUTOFF {
                    inside = false;
                    if side < 0.0 {
                        arm.lo = shift + x;
                    } else {
                        arm.hi = shift + x;
                    }
                    break;
                }
            }
            if !inside {
                continue;
            }
            // The support's end is reached: an edge there, marked when the density is infinite
            // there, and graded edges towards it.
            if side < 0.0 {
                let power = if a < 1.0 { 1.0 / a } else { 1.0 };
                edges.push(Edge::end(shift, power, 1.0));
                for f in graded(a) {
                    edges.push(Edge::end(shift + f * sd.min(mean), 1.0, 1.0));
                }
            } else {
                let power = if b < 1.0 { 1.0 / b } else { 1.0 };
                edges.push(Edge::end(shift + 1.0, 1.0, power));
                for f in graded(b) {
                    edges.push(Edge::end(shift + 1.0 - f * sd.min(1.0 - mean), 1.0, 1.0));
                }
            }
        }
        arm
    }

    /// (a-1) ln x + (b-1) ln(1-x), the unnormalised log-density at x in (0, 1).
    #[inline]
    fn log_density(&self, x: f64) -> f64 {
        (self.a - 1.0) * x.ln() + (self.b - 1.0) * (-x).ln_1p()
    }
}

/// A panel edge. `gap`: the spacing its posterior's grid needs here (0: always kept);
/// `left`/`right`: power of the substitution the panel starting/ending here needs (1 = none).
#[derive(Clone, Copy)]
struct Edge {
    y: f64,
    gap: f64,
    left: f64,
    right: f64,
}

impl Edge {
    fn at(y: f64, gap: f64) -> Self {
        Edge {
            y,
            gap,
            left: 1.0,
            right: 1.0,
        }
    }

    fn end(y: f64, left: f64, right: f64) -> Self {
        Edge {
            y,
            gap: 0.0,
            left,
            right,
        }
    }
}

/// Exact probability that Thompson selection (largest Beta(alphas[i], betas[i]) draw plus
/// bonus[i]) picks each variant. Parameters must be positive and finite, bonuses finite; the
/// caller checks. The result sums to 1; a probability too small for f64 is reported as the
/// smallest positive normal f64, so inverse-propensity weights stay finite.
pub fn selection_probabilities(alphas: &[f64], betas: &[f64], bonus: &[f64]) -> Vec<f64> {
    let k = alphas.len();
    if k == 1 {
        return vec![1.0];
    }
    let rule = rule();
    let mut edges = Vec::with_capacity(k * (2 * STEPS.len() + 8));
    let arms: Vec<Arm> = (0..k)
        .map(|i| Arm::new(alphas[i], betas[i], bonus[i], &mut edges))
        .collect();
    let edges = panel_edges(&arms, edges);

    // Per node: each arm's normalised density times the panel's dy, and its CDF.
    let panels = edges.len() - 1;
    let stride = NODES * k;
    let mut density = vec![0.0; panels * stride];
    let mut cdf = vec![0.0; panels * stride];
    let mut ys = vec![0.0; panels * NODES];
    let mut jac = vec![0.0; panels * NODES];
    for p in 0..panels {
        let (e0, e1) = (edges[p], edges[p + 1]);
        let h = e1.y - e0.y;
        for (j, &v) in rule.nodes.iter().enumerate() {
            // A power substitution only at the singular end (edges set one of the two).
            let (y, dy) = if e0.left > 1.0 {
                let q = e0.left;
                (e0.y + h * v.powf(q), h * q * v.powf(q - 1.0))
            } else if e1.right > 1.0 {
                let q = e1.right;
                (
                    e1.y - h * (1.0 - v).powf(q),
                    h * q * (1.0 - v).powf(q - 1.0),
                )
            } else {
                (e0.y + h * v, h)
            };
            ys[p * NODES + j] = y;
            jac[p * NODES + j] = dy;
        }
    }
    for (i, arm) in arms.iter().enumerate() {
        let mut mass = 0.0;
        for p in 0..panels {
            let (e0, e1) = (edges[p].y, edges[p + 1].y);
            let base = p * stride;
            if e1 <= arm.lo || e0 >= arm.hi {
                for j in 0..NODES {
                    cdf[base + j * k + i] = mass;
                }
                continue;
            }
            let mut g = [0.0; NODES];
            for (j, gj) in g.iter_mut().enumerate() {
                let x = ys[p * NODES + j] - arm.shift;
                if x > 0.0 && x < 1.0 {
                    *gj = (arm.log_density(x) - arm.reference).exp() * jac[p * NODES + j];
                }
            }
            for j in 0..NODES {
                let partial: f64 = (0..NODES).map(|m| rule.partial[j][m] * g[m]).sum();
                density[base + j * k + i] = g[j];
                cdf[base + j * k + i] = mass + partial.max(0.0);
            }
            mass += (0..NODES).map(|m| rule.weights[m] * g[m]).sum::<f64>();
        }
        if mass > 0.0 && mass.is_finite() {
            for p in 0..panels {
                for j in 0..NODES {
                    let at = p * stride + j * k + i;
                    density[at] /= mass;
                    cdf[at] = (cdf[at] / mass).min(1.0);
                }
            }
        }
    }

    // Π_{j != i} F_j as (product of those before i) * (product of those after i): O(K) a node.
    let mut out = vec![0.0; k];
    let mut before = vec![0.0; k];
    for p in 0..panels {
        for (j, &w) in rule.weights.iter().enumerate() {
            let at = p * stride + j * k;
            let g = &density[at..at + k];
            let f = &cdf[at..at + k];
            let mut run = 1.0;
            for (b, &fi) in before.iter_mut().zip(f) {
                *b = run;
                run *= fi;
            }
            let mut after = 1.0;
            for i in (0..k).rev() {
                if g[i] != 0.0 {
                    out[i] += w * g[i] * before[i] * after;
                }
                after *= f[i];
            }
        }
    }
    let total: f64 = out.iter().sum();
    for p in &mut out {
        *p = (*p / total).max(f64::MIN_POSITIVE);
    }
    out
}

/// Fractions of the scale at which edges approach an end of the support where the density
/// behaves like x^(shape - 1): geometric steps of 8 until the last panel holds under ~1e-6 of
/// the mass near that end (x^shape), so the error of the substituted first panel is negligible
/// even when two posteriors with different shapes below 1 share the end.
fn graded(shape: f64) -> impl Iterator<Item = f64> {
    let steps = if shape >= 2.0 {
        0
    } else if shape >= 1.0 {
        2
    } else {
        ((6.0 / (shape * 8f64.log10())).ceil() as i32).min(60)
    };
    (1..=steps).map(|k| 8f64.powi(-k))
}

/// Sorted panel edges inside the union of the arms' effective supports. Where several arms'
/// grids overlap an edge closer to the last kept one than half the finer of their spacings is
/// dropped, so similar posteriors do not multiply the panels.
fn panel_edges(arms: &[Arm], mut edges: Vec<Edge>) -> Vec<Edge> {
    let lo = arms.iter().map(|a| a.lo).fold(f64::INFINITY, f64::min);
    let hi = arms.iter().map(|a| a.hi).fold(f64::NEG_INFINITY, f64::max);
    edges.retain(|e| e.y >= lo && e.y <= hi);
    edges.sort_by(|a, b| a.y.total_cmp(&b.y));
    let mut out: Vec<Edge> = Vec::with_capacity(edges.len());
    for e in edges {
        match out.last_mut() {
            Some(last) if e.y - last.y <= 4.0 * f64::EPSILON * last.y.abs().max(1e-300) => {
                last.gap = last.gap.min(e.gap);
                last.left = last.left.max(e.left);
                last.right = last.right.max(e.right);
            }
            Some(last)
                if e.gap > 0.0 && last.gap > 0.0 && e.y - last.y < 0.5 * e.gap.min(last.gap) => {}
            _ => out.push(e),
        }
    }
    // A panel may carry one substitution only: split one that would need both.
    let mut i = 0;
    while i + 1 < out.len() {
        if out[i].left > 1.0 && out[i + 1].right > 1.0 {
            let mid = Edge::at(0.5 * (out[i].y + out[i + 1].y), 0.0);
            out.insert(i + 1, mid);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_integrates_polynomials_and_their_partials() {
        let r = rule();
        // ∫_0^1 u^d = 1/(d+1) up to degree 2n-1; partial integrals exact up to degree n-1.
        for d in 0..(2 * NODES) {
            let s: f64 = (0..NODES)
                .map(|m| r.weights[m] * r.nodes[m].powi(d as i32))
                .sum();
            assert!((s - 1.0 / (d as f64 + 1.0)).abs() < 1e-14, "degree {d}");
        }
        for d in 0..NODES {
            for k in 0..NODES {
                let s: f64 = (0..NODES)
                    .map(|m| r.partial[k][m] * r.nodes[m].powi(d as i32))
                    .sum();
                let exact = r.nodes[k].powi(d as i32 + 1) / (d as f64 + 1.0);
                assert!((s - exact).abs() < 1e-14, "degree {d} node {k}");
            }
        }
    }

    /// Reference values: scipy.integrate.quad (epsrel 1e-12, split at every posterior's mean
    /// +- 12 sd in steps of 0.5 sd) of f_i(x) Π F_j(x + c_i - c_j) with scipy.stats.beta.
    /// (alphas, betas, bonuses, probabilities)
    type Case = (
        &'static [f64],
        &'static [f64],
        &'static [f64],
        &'static [f64],
    );

    const CASES: &[Case] = &[
        (&[1.0, 1.0], &[1.0, 1.0], &[0.0, 0.0], &[0.5, 0.5]),
        (
            &[2.0, 3.0],
            &[5.0, 4.0],
            &[0.0, 0.0],
            &[0.2727272727272727, 0.7272727272727272],
        ),
        (
            &[31.0, 41.0, 36.0],
            &[971.0, 961.0, 966.0],
            &[0.0; 3],
            &[0.06924121078688364, 0.6754292023002821, 0.25532958691283303],
        ),
        (
            &[501.0, 521.0, 481.0],
            &[9501.0, 9481.0, 9521.0],
            &[0.0; 3],
            &[0.24015571013825573, 0.7010310656251015, 0.05881322423664128],
        ),
        (
            &[2.0, 5.0],
            &[5.0, 2.0],
            &[0.3, 0.0],
            &[0.2743549051683714, 0.7256450948316286],
        ),
        (
            &[0.5, 3.0, 1.0],
            &[0.5, 2.0, 1.0],
            &[0.0, 0.05, 0.1],
            &[0.2904643858730337, 0.364799103801198, 0.3447365103257711],
        ),
        (
            &[1e6, 1.001e6, 0.999e6],
            &[1e6, 1e6, 1e6],
            &[0.0; 3],
            &[0.2723053167099808, 0.6302098756514622, 0.09748480763853576],
        ),
        (
            &[50000.0, 51000.0, 50500.0, 49000.0, 50200.0],
            &[950000.0, 949000.0, 949500.0, 951000.0, 949800.0],
            &[0.0; 5],
            &[
                0.00032749670276060783,
                0.9433103562260738,
                0.052889178108667306,
                7.492711711730249e-13,
                0.0034729689617486997,
            ],
        ),
        (
            &[11.0, 301.0, 51.0],
            &[991.0, 701.0, 951.0],
            &[0.0; 3],
            &[
                6.440773389318754e-87,
                0.9999999999999996,
                2.0558445277360142e-53,
            ],
        ),
        (
            &[1.0, 1.0, 1.0],
            &[1.0, 1000.0, 1e6],
            &[0.0; 3],
            &[
                0.9990009980019997,
                0.0009990000009990002,
                1.9970010009999968e-09,
            ],
        ),
        (
            &[20.0, 45.0],
            &[980.0, 955.0],
            &[0.0; 2],
            &[0.0006554600490353495, 0.9993445399509638],
        ),
        (
            &[25.0, 45.0, 40.0],
            &[975.0, 955.0, 960.0],
            &[0.01, 0.002, 0.003],
            &[0.03125930686902313, 0.6531153839393231, 0.31562530919165355],
        ),
        (
            &[0.2, 0.3],
            &[0.4, 5.0],
            &[0.0; 2],
            &[0.6816044498276128, 0.31839555017226107],
        ),
        (
            &[1.0, 3.0, 2.0, 5.0, 1.5],
            &[9.0, 7.0, 8.0, 5.0, 8.5],
            &[0.01, 0.005, 0.007, 0.003, 0.008],
            &[
                0.007735485223074704,
                0.15034285618250365,
                0.04524854517641655,
                0.7760087070554275,
                0.020664406362577582,
            ],
        ),
        (&[5.0, 1e6], &[1e6, 5.0], &[0.0; 2], &[0.0, 1.0]),
    ];

    /// Relative accuracy asked of every probability above 1e-30 (OPE needs a few percent).
    const TOLERANCE: f64 = 1e-5;

    #[test]
    fn matches_scipy_integration() {
        for &(alphas, betas, bonus, want) in CASES {
            let got = selection_probabilities(alphas, betas, bonus);
            let worst = got
                .iter()
                .zip(want)
                .filter(|(_, w)| **w > 1e-30)
                .map(|(g, w)| (g / w - 1.0).abs())
                .fold(0.0, f64::max);
            println!("{alphas:?} {betas:?}: worst relative error {worst:.1e}");
            for (g, w) in got.iter().zip(want) {
                if *w > 1e-30 {
                    // Relative accuracy, tiny probabilities included.
                    assert!(
                        (g / w - 1.0).abs() < TOLERANCE,
                        "{alphas:?} {betas:?}: {got:?} vs {want:?}"
                    );
                } else {
                    assert!(*g < 1e-30, "{alphas:?} {betas:?}: {got:?} vs {want:?}");
                }
            }
            assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(got.iter().all(|&p| p > 0.0));
        }
    }

    #[test]
    fn even_for_equal_arms_and_follows_a_permutation() {
        for &(a, b) in &[(1.0, 1.0), (0.3, 0.7), (40.0, 960.0), (2e5, 8e5)] {
            for p in selection_probabilities(&[a; 4], &[b; 4], &[0.0; 4]) {
                assert!((p - 0.25).abs() < 1e-9, "{a} {b}: {p}");
            }
        }
        let p =
            selection_probabilities(&[3.0, 30.0, 7.0], &[97.0, 970.0, 93.0], &[0.0, 0.01, 0.02]);
        let q =
            selection_probabilities(&[7.0, 3.0, 30.0], &[93.0, 97.0, 970.0], &[0.02, 0.0, 0.01]);
        for (x, y) in p.iter().zip([q[1], q[2], q[0]]) {
            assert!((x - y).abs() < 1e-12 * x.max(1e-300));
        }
    }
}
