//! The cryptographic pieces of secure aggregation, each from a maintained
//! crate: X25519 (x25519-dalek), Shamir over the curve25519 scalar field
//! (vsss-rs), HKDF-SHA256, ChaCha20-Poly1305, the ChaCha12 keystream, and
//! Ed25519 signatures with the site certificate's key (ring).

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand::CryptoRng;
use sha2::{Digest, Sha256};
#[cfg(test)]
use vsss_rs::ReadableShareSet;
use vsss_rs::{DefaultShare, FeldmanVerifierSet, IdentifierPrimeField, Share, ValueGroup, feldman};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::ids::{RoundId, SiteId};

/// Domain separation for every key derivation and signature.
const DOMAIN: &[u8] = b"potluck-secagg-v2";

type ScalarShare = DefaultShare<IdentifierPrimeField<Scalar>, IdentifierPrimeField<Scalar>>;

/// A fresh secret scalar.
pub fn random_scalar<R: CryptoRng + ?Sized>(rng: &mut R) -> Scalar {
    let mut wide = Zeroizing::new([0u8; 64]);
    rng.fill_bytes(wide.as_mut());
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// The X25519 secret whose bytes are the scalar's (so it can be rebuilt from shares).
pub fn x25519_secret(scalar: &Scalar) -> StaticSecret {
    StaticSecret::from(scalar.to_bytes())
}

/// The X25519 public key of a scalar.
pub fn x25519_public(scalar: &Scalar) -> [u8; 32] {
    PublicKey::from(&x25519_secret(scalar)).to_bytes()
}

/// A Shamir share of a scalar: the holder's 1-based index and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalarPart {
    /// 1-based position of the holder in the cohort.
    pub index: u32,
    /// The share value.
    pub value: [u8; 32],
}

/// Split `secret` into one share per holder index `1..=n`, any `threshold` of
/// which rebuild it, with Feldman commitments to the sharing polynomial
/// (vsss-rs): anyone holding them can tell a true share from a false one.
pub fn split<R: CryptoRng + ?Sized>(
    secret: &Scalar,
    threshold: usize,
    n: usize,
    rng: &mut R,
) -> (Vec<ScalarPart>, Vec<[u8; 32]>) {
    let (shares, verifiers) = feldman::split_secret::<ScalarShare, Verifier>(
        threshold,
        n,
        &IdentifierPrimeField(*secret),
        None,
        rng,
    )
    .expect("threshold checked against the cohort at round start");
    let parts = shares
        .into_iter()
        .zip(1u32..)
        .map(|(share, index)| {
            debug_assert_eq!(share.identifier().0, Scalar::from(u64::from(index)));
            ScalarPart {
                index,
                value: share.value().0.to_bytes(),
            }
        })
        .collect();
    // The set starts with the generator, which every verifier knows.
    let commitments = verifiers[1..]
        .iter()
        .map(|v| v.0.compress().to_bytes())
        .collect();
    (parts, commitments)
}

/// A Feldman verifier: a Ristretto point.
type Verifier = ValueGroup<RistrettoPoint>;

/// Feldman commitments to one sharing polynomial, as sent (compressed
/// Ristretto points); the first commits to the secret. They are decoded only
/// when a share has to be checked on its own, which an honest round never
/// needs: the coordinator checks each rebuilt secret against the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commitments(Vec<[u8; 32]>);

impl Commitments {
    /// `threshold` commitments; `None` for any other number.
    pub fn new(bytes: &[[u8; 32]], threshold: usize) -> Option<Self> {
        (bytes.len() == threshold && threshold > 0).then(|| Self(bytes.to_vec()))
    }

    /// Whether `secret` is the one committed to.
    pub fn commit_to(&self, secret: &Scalar) -> bool {
        self.0
            .first()
            .is_some_and(|c| *c == RistrettoPoint::mul_base(secret).compress().to_bytes())
    }

    /// The points, decoded; `None` if any is not a point (its sender is at fault).
    pub fn points(&self) -> Option<Vec<RistrettoPoint>> {
        self.0
            .iter()
            .map(|b| CompressedRistretto(*b).decompress())
            .collect()
    }

    /// Whether `part` lies on the polynomial `points` (from [`Commitments::points`]) commit to.
    pub fn admit(points: &[RistrettoPoint], part: &ScalarPart) -> bool {
        let Some(value) = Option::<Scalar>::from(Scalar::from_canonical_bytes(part.value)) else {
            return false;
        };
        let set: Vec<Verifier> = std::iter::once(RistrettoPoint::mul_base(&Scalar::ONE))
            .chain(points.iter().copied())
            .map(ValueGroup)
            .collect();
        let share = ScalarShare::with_identifier_and_value(
            IdentifierPrimeField(Scalar::from(u64::from(part.index))),
            IdentifierPrimeField(value),
        );
        FeldmanVerifierSet::<ScalarShare, Verifier>::verify_share(&set, &share).is_ok()
    }
}

/// Rebuild a scalar from shares with vsss-rs: the reference [`Reconstruction`] is checked against.
#[cfg(test)]
pub fn combine(parts: &[ScalarPart]) -> Option<Scalar> {
    let shares: Vec<ScalarShare> = parts
        .iter()
        .map(|p| {
            let value = Option::<Scalar>::from(Scalar::from_canonical_bytes(p.value))?;
            Some(ScalarShare::with_identifier_and_value(
                IdentifierPrimeField(Scalar::from(u64::from(p.index))),
                IdentifierPrimeField(value),
            ))
        })
        .collect::<Option<_>>()?;
    shares.combine().ok().map(|s| s.0)
}

/// Rebuilds many secrets shared among the same holders.
///
/// Reconstruction is linear: `secret = Σ_i λ_i · share_i`, where the Lagrange
/// weights `λ_i` at zero depend only on the holders' indices. The coordinator
/// rebuilds one secret per cohort member from the same `t` holders, so it
/// computes the weights once (O(t²)) instead of per secret as [`combine`]
/// (vsss-rs) does (O(n·t²) in all, seconds at 500 sites). Tests check it
/// against vsss-rs on random share sets.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    weights: Vec<Scalar>,
}

impl Reconstruction {
    /// Weights for these holder indices; `None` if any is zero or repeated.
    pub fn new(indices: &[u32]) -> Option<Self> {
        let xs: Vec<Scalar> = indices
            .iter()
            .map(|&i| Scalar::from(u64::from(i)))
            .collect();
        let distinct: std::collections::BTreeSet<u32> = indices.iter().copied().collect();
        if indices.contains(&0) || distinct.len() != indices.len() {
            return None;
        }
        let mut denominators = Vec::with_capacity(xs.len());
        let mut numerators = Vec::with_capacity(xs.len());
        for (i, x_i) in xs.iter().enumerate() {
            let (mut num, mut den) = (Scalar::ONE, Scalar::ONE);
            for (j, x_j) in xs.iter().enumerate() {
                if i != j {
                    num *= x_j;
                    den *= x_j - x_i;
                }
            }
            numerators.push(num);
            denominators.push(den);
        }
        Scalar::invert_batch_alloc(&mut denominators);
        let weights = numerators
            .iter()
            .zip(&denominators)
            .map(|(n, d)| n * d)
            .collect();
        Some(Self { weights })
    }

    /// The secret from the holders' shares, in the order of the indices given to
    /// [`Reconstruction::new`]; `None` if a share is not a canonical scalar.
    pub fn combine(&self, values: &[[u8; 32]]) -> Option<Scalar> {
        if values.len() != self.weights.len() {
            return None;
        }
        let mut secret = Scalar::ZERO;
        for (value, weight) in values.iter().zip(&self.weights) {
            let value = Option::<Scalar>::from(Scalar::from_canonical_bytes(*value))?;
            secret += value * weight;
        }
        Some(secret)
    }
}

/// Concatenate parts, each preceded by its length as a 4-byte big-endian integer,
/// so that no two lists of parts encode alike.
fn framed<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn hkdf(ikm: &[u8], label: &[u8], context: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let kdf = hkdf::Hkdf::<Sha256>::new(Some(DOMAIN), ikm);
    let info = framed(std::iter::once(label).chain(context.iter().copied()));
    let mut key = Zeroizing::new([0u8; 32]);
    kdf.expand(&info, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// The X25519 secret two sites share: computed once a round per peer, it
/// keys the shares in both directions.
pub fn agree(secret: &Scalar, peer_public: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let dh = x25519_secret(secret).diffie_hellman(&PublicKey::from(*peer_public));
    Zeroizing::new(dh.to_bytes())
}

/// The key that encrypts shares from `from` to `to` in `round`, from the
/// secret the two agreed ([`agree`]).
pub fn share_key(
    agreed: &[u8; 32],
    round: RoundId,
    from: &SiteId,
    to: &SiteId,
) -> Zeroizing<[u8; 32]> {
    hkdf(
        agreed,
        b"share-key",
        &[
            &round.0.to_be_bytes(),
            from.as_str().as_bytes(),
            to.as_str().as_bytes(),
        ],
    )
}

fn share_aad(round: RoundId, from: &SiteId, to: &SiteId) -> Vec<u8> {
    let mut aad = DOMAIN.to_vec();
    aad.extend(framed([
        &round.0.to_be_bytes()[..],
        from.as_str().as_bytes(),
        to.as_str().as_bytes(),
    ]));
    aad
}

/// Encrypt `plaintext` under `key`, bound to sender, recipient and round.
///
/// Each key encrypts exactly one message (it is derived per round and pair),
/// so a zero nonce is safe.
pub fn seal(
    key: &[u8; 32],
    round: RoundId,
    from: &SiteId,
    to: &SiteId,
    plaintext: &[u8],
) -> Vec<u8> {
    let aead = ChaCha20Poly1305::new(key.into());
    let aad = share_aad(round, from, to);
    aead.encrypt(
        &[0u8; 12].into(),
        Payload {
            msg: plaintext,
            aad: &aad,
        },
    )
    .expect("ChaCha20-Poly1305 encryption of a short message cannot fail")
}

/// Decrypt and authenticate; `None` if the ciphertext was altered, replayed from
/// another round or addressed to someone else.
pub fn open(
    key: &[u8; 32],
    round: RoundId,
    from: &SiteId,
    to: &SiteId,
    ciphertext: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let aead = ChaCha20Poly1305::new(key.into());
    let aad = share_aad(round, from, to);
    aead.decrypt(
        &[0u8; 12].into(),
        Payload {
            msg: ciphertext,
            aad: &aad,
        },
    )
    .ok()
    .map(Zeroizing::new)
}

/// The seed of the pairwise mask between `a` and `b` (order-independent).
pub fn pairwise_seed(
    secret: &Scalar,
    peer_public: &[u8; 32],
    round: RoundId,
    a: &SiteId,
    b: &SiteId,
) -> Zeroizing<[u8; 32]> {
    let dh = x25519_secret(secret).diffie_hellman(&PublicKey::from(*peer_public));
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    hkdf(
        dh.as_bytes(),
        b"pairwise-mask",
        &[
            &round.0.to_be_bytes(),
            lo.as_str().as_bytes(),
            hi.as_str().as_bytes(),
        ],
    )
}

/// The seed of a site's self mask.
pub fn self_seed(secret: &Scalar, round: RoundId) -> Zeroizing<[u8; 32]> {
    hkdf(&secret.to_bytes(), b"self-mask", &[&round.0.to_be_bytes()])
}

/// Add (`sign` = +1) or subtract (-1) the mask expanded from `seed` into `acc`, modulo `2^bits`.
///
/// The mask is the ChaCha12 keystream (key `seed`, zero nonce, counter from 0)
/// read as little-endian `u32` words, each reduced modulo `2^bits`. Twelve
/// rounds, as `rand`'s `StdRng`: the best attacks reach seven, and masking is
/// a site's largest cost (twenty rounds took a third longer).
pub fn apply_mask(acc: &mut [u32], seed: &[u8; 32], bits: u32, subtract: bool) {
    let modulus_mask = modulus_mask(bits);
    let mut cipher = chacha20::ChaCha12::new(seed.into(), &[0u8; 12].into());
    let mut block = [0u8; 4096];
    for chunk in acc.chunks_mut(block.len() / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        bytes.fill(0);
        cipher.apply_keystream(bytes);
        for (a, word) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) & modulus_mask;
            *a = if subtract {
                a.wrapping_sub(m)
            } else {
                a.wrapping_add(m)
            } & modulus_mask;
        }
    }
}

/// `2^bits - 1`, the mask that reduces a `u32` modulo `2^bits`.
pub fn modulus_mask(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

/// The bytes a site signs to advertise its round keys.
pub fn advertise_transcript(
    round: RoundId,
    setup: &[u8; 32],
    site: &SiteId,
    c_pk: &[u8; 32],
    s_pk: &[u8; 32],
) -> Vec<u8> {
    let mut t = DOMAIN.to_vec();
    t.extend_from_slice(b"/advertise");
    t.extend_from_slice(&round.0.to_be_bytes());
    t.extend_from_slice(setup);
    t.extend_from_slice(&(site.as_str().len() as u32).to_be_bytes());
    t.extend_from_slice(site.as_str().as_bytes());
    t.extend_from_slice(c_pk);
    t.extend_from_slice(s_pk);
    t
}

/// The bytes a site signs to agree on the survivor list.
pub fn survivors_transcript(round: RoundId, setup: &[u8; 32], survivors: &[SiteId]) -> Vec<u8> {
    let mut t = DOMAIN.to_vec();
    t.extend_from_slice(b"/survivors");
    t.extend_from_slice(&round.0.to_be_bytes());
    t.extend_from_slice(setup);
    t.extend_from_slice(&cohort_digest(survivors));
    t
}

/// SHA-256 over what the sites of a round must agree on: the cohort, the
/// threshold, the encoding and the caller's `context` (a digest of the
/// round's other parameters). Both transcripts carry it, so sites shown
/// different rounds cannot agree. The vector length is left to the context
/// (the round layer's task digest covers it): the coordinator refuses a
/// masked input of any other length, so a site shown another length only
/// drops out.
pub fn setup_digest(setup: &super::Setup, context: &[u8; 32]) -> [u8; 32] {
    let encoding = &setup.encoding;
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(b"/setup");
    h.update(cohort_digest(&setup.cohort));
    h.update((setup.threshold as u64).to_be_bytes());
    h.update(encoding.bits.to_be_bytes());
    h.update(encoding.scale.to_bits().to_be_bytes());
    h.update(encoding.bound.to_bits().to_be_bytes());
    h.update(encoding.noise_margin.to_bits().to_be_bytes());
    h.update(context);
    h.finalize().into()
}

/// SHA-256 over a list of site IDs, each length-prefixed.
pub fn cohort_digest(sites: &[SiteId]) -> [u8; 32] {
    let mut h = Sha256::new();
    for s in sites {
        h.update((s.as_str().len() as u32).to_be_bytes());
        h.update(s.as_str().as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shares_rebuild_the_secret_from_any_threshold_subset() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let secret = random_scalar(&mut rng);
        let (parts, _) = split(&secret, 3, 5, &mut rng);
        assert_eq!(parts.len(), 5);
        assert_eq!(combine(&[parts[0], parts[2], parts[4]]), Some(secret));
        assert_eq!(combine(&[parts[1], parts[3], parts[4]]), Some(secret));
        assert_ne!(
            combine(&[parts[0], parts[1]]),
            Some(secret),
            "two shares say nothing"
        );
        let rebuilt = x25519_secret(&combine(&parts[..3]).unwrap());
        assert_eq!(rebuilt.to_bytes(), x25519_secret(&secret).to_bytes());
    }

    proptest::proptest! {
        #[test]
        fn batched_reconstruction_matches_vsss_rs(
            seed in 0u64..u64::MAX,
            n in 3usize..40,
            t_frac in 0.34f64..1.0,
            pick in proptest::collection::vec(0usize..1000, 40),
        ) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let t = ((n as f64 * t_frac) as usize).clamp(2, n);
            let secret = random_scalar(&mut rng);
            let (parts, _) = split(&secret, t, n, &mut rng);
            // Any t holders, in any order.
            let mut holders: Vec<usize> = (0..n).collect();
            for (i, p) in pick.iter().enumerate().take(n) {
                holders.swap(i, p % n);
            }
            let chosen: Vec<ScalarPart> = holders[..t].iter().map(|&h| parts[h]).collect();
            let indices: Vec<u32> = chosen.iter().map(|p| p.index).collect();
            let values: Vec<[u8; 32]> = chosen.iter().map(|p| p.value).collect();
            let batched = Reconstruction::new(&indices).unwrap().combine(&values);
            proptest::prop_assert_eq!(batched, Some(secret));
            proptest::prop_assert_eq!(batched, combine(&chosen));
        }
    }

    #[test]
    fn commitments_tell_true_shares_and_the_true_secret_from_false_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let secret = random_scalar(&mut rng);
        let (parts, bytes) = split(&secret, 3, 5, &mut rng);
        let commitments = Commitments::new(&bytes, 3).unwrap();
        assert!(commitments.commit_to(&secret));
        assert!(!commitments.commit_to(&random_scalar(&mut rng)));
        let points = commitments.points().unwrap();
        assert!(parts.iter().all(|p| Commitments::admit(&points, p)));
        let mut forged = parts[1];
        forged.value = random_scalar(&mut rng).to_bytes();
        assert!(!Commitments::admit(&points, &forged));
        let moved = ScalarPart {
            index: 3,
            ..parts[1]
        };
        assert!(
            !Commitments::admit(&points, &moved),
            "a true share at another index"
        );
        assert!(Commitments::new(&bytes, 4).is_none(), "too few points");
        let mut not_a_point = bytes.clone();
        not_a_point[1] = [0xff; 32];
        assert!(
            Commitments::new(&not_a_point, 3)
                .unwrap()
                .points()
                .is_none()
        );
    }

    #[test]
    fn reconstruction_refuses_bad_holder_sets_and_values() {
        assert!(Reconstruction::new(&[1, 2, 2]).is_none(), "repeated index");
        assert!(Reconstruction::new(&[0, 1, 2]).is_none(), "index zero");
        let rebuild = Reconstruction::new(&[1, 2, 3]).unwrap();
        assert!(rebuild.combine(&[[0; 32]; 2]).is_none(), "too few values");
        assert!(rebuild.combine(&[[0xff; 32]; 3]).is_none(), "not canonical");
    }

    #[test]
    fn sealed_shares_are_bound_to_round_sender_and_recipient() {
        let (a, b, c) = (
            SiteId::new("a").unwrap(),
            SiteId::new("b").unwrap(),
            SiteId::new("c").unwrap(),
        );
        let key = [7u8; 32];
        let sealed = seal(&key, RoundId(3), &a, &b, b"share");
        assert_eq!(
            open(&key, RoundId(3), &a, &b, &sealed).unwrap().as_slice(),
            b"share"
        );
        assert!(
            open(&key, RoundId(4), &a, &b, &sealed).is_none(),
            "replayed from another round"
        );
        assert!(
            open(&key, RoundId(3), &a, &c, &sealed).is_none(),
            "addressed to someone else"
        );
        assert!(
            open(&key, RoundId(3), &c, &b, &sealed).is_none(),
            "from someone else"
        );
    }

    #[test]
    fn pairwise_masks_cancel() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (u, v) = (random_scalar(&mut rng), random_scalar(&mut rng));
        let (su, sv) = (SiteId::new("u").unwrap(), SiteId::new("v").unwrap());
        let seed_u = pairwise_seed(&u, &x25519_public(&v), RoundId(1), &su, &sv);
        let seed_v = pairwise_seed(&v, &x25519_public(&u), RoundId(1), &sv, &su);
        assert_eq!(*seed_u, *seed_v);
        let mut acc = vec![5u32; 1000];
        apply_mask(&mut acc, &seed_u, 20, false);
        assert!(
            acc.iter().filter(|&&x| x == 5).count() < 5,
            "masked values look random"
        );
        assert!(acc.iter().all(|&x| x < 1 << 20));
        apply_mask(&mut acc, &seed_v, 20, true);
        assert_eq!(acc, vec![5u32; 1000]);
    }
}
