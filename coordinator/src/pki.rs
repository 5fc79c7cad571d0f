//! The franchise PKI on disk: `ca init` and `enroll`.
//!
//! ```text
//! PKI/ca.pem  ca.key (0600)  coordinator.pem  coordinator.key (0600)
//! PKI/sites/SITE.pem         the certificate issued to each enrolled site
//! ```
//! With `ca init --coordinator-out DIR`, the CA key stays with its custodian
//! in PKI (with `sites/`), and DIR, for the coordinator's machine, gets
//! `ca.pem`, `coordinator.pem` and `coordinator.key` only: whoever runs the
//! coordinator then cannot issue certificates in sites' names.
//! A site bundle is laid out as `potluck_shared::bundle` says.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use potluck_shared::SiteId;
use potluck_shared::bundle;
use potluck_shared::tls::{self, Credentials, Validity};

/// Why a PKI command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA exists already.
    #[error(
        "{0}: a franchise CA exists already; use --force to replace it (every site must then be re-enrolled)"
    )]
    CaExists(String),
    /// The site is enrolled already.
    #[error("site {site} is already enrolled ({path}); use --force to issue a new certificate")]
    SiteExists {
        /// The site.
        site: SiteId,
        /// Its recorded certificate.
        path: String,
    },
    /// Certificate work failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Files of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(io(path))
}

fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    tls::write_private(path, contents).map_err(io(path))
}

fn create_private_dir(path: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
}

impl PkiDir {
    /// A PKI directory at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// The CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// The coordinator's certificate.
    pub fn coordinator_cert(&self) -> PathBuf {
        self.root.join("coordinator.pem")
    }

    /// The coordinator's private key.
    pub fn coordinator_key(&self) -> PathBuf {
        self.root.join("coordinator.key")
    }

    fn site_record(&self, site: &SiteId) -> PathBuf {
        self.root.join("sites").join(format!("{site}.pem"))
    }

    /// SHA-256 of the certificate last issued to `site`, if this PKI issued one.
    pub fn issued_fingerprint(&self, site: &SiteId) -> Result<Option<String>, PkiError> {
        let path = self.site_record(site);
        if !path.exists() {
            return Ok(None);
        }
        let certs = tls::load_certs(&path)?;
        Ok(certs
            .first()
            .map(|c| potluck_shared::audit::sha256_hex(c.as_ref())))
    }

    /// Create the franchise CA and the coordinator's certificate; the
    /// coordinator's credentials go to `coordinator_out` if given, without
    /// the CA key.
    pub fn init(
        &self,
        franchise: &str,
        hosts: &[String],
        days: u32,
        force: bool,
        coordinator_out: Option<&Path>,
    ) -> Result<(), PkiError> {
        if self.ca_key().exists() && !force {
            return Err(PkiError::CaExists(self.ca_key().display().to_string()));
        }
        create_private_dir(&self.root)?;
        create_private_dir(&self.root.join("sites"))?;
        let (ca, coordinator) = tls::create_ca(franchise, hosts, Validity::days_from_now(days))?;
        write_secret(&self.ca_key(), &ca.key_pem)?;
        write_public(&self.ca_cert(), &ca.cert_pem)?;
        let home = match coordinator_out {
            Some(out) => {
                create_private_dir(out)?;
                let dir = PkiDir::new(out);
                write_public(&dir.ca_cert(), &ca.cert_pem)?;
                dir
            }
            None => PkiDir::new(&self.root),
        };
        write_secret(&home.coordinator_key(), &coordinator.key_pem)?;
        write_public(&home.coordinator_cert(), &coordinator.cert_pem)
    }

    fn ca(&self) -> Result<Credentials, PkiError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|source| PkiError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        Ok(Credentials {
            cert_pem: read(self.ca_cert())?,
            key_pem: read(self.ca_key())?,
        })
    }

    /// Issue a site certificate and write the site's bundle to `out`.
    pub fn enroll(&self, request: &Enrollment) -> Result<(), PkiError> {
        let record = self.site_record(&request.site);
        if record.exists() && !request.force {
            return Err(PkiError::SiteExists {
                site: request.site.clone(),
                path: record.display().to_string(),
            });
        }
        let ca = self.ca()?;
        let creds = tls::issue_site_cert(&ca, &request.site, request.validity)?;
        let out = &request.out;
        create_private_dir(out)?;
        write_secret(&out.join(bundle::SITE_KEY), &creds.key_pem)?;
        write_public(&out.join(bundle::SITE_CERT), &creds.cert_pem)?;
        write_public(&out.join(bundle::CA_CERT), &ca.cert_pem)?;
        if let Some(menu) = &request.menu {
            std::fs::copy(menu, out.join(bundle::MENU)).map_err(io(menu))?;
        }
        let config = bundle::agent_toml(
            &request.site,
            request.coordinator,
            tls::COORDINATOR_NAME,
            request.menu.is_some(),
        );
        write_public(&out.join(bundle::AGENT_CONFIG), &config)?;
        let sites = self.root.join("sites");
        std::fs::create_dir_all(&sites).map_err(io(&sites))?;
        write_public(&record, &creds.cert_pem)
    }
}

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The site.
    pub site: SiteId,
    /// Where to write the bundle.
    pub out: PathBuf,
    /// The coordinator address written into `agent.toml`.
    pub coordinator: SocketAddr,
    /// The menu to include in the bundle.
    pub menu: Option<PathBuf>,
    /// Certificate validity.
    pub validity: Validity,
    /// Re-enrol an existing site.
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollment(site: &str, out: &Path, force: bool) -> Enrollment {
        Enrollment {
            site: SiteId::new(site).unwrap(),
            out: out.to_path_buf(),
            coordinator: "127.0.0.1:7443".parse().unwrap(),
            menu: None,
            validity: Validity::days_from_now(1),
            force,
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keys_are_private_and_nothing_is_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(&dir.path().join("pki"));
        pki.init("Acme", &[], 30, false, None).unwrap();
        #[cfg(unix)]
        {
            assert_eq!(mode(&pki.ca_key()), 0o600);
            assert_eq!(mode(&pki.coordinator_key()), 0o600);
        }
        let ca_before = std::fs::read_to_string(pki.ca_cert()).unwrap();
        assert!(matches!(
            pki.init("Acme", &[], 30, false, None),
            Err(PkiError::CaExists(_))
        ));
        assert_eq!(std::fs::read_to_string(pki.ca_cert()).unwrap(), ca_before);

        let out = dir.path().join("site-a");
        pki.enroll(&enrollment("site-a", &out, false)).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&out.join(bundle::SITE_KEY)), 0o600);
        let cert = std::fs::read_to_string(out.join(bundle::SITE_CERT)).unwrap();
        let err = pki.enroll(&enrollment("site-a", &out, false)).unwrap_err();
        assert!(err.to_string().contains("already enrolled"), "{err}");
        assert_eq!(
            std::fs::read_to_string(out.join(bundle::SITE_CERT)).unwrap(),
            cert
        );
        pki.enroll(&enrollment("site-a", &out, true)).unwrap();
        assert_ne!(
            std::fs::read_to_string(out.join(bundle::SITE_CERT)).unwrap(),
            cert,
            "re-enrolled"
        );
    }

    /// The CA's custodian keeps the CA key; the coordinator's directory has
    /// none, so whoever runs the coordinator cannot enrol a site.
    #[test]
    fn a_coordinator_directory_apart_from_the_ca_holds_no_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let custodian = PkiDir::new(&dir.path().join("ca"));
        let coordinator_dir = dir.path().join("coordinator");
        custodian
            .init("Acme", &[], 30, false, Some(&coordinator_dir))
            .unwrap();
        let coordinator = PkiDir::new(&coordinator_dir);
        assert!(!coordinator.ca_key().exists());
        assert!(coordinator.coordinator_key().exists() && coordinator.coordinator_cert().exists());
        assert_eq!(
            std::fs::read_to_string(coordinator.ca_cert()).unwrap(),
            std::fs::read_to_string(custodian.ca_cert()).unwrap()
        );
        assert!(
            !custodian.coordinator_key().exists(),
            "the custodian keeps no coordinator key"
        );
        let out = dir.path().join("site-a");
        let refused = coordinator.enroll(&enrollment("site-a", &out, false));
        assert!(matches!(refused, Err(PkiError::Io { .. })), "{refused:?}");
        custodian
            .enroll(&enrollment("site-a", &out, false))
            .unwrap();
    }
}
