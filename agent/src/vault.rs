//! The keys that protect customer data at rest.
//!
//! - The **site master key** (32 random bytes, hex) is read from
//!   `$CREDENTIALS_DIRECTORY/potluck-master-key` when systemd passes it as a
//!   credential, else from `STATE_DIR/master.key`, created with mode 0600 on
//!   first start. Everything below is derived from it with HKDF-SHA256, so
//!   losing it loses the customer data (back it up like a certificate key).
//! - Each customer has a random 256-bit **data key**. The data keys live in the
//!   key ring, `store.keys` beside the store, sealed as a whole under the
//!   **ring key** and rewritten atomically on every change. They never enter
//!   the store file, so erasing a customer (removing their rows and their data
//!   key) leaves nothing of them that can be decrypted in the store file or
//!   its free pages.
//! - The ring key is random and changes with every erasure. It is kept in
//!   `store.ringkey`, sealed under a key derived from the master key, and
//!   overwritten in place (same file, same length), so an older copy of the
//!   ring, which still holds an erased customer's data key, does not open
//!   under any key the site still holds. (A flash device may keep the old
//!   block where software cannot reach it: keep the state directory on an
//!   encrypted volume.) A store written before the ring key existed has its
//!   ring sealed under the master-derived key; its first erasure moves it.
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
    /// Seals the ring key (and, in stores from before it, the ring).
    wrap_key: Key,
    ring_path: PathBuf,
    /// The ring and the key it is sealed under.
    ring: Mutex<(BTreeMap<String, Key>, Key)>,
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
        let wrap_key = derive(b"key-ring");
        let vault = Self {
            row_key: derive(b"row"),
            pseudonym_key: derive(b"pseudonym"),
            ring_path: ring_path.to_path_buf(),
            ring: Mutex::new((BTreeMap::new(), wrap_key.clone())),
            wrap_key,
        };
        let loaded = vault.load_ring()?;
        *vault.ring.lock().expect("not poisoned") = loaded;
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
        self.ring.lock().expect("not poisoned").0.contains_key(row)
    }

    /// Give every row in `rows` a data key, persisting new ones before returning.
    pub fn ensure_keys<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), VaultError> {
        let mut guard = self.ring.lock().expect("not poisoned");
        let (ring, ring_key) = &mut *guard;
        let mut added = false;
        for row in rows {
            if !ring.contains_key(row) {
                ring.insert(row.to_string(), Zeroizing::new(rand::rng().random()));
                added = true;
            }
        }
        if added {
            self.save_ring(ring, ring_key, false)?;
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
        let mut guard = self.ring.lock().expect("not poisoned");
        let (ring, ring_key) = &mut *guard;
        let removed = rows
            .into_iter()
            .filter(|row| ring.remove(*row).is_some())
            .count();
        if removed > 0 {
            // A new ring key, so that no older copy of the ring opens.
            self.save_ring(ring, ring_key, true)?;
        }
        Ok(removed)
    }

    /// Seal a record of `row` under its data key (which must exist).
    pub fn seal(&self, row: &str, plaintext: &[u8]) -> Option<Vec<u8>> {
        let ring = self.ring.lock().expect("not poisoned");
        seal(ring.0.get(row)?, row.as_bytes(), plaintext)
    }

    /// Open a record of `row`; `None` if its key is gone or the record was altered.
    pub fn open_record(&self, row: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let ring = self.ring.lock().expect("not poisoned");
        open(ring.0.get(row)?, row.as_bytes(), sealed)
    }

    fn ring_key_path(&self) -> PathBuf {
        self.ring_path.with_extension("ringkey")
    }

    fn tmp_path(&self) -> PathBuf {
        self.ring_path.with_extension("keys.tmp")
    }

    /// The ring and its key. A rotation cut short after the new key was
    /// written but before the new ring replaced the old one is finished here.
    fn load_ring(&self) -> Result<(BTreeMap<String, Key>, Key), VaultError> {
        let key_path = self.ring_key_path();
        let ring_key = match read_optional(&key_path)? {
            Some(sealed) => {
                let plain = open(&self.wrap_key, b"ring-key", &sealed).ok_or_else(|| {
                    invalid(&key_path, "does not open under this site's master key")
                })?;
                let key: [u8; 32] = plain
                    .as_slice()
                    .try_into()
                    .map_err(|_| invalid(&key_path, "not a ring key"))?;
                Zeroizing::new(key)
            }
            // A ring from before the ring key: sealed under the wrap key.
            None => self.wrap_key.clone(),
        };
        let stored = read_optional(&self.ring_path)?;
        if let Some(ring) = stored.as_deref().and_then(|b| decode_ring(&ring_key, b)) {
            return Ok((ring, ring_key));
        }
        // A rotation cut short between the new key and the rename.
        let tmp = self.tmp_path();
        if let Some(ring) = read_optional(&tmp)?.and_then(|b| decode_ring(&ring_key, &b)) {
            std::fs::rename(&tmp, &self.ring_path).map_err(io(&self.ring_path))?;
            return Ok((ring, ring_key));
        }
        if stored.is_some() {
            return Err(invalid(
                &self.ring_path,
                "does not open under this site's ring key",
            ));
        }
        // A new store: a random ring key from the start.
        let fresh = read_optional(&key_path)?.is_none();
        let ring_key = if fresh {
            Zeroizing::new(rand::rng().random())
        } else {
            ring_key
        };
        let ring = BTreeMap::new();
        Ok((ring, ring_key))
    }

    /// Write the ring to a new file and rename it over the old one; with
    /// `rotate`, under a new ring key, written in place in between.
    fn save_ring(
        &self,
        ring: &BTreeMap<String, Key>,
        ring_key: &mut Key,
        rotate: bool,
    ) -> Result<(), VaultError> {
        let next: Key = if rotate {
            Zeroizing::new(rand::rng().random())
        } else {
            ring_key.clone()
        };
        let entries: Vec<(&String, &[u8; 32])> = ring.iter().map(|(r, k)| (r, &**k)).collect();
        let plain = Zeroizing::new(codec::encode(&entries).expect("the ring encodes"));
        let sealed = seal(&next, b"key-ring", &plain).expect("sealing cannot fail");
        let tmp = self.tmp_path();
        let write_tmp = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode_private()
                .open(&tmp)?;
            file.write_all(&sealed)?;
            file.sync_all()
        };
        write_tmp().map_err(io(&tmp))?;
        if rotate || !self.ring_key_path().exists() {
            let wrapped =
                seal(&self.wrap_key, b"ring-key", next.as_ref()).expect("sealing cannot fail");
            overwrite_in_place(&self.ring_key_path(), &wrapped)
                .map_err(io(&self.ring_key_path()))?;
        }
        let rename = || -> std::io::Result<()> {
            std::fs::rename(&tmp, &self.ring_path)?;
            if let Some(dir) = self.ring_path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        rename().map_err(io(&self.ring_path))?;
        *ring_key = next;
        Ok(())
    }
}

fn decode_ring(key: &[u8; 32], sealed: &[u8]) -> Option<BTreeMap<String, Key>> {
    let plain = open(key, b"key-ring", sealed)?;
    let entries: Vec<(String, [u8; 32])> = codec::decode(&plain).ok()?;
    Some(
        entries
            .into_iter()
            .map(|(row, key)| (row, Zeroizing::new(key)))
            .collect(),
    )
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, VaultError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn invalid(path: &Path, reason: &str) -> VaultError {
    VaultError::Invalid {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Write `bytes` over the file's old contents, in the same file: a sealed
/// ring key is always the same length, so the old key's bytes are replaced
/// where they were, not left in a freed block as a rename would.
fn overwrite_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode_private()
        .open(path)?;
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation cut short after the new ring key was written, before the
    /// new ring replaced the old one: the next start finishes it.
    #[test]
    fn a_rotation_cut_short_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let ring_path = dir.path().join("store.keys");
        let vault = Vault::open(dir.path(), &ring_path).unwrap();
        vault.ensure_keys(["a", "b"]).unwrap();
        let sealed_a = vault.seal("a", b"record").unwrap();
        // Everything of a rotation but the rename.
        let next: Key = Zeroizing::new([7; 32]);
        let ring = vault.ring.lock().unwrap().0.clone();
        let entries: Vec<(&String, &[u8; 32])> = ring.iter().map(|(r, k)| (r, &**k)).collect();
        let plain = codec::encode(&entries).unwrap();
        std::fs::write(vault.tmp_path(), seal(&next, b"key-ring", &plain).unwrap()).unwrap();
        let wrapped = seal(&vault.wrap_key, b"ring-key", next.as_ref()).unwrap();
        overwrite_in_place(&vault.ring_key_path(), &wrapped).unwrap();
        drop(vault);

        let reopened = Vault::open(dir.path(), &ring_path).unwrap();
        assert!(reopened.has_key("a") && reopened.has_key("b"));
        assert_eq!(
            reopened.open_record("a", &sealed_a).unwrap().as_slice(),
            b"record"
        );
        assert!(
            !reopened.tmp_path().exists(),
            "the new ring took the old one's place"
        );
    }
}
