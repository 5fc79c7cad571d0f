//! The franchise menu: the items the model ranks, owned by the coordinator.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One menu item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MenuItem {
    /// The franchise-wide item identifier used in order files.
    pub item_id: String,
    /// A readable name.
    pub name: String,
    /// A category, e.g. `mains`, `drinks`.
    pub category: String,
}

/// The ordered list of menu items; an item's position is its index in the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Menu {
    items: Vec<MenuItem>,
}

/// Why a menu could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MenuError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A row is malformed.
    #[error("{path}:{line}: {reason}")]
    Row {
        /// The file.
        path: String,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The menu has no items.
    #[error("{0}: the menu has no items")]
    Empty(String),
}

impl Menu {
    /// Build a menu, refusing duplicate or empty item IDs.
    pub fn new(items: Vec<MenuItem>) -> Result<Self, String> {
        let mut seen = std::collections::HashSet::new();
        for item in &items {
            if item.item_id.trim().is_empty() {
                return Err("empty item_id".into());
            }
            if !seen.insert(item.item_id.as_str()) {
                return Err(format!("duplicate item_id {:?}", item.item_id));
            }
        }
        Ok(Self { items })
    }

    /// Load `item_id,name,category` rows (with a header) from a CSV file.
    pub fn load(path: &Path) -> Result<Self, MenuError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| MenuError::Io {
            path: name.clone(),
            source,
        })?;
        Self::read_csv(file, &name)
    }

    /// Read `item_id,name,category` rows (with a header); `source` names the input in errors.
    pub fn read_csv(input: impl Read, source: &str) -> Result<Self, MenuError> {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(input);
        let row_error = |line: u64, reason: String| MenuError::Row {
            path: source.to_string(),
            line,
            reason,
        };
        let headers = reader
            .headers()
            .map_err(|e| row_error(1, e.to_string()))?
            .clone();
        let column = |name: &str| {
            headers
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| row_error(1, format!("missing column {name:?}")))
        };
        let (id_col, name_col, cat_col) =
            (column("item_id")?, column("name")?, column("category")?);
        let mut items = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                row_error(line, e.to_string())
            })?;
            let line = record.position().map_or(0, |p| p.line());
            let field = |i: usize, what: &str| {
                record
                    .get(i)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| row_error(line, format!("missing {what}")))
            };
            items.push(MenuItem {
                item_id: field(id_col, "item_id")?,
                name: field(name_col, "name")?,
                category: field(cat_col, "category")?,
            });
        }
        if items.is_empty() {
            return Err(MenuError::Empty(source.to_string()));
        }
        Self::new(items).map_err(|reason| row_error(0, reason))
    }

    /// Write the menu as CSV with a header.
    pub fn write_csv(&self, out: impl std::io::Write) -> std::io::Result<()> {
        let mut writer = csv::Writer::from_writer(out);
        writer.write_record(["item_id", "name", "category"])?;
        for item in &self.items {
            writer.write_record([&item.item_id, &item.name, &item.category])?;
        }
        writer.flush()
    }

    /// The items, in model order.
    pub fn items(&self) -> &[MenuItem] {
        &self.items
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the menu is empty (never, for a loaded menu).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A lookup from item ID to model index.
    pub fn index(&self) -> HashMap<&str, u32> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, item)| (item.item_id.as_str(), i as u32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_rejects() {
        let ok = "item_id,name,category\nm1,Burger,mains\nd1,Cola,drinks\n";
        let menu = Menu::read_csv(ok.as_bytes(), "menu.csv").unwrap();
        assert_eq!(menu.len(), 2);
        assert_eq!(menu.index()["d1"], 1);

        let dup = "item_id,name,category\nm1,Burger,mains\nm1,Cola,drinks\n";
        assert!(Menu::read_csv(dup.as_bytes(), "menu.csv").is_err());

        let missing = "item_id,name,category\nm1,,mains\n";
        let err = Menu::read_csv(missing.as_bytes(), "menu.csv").unwrap_err();
        assert_eq!(err.to_string(), "menu.csv:2: missing name");

        let no_col = "item_id,name\nm1,Burger\n";
        assert!(Menu::read_csv(no_col.as_bytes(), "menu.csv").is_err());
    }
}
