//! An exact sampler of the discrete Gaussian distribution
//! `P(x) ∝ exp(-x² / 2σ²)` over the integers, after Canonne, Kamath and
//! Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020),
//! Algorithms 1 to 3.
//!
//! Every decision is a comparison of integers drawn uniformly from the
//! injected cryptographically secure RNG: no floating point touches the
//! output, so its distribution is exactly the discrete Gaussian (floating-point
//! samplers leak through their rounding, which is why exactness matters here).
//! The variance is an integer (the requested one rounded up, which only adds
//! noise), which keeps every intermediate quantity within `u128`.

use rand::{CryptoRng, RngExt};

/// The largest variance accepted, `2^40` (σ ≈ 10⁶), so that every product below fits in `u128`.
pub const MAX_VARIANCE: u64 = 1 << 40;

/// A discrete Gaussian with mean 0 and integer variance parameter `σ²`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    variance: u64,
    /// `floor(σ) + 1`, the scale of the discrete Laplace proposal.
    t: u64,
}

/// A variance the sampler cannot use.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("discrete Gaussian variance must be a finite number in [0, 2^40], got {0}")]
pub struct VarianceError(pub f64);

impl DiscreteGaussian {
    /// The discrete Gaussian with variance parameter `variance`, rounded up to an integer.
    pub fn new(variance: f64) -> Result<Self, VarianceError> {
        if !variance.is_finite() || variance < 0.0 || variance > MAX_VARIANCE as f64 {
            return Err(VarianceError(variance));
        }
        let variance = variance.ceil() as u64;
        Ok(Self {
            variance,
            t: variance.isqrt() + 1,
        })
    }

    /// The variance parameter σ² actually used.
    pub fn variance(&self) -> u64 {
        self.variance
    }

    /// One sample (Algorithm 3): a discrete Laplace proposal, accepted with
    /// probability `exp(-(|y| - σ²/t)² / 2σ²)`.
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        if self.variance == 0 {
            return 0;
        }
        loop {
            let y = discrete_laplace(self.t, rng);
            // (|y| - σ²/t)² / 2σ²  =  (|y|·t - σ²)² / (2·σ²·t²)
            let Some(gamma) = acceptance_exponent(y.unsigned_abs(), self.t, self.variance) else {
                continue; // |y| beyond ~2^40 σ: probability far below 2^-1000
            };
            if bernoulli_exp(gamma, rng) {
                return y;
            }
        }
    }

    /// Fill `out` with independent samples.
    pub fn fill<R: CryptoRng + ?Sized>(&self, out: &mut [i64], rng: &mut R) {
        out.iter_mut().for_each(|x| *x = self.sample(rng));
    }
}

/// A non-negative rational `num / den`, `den > 0`.
#[derive(Debug, Clone, Copy)]
struct Ratio {
    num: u128,
    den: u128,
}

fn acceptance_exponent(abs_y: u64, t: u64, variance: u64) -> Option<Ratio> {
    let yt = u128::from(abs_y).checked_mul(u128::from(t))?;
    let diff = yt.abs_diff(u128::from(variance));
    let num = diff.checked_mul(diff)?;
    let den = 2u128
        .checked_mul(u128::from(variance))?
        .checked_mul(u128::from(t) * u128::from(t))?;
    Some(Ratio { num, den })
}

/// `true` with probability `num / den`.
fn bernoulli<R: CryptoRng + ?Sized>(num: u128, den: u128, rng: &mut R) -> bool {
    // Exact either way; a 64-bit draw is several times cheaper, and denominators
    // almost always fit.
    match u64::try_from(den) {
        Ok(den) => u128::from(rng.random_range(0..den)) < num,
        Err(_) => rng.random_range(0..den) < num,
    }
}

/// `true` with probability `exp(-γ)` (Algorithm 1).
fn bernoulli_exp<R: CryptoRng + ?Sized>(gamma: Ratio, rng: &mut R) -> bool {
    let whole = gamma.num / gamma.den;
    for _ in 0..whole {
        if !bernoulli_exp_at_most_one(1, 1, rng) {
            return false;
        }
    }
    bernoulli_exp_at_most_one(gamma.num % gamma.den, gamma.den, rng)
}

/// `true` with probability `exp(-num/den)` for `num ≤ den`: the parity of the
/// first `k` with `Bernoulli(γ/k)` false.
fn bernoulli_exp_at_most_one<R: CryptoRng + ?Sized>(num: u128, den: u128, rng: &mut R) -> bool {
    let mut k: u128 = 1;
    while bernoulli(num, den * k, rng) {
        k += 1;
    }
    k % 2 == 1
}

/// A discrete Laplace sample, `P(x) ∝ exp(-|x| / t)` (Algorithm 2, integer scale).
fn discrete_laplace<R: CryptoRng + ?Sized>(t: u64, rng: &mut R) -> i64 {
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp(
            Ratio {
                num: u128::from(u),
                den: u128::from(t),
            },
            rng,
        ) {
            continue;
        }
        let mut v: u64 = 0;
        while bernoulli_exp_at_most_one(1, 1, rng) {
            v += 1;
        }
        let magnitude = i64::try_from(u + t * v).unwrap_or(i64::MAX);
        let negative = rng.random::<bool>();
        if negative && magnitude == 0 {
            continue;
        }
        return if negative { -magnitude } else { magnitude };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The exact probability mass function, normalised over a wide enough range.
    fn pmf(variance: f64, range: i64) -> Vec<(i64, f64)> {
        let weights: Vec<(i64, f64)> = (-range..=range)
            .map(|x| (x, (-(x as f64).powi(2) / (2.0 * variance)).exp()))
            .collect();
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        weights.into_iter().map(|(x, w)| (x, w / total)).collect()
    }

    fn samples(variance: f64, n: usize, seed: u64) -> Vec<i64> {
        let sampler = DiscreteGaussian::new(variance).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = vec![0; n];
        sampler.fill(&mut out, &mut rng);
        out
    }

    #[test]
    fn moments_and_tails_match_the_distribution() {
        for variance in [1.0, 10.0, 1000.0] {
            let n = 200_000;
            let xs = samples(variance, n, 3);
            let mean = xs.iter().sum::<i64>() as f64 / n as f64;
            let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let exact = pmf(variance, (variance.sqrt() * 40.0) as i64 + 10);
            let exact_var: f64 = exact.iter().map(|(x, p)| (*x as f64).powi(2) * p).sum();
            // Standard errors: σ/√n for the mean, about σ²·√(2/n) for the variance.
            let sd = variance.sqrt();
            assert!(
                mean.abs() < 5.0 * sd / (n as f64).sqrt(),
                "σ²={variance}: mean {mean}"
            );
            assert!(
                (var - exact_var).abs() < 5.0 * exact_var * (2.0 / n as f64).sqrt(),
                "σ²={variance}: variance {var}, exact {exact_var}"
            );
            for k in [1.0, 2.0, 3.0] {
                let cut = k * sd;
                let observed =
                    xs.iter().filter(|&&x| (x as f64).abs() >= cut).count() as f64 / n as f64;
                let expected: f64 = exact
                    .iter()
                    .filter(|(x, _)| (*x as f64).abs() >= cut)
                    .map(|(_, p)| p)
                    .sum();
                let se = (expected * (1.0 - expected) / n as f64).sqrt();
                assert!(
                    (observed - expected).abs() < 5.0 * se + 1e-4,
                    "σ²={variance}: P(|X| ≥ {k}σ) = {observed}, exact {expected}"
                );
            }
        }
    }

    #[test]
    fn small_variance_gets_the_exact_point_masses() {
        let xs = samples(1.0, 100_000, 9);
        for (x, p) in pmf(1.0, 12).into_iter().filter(|(x, _)| x.abs() <= 2) {
            let observed = xs.iter().filter(|&&s| s == x).count() as f64 / xs.len() as f64;
            let se = (p * (1.0 - p) / xs.len() as f64).sqrt();
            assert!(
                (observed - p).abs() < 5.0 * se,
                "P({x}) = {observed}, exact {p}"
            );
        }
    }

    #[test]
    fn deterministic_under_a_seeded_rng() {
        assert_eq!(samples(50.0, 1000, 11), samples(50.0, 1000, 11));
        assert_ne!(samples(50.0, 1000, 11), samples(50.0, 1000, 12));
    }

    #[test]
    fn variance_is_rounded_up_and_checked() {
        assert_eq!(DiscreteGaussian::new(2.1).unwrap().variance(), 3);
        assert_eq!(
            DiscreteGaussian::new(0.0)
                .unwrap()
                .sample(&mut StdRng::seed_from_u64(1)),
            0
        );
        assert!(DiscreteGaussian::new(-1.0).is_err());
        assert!(DiscreteGaussian::new(f64::NAN).is_err());
        assert!(DiscreteGaussian::new(2f64.powi(41)).is_err());
    }
}
