//! Local training: SGD on the site's examples, starting from a global model.

use burn::module::Module;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::Device;
use potluck_shared::dp::{Contribution, PrivacyUnit, RoundPrivacy};
use potluck_shared::model::{Batch, Example, GlobalModel, ModelError, ModelSpec, Recommender};
use potluck_shared::wire::TrainSettings;
use rand::seq::SliceRandom;
use rand::{CryptoRng, RngExt, SeedableRng};

use crate::dataset::SiteData;

/// Why local training could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The site has nothing to train on.
    #[error("no training examples: no consenting customer has two orders or more")]
    NoData,
    /// The model does not fit its spec.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Training diverged.
    #[error("training diverged (loss is not finite)")]
    Diverged,
}

/// The result of local training.
#[derive(Debug, Clone)]
pub struct Trained {
    /// New minus starting values of the trained parameters (the round's
    /// scope), in the canonical layout.
    pub delta: Vec<f32>,
    /// Mean training loss over the last epoch.
    pub loss: f32,
    /// Customers whose examples it was trained on: its weight in the average.
    pub customers: usize,
}

/// Train `params` of `spec` on `examples`; returns new parameters and the
/// mean last-epoch loss. Only the parameters in `settings.scope` move.
pub fn train_params(
    spec: &ModelSpec,
    params: &[f32],
    examples: &[Example],
    settings: &TrainSettings,
    seed: u64,
) -> Result<(Vec<f32>, f32), TrainError> {
    if examples.is_empty() {
        return Err(TrainError::NoData);
    }
    let device = Device::flex().autodiff();
    let frozen = spec.trainable(settings.scope).start;
    let mut model = Recommender::with_trainable(spec, params, frozen, &device)?;
    let mut optimizer = SgdConfig::new().init();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let batch_size = settings.batch_size.max(1) as usize;
    let mut last_loss = f32::NAN;
    for _ in 0..settings.epochs.max(1) {
        order.shuffle(&mut rng);
        let (mut total, mut batches) = (0.0f32, 0u32);
        for chunk in order.chunks(batch_size) {
            let refs: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
            let batch = Batch::new(&refs, spec.menu.len(), &device);
            let loss = model.loss(&batch);
            let value: f32 = loss.clone().into_scalar();
            if !value.is_finite() {
                return Err(TrainError::Diverged);
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(f64::from(settings.learning_rate), model, grads);
            total += value;
            batches += 1;
        }
        last_loss = total / batches as f32;
    }
    Ok((model.valid().to_params(), last_loss))
}

/// Train from a global model; returns the delta of the scope's parameters to send.
pub fn train(
    model: &GlobalModel,
    examples: &[Example],
    settings: &TrainSettings,
    seed: u64,
) -> Result<Trained, TrainError> {
    let (params, loss) = train_params(&model.spec, &model.params, examples, settings, seed)?;
    let range = model.spec.trainable(settings.scope);
    let delta = params[range.clone()]
        .iter()
        .zip(&model.params[range])
        .map(|(n, o)| n - o)
        .collect();
    Ok(Trained {
        delta,
        loss,
        customers: 1,
    })
}

/// Train from a global model on a site's whole training set.
pub fn train_site(
    model: &GlobalModel,
    data: &SiteData,
    settings: &TrainSettings,
    seed: u64,
) -> Result<Trained, TrainError> {
    let customers = data.customers.iter().filter(|r| !r.is_empty()).count();
    Ok(Trained {
        customers,
        ..train(model, &data.train, settings, seed)?
    })
}

/// The local-only baseline: `params` trained on one site's (or, for the
/// centralised reference, a pool's) examples alone for `rounds` rounds of
/// `settings`, seeded per round as a federation's rounds are.
pub fn train_rounds(
    spec: &ModelSpec,
    mut params: Vec<f32>,
    examples: &[Example],
    settings: &TrainSettings,
    rounds: u32,
    seed: u64,
) -> Result<Vec<f32>, TrainError> {
    for round in 0..rounds {
        params = train_params(spec, &params, examples, settings, seed + u64::from(round))?.0;
    }
    Ok(params)
}

/// A private round's contribution: per unit (each customer sampled with the
/// round's probability, or the whole site), the delta of local training from
/// the global model, clipped and rounded as [`Contribution::add`] does.
///
/// Sampling uses `rng`, a cryptographically secure generator: the privacy
/// amplification of sampling holds only if nobody can predict who was sampled.
/// A round where nobody is sampled still sends (pure noise), so silence
/// reveals nothing.
pub fn private_contribution<R: CryptoRng + ?Sized>(
    model: &GlobalModel,
    data: &SiteData,
    settings: &TrainSettings,
    privacy: &RoundPrivacy,
    rng: &mut R,
) -> Result<Contribution, TrainError> {
    let mut contribution = Contribution::new(model.spec.trainable(settings.scope).len());
    let units: Vec<&[Example]> = match privacy.unit {
        PrivacyUnit::Site => vec![&data.train[..]],
        PrivacyUnit::Customer => (0..data.customers.len())
            .filter(|_| rng.random::<f64>() < privacy.sampling_rate)
            .map(|c| data.customer_examples(c))
            .collect(),
    };
    for examples in units.into_iter().filter(|e| !e.is_empty()) {
        let trained = train(model, examples, settings, rng.random())?;
        contribution.add(privacy, trained.delta, rng);
    }
    Ok(contribution)
}
