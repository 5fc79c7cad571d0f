//! The site's embedded order store (redb: ACID, crash-safe, one file),
//! with every customer record encrypted (see [`crate::vault`]).
//!
//! Tables (keys are keyed hashes, values are sealed under the customer's data key):
//! - `orders`: (customer row, line ref) → {order, item, time, offset, quantity}.
//!   The line ref is a keyed hash of (customer, order, item), so a re-imported
//!   row overwrites itself and importing a file twice adds nothing.
//! - `customers`: customer row → {customer identifier, consent}.
//! - `meta`: the franchise menu, the latest global model and the privacy
//!   ledgers (no customer data).
//!
//! Nothing in the file is a customer identifier, a pseudonym, an order
//! identifier or an item in the clear. Each import is one write transaction;
//! new customers' data keys are persisted before it commits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use potluck_shared::dp::accountant::Step;
use potluck_shared::dp::{Cap, Ledger, LedgerEntry, Refusal};
use potluck_shared::model::{GlobalModel, Menu, OrderRecord};
use potluck_shared::secagg::Pins;
use potluck_shared::wire::{NeighbourRelease, codec};
use potluck_shared::{RoundId, SiteId};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::vault::{Vault, VaultError};

const ORDERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("orders");
const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const MENU_KEY: &str = "menu";
const MODEL_KEY: &str = "model";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error.
    #[error("store {path}: {source}")]
    Db {
        /// The store file.
        path: String,
        /// The cause.
        source: redb::Error,
    },
    /// A stored record could not be decoded or opened.
    #[error("store {path}: corrupt record: {reason}")]
    Corrupt {
        /// The store file.
        path: String,
        /// The cause.
        reason: String,
    },
    /// The keys are unusable.
    #[error(transparent)]
    Keys(#[from] VaultError),
    /// Another process (or task) kept the store open for too long.
    #[error(
        "store {path} is in use by another process (the agent service, or another command) and was not released within {waited_secs} s"
    )]
    InUse {
        /// The store file.
        path: String,
        /// How long we waited.
        waited_secs: u64,
    },
}

/// How long a command waits for the store by default: the running agent holds
/// it only while it reads or records something, never while it trains.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Where a store is: opens it for one use at a time, so that commands can
/// work on it while the agent service runs.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    path: PathBuf,
    wait: Duration,
}

impl StoreHandle {
    /// The store at `path`, waiting up to `wait` for other users to release it.
    pub fn new(path: PathBuf, wait: Duration) -> Self {
        Self { path, wait }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the store; others wait until it is dropped.
    pub fn open(&self) -> Result<SiteStore, StoreError> {
        SiteStore::open_waiting(&self.path, self.wait)
    }

    /// Open the store, run `f` on it, and close it.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&SiteStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.open()?)
    }
}

/// One order line to store.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderLine {
    /// Customer identifier.
    pub customer_id: String,
    /// Order identifier.
    pub order_id: String,
    /// Menu item identifier.
    pub item_id: String,
    /// Order time, Unix seconds.
    pub time: i64,
    /// The site's local UTC offset at that time, in seconds.
    pub utc_offset: i32,
    /// Quantity, at least 1.
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredLine {
    order_id: String,
    item_id: String,
    time: i64,
    utc_offset: i32,
    quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredCustomer {
    customer_id: String,
    consent: bool,
    /// Audit-only attributes (column → value).
    attributes: BTreeMap<String, String>,
}

/// What an import states about a customer besides their orders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomerFacts {
    /// Consent, if the file states it.
    pub consent: Option<bool>,
    /// Audit-only attributes the file states (column → value).
    pub attributes: BTreeMap<String, String>,
}

/// What a retention purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PurgeCounts {
    /// Order lines deleted.
    pub order_lines: u64,
    /// Customers with no order left, deleted with their data key.
    pub customers: u64,
}

/// What an import changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportCounts {
    /// Order lines not in the store before.
    pub added: u64,
    /// Order lines already stored with the same values.
    pub unchanged: u64,
    /// Order lines stored before with other values, now replaced.
    pub updated: u64,
    /// Customers seen for the first time.
    pub new_customers: u64,
}

/// A customer's orders, oldest first, with item IDs resolved against a menu.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerHistory {
    /// The customer's pseudonym (training never sees the identifier).
    pub pseudonym: String,
    /// Their orders.
    pub orders: Vec<OrderRecord>,
    /// Audit-only attributes (column → value): for fairness audits at this
    /// site, never a model input.
    pub attributes: BTreeMap<String, String>,
}

/// What recommending needs about one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    /// Consent to training and personal recommendations.
    pub consent: bool,
    /// Their orders.
    pub history: CustomerHistory,
    /// The site's UTC offset at their latest order, in seconds.
    pub utc_offset: i32,
}

/// Everything the store holds about one customer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectData {
    /// The identifier, as imported.
    pub customer_id: String,
    /// The pseudonym training uses.
    pub pseudonym: String,
    /// Consent to training.
    pub consent: bool,
    /// Audit-only attributes (column → value).
    pub attributes: BTreeMap<String, String>,
    /// Order lines, oldest first.
    pub lines: Vec<SubjectLine>,
}

/// One stored order line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectLine {
    /// Order identifier.
    pub order_id: String,
    /// Menu item.
    pub item_id: String,
    /// Unix seconds.
    pub time: i64,
    /// Local UTC offset, seconds.
    pub utc_offset: i32,
    /// Quantity.
    pub quantity: u32,
}

/// The site's store.
#[derive(Debug)]
pub struct SiteStore {
    db: Database,
    vault: Vault,
    path: String,
}

impl SiteStore {
    /// Open or create the store file; its key ring is `PATH.keys` beside it and
    /// the master key comes from systemd credentials or the same directory.
    ///
    /// The file is locked while open: the key ring is read after the lock is
    /// taken, so processes sharing the store never see a stale ring. Fails
    /// with [`StoreError::InUse`] if another process has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let name = path.display().to_string();
        let dir = path.parent().unwrap_or(Path::new("."));
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: name.clone(),
                waited_secs: 0,
            },
            e => StoreError::Db {
                path: name.clone(),
                source: e.into(),
            },
        })?;
        let vault = Vault::open(dir, &path.with_extension("keys"))?;
        let store = Self {
            db,
            vault,
            path: name,
        };
        // Create the tables so that readers never meet a missing one.
        store.write(|txn| {
            txn.open_table(ORDERS)?;
            txn.open_table(CUSTOMERS)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Open the store, waiting up to `wait` while another process has it open.
    pub fn open_waiting(path: &Path, wait: Duration) -> Result<Self, StoreError> {
        let start = Instant::now();
        let mut announced = false;
        loop {
            match Self::open(path) {
                Err(StoreError::InUse { path, .. }) if start.elapsed() < wait => {
                    if !announced {
                        tracing::info!(store = %path, "store in use; waiting for it to be released");
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(StoreError::InUse { path, .. }) => {
                    return Err(StoreError::InUse {
                        path,
                        waited_secs: wait.as_secs(),
                    });
                }
                other => return other,
            }
        }
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let out = f(&txn).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }

    fn seal<T: Serialize>(&self, row: &str, value: &T) -> Result<Vec<u8>, StoreError> {
        let plain = zeroize::Zeroizing::new(codec::encode(value).map_err(|e| self.corrupt(e))?);
        self.vault
            .seal(row, &plain)
            .ok_or_else(|| self.corrupt("a customer without a data key"))
    }

    /// Open a record; `None` when the customer's key was destroyed.
    fn open_record<T: serde::de::DeserializeOwned>(
        &self,
        row: &str,
        sealed: &[u8],
    ) -> Result<Option<T>, StoreError> {
        if !self.vault.has_key(row) {
            return Ok(None);
        }
        let plain = self
            .vault
            .open_record(row, sealed)
            .ok_or_else(|| self.corrupt("a record does not open under its customer's key"))?;
        codec::decode(&plain).map(Some).map_err(|e| self.corrupt(e))
    }

    /// Store order lines, consent and attributes in one transaction.
    ///
    /// `customers` holds what the rows stated about each customer; what they
    /// did not state is kept as it was (new customers start without consent).
    pub fn import(
        &self,
        lines: &[OrderLine],
        customers: &BTreeMap<String, CustomerFacts>,
    ) -> Result<ImportCounts, StoreError> {
        let rows: BTreeMap<&str, String> = lines
            .iter()
            .map(|l| l.customer_id.as_str())
            .chain(customers.keys().map(String::as_str))
            .map(|c| (c, self.vault.row_ref(c)))
            .collect();
        let with_lines: std::collections::BTreeSet<&str> =
            lines.iter().map(|l| l.customer_id.as_str()).collect();
        // Data keys first: a crash after this leaves unused keys, never unreadable rows.
        // Only customers with orders to store get one: existing customers have theirs.
        self.vault.ensure_keys(
            rows.iter()
                .filter(|(c, _)| with_lines.contains(*c))
                .map(|(_, row)| row.as_str()),
        )?;
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let mut counts = ImportCounts::default();
        {
            let mut orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
            let mut table = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
            for line in lines {
                let row = &rows[line.customer_id.as_str()];
                let line_ref =
                    self.vault
                        .line_ref(&line.customer_id, &line.order_id, &line.item_id);
                let stored = StoredLine {
                    order_id: line.order_id.clone(),
                    item_id: line.item_id.clone(),
                    time: line.time,
                    utc_offset: line.utc_offset,
                    quantity: line.quantity,
                };
                let old: Option<StoredLine> = match orders
                    .get((row.as_str(), line_ref.as_str()))
                    .map_err(|e| self.db_err(e))?
                {
                    Some(bytes) => self.open_record(row, bytes.value())?,
                    None => None,
                };
                match old {
                    Some(old) if old == stored => {
                        counts.unchanged += 1;
                        continue;
                    }
                    Some(_) => counts.updated += 1,
                    None => counts.added += 1,
                }
                let sealed = self.seal(row, &stored)?;
                orders
                    .insert((row.as_str(), line_ref.as_str()), sealed.as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
            for (customer, row) in &rows {
                let previous: Option<StoredCustomer> =
                    match table.get(row.as_str()).map_err(|e| self.db_err(e))? {
                        Some(bytes) => self.open_record(row, bytes.value())?,
                        None => None,
                    };
                if previous.is_none() {
                    if !with_lines.contains(customer) {
                        // What a file says of a customer none of whose orders
                        // are kept (past retention) is not kept either.
                        continue;
                    }
                    counts.new_customers += 1;
                }
                let facts = customers.get(*customer).cloned().unwrap_or_default();
                let mut record = previous.clone().unwrap_or_else(|| StoredCustomer {
                    customer_id: (*customer).to_string(),
                    consent: false,
                    attributes: BTreeMap::new(),
                });
                record.consent = facts.consent.unwrap_or(record.consent);
                record.attributes.extend(facts.attributes);
                if previous.as_ref() == Some(&record) {
                    continue;
                }
                let sealed = self.seal(row, &record)?;
                table
                    .insert(row.as_str(), sealed.as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(counts)
    }

    /// Record a customer's consent; `false` if the customer is not in the store.
    /// Training reads consent afresh each round, so a change applies from the next one.
    pub fn set_consent(&self, customer: &str, granted: bool) -> Result<bool, StoreError> {
        let row = self.vault.row_ref(customer);
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut customers = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
            let record: Option<StoredCustomer> =
                match customers.get(row.as_str()).map_err(|e| self.db_err(e))? {
                    Some(bytes) => self.open_record(&row, bytes.value())?,
                    None => None,
                };
            let Some(mut record) = record else {
                return Ok(false);
            };
            record.consent = granted;
            let sealed = self.seal(&row, &record)?;
            customers
                .insert(row.as_str(), sealed.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// A customer's pseudonym (whether or not the store holds them).
    pub fn pseudonym(&self, customer: &str) -> String {
        self.vault.pseudonym(customer)
    }

    /// A customer's record and order lines, in one read transaction.
    fn read_customer(
        &self,
        customer: &str,
    ) -> Result<Option<(StoredCustomer, Vec<StoredLine>)>, StoreError> {
        let row = self.vault.row_ref(customer);
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let customers = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
        let orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
        let record: Option<StoredCustomer> =
            match customers.get(row.as_str()).map_err(|e| self.db_err(e))? {
                Some(bytes) => self.open_record(&row, bytes.value())?,
                None => None,
            };
        let Some(record) = record else {
            return Ok(None);
        };
        Ok(Some((record, self.lines_of(&orders, &row)?)))
    }

    /// Everything held about a customer, or `None` if the store has nothing.
    pub fn export(&self, customer: &str) -> Result<Option<SubjectData>, StoreError> {
        let Some((record, lines)) = self.read_customer(customer)? else {
            return Ok(None);
        };
        let mut lines: Vec<SubjectLine> = lines
            .into_iter()
            .map(|l| SubjectLine {
                order_id: l.order_id,
                item_id: l.item_id,
                time: l.time,
                utc_offset: l.utc_offset,
                quantity: l.quantity,
            })
            .collect();
        lines.sort_by(|a, b| {
            (a.time, &a.order_id, &a.item_id).cmp(&(b.time, &b.order_id, &b.item_id))
        });
        Ok(Some(SubjectData {
            customer_id: record.customer_id,
            pseudonym: self.vault.pseudonym(customer),
            consent: record.consent,
            attributes: record.attributes,
            lines,
        }))
    }

    /// Correct one order line: set its quantity, or remove it (`None`).
    /// Returns `false` if the customer has no such line.
    pub fn rectify(
        &self,
        customer: &str,
        order: &str,
        item: &str,
        quantity: Option<u32>,
    ) -> Result<bool, StoreError> {
        let row = self.vault.row_ref(customer);
        let line_ref = self.vault.line_ref(customer, order, item);
        let key = (row.as_str(), line_ref.as_str());
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
            let stored: Option<StoredLine> = match orders.get(key).map_err(|e| self.db_err(e))? {
                Some(bytes) => self.open_record(&row, bytes.value())?,
                None => None,
            };
            let Some(mut line) = stored else {
                return Ok(false);
            };
            match quantity {
                Some(q) => {
                    line.quantity = q;
                    let sealed = self.seal(&row, &line)?;
                    orders
                        .insert(key, sealed.as_slice())
                        .map_err(|e| self.db_err(e))?;
                }
                None => {
                    orders.remove(key).map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Delete a customer's rows and destroy their data key; returns the order
    /// lines deleted, or `None` if the store held nothing of them.
    pub fn erase(&self, customer: &str) -> Result<Option<u64>, StoreError> {
        let row = self.vault.row_ref(customer);
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let (known, lines) = {
            let mut customers = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
            let mut orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
            let known = customers
                .remove(row.as_str())
                .map_err(|e| self.db_err(e))?
                .is_some();
            let removed = orders
                .extract_from_if((row.as_str(), "")..=(row.as_str(), "\u{10ffff}"), |_, _| {
                    true
                })
                .map_err(|e| self.db_err(e))?
                .count() as u64;
            (known, removed)
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        let had_key = self.vault.destroy_key(&row)?;
        Ok((known || lines > 0 || had_key).then_some(lines))
    }

    /// Delete every order line older than `cutoff` (Unix seconds), and the
    /// customers left without orders, with their data keys.
    pub fn purge(&self, cutoff: i64) -> Result<PurgeCounts, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let mut counts = PurgeCounts::default();
        let mut emptied = Vec::new();
        {
            let mut customers = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
            let mut orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
            let rows = customers
                .iter()
                .map_err(|e| self.db_err(e))?
                .map(|entry| entry.map(|(row, _)| row.value().to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.db_err(e))?;
            for row in rows {
                let (expired, kept) = self.expired_lines(&orders, &row, cutoff)?;
                for line_ref in &expired {
                    orders
                        .remove((row.as_str(), line_ref.as_str()))
                        .map_err(|e| self.db_err(e))?;
                }
                counts.order_lines += expired.len() as u64;
                if kept == 0 {
                    customers.remove(row.as_str()).map_err(|e| self.db_err(e))?;
                    emptied.push(row);
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        counts.customers = emptied.len() as u64;
        self.vault
            .destroy_keys(emptied.iter().map(String::as_str))?;
        Ok(counts)
    }

    /// The line refs of a customer's lines before `cutoff`, and how many are kept.
    fn expired_lines(
        &self,
        orders: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
        row: &str,
        cutoff: i64,
    ) -> Result<(Vec<String>, usize), StoreError> {
        let mut expired = Vec::new();
        let mut kept = 0;
        let range = orders
            .range((row, "")..=(row, "\u{10ffff}"))
            .map_err(|e| self.db_err(e))?;
        for entry in range {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            match self.open_record::<StoredLine>(row, value.value())? {
                Some(line) if line.time >= cutoff => kept += 1,
                _ => expired.push(key.value().1.to_string()),
            }
        }
        Ok((expired, kept))
    }

    /// A customer's stored lines (those whose key still exists).
    fn lines_of(
        &self,
        orders: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
        row: &str,
    ) -> Result<Vec<StoredLine>, StoreError> {
        let mut out = Vec::new();
        let range = orders
            .range((row, "")..=(row, "\u{10ffff}"))
            .map_err(|e| self.db_err(e))?;
        for entry in range {
            let (_, value) = entry.map_err(|e| self.db_err(e))?;
            if let Some(line) = self.open_record::<StoredLine>(row, value.value())? {
                out.push(line);
            }
        }
        Ok(out)
    }

    /// Customers with consent, if `consenting_only`, or all, with their orders
    /// resolved against `menu` (items not on it are left out; empty orders too).
    pub fn histories(
        &self,
        menu: &Menu,
        consenting_only: bool,
    ) -> Result<Vec<CustomerHistory>, StoreError> {
        let index = menu.index();
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let customers = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
        let orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in customers.iter().map_err(|e| self.db_err(e))? {
            let (row, value) = entry.map_err(|e| self.db_err(e))?;
            let row = row.value().to_string();
            let Some(customer) = self.open_record::<StoredCustomer>(&row, value.value())? else {
                continue; // erased: the key is gone
            };
            if consenting_only && !customer.consent {
                continue;
            }
            let lines = self.lines_of(&orders, &row)?;
            let mut history = self.history_of(&customer.customer_id, lines, &index).0;
            history.attributes = customer.attributes;
            out.push(history);
        }
        Ok(out)
    }

    /// One customer's consent and orders resolved against `menu`, or `None`
    /// if the store does not hold them.
    pub fn customer(&self, customer: &str, menu: &Menu) -> Result<Option<Customer>, StoreError> {
        let Some((record, lines)) = self.read_customer(customer)? else {
            return Ok(None);
        };
        let (history, utc_offset) = self.history_of(customer, lines, &menu.index());
        Ok(Some(Customer {
            consent: record.consent,
            history,
            utc_offset,
        }))
    }

    /// Group lines into orders, oldest first; also returns the UTC offset of the latest.
    fn history_of(
        &self,
        customer: &str,
        lines: Vec<StoredLine>,
        index: &std::collections::HashMap<&str, u32>,
    ) -> (CustomerHistory, i32) {
        let mut by_order: BTreeMap<String, (i64, i32, Vec<u32>)> = BTreeMap::new();
        for line in lines {
            let entry =
                by_order
                    .entry(line.order_id)
                    .or_insert((line.time, line.utc_offset, Vec::new()));
            if let Some(&i) = index.get(line.item_id.as_str()) {
                entry.2.push(i);
            }
        }
        let mut orders: Vec<(i32, OrderRecord)> = by_order
            .into_values()
            .filter(|(_, _, items)| !items.is_empty())
            .map(|(time, offset, mut items)| {
                items.sort_unstable();
                items.dedup();
                (offset, OrderRecord::new(time, offset, items))
            })
            .collect();
        orders.sort_by_key(|(_, r)| r.time);
        let utc_offset = orders.last().map_or(0, |(offset, _)| *offset);
        let history = CustomerHistory {
            pseudonym: self.vault.pseudonym(customer),
            orders: orders.into_iter().map(|(_, r)| r).collect(),
            attributes: BTreeMap::new(),
        };
        (history, utc_offset)
    }

    /// Number of stored order lines.
    pub fn order_lines(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
        orders.len().map_err(|e| self.db_err(e))
    }

    /// The menu last received from the coordinator, if any.
    pub fn menu(&self) -> Result<Option<Menu>, StoreError> {
        self.meta(MENU_KEY)
    }

    /// The latest global model received, if any.
    pub fn model(&self) -> Result<Option<GlobalModel>, StoreError> {
        self.meta(MODEL_KEY)
    }

    /// Keep the latest global model and its menu.
    pub fn save_model(&self, model: &GlobalModel) -> Result<(), StoreError> {
        let model_bytes = codec::encode(model).map_err(|e| self.corrupt(e))?;
        let menu_bytes = codec::encode(&model.spec.menu).map_err(|e| self.corrupt(e))?;
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            meta.insert(MODEL_KEY, model_bytes.as_slice())?;
            meta.insert(MENU_KEY, menu_bytes.as_slice())?;
            Ok(())
        })
    }

    /// The privacy ledger of this site's customers: every round it took
    /// part in, whatever lineage each was named.
    pub fn ledger(&self) -> Result<Ledger, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
        self.read_ledger(&meta)
    }

    /// Peers' certificate keys as this site first met them in secure aggregation.
    pub fn pins(&self) -> Result<Pins, StoreError> {
        Ok(self.meta(PINS_KEY)?.unwrap_or_default())
    }

    /// Pin peers met for the first time; a peer already pinned keeps its pin.
    pub fn pin_peers(&self, met: &Pins) -> Result<(), StoreError> {
        self.update_pins(|pins| {
            for (site, key) in met {
                pins.entry(site.clone()).or_insert(*key);
            }
            true
        })
    }

    /// Forget a peer's pin (after its deliberate re-enrolment); `false` if none.
    pub fn forget_pin(&self, site: &SiteId) -> Result<bool, StoreError> {
        let mut found = false;
        self.update_pins(|pins| {
            found = pins.remove(site).is_some();
            found
        })?;
        Ok(found)
    }

    fn update_pins(&self, change: impl FnOnce(&mut Pins) -> bool) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let mut pins: Pins = match meta.get(PINS_KEY).map_err(|e| self.db_err(e))? {
                Some(bytes) => codec::decode(bytes.value()).map_err(|e| self.corrupt(e))?,
                None => Pins::new(),
            };
            if change(&mut pins) {
                let bytes = codec::encode(&pins).map_err(|e| self.corrupt(e))?;
                meta.insert(PINS_KEY, bytes.as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// The popularity prior this site released under DP, if it has.
    pub fn prior_release(&self) -> Result<Option<PriorRelease>, StoreError> {
        self.meta(PRIOR_KEY)
    }

    /// The franchise's neighbour census this site last received, if any.
    pub fn neighbours(&self) -> Result<Option<NeighbourRelease>, StoreError> {
        self.meta(NEIGHBOURS_KEY)
    }

    /// Keep the franchise's neighbour census (the latest replaces any before).
    pub fn save_neighbours(&self, release: &NeighbourRelease) -> Result<(), StoreError> {
        let bytes = codec::encode(release).map_err(|e| self.corrupt(e))?;
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            meta.insert(NEIGHBOURS_KEY, bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Check a round (its `steps`) against the site's ledger and `cap` and
    /// record it at `now`, with the prior `release` it pays for, in one
    /// transaction: the outer error is the store's, the inner a refusal.
    pub fn spend_privacy(
        &self,
        (lineage, round): (&str, RoundId),
        steps: &[Step],
        cap: &Cap,
        now: u64,
        release: Option<&PriorRelease>,
    ) -> Result<Result<f64, Refusal>, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let mut ledger = {
            let meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            self.read_ledger(&meta)?
        };
        let outcome = ledger.spend((lineage, round), steps, cap, now);
        if outcome.is_ok() {
            let bytes = codec::encode(&ledger).map_err(|e| self.corrupt(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            meta.insert(LEDGER_KEY, bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
            if let Some(release) = release {
                let bytes = codec::encode(release).map_err(|e| self.corrupt(e))?;
                meta.insert(PRIOR_KEY, bytes.as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(outcome)
    }

    /// The site-wide ledger, or, in a store written before it existed, the
    /// union of the per-lineage ledgers (their rounds never leave a window).
    fn read_ledger(
        &self,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Ledger, StoreError> {
        if let Some(bytes) = meta.get(LEDGER_KEY).map_err(|e| self.db_err(e))? {
            return codec::decode(bytes.value()).map_err(|e| self.corrupt(e));
        }
        let mut entries = Vec::new();
        let legacy = meta
            .range(LEGACY_LEDGER_PREFIX..LEGACY_LEDGER_END)
            .map_err(|e| self.db_err(e))?;
        for row in legacy {
            let (key, bytes) = row.map_err(|e| self.db_err(e))?;
            let lineage = key.value().trim_start_matches(LEGACY_LEDGER_PREFIX);
            let old: LegacyLedger = codec::decode(bytes.value()).map_err(|e| self.corrupt(e))?;
            entries.extend(old.entries.into_iter().map(|e| LedgerEntry {
                lineage: lineage.to_string(),
                round: e.round,
                step: e.step,
                at: None,
            }));
        }
        Ok(Ledger { entries })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
        let Some(value) = meta.get(key).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        codec::decode(value.value())
            .map(Some)
            .map_err(|e| self.corrupt(e))
    }
}

/// Where the released prior is kept.
const PRIOR_KEY: &str = "privacy-prior";

/// Where the franchise's neighbour census is kept.
const NEIGHBOURS_KEY: &str = "neighbour-census";

/// A site's differentially private release of its popularity counts, made
/// once per lineage and then used by training, evaluation and the till.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorRelease {
    /// The lineage whose ledger paid for it.
    pub lineage: String,
    /// Noisy per-item counts.
    pub counts: Vec<f64>,
}

/// Where peers' pinned keys are kept.
const PINS_KEY: &str = "peer-pins";

/// Where the site-wide privacy ledger is kept.
const LEDGER_KEY: &str = "privacy-ledger";

/// Per-lineage ledgers, as stores kept them before the site-wide one:
/// `privacy-ledger/{lineage}` (the range ends at the character after '/').
const LEGACY_LEDGER_PREFIX: &str = "privacy-ledger/";
const LEGACY_LEDGER_END: &str = "privacy-ledger0";

/// A per-lineage ledger as stores kept it before the site-wide one.
#[derive(Deserialize)]
struct LegacyLedger {
    entries: Vec<LegacyEntry>,
}

#[derive(Deserialize)]
struct LegacyEntry {
    round: RoundId,
    step: Step,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_user_waits_for_the_store_to_be_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let first = SiteStore::open(&path).unwrap();
        let err = SiteStore::open_waiting(&path, Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(err, StoreError::InUse { .. }) && err.to_string().contains("store.redb"),
            "{err}"
        );
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        SiteStore::open_waiting(&path, Duration::from_secs(30)).unwrap();
        release.join().unwrap();
    }

    /// A store written when ledgers were kept per lineage: its rounds still
    /// count, under their lineages, and the first new round is checked
    /// against them all.
    #[test]
    fn per_lineage_ledgers_of_an_older_store_still_count() {
        #[derive(Serialize)]
        struct OldLedger {
            entries: Vec<OldEntry>,
        }
        #[derive(Serialize)]
        struct OldEntry {
            round: RoundId,
            step: Step,
        }
        let dir = tempfile::tempdir().unwrap();
        let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
        let step = Step::gaussian(0.5, 1.0);
        for lineage in ["menu-v1", "menu-v2"] {
            let old = OldLedger {
                entries: vec![OldEntry {
                    round: RoundId(1),
                    step,
                }],
            };
            let bytes = codec::encode(&old).unwrap();
            store
                .write(|txn| {
                    let mut meta = txn.open_table(META)?;
                    meta.insert(
                        format!("{LEGACY_LEDGER_PREFIX}{lineage}").as_str(),
                        bytes.as_slice(),
                    )?;
                    Ok(())
                })
                .unwrap();
        }
        let ledger = store.ledger().unwrap();
        let lineages: Vec<&str> = ledger.entries.iter().map(|e| e.lineage.as_str()).collect();
        assert_eq!(lineages, ["menu-v1", "menu-v2"]);
        let cap = Cap {
            max_epsilon: ledger
                .spent(
                    &Cap {
                        max_epsilon: 0.0,
                        delta: 1e-6,
                        window_secs: None,
                    },
                    0,
                )
                .epsilon
                + 0.01,
            delta: 1e-6,
            window_secs: Some(86_400),
        };
        // A third name buys nothing, and old rounds never age out of the window.
        let refused = store
            .spend_privacy(("menu-v3", RoundId(2)), &[step], &cap, 10 * 86_400, None)
            .unwrap();
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(store.ledger().unwrap().entries.len(), 2);
    }

    #[test]
    fn a_pin_is_kept_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
        let peer = SiteId::new("site-b").unwrap();
        store
            .pin_peers(&Pins::from([(peer.clone(), [1; 32])]))
            .unwrap();
        // Meeting the peer again with another key does not move the pin.
        store
            .pin_peers(&Pins::from([(peer.clone(), [2; 32])]))
            .unwrap();
        assert_eq!(store.pins().unwrap()[&peer], [1; 32]);
        assert!(store.forget_pin(&peer).unwrap());
        assert!(!store.forget_pin(&peer).unwrap());
        store
            .pin_peers(&Pins::from([(peer.clone(), [2; 32])]))
            .unwrap();
        assert_eq!(store.pins().unwrap()[&peer], [2; 32]);
    }
}
