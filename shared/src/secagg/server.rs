use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::crypto;
use super::{ClientMessage, RosterEntry, ServerMessage, Setup, SetupError};
use crate::ids::{RoundId, SiteId};

/// How a secure aggregation round ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The sum of the contributors' updates, decoded.
    Completed {
        /// Σ of the contributors' (clamped) update vectors.
        sum: Vec<f64>,
        /// Whose updates are in the sum.
        contributors: Vec<SiteId>,
    },
    /// Too few sites remained, or unmasking failed; nothing is learned.
    Aborted {
        /// Why.
        reason: String,
    },
}

/// A site broke the secure aggregation protocol.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ServerViolation {
    /// A message of the wrong kind for the phase.
    #[error("unexpected {0} in phase {1}")]
    Unexpected(&'static str, &'static str),
    /// Encrypted shares not addressed to exactly the other roster members.
    #[error("shares must be addressed once to every other roster member")]
    ShareRecipients,
    /// A masked vector of the wrong length or out of range.
    #[error("masked input must have {0} values below the modulus")]
    MaskedInput(usize),
    /// Unmask shares that do not match the survivor list.
    #[error("unmask shares do not match the survivor list")]
    UnmaskShares,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Advertise,
    ShareKeys,
    MaskedInput,
    Consistency,
    Unmask,
    Finished,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Advertise => "advertise_keys",
            Phase::ShareKeys => "share_keys",
            Phase::MaskedInput => "masked_input",
            Phase::Consistency => "consistency_check",
            Phase::Unmask => "unmask",
            Phase::Finished => "finished",
        }
    }
}

/// One holder's unmask shares, by owner: of `b_v` for survivors, of `s_v` for dropped sites.
type UnmaskReply = BTreeMap<SiteId, [u8; 32]>;

/// The coordinator's side of secure aggregation for one round.
///
/// It holds the cohort's certificates, relays messages, and keeps one running
/// sum of masked vectors: it never holds an individual update. Each phase ends
/// when every expected site has answered or dropped, or when the driver calls
/// [`Server::close_phase`] at the phase deadline.
#[derive(Debug)]
pub struct Server {
    round: RoundId,
    setup: Setup,
    certs: BTreeMap<SiteId, Vec<u8>>,
    phase: Phase,
    pending: BTreeSet<SiteId>,
    roster: BTreeMap<SiteId, RosterEntry>,
    shares: BTreeMap<SiteId, Vec<(SiteId, Vec<u8>)>>,
    sum: Vec<u32>,
    contributors: BTreeSet<SiteId>,
    survivors: Vec<SiteId>,
    signatures: BTreeMap<SiteId, Vec<u8>>,
    replies: BTreeMap<SiteId, UnmaskReply>,
    outbox: VecDeque<(SiteId, ServerMessage)>,
    outcome: Option<Outcome>,
}

impl Server {
    /// Start a round with the cohort's certificates (DER), as verified by TLS.
    pub fn new(
        round: RoundId,
        setup: Setup,
        certs: BTreeMap<SiteId, Vec<u8>>,
    ) -> Result<Self, SetupError> {
        setup.check()?;
        let pending = setup.cohort.iter().cloned().collect();
        let sum = vec![0u32; setup.length];
        Ok(Self {
            round,
            setup,
            certs,
            phase: Phase::Advertise,
            pending,
            roster: BTreeMap::new(),
            shares: BTreeMap::new(),
            sum,
            contributors: BTreeSet::new(),
            survivors: Vec::new(),
            signatures: BTreeMap::new(),
            replies: BTreeMap::new(),
            outbox: VecDeque::new(),
            outcome: None,
        })
    }

    /// The round.
    pub fn round(&self) -> RoundId {
        self.round
    }

    /// Shares needed to unmask: the fewest sites whose noise the sum carries.
    pub fn threshold(&self) -> usize {
        self.setup.threshold
    }

    /// The current phase's name, for logs and metrics.
    pub fn phase(&self) -> &'static str {
        self.phase.name()
    }

    /// Whether the current phase waits for masked inputs (which need local training first).
    pub fn awaits_input(&self) -> bool {
        self.phase == Phase::MaskedInput
    }

    /// Sites whose answer the current phase still waits for.
    pub fn pending(&self) -> impl Iterator<Item = &SiteId> {
        self.pending.iter()
    }

    /// A message from a site of the cohort.
    pub fn handle_message(
        &mut self,
        from: &SiteId,
        message: ClientMessage,
    ) -> Result<(), ServerViolation> {
        if !self.pending.contains(from) {
            return Ok(()); // a straggler from a closed phase, or a site not asked
        }
        let phase = self.phase;
        match (phase, message) {
            (
                Phase::Advertise,
                ClientMessage::AdvertiseKeys {
                    cipher_pk,
                    mask_pk,
                    signature,
                },
            ) => {
                let cert = self.certs.get(from).cloned().unwrap_or_default();
                let entry = RosterEntry {
                    site: from.clone(),
                    cert,
                    cipher_pk,
                    mask_pk,
                    signature,
                };
                self.roster.insert(from.clone(), entry);
            }
            (Phase::ShareKeys, ClientMessage::EncryptedShares(sealed)) => {
                let recipients: BTreeSet<&SiteId> = sealed.iter().map(|(to, _)| to).collect();
                let expected: BTreeSet<&SiteId> =
                    self.roster.keys().filter(|s| *s != from).collect();
                if recipients != expected || sealed.len() != expected.len() {
                    return Err(ServerViolation::ShareRecipients);
                }
                self.shares.insert(from.clone(), sealed);
            }
            (Phase::MaskedInput, ClientMessage::MaskedInput(masked)) => {
                let limit = crypto::modulus_mask(self.setup.encoding.bits);
                if masked.len() != self.setup.length || masked.iter().any(|&v| v > limit) {
                    return Err(ServerViolation::MaskedInput(self.setup.length));
                }
                self.setup.encoding.accumulate(&mut self.sum, &masked);
                self.contributors.insert(from.clone());
            }
            (Phase::Consistency, ClientMessage::SurvivorSignature(signature)) => {
                self.signatures.insert(from.clone(), signature);
            }
            (
                Phase::Unmask,
                ClientMessage::UnmaskShares {
                    self_mask,
                    mask_key,
                },
            ) => {
                let survivors: BTreeSet<&SiteId> = self.survivors.iter().collect();
                let dropped: BTreeSet<&SiteId> = self
                    .shares
                    .keys()
                    .filter(|s| !survivors.contains(s))
                    .collect();
                let named_self: BTreeSet<&SiteId> = self_mask.iter().map(|(s, _)| s).collect();
                let named_key: BTreeSet<&SiteId> = mask_key.iter().map(|(s, _)| s).collect();
                if named_self != survivors
                    || named_key != dropped
                    || self_mask.len() != survivors.len()
                    || mask_key.len() != dropped.len()
                {
                    return Err(ServerViolation::UnmaskShares);
                }
                let reply = self_mask.into_iter().chain(mask_key).collect();
                self.replies.insert(from.clone(), reply);
            }
            (_, message) => {
                let kind = match message {
                    ClientMessage::AdvertiseKeys { .. } => "key advertisement",
                    ClientMessage::EncryptedShares(_) => "encrypted shares",
                    ClientMessage::MaskedInput(_) => "masked input",
                    ClientMessage::SurvivorSignature(_) => "survivor signature",
                    ClientMessage::UnmaskShares { .. } => "unmask shares",
                };
                return Err(ServerViolation::Unexpected(kind, phase.name()));
            }
        }
        self.pending.remove(from);
        if self.pending.is_empty() {
            self.close_phase();
        }
        Ok(())
    }

    /// A site left; the phase closes early if nobody else is awaited.
    pub fn handle_dropped(&mut self, site: &SiteId) {
        if self.pending.remove(site) && self.pending.is_empty() {
            self.close_phase();
        }
    }

    /// End the current phase with the answers received (the driver calls this at the deadline).
    pub fn close_phase(&mut self) {
        let next = match self.phase {
            Phase::Advertise => self.start_share_keys(),
            Phase::ShareKeys => self.start_masked_input(),
            Phase::MaskedInput => self.start_consistency(),
            Phase::Consistency => self.start_unmask(),
            Phase::Unmask => self.finish(),
            Phase::Finished => return,
        };
        if let Err(reason) = next {
            self.abort(reason);
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<(SiteId, ServerMessage)> {
        self.outbox.pop_front()
    }

    /// The outcome, once the round has ended.
    pub fn poll_outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    fn enough(&self, got: usize, what: &str) -> Result<(), String> {
        if got < self.setup.threshold {
            return Err(format!(
                "{got} sites {what}, the threshold is {}",
                self.setup.threshold
            ));
        }
        Ok(())
    }

    fn abort(&mut self, reason: String) {
        self.phase = Phase::Finished;
        self.pending.clear();
        self.sum = Vec::new();
        self.outcome = Some(Outcome::Aborted { reason });
    }

    fn start_share_keys(&mut self) -> Result<(), String> {
        self.enough(self.roster.len(), "advertised keys")?;
        let roster: std::sync::Arc<Vec<RosterEntry>> =
            std::sync::Arc::new(self.roster.values().cloned().collect());
        for site in self.roster.keys() {
            self.outbox
                .push_back((site.clone(), ServerMessage::Roster(roster.clone())));
        }
        self.pending = self.roster.keys().cloned().collect();
        self.phase = Phase::ShareKeys;
        Ok(())
    }

    fn start_masked_input(&mut self) -> Result<(), String> {
        self.enough(self.shares.len(), "shared keys")?;
        // Relay each ciphertext to its recipient, keeping none: from here on
        // only who shared matters.
        let mut inbox: BTreeMap<SiteId, Vec<(SiteId, Vec<u8>)>> = self
            .shares
            .keys()
            .map(|site| (site.clone(), Vec::new()))
            .collect();
        for (sender, sealed) in &mut self.shares {
            for (recipient, ciphertext) in sealed.drain(..) {
                if let Some(addressed) = inbox.get_mut(&recipient) {
                    addressed.push((sender.clone(), ciphertext));
                }
            }
        }
        for (recipient, addressed) in inbox {
            self.outbox
                .push_back((recipient, ServerMessage::Shares(addressed)));
        }
        self.pending = self.shares.keys().cloned().collect();
        self.phase = Phase::MaskedInput;
        Ok(())
    }

    fn start_consistency(&mut self) -> Result<(), String> {
        self.enough(self.contributors.len(), "sent masked input")?;
        self.survivors = self.contributors.iter().cloned().collect();
        for site in &self.survivors {
            self.outbox.push_back((
                site.clone(),
                ServerMessage::Survivors(self.survivors.clone()),
            ));
        }
        self.pending = self.contributors.clone();
        self.phase = Phase::Consistency;
        Ok(())
    }

    fn start_unmask(&mut self) -> Result<(), String> {
        self.enough(self.signatures.len(), "signed the survivor list")?;
        let signatures: Vec<(SiteId, Vec<u8>)> = self
            .signatures
            .iter()
            .map(|(s, sig)| (s.clone(), sig.clone()))
            .collect();
        for site in self.signatures.keys() {
            let message = ServerMessage::Unmask {
                survivors: self.survivors.clone(),
                signatures: signatures.clone(),
            };
            self.outbox.push_back((site.clone(), message));
        }
        self.pending = self.signatures.keys().cloned().collect();
        self.phase = Phase::Unmask;
        Ok(())
    }

    /// Remove every mask from the running sum and decode it.
    fn finish(&mut self) -> Result<(), String> {
        self.enough(self.replies.len(), "sent unmask shares")?;
        let bits = self.setup.encoding.bits;
        let survivors: BTreeSet<SiteId> = self.survivors.iter().cloned().collect();
        // Any t holders rebuild every secret; every reply names every owner.
        let holders: Vec<(&SiteId, &UnmaskReply)> =
            self.replies.iter().take(self.setup.threshold).collect();
        let indices: Vec<u32> = holders
            .iter()
            .map(|(holder, _)| self.setup.index_of(holder))
            .collect::<Option<_>>()
            .ok_or("an unmask reply from outside the cohort")?;
        let rebuild = crypto::Reconstruction::new(&indices).ok_or("repeated holder index")?;
        for owner in self.shares.keys() {
            let survived = survivors.contains(owner);
            let values: Vec<[u8; 32]> = holders
                .iter()
                .filter_map(|(_, reply)| reply.get(owner).copied())
                .collect();
            let secret = rebuild
                .combine(&values)
                .ok_or_else(|| format!("could not rebuild the secret of {owner}"))?;
            if survived {
                crypto::apply_mask(
                    &mut self.sum,
                    &crypto::self_seed(&secret, self.round),
                    bits,
                    true,
                );
                continue;
            }
            // A dropped site: cancel the pairwise masks the survivors added for it.
            for survivor in &survivors {
                let peer_pk = self.roster[survivor].mask_pk;
                let seed = crypto::pairwise_seed(&secret, &peer_pk, self.round, owner, survivor);
                // The survivor added the mask if it sorts first, so it is removed then.
                crypto::apply_mask(&mut self.sum, &seed, bits, survivor < owner);
            }
        }
        let sum = self.setup.encoding.decode_sum(&self.sum);
        self.phase = Phase::Finished;
        self.pending.clear();
        self.outcome = Some(Outcome::Completed {
            sum,
            contributors: self.survivors.clone(),
        });
        Ok(())
    }
}
