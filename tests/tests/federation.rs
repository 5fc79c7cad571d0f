//! Whole federations over loopback QUIC with mutual TLS, in one process.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use potluck_shared::SiteId;
use potluck_shared::tls::{self, Credentials, Identity, Validity};
use potluck_shared::transport::{self, CloseCode};
use potluck_shared::wire::{CoordinatorMessage, PROTOCOL_VERSION, SiteMessage};
use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, agent_config, init_logging};

const LIMIT: Duration = Duration::from_secs(240);

fn ca_credentials(f: &Franchise) -> Credentials {
    Credentials {
        cert_pem: std::fs::read_to_string(f.pki.ca_cert()).unwrap(),
        key_pem: std::fs::read_to_string(f.pki.ca_key()).unwrap(),
    }
}

fn write_bundle(dir: &std::path::Path, ca_pem: &str, creds: &Credentials) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("site.pem"), &creds.cert_pem).unwrap();
    std::fs::write(dir.join("site.key"), &creds.key_pem).unwrap();
}

/// A raw QUIC client holding `creds`, trusting the franchise CA.
fn raw_endpoint(ca_pem: &str, creds: &Credentials) -> quinn::Endpoint {
    let identity = Identity::from_pem(ca_pem, creds).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls::client_config(identity).unwrap());
    endpoint
}

/// A client that presents no certificate at all.
fn anonymous_endpoint(ca_pem: &str) -> quinn::Endpoint {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![potluck_shared::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Connect, and report whether the coordinator let us open a stream and say hello.
async fn handshake_accepted(endpoint: &quinn::Endpoint, addr: std::net::SocketAddr) -> bool {
    let Ok(connecting) = endpoint.connect(addr, tls::COORDINATOR_NAME) else {
        return false;
    };
    let Ok(connection) = connecting.await else {
        return false;
    };
    // With TLS 1.3 the client may finish before the server has checked its certificate:
    // a refused client learns it when its first exchange fails.
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await.ok()?;
        let hello = SiteMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "raw".into(),
        };
        transport::write_message(&mut send, &hello, 1 << 20)
            .await
            .ok()?;
        transport::read_message::<CoordinatorMessage>(&mut recv, 1 << 20)
            .await
            .ok()?
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), exchange).await,
        Ok(Some((CoordinatorMessage::Welcome { .. }, _)))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_train_three_rounds_over_quic() -> anyhow::Result<()> {
    init_logging();
    let f = Franchise::new(3, 40, 3)?;
    let summary = f.run_all(LIMIT).await?;

    assert_eq!(summary.rounds_completed, 3);
    assert_eq!(summary.model_version, 3);
    let metrics = f.metrics()?;
    assert_eq!(metrics.len(), 3);
    for (i, line) in metrics.iter().enumerate() {
        // Round 1 is the lineage's neighbour census, which trains nothing.
        assert_eq!(line["round"], i as u64 + 2);
        assert_eq!(
            line["model_version"],
            i as u64 + 1,
            "the version advances each round"
        );
        assert_eq!(line["participants"], 3);
        assert_eq!(line["eval_sites"], 3);
        let hr = line["eval_hr_at_10"].as_f64().expect("HR@10 is reported");
        assert!((0.0..=1.0).contains(&hr) && hr > 0.0, "HR@10 {hr}");
        assert!(line["baseline_popularity_hr_at_10"].as_f64().is_some());
        assert!(line["bytes_received"].as_u64().unwrap() > 0);
        assert_eq!(
            line["secure_aggregation"], true,
            "secure aggregation is on by default"
        );
        assert_eq!(line["dropped"], 0);
        assert!(line["phase_seconds"]["unmask"].as_f64().is_some(), "{line}");
        let epsilon = line["epsilon"]
            .as_f64()
            .expect("differential privacy is on by default");
        assert!(
            epsilon > 0.0 && epsilon <= 4.0,
            "within the default budget: {line}"
        );
        for field in ["delta", "noise_multiplier", "sampling_rate", "clip_norm"] {
            assert!(line[field].as_f64().is_some(), "{field} in {line}");
        }
    }
    let epsilons: Vec<f64> = metrics
        .iter()
        .map(|l| l["epsilon"].as_f64().unwrap())
        .collect();
    assert!(
        epsilons.windows(2).all(|w| w[0] < w[1]),
        "ε grows: {epsilons:?}"
    );
    // Every model version is stored, and the agents hold the last one.
    let versions: Vec<u64> = f.state()?.models()?.iter().map(|m| m.version).collect();
    assert_eq!(versions, [0, 1, 2, 3]);
    let store = potluck_agent::store::SiteStore::open(&f.store_path(0)?)?;
    assert_eq!(
        store.model()?.expect("the agent kept the model").version.0,
        3
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_with_bad_identities_are_refused_and_the_round_proceeds() -> anyhow::Result<()> {
    init_logging();
    let f = Franchise::new(3, 30, 1)?;
    let ca_pem = std::fs::read_to_string(f.pki.ca_cert())?;
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;

    // A site certified by another franchise's CA, running the real agent.
    let (other_ca, _) = tls::create_ca("Other", &[], Validity::days_from_now(30))?;
    let intruder = SiteId::new("intruder")?;
    let foreign = tls::issue_site_cert(&other_ca, &intruder, Validity::days_from_now(30))?;
    let foreign_dir = f.dir.path().join("foreign");
    write_bundle(&foreign_dir, &ca_pem, &foreign);
    let mut configs: Vec<_> = (0..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    configs.push(agent_config(&intruder, &foreign_dir, coordinator.addr));
    assert!(
        !handshake_accepted(&raw_endpoint(&ca_pem, &foreign), coordinator.addr).await,
        "foreign CA"
    );

    // A certificate from the right CA that has expired.
    let now = time::OffsetDateTime::now_utc();
    let expired_validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let expired =
        tls::issue_site_cert(&ca_credentials(&f), &SiteId::new("late")?, expired_validity)?;
    assert!(
        !handshake_accepted(&raw_endpoint(&ca_pem, &expired), coordinator.addr).await,
        "expired"
    );
    // No certificate at all.
    assert!(
        !handshake_accepted(&anonymous_endpoint(&ca_pem), coordinator.addr).await,
        "anonymous"
    );

    let agents = RunningAgents::start(configs)?;
    let summary = coordinator.finish(LIMIT).await?;
    agents.stop().await?;
    assert_eq!(summary.rounds_completed, 1);
    let metrics = f.metrics()?;
    assert_eq!(
        metrics[0]["participants"], 3,
        "the round ran with the three genuine sites"
    );
    Ok(())
}

/// Say hello as an enrolled site and return the open stream.
async fn hello(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    version: u16,
) -> anyhow::Result<(
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    CoordinatorMessage,
)> {
    let connection = endpoint.connect(addr, tls::COORDINATOR_NAME)?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = SiteMessage::Hello {
        protocol_version: version,
        agent_version: "raw".into(),
    };
    transport::write_message(&mut send, &hello, 1 << 20).await?;
    let (reply, _) = transport::read_message::<CoordinatorMessage>(&mut recv, 1 << 26)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no reply"))?;
    Ok((connection, send, recv, reply))
}

/// How the coordinator closed a connection: with our application code; or, if it
/// closed before the client confirmed the handshake, as a transport
/// APPLICATION_ERROR that carries no code (RFC 9000, section 10.2.3); or, when
/// the datagram carrying its close was lost (a loaded loopback drops some), by
/// a stateless reset once it has discarded the closed connection (section
/// 10.3). The code each error maps to is unit-tested in `transport`.
async fn closed_with(connection: &quinn::Connection, code: CloseCode) -> bool {
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await;
    let matches = match &closed {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            close.error_code.into_inner() == code as u64
        }
        Ok(quinn::ConnectionError::ConnectionClosed(close)) => {
            close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
        }
        Ok(quinn::ConnectionError::Reset) => true,
        _ => false,
    };
    if !matches {
        eprintln!("expected a close with {code:?}, got {closed:?}");
    }
    matches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_the_offending_connection() -> anyhow::Result<()> {
    init_logging();
    let f = Franchise::new(3, 30, 2)?;
    let ca_pem = std::fs::read_to_string(f.pki.ca_cert())?;
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let ca = ca_credentials(&f);
    let raw = |name: &str| {
        let creds =
            tls::issue_site_cert(&ca, &SiteId::new(name).unwrap(), Validity::days_from_now(1))
                .unwrap();
        raw_endpoint(&ca_pem, &creds)
    };
    // One genuine site is connected throughout; below min_sites no round can
    // start, so the coordinator is certainly still serving during the checks.
    let first = RunningAgents::start(vec![f.agent_config(0, coordinator.addr)?])?;

    // Garbage inside a well-formed frame.
    let (conn, mut send, _recv, reply) =
        hello(&raw("garbage"), coordinator.addr, PROTOCOL_VERSION).await?;
    assert!(matches!(reply, CoordinatorMessage::Welcome { .. }));
    send.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await?;
    assert!(closed_with(&conn, CloseCode::Malformed).await);

    // A header announcing a frame far over the limit: refused before any allocation.
    let (conn, mut send, _recv, _) =
        hello(&raw("oversized"), coordinator.addr, PROTOCOL_VERSION).await?;
    send.write_all(&u32::MAX.to_be_bytes()).await?;
    assert!(closed_with(&conn, CloseCode::FrameTooLarge).await);

    // A first frame far over a hello's size, though within the frame limit:
    // before its hello a peer gets a few KiB, not 64 MiB.
    let connection = raw("big-hello")
        .connect(coordinator.addr, tls::COORDINATOR_NAME)?
        .await?;
    let (mut send, _recv) = connection.open_bi().await?;
    send.write_all(&(1u32 << 20).to_be_bytes()).await?;
    assert!(closed_with(&connection, CloseCode::FrameTooLarge).await);

    // Many connections from one certificate, none saying hello: past two,
    // each is closed at once, not left to wait out the hello deadline.
    let quiet = raw("quiet");
    let mut waiting = Vec::new();
    for _ in 0..2 {
        waiting.push(
            quiet
                .connect(coordinator.addr, tls::COORDINATOR_NAME)?
                .await?,
        );
    }
    let third = quiet
        .connect(coordinator.addr, tls::COORDINATOR_NAME)?
        .await?;
    // Closed well before the 10 s hello deadline: with our code, or by a
    // stateless reset if the close datagram was lost (see `closed_with`).
    let closed = tokio::time::timeout(Duration::from_secs(5), third.closed()).await;
    assert!(
        matches!(&closed, Ok(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code.into_inner() == CloseCode::ProtocolViolation as u64)
            || matches!(closed, Ok(quinn::ConnectionError::Reset)),
        "the third connection awaiting hello is refused: {closed:?}"
    );
    assert!(
        waiting.iter().all(|c| c.close_reason().is_none()),
        "the first two still wait"
    );
    drop(waiting);

    // Another protocol version: told why, then closed.
    let (conn, _send, _recv, reply) =
        hello(&raw("future"), coordinator.addr, PROTOCOL_VERSION + 1).await?;
    assert!(
        matches!(reply, CoordinatorMessage::Refused { ref reason } if reason.contains("protocol version"))
    );
    assert!(closed_with(&conn, CloseCode::VersionMismatch).await);

    let others = (1..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let others = RunningAgents::start(others)?;
    let summary = coordinator.finish(LIMIT).await?;
    first.stop().await?;
    others.stop().await?;
    assert_eq!(
        summary.rounds_completed, 2,
        "the coordinator kept serving the genuine sites"
    );
    for line in f.metrics()? {
        assert!(line["participants"].as_u64().unwrap() >= 3);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_wait_out_a_coordinator_outage_and_join_the_next_round() -> anyhow::Result<()> {
    init_logging();
    let mut f = Franchise::new(3, 30, 1)?;
    // The privacy budget is planned for both runs' rounds.
    f.coordinator.privacy.planned_rounds = Some(2);
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let addr = coordinator.addr;
    let configs = (0..3)
        .map(|i| f.agent_config(i, addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    assert_eq!(coordinator.finish(LIMIT).await?.rounds_completed, 1);

    // The coordinator is gone for a while; the agents keep retrying.
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.coordinator.listen = addr;
    // max_rounds counts the lineage's rounds, the first run's included.
    f.coordinator.rounds.max_rounds = Some(2);
    let restarted = RunningCoordinator::start(f.coordinator.clone())?;
    let summary = restarted.finish(LIMIT).await?;
    agents.stop().await?;
    assert_eq!(
        summary.rounds_completed, 1,
        "the same agents came back for a round"
    );
    let metrics = f.metrics()?;
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[1]["participants"], 3);
    assert_eq!(
        metrics[1]["model_version"], 2,
        "continued from the stored model"
    );
    Ok(())
}

/// An export file that cannot be written (here a directory stands where
/// `metrics.jsonl` goes) must not take the coordinator down: every round is
/// in its database, and the file is rewritten from it at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_metrics_file_does_not_stop_the_coordinator() -> anyhow::Result<()> {
    init_logging();
    let f = Franchise::new(3, 30, 2)?;
    std::fs::create_dir_all(f.state_dir().join("metrics.jsonl"))?;
    let summary = f.run_all(LIMIT).await?;
    assert_eq!(summary.rounds_completed, 2, "the rounds went on");
    assert_eq!(f.state()?.rounds_completed()?, 2, "and are recorded");
    Ok(())
}
