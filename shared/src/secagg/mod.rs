//! Secure aggregation with dropout tolerance, after Bonawitz et al. (CCS 2017),
//! as sans-IO state machines: [`Client`] at each site, [`Server`] at the
//! coordinator. The coordinator learns the sum of the survivors' updates and
//! nothing about any one of them, even if it deviates from the protocol
//! (it can make a round fail, but not read an individual update).
//!
//! # The exact construction (version 2)
//! Notation: `‖` is concatenation, `len(x)` a 4-byte big-endian length, and
//! `D = "potluck-secagg-v2"`. The cohort is an ordered list of site IDs;
//! a site's Shamir index is its 1-based position in it.
//!
//! 0. **Setup.** Each site checks the setup ([`Setup::check`]) and its own
//!    [`Floor`] (minimum cohort; `2t > n + c` for the `c` colluders it
//!    assumes), then computes `H = SHA256(D ‖ "/setup" ‖ SHA256(cohort) ‖
//!    t(u64) ‖ bits(u32) ‖ scale(f64) ‖ bound(f32) ‖ noise_margin(f64) ‖
//!    context)`, numbers big-endian, where `SHA256(cohort)`
//!    hashes every ID as `len(id) ‖ id` and `context` is the caller's 32-byte
//!    digest of the round's other parameters (the whole round task, vector
//!    length and privacy included). Both signed transcripts carry `H`, so
//!    sites shown different rounds refuse each other's keys.
//! 1. **Advertise keys.** Site `u` draws two secret scalars `c_u`, `s_u` and a
//!    self-mask secret `b_u` (curve25519 scalars, uniformly from 64 random
//!    bytes reduced modulo the group order). Its X25519 keys are the scalars'
//!    bytes as X25519 secrets. It sends `c_pk = X25519(c_u)`, `s_pk = X25519(s_u)`
//!    and an Ed25519 signature, with its site certificate's key, over
//!    `D ‖ "/advertise" ‖ round(u64 BE) ‖ H ‖ len(u) ‖ u ‖ c_pk ‖ s_pk`.
//! 2. **Roster.** The coordinator sends every advertiser the list of
//!    (site, certificate, keys, signature). Each site checks every certificate
//!    against the franchise CA, that it names the entry's site, that the site is
//!    in the cohort, and the signature; any failure aborts the round, naming the
//!    peer. Its own entry must be unchanged. At least `t` entries are required.
//! 3. **Share keys.** Site `u` Shamir-shares `s_u` and `b_u` (threshold `t`,
//!    over the curve25519 scalar field, Feldman VSS from vsss-rs) to every
//!    roster member `v`, and sends `v` the pair encrypted with ChaCha20-Poly1305 under
//!    `HKDF-SHA256(salt = D, ikm = X25519(c_u, c_pk_v), info = len("share-key") ‖ "share-key" ‖ len ‖ round ‖ len ‖ u ‖ len ‖ v)`,
//!    zero nonce (each key seals one message), associated data
//!    `D ‖ len ‖ round ‖ len ‖ u ‖ len ‖ v`. A share replayed from another round
//!    or sent to another recipient fails to open and aborts the round. To the
//!    coordinator alone it also sends the Feldman commitments of both
//!    polynomials (`a_k·G` on Ristretto, `t` points each; the first commits to
//!    the secret).
//! 4. **Masked input.** Let `U2` be the sites whose shares `u` received, plus `u`.
//!    Site `u` sends `y_u = x_u + PRG(b_u) + Σ_{v∈U2, u<v} PRG(s_uv) − Σ_{v∈U2, v<u} PRG(s_uv) mod 2^bits`,
//!    where `x_u` is the encoded update ([`Encoding`]), `<` orders site IDs as
//!    strings, `s_uv = HKDF(salt = D, ikm = X25519(s_u, s_pk_v), info = "pairwise-mask" ‖ round ‖ min(u,v) ‖ max(u,v))`
//!    and the self seed is `HKDF(salt = D, ikm = b_u bytes, info = "self-mask" ‖ round)`.
//!    `PRG(seed)` is the ChaCha12 keystream (key = seed, 96-bit zero nonce,
//!    block counter from 0), read as little-endian `u32` words, each reduced
//!    modulo `2^bits`. The coordinator adds each `y_u` into one running sum.
//! 5. **Consistency check.** The coordinator names the survivors `U3` (the
//!    sites whose masked input it summed). Each survivor checks `U3 ⊆ U2`,
//!    `|U3| ≥ t` and that it is in `U3`, then signs
//!    `D ‖ "/survivors" ‖ round ‖ H ‖ SHA256(U3)` — once per round. The
//!    coordinator checks each signature and leaves out (and names) a site
//!    whose signature is false.
//! 6. **Unmask.** The coordinator forwards the signatures. A site answers only
//!    if the list is the one it signed and carries at least `t` valid signatures
//!    from distinct members of it. It then reveals, for each `v ∈ U2`, the share
//!    of `b_v` if `v ∈ U3`, else the share of `s_v`: never both for one site,
//!    and only once. The coordinator rebuilds each survivor's `b_v` and each
//!    dropped site's `s_v` from `t` answers and checks it: `b_v·G` against
//!    `v`'s commitment, `X25519(s_v)` against its signed `s_pk`. If a check
//!    fails it checks every answer's share against the commitments, names the
//!    senders of false ones ([`Server::faults`]), and rebuilds from `t` true
//!    shares; with fewer the round aborts. It then removes the masks and
//!    decodes the sum.
//!
//! Fewer than `t` participants at any step aborts the round; the model does
//! not change.

mod client;
mod crypto;
mod encoding;
mod identity;
mod server;

use serde::{Deserialize, Serialize};

use crate::ids::SiteId;

pub use client::Client;
pub use crypto::setup_digest;
pub use encoding::{Encoding, EncodingError};
pub use identity::{PeerVerifier, SiteSigner, VerifiedPeer};
pub use server::{Outcome, Server, ServerViolation};

/// The smallest cohort secure aggregation accepts.
pub const MIN_COHORT: usize = 3;

/// What every participant of a round must agree on, sent with the round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// The sites asked to take part, in Shamir index order.
    pub cohort: Vec<SiteId>,
    /// Shares needed to rebuild a secret; also the fewest sites a round may finish with.
    pub threshold: usize,
    /// How updates are encoded.
    pub encoding: Encoding,
    /// Length of the update vector.
    pub length: usize,
}

/// Why a setup is unusable.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SetupError {
    /// The cohort is too small.
    #[error("secure aggregation needs a cohort of at least {MIN_COHORT} sites, got {0}")]
    CohortTooSmall(usize),
    /// The threshold does not fit the cohort.
    #[error(
        "threshold {threshold} must be more than half of the cohort of {cohort} and at most all of it"
    )]
    Threshold {
        /// The threshold.
        threshold: usize,
        /// The cohort size.
        cohort: usize,
    },
    /// A site appears twice.
    #[error("site {0} appears twice in the cohort")]
    Duplicate(SiteId),
    /// The cohort is below this site's floor.
    #[error("a cohort of {cohort} sites is below this site's minimum of {min}")]
    BelowMinCohort {
        /// The cohort size.
        cohort: usize,
        /// The site's minimum.
        min: usize,
    },
    /// The threshold is too low for the colluders this site tolerates.
    #[error(
        "threshold {threshold} of {cohort} sites is too low against {colluders} colluding \
         sites: this site needs more than {}", (cohort + colluders) / 2
    )]
    BelowFloor {
        /// The threshold.
        threshold: usize,
        /// The cohort size.
        cohort: usize,
        /// Sites this site assumes may collude with the coordinator.
        colluders: usize,
    },
    /// The encoding could overflow.
    #[error(transparent)]
    Encoding(#[from] EncodingError),
}

impl Setup {
    /// The default threshold: more than two thirds of the cohort.
    pub fn default_threshold(cohort: usize) -> usize {
        (2 * cohort / 3 + 1).min(cohort)
    }

    /// Check the setup; called by both sides at round start.
    pub fn check(&self) -> Result<(), SetupError> {
        let n = self.cohort.len();
        if n < MIN_COHORT {
            return Err(SetupError::CohortTooSmall(n));
        }
        if self.threshold * 2 <= n || self.threshold > n {
            return Err(SetupError::Threshold {
                threshold: self.threshold,
                cohort: n,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.cohort.iter().find(|s| !seen.insert(*s)) {
            return Err(SetupError::Duplicate(dup.clone()));
        }
        self.encoding.check(n)?;
        Ok(())
    }

    /// The 1-based Shamir index of a site.
    pub fn index_of(&self, site: &SiteId) -> Option<u32> {
        self.cohort
            .iter()
            .position(|s| s == site)
            .map(|i| i as u32 + 1)
    }
}

/// The least a site accepts of any round's secure aggregation, whatever the
/// coordinator proposes: set by the site, checked by the site.
///
/// Against a coordinator that deviates from the protocol and `c` sites that
/// collude with it, a survivor's input stays hidden only if `2t > n + c`
/// (a split view needs two groups of `t` signers that overlap in colluders
/// only), and the sum carries the noise of at least `t − c` honest survivors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Floor {
    /// The smallest cohort this site takes part in.
    pub min_cohort: usize,
    /// Cohort members this site assumes may collude with the coordinator.
    pub colluders: usize,
    /// The least noise multiplier a private round may have, counting only
    /// the honest survivors' noise (see [`Floor::honest_survivors`]); 0: none.
    pub min_noise_multiplier: f64,
}

impl Default for Floor {
    fn default() -> Self {
        Self {
            min_cohort: MIN_COHORT,
            colluders: 0,
            min_noise_multiplier: 0.0,
        }
    }
}

impl Floor {
    /// Refuse a setup below this floor.
    pub fn check(&self, setup: &Setup) -> Result<(), SetupError> {
        let (n, t, c) = (setup.cohort.len(), setup.threshold, self.colluders);
        if n < self.min_cohort {
            return Err(SetupError::BelowMinCohort {
                cohort: n,
                min: self.min_cohort,
            });
        }
        if 2 * t <= n + c {
            return Err(SetupError::BelowFloor {
                threshold: t,
                cohort: n,
                colluders: c,
            });
        }
        Ok(())
    }

    /// Survivors whose noise is counted on: the threshold less the colluders
    /// (at least one, once [`Floor::check`] passed).
    pub fn honest_survivors(&self, threshold: usize) -> usize {
        threshold.saturating_sub(self.colluders).max(1)
    }
}

/// Peers' certificate keys as this site first met them, by site: a key
/// that changes is refused until this site's own operator forgets the pin
/// (`potluck-agent peers forget`). Whoever holds the franchise CA key can
/// issue a certificate in any site's name; a pinned key it cannot forge.
pub type Pins = std::collections::BTreeMap<SiteId, [u8; 32]>;

/// What a site brings to secure aggregation.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Signs the site's round keys with its certificate's key.
    pub signer: std::sync::Arc<SiteSigner>,
    /// Checks peers' certificates against the franchise CA.
    pub verifier: PeerVerifier,
    /// The least this site accepts of a round's secure aggregation.
    pub floor: Floor,
    /// Peers' keys as first met.
    pub pins: Pins,
}

/// A site's Feldman commitments to the polynomials that share its two
/// secrets (compressed Ristretto points, `t` each): they let the coordinator
/// tell a false unmask share from a true one, and name its sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareCommitments {
    /// For the mask key `s_u`.
    pub mask_key: Vec<[u8; 32]>,
    /// For the self-mask secret `b_u`.
    pub self_mask: Vec<[u8; 32]>,
}

/// A site's advertised round keys, as the coordinator relays them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The site, as the coordinator claims; checked against the certificate.
    pub site: SiteId,
    /// The site certificate (DER).
    pub cert: Vec<u8>,
    /// Key for encrypting shares to this site.
    pub cipher_pk: [u8; 32],
    /// Key for pairwise masks.
    pub mask_pk: [u8; 32],
    /// Signature over the advertise transcript.
    pub signature: Vec<u8>,
}

/// Messages from a site to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientMessage {
    /// Step 1.
    AdvertiseKeys {
        /// Key for encrypting shares to this site.
        cipher_pk: [u8; 32],
        /// Key for pairwise masks.
        mask_pk: [u8; 32],
        /// Signature over the advertise transcript.
        signature: Vec<u8>,
    },
    /// Step 3: one ciphertext per other roster member, and the commitments
    /// (for the coordinator only).
    EncryptedShares {
        /// Ciphertexts, by recipient.
        shares: Vec<(SiteId, Vec<u8>)>,
        /// Commitments to the sharing polynomials.
        commitments: ShareCommitments,
    },
    /// Step 4.
    MaskedInput(#[serde(with = "words")] Vec<u32>),
    /// Step 5.
    SurvivorSignature(Vec<u8>),
    /// Step 6: self-mask shares of survivors and mask-key shares of dropped sites.
    UnmaskShares {
        /// Shares of `b_v` for survivors `v`.
        self_mask: Vec<(SiteId, [u8; 32])>,
        /// Shares of `s_v` for dropped `v`.
        mask_key: Vec<(SiteId, [u8; 32])>,
    },
}

/// Messages from the coordinator to a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServerMessage {
    /// Step 2. Shared: the same roster goes to every site.
    Roster(std::sync::Arc<Vec<RosterEntry>>),
    /// Step 3, relayed: ciphertexts addressed to this site, by sender.
    Shares(Vec<(SiteId, Vec<u8>)>),
    /// Step 5: the survivors to sign.
    Survivors(Vec<SiteId>),
    /// Step 6: the survivors and their signatures.
    Unmask {
        /// The survivor list.
        survivors: Vec<SiteId>,
        /// Signatures over it, by signer.
        signatures: Vec<(SiteId, Vec<u8>)>,
    },
}

/// Why a site aborted a round; names the peer at fault where there is one.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ClientError {
    /// The setup is unusable.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// This site is not in the cohort.
    #[error("this site is not in the round's cohort")]
    NotInCohort,
    /// A peer's certificate failed verification.
    #[error("peer {peer}: {reason}")]
    BadCertificate {
        /// The peer.
        peer: SiteId,
        /// Why.
        reason: String,
    },
    /// A peer's certificate carries another key than the one this site
    /// pinned for it: a re-issued certificate, possibly an impersonation.
    #[error(
        "peer {0}: its certificate key is not the one this site pinned for it \
         (a re-issued certificate; if the site was re-enrolled on purpose, \
         run `potluck-agent peers forget --site {0}` here)"
    )]
    PinMismatch(SiteId),
    /// A peer's key signature is invalid: its keys were altered or replaced.
    #[error("peer {0}: its round keys are not signed by its certificate (substituted keys?)")]
    BadSignature(SiteId),
    /// The roster names a site outside the cohort, twice, or under another name.
    #[error("peer {0}: not a valid roster entry")]
    BadRosterEntry(SiteId),
    /// The roster altered this site's own keys.
    #[error("the roster carries other keys for this site")]
    OwnKeysAltered,
    /// Too few participants to continue.
    #[error("only {got} participants, the threshold is {threshold}")]
    TooFew {
        /// Participants.
        got: usize,
        /// Threshold.
        threshold: usize,
    },
    /// A share failed to decrypt: altered, replayed, or misaddressed.
    #[error("peer {0}: its encrypted share does not open (altered, replayed or misaddressed)")]
    BadShare(SiteId),
    /// The survivor list is not acceptable.
    #[error("survivor list refused: {0}")]
    BadSurvivors(String),
    /// The coordinator asked for a second survivor signature or unmasking.
    #[error("the coordinator asked again for {0}; a site answers once per round")]
    AskedTwice(&'static str),
    /// A message arrived in the wrong phase.
    #[error("unexpected {0} at this point of the round")]
    OutOfOrder(&'static str),
}

#[cfg(test)]
mod tests;

/// A masked vector on the wire: little-endian 32-bit words in one byte
/// string. Masked words are uniformly random, so varints would spend five
/// bytes on most of them.
mod words {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(words: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        deserializer.deserialize_bytes(Words)
    }

    struct Words;

    impl Visitor<'_> for Words {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string of little-endian 32-bit words")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u32>, E> {
            if !bytes.len().is_multiple_of(4) {
                return Err(E::invalid_length(bytes.len(), &self));
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect())
        }

        fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<Vec<u32>, E> {
            self.visit_bytes(&bytes)
        }
    }
}
