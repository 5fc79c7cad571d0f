//! The site's embedded order store (redb: ACID, crash-safe, one file).
//!
//! Tables:
//! - `orders`: (customer, order, item) → time and quantity. The key makes a
//!   re-imported row overwrite itself, so importing a file twice adds nothing.
//! - `customers`: customer → consent.
//! - `meta`: the franchise menu and the latest global model, as sent by the coordinator.
//!
//! Each import is one write transaction: it lands whole or not at all.

use std::collections::BTreeMap;
use std::path::Path;

use potluck_shared::RoundId;
use potluck_shared::dp::accountant::Step;
use potluck_shared::dp::{Ledger, Refusal};
use potluck_shared::model::{GlobalModel, Menu, OrderRecord};
use potluck_shared::wire::codec;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const ORDERS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("orders");
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
    /// A stored record could not be decoded.
    #[error("store {path}: corrupt record: {reason}")]
    Corrupt {
        /// The store file.
        path: String,
        /// The cause.
        reason: String,
    },
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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct StoredLine {
    time: i64,
    utc_offset: i32,
    quantity: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct StoredCustomer {
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
    /// The customer.
    pub customer_id: String,
    /// Their orders.
    pub orders: Vec<OrderRecord>,
}

/// The site's store.
#[derive(Debug)]
pub struct SiteStore {
    db: Database,
    path: String,
}

impl SiteStore {
    /// Open or create the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let name = path.display().to_string();
        let db = Database::create(path).map_err(|e| StoreError::Db {
            path: name.clone(),
            source: e.into(),
        })?;
        let store = Self { db, path: name };
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

    /// Store order lines and consent changes in one transaction.
    ///
    /// `consent` maps customers to the consent their rows stated; customers not
    /// in it keep what they had (new ones start without consent).
    pub fn import(
        &self,
        lines: &[OrderLine],
        consent: &BTreeMap<String, bool>,
    ) -> Result<ImportCounts, StoreError> {
        let mut counts = ImportCounts::default();
        let encoded: Vec<Vec<u8>> = lines
            .iter()
            .map(|l| {
                codec::encode(&StoredLine {
                    time: l.time,
                    utc_offset: l.utc_offset,
                    quantity: l.quantity,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| self.corrupt(e))?;
        let customer_bytes = |consent: bool| codec::encode(&StoredCustomer { consent });
        self.write(|txn| {
            let mut orders = txn.open_table(ORDERS)?;
            let mut customers = txn.open_table(CUSTOMERS)?;
            for (line, value) in lines.iter().zip(&encoded) {
                let key = (
                    line.customer_id.as_str(),
                    line.order_id.as_str(),
                    line.item_id.as_str(),
                );
                match orders.insert(key, value.as_slice())? {
                    None => counts.added += 1,
                    Some(old) if old.value() == value.as_slice() => counts.unchanged += 1,
                    Some(_) => counts.updated += 1,
                }
                if customers.get(line.customer_id.as_str())?.is_none() {
                    counts.new_customers += 1;
                    let bytes =
                        customer_bytes(false).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                    customers.insert(line.customer_id.as_str(), bytes.as_slice())?;
                }
            }
            for (customer, &granted) in consent {
                let bytes =
                    customer_bytes(granted).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                customers.insert(customer.as_str(), bytes.as_slice())?;
            }
            Ok(())
        })?;
        Ok(counts)
    }

    /// Record a customer's consent; `false` if the customer is not in the store.
    /// Training reads consent afresh each round, so a change applies from the next one.
    pub fn set_consent(&self, customer: &str, granted: bool) -> Result<bool, StoreError> {
        let bytes =
            codec::encode(&StoredCustomer { consent: granted }).map_err(|e| self.corrupt(e))?;
        self.write(|txn| {
            let mut customers = txn.open_table(CUSTOMERS)?;
            if customers.get(customer)?.is_none() {
                return Ok(false);
            }
            customers.insert(customer, bytes.as_slice())?;
            Ok(true)
        })
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
            let (id, value) = entry.map_err(|e| self.db_err(e))?;
            let customer: StoredCustomer =
                codec::decode(value.value()).map_err(|e| self.corrupt(e))?;
            if consenting_only && !customer.consent {
                continue;
            }
            let id = id.value().to_string();
            let mut by_order: BTreeMap<String, (StoredLine, Vec<u32>)> = BTreeMap::new();
            let range = orders
                .range((id.as_str(), "", "")..)
                .map_err(|e| self.db_err(e))?;
            for line in range {
                let (key, value) = line.map_err(|e| self.db_err(e))?;
                let (customer_id, order_id, item_id) = key.value();
                if customer_id != id {
                    break;
                }
                let stored: StoredLine =
                    codec::decode(value.value()).map_err(|e| self.corrupt(e))?;
                let entry = by_order
                    .entry(order_id.to_string())
                    .or_insert_with(|| (stored, Vec::new()));
                if let Some(&i) = index.get(item_id) {
                    entry.1.push(i);
                }
            }
            let mut records: Vec<OrderRecord> = by_order
                .into_values()
                .filter(|(_, items)| !items.is_empty())
                .map(|(line, mut items)| {
                    items.sort_unstable();
                    items.dedup();
                    order_record(line.time, line.utc_offset, items)
                })
                .collect();
            records.sort_by_key(|r| r.time);
            out.push(CustomerHistory {
                customer_id: id,
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
