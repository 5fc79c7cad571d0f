//! Fixed-point encoding of updates into integers modulo `2^bits`.
//!
//! A site clamps each coordinate to `[-bound, bound]`, multiplies by `scale`,
//! rounds randomly to a neighbouring integer (up with probability equal to the
//! fractional part, so the encoding is unbiased), and wraps modulo `2^bits`.
//! The sum of `n` encodings is decoded by lifting each coordinate to the
//! centred range `[-2^(bits-1), 2^(bits-1))` and dividing by `scale`.
//!
//! No overflow is possible when `n · (bound · scale + 1) < 2^(bits-1)`: every
//! encoded coordinate has magnitude at most `bound · scale + 1`.
//! [`Encoding::new`] picks the largest such `scale` for the cohort size.

use rand::{CryptoRng, RngExt};
use serde::{Deserialize, Serialize};

use super::crypto::modulus_mask;

/// Bits of resolution a single contribution must keep at `bound`.
const MIN_RESOLUTION_BITS: u32 = 10;

/// How updates are encoded for a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    /// Modulus bits, 16 to 32.
    pub bits: u32,
    /// Fixed-point scale.
    pub scale: f64,
    /// Coordinates are clamped to `[-bound, bound]` before encoding.
    pub bound: f32,
    /// Room kept below the modulus for the sum of the sites' noise, in integer units.
    #[serde(default)]
    pub noise_margin: f64,
}

/// Why no encoding fits.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum EncodingError {
    /// The modulus is outside 16 to 32 bits.
    #[error("modulus bits must be between 16 and 32, got {0}")]
    Bits(u32),
    /// The bound is not positive and finite.
    #[error("coordinate bound must be positive, got {0}")]
    Bound(f32),
    /// The scale is not positive and finite.
    #[error("fixed-point scale must be positive, got {0}")]
    Scale(f64),
    /// The noise margin is negative or not finite.
    #[error("noise margin must be finite and not negative, got {0}")]
    NoiseMargin(f64),
    /// The modulus is too small to sum this many sites at a useful resolution.
    #[error(
        "{bits}-bit modulus cannot sum {sites} updates at {MIN_RESOLUTION_BITS} bits of resolution; raise the modulus bits"
    )]
    TooSmall {
        /// Modulus bits.
        bits: u32,
        /// Sites to sum.
        sites: usize,
    },
}

impl Encoding {
    /// The finest encoding for summing up to `sites` vectors bounded by `bound`.
    pub fn new(bits: u32, bound: f32, sites: usize) -> Result<Self, EncodingError> {
        if !(16..=32).contains(&bits) {
            return Err(EncodingError::Bits(bits));
        }
        if !(bound.is_finite() && bound > 0.0) {
            return Err(EncodingError::Bound(bound));
        }
        let half = 2f64.powi(bits as i32 - 1);
        let n = sites.max(1) as f64;
        // n · (bound · scale + 1) < half, with one unit of slack.
        let scale = ((half - 1.0) / n - 1.0) / f64::from(bound);
        if scale * f64::from(bound) < f64::from(1u32 << MIN_RESOLUTION_BITS) {
            return Err(EncodingError::TooSmall { bits, sites });
        }
        Ok(Self {
            bits,
            scale,
            bound,
            noise_margin: 0.0,
        })
    }

    /// An encoding at a given `scale` that leaves `noise_margin` free for
    /// noise: the clamp bound is the largest that fits `sites` contributions.
    pub fn with_scale(
        bits: u32,
        scale: f64,
        sites: usize,
        noise_margin: f64,
    ) -> Result<Self, EncodingError> {
        if !(16..=32).contains(&bits) {
            return Err(EncodingError::Bits(bits));
        }
        let half = 2f64.powi(bits as i32 - 1);
        let per_site = ((half - 1.0 - noise_margin) / sites.max(1) as f64 - 1.0).floor();
        if !(scale.is_finite() && scale > 0.0) || per_site < 1.0 {
            return Err(EncodingError::TooSmall { bits, sites });
        }
        // The bound is an f32: round it down so that bound · scale stays within per_site.
        let mut bound = (per_site / scale) as f32;
        while f64::from(bound) * scale > per_site {
            bound = bound.next_down();
        }
        let encoding = Self {
            bits,
            scale,
            bound,
            noise_margin,
        };
        encoding.check(sites)?;
        Ok(encoding)
    }

    /// Check that every field is usable (a peer may send any value) and that
    /// summing `sites` encodings cannot overflow.
    pub fn check(&self, sites: usize) -> Result<(), EncodingError> {
        if !(16..=32).contains(&self.bits) {
            return Err(EncodingError::Bits(self.bits));
        }
        if !(self.bound.is_finite() && self.bound > 0.0) {
            return Err(EncodingError::Bound(self.bound));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(EncodingError::Scale(self.scale));
        }
        if !(self.noise_margin.is_finite() && self.noise_margin >= 0.0) {
            return Err(EncodingError::NoiseMargin(self.noise_margin));
        }
        let half = 2f64.powi(self.bits as i32 - 1);
        let worst = sites as f64 * (f64::from(self.bound) * self.scale + 1.0) + self.noise_margin;
        if (16..=32).contains(&self.bits) && worst < half {
            Ok(())
        } else {
            Err(EncodingError::TooSmall {
                bits: self.bits,
                sites,
            })
        }
    }

    /// Encode one update.
    pub fn encode<R: CryptoRng + ?Sized>(&self, values: &[f32], rng: &mut R) -> Vec<u32> {
        let mask = modulus_mask(self.bits);
        values
            .iter()
            .map(|&v| {
                let x = f64::from(v.clamp(-self.bound, self.bound)) * self.scale;
                let floor = x.floor();
                let up = rng.random::<f64>() < x - floor;
                let k = floor as i64 + i64::from(up);
                (k as u32) & mask // two's complement wrap, then modulo 2^bits
            })
            .collect()
    }

    /// Wrap integers (already scaled, clamped and noised) modulo `2^bits`.
    pub fn wrap(&self, values: &[i64]) -> Vec<u32> {
        let mask = modulus_mask(self.bits);
        values.iter().map(|&v| (v as u32) & mask).collect()
    }

    /// Decode a sum of encodings.
    pub fn decode_sum(&self, sum: &[u32]) -> Vec<f64> {
        let modulus = 1i64 << self.bits;
        let half = modulus / 2;
        sum.iter()
            .map(|&s| {
                let v = i64::from(s & modulus_mask(self.bits));
                let centred = if v >= half { v - modulus } else { v };
                centred as f64 / self.scale
            })
            .collect()
    }

    /// Add an encoding into a running sum, modulo `2^bits`.
    pub fn accumulate(&self, acc: &mut [u32], values: &[u32]) {
        let mask = modulus_mask(self.bits);
        for (a, v) in acc.iter_mut().zip(values) {
            *a = a.wrapping_add(*v) & mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn scale_fits_the_cohort_and_small_moduli_are_refused() {
        let e = Encoding::new(32, 2.0, 500).unwrap();
        e.check(500).unwrap();
        assert!(e.check(501).is_err());
        assert!(matches!(
            Encoding::new(16, 2.0, 500),
            Err(EncodingError::TooSmall { .. })
        ));
        assert!(Encoding::new(8, 2.0, 3).is_err());
    }

    proptest! {
        #[test]
        fn a_scale_with_room_left_gives_an_encoding_that_passes_its_check(
            scale in 0.5f64..1e5,
            sites in 3usize..600,
            margin_frac in 0.0f64..0.9,
        ) {
            let margin = margin_frac * 2f64.powi(31);
            let encoding = Encoding::with_scale(32, scale, sites, margin);
            prop_assert!(encoding.is_ok(), "{encoding:?}");
            let encoding = encoding.unwrap();
            prop_assert!(encoding.check(sites).is_ok());
            prop_assert!(encoding.check(sites + 1).is_err());
        }
    }

    #[test]
    fn the_worst_case_sum_does_not_overflow() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let e = Encoding::new(24, 1.0, 100).unwrap();
        let mut acc = vec![0u32; 2];
        for _ in 0..100 {
            e.accumulate(&mut acc, &e.encode(&[1.0, -1.0], &mut rng));
        }
        let sum = e.decode_sum(&acc);
        assert!(
            (sum[0] - 100.0).abs() < 0.1 && (sum[1] + 100.0).abs() < 0.1,
            "{sum:?}"
        );
    }

    proptest! {
        #[test]
        fn decoding_recovers_the_sum_up_to_rounding(
            vectors in proptest::collection::vec(proptest::collection::vec(-2.0f32..2.0, 8), 1..40),
            seed in any::<u64>(),
        ) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let e = Encoding::new(32, 2.0, vectors.len()).unwrap();
            let mut acc = vec![0u32; 8];
            for v in &vectors {
                e.accumulate(&mut acc, &e.encode(v, &mut rng));
            }
            let decoded = e.decode_sum(&acc);
            for (i, d) in decoded.iter().enumerate() {
                let exact: f64 = vectors.iter().map(|v| f64::from(v[i])).sum();
                // Each randomized rounding errs by less than one unit.
                prop_assert!((d - exact).abs() <= vectors.len() as f64 / e.scale + 1e-6);
            }
        }
    }
}
