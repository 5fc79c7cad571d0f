//! The privacy accountant: Rényi differential privacy (RDP) of the
//! Poisson-subsampled Gaussian mechanism, composed over rounds and converted
//! to (ε, δ).
//!
//! - RDP of the subsampled Gaussian at integer and fractional orders follows
//!   Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled
//!   Gaussian Mechanism" (2019), computed as Google's `dp-accounting`
//!   (`RdpAccountant`, version 0.6.0) does, with its default orders.
//! - The distributed discrete Gaussian adds, per round, the divergence term of
//!   Kairouz, Liu and Steinke (ICML 2021, Theorem 1): the sum of `n` discrete
//!   Gaussians of variance σ² each is `½ε²`-concentrated DP with
//!   `ε² = Δ²/(nσ²) + ½τd`, `τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ²·k/(k+1))`, so its
//!   RDP exceeds the continuous Gaussian's by `α·τ·d/4` at order α.
//! - RDP converts to (ε, δ) with Balle et al. 2020 (Proposition 12 of
//!   arXiv:2004.00010): `ε = rdp + ln(1 - 1/α) - ln(δ·α)/(α - 1)`, minimised
//!   over the orders.
//!
//! Pure functions and one value type: no clock, no storage (a process only
//! remembers the curves it computed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// `dp-accounting`'s default orders: 1.1 to 10.9 by 0.1, 11 to 63, and 128 to 1024.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// The most terms summed for a fractional order (as `dp-accounting`).
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

/// One round's mechanism, as far as privacy goes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Probability that a given customer is sampled this round (Poisson).
    pub sampling_rate: f64,
    /// Standard deviation of the noise on the sum over the sensitivity.
    pub noise_multiplier: f64,
    /// `τ·d` of the distributed discrete Gaussian; 0 for the continuous Gaussian.
    pub discrete_tau_d: f64,
}

impl Step {
    /// The textbook continuous Gaussian step.
    pub fn gaussian(sampling_rate: f64, noise_multiplier: f64) -> Self {
        Self {
            sampling_rate,
            noise_multiplier,
            discrete_tau_d: 0.0,
        }
    }

    /// RDP of this step at `order`.
    pub fn rdp(&self, order: f64) -> f64 {
        rdp_subsampled_gaussian(self.sampling_rate, self.noise_multiplier, order)
            + order * self.discrete_tau_d / 4.0
    }
}

/// `τ` of Kairouz et al. for `n` summed discrete Gaussians of variance `variance` each.
pub fn discrete_gaussian_tau(n: usize, variance: f64) -> f64 {
    use std::f64::consts::PI;
    (1..n)
        .map(|k| {
            let k = k as f64;
            (-2.0 * PI * PI * variance * k / (k + 1.0)).exp()
        })
        .sum::<f64>()
        * 10.0
}

/// An (ε, δ) guarantee and the order that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Guarantee {
    /// ε.
    pub epsilon: f64,
    /// The Rényi order at which ε was smallest.
    pub order: f64,
}

/// Privacy spent so far: the RDP curve of the composed rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl Accountant {
    /// Nothing spent, at these orders.
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Add `count` runs of `step` (RDP composes by addition).
    pub fn compose(&mut self, step: &Step, count: u64) {
        let curve = if self.orders == default_orders_once() {
            default_curve(step)
        } else {
            self.orders.iter().map(|order| step.rdp(*order)).collect()
        };
        for (total, rdp) in self.rdp.iter_mut().zip(curve.iter()) {
            *total += rdp * count as f64;
        }
    }

    /// The spend after `count` more runs of `step`, leaving this one unchanged.
    pub fn after(&self, step: &Step, count: u64) -> Self {
        let mut next = self.clone();
        next.compose(step, count);
        next
    }

    /// ε at `delta` (0 if nothing was spent).
    pub fn epsilon(&self, delta: f64) -> Guarantee {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// [`default_orders`], computed once.
fn default_orders_once() -> &'static [f64] {
    static ORDERS: OnceLock<Vec<f64>> = OnceLock::new();
    ORDERS.get_or_init(default_orders)
}

/// RDP curves at the default orders, by the bits of their step's fields.
type Curves = HashMap<[u64; 3], Arc<[f64]>>;

/// Distinct steps whose curves a process remembers at most.
const MAX_CURVES: usize = 256;

/// `step`'s RDP at the default orders. A curve costs milliseconds (fractional
/// orders sum up to a thousand terms), and every ledger charge and every
/// virtual site of a simulation asks for the same few, so a process computes
/// each once.
fn default_curve(step: &Step) -> Arc<[f64]> {
    static CURVES: OnceLock<Mutex<Curves>> = OnceLock::new();
    let key = [
        step.sampling_rate.to_bits(),
        step.noise_multiplier.to_bits(),
        step.discrete_tau_d.to_bits(),
    ];
    let curves = CURVES.get_or_init(Mutex::default);
    let remembered = curves
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    if let Some(curve) = remembered {
        return curve;
    }
    let curve: Arc<[f64]> = default_orders_once().iter().map(|o| step.rdp(*o)).collect();
    let mut curves = curves.lock().unwrap_or_else(|e| e.into_inner());
    if curves.len() >= MAX_CURVES {
        curves.clear();
    }
    curves.insert(key, curve.clone());
    curve
}

/// ε of `steps` runs of `step` at `delta`.
pub fn epsilon(step: &Step, steps: u64, delta: f64) -> Guarantee {
    Accountant::default().after(step, steps).epsilon(delta)
}

/// The smallest noise multiplier whose `steps` runs at `sampling_rate` stay
/// within `target` ε at `delta`, to a relative precision of 1e-4; `None` if
/// even a noise multiplier of 10⁴ does not.
pub fn calibrate(target: f64, sampling_rate: f64, steps: u64, delta: f64) -> Option<f64> {
    calibrate_with_reserve(target, sampling_rate, steps, delta, &[])
}

/// As [`calibrate`], keeping room in the budget for `count` runs of each
/// `reserve` step (the fairness audits of the models trained, the sites'
/// prior release).
pub fn calibrate_with_reserve(
    target: f64,
    sampling_rate: f64,
    steps: u64,
    delta: f64,
    reserve: &[(Step, u64)],
) -> Option<f64> {
    let spent = |z: f64| {
        let mut spent = Accountant::default();
        spent.compose(&Step::gaussian(sampling_rate, z), steps);
        for (reserve, count) in reserve {
            spent.compose(reserve, *count);
        }
        spent.epsilon(delta).epsilon
    };
    let (mut low, mut high) = (1e-3, 1e4);
    if spent(high) > target {
        return None;
    }
    if spent(low) <= target {
        return Some(low);
    }
    while (high - low) / high > 1e-4 {
        let mid = (low * high).sqrt();
        if spent(mid) > target {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(high)
}

/// RDP at `order` of the Gaussian mechanism with noise multiplier `z`, each
/// record sampled with probability `q`.
pub fn rdp_subsampled_gaussian(q: f64, z: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if order.is_infinite() || z == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * z * z);
    }
    log_a(q, z, order) / (order - 1.0)
}

/// Balle et al.'s conversion, minimised over the orders.
fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Guarantee {
    if delta <= 0.0 {
        let epsilon = if rdp.iter().all(|&r| r == 0.0) {
            0.0
        } else {
            f64::INFINITY
        };
        return Guarantee {
            epsilon,
            order: 0.0,
        };
    }
    let mut best = Guarantee {
        epsilon: f64::INFINITY,
        order: orders.first().copied().unwrap_or(0.0),
    };
    for (&a, &r) in orders.iter().zip(rdp) {
        let epsilon = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if epsilon < best.epsilon {
            best = Guarantee { epsilon, order: a };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    best
}

fn log_a(q: f64, sigma: f64, alpha: f64) -> f64 {
    if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    }
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log1mq = (-q).ln_1p();
    let mut total = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (a, i) = (alpha as f64, i as f64);
        let log_coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        total = log_add(total, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    total
}

/// Sec. 3.3 of arXiv:1908.10530: the integrals over (-∞, z0] and [z0, ∞).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let root2_sigma = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / root2_sigma);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / root2_sigma);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY // did not converge: this order is left out of the minimum
}

/// `ln |C(n, k)|`, generalised to real `n` through the gamma function.
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `ln(e^a + e^b)`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// `ln erfc(x)`, with the asymptotic series where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 0.0 {
        return r.ln();
    }
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
        - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ε (and the best order) from `dp-accounting` 0.6.0 (PyPI), computed with
    /// `dp_accounting.rdp.RdpAccountant()` (default orders) composing
    /// `PoissonSampledDpEvent(q, GaussianDpEvent(z))` T times, then
    /// `get_epsilon_and_optimal_order(delta)`. Columns: q, z, T, delta, ε, order.
    const DP_ACCOUNTING: &[(f64, f64, u64, f64, f64, f64)] = &include!("dp_accounting_cases.in");

    #[test]
    fn agrees_with_dp_accounting_within_one_percent() {
        for &(q, z, steps, delta, expected, order) in DP_ACCOUNTING {
            let got = epsilon(&Step::gaussian(q, z), steps, delta);
            let relative = (got.epsilon - expected).abs() / expected.max(1e-12);
            assert!(
                relative < 0.01,
                "q={q} z={z} T={steps} δ={delta}: ε {} (order {}), dp-accounting {expected} (order {order})",
                got.epsilon,
                got.order
            );
        }
    }

    #[test]
    fn the_published_example() {
        let got = epsilon(&Step::gaussian(0.01, 1.1), 10_000, 1e-5);
        assert!(
            (got.epsilon - 5.632).abs() / 5.632 < 0.01,
            "ε {}",
            got.epsilon
        );
    }

    #[test]
    fn calibration_finds_the_smallest_sufficient_noise() {
        for (target, q, steps, delta) in [(1.0, 0.01, 1000, 1e-5), (4.0, 0.05, 200, 1e-6)] {
            let z = calibrate(target, q, steps, delta).unwrap();
            let at = |z: f64| epsilon(&Step::gaussian(q, z), steps, delta).epsilon;
            assert!(at(z) <= target, "z {z} gives ε {}", at(z));
            assert!(at(z * 0.999) > target * 0.999, "z {z} is not the smallest");
        }
        assert!(calibrate(1e-9, 1.0, 1000, 1e-9).is_none());
    }

    #[test]
    fn nothing_spent_is_zero_and_more_rounds_cost_more() {
        assert_eq!(Accountant::default().epsilon(1e-5).epsilon, 0.0);
        let step = Step::gaussian(0.1, 1.0);
        let one = epsilon(&step, 10, 1e-5).epsilon;
        let two = epsilon(&step, 20, 1e-5).epsilon;
        assert!(one > 0.0 && two > one);
    }

    #[test]
    fn the_discrete_correction_only_adds() {
        let gaussian = Step::gaussian(0.05, 1.0);
        let discrete = Step {
            discrete_tau_d: 1e-3,
            ..gaussian
        };
        assert!(epsilon(&discrete, 100, 1e-6).epsilon > epsilon(&gaussian, 100, 1e-6).epsilon);
        // At realistic local noise the correction vanishes.
        let tau = discrete_gaussian_tau(100, 25.0);
        assert!(tau * 1e6 < 1e-100, "τ {tau}");
    }
}
