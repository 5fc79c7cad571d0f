//! The keys that protect customer data at rest.
//!
//! - The **site master key** (32 random bytes, hex) is read from
//!   `$CREDENTIALS_DIRECTORY/potluck-master-key` when systemd passes it as a
//!   credential, else from `STATE_DIR/master.key`, created with mode 0600 on
//!   first start. Everything below is derived from it with HKDF-SHA256, so
//!   losing it loses the customer data (back it up like a certificate key).
//! - Each customer has a random 256-bit **data key**. The data keys live in the
//!   key ring, `store.keys` beside the store, sealed as a whole under a key
//!   derived from the master key and rewritten atomically on every change.
//!   They never enter the store file, so erasing a customer (removing their
//!   rows and their data key) leaves nothing of them that can be decrypted in
//!   the store file or its free pages, even with the master key.
//! - Records are sealed with XChaCha20-Poly1305 under the customer's data key,
//!   random 192-bit nonces, and the row's key as associated data (a record
//!   moved to another row does not open).
//! - Rows are keyed by a keyed hash of the customer identifier, and training
//!   sees customers only under another keyed hash, their **pseudonym**.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use potluck_shared::wire::codec;
use rand::RngExt;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The systemd credential name of the master key.
pub const MASTER_KEY_CREDENTIAL: &str = "potluck-master-key";

/// Why the keys are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file holds something else than expected.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

type Key = Zeroizing<[u8; 32]>;

/// Keyed references and the per-customer data keys of one store.
pub struct Vault {
    row_key: Key,
    pseudonym_key: Key,
    ring_key: Key,
    ring_path: PathBuf,
    ring: Mutex<BTreeMap<String, Key>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("ring_path", &self.ring_path)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Open the key ring at `ring_path` (empty if absent) under the master key
    /// found for `state_dir` (created there on first start).
    pub fn open(state_dir: &Path, ring_path: &Path) -> Result<Self, VaultError> {
        let master = master_key(state_dir)?;
        let derive = |label: &[u8]| -> Key {
            let kdf = Hkdf::<Sha256>::new(Some(b"potluck-site-v1"), master.as_ref());
            let mut key = Zeroizing::new([0u8; 32]);
            kdf.expand(label, key.as_mut())
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            key
        };
        let vault = Self {
            row_key: derive(b"row"),
            pseudonym_key: derive(b"pseudonym"),
            ring_key: derive(b"key-ring"),
            ring_path: ring_path.to_path_buf(),
            ring: Mutex::new(BTreeMap::new()),
        };
        let ring = vault.load_ring()?;
        *vault.ring.lock().expect("not poisoned") = ring;
        Ok(vault)
    }

    /// The store row of a customer: a keyed hash of their identifier.
    pub fn row_ref(&self, customer: &str) -> String {
        prf(&self.row_key, b"customer", &[customer.as_bytes()])
    }

    /// The store row of one order line of a customer.
    pub fn line_ref(&self, customer: &str, order: &str, item: &str) -> String {
        prf(
            &self.row_key,
            b"line",
            &[customer.as_bytes(), order.as_bytes(), item.as_bytes()],
        )
    }

    /// The customer's pseudonym: what training, logs and the audit log see.
    pub fn pseudonym(&self, customer: &str) -> String {
        prf(&self.pseudonym_key, b"pseudonym", &[customer.as_bytes()])
    }

    /// Whether a customer row has a data key.
    pub fn has_key(&self, row: &str) -> bool {
        self.ring.lock().expect("not poisoned").contains_key(row)
    }

    /// Give every row in `rows` a data key, persisting new ones before returning.
    pub fn ensure_keys<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), VaultError> {
        let mut ring = self.ring.lock().expect("not poisoned");
        let mut added = false;
        for row in rows {
            if !ring.contains_key(row) {
                ring.insert(row.to_string(), Zeroizing::new(rand::rng().random()));
                added = true;
            }
        }
        if added {
            self.save_ring(&ring)?;
        }
        Ok(())
    }

    /// Destroy a customer's data key: what was sealed under it can no longer be opened.
    pub fn destroy_key(&self, row: &str) -> Result<bool, VaultError> {
        Ok(self.destroy_keys([row])? > 0)
    }

    /// Destroy the data keys of `rows` in one rewrite; returns how many existed.
    pub fn destroy_keys<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a str>,
    ) -> Result<usize, VaultError> {
        let mut ring = self.ring.lock().expect("not poisoned");
        let removed = rows
            .into_iter()
            .filter(|row| ring.remove(*row).is_some())
            .count();
        if removed > 0 {
            self.save_ring(&ring)?;
        }
        Ok(removed)
    }

    /// Seal a record of `row` under its data key (which must exist).
    pub fn seal(&self, row: &str, plaintext: &[u8]) -> Option<Vec<u8>> {
        let ring = self.ring.lock().expect("not poisoned");
        seal(ring.get(row)?, row.as_bytes(), plaintext)
    }

    /// Open a record of `row`; `None` if its key is gone or the record was altered.
    pub fn open_record(&self, row: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let ring = self.ring.lock().expect("not poisoned");
        open(ring.get(row)?, row.as_bytes(), sealed)
    }

    fn load_ring(&self) -> Result<BTreeMap<String, Key>, VaultError> {
        let bytes = match std::fs::read(&self.ring_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io(&self.ring_path)(e)),
        };
        let invalid = |reason: &str| VaultError::Invalid {
            path: self.ring_path.display().to_string(),
            reason: reason.to_string(),
        };
        let plain = open(&self.ring_key, b"key-ring", &bytes)
            .ok_or_else(|| invalid("does not open under this site's master key"))?;
        let entries: Vec<(String, [u8; 32])> =
            codec::decode(&plain).map_err(|_| invalid("not a key ring"))?;
        Ok(entries
            .into_iter()
            .map(|(row, key)| (row, Zeroizing::new(key)))
            .collect())
    }

    /// Write the ring to a new file and rename it over the old one.
    fn save_ring(&self, ring: &BTreeMap<String, Key>) -> Result<(), VaultError> {
        let entries: Vec<(&String, &[u8; 32])> = ring.iter().map(|(r, k)| (r, &**k)).collect();
        let plain = Zeroizing::new(codec::encode(&entries).expect("the ring encodes"));
        let sealed = seal(&self.ring_key, b"key-ring", &plain).expect("sealing cannot fail");
        let tmp = self.ring_path.with_extension("keys.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode_private()
                .open(&tmp)?;
            file.write_all(&sealed)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.ring_path)?;
            if let Some(dir) = self.ring_path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(io(&self.ring_path))
    }
}

/// Mode 0600 for new files on Unix.
trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            self.mode(0o600);
        }
        self
    }
}

/// The master key: a systemd credential, else `STATE_DIR/master.key` (created if absent).
fn master_key(state_dir: &Path) -> Result<Key, VaultError> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(MASTER_KEY_CREDENTIAL);
        if path.exists() {
            return read_key(&path);
        }
    }
    let path = state_dir.join("master.key");
    if path.exists() {
        return read_key(&path);
    }
    let key: Key = Zeroizing::new(rand::rng().random());
    let hex = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect::<String>());
    potluck_shared::tls::write_private(&path, &hex).map_err(io(&path))?;
    Ok(key)
}

fn read_key(path: &Path) -> Result<Key, VaultError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    let hex = text.trim();
    let invalid = || VaultError::Invalid {
        path: path.display().to_string(),
        reason: "not a master key (64 hex digits)".into(),
    };
    if hex.len() != 64 {
        return Err(invalid());
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
    }
    Ok(key)
}

/// A keyed hash (HKDF-SHA256 as a PRF), 128 bits in hex.
fn prf(key: &[u8; 32], label: &[u8], parts: &[&[u8]]) -> String {
    let mut input = Vec::new();
    for part in parts {
        input.extend_from_slice(&(part.len() as u32).to_be_bytes());
        input.extend_from_slice(part);
    }
    let kdf = Hkdf::<Sha256>::new(Some(key), &input);
    let mut out = [0u8; 16];
    kdf.expand(label, &mut out)
        .expect("16 bytes is a valid HKDF-SHA256 output length");
    out.iter().map(|b| format!("{b:02x}")).collect()
}

fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce: [u8; 24] = rand::rng().random();
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?,
    );
    Some(out)
}

fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < 24 {
        return None;
    }
    let (nonce, body) = sealed.split_at(24);
    let nonce: [u8; 24] = nonce.try_into().ok()?;
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: body, aad })
        .ok()
        .map(Zeroizing::new)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VaultError + '_ {
    move |source| VaultError::Io {
        path: path.display().to_string(),
        source,
    }
}
