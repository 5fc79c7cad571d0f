//! Secure aggregation cost per round: one site's time and bytes, the
//! coordinator's time and peak heap, over cohort sizes, vector lengths and
//! dropout rates. Prints a Markdown table (or JSON lines with `--json`).
//!
//! `cargo bench -p potluck-shared --bench secagg` runs the whole grid;
//! `-- --sites 100 --lengths 100000 --dropout 0,30` a part of it.
//!
//! Every site runs the real [`Client`] and the coordinator the real [`Server`],
//! on one thread. One site (the measured one) masks a full-length vector; the
//! others run the same protocol on a one-element vector, and their masked
//! input is replaced by a random full-length vector before it reaches the
//! server. The server cannot tell the difference (a masked vector is uniformly
//! random to it) and does exactly the work of a real round, while the bench
//! avoids masking 500 full vectors per round. The decoded sum is therefore
//! meaningless here; the tests check correctness.
//!
//! Dropped sites leave after sharing their keys and before sending their
//! masked input: the costliest point for the coordinator, which must then
//! rebuild their mask keys and remove every pairwise mask they share with the
//! survivors.

use std::alloc::System;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use potluck_shared::secagg::{
    Client, ClientMessage, Encoding, Floor, Identity, Outcome, PeerVerifier, Server, ServerMessage,
    Setup, SiteSigner,
};
use potluck_shared::tls::{self, Validity};
use potluck_shared::wire::{CoordinatorMessage, SiteMessage, codec};
use potluck_shared::{RoundId, SiteId};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracking_allocator::{
    AllocationGroupId, AllocationGroupToken, AllocationRegistry, AllocationTracker, Allocator,
};

/// The allocation group of the coordinator's code, once registered.
static SERVER_GROUP: AtomicUsize = AtomicUsize::new(0);
/// Bytes the coordinator's code holds now, and the most it held.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Attributes every allocation to the group that made it, wherever it is freed.
struct ServerHeap;

impl AllocationTracker for ServerHeap {
    fn allocated(&self, _addr: usize, _size: usize, wrapped: usize, group: AllocationGroupId) {
        if group.as_usize().get() == SERVER_GROUP.load(Ordering::Relaxed) {
            let live = LIVE.fetch_add(wrapped, Ordering::Relaxed) + wrapped;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
    }

    fn deallocated(
        &self,
        _addr: usize,
        _size: usize,
        wrapped: usize,
        source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        if source.as_usize().get() == SERVER_GROUP.load(Ordering::Relaxed) {
            LIVE.fetch_sub(wrapped, Ordering::Relaxed);
        }
    }
}

#[global_allocator]
static GLOBAL: Allocator<System> = Allocator::system();

/// Runs coordinator code: adds up its time and counts its heap.
struct ServerMeter {
    token: AllocationGroupToken,
    time: Duration,
}

impl ServerMeter {
    fn install() -> Self {
        AllocationRegistry::set_global_tracker(ServerHeap).expect("the only tracker");
        let token = AllocationGroupToken::register().expect("an allocation group");
        SERVER_GROUP.store(token.id().as_usize().get(), Ordering::Relaxed);
        AllocationRegistry::enable_tracking();
        Self {
            token,
            time: Duration::ZERO,
        }
    }

    /// Start a round: forget the previous round's time and peak.
    fn reset(&mut self) {
        self.time = Duration::ZERO;
        LIVE.store(0, Ordering::Relaxed);
        PEAK.store(0, Ordering::Relaxed);
    }

    fn run<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let _group = self.token.enter();
        let start = Instant::now();
        let out = f();
        self.time += start.elapsed();
        out
    }

    fn peak_bytes(&self) -> usize {
        PEAK.load(Ordering::Relaxed)
    }
}

#[derive(Parser, Debug)]
#[command(about = "Secure aggregation cost per round (Markdown table, or JSON lines).")]
struct Args {
    /// Cohort sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 500])]
    sites: Vec<usize>,
    /// Update vector lengths.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000, 1_000_000])]
    lengths: Vec<usize>,
    /// Dropout rates, in percent of the cohort.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 10, 30])]
    dropout: Vec<usize>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A cohort's identities, made once per cohort size.
struct Pki {
    verifier: PeerVerifier,
    signers: Vec<Arc<SiteSigner>>,
    certs: BTreeMap<SiteId, Vec<u8>>,
}

fn pki(n: usize) -> Pki {
    let (ca, _) = tls::create_ca("Bench", &[], Validity::days_from_now(1)).expect("CA");
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("CA PEM");
    let mut signers = Vec::new();
    let mut certs = BTreeMap::new();
    for i in 0..n {
        let site = SiteId::new(format!("site-{i:04}")).expect("site id");
        let creds = tls::issue_site_cert(&ca, &site, Validity::days_from_now(1)).expect("cert");
        let cert = CertificateDer::from_pem_slice(creds.cert_pem.as_bytes()).expect("cert PEM");
        let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).expect("key PEM");
        certs.insert(site, cert.to_vec());
        signers.push(Arc::new(SiteSigner::new(&cert, &key).expect("signer")));
    }
    Pki {
        verifier: PeerVerifier::new(ca_der).expect("verifier"),
        signers,
        certs,
    }
}

/// What one round cost.
#[derive(Debug, Default)]
struct Cost {
    sites: usize,
    length: usize,
    dropout_pct: usize,
    dropped: usize,
    threshold: usize,
    client: Duration,
    masking: Duration,
    server: Duration,
    unmasking: Duration,
    sent_bytes: usize,
    received_bytes: usize,
    server_peak_bytes: usize,
    completed: bool,
}

/// One site: its client, and whether it is the measured one or drops.
struct Site {
    client: Client,
    measured: bool,
    drops: bool,
}

/// The round's other parameters, the same for every site. The vector length
/// is not in the signed setup (the caller's context covers it), which is what
/// lets the unmeasured sites run on one-element vectors here.
const CONTEXT: [u8; 32] = [1; 32];

fn setup(pki: &Pki, length: usize) -> Setup {
    let cohort: Vec<SiteId> = pki.certs.keys().cloned().collect();
    let n = cohort.len();
    Setup {
        encoding: Encoding::new(32, 1.0, n).expect("encoding"),
        threshold: Setup::default_threshold(n),
        cohort,
        length,
    }
}

fn encoded_len<T: serde::Serialize>(message: &T) -> usize {
    codec::encode(message).expect("encodable").len()
}

fn round(meter: &mut ServerMeter, pki: &Pki, length: usize, dropout_pct: usize, seed: u64) -> Cost {
    let n = pki.signers.len();
    let round = RoundId(seed);
    let full = setup(pki, length);
    let light = setup(pki, 1);
    let mut rng = StdRng::seed_from_u64(seed);
    let now = SystemTime::now();
    let dropped = n * dropout_pct / 100;
    let mut cost = Cost {
        sites: n,
        length,
        dropout_pct,
        dropped,
        threshold: full.threshold,
        ..Cost::default()
    };
    // A masked vector as the server sees it: uniformly random below the modulus.
    let stand_in: Vec<u32> = (0..length).map(|_| rng.random()).collect();

    meter.reset();
    let mut server = meter
        .run(|| Server::new(round, full.clone(), &CONTEXT, pki.certs.clone()).expect("server"));
    let mut sites: BTreeMap<SiteId, Site> = BTreeMap::new();
    for (i, signer) in pki.signers.iter().enumerate() {
        let measured = i == 0;
        let setup = if measured {
            full.clone()
        } else {
            light.clone()
        };
        let start = Instant::now();
        let identity = Identity {
            signer: signer.clone(),
            verifier: pki.verifier.clone(),
            floor: Floor::default(),
            pins: Default::default(),
        };
        let client = Client::new(round, setup, &CONTEXT, &identity, &mut rng).expect("client");
        if measured {
            cost.client += start.elapsed();
        }
        let drops = !measured && i > n - 1 - dropped;
        sites.insert(
            signer.site().clone(),
            Site {
                client,
                measured,
                drops,
            },
        );
    }

    loop {
        let mut progressed = false;
        for (id, site) in sites.iter_mut() {
            while let Some(message) = site.client.poll_transmit() {
                progressed = true;
                let message = match message {
                    ClientMessage::MaskedInput(_) if site.drops => {
                        meter.run(|| server.handle_dropped(id));
                        continue;
                    }
                    ClientMessage::MaskedInput(_) if !site.measured => {
                        ClientMessage::MaskedInput(stand_in.clone())
                    }
                    other => other,
                };
                if site.measured {
                    cost.sent_bytes += encoded_len(&SiteMessage::SecAgg {
                        round,
                        message: message.clone(),
                    });
                }
                let last_unmask = matches!(message, ClientMessage::UnmaskShares { .. });
                let start = Instant::now();
                // The coordinator decodes its own copy of every message.
                meter.run(|| {
                    server
                        .handle_message(id, message.clone())
                        .expect("valid message")
                });
                if last_unmask && server.phase() == "finished" {
                    cost.unmasking = start.elapsed();
                }
            }
        }
        while let Some((to, message)) = meter.run(|| server.poll_transmit()) {
            progressed = true;
            let site = sites.get_mut(&to).expect("cohort member");
            if site.measured {
                cost.received_bytes += encoded_len(&CoordinatorMessage::SecAgg {
                    round,
                    message: message.clone(),
                });
            }
            let is_shares = matches!(message, ServerMessage::Shares(_));
            let start = Instant::now();
            site.client
                .handle_message(message, now, &mut rng)
                .expect("honest coordinator");
            if site.measured {
                cost.client += start.elapsed();
            }
            if is_shares {
                feed_input(site, &full, length, &mut rng, &mut cost);
            }
        }
        if let Some(outcome) = server.poll_outcome() {
            cost.completed = matches!(outcome, Outcome::Completed { .. });
            break;
        }
        assert!(progressed, "the round stalled");
    }
    cost.server = meter.time;
    cost.server_peak_bytes = meter.peak_bytes();
    cost
}

/// Hand a site its encoded update once the shares are in: for the measured
/// site this is where all the masking happens.
fn feed_input(site: &mut Site, full: &Setup, length: usize, rng: &mut StdRng, cost: &mut Cost) {
    if !site.measured {
        site.client.handle_input(vec![0]).expect("light input");
        return;
    }
    let values: Vec<f32> = (0..length).map(|_| rng.random_range(-1.0..1.0)).collect();
    let encoded = full.encoding.encode(&values, rng);
    let start = Instant::now();
    site.client.handle_input(encoded).expect("input");
    cost.masking = start.elapsed();
    cost.client += cost.masking;
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn kib(bytes: usize) -> String {
    format!("{:.0}", bytes as f64 / 1024.0)
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn print_header() {
    println!(
        "| sites | length | dropout | t | site total ms | site masking ms | server total ms | server unmask ms | site sent KiB | site received KiB | server peak heap MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
}

fn print_row(c: &Cost) {
    println!(
        "| {} | {} | {}% ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
        c.sites,
        c.length,
        c.dropout_pct,
        c.dropped,
        c.threshold,
        ms(c.client),
        ms(c.masking),
        ms(c.server),
        ms(c.unmasking),
        kib(c.sent_bytes),
        kib(c.received_bytes),
        mib(c.server_peak_bytes),
    );
}

fn print_json(c: &Cost) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let row = serde_json::json!({
        "sites": c.sites,
        "length": c.length,
        "dropout_pct": c.dropout_pct,
        "dropped": c.dropped,
        "threshold": c.threshold,
        "completed": c.completed,
        "site_ms": ms(c.client),
        "site_masking_ms": ms(c.masking),
        "server_ms": ms(c.server),
        "server_unmask_ms": ms(c.unmasking),
        "site_sent_bytes": c.sent_bytes,
        "site_received_bytes": c.received_bytes,
        "server_peak_heap_bytes": c.server_peak_bytes,
    });
    println!("{row}");
}

fn main() {
    let args = Args::parse();
    let mut meter = ServerMeter::install();
    if !args.json {
        print_header();
    }
    for &n in &args.sites {
        let pki = pki(n);
        for &length in &args.lengths {
            for &dropout in &args.dropout {
                let cost = round(
                    &mut meter,
                    &pki,
                    length,
                    dropout,
                    1 + length as u64 + dropout as u64,
                );
                assert!(cost.completed, "round aborted: {cost:?}");
                if args.json {
                    print_json(&cost);
                } else {
                    print_row(&cost);
                }
            }
        }
    }
}
