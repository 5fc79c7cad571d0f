//! Differential-privacy building blocks applied to a site's update.
//!
//! In plain mode a site clips its whole update to L2 norm `C` and adds
//! continuous Gaussian noise before sending it. Secure aggregation and
//! distributed discrete Gaussian noise build on these bounds.

use rand::Rng;
use rand_distr::{Distribution, Normal};

pub mod accountant;
pub mod discrete_gaussian;
pub mod distributed;
pub mod ledger;

pub use accountant::{Accountant, Guarantee, Step};
pub use discrete_gaussian::DiscreteGaussian;
pub use distributed::{Contribution, PrivacyUnit, RoundPrivacy};
pub use ledger::{Cap, Ledger, LedgerEntry, Refusal, Spent, unix_seconds};

/// The L2 norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Scale `values` down so that their L2 norm is at most `bound`; return the norm before.
pub fn clip_l2(values: &mut [f32], bound: f32) -> f64 {
    let norm = l2_norm(values);
    if norm > f64::from(bound) && norm > 0.0 {
        let scale = (f64::from(bound) / norm) as f32;
        values.iter_mut().for_each(|v| *v *= scale);
    }
    norm
}

/// Add independent N(0, std²) noise to every value. A zero `std` adds nothing.
pub fn add_gaussian_noise<R: Rng + ?Sized>(values: &mut [f32], std: f32, rng: &mut R) {
    if std <= 0.0 || !std.is_finite() {
        return;
    }
    let normal = Normal::new(0.0f64, f64::from(std)).expect("std is positive and finite");
    for v in values.iter_mut() {
        *v += normal.sample(rng) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_direction() {
        let mut v = vec![3.0, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0), 5.0);
        assert!((l2_norm(&v) - 1.0).abs() < 1e-6);
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
        let mut small = vec![0.1, 0.1];
        clip_l2(&mut small, 1.0);
        assert_eq!(small, vec![0.1, 0.1]);
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut v = vec![0.0f32; 100_000];
        add_gaussian_noise(&mut v, 2.0, &mut rng);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
