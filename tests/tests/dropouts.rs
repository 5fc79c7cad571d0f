//! Secure aggregation over QUIC with sites that die mid-round.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use potluck_shared::round::{SecAggIdentity, SiteEvent, SiteSession};
use potluck_shared::secagg::{ClientMessage, PeerVerifier, SiteSigner};
use potluck_shared::tls::{self, Identity};
use potluck_shared::transport;
use potluck_shared::wire::{CoordinatorMessage, EvalCounts, SiteMessage};
use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, init_logging};

/// When a scripted site dies.
#[derive(Clone, Copy, PartialEq)]
enum Death {
    /// Closes its connection instead of sending its masked input.
    BeforeMaskedInput,
    /// Sends its masked input, then closes instead of signing the survivors.
    AfterMaskedInput,
}

/// A site that follows the protocol with a zero update until it dies.
async fn doomed_site(f: &Franchise, i: usize, addr: std::net::SocketAddr, death: Death) {
    let config = f.agent_config(i, addr).unwrap();
    let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key).unwrap();
    let secagg = SecAggIdentity {
        signer: Arc::new(SiteSigner::new(&identity.chain[0], &identity.key).unwrap()),
        verifier: PeerVerifier::new(identity.ca.clone()).unwrap(),
        floor: Default::default(),
        pins: Default::default(),
    };
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls::client_config(identity).unwrap());
    let connection = endpoint
        .connect(addr, tls::COORDINATOR_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut session = SiteSession::new("doomed", Some(secagg));
    let max = 1 << 26;
    let mut masked_sent = false;
    loop {
        while let Some(event) = session.poll_event() {
            match event {
                SiteEvent::ModelReceived(m) => {
                    session.handle_evaluated(m.version, EvalCounts::default())
                }
                SiteEvent::TrainRequested { task, model } => {
                    let trained = model.spec.trainable(task.settings.scope).len();
                    let nobody = potluck_shared::dp::Contribution::new(trained);
                    session.handle_contribution(&task, nobody, &mut rand::rng());
                }
                _ => {}
            }
        }
        while let Some(message) = session.poll_transmit() {
            let is_masked = matches!(
                message,
                SiteMessage::SecAgg {
                    message: ClientMessage::MaskedInput(_),
                    ..
                }
            );
            let is_signature = matches!(
                message,
                SiteMessage::SecAgg {
                    message: ClientMessage::SurvivorSignature(_),
                    ..
                }
            );
            if (is_masked && death == Death::BeforeMaskedInput)
                || (is_signature && death == Death::AfterMaskedInput)
            {
                connection.close(0u32.into(), b"killed");
                return;
            }
            masked_sent |= is_masked;
            transport::write_message(&mut send, &message, max)
                .await
                .unwrap();
        }
        let Ok(Some((message, _))) =
            transport::read_message::<CoordinatorMessage>(&mut recv, max).await
        else {
            panic!(
                "the coordinator closed before this site died (masked input sent: {masked_sent})"
            );
        };
        session
            .handle_message(message, SystemTime::now(), &mut rand::rng())
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_survives_sites_killed_during_and_after_masked_input() -> anyhow::Result<()> {
    init_logging();
    let mut f = Franchise::new(5, 30, 1)?;
    // Five sites gather into one cohort; threshold 3 and min_sites 3: two may die.
    f.coordinator.rounds.min_sites = 3;
    f.coordinator.rounds.cohort_wait_secs = 3.0;
    f.coordinator.secagg.threshold = Some(3);
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let configs = (0..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    let (during, after) = tokio::join!(
        doomed_site(&f, 3, coordinator.addr, Death::BeforeMaskedInput),
        doomed_site(&f, 4, coordinator.addr, Death::AfterMaskedInput),
    );
    let _ = (during, after);
    let summary = coordinator.finish(Duration::from_secs(120)).await?;
    agents.stop().await?;

    assert_eq!(summary.rounds_completed, 1);
    let metrics = f.metrics()?;
    let line = &metrics[0];
    assert_eq!(line["secure_aggregation"], true);
    // The site killed after its masked input is in the sum; the other is not.
    assert_eq!(line["participants"], 4, "{line}");
    assert_eq!(line["dropped"], 1, "{line}");
    // The surviving agents all received the new model.
    for i in 0..3 {
        let store = potluck_agent::store::SiteStore::open(&f.store_path(i)?)?;
        assert_eq!(store.model()?.unwrap().version.0, 1, "site {i}");
    }
    Ok(())
}
