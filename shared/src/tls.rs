//! The franchise PKI and mutual-TLS configuration for QUIC.
//!
//! One franchise CA (Ed25519) signs the coordinator's server certificate and
//! one certificate per site. A site's identity is the `urn:potluck:site:<id>`
//! URI in its certificate's subject alternative names, read only after rustls
//! has verified the chain to the franchise CA ([`site_id_from_cert`]).
//! Both sides trust the franchise CA alone, never the system roots.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::ids::SiteId;
use crate::wire::ALPN;

/// The SAN URI prefix that carries a site's identity.
pub const SITE_URI_PREFIX: &str = "urn:potluck:site:";

/// The DNS name the coordinator's certificate always carries; agents connect with it by default.
pub const COORDINATOR_NAME: &str = "coordinator";

/// Why a certificate, key or TLS configuration could not be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The certificate does not carry exactly one valid site identity.
    #[error("certificate does not name a site: {0}")]
    NoSiteIdentity(String),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(String),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Credentials {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// First valid instant.
    pub not_before: OffsetDateTime,
    /// Last valid instant.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (less an hour of clock skew) for `days` days.
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(i64::from(days)),
        }
    }
}

/// Create the franchise CA and the coordinator's server certificate.
///
/// `coordinator_names` are extra DNS names or IP addresses the coordinator is
/// reached at; `coordinator`, `localhost` and `127.0.0.1` are always included.
pub fn create_ca(
    franchise: &str,
    coordinator_names: &[String],
    validity: Validity,
) -> Result<(Credentials, Credentials), TlsError> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("{franchise} Potluck CA"), franchise);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let ca_cert = params.self_signed(&ca_key)?;
    let ca = Credentials {
        cert_pem: ca_cert.pem(),
        key_pem: ca_key.serialize_pem(),
    };

    let mut names = vec![
        COORDINATOR_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    names.extend(coordinator_names.iter().cloned());
    names.dedup();
    let mut server = CertificateParams::new(names)?;
    server.distinguished_name = name("Potluck coordinator", franchise);
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = validity.not_before;
    server.not_after = validity.not_after;
    let coordinator = sign(&ca, server)?;
    Ok((ca, coordinator))
}

/// Issue a site certificate carrying `site` as its identity.
pub fn issue_site_cert(
    ca: &Credentials,
    site: &SiteId,
    validity: Validity,
) -> Result<Credentials, TlsError> {
    let mut params = CertificateParams::default();
    let uri = format!("{SITE_URI_PREFIX}{site}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, site.as_str());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    sign(ca, params)
}

fn name(common: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    dn.push(DnType::OrganizationName, organization);
    dn
}

fn sign(ca: &Credentials, mut params: CertificateParams) -> Result<Credentials, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Credentials {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Read the site identity from a certificate that rustls has already verified.
pub fn site_id_from_cert(cert: &CertificateDer<'_>) -> Result<SiteId, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::NoSiteIdentity(format!("unparsable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::NoSiteIdentity(e.to_string()))?
        .ok_or_else(|| TlsError::NoSiteIdentity("no subject alternative names".into()))?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(SITE_URI_PREFIX),
        _ => None,
    });
    let id = ids
        .next()
        .ok_or_else(|| TlsError::NoSiteIdentity(format!("no {SITE_URI_PREFIX} URI")))?;
    if ids.next().is_some() {
        return Err(TlsError::NoSiteIdentity("more than one site URI".into()));
    }
    SiteId::new(id).map_err(|e| TlsError::NoSiteIdentity(e.to_string()))
}

/// The leaf certificate a QUIC peer presented, which rustls verified during the handshake.
pub fn peer_certificate(
    connection: &quinn::Connection,
) -> Result<CertificateDer<'static>, TlsError> {
    let identity = connection
        .peer_identity()
        .ok_or_else(|| TlsError::NoSiteIdentity("peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoSiteIdentity("peer identity is not a certificate chain".into()))?;
    chain
        .first()
        .cloned()
        .ok_or_else(|| TlsError::NoSiteIdentity("empty certificate chain".into()))
}

/// The franchise name (the organisation) of a certificate's subject.
pub fn franchise_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Config(format!("unparsable certificate: {e}")))?;
    parsed
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| TlsError::Config("certificate has no organisation".into()))
}

/// The end of a certificate's validity.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<OffsetDateTime, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Config(format!("unparsable certificate: {e}")))?;
    Ok(parsed.validity().not_after.to_datetime())
}

/// Read every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

/// Read a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        reason: format!("not a PEM private key: {e}"),
    })
}

/// Everything one side needs for mutual TLS: the franchise CA, its own chain and key.
#[derive(Debug)]
pub struct Identity {
    /// The franchise CA certificate, the only trust anchor.
    pub ca: CertificateDer<'static>,
    /// This side's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// This side's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Load the CA, certificate and key from PEM files, naming any file that fails.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_cert = load_certs(ca)?.remove(0);
        Ok(Self {
            ca: ca_cert,
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// Parse from PEM strings (tests and in-process federations).
    pub fn from_pem(ca_pem: &str, creds: &Credentials) -> Result<Self, TlsError> {
        let bad =
            |what: &str, e: rustls::pki_types::pem::Error| TlsError::Config(format!("{what}: {e}"));
        Ok(Self {
            ca: CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| bad("ca", e))?,
            chain: vec![
                CertificateDer::from_pem_slice(creds.cert_pem.as_bytes())
                    .map_err(|e| bad("certificate", e))?,
            ],
            key: PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes())
                .map_err(|e| bad("key", e))?,
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("franchise CA: {e}")))?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings both sides use: keep-alives well inside the idle timeout.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30))
            .expect("30 s is a valid idle timeout"),
    ));
    Arc::new(transport)
}

/// The coordinator's QUIC server configuration: client certificates are required
/// and must chain to the franchise CA.
pub fn server_config(identity: Identity) -> Result<quinn::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(identity.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// An agent's QUIC client configuration: it presents its site certificate and
/// trusts only the franchise CA.
pub fn client_config(identity: Identity) -> Result<quinn::ClientConfig, TlsError> {
    let roots = identity.roots()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// Write a secret file readable only by its owner (mode 0600 from creation).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_identity_comes_from_the_certificate() {
        let (ca, _) = create_ca("Acme", &[], Validity::days_from_now(1)).unwrap();
        let site = SiteId::new("lyon-2").unwrap();
        let creds = issue_site_cert(&ca, &site, Validity::days_from_now(1)).unwrap();
        let identity = Identity::from_pem(&ca.cert_pem, &creds).unwrap();
        assert_eq!(site_id_from_cert(&identity.chain[0]).unwrap(), site);
        assert_eq!(franchise_of(&identity.ca).unwrap(), "Acme");
        // The CA's own certificate names no site.
        assert!(site_id_from_cert(&identity.ca).is_err());
    }

    #[test]
    fn configs_build() {
        let (ca, server) =
            create_ca("Acme", &["10.0.0.1".into()], Validity::days_from_now(1)).unwrap();
        let site =
            issue_site_cert(&ca, &SiteId::new("a").unwrap(), Validity::days_from_now(1)).unwrap();
        server_config(Identity::from_pem(&ca.cert_pem, &server).unwrap()).unwrap();
        client_config(Identity::from_pem(&ca.cert_pem, &site).unwrap()).unwrap();
    }
}
