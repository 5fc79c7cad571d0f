//! Site identities inside secure aggregation: a site signs its round keys and
//! the survivor list with its certificate's Ed25519 key; peers check the
//! certificate against the franchise CA and the signature against it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256};

use crate::ids::SiteId;
use crate::tls::{self, TlsError};

/// The Ed25519 algorithm identifier (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// A site's signing identity: its certificate and private key.
pub struct SiteSigner {
    key: Ed25519KeyPair,
    cert: Vec<u8>,
    site: SiteId,
}

impl std::fmt::Debug for SiteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteSigner")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl SiteSigner {
    /// From the site certificate and its PKCS#8 Ed25519 key.
    pub fn new(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> Result<Self, TlsError> {
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(TlsError::Config(
                "the site key must be a PKCS#8 Ed25519 key".into(),
            ));
        };
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8.secret_pkcs8_der())
            .map_err(|e| TlsError::Config(format!("the site key is not an Ed25519 key: {e}")))?;
        let site = tls::site_id_from_cert(cert)?;
        Ok(Self {
            key,
            cert: cert.to_vec(),
            site,
        })
    }

    /// Sign a transcript.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }

    /// The certificate (DER).
    pub fn cert(&self) -> &[u8] {
        &self.cert
    }

    /// The site named in the certificate.
    pub fn site(&self) -> &SiteId {
        &self.site
    }
}

/// Checks peers' certificates against the franchise CA.
///
/// A certificate whose chain checked out is remembered (by its SHA-256) with
/// its validity window, so later rounds check only the dates: a site meets
/// the same peers round after round.
#[derive(Clone)]
pub struct PeerVerifier {
    verifier: Arc<dyn ClientCertVerifier>,
    checked: Arc<Mutex<HashMap<[u8; 32], Checked>>>,
}

/// A certificate whose chain checked out.
#[derive(Debug, Clone)]
struct Checked {
    peer: VerifiedPeer,
    /// Its validity window, in seconds since 1970.
    valid: std::ops::RangeInclusive<i64>,
}

/// Certificates remembered at most; past it the memory starts afresh.
const MAX_CHECKED: usize = 16_384;

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerVerifier")
    }
}

/// A verified peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// The site named in its certificate.
    pub site: SiteId,
    /// Its Ed25519 public key.
    pub public_key: [u8; 32],
}

impl PeerVerifier {
    /// Trust only `ca`.
    pub fn new(ca: CertificateDer<'static>) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("franchise CA: {e}")))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Self {
            verifier,
            checked: Arc::default(),
        })
    }

    /// Verify a certificate's chain and validity at `now`; return its site and key.
    pub fn verify(&self, cert: &[u8], now: SystemTime) -> Result<VerifiedPeer, String> {
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| "clock before 1970".to_string())?;
        let digest: [u8; 32] = Sha256::digest(cert).into();
        let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
        if let Some(checked) = self.remembered(&digest)
            && checked.valid.contains(&seconds)
        {
            return Ok(checked.peer);
        }
        let checked = self.check_chain(cert, since_epoch)?;
        let peer = checked.peer.clone();
        let mut remembered = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if remembered.len() >= MAX_CHECKED {
            remembered.clear();
        }
        remembered.insert(digest, checked);
        Ok(peer)
    }

    fn remembered(&self, digest: &[u8; 32]) -> Option<Checked> {
        let remembered = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        remembered.get(digest).cloned()
    }

    /// The full check: chain, dates, and an Ed25519 key naming a site.
    fn check_chain(&self, cert: &[u8], since_epoch: Duration) -> Result<Checked, String> {
        let der = CertificateDer::from(cert.to_vec());
        self.verifier
            .verify_client_cert(&der, &[], UnixTime::since_unix_epoch(since_epoch))
            .map_err(|e| format!("certificate rejected: {e}"))?;
        let site = tls::site_id_from_cert(&der).map_err(|e| e.to_string())?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
        let public_key = ed25519_key(&parsed)?;
        let validity = parsed.validity();
        Ok(Checked {
            peer: VerifiedPeer { site, public_key },
            valid: validity.not_before.timestamp()..=validity.not_after.timestamp(),
        })
    }
}

/// The Ed25519 key a certificate (DER) carries; its chain is not checked.
pub fn certificate_key(cert: &[u8]) -> Result<[u8; 32], String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    ed25519_key(&parsed)
}

fn ed25519_key(parsed: &x509_parser::certificate::X509Certificate<'_>) -> Result<[u8; 32], String> {
    let spki = &parsed.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err("certificate key is not Ed25519".into());
    }
    spki.subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "malformed Ed25519 key".to_string())
}

/// Check an Ed25519 signature.
pub fn signature_valid(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::tls::Validity;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_remembered_certificate_is_still_refused_once_it_expires() {
        let (ca, _) = tls::create_ca("Test", &[], Validity::days_from_now(30)).unwrap();
        let site = SiteId::new("site-1").unwrap();
        let creds = tls::issue_site_cert(&ca, &site, Validity::days_from_now(2)).unwrap();
        let cert = der(&creds.cert_pem);
        let verifier = PeerVerifier::new(der(&ca.cert_pem)).unwrap();
        let now = SystemTime::now();
        let first = verifier.verify(&cert, now).unwrap();
        assert_eq!(first.site, site);
        // Remembered: the same answer, and a clone shares the memory.
        assert_eq!(verifier.clone().verify(&cert, now).unwrap(), first);
        let later = now + Duration::from_secs(3 * 86_400);
        let err = verifier.verify(&cert, later).unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }
}
