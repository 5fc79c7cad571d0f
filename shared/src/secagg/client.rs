use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use curve25519_dalek::scalar::Scalar;
use rand::CryptoRng;
use zeroize::Zeroizing;

use super::crypto::{self, ScalarPart};
use super::identity::{PeerVerifier, SiteSigner, signature_valid};
use super::{
    ClientError, ClientMessage, Identity, Pins, RosterEntry, ServerMessage, Setup, ShareCommitments,
};
use crate::ids::{RoundId, SiteId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Advertised,
    SharesSent,
    HaveShares,
    InputSent,
    Signed,
    Done,
}

struct Peer {
    mask_pk: [u8; 32],
    verify_key: [u8; 32],
    /// The X25519 secret agreed with the peer's cipher key: it keys the
    /// shares sent and those received.
    cipher_agreed: Zeroizing<[u8; 32]>,
}

/// One site's side of secure aggregation for one round.
///
/// Call order: [`Client::new`] (queues the advertisement), then
/// [`Client::handle_message`] for each coordinator message and
/// [`Client::handle_input`] once the update is encoded (before or after the
/// shares arrive), draining [`Client::poll_transmit`] after each.
pub struct Client {
    round: RoundId,
    setup: Setup,
    /// What this site signs the round as ([`crypto::setup_digest`]).
    digest: [u8; 32],
    me: SiteId,
    signer: Arc<SiteSigner>,
    verifier: PeerVerifier,
    pins: Pins,
    /// Peers met for the first time this round, to pin.
    unpinned: Pins,
    cipher_secret: Zeroizing<Scalar>,
    mask_secret: Zeroizing<Scalar>,
    self_secret: Zeroizing<Scalar>,
    /// This site's advertised keys (cipher, mask), to recognise its roster entry.
    advertised: ([u8; 32], [u8; 32]),
    phase: Phase,
    peers: BTreeMap<SiteId, Peer>,
    /// Shares held, by owner: (share of its mask key, share of its self-mask secret).
    held: BTreeMap<SiteId, (ScalarPart, ScalarPart)>,
    u2: BTreeSet<SiteId>,
    input: Option<Vec<u32>>,
    signed: Option<Vec<SiteId>>,
    outbox: VecDeque<ClientMessage>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("round", &self.round)
            .field("me", &self.me)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Start a round: draw fresh keys and queue the signed advertisement.
    ///
    /// `context` is a digest of the round's parameters outside secure
    /// aggregation, as this site received them; it is signed with the setup,
    /// so the round fails unless every site was sent the same. The
    /// `identity` carries this site's own floor and pins.
    pub fn new<R: CryptoRng + ?Sized>(
        round: RoundId,
        setup: Setup,
        context: &[u8; 32],
        identity: &Identity,
        rng: &mut R,
    ) -> Result<Self, ClientError> {
        setup.check()?;
        identity.floor.check(&setup)?;
        let signer = identity.signer.clone();
        let digest = crypto::setup_digest(&setup, context);
        let me = signer.site().clone();
        if setup.index_of(&me).is_none() {
            return Err(ClientError::NotInCohort);
        }
        let cipher_secret = Zeroizing::new(crypto::random_scalar(rng));
        let mask_secret = Zeroizing::new(crypto::random_scalar(rng));
        let self_secret = Zeroizing::new(crypto::random_scalar(rng));
        let cipher_pk = crypto::x25519_public(&cipher_secret);
        let mask_pk = crypto::x25519_public(&mask_secret);
        let signature = signer.sign(&crypto::advertise_transcript(
            round, &digest, &me, &cipher_pk, &mask_pk,
        ));
        let mut outbox = VecDeque::new();
        outbox.push_back(ClientMessage::AdvertiseKeys {
            cipher_pk,
            mask_pk,
            signature,
        });
        Ok(Self {
            round,
            setup,
            digest,
            me,
            signer,
            verifier: identity.verifier.clone(),
            pins: identity.pins.clone(),
            unpinned: Pins::new(),
            cipher_secret,
            mask_secret,
            self_secret,
            advertised: (cipher_pk, mask_pk),
            phase: Phase::Advertised,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            u2: BTreeSet::new(),
            input: None,
            signed: None,
            outbox,
        })
    }

    /// The round.
    pub fn round(&self) -> RoundId {
        self.round
    }

    /// Peers whose roster entries this site accepted without a pin (met
    /// for the first time), once: the driver pins them.
    pub fn take_unpinned(&mut self) -> Pins {
        std::mem::take(&mut self.unpinned)
    }

    /// A message from the coordinator; an error aborts this site's part in the round.
    pub fn handle_message<R: CryptoRng + ?Sized>(
        &mut self,
        message: ServerMessage,
        now: SystemTime,
        rng: &mut R,
    ) -> Result<(), ClientError> {
        match message {
            ServerMessage::Roster(entries) => self.on_roster(entries, now, rng),
            ServerMessage::Shares(shares) => self.on_shares(shares),
            ServerMessage::Survivors(survivors) => self.on_survivors(survivors),
            ServerMessage::Unmask {
                survivors,
                signatures,
            } => self.on_unmask(survivors, signatures),
        }
    }

    /// The encoded update (see [`super::Encoding`]).
    pub fn handle_input(&mut self, encoded: Vec<u32>) -> Result<(), ClientError> {
        if encoded.len() != self.setup.length || self.input.is_some() {
            return Err(ClientError::OutOfOrder("input"));
        }
        self.input = Some(encoded);
        if self.phase == Phase::HaveShares {
            self.send_masked();
        }
        Ok(())
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<ClientMessage> {
        self.outbox.pop_front()
    }

    fn threshold_met(&self, got: usize) -> Result<(), ClientError> {
        if got < self.setup.threshold {
            return Err(ClientError::TooFew {
                got,
                threshold: self.setup.threshold,
            });
        }
        Ok(())
    }

    fn on_roster<R: CryptoRng + ?Sized>(
        &mut self,
        entries: Arc<Vec<RosterEntry>>,
        now: SystemTime,
        rng: &mut R,
    ) -> Result<(), ClientError> {
        if self.phase != Phase::Advertised {
            return Err(ClientError::OutOfOrder("roster"));
        }
        for entry in entries.iter() {
            let peer = self.verify_entry(entry, now)?;
            if entry.site == self.me && (entry.cipher_pk, entry.mask_pk) != self.advertised {
                return Err(ClientError::OwnKeysAltered);
            }
            self.peers.insert(entry.site.clone(), peer);
        }
        if !self.peers.contains_key(&self.me) {
            return Err(ClientError::OwnKeysAltered);
        }
        self.threshold_met(self.peers.len())?;
        self.unpinned = self
            .peers
            .iter()
            .filter(|(site, _)| **site != self.me && !self.pins.contains_key(*site))
            .map(|(site, peer)| (site.clone(), peer.verify_key))
            .collect();
        let n = self.setup.cohort.len();
        let (mask_parts, mask_key) = crypto::split(&self.mask_secret, self.setup.threshold, n, rng);
        let (self_parts, self_mask) =
            crypto::split(&self.self_secret, self.setup.threshold, n, rng);
        let mut sealed = Vec::with_capacity(self.peers.len());
        for (site, peer) in &self.peers {
            let i = self.index(site) as usize - 1;
            if *site == self.me {
                self.held
                    .insert(site.clone(), (mask_parts[i], self_parts[i]));
                continue;
            }
            let mut plain = Zeroizing::new([0u8; 64]);
            plain[..32].copy_from_slice(&mask_parts[i].value);
            plain[32..].copy_from_slice(&self_parts[i].value);
            let key = crypto::share_key(&peer.cipher_agreed, self.round, &self.me, site);
            sealed.push((
                site.clone(),
                crypto::seal(&key, self.round, &self.me, site, plain.as_ref()),
            ));
        }
        self.outbox.push_back(ClientMessage::EncryptedShares {
            shares: sealed,
            commitments: ShareCommitments {
                mask_key,
                self_mask,
            },
        });
        self.phase = Phase::SharesSent;
        Ok(())
    }

    fn verify_entry(&self, entry: &RosterEntry, now: SystemTime) -> Result<Peer, ClientError> {
        if self.setup.index_of(&entry.site).is_none() || self.peers.contains_key(&entry.site) {
            return Err(ClientError::BadRosterEntry(entry.site.clone()));
        }
        let verified = self.verifier.verify(&entry.cert, now).map_err(|reason| {
            ClientError::BadCertificate {
                peer: entry.site.clone(),
                reason,
            }
        })?;
        if verified.site != entry.site {
            return Err(ClientError::BadRosterEntry(entry.site.clone()));
        }
        if self
            .pins
            .get(&entry.site)
            .is_some_and(|pinned| *pinned != verified.public_key)
        {
            return Err(ClientError::PinMismatch(entry.site.clone()));
        }
        let transcript = crypto::advertise_transcript(
            self.round,
            &self.digest,
            &entry.site,
            &entry.cipher_pk,
            &entry.mask_pk,
        );
        if !signature_valid(&verified.public_key, &transcript, &entry.signature) {
            return Err(ClientError::BadSignature(entry.site.clone()));
        }
        Ok(Peer {
            mask_pk: entry.mask_pk,
            verify_key: verified.public_key,
            cipher_agreed: crypto::agree(&self.cipher_secret, &entry.cipher_pk),
        })
    }

    fn index(&self, site: &SiteId) -> u32 {
        self.setup
            .index_of(site)
            .expect("roster sites are checked to be in the cohort")
    }

    fn on_shares(&mut self, shares: Vec<(SiteId, Vec<u8>)>) -> Result<(), ClientError> {
        if self.phase != Phase::SharesSent {
            return Err(ClientError::OutOfOrder("shares"));
        }
        let my_index = self.index(&self.me);
        for (sender, ciphertext) in shares {
            let Some(peer) = self.peers.get(&sender).filter(|_| sender != self.me) else {
                return Err(ClientError::BadRosterEntry(sender));
            };
            if self.held.contains_key(&sender) {
                return Err(ClientError::BadRosterEntry(sender));
            }
            let key = crypto::share_key(&peer.cipher_agreed, self.round, &sender, &self.me);
            let plain = crypto::open(&key, self.round, &sender, &self.me, &ciphertext)
                .filter(|p| p.len() == 64)
                .ok_or_else(|| ClientError::BadShare(sender.clone()))?;
            let part = |range: std::ops::Range<usize>| ScalarPart {
                index: my_index,
                value: plain[range].try_into().expect("a 32-byte range"),
            };
            self.held.insert(sender, (part(0..32), part(32..64)));
        }
        self.u2 = self.held.keys().cloned().collect();
        self.threshold_met(self.u2.len())?;
        self.phase = Phase::HaveShares;
        if self.input.is_some() {
            self.send_masked();
        }
        Ok(())
    }

    fn send_masked(&mut self) {
        let Some(mut masked) = self.input.take() else {
            return;
        };
        let bits = self.setup.encoding.bits;
        crypto::apply_mask(
            &mut masked,
            &crypto::self_seed(&self.self_secret, self.round),
            bits,
            false,
        );
        for v in self.u2.iter().filter(|v| **v != self.me) {
            let seed = crypto::pairwise_seed(
                &self.mask_secret,
                &self.peers[v].mask_pk,
                self.round,
                &self.me,
                v,
            );
            crypto::apply_mask(&mut masked, &seed, bits, *v < self.me);
        }
        self.outbox.push_back(ClientMessage::MaskedInput(masked));
        self.phase = Phase::InputSent;
    }

    fn on_survivors(&mut self, survivors: Vec<SiteId>) -> Result<(), ClientError> {
        match self.phase {
            Phase::InputSent => {}
            Phase::Signed | Phase::Done => {
                return Err(ClientError::AskedTwice("a survivor signature"));
            }
            _ => return Err(ClientError::OutOfOrder("survivor list")),
        }
        let unique: BTreeSet<&SiteId> = survivors.iter().collect();
        if unique.len() != survivors.len() {
            return Err(ClientError::BadSurvivors("a site is listed twice".into()));
        }
        if let Some(stranger) = survivors.iter().find(|s| !self.u2.contains(*s)) {
            return Err(ClientError::BadSurvivors(format!(
                "{stranger} did not share keys"
            )));
        }
        if !unique.contains(&self.me) {
            return Err(ClientError::BadSurvivors("this site is not on it".into()));
        }
        self.threshold_met(survivors.len())?;
        let transcript = crypto::survivors_transcript(self.round, &self.digest, &survivors);
        self.outbox.push_back(ClientMessage::SurvivorSignature(
            self.signer.sign(&transcript),
        ));
        self.signed = Some(survivors);
        self.phase = Phase::Signed;
        Ok(())
    }

    fn on_unmask(
        &mut self,
        survivors: Vec<SiteId>,
        signatures: Vec<(SiteId, Vec<u8>)>,
    ) -> Result<(), ClientError> {
        match self.phase {
            Phase::Signed => {}
            Phase::Done => return Err(ClientError::AskedTwice("unmasking")),
            _ => return Err(ClientError::OutOfOrder("unmask request")),
        }
        if self.signed.as_ref() != Some(&survivors) {
            return Err(ClientError::BadSurvivors(
                "not the list this site signed".into(),
            ));
        }
        let transcript = crypto::survivors_transcript(self.round, &self.digest, &survivors);
        let mut signers = BTreeSet::new();
        for (signer, signature) in &signatures {
            // The threshold of agreeing survivors is what the check needs;
            // further signatures add no assurance.
            if signers.len() == self.setup.threshold {
                break;
            }
            let valid = survivors.contains(signer)
                && self
                    .peers
                    .get(signer)
                    .is_some_and(|p| signature_valid(&p.verify_key, &transcript, signature));
            if valid {
                signers.insert(signer);
            }
        }
        if signers.len() < self.setup.threshold {
            return Err(ClientError::BadSurvivors(format!(
                "{} valid signatures, {} needed",
                signers.len(),
                self.setup.threshold
            )));
        }
        let survivors: BTreeSet<&SiteId> = survivors.iter().collect();
        let (mut self_mask, mut mask_key) = (Vec::new(), Vec::new());
        for (owner, (mask_part, self_part)) in &self.held {
            if survivors.contains(owner) {
                self_mask.push((owner.clone(), self_part.value));
            } else {
                mask_key.push((owner.clone(), mask_part.value));
            }
        }
        self.outbox.push_back(ClientMessage::UnmaskShares {
            self_mask,
            mask_key,
        });
        self.phase = Phase::Done;
        Ok(())
    }
}
