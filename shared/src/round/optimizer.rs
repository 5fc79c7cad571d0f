//! The server optimizer: how the coordinator turns a round's mean update into
//! a step (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
//!
//! A round's mean update `Δ` (sites' new minus old parameters, averaged) is a
//! pseudo-gradient. Plain FedAvg adds `η·Δ`. FedAvgM keeps a velocity
//! `m ← β₁·m + Δ` and adds `η·m`. FedAdam keeps first and second moments,
//! `m ← β₁·m + (1 − β₁)·Δ`, `v ← β₂·v + (1 − β₂)·Δ²`, and adds
//! `η·m / (√v + τ)`; with τ of the order of a coordinate's typical update it
//! is a per-coordinate step size that keeps moving where private rounds'
//! updates are small and noisy. The moments are [`OptimizerState`], which the
//! coordinator commits with every model version so that a restart resumes
//! them exactly, together with the clip norm adaptive clipping has reached.

use serde::{Deserialize, Serialize};

/// Which server optimizer, and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptimizer {
    /// The update rule.
    pub kind: OptimizerKind,
    /// Step size η.
    pub learning_rate: f32,
    /// β₁: momentum (FedAvgM) or first-moment decay (FedAdam).
    pub momentum: f32,
    /// β₂: second-moment decay (FedAdam).
    pub beta2: f32,
    /// τ: FedAdam's adaptivity (larger is closer to momentum SGD).
    pub tau: f32,
}

/// The update rule of a [`ServerOptimizer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// FedAvg: `x ← x + η·Δ`.
    #[default]
    Sgd,
    /// FedAvgM: heavy-ball momentum on the mean update.
    Momentum,
    /// FedAdam.
    Adam,
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            learning_rate: 1.0,
            momentum: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// Why optimizer settings are refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum OptimizerError {
    /// A setting is out of range.
    #[error("server optimizer: {0}")]
    Setting(&'static str),
}

/// The optimizer's moments, one value per trained parameter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Steps taken.
    pub steps: u64,
    /// Velocity (FedAvgM) or first moment (FedAdam); empty before the first step.
    pub first: Vec<f32>,
    /// Second moment (FedAdam); empty otherwise.
    pub second: Vec<f32>,
    /// The clip norm adaptive clipping has moved to, if it has.
    pub clip_norm: Option<f32>,
}

impl ServerOptimizer {
    /// Check the settings.
    pub fn check(&self) -> Result<(), OptimizerError> {
        let unit = |v: f32| (0.0..1.0).contains(&v);
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(OptimizerError::Setting("learning_rate must be positive"));
        }
        if !unit(self.momentum) {
            return Err(OptimizerError::Setting("momentum must be in [0, 1)"));
        }
        if !unit(self.beta2) {
            return Err(OptimizerError::Setting("beta2 must be in [0, 1)"));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(OptimizerError::Setting("tau must be positive"));
        }
        Ok(())
    }

    /// Apply one round's mean update to `params` (the trained parameters),
    /// advancing `state`. A state of another length (a new lineage, a changed
    /// scope, a rollback) starts again from zero moments.
    pub fn step(&self, state: &mut OptimizerState, params: &mut [f32], update: &[f64]) {
        let n = params.len();
        let moments = match self.kind {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Momentum => 1,
            OptimizerKind::Adam => 2,
        };
        if state.first.len() != n * usize::from(moments >= 1)
            || state.second.len() != n * usize::from(moments >= 2)
        {
            *state = OptimizerState {
                steps: 0,
                first: vec![0.0; n * usize::from(moments >= 1)],
                second: vec![0.0; n * usize::from(moments >= 2)],
                clip_norm: state.clip_norm,
            };
        }
        state.steps += 1;
        let lr = f64::from(self.learning_rate);
        let (b1, b2, tau) = (
            f64::from(self.momentum),
            f64::from(self.beta2),
            f64::from(self.tau),
        );
        for (i, (p, &d)) in params.iter_mut().zip(update).enumerate() {
            let step = match self.kind {
                OptimizerKind::Sgd => d,
                OptimizerKind::Momentum => {
                    let m = b1 * f64::from(state.first[i]) + d;
                    state.first[i] = m as f32;
                    m
                }
                OptimizerKind::Adam => {
                    let m = b1 * f64::from(state.first[i]) + (1.0 - b1) * d;
                    let v = b2 * f64::from(state.second[i]) + (1.0 - b2) * d * d;
                    state.first[i] = m as f32;
                    state.second[i] = v as f32;
                    m / (v.sqrt() + tau)
                }
            };
            *p = (f64::from(*p) + lr * step) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: OptimizerKind, updates: &[[f64; 2]]) -> (Vec<f32>, OptimizerState) {
        let opt = ServerOptimizer {
            kind,
            learning_rate: 0.5,
            ..ServerOptimizer::default()
        };
        let mut state = OptimizerState::default();
        let mut params = vec![1.0f32, -1.0];
        for u in updates {
            opt.step(&mut state, &mut params, u);
        }
        (params, state)
    }

    #[test]
    fn sgd_adds_the_scaled_update() {
        let (params, state) = run(OptimizerKind::Sgd, &[[0.2, -0.4]]);
        assert_eq!(params, vec![1.1, -1.2]);
        assert!(state.first.is_empty() && state.steps == 1);
    }

    #[test]
    fn momentum_accumulates_a_velocity() {
        let (params, state) = run(OptimizerKind::Momentum, &[[1.0, 0.0], [1.0, 0.0]]);
        // Velocities 1 then 1.9: 1 + 0.5·(1 + 1.9).
        assert!((params[0] - 2.45).abs() < 1e-6, "{params:?}");
        assert_eq!(state.first, vec![1.9, 0.0]);
    }

    #[test]
    fn adam_normalises_each_coordinate() {
        // A constant update above τ moves its coordinate by about η per
        // step, whatever its scale: five orders of magnitude apart, the two
        // coordinates move alike.
        let (params, _) = run(OptimizerKind::Adam, &[[1e-2, 1e3]; 50]);
        let moved = [params[0] - 1.0, params[1] + 1.0];
        assert!(moved[0] > 0.8 * moved[1] && moved[1] > 10.0, "{moved:?}");
        // Without bias correction an early step is at most a few η.
        assert!(moved[1] < 3.0 * 0.5 * 50.0, "a few η a step: {moved:?}");
    }

    #[test]
    fn resuming_from_a_saved_state_is_exact() {
        let updates = [[0.3, -0.1], [0.2, 0.4], [-0.5, 0.1]];
        let (whole, _) = run(OptimizerKind::Adam, &updates);
        let (mut params, state) = run(OptimizerKind::Adam, &updates[..2]);
        let bytes = crate::wire::codec::encode(&state).unwrap();
        let mut restored: OptimizerState = crate::wire::codec::decode(&bytes).unwrap();
        let opt = ServerOptimizer {
            kind: OptimizerKind::Adam,
            learning_rate: 0.5,
            ..ServerOptimizer::default()
        };
        opt.step(&mut restored, &mut params, &updates[2]);
        assert_eq!(params, whole);
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = ServerOptimizer {
            momentum: 1.0,
            ..ServerOptimizer::default()
        };
        assert!(bad.check().is_err());
        assert!(ServerOptimizer::default().check().is_ok());
    }
}
