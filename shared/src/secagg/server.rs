use std::collections::{BTreeMap, BTreeSet, VecDeque};

use curve25519_dalek::scalar::Scalar;

use super::crypto::{self, Commitments, ScalarPart};
use super::identity::{certificate_key, signature_valid};
use super::{ClientMessage, RosterEntry, ServerMessage, Setup, SetupError, ShareCommitments};
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
    /// Commitments of the wrong number.
    #[error("share commitments must be {0} points per secret")]
    Commitments(usize),
    /// A survivor signature that does not verify under the site's certificate.
    #[error("its survivor signature does not verify")]
    SurvivorSignature,
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
    /// What the sites sign the round as ([`crypto::setup_digest`]).
    digest: [u8; 32],
    certs: BTreeMap<SiteId, Vec<u8>>,
    /// Each cohort member's signing key, from its certificate.
    keys: BTreeMap<SiteId, [u8; 32]>,
    phase: Phase,
    pending: BTreeSet<SiteId>,
    roster: BTreeMap<SiteId, RosterEntry>,
    shares: BTreeMap<SiteId, Vec<(SiteId, Vec<u8>)>>,
    /// Each sharer's commitments: (mask key, self-mask secret).
    commitments: BTreeMap<SiteId, (Commitments, Commitments)>,
    sum: Vec<u32>,
    contributors: BTreeSet<SiteId>,
    survivors: Vec<SiteId>,
    /// What each survivor signs, made once the list is set.
    survivors_transcript: Vec<u8>,
    signatures: BTreeMap<SiteId, Vec<u8>>,
    replies: BTreeMap<SiteId, UnmaskReply>,
    outbox: VecDeque<(SiteId, ServerMessage)>,
    outcome: Option<Outcome>,
    faults: BTreeMap<SiteId, String>,
}

impl Server {
    /// Start a round with the cohort's certificates (DER), as verified by
    /// TLS, and the `context` the sites sign with the setup (see [`super::Client::new`]).
    pub fn new(
        round: RoundId,
        setup: Setup,
        context: &[u8; 32],
        certs: BTreeMap<SiteId, Vec<u8>>,
    ) -> Result<Self, SetupError> {
        setup.check()?;
        let pending = setup.cohort.iter().cloned().collect();
        let sum = vec![0u32; setup.length];
        // A certificate without an Ed25519 key leaves its site unable to sign.
        let keys = certs
            .iter()
            .filter_map(|(site, cert)| Some((site.clone(), certificate_key(cert).ok()?)))
            .collect();
        Ok(Self {
            round,
            digest: crypto::setup_digest(&setup, context),
            setup,
            certs,
            keys,
            phase: Phase::Advertise,
            pending,
            roster: BTreeMap::new(),
            shares: BTreeMap::new(),
            commitments: BTreeMap::new(),
            sum,
            contributors: BTreeSet::new(),
            survivors: Vec::new(),
            survivors_transcript: Vec::new(),
            signatures: BTreeMap::new(),
            replies: BTreeMap::new(),
            outbox: VecDeque::new(),
            outcome: None,
            faults: BTreeMap::new(),
        })
    }

    /// Sites found to break the protocol in ways that do not show in a
    /// single message (a false unmask share), with what each did. A site
    /// whose message was refused is reported by [`Server::handle_message`].
    pub fn faults(&self) -> &BTreeMap<SiteId, String> {
        &self.faults
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
            (
                Phase::ShareKeys,
                ClientMessage::EncryptedShares {
                    shares,
                    commitments,
                },
            ) => {
                let recipients: BTreeSet<&SiteId> = shares.iter().map(|(to, _)| to).collect();
                let expected: BTreeSet<&SiteId> =
                    self.roster.keys().filter(|s| *s != from).collect();
                if recipients != expected || shares.len() != expected.len() {
                    return Err(self.refuse(from, ServerViolation::ShareRecipients));
                }
                let Some(commitments) = self.commitments_of(&commitments) else {
                    let violation = ServerViolation::Commitments(self.setup.threshold);
                    return Err(self.refuse(from, violation));
                };
                self.commitments.insert(from.clone(), commitments);
                self.shares.insert(from.clone(), shares);
            }
            (Phase::MaskedInput, ClientMessage::MaskedInput(masked)) => {
                let limit = crypto::modulus_mask(self.setup.encoding.bits);
                if masked.len() != self.setup.length || masked.iter().any(|&v| v > limit) {
                    let violation = ServerViolation::MaskedInput(self.setup.length);
                    return Err(self.refuse(from, violation));
                }
                self.setup.encoding.accumulate(&mut self.sum, &masked);
                self.contributors.insert(from.clone());
            }
            (Phase::Consistency, ClientMessage::SurvivorSignature(signature)) => {
                let valid = self.keys.get(from).is_some_and(|key| {
                    signature_valid(key, &self.survivors_transcript, &signature)
                });
                if !valid {
                    return Err(self.refuse(from, ServerViolation::SurvivorSignature));
                }
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
                    return Err(self.refuse(from, ServerViolation::UnmaskShares));
                }
                let reply = self_mask.into_iter().chain(mask_key).collect();
                self.replies.insert(from.clone(), reply);
            }
            (_, message) => {
                let kind = match message {
                    ClientMessage::AdvertiseKeys { .. } => "key advertisement",
                    ClientMessage::EncryptedShares { .. } => "encrypted shares",
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

    /// Leave `from` out of the rest of the round for `violation`, and say so.
    fn refuse(&mut self, from: &SiteId, violation: ServerViolation) -> ServerViolation {
        self.handle_dropped(from);
        violation
    }

    fn commitments_of(&self, sent: &ShareCommitments) -> Option<(Commitments, Commitments)> {
        let t = self.setup.threshold;
        Some((
            Commitments::new(&sent.mask_key, t)?,
            Commitments::new(&sent.self_mask, t)?,
        ))
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
        self.survivors_transcript =
            crypto::survivors_transcript(self.round, &self.digest, &self.survivors);
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
        let holders: Vec<SiteId> = self
            .replies
            .keys()
            .take(self.setup.threshold)
            .cloned()
            .collect();
        let indices: Vec<u32> = holders
            .iter()
            .map(|holder| self.setup.index_of(holder))
            .collect::<Option<_>>()
            .ok_or("an unmask reply from outside the cohort")?;
        let rebuild = crypto::Reconstruction::new(&indices).ok_or("repeated holder index")?;
        let owners: Vec<SiteId> = self.shares.keys().cloned().collect();
        for owner in &owners {
            let survived = survivors.contains(owner);
            let values: Vec<[u8; 32]> = holders
                .iter()
                .filter_map(|holder| self.replies[holder].get(owner).copied())
                .collect();
            let secret = match rebuild.combine(&values) {
                Some(secret) if self.is_secret_of(owner, survived, &secret) => secret,
                _ => self.rebuild_from_true_shares(owner, survived)?,
            };
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

    /// Whether `secret` is the one `owner` shared: its self-mask secret
    /// (committed to with its shares) if it survived, else its mask key
    /// (whose public key it signed).
    fn is_secret_of(&self, owner: &SiteId, survived: bool, secret: &Scalar) -> bool {
        if survived {
            self.commitments[owner].1.commit_to(secret)
        } else {
            crypto::x25519_public(secret) == self.roster[owner].mask_pk
        }
    }

    /// The slow path, taken only when some holder lied: check every reply's
    /// share of `owner`'s secret against its commitments, record the holders
    /// of false ones, and rebuild from `t` true ones if there are that many.
    fn rebuild_from_true_shares(
        &mut self,
        owner: &SiteId,
        survived: bool,
    ) -> Result<Scalar, String> {
        let (mask_key, self_mask) = &self.commitments[owner];
        let commitments = if survived { self_mask } else { mask_key };
        let Some(points) = commitments.points() else {
            self.faults.insert(
                owner.clone(),
                "sent commitments that are not curve points".into(),
            );
            return Err(format!("{owner}'s commitments are not curve points"));
        };
        let mut true_parts = Vec::new();
        let mut false_holders = Vec::new();
        for (holder, reply) in &self.replies {
            let part = reply
                .get(owner)
                .zip(self.setup.index_of(holder))
                .map(|(value, index)| ScalarPart {
                    index,
                    value: *value,
                });
            match part {
                Some(part) if Commitments::admit(&points, &part) => true_parts.push(part),
                _ => false_holders.push(holder.clone()),
            }
        }
        for holder in false_holders {
            self.faults
                .entry(holder)
                .or_insert_with(|| format!("sent a false unmask share of {owner}'s secret"));
        }
        let chosen = &true_parts[..true_parts.len().min(self.setup.threshold)];
        self.enough(
            chosen.len(),
            &format!("sent true shares of {owner}'s secret"),
        )?;
        let indices: Vec<u32> = chosen.iter().map(|p| p.index).collect();
        let values: Vec<[u8; 32]> = chosen.iter().map(|p| p.value).collect();
        crypto::Reconstruction::new(&indices)
            .and_then(|r| r.combine(&values))
            .filter(|secret| self.is_secret_of(owner, survived, secret))
            .ok_or_else(|| format!("{owner}'s shares do not rebuild the secret it committed to"))
    }
}
