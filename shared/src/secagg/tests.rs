//! Whole secure-aggregation rounds in memory: no sockets, seeded randomness.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::*;
use crate::ids::{RoundId, SiteId};
use crate::tls::{self, Validity};

/// Messages a site sends before it goes silent and disconnects:
/// 0 never advertises, 1 advertise, 2 + shares, 3 + masked input, 4 + signature, 5 all.
type Lifetime = usize;
const ALL: Lifetime = 5;

struct Pki {
    verifier: PeerVerifier,
    signers: Vec<Arc<SiteSigner>>,
    certs: BTreeMap<SiteId, Vec<u8>>,
    /// The franchise CA, to re-issue certificates as its holder could.
    ca: tls::Credentials,
}

fn pki(n: usize) -> Pki {
    let (ca, _) = tls::create_ca("Test", &[], Validity::days_from_now(1)).unwrap();
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
    let mut signers = Vec::new();
    let mut certs = BTreeMap::new();
    for i in 0..n {
        let site = SiteId::new(format!("s{i:03}")).unwrap();
        let creds = tls::issue_site_cert(&ca, &site, Validity::days_from_now(1)).unwrap();
        let cert = CertificateDer::from_pem_slice(creds.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).unwrap();
        certs.insert(site, cert.to_vec());
        signers.push(Arc::new(SiteSigner::new(&cert, &key).unwrap()));
    }
    Pki {
        verifier: PeerVerifier::new(ca_der).unwrap(),
        signers,
        certs,
        ca,
    }
}

/// A new certificate and key in `site`'s name, from the franchise CA.
fn reissue(pki: &Pki, site: &SiteId) -> Arc<SiteSigner> {
    let creds = tls::issue_site_cert(&pki.ca, site, Validity::days_from_now(1)).unwrap();
    let cert = CertificateDer::from_pem_slice(creds.cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).unwrap();
    Arc::new(SiteSigner::new(&cert, &key).unwrap())
}

fn setup(pki: &Pki, threshold: usize, length: usize) -> Setup {
    let cohort: Vec<SiteId> = pki.certs.keys().cloned().collect();
    let encoding = Encoding::new(32, 1.0, cohort.len()).unwrap();
    Setup {
        cohort,
        threshold,
        encoding,
        length,
    }
}

/// A site's identity: no floor beyond the protocol's, no pins yet.
fn identity(pki: &Pki, signer: &Arc<SiteSigner>) -> Identity {
    Identity {
        signer: signer.clone(),
        verifier: pki.verifier.clone(),
        floor: Floor::default(),
        pins: Pins::new(),
    }
}

/// The round parameters outside secure aggregation, as every site was sent them.
const CONTEXT: [u8; 32] = [7; 32];

/// A site's client for `round`, given its encoded input.
fn new_client(
    pki: &Pki,
    (setup, context): (&Setup, &[u8; 32]),
    signer: &Arc<SiteSigner>,
    round: RoundId,
    input: Vec<u32>,
    rng: &mut StdRng,
) -> Client {
    let mut client =
        Client::new(round, setup.clone(), context, &identity(pki, signer), rng).unwrap();
    client.handle_input(input).unwrap();
    client
}

/// What the coordinator received, for checks on what it could learn.
#[derive(Default)]
struct Seen {
    masked: BTreeMap<SiteId, Vec<u32>>,
    unmask: Vec<(SiteId, ClientMessage)>,
}

struct Run {
    outcome: Outcome,
    encoded: BTreeMap<SiteId, Vec<u32>>,
    seen: Seen,
    client_errors: Vec<(SiteId, ClientError)>,
    /// Messages the coordinator refused, by sender.
    violations: Vec<(SiteId, ServerViolation)>,
    /// What the coordinator found sites did, at the end.
    faults: BTreeMap<SiteId, String>,
}

/// A hook that may rewrite a message from the coordinator to a site.
type Tamper<'a> = &'a mut dyn FnMut(&SiteId, &mut ServerMessage);

/// A hook that may rewrite a message from a site to the coordinator.
type Lie<'a> = &'a mut dyn FnMut(&SiteId, &mut ClientMessage);

/// What each site is told of the round: its setup and context, by cohort position.
type Shown<'a> = &'a dyn Fn(usize) -> (Setup, [u8; 32]);

fn run(
    pki: &Pki,
    setup: &Setup,
    round: RoundId,
    lifetimes: &[Lifetime],
    seed: u64,
    tamper: Tamper<'_>,
) -> Run {
    run_seen_alike(pki, setup, (round, seed), lifetimes, tamper, &mut |_, _| {})
}

/// [`run`] with an honest coordinator and sites that `lie`.
fn run_lying(
    pki: &Pki,
    setup: &Setup,
    round_and_seed: (RoundId, u64),
    lifetimes: &[Lifetime],
    lie: Lie<'_>,
) -> Run {
    run_seen_alike(pki, setup, round_and_seed, lifetimes, &mut no_tamper(), lie)
}

/// [`run_deviating`] with every site shown the coordinator's round.
fn run_seen_alike(
    pki: &Pki,
    setup: &Setup,
    (round, seed): (RoundId, u64),
    lifetimes: &[Lifetime],
    tamper: Tamper<'_>,
    lie: Lie<'_>,
) -> Run {
    let alike = |_: usize| (setup.clone(), CONTEXT);
    run_deviating(pki, setup, round, lifetimes, seed, tamper, lie, &alike)
}

/// [`run`], with sites that `lie` and are each `shown` their own round.
#[allow(clippy::too_many_arguments)]
fn run_deviating(
    pki: &Pki,
    setup: &Setup,
    round: RoundId,
    lifetimes: &[Lifetime],
    seed: u64,
    tamper: Tamper<'_>,
    lie: Lie<'_>,
    shown: Shown<'_>,
) -> Run {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = SystemTime::now();
    let mut server = Server::new(round, setup.clone(), &CONTEXT, pki.certs.clone()).unwrap();
    let mut violations = Vec::new();
    let mut clients = BTreeMap::new();
    let mut sent: BTreeMap<SiteId, usize> = BTreeMap::new();
    let mut encoded = BTreeMap::new();
    let mut seen = Seen::default();
    let mut client_errors = Vec::new();
    for (i, (signer, &life)) in pki.signers.iter().zip(lifetimes).enumerate() {
        let site = signer.site().clone();
        let (site_setup, context) = shown(i);
        // Distinct per site, so a sum over the wrong sites cannot match.
        let values: Vec<f32> = (0..site_setup.length)
            .map(|j| ((j * 7 + i * 13) % 11) as f32 / 11.0 - 0.4)
            .collect();
        let x = site_setup.encoding.encode(&values, &mut rng);
        let client = new_client(
            pki,
            (&site_setup, &context),
            signer,
            round,
            x.clone(),
            &mut rng,
        );
        encoded.insert(site.clone(), x);
        clients.insert(site.clone(), (client, life));
        sent.insert(site, 0);
    }
    loop {
        let mut progressed = false;
        // Sites speak (or drop).
        for (site, (client, life)) in clients.iter_mut() {
            while let Some(mut message) = client.poll_transmit() {
                let count = sent.get_mut(site).unwrap();
                if *count >= *life {
                    continue; // this site has gone silent
                }
                *count += 1;
                progressed = true;
                match &message {
                    ClientMessage::MaskedInput(v) => {
                        seen.masked.insert(site.clone(), v.clone());
                    }
                    ClientMessage::UnmaskShares { .. } => {
                        seen.unmask.push((site.clone(), message.clone()))
                    }
                    _ => {}
                }
                lie(site, &mut message);
                if let Err(violation) = server.handle_message(site, message) {
                    violations.push((site.clone(), violation));
                }
            }
        }
        // Silent sites disconnect once they have said all they will.
        for (site, (client, life)) in &clients {
            let _ = client;
            if sent[site] >= *life && *life < ALL {
                server.handle_dropped(site);
            }
        }
        // The coordinator speaks.
        while let Some((to, mut message)) = server.poll_transmit() {
            progressed = true;
            tamper(&to, &mut message);
            let (client, life) = clients.get_mut(&to).unwrap();
            if sent[&to] >= *life {
                continue;
            }
            if let Err(e) = client.handle_message(message, now, &mut rng) {
                client_errors.push((to.clone(), e));
                *life = 0; // an aborting site leaves the round
                server.handle_dropped(&to);
            }
        }
        if !progressed {
            // Every phase deadline passes with whoever answered.
            server.close_phase();
        }
        if let Some(outcome) = server.poll_outcome() {
            return Run {
                outcome,
                encoded,
                seen,
                client_errors,
                violations,
                faults: server.faults().clone(),
            };
        }
    }
}

fn no_tamper() -> impl FnMut(&SiteId, &mut ServerMessage) {
    |_: &SiteId, _: &mut ServerMessage| {}
}

/// The exact plaintext sum of the contributors' encodings, decoded.
fn expected_sum(setup: &Setup, run: &Run, contributors: &[SiteId]) -> Vec<f64> {
    let mut acc = vec![0u32; setup.length];
    for site in contributors {
        setup.encoding.accumulate(&mut acc, &run.encoded[site]);
    }
    setup.encoding.decode_sum(&acc)
}

fn assert_exact(setup: &Setup, run: &Run, lifetimes: &[Lifetime]) {
    let Outcome::Completed { sum, contributors } = &run.outcome else {
        panic!("round aborted: {:?} (lifetimes {lifetimes:?})", run.outcome);
    };
    let expected: Vec<SiteId> = setup
        .cohort
        .iter()
        .zip(lifetimes)
        .filter(|(_, l)| **l >= 3)
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(
        contributors, &expected,
        "the survivors are those that sent masked input"
    );
    assert_eq!(
        sum,
        &expected_sum(setup, run, contributors),
        "unmasked sum equals the plaintext sum exactly"
    );
}

#[test]
fn cohorts_of_3_10_and_50_with_dropouts_at_each_phase() {
    for n in [3, 10, 50] {
        let pki = pki(n);
        let t = Setup::default_threshold(n);
        let setup = setup(&pki, t, 64);
        let full = vec![ALL; n];
        assert_exact(
            &setup,
            &run(&pki, &setup, RoundId(1), &full, 1, &mut no_tamper()),
            &full,
        );
        for phase in 0..ALL {
            // As many dropouts as the threshold allows, all at this phase.
            let mut lifetimes = vec![ALL; n];
            for l in lifetimes.iter_mut().take(n - t) {
                *l = phase;
            }
            let r = run(
                &pki,
                &setup,
                RoundId(2),
                &lifetimes,
                phase as u64,
                &mut no_tamper(),
            );
            assert_exact(&setup, &r, &lifetimes);
        }
    }
}

#[test]
fn one_dropout_past_the_threshold_aborts() {
    let n = 10;
    let pki = pki(n);
    let t = Setup::default_threshold(n);
    let setup = setup(&pki, t, 16);
    for phase in 0..ALL {
        let mut lifetimes = vec![ALL; n];
        for l in lifetimes.iter_mut().take(n - t + 1) {
            *l = phase;
        }
        let r = run(&pki, &setup, RoundId(1), &lifetimes, 3, &mut no_tamper());
        assert!(
            matches!(r.outcome, Outcome::Aborted { .. }),
            "phase {phase}: {:?}",
            r.outcome
        );
    }
}

#[test]
fn the_coordinator_never_sees_an_individual_update() {
    let n = 10;
    let pki = pki(n);
    let t = Setup::default_threshold(n);
    let setup = setup(&pki, t, 512);
    // One site drops before its masked input, two after it.
    let lifetimes = [2, 3, 4, ALL, ALL, ALL, ALL, ALL, ALL, ALL];
    let r = run(&pki, &setup, RoundId(1), &lifetimes, 5, &mut no_tamper());
    assert_exact(&setup, &r, &lifetimes);
    for (site, masked) in &r.seen.masked {
        let plain = &r.encoded[site];
        let equal = masked.iter().zip(plain).filter(|(a, b)| a == b).count();
        assert!(
            equal < 3,
            "{site}: {equal} of 512 masked values equal the plaintext"
        );
    }
    // No site's two secrets are ever both revealed: b_v only for survivors, s_v only for the dropped.
    let mut self_revealed = std::collections::BTreeSet::new();
    let mut key_revealed = std::collections::BTreeSet::new();
    for (_, reply) in &r.seen.unmask {
        let ClientMessage::UnmaskShares {
            self_mask,
            mask_key,
        } = reply
        else {
            unreachable!()
        };
        self_revealed.extend(self_mask.iter().map(|(s, _)| s.clone()));
        key_revealed.extend(mask_key.iter().map(|(s, _)| s.clone()));
    }
    assert!(self_revealed.is_disjoint(&key_revealed));
    // Site 1 sent its masked input and left: only its self-mask secret is rebuilt.
    // Site 0 left before: only its mask key is rebuilt, and its update is in no sum.
    assert!(self_revealed.contains(&setup.cohort[1]) && !key_revealed.contains(&setup.cohort[1]));
    assert!(key_revealed.contains(&setup.cohort[0]) && !self_revealed.contains(&setup.cohort[0]));
}

#[test]
fn a_substituted_key_is_detected_and_names_the_site() {
    let pki = pki(5);
    let setup = setup(&pki, 4, 8);
    let victim = setup.cohort[1].clone();
    let mut swap = |_: &SiteId, m: &mut ServerMessage| {
        if let ServerMessage::Roster(entries) = m {
            let entries = std::sync::Arc::make_mut(entries);
            for e in entries.iter_mut().filter(|e| e.site == victim) {
                e.mask_pk = [9u8; 32]; // the coordinator's own key
            }
        }
    };
    let r = run(&pki, &setup, RoundId(1), &[ALL; 5], 1, &mut swap);
    assert!(matches!(r.outcome, Outcome::Aborted { .. }));
    // Every site, the victim included, refuses the roster and names the victim.
    assert_eq!(r.client_errors.len(), 5);
    assert!(
        r.client_errors
            .iter()
            .all(|(_, e)| *e == ClientError::BadSignature(victim.clone())),
        "{:?}",
        r.client_errors
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let pki_a = pki(4);
    let setup = setup(&pki_a, 3, 8);
    let foreign = self::pki(4); // same site names, another CA
    let intruder_cert = foreign.certs.values().next().unwrap().clone();
    let mut swap = |_: &SiteId, m: &mut ServerMessage| {
        if let ServerMessage::Roster(entries) = m {
            std::sync::Arc::make_mut(entries)[0].cert = intruder_cert.clone();
        }
    };
    let r = run(&pki_a, &setup, RoundId(1), &[ALL; 4], 1, &mut swap);
    assert!(
        r.client_errors
            .iter()
            .any(|(_, e)| matches!(e, ClientError::BadCertificate { .. }))
    );
}

#[test]
fn a_share_replayed_from_an_earlier_round_is_refused() {
    let pki = pki(4);
    let setup = setup(&pki, 3, 8);
    let mut recorded = BTreeMap::new();
    let mut record = |to: &SiteId, m: &mut ServerMessage| {
        if let ServerMessage::Shares(s) = m {
            recorded.insert(to.clone(), s.clone());
        }
    };
    run(&pki, &setup, RoundId(1), &[ALL; 4], 1, &mut record);
    let mut replay = |to: &SiteId, m: &mut ServerMessage| {
        if let ServerMessage::Shares(s) = m {
            *s = recorded[to].clone();
        }
    };
    let r = run(&pki, &setup, RoundId(2), &[ALL; 4], 2, &mut replay);
    assert!(matches!(r.outcome, Outcome::Aborted { .. }));
    assert!(
        r.client_errors
            .iter()
            .all(|(_, e)| matches!(e, ClientError::BadShare(_))),
        "{:?}",
        r.client_errors
    );
    assert_eq!(r.client_errors.len(), 4);
}

/// Drive the first client to the signed state, to test what it refuses afterwards;
/// also return the genuine unmask request the coordinator made for it.
fn signed_client(pki: &Pki, setup: &Setup) -> (Client, ServerMessage) {
    let mut rng = StdRng::seed_from_u64(4);
    let now = SystemTime::now();
    let round = RoundId(1);
    let mut clients: Vec<Client> = pki
        .signers
        .iter()
        .map(|s| {
            let input = vec![0; setup.length];
            new_client(pki, (setup, &CONTEXT), s, round, input, &mut rng)
        })
        .collect();
    let mut server = Server::new(round, setup.clone(), &CONTEXT, pki.certs.clone()).unwrap();
    // Run the honest protocol until every client has signed.
    let mut genuine = None;
    for _ in 0..4 {
        for (c, site) in clients.iter_mut().zip(&setup.cohort) {
            while let Some(m) = c.poll_transmit() {
                server.handle_message(site, m).unwrap();
            }
        }
        while let Some((to, m)) = server.poll_transmit() {
            if matches!(m, ServerMessage::Unmask { .. }) {
                if to == setup.cohort[0] {
                    genuine = Some(m);
                }
                continue; // stop before unmasking
            }
            let i = setup.cohort.iter().position(|s| *s == to).unwrap();
            clients[i].handle_message(m, now, &mut rng).unwrap();
        }
    }
    (
        clients.remove(0),
        genuine.expect("the honest protocol reaches unmasking"),
    )
}

#[test]
fn a_coordinator_asking_for_both_kinds_of_share_is_refused() {
    let pki = pki(4);
    let setup = setup(&pki, 3, 8);
    let mut rng = StdRng::seed_from_u64(1);
    let now = SystemTime::now();
    let all = setup.cohort.clone();
    let (mut client, genuine) = signed_client(&pki, &setup);
    // The client signed `all`. A second list, dropping site 3, would reveal s_3 here
    // while b_3 was revealed elsewhere.
    let fewer = all[..3].to_vec();
    assert_eq!(
        client.handle_message(ServerMessage::Survivors(fewer.clone()), now, &mut rng),
        Err(ClientError::AskedTwice("a survivor signature"))
    );
    let forged: Vec<(SiteId, Vec<u8>)> = Vec::new();
    assert!(matches!(
        client.handle_message(
            ServerMessage::Unmask {
                survivors: fewer,
                signatures: forged.clone()
            },
            now,
            &mut rng
        ),
        Err(ClientError::BadSurvivors(_))
    ));
    // The signed list, but without enough signatures.
    assert!(matches!(
        client.handle_message(
            ServerMessage::Unmask {
                survivors: all.clone(),
                signatures: forged
            },
            now,
            &mut rng
        ),
        Err(ClientError::BadSurvivors(_))
    ));
    // With the genuine signatures it answers, once.
    let unmask = genuine;
    client
        .handle_message(unmask.clone(), now, &mut rng)
        .unwrap();
    assert!(matches!(
        client.poll_transmit(),
        Some(ClientMessage::UnmaskShares { .. })
    ));
    assert_eq!(
        client.handle_message(unmask, now, &mut rng),
        Err(ClientError::AskedTwice("unmasking"))
    );
}

#[test]
fn setups_are_checked() {
    let pki = pki(3);
    let mut s = setup(&pki, 2, 4);
    s.check().unwrap();
    s.cohort.pop();
    assert_eq!(s.check(), Err(SetupError::CohortTooSmall(2)));
    let mut s = setup(&pki, 1, 4);
    assert!(
        matches!(s.check(), Err(SetupError::Threshold { .. })),
        "a threshold of half or less is refused"
    );
    s.threshold = 4;
    assert!(matches!(s.check(), Err(SetupError::Threshold { .. })));
    assert_eq!(Setup::default_threshold(3), 3);
    assert_eq!(Setup::default_threshold(10), 7);
    assert_eq!(Setup::default_threshold(50), 34);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_cohorts_thresholds_and_dropouts(
        n in 3usize..9,
        t_extra in 0usize..4,
        lifetimes in proptest::collection::vec(prop_oneof![4 => Just(ALL), 1 => 0usize..ALL], 9),
        seed in any::<u64>(),
    ) {
        let pki = pki(n);
        let t = (n / 2 + 1 + t_extra).min(n);
        let setup = setup(&pki, t, 16);
        let lifetimes = &lifetimes[..n];
        let r = run(&pki, &setup, RoundId(1), lifetimes, seed, &mut no_tamper());
        // The round completes exactly when every phase keeps at least t sites.
        let completes = (0..ALL).all(|phase| lifetimes.iter().filter(|l| **l > phase).count() >= t);
        if completes {
            assert_exact(&setup, &r, lifetimes);
        } else {
            prop_assert!(matches!(r.outcome, Outcome::Aborted { .. }), "{:?}", r.outcome);
        }
    }
}

#[test]
fn sites_shown_different_rounds_refuse_to_sum_together() {
    let pki = pki(5);
    let setup = setup(&pki, 4, 8);
    // The coordinator shows two sites another round: a lower threshold,
    // another encoding, or other parameters (the context: privacy, vector
    // length). Each site checks its peers' signatures over its own view.
    let mut lower = setup.clone();
    lower.threshold = 3;
    let mut finer = setup.clone();
    finer.encoding.bound /= 2.0;
    let variants = [(lower, CONTEXT), (finer, CONTEXT), (setup.clone(), [8; 32])];
    for (other, other_context) in variants {
        let shown = |i: usize| match i {
            0 | 1 => (other.clone(), other_context),
            _ => (setup.clone(), CONTEXT),
        };
        let r = run_deviating(
            &pki,
            &setup,
            RoundId(1),
            &[ALL; 5],
            1,
            &mut no_tamper(),
            &mut |_, _| {},
            &shown,
        );
        assert!(
            matches!(r.outcome, Outcome::Aborted { .. }),
            "{:?}",
            r.outcome
        );
        assert!(
            r.client_errors
                .iter()
                .all(|(_, e)| matches!(e, ClientError::BadSignature(_))),
            "{:?}",
            r.client_errors
        );
        assert_eq!(r.client_errors.len(), 5, "every site refuses the roster");
    }
}

/// Replace every unmask share `holder` sends with a false one.
fn false_shares(holder: &SiteId) -> impl FnMut(&SiteId, &mut ClientMessage) {
    let holder = holder.clone();
    move |from: &SiteId, m: &mut ClientMessage| {
        if let ClientMessage::UnmaskShares {
            self_mask,
            mask_key,
        } = m
            && *from == holder
        {
            for (_, share) in self_mask.iter_mut().chain(mask_key.iter_mut()) {
                share[0] ^= 1;
            }
        }
    }
}

#[test]
fn a_false_unmask_share_is_caught_named_and_left_out() {
    let pki = pki(6);
    let setup = setup(&pki, 4, 16);
    let liar = setup.cohort[0].clone(); // among the first holders the coordinator uses
    // One site drops before its masked input, so shares of both kinds are rebuilt.
    let lifetimes = [ALL, 2, ALL, ALL, ALL, ALL];
    let r = run_lying(
        &pki,
        &setup,
        (RoundId(1), 2),
        &lifetimes,
        &mut false_shares(&liar),
    );
    assert_exact(&setup, &r, &lifetimes);
    assert_eq!(
        r.faults.keys().collect::<Vec<_>>(),
        vec![&liar],
        "{:?}",
        r.faults
    );
    assert!(r.faults[&liar].contains("false unmask share"));
}

#[test]
fn with_only_the_threshold_left_a_false_share_aborts_and_names_its_sender() {
    let pki = pki(5);
    let setup = setup(&pki, 4, 16);
    let liar = setup.cohort[3].clone();
    let lifetimes = [ALL, ALL, ALL, ALL, 2];
    let r = run_lying(
        &pki,
        &setup,
        (RoundId(1), 3),
        &lifetimes,
        &mut false_shares(&liar),
    );
    let Outcome::Aborted { reason } = &r.outcome else {
        panic!("a sum with a false share decoded: {:?}", r.outcome);
    };
    assert!(reason.contains("true shares"), "{reason}");
    assert!(r.faults.contains_key(&liar), "{:?}", r.faults);
}

#[test]
fn a_forged_survivor_signature_is_refused_and_named_by_the_coordinator() {
    let pki = pki(5);
    let setup = setup(&pki, 3, 16);
    let forger = setup.cohort[2].clone();
    let mut forge = |from: &SiteId, m: &mut ClientMessage| {
        if let ClientMessage::SurvivorSignature(signature) = m
            && *from == forger
        {
            signature[0] ^= 1;
        }
    };
    // Four other signers are enough: the round finishes, the forger's input included.
    let r = run_lying(&pki, &setup, (RoundId(1), 4), &[ALL; 5], &mut forge);
    assert_exact(&setup, &r, &[ALL; 5]);
    assert_eq!(
        r.violations,
        vec![(forger.clone(), ServerViolation::SurvivorSignature)]
    );
    // With exactly the threshold of survivors the round cannot finish (the
    // others insist on t signatures), but the coordinator knows who broke it.
    let lifetimes = [ALL, 2, ALL, 2, ALL];
    let r = run_lying(&pki, &setup, (RoundId(2), 5), &lifetimes, &mut forge);
    assert!(
        matches!(r.outcome, Outcome::Aborted { .. }),
        "{:?}",
        r.outcome
    );
    assert_eq!(
        r.violations,
        vec![(forger, ServerViolation::SurvivorSignature)]
    );
}

#[test]
fn a_site_refuses_a_setup_below_its_own_floor() {
    let pki = pki(5);
    let mut rng = StdRng::seed_from_u64(1);
    let client = |setup: &Setup, floor: &Floor, rng: &mut StdRng| {
        let identity = Identity {
            floor: *floor,
            ..identity(&pki, &pki.signers[0])
        };
        Client::new(RoundId(1), setup.clone(), &CONTEXT, &identity, rng).map(|_| ())
    };
    // Against one colluding site, 3 of 5 is too low: a split view of two
    // groups of 3 signers overlaps in one site only. 4 of 5 is enough.
    let one_colluder = Floor {
        colluders: 1,
        ..Floor::default()
    };
    assert_eq!(
        client(&setup(&pki, 3, 8), &one_colluder, &mut rng),
        Err(ClientError::Setup(SetupError::BelowFloor {
            threshold: 3,
            cohort: 5,
            colluders: 1
        }))
    );
    client(&setup(&pki, 4, 8), &one_colluder, &mut rng).unwrap();
    client(&setup(&pki, 3, 8), &Floor::default(), &mut rng).unwrap();
    let six = Floor {
        min_cohort: 6,
        ..Floor::default()
    };
    assert_eq!(
        client(&setup(&pki, 4, 8), &six, &mut rng),
        Err(ClientError::Setup(SetupError::BelowMinCohort {
            cohort: 5,
            min: 6
        }))
    );
    // The noise counted on is that of the honest survivors only.
    assert_eq!(one_colluder.honest_survivors(4), 3);
    assert_eq!(Floor::default().honest_survivors(4), 4);
}

/// A roster entry from a client's advertisement.
fn advertised(client: &mut Client, signer: &SiteSigner) -> RosterEntry {
    let Some(ClientMessage::AdvertiseKeys {
        cipher_pk,
        mask_pk,
        signature,
    }) = client.poll_transmit()
    else {
        panic!("a new client advertises first");
    };
    RosterEntry {
        site: signer.site().clone(),
        cert: signer.cert().to_vec(),
        cipher_pk,
        mask_pk,
        signature,
    }
}

/// Attack: the coordinator's operator, holding the CA key, re-issues
/// certificates in the names of site A's peers and stands in for them, to
/// collect A's shares and rebuild its self mask. A site that has met its
/// peers before pinned their keys and refuses the stand-ins, naming them.
#[test]
fn a_certificate_re_issued_for_a_pinned_peer_is_refused() {
    let pki = pki(4);
    let setup = setup(&pki, 3, 8);
    let mut rng = StdRng::seed_from_u64(6);
    let round = RoundId(2);
    let now = SystemTime::now();
    let impersonated = setup.cohort[1].clone();
    let entry = |signer: &Arc<SiteSigner>, identity: &Identity, rng: &mut StdRng| {
        let mut client = Client::new(round, setup.clone(), &CONTEXT, identity, rng).unwrap();
        let entry = advertised(&mut client, signer);
        (client, entry)
    };
    let peers = |i: usize| &pki.signers[i];
    let honest: Vec<RosterEntry> = (1..4)
        .map(|i| entry(peers(i), &identity(&pki, peers(i)), &mut rng).1)
        .collect();
    let stand_in_signer = reissue(&pki, &impersonated);
    let mut forged = honest.clone();
    forged[0] = entry(
        &stand_in_signer,
        &identity(&pki, &stand_in_signer),
        &mut rng,
    )
    .1;
    let real_keys: Pins = (1..4)
        .map(|i| {
            let key = identity::certificate_key(peers(i).cert()).unwrap();
            (setup.cohort[i].clone(), key)
        })
        .collect();
    let pinned = Identity {
        pins: real_keys.clone(),
        ..identity(&pki, peers(0))
    };
    let shown = |who: &Identity, others: &[RosterEntry], rng: &mut StdRng| {
        let (mut client, own) = entry(peers(0), who, rng);
        let roster: Vec<RosterEntry> = std::iter::once(own).chain(others.iter().cloned()).collect();
        let result = client.handle_message(ServerMessage::Roster(Arc::new(roster)), now, rng);
        (result, client.take_unpinned())
    };
    // Meeting its peers for the first time, a site has nothing to tell the
    // stand-in by; it pins what it met (this is what pinning is for).
    let (first, met) = shown(&identity(&pki, peers(0)), &forged, &mut rng);
    assert_eq!(first, Ok(()));
    assert_eq!(met.len(), 3);
    assert_ne!(met[&impersonated], real_keys[&impersonated]);
    // Having met the real peers, it refuses the stand-in and names it...
    let (refused, _) = shown(&pinned, &forged, &mut rng);
    assert_eq!(refused, Err(ClientError::PinMismatch(impersonated)));
    // ...and still accepts the real ones, pinning nothing new.
    let (accepted, met) = shown(&pinned, &honest, &mut rng);
    assert_eq!(accepted, Ok(()));
    assert!(met.is_empty());
}

/// Attack: a split view. With `c` colluders and `2t ≤ n + c`, the
/// coordinator shows one group of honest sites a survivor list with the
/// target on it and another group a list without it; with the colluders'
/// signatures each list has `t`, so the first group reveals shares of the
/// target's self-mask secret and the second shares of its mask key, and the
/// coordinator unmasks the target's input alone. A site whose floor assumes
/// `c` colluders refuses such a round before sending anything.
#[test]
fn a_split_view_with_a_colluder_recovers_an_input_unless_the_floor_refuses_it() {
    let pki = pki(5);
    let setup = setup(&pki, 3, 8); // 2t = 6 ≤ n + c = 6
    let round = RoundId(1);
    let now = SystemTime::now();
    let mut rng = StdRng::seed_from_u64(9);
    let site = |i: usize| setup.cohort[i].clone();
    let (target, colluder) = (site(0), 4);
    // The colluder runs its client twice from one seed: the same keys, so
    // both copies open the shares sent to it, and each answers one list.
    let mut clients: Vec<Client> = (0..5)
        .map(|i| {
            let mut own = StdRng::seed_from_u64(100 + i as u64);
            let id = identity(&pki, &pki.signers[i]);
            Client::new(round, setup.clone(), &CONTEXT, &id, &mut own).unwrap()
        })
        .collect();
    let mut twin = {
        let mut own = StdRng::seed_from_u64(100 + colluder as u64);
        let id = identity(&pki, &pki.signers[colluder]);
        Client::new(round, setup.clone(), &CONTEXT, &id, &mut own).unwrap()
    };
    let entries: Vec<RosterEntry> = (0..5)
        .map(|i| advertised(&mut clients[i], &pki.signers[i]))
        .collect();
    twin.poll_transmit();
    let roster = ServerMessage::Roster(Arc::new(entries.clone()));
    let mut inbox: BTreeMap<SiteId, Vec<(SiteId, Vec<u8>)>> = BTreeMap::new();
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .handle_message(roster.clone(), now, &mut rng)
            .unwrap();
        let Some(ClientMessage::EncryptedShares { shares, .. }) = client.poll_transmit() else {
            panic!("shares");
        };
        for (to, sealed) in shares {
            inbox.entry(to).or_default().push((site(i), sealed));
        }
    }
    twin.handle_message(roster, now, &mut rng).unwrap();
    twin.poll_transmit();
    let inputs: Vec<Vec<u32>> = (0..5)
        .map(|i| setup.encoding.encode(&[0.1 * i as f32 + 0.05; 8], &mut rng))
        .collect();
    let mut masked = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let shares = ServerMessage::Shares(inbox[&site(i)].clone());
        client.handle_message(shares, now, &mut rng).unwrap();
        client.handle_input(inputs[i].clone()).unwrap();
        let Some(ClientMessage::MaskedInput(y)) = client.poll_transmit() else {
            panic!("masked input");
        };
        masked.push(y);
    }
    twin.handle_message(
        ServerMessage::Shares(inbox[&site(colluder)].clone()),
        now,
        &mut rng,
    )
    .unwrap();
    twin.handle_input(inputs[colluder].clone()).unwrap();
    twin.poll_transmit();

    // Two views: the target on the first list, not on the second.
    let digest = crypto::setup_digest(&setup, &CONTEXT);
    let with_target = vec![site(0), site(1), site(4)];
    let without = vec![site(2), site(3), site(4)];
    let mut reveal = |client: &mut Client, signers: &[usize], list: &Vec<SiteId>| {
        client
            .handle_message(ServerMessage::Survivors(list.clone()), now, &mut rng)
            .unwrap();
        client.poll_transmit();
        let transcript = crypto::survivors_transcript(round, &digest, list);
        let signatures = signers
            .iter()
            .map(|&i| (site(i), pki.signers[i].sign(&transcript)))
            .collect();
        let unmask = ServerMessage::Unmask {
            survivors: list.clone(),
            signatures,
        };
        client.handle_message(unmask, now, &mut rng).unwrap();
        let Some(ClientMessage::UnmaskShares {
            self_mask,
            mask_key,
        }) = client.poll_transmit()
        else {
            panic!("unmask shares");
        };
        (self_mask, mask_key)
    };
    let share_of = |shares: &[(SiteId, [u8; 32])], holder: usize| crypto::ScalarPart {
        index: holder as u32 + 1,
        value: shares.iter().find(|(owner, _)| *owner == target).unwrap().1,
    };
    let mut self_parts = Vec::new();
    let mut key_parts = Vec::new();
    for holder in [0, 1] {
        let (self_mask, _) = reveal(&mut clients[holder], &[0, 1, 4], &with_target);
        self_parts.push(share_of(&self_mask, holder));
    }
    let (self_mask, _) = reveal(&mut clients[colluder], &[0, 1, 4], &with_target);
    self_parts.push(share_of(&self_mask, colluder));
    for holder in [2, 3] {
        let (_, mask_key) = reveal(&mut clients[holder], &[2, 3, 4], &without);
        key_parts.push(share_of(&mask_key, holder));
    }
    let (_, mask_key) = reveal(&mut twin, &[2, 3, 4], &without);
    key_parts.push(share_of(&mask_key, colluder));

    // Both secrets of the target, and so its input alone.
    let self_secret = crypto::combine(&self_parts).unwrap();
    let mask_secret = crypto::combine(&key_parts).unwrap();
    let mut x = masked[0].clone();
    let bits = setup.encoding.bits;
    crypto::apply_mask(&mut x, &crypto::self_seed(&self_secret, round), bits, true);
    for (v, entry) in entries.iter().enumerate().skip(1) {
        let seed = crypto::pairwise_seed(&mask_secret, &entry.mask_pk, round, &target, &site(v));
        // The target sorts first, so it added every pairwise mask.
        crypto::apply_mask(&mut x, &seed, bits, true);
    }
    assert_eq!(x, inputs[0], "the target's input, alone, recovered exactly");

    // A site that assumes one colluder refuses this round at the start.
    let wary = Identity {
        floor: Floor {
            colluders: 1,
            ..Floor::default()
        },
        ..identity(&pki, &pki.signers[0])
    };
    assert!(matches!(
        Client::new(round, setup.clone(), &CONTEXT, &wary, &mut rng),
        Err(ClientError::Setup(SetupError::BelowFloor { .. }))
    ));
}
