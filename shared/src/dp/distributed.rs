//! Distributed differential privacy: every site adds its share of discrete
//! Gaussian noise to an integer update inside secure aggregation, so the sum
//! the coordinator unmasks carries the noise the privacy guarantee needs and
//! nobody ever sees a less noisy value.
//!
//! A site's vector, per round (Kairouz, Liu and Steinke, ICML 2021):
//! 1. Each *unit* (a sampled customer, or the whole site) contributes
//!    `v = (clip(δ, C·√(1 − 1/16)), C/4)`: its model delta clipped, then a
//!    count coordinate, so that `‖v‖₂ ≤ C` and the coordinator can divide by a
//!    (noisy) number of customers without ever learning a site's count.
//! 2. `v·γ` is rounded randomly to integers, coordinate by coordinate, and the
//!    rounding is drawn again until its L2 norm is at most
//!    `Δ = min(√(c² + D/4 + √(2 ln(1/β))·(c + √D/2)), c + √D)`, with
//!    `c = Cγ`, `β = e^(−1/2)` and `D` the vector length (their conditional
//!    randomized rounding). One unit then moves the integer sum by at most Δ.
//! 3. The site adds its units' integer vectors, clamps each coordinate to
//!    `±B` (1-Lipschitz, so the sensitivity stays Δ), adds discrete Gaussian
//!    noise of variance `σ² = (zΔ)²/t` to every coordinate, and wraps modulo
//!    `2^bits`. With at least `t` survivors the sum carries variance `≥ (zΔ)²`.
//! 4. `B` is the largest clamp with `n·B + 14·√n·σ < 2^(bits−1)`: overflow
//!    needs a sum of `n` discrete Gaussians beyond 14 standard deviations
//!    (probability below 10⁻⁴⁰ per coordinate).

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use super::accountant::{Step, discrete_gaussian_tau};
use super::{DiscreteGaussian, clip_l2};
use crate::secagg::{Encoding, EncodingError};

/// Whose privacy the noise protects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyUnit {
    /// One customer: each sampled customer's contribution is clipped (the default).
    #[default]
    Customer,
    /// One site: the whole site's update is clipped (for franchises of thousands of sites).
    Site,
}

impl std::fmt::Display for PrivacyUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrivacyUnit::Customer => "customer",
            PrivacyUnit::Site => "site",
        })
    }
}

impl PrivacyUnit {
    /// The probability that a unit takes part in a round, given the customer
    /// sampling rate: with the site unit the whole site's data always does.
    pub fn sampling_rate(self, customer_rate: f64) -> f64 {
        match self {
            PrivacyUnit::Customer => customer_rate,
            PrivacyUnit::Site => 1.0,
        }
    }
}

/// The value of the count coordinate, and of the unclipped flag, as a
/// fraction of the clip norm.
const COUNT_FRACTION: f32 = 0.25;

/// Coordinates a private unit's vector has after its model delta: the count,
/// then the flag that its delta was not clipped (for adaptive clipping).
pub const PRIVATE_EXTRA: usize = 2;
/// Integer units per unit of clip norm, per square root of the vector length:
/// large enough that rounding inflates the sensitivity by well under 1%.
const RESOLUTION: f64 = 10.0;
/// Standard deviations of the summed noise kept free below the modulus.
const NOISE_MARGIN_SDS: f64 = 14.0;
/// `ln(1/β)` of the conditional rounding.
const ROUNDING_LOG_INV_BETA: f64 = 0.5;

/// A round's differential privacy, as the coordinator asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// The model lineage whose budget this round spends.
    pub lineage: String,
    /// Whose privacy is protected.
    pub unit: PrivacyUnit,
    /// Probability that a consenting customer is sampled this round (1 for the site unit).
    pub sampling_rate: f64,
    /// Noise standard deviation on the sum over the sensitivity (z).
    pub noise_multiplier: f64,
    /// L2 bound C of one unit's contribution.
    pub clip_norm: f32,
    /// The δ the budget is stated at.
    pub delta: f64,
    /// Integer units per unit of update (γ).
    pub scale: f64,
    /// Δ: the L2 bound of one rounded contribution, in integer units.
    pub rounded_bound: f64,
    /// Variance of the discrete Gaussian each site adds to each coordinate.
    pub local_variance: f64,
    /// Noise multiplier of the site's one-off, local release of its
    /// popularity prior for this lineage; 0: train without a prior.
    pub prior_noise_multiplier: f64,
}

/// What a site's one-off release of its popularity prior with this noise
/// multiplier costs each of its customers (every customer is in it, with
/// sensitivity 1); `None` for 0, no release. The one definition the
/// coordinator's calibration, its ledger and every site's ledger use.
pub fn prior_step(noise_multiplier: f64) -> Option<Step> {
    (noise_multiplier > 0.0).then(|| Step::gaussian(1.0, noise_multiplier))
}

/// Coordinates a site's vector has after its trained parameters: the count
/// and the unclipped flag in a private round, the loss and the weight in a
/// plain secure one.
pub fn extra_coordinates(private: bool) -> usize {
    if private { PRIVATE_EXTRA } else { 2 }
}

/// The smallest prior noise multiplier a site accepts: below it the one-off
/// release would cost more than a whole run of rounds.
pub const MIN_PRIOR_NOISE: f64 = 2.0;

/// Why a round's privacy cannot be set up.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum PrivacyError {
    /// A setting out of range.
    #[error("privacy setting {0}")]
    Setting(String),
    /// The modulus cannot hold the noisy sum.
    #[error(transparent)]
    Encoding(#[from] EncodingError),
}

/// Kairouz et al.'s bound on the L2 norm of a conditionally rounded vector of
/// norm at most `c`, length `d`.
pub fn rounded_l2_bound(c: f64, d: usize) -> f64 {
    let d = d as f64;
    let inflated =
        (c * c + d / 4.0 + (2.0 * ROUNDING_LOG_INV_BETA).sqrt() * (c + d.sqrt() / 2.0)).sqrt();
    inflated.min(c + d.sqrt())
}

impl RoundPrivacy {
    /// Parameters and encoding for a cohort of `sites`, threshold `threshold`,
    /// summing vectors of `length` (the model's parameters plus the count).
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        lineage: &str,
        unit: PrivacyUnit,
        sampling_rate: f64,
        noise_multiplier: f64,
        clip_norm: f32,
        delta: f64,
        length: usize,
        sites: usize,
        threshold: usize,
        bits: u32,
    ) -> Result<(Self, Encoding), PrivacyError> {
        let bad = |what: String| Err(PrivacyError::Setting(what));
        if !(sampling_rate > 0.0 && sampling_rate <= 1.0) {
            return bad(format!(
                "sampling_rate must be in (0, 1], got {sampling_rate}"
            ));
        }
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return bad(format!(
                "noise_multiplier must be positive, got {noise_multiplier}"
            ));
        }
        if !(clip_norm.is_finite() && clip_norm > 0.0) {
            return bad(format!("clip_norm must be positive, got {clip_norm}"));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return bad(format!("delta must be in (0, 1), got {delta}"));
        }
        if threshold == 0 || threshold > sites {
            return bad(format!("threshold {threshold} for {sites} sites"));
        }
        let scale = RESOLUTION * (length as f64).sqrt() / f64::from(clip_norm);
        let rounded_bound = rounded_l2_bound(f64::from(clip_norm) * scale, length);
        let local_variance = (noise_multiplier * rounded_bound).powi(2) / threshold as f64;
        let privacy = Self {
            lineage: lineage.to_string(),
            unit,
            sampling_rate,
            noise_multiplier,
            clip_norm,
            delta,
            scale,
            rounded_bound,
            local_variance,
            prior_noise_multiplier: 0.0,
        };
        let encoding = privacy.encoding(bits, sites)?;
        Ok((privacy, encoding))
    }

    /// What a site checks before using a round's parameters: they must be in
    /// range, and the rounding bound at least Kairouz et al.'s bound for this
    /// clip norm and scale, so the bound the site's accountant assumes holds
    /// whatever the coordinator sent.
    pub fn check(&self, length: usize) -> Result<(), PrivacyError> {
        let bad = |what: String| Err(PrivacyError::Setting(what));
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return bad(format!(
                "sampling_rate {} outside (0, 1]",
                self.sampling_rate
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return bad(format!("clip_norm {}", self.clip_norm));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("scale {}", self.scale));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("delta {}", self.delta));
        }
        if !(self.local_variance.is_finite() && self.local_variance >= 0.0) {
            return bad(format!("local_variance {}", self.local_variance));
        }
        let prior = self.prior_noise_multiplier;
        if !(prior == 0.0 || (prior.is_finite() && prior >= MIN_PRIOR_NOISE)) {
            return bad(format!(
                "prior_noise_multiplier {prior}: 0 or at least {MIN_PRIOR_NOISE}"
            ));
        }
        let needed = rounded_l2_bound(f64::from(self.clip_norm) * self.scale, length);
        // NaN fails too.
        if self.rounded_bound.is_nan() || self.rounded_bound < needed * (1.0 - 1e-12) {
            return bad(format!(
                "rounded_bound {} is below the bound {needed} of this clip norm and scale",
                self.rounded_bound
            ));
        }
        Ok(())
    }

    /// The encoding with room for `sites` noisy contributions.
    fn encoding(&self, bits: u32, sites: usize) -> Result<Encoding, PrivacyError> {
        let margin = NOISE_MARGIN_SDS * (sites as f64 * self.local_variance.ceil()).sqrt();
        let encoding = Encoding::with_scale(bits, self.scale, sites, margin)?;
        if f64::from(encoding.bound) * self.scale < self.rounded_bound {
            return Err(EncodingError::TooSmall { bits, sites }.into());
        }
        Ok(encoding)
    }

    /// What one round of this costs, as a site with this `threshold` and a
    /// cohort of `sites` enforces it: the noise it adds and the bound it rounds to.
    pub fn step(&self, sites: usize, threshold: usize, length: usize) -> Step {
        let variance = self.local_variance.ceil();
        Step {
            sampling_rate: self.unit.sampling_rate(self.sampling_rate),
            noise_multiplier: (threshold as f64 * variance).sqrt() / self.rounded_bound,
            discrete_tau_d: discrete_gaussian_tau(sites, variance) * length as f64,
        }
    }

    /// What this site's one-off release of its popularity prior costs each
    /// customer (see the agent's `dataset` module), if the round uses one.
    pub fn prior_step(&self) -> Option<Step> {
        prior_step(self.prior_noise_multiplier)
    }

    /// The count coordinate's value per unit.
    pub fn count_weight(&self) -> f32 {
        self.clip_norm * COUNT_FRACTION
    }

    /// Split a decoded sum into the mean update, the (noisy) number of units
    /// and the (noisy) number of them whose delta was not clipped.
    pub fn mean_update(&self, mut sum: Vec<f64>) -> PrivateMean {
        let weight = f64::from(self.count_weight());
        let unclipped = sum.pop().unwrap_or(0.0) / weight;
        let count = sum.pop().unwrap_or(0.0) / weight;
        let divisor = count.max(1.0);
        sum.iter_mut().for_each(|v| *v /= divisor);
        PrivateMean {
            mean: sum,
            count,
            unclipped,
        }
    }

    /// Standard deviation of the noise in each coordinate of the mean update
    /// over `count` units, with at least `threshold` survivors adding noise.
    pub fn noise_sd_of_mean(&self, threshold: usize, count: f64) -> f64 {
        (threshold as f64 * self.local_variance.ceil()).sqrt() / self.scale / count.max(1.0)
    }
}

/// A private round's decoded sum, as the coordinator uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivateMean {
    /// The mean model delta over the units.
    pub mean: Vec<f64>,
    /// The noisy number of units.
    pub count: f64,
    /// The noisy number of units whose delta was within the clip norm.
    pub unclipped: f64,
}

impl PrivateMean {
    /// The noisy share of units whose delta was clipped, within [0, 1].
    pub fn clipped_fraction(&self) -> f64 {
        if self.count <= 0.0 {
            return 0.0;
        }
        (1.0 - self.unclipped / self.count).clamp(0.0, 1.0)
    }
}

/// A site's integer contribution to a private round, built unit by unit.
#[derive(Debug, Clone)]
pub struct Contribution {
    sum: Vec<i64>,
    units: usize,
    /// One unit's rounded vector, kept to spare an allocation per unit.
    rounded: Vec<i64>,
}

impl Contribution {
    /// An empty contribution to a model of `params` parameters (and the
    /// count and the unclipped flag).
    pub fn new(params: usize) -> Self {
        Self::of_length(params + PRIVATE_EXTRA)
    }

    /// An empty contribution of vectors of `length` values, with no count
    /// coordinate (a fairness audit counts in its own slots).
    pub fn of_length(length: usize) -> Self {
        Self {
            sum: vec![0; length],
            units: 0,
            rounded: Vec::new(),
        }
    }

    /// Units added so far.
    pub fn units(&self) -> usize {
        self.units
    }

    /// Add one unit's model delta: clipped, with its count and whether it
    /// was within the clip bound, rounded within Δ.
    ///
    /// The flag is inside the unit's norm bound (`‖(δ, C/4, C/4)‖ ≤ C`), so
    /// estimating the clipped share for adaptive clipping (Andrew et al.
    /// 2021) costs no privacy beyond the round's own.
    pub fn add<R: CryptoRng + ?Sized>(
        &mut self,
        privacy: &RoundPrivacy,
        mut delta: Vec<f32>,
        rng: &mut R,
    ) {
        let weight = privacy.count_weight();
        let delta_bound = (privacy.clip_norm.powi(2) - 2.0 * weight.powi(2)).sqrt();
        let unclipped = crate::dp::l2_norm(&delta) <= f64::from(delta_bound);
        clip_l2(&mut delta, delta_bound);
        delta.push(weight);
        delta.push(if unclipped { weight } else { 0.0 });
        self.add_vector(privacy, delta, rng);
    }

    /// Add one unit's whole vector: clipped to the clip norm, rounded within Δ.
    pub fn add_vector<R: CryptoRng + ?Sized>(
        &mut self,
        privacy: &RoundPrivacy,
        mut vector: Vec<f32>,
        rng: &mut R,
    ) {
        clip_l2(&mut vector, privacy.clip_norm);
        conditional_round(
            &vector,
            privacy.scale,
            privacy.rounded_bound,
            rng,
            &mut self.rounded,
        );
        for (acc, r) in self.sum.iter_mut().zip(&self.rounded) {
            *acc += r;
        }
        self.units += 1;
    }

    /// Add one unit's sparse vector, `(index, value)` with distinct indices
    /// below the length: the same as [`Self::add_vector`] of its dense form,
    /// since a zero always rounds to zero, at the cost of its non-zeros only.
    pub fn add_sparse<R: CryptoRng + ?Sized>(
        &mut self,
        privacy: &RoundPrivacy,
        indices: &[usize],
        mut values: Vec<f32>,
        rng: &mut R,
    ) {
        clip_l2(&mut values, privacy.clip_norm);
        conditional_round(
            &values,
            privacy.scale,
            privacy.rounded_bound,
            rng,
            &mut self.rounded,
        );
        for (&i, r) in indices.iter().zip(&self.rounded) {
            if let Some(acc) = self.sum.get_mut(i) {
                *acc += r;
            }
        }
        self.units += 1;
    }

    /// Clamp, add this site's discrete Gaussian noise, and wrap for secure aggregation.
    pub fn finish<R: CryptoRng + ?Sized>(
        self,
        privacy: &RoundPrivacy,
        encoding: &Encoding,
        rng: &mut R,
    ) -> Result<Vec<u32>, PrivacyError> {
        let noise = DiscreteGaussian::new(privacy.local_variance)
            .map_err(|e| PrivacyError::Setting(e.to_string()))?;
        let clamp = (f64::from(encoding.bound) * encoding.scale).floor() as i64;
        let noisy: Vec<i64> = self
            .sum
            .iter()
            .map(|&v| v.clamp(-clamp, clamp) + noise.sample(rng))
            .collect();
        Ok(encoding.wrap(&noisy))
    }

    /// The integer sum before noise (for tests of sensitivity).
    pub fn raw(&self) -> &[i64] {
        &self.sum
    }
}

/// Round `values·scale` randomly into `out`, retrying until the L2 norm is
/// within `bound`; after 1000 failures (probability below 10⁻²⁰⁰) round
/// toward zero, which never increases the norm.
///
/// Each coordinate rounds up with probability its fractional part, drawn with
/// 32 random bits: unbiased to within 2⁻³², far below the noise. Privacy
/// rests only on the norm bound, which is checked exactly.
fn conditional_round<R: CryptoRng + ?Sized>(
    values: &[f32],
    scale: f64,
    bound: f64,
    rng: &mut R,
    out: &mut Vec<i64>,
) {
    const WORDS: usize = 1024;
    out.clear();
    out.resize(values.len(), 0);
    let mut random = [0u8; 4 * WORDS];
    for _ in 0..1000 {
        let mut norm2 = 0.0f64;
        for (out, values) in out.chunks_mut(WORDS).zip(values.chunks(WORDS)) {
            rng.fill_bytes(&mut random);
            for ((o, &v), bits) in out.iter_mut().zip(values).zip(random.chunks_exact(4)) {
                let x = f64::from(v) * scale;
                let floor = floor(x);
                let uniform = f64::from(u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]]));
                *o = floor as i64 + i64::from(uniform < (x - floor) * 4_294_967_296.0);
                norm2 += (*o as f64).powi(2);
            }
        }
        if norm2 <= bound * bound {
            return;
        }
    }
    for (o, &v) in out.iter_mut().zip(values) {
        *o = (f64::from(v) * scale).trunc() as i64;
    }
}

/// `x.floor()` for the magnitudes rounding meets, without a call into libm
/// (the baseline x86-64 target has no rounding instruction).
fn floor(x: f64) -> f64 {
    let truncated = x as i64 as f64;
    if truncated > x {
        truncated - 1.0
    } else {
        truncated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn plan(unit: PrivacyUnit) -> (RoundPrivacy, Encoding) {
        RoundPrivacy::plan("test", unit, 0.1, 1.0, 1.0, 1e-6, 102, 5, 4, 32).unwrap()
    }

    fn norm(v: &[i64]) -> f64 {
        v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn a_sparse_unit_adds_what_its_dense_form_adds_and_stays_within_delta() {
        let (privacy, _) = plan(PrivacyUnit::Customer);
        let mut rng = StdRng::seed_from_u64(3);
        // Values on the integer grid round exactly, whatever the draw.
        let grid = |k: f64| (k / privacy.scale) as f32;
        let indices = [3usize, 40, 101];
        let values = vec![grid(2.0), grid(-5.0), grid(7.0)];
        let mut dense_vector = vec![0.0f32; 102];
        for (&i, &v) in indices.iter().zip(&values) {
            dense_vector[i] = v;
        }
        let mut sparse = Contribution::of_length(102);
        sparse.add_sparse(&privacy, &indices, values, &mut rng);
        let mut dense = Contribution::of_length(102);
        dense.add_vector(&privacy, dense_vector, &mut rng);
        assert_eq!(sparse.raw(), dense.raw());
        assert_eq!(sparse.raw()[40], -5);
        // Far beyond the clip norm: clipped, then rounded within Δ.
        let mut big = Contribution::of_length(102);
        big.add_sparse(&privacy, &[0, 1], vec![50.0, -80.0], &mut rng);
        assert!(norm(big.raw()) <= privacy.rounded_bound);
        assert!(norm(big.raw()) >= 0.9 * f64::from(privacy.clip_norm) * privacy.scale);
    }

    #[test]
    fn each_unit_is_bounded_and_one_removal_moves_the_sum_by_at_most_delta() {
        let (privacy, _) = plan(PrivacyUnit::Customer);
        let customers: Vec<Vec<f32>> = (0..20)
            .map(|i| {
                (0..100)
                    .map(|j| ((i * 31 + j * 7) % 13) as f32 - 6.0)
                    .collect()
            })
            .collect();
        let mut all = Contribution::new(100);
        let mut without_last = Contribution::new(100);
        for (i, delta) in customers.iter().enumerate() {
            let mut one = Contribution::new(100);
            let mut seeded = StdRng::seed_from_u64(i as u64);
            one.add(&privacy, delta.clone(), &mut seeded);
            assert!(norm(one.raw()) <= privacy.rounded_bound, "customer {i}");
            all.add(
                &privacy,
                delta.clone(),
                &mut StdRng::seed_from_u64(i as u64),
            );
            if i + 1 < customers.len() {
                without_last.add(
                    &privacy,
                    delta.clone(),
                    &mut StdRng::seed_from_u64(i as u64),
                );
            }
        }
        let diff: Vec<i64> = all
            .raw()
            .iter()
            .zip(without_last.raw())
            .map(|(a, b)| a - b)
            .collect();
        assert!(norm(&diff) <= privacy.rounded_bound);
        // The clipped float contribution has norm C; rounding inflates it by under 1%.
        assert!(privacy.rounded_bound <= 1.01 * f64::from(privacy.clip_norm) * privacy.scale);
    }

    #[test]
    fn the_noisy_sum_decodes_to_the_mean_within_the_noise() {
        let (privacy, encoding) = plan(PrivacyUnit::Customer);
        let mut rng = StdRng::seed_from_u64(7);
        let mut sum = vec![0u32; 102];
        let per_site = 50;
        for _ in 0..5 {
            let mut site = Contribution::new(100);
            for _ in 0..per_site {
                site.add(&privacy, vec![0.01; 100], &mut rng);
            }
            encoding.accumulate(
                &mut sum,
                &site.finish(&privacy, &encoding, &mut rng).unwrap(),
            );
        }
        let PrivateMean {
            mean,
            count,
            unclipped,
        } = privacy.mean_update(encoding.decode_sum(&sum));
        assert!(
            (unclipped - 250.0).abs() < 10.0,
            "nothing was clipped: {unclipped}"
        );
        let sd_count = (5.0 * privacy.local_variance).sqrt()
            / privacy.scale
            / f64::from(privacy.count_weight());
        assert!((count - 250.0).abs() < 5.0 * sd_count, "count {count}");
        let avg = mean.iter().sum::<f64>() / mean.len() as f64;
        assert!((avg - 0.01).abs() < 0.002, "mean {avg}");
    }

    #[test]
    fn accounting_uses_the_noise_the_site_adds() {
        let (privacy, _) = plan(PrivacyUnit::Site);
        let step = privacy.step(5, 4, 101);
        assert!(step.noise_multiplier >= 1.0 && step.noise_multiplier < 1.001);
        assert!(step.discrete_tau_d < 1e-30);
        // Fewer guaranteed survivors means less noise in the sum.
        assert!(privacy.step(5, 2, 101).noise_multiplier < 0.75);
    }

    #[test]
    fn a_site_refuses_a_rounding_bound_below_what_the_clip_norm_needs() {
        let (mut privacy, _) = plan(PrivacyUnit::Customer);
        privacy.check(102).unwrap();
        privacy.rounded_bound /= 2.0;
        let err = privacy.check(102).unwrap_err().to_string();
        assert!(err.contains("rounded_bound"), "{err}");
        let (mut privacy, _) = plan(PrivacyUnit::Customer);
        privacy.sampling_rate = 0.0;
        assert!(privacy.check(102).is_err());
    }

    #[test]
    fn bad_settings_are_named() {
        let err = RoundPrivacy::plan(
            "x",
            PrivacyUnit::Customer,
            1.5,
            1.0,
            1.0,
            1e-6,
            10,
            3,
            3,
            32,
        )
        .unwrap_err();
        assert!(err.to_string().contains("sampling_rate"), "{err}");
        let err = RoundPrivacy::plan(
            "x",
            PrivacyUnit::Customer,
            0.1,
            1.0,
            1.0,
            1e-6,
            10_000,
            30,
            20,
            16,
        )
        .unwrap_err();
        assert!(err.to_string().contains("modulus"), "{err}");
    }
}
