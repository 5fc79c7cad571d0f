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
use std::path::Path;

use potluck_shared::RoundId;
use potluck_shared::dp::accountant::Step;
use potluck_shared::dp::{Ledger, Refusal};
use potluck_shared::model::{GlobalModel, Menu, OrderRecord};
use potluck_shared::wire::codec;
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
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let name = path.display().to_string();
        let dir = path.parent().unwrap_or(Path::new("."));
        let vault = Vault::open(dir, &path.with_extension("keys"))?;
        let db = Database::create(path).map_err(|e| StoreError::Db {
            path: name.clone(),
            source: e.into(),
        })?;
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

    /// Store order lines and consent changes in one transaction.
    ///
    /// `consent` maps customers to the consent their rows stated; customers not
    /// in it keep what they had (new ones start without consent).
    pub fn import(
        &self,
        lines: &[OrderLine],
        consent: &BTreeMap<String, bool>,
    ) -> Result<ImportCounts, StoreError> {
        let rows: BTreeMap<&str, String> = lines
            .iter()
            .map(|l| l.customer_id.as_str())
            .chain(consent.keys().map(String::as_str))
            .map(|c| (c, self.vault.row_ref(c)))
            .collect();
        // Data keys first: a crash after this leaves unused keys, never unreadable rows.
        self.vault.ensure_keys(rows.values().map(String::as_str))?;
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let mut counts = ImportCounts::default();
        {
            let mut orders = txn.open_table(ORDERS).map_err(|e| self.db_err(e))?;
            let mut customers = txn.open_table(CUSTOMERS).map_err(|e| self.db_err(e))?;
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
                    match customers.get(row.as_str()).map_err(|e| self.db_err(e))? {
                        Some(bytes) => self.open_record(row, bytes.value())?,
                        None => None,
                    };
                if previous.is_none() {
                    counts.new_customers += 1;
                }
                let granted = consent
                    .get(*customer)
                    .copied()
                    .or(previous.as_ref().map(|c| c.consent))
                    .unwrap_or(false);
                if previous.as_ref().is_some_and(|c| c.consent == granted) {
                    continue;
                }
                let record = StoredCustomer {
                    customer_id: (*customer).to_string(),
                    consent: granted,
                };
                let sealed = self.seal(row, &record)?;
                customers
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

    /// Everything held about a customer, or `None` if the store has nothing.
    pub fn export(&self, customer: &str) -> Result<Option<SubjectData>, StoreError> {
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
        let mut lines: Vec<SubjectLine> = self
            .lines_of(&orders, &row)?
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
            let mut by_order: BTreeMap<String, (i64, i32, Vec<u32>)> = BTreeMap::new();
            for line in self.lines_of(&orders, &row)? {
                let entry = by_order.entry(line.order_id).or_insert((
                    line.time,
                    line.utc_offset,
                    Vec::new(),
                ));
                if let Some(&i) = index.get(line.item_id.as_str()) {
                    entry.2.push(i);
                }
            }
            let mut records: Vec<OrderRecord> = by_order
                .into_values()
                .filter(|(_, _, items)| !items.is_empty())
                .map(|(time, offset, mut items)| {
                    items.sort_unstable();
                    items.dedup();
                    order_record(time, offset, items)
                })
                .collect();
            records.sort_by_key(|r| r.time);
            out.push(CustomerHistory {
                pseudonym: self.vault.pseudonym(&customer.customer_id),
                orders: records,
            });
        }
        Ok(out)
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

    /// The privacy ledger of a model lineage (empty if this site never trained for it).
    pub fn ledger(&self, lineage: &str) -> Result<Ledger, StoreError> {
        Ok(self.meta(&ledger_key(lineage))?.unwrap_or_default())
    }

    /// Check a round against the lineage's ledger and record it, in one
    /// transaction: the outer error is the store's, the inner a refusal.
    pub fn spend_privacy(
        &self,
        lineage: &str,
        round: RoundId,
        step: Step,
        max_epsilon: f64,
        delta: f64,
    ) -> Result<Result<f64, Refusal>, StoreError> {
        let key = ledger_key(lineage);
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let mut ledger: Ledger = {
            let meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let stored = meta.get(key.as_str()).map_err(|e| self.db_err(e))?;
            match stored {
                Some(bytes) => codec::decode(bytes.value()).map_err(|e| self.corrupt(e))?,
                None => Ledger::default(),
            }
        };
        let outcome = ledger.spend(lineage, round, step, max_epsilon, delta);
        if outcome.is_ok() {
            let bytes = codec::encode(&ledger).map_err(|e| self.corrupt(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            meta.insert(key.as_str(), bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(outcome)
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

fn ledger_key(lineage: &str) -> String {
    format!("privacy-ledger/{lineage}")
}

/// The model's view of an order: local weekday and hour from time and offset.
pub fn order_record(time: i64, utc_offset: i32, items: Vec<u32>) -> OrderRecord {
    let local = time + i64::from(utc_offset);
    let days = local.div_euclid(86_400);
    // 1970-01-01 was a Thursday: Monday = 0 means Thursday = 3.
    let weekday = ((days + 3).rem_euclid(7)) as u8;
    let hour = (local.rem_euclid(86_400) / 3600) as u8;
    OrderRecord {
        time,
        weekday,
        hour,
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_weekday_and_hour() {
        // 2025-01-06T08:30:00+02:00 is a Monday, 08h local (06:30 UTC).
        let t = time::macros::datetime!(2025-01-06 08:30 +02:00).unix_timestamp();
        let r = order_record(t, 7200, vec![]);
        assert_eq!((r.weekday, r.hour), (0, 8));
        let sunday = time::macros::datetime!(2025-01-12 23:59 UTC).unix_timestamp();
        assert_eq!(order_record(sunday, 0, vec![]).weekday, 6);
    }
}
