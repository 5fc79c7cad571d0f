//! Datasets as customers with a natural group (their site, or their country),
//! each customer's rows in the import format.
//!
//! The UCI Online Retail mapping (Chen, 2015, CC BY 4.0,
//! <https://doi.org/10.24432/C5BW33>): an invoice is an order, a StockCode an
//! item, the Country a customer's natural site. Dropped: cancellations
//! (InvoiceNo starting with `C`), rows with a quantity below 1, rows without
//! a CustomerID, and StockCodes that are not products (no leading digit:
//! `POST`, `DOT`, `M`, `BANK CHARGES`, ...). The menu is the `menu_items`
//! products on the most invoices (ties by StockCode), named by their first
//! description, with the description's last word as category; lines of other
//! products are dropped, and so are invoices left empty. A customer who
//! ordered from several countries belongs to the one with most of their
//! invoices (ties: the first alphabetically). An order's time is its
//! invoice's first line's. Nobody in the data consented or
//! refused; every customer is treated as consenting. Times are UTC.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use potluck_shared::model::{Menu, MenuItem};
use potluck_shared::synth::{self, OrderRow, PlantedBias, SynthConfig};

use crate::config::DataConfig;

/// Why a dataset cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file cannot be read.
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
    /// The file as a whole is unusable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One customer's orders.
#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    /// Their identifier, unique in the dataset.
    pub id: String,
    /// Their natural group: site or country.
    pub group: String,
    /// Their order lines, oldest first.
    pub rows: Vec<OrderRow>,
}

impl Customer {
    /// Distinct orders.
    pub fn orders(&self) -> usize {
        let mut ids: Vec<&str> = self.rows.iter().map(|r| r.order_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
}

/// A dataset ready to partition.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The menu.
    pub menu: Menu,
    /// Every customer.
    pub customers: Vec<Customer>,
    /// What was dropped while mapping, for the summary.
    pub dropped: BTreeMap<String, u64>,
}

/// Load the dataset an experiment names.
pub fn load(config: &DataConfig, seed: u64) -> Result<Dataset, DataError> {
    match config {
        DataConfig::Synthetic {
            sites,
            customers_per_site,
            menu_items,
            days,
            planted_bias,
            bias_share,
        } => Ok(synthetic(&SynthConfig {
            seed,
            sites: *sites,
            customers_per_site: *customers_per_site,
            menu_items: *menu_items,
            days: *days,
            planted_bias: planted_bias.as_ref().map(|age_band| PlantedBias {
                age_band: age_band.clone(),
                share: *bias_share,
            }),
            ..SynthConfig::default()
        })),
        DataConfig::Csv { dir } => csv_dir(dir),
        DataConfig::OnlineRetail { path, menu_items } => {
            let name = path.display().to_string();
            let file = std::fs::File::open(path).map_err(|source| DataError::Io {
                path: name.clone(),
                source,
            })?;
            let input: Box<dyn Read> = if name.ends_with(".gz") {
                Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
            } else {
                Box::new(BufReader::new(file))
            };
            online_retail(input, &name, *menu_items)
        }
    }
}

/// A generated franchise; a customer's group is their site.
pub fn synthetic(config: &SynthConfig) -> Dataset {
    let franchise = synth::generate(config);
    let customers = franchise
        .sites
        .into_iter()
        .flat_map(|site| group_rows(site.site.as_str(), site.rows))
        .collect();
    Dataset {
        menu: franchise.menu,
        customers,
        dropped: BTreeMap::new(),
    }
}

/// Rows grouped by customer, in order of first appearance.
fn group_rows(group: &str, rows: Vec<OrderRow>) -> Vec<Customer> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut customers: Vec<Customer> = Vec::new();
    for row in rows {
        let at = *index.entry(row.customer_id.clone()).or_insert_with(|| {
            customers.push(Customer {
                id: row.customer_id.clone(),
                group: group.to_string(),
                rows: Vec::new(),
            });
            customers.len() - 1
        });
        customers[at].rows.push(row);
    }
    customers
}

/// `menu.csv` and one orders CSV per site (the file name is the site), as
/// `potluck-coordinator synth` writes them. Every file is checked as the
/// agent's import checks it, so errors name the file and line. Customer IDs
/// are prefixed with their site so they stay distinct when repartitioned.
pub fn csv_dir(dir: &Path) -> Result<Dataset, DataError> {
    let menu_path = dir.join("menu.csv");
    let menu = Menu::load(&menu_path).map_err(|e| DataError::File {
        path: menu_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DataError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "csv") && *p != menu_path)
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::File {
            path: dir.display().to_string(),
            reason: "no orders files (SITE.csv) beside menu.csv".into(),
        });
    }
    let mut customers = Vec::new();
    for path in files {
        let group = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rows = read_orders(&path, &menu)?;
        customers.extend(group_rows(&group, rows).into_iter().map(|mut c| {
            c.id = format!("{group}-{}", c.id);
            for row in &mut c.rows {
                row.customer_id.clone_from(&c.id);
            }
            c
        }));
    }
    Ok(Dataset {
        menu,
        customers,
        dropped: BTreeMap::new(),
    })
}

/// The rows of one orders file, after the import's own validation.
fn read_orders(path: &Path, menu: &Menu) -> Result<Vec<OrderRow>, DataError> {
    let name = path.display().to_string();
    let io = |source| DataError::Io {
        path: name.clone(),
        source,
    };
    let audit = ["age_band".to_string(), "gender".to_string()];
    let parsed =
        potluck_agent::import::parse(std::fs::File::open(path).map_err(io)?, &name, menu, &audit)
            .map_err(|e| DataError::File {
            path: name.clone(),
            reason: e.to_string(),
        })?;
    if let Some(first) = parsed.errors.first() {
        return Err(DataError::Row {
            path: name.clone(),
            line: first.line,
            reason: format!(
                "{} (and {} more invalid rows)",
                first.reason,
                parsed.errors.len() - 1
            ),
        });
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(std::fs::File::open(path).map_err(io)?);
    let header = header_of(&mut reader, &name)?;
    let column = |n: &str| header.iter().position(|h| h == n);
    let field = |record: &csv::StringRecord, n: &str| {
        column(n)
            .and_then(|i| record.get(i))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| DataError::Row {
            path: name.clone(),
            line: i as u64 + 2,
            reason: e.to_string(),
        })?;
        let get = |n: &str| field(&record, n).unwrap_or_default();
        rows.push(OrderRow {
            customer_id: get("customer_id"),
            order_id: get("order_id"),
            timestamp: get("timestamp"),
            item_id: get("item_id"),
            quantity: get("quantity").parse().unwrap_or(1),
            consent: get("consent") == "true",
            age_band: field(&record, "age_band"),
            gender: field(&record, "gender"),
        });
    }
    Ok(rows)
}

/// A CSV file's header row; `name` names the file in the error.
fn header_of<R: Read>(
    reader: &mut csv::Reader<R>,
    name: &str,
) -> Result<csv::StringRecord, DataError> {
    reader.headers().cloned().map_err(|e| DataError::File {
        path: name.to_string(),
        reason: e.to_string(),
    })
}

/// One usable Online Retail line.
struct RetailLine {
    invoice: String,
    stock_code: String,
    description: String,
    quantity: u32,
    time: String,
    customer: String,
    country: String,
}

/// Map the Online Retail CSV (see the module docs); `name` names it in errors.
pub fn online_retail(
    input: impl Read,
    name: &str,
    menu_items: usize,
) -> Result<Dataset, DataError> {
    let mut dropped = BTreeMap::new();
    let lines = retail_lines(input, name, &mut dropped)?;
    let menu = retail_menu(&lines, menu_items).map_err(|reason| DataError::File {
        path: name.to_string(),
        reason,
    })?;
    let on_menu: std::collections::HashSet<&str> =
        menu.items().iter().map(|i| i.item_id.as_str()).collect();
    let home = home_countries(&lines);
    // Lines of one invoice and product are one order line.
    let mut merged: BTreeMap<(String, String), (usize, u32)> = BTreeMap::new();
    for (at, line) in lines.iter().enumerate() {
        if !on_menu.contains(line.stock_code.as_str()) {
            *dropped
                .entry("lines of products off the menu".into())
                .or_default() += 1;
            continue;
        }
        let entry = merged
            .entry((line.invoice.clone(), line.stock_code.clone()))
            .or_insert((at, 0));
        entry.1 = entry.1.saturating_add(line.quantity);
    }
    // Some invoices' lines span a minute or two: an order has one time, its first line's.
    let mut invoice_time: HashMap<&str, &str> = HashMap::new();
    for line in &lines {
        invoice_time.entry(&line.invoice).or_insert(&line.time);
    }
    let mut by_customer: BTreeMap<&str, Vec<OrderRow>> = BTreeMap::new();
    let mut firsts: Vec<(usize, u32)> = merged.into_values().collect();
    firsts.sort_unstable();
    for (at, quantity) in firsts {
        let line = &lines[at];
        by_customer
            .entry(line.customer.as_str())
            .or_default()
            .push(OrderRow {
                customer_id: line.customer.clone(),
                order_id: line.invoice.clone(),
                timestamp: invoice_time[line.invoice.as_str()].to_string(),
                item_id: line.stock_code.clone(),
                quantity,
                consent: true,
                age_band: None,
                gender: None,
            });
    }
    let customers = by_customer
        .into_iter()
        .map(|(id, rows)| Customer {
            id: id.to_string(),
            group: home[id].clone(),
            rows,
        })
        .collect();
    Ok(Dataset {
        menu,
        customers,
        dropped,
    })
}

fn retail_lines(
    input: impl Read,
    name: &str,
    dropped: &mut BTreeMap<String, u64>,
) -> Result<Vec<RetailLine>, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(input);
    let header = header_of(&mut reader, name)?;
    const COLUMNS: [&str; 6] = [
        "InvoiceNo",
        "StockCode",
        "Description",
        "Quantity",
        "InvoiceDate",
        "CustomerID",
    ];
    let mut at = [0usize; 7];
    for (slot, column) in at.iter_mut().zip(COLUMNS.iter().chain(&["Country"])) {
        *slot = header
            .iter()
            .position(|h| h == *column)
            .ok_or_else(|| DataError::File {
                path: name.to_string(),
                reason: format!("no {column} column; is this the Online Retail file?"),
            })?;
    }
    let mut lines = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i as u64 + 2;
        let row_error = |reason: String| DataError::Row {
            path: name.to_string(),
            line,
            reason,
        };
        let record = record.map_err(|e| row_error(e.to_string()))?;
        let get = |k: usize| record.get(at[k]).unwrap_or("");
        let mut drop = |why: &str| *dropped.entry(why.to_string()).or_default() += 1;
        let invoice = get(0);
        if invoice.starts_with('C') {
            drop("cancellation lines");
            continue;
        }
        let customer = get(5).trim_end_matches(".0");
        if customer.is_empty() {
            drop("lines without a customer");
            continue;
        }
        let stock_code = get(1);
        if !stock_code.starts_with(|c: char| c.is_ascii_digit()) {
            drop("lines of non-products (postage, fees)");
            continue;
        }
        let quantity: i64 = get(3)
            .parse()
            .map_err(|_| row_error(format!("Quantity {:?} is not an integer", get(3))))?;
        if quantity < 1 {
            drop("lines with a quantity below 1");
            continue;
        }
        lines.push(RetailLine {
            invoice: invoice.to_string(),
            stock_code: stock_code.to_string(),
            description: get(2).to_string(),
            quantity: u32::try_from(quantity).unwrap_or(u32::MAX),
            time: retail_time(get(4)).map_err(row_error)?,
            customer: customer.to_string(),
            country: get(6).to_string(),
        });
    }
    Ok(lines)
}

/// `2010-12-01 08:26:00` (or `2010-12-01 08:26`) as RFC 3339 UTC.
fn retail_time(value: &str) -> Result<String, String> {
    let (date, clock) = value
        .split_once(' ')
        .ok_or_else(|| format!("InvoiceDate {value:?} is not YYYY-MM-DD HH:MM[:SS]"))?;
    let clock = if clock.len() == 5 {
        format!("{clock}:00")
    } else {
        clock.to_string()
    };
    let text = format!("{date}T{clock}Z");
    time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("InvoiceDate {value:?} is not YYYY-MM-DD HH:MM[:SS]"))?;
    Ok(text)
}

/// The products on the most invoices.
fn retail_menu(lines: &[RetailLine], size: usize) -> Result<Menu, String> {
    let mut invoices: BTreeMap<&str, (Vec<&str>, &str)> = BTreeMap::new();
    for line in lines {
        let entry = invoices
            .entry(&line.stock_code)
            .or_insert((Vec::new(), &line.description));
        entry.0.push(&line.invoice);
    }
    let mut ranked: Vec<(usize, &str, &str)> = invoices
        .into_iter()
        .map(|(code, (mut ids, description))| {
            ids.sort_unstable();
            ids.dedup();
            (ids.len(), code, description)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let items = ranked
        .into_iter()
        .take(size.max(1))
        .map(|(_, code, description)| MenuItem {
            item_id: code.to_string(),
            name: if description.is_empty() {
                code.to_string()
            } else {
                description.to_string()
            },
            category: description
                .split_whitespace()
                .last()
                .unwrap_or("other")
                .to_lowercase(),
        })
        .collect::<Vec<_>>();
    if items.is_empty() {
        return Err("no usable lines: every row was dropped by the mapping".into());
    }
    Menu::new(items)
}

/// Each customer's country: the one with most of their invoices.
fn home_countries(lines: &[RetailLine]) -> HashMap<String, String> {
    let mut invoices: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for line in lines {
        invoices
            .entry((&line.customer, &line.country))
            .or_default()
            .push(&line.invoice);
    }
    let mut home: HashMap<String, (usize, String)> = HashMap::new();
    for ((customer, country), mut ids) in invoices {
        ids.sort_unstable();
        ids.dedup();
        let best = home
            .entry(customer.to_string())
            .or_insert((0, country.to_string()));
        // Countries come in alphabetical order: a tie keeps the first.
        if ids.len() > best.0 {
            *best = (ids.len(), country.to_string());
        }
    }
    home.into_iter()
        .map(|(c, (_, country))| (c, country))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../tests/data/online-retail-sample.csv");

    fn sample(menu_items: usize) -> Dataset {
        online_retail(SAMPLE.as_bytes(), "sample.csv", menu_items).expect("the sample maps")
    }

    #[test]
    fn online_retail_maps_invoices_to_orders_and_countries_to_sites() {
        let data = sample(300);
        let by_id: BTreeMap<&str, &Customer> =
            data.customers.iter().map(|c| (c.id.as_str(), c)).collect();
        // 12583 bought only postage and 12721 only cancelled: neither remains.
        assert_eq!(
            by_id.keys().copied().collect::<Vec<_>>(),
            ["12522", "12527", "12593", "12604", "12793", "12808"]
        );
        assert_eq!(by_id["12593"].group, "France");
        assert_eq!(by_id["12527"].group, "Germany");
        assert_eq!(by_id["12808"].group, "Portugal");
        // Invoices are orders: 12808 has three, 12522 two.
        assert_eq!(by_id["12808"].orders(), 3);
        assert_eq!(by_id["12522"].orders(), 2);
        let row = &by_id["12522"].rows[0];
        assert_eq!(
            (row.order_id.as_str(), row.timestamp.as_str(), row.consent),
            ("571904", "2011-10-19T14:41:00Z", true)
        );
        assert!(
            data.customers
                .iter()
                .flat_map(|c| &c.rows)
                .all(|r| r.item_id != "POST" && r.quantity >= 1),
            "postage and non-positive quantities are not order lines"
        );
        assert_eq!(data.dropped["cancellation lines"], 1);
        assert_eq!(data.dropped["lines without a customer"], 1);
        assert_eq!(data.dropped["lines of non-products (postage, fees)"], 9);
    }

    #[test]
    fn the_menu_is_the_most_ordered_products() {
        let data = sample(5);
        assert_eq!(data.menu.len(), 5);
        // 20726 is on the most invoices of the sample.
        let first = &data.menu.items()[0];
        assert_eq!(first.item_id, "20726");
        assert_eq!(
            first.category,
            first.name.split_whitespace().last().unwrap().to_lowercase()
        );
        let on_menu: Vec<&str> = data
            .menu
            .items()
            .iter()
            .map(|i| i.item_id.as_str())
            .collect();
        assert!(
            data.customers
                .iter()
                .flat_map(|c| &c.rows)
                .all(|r| on_menu.contains(&r.item_id.as_str())),
            "lines of products off the menu are dropped"
        );
        assert!(data.dropped["lines of products off the menu"] > 0);
    }

    #[test]
    fn a_bad_retail_row_names_its_line() {
        let text = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n\
                    536365,85123A,HEART,6,2010-12-01 08:26:00,2.55,17850,United Kingdom\n\
                    536366,85123A,HEART,six,2010-12-01 08:28:00,2.55,17850,United Kingdom\n";
        let err = online_retail(text.as_bytes(), "retail.csv", 10).expect_err("bad quantity");
        assert!(
            err.to_string()
                .starts_with("retail.csv:3: Quantity \"six\""),
            "{err}"
        );
        let err = online_retail("a,b\n1,2\n".as_bytes(), "other.csv", 10).expect_err("wrong file");
        assert!(err.to_string().contains("no InvoiceNo column"), "{err}");
    }

    #[test]
    fn a_bad_orders_file_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("menu.csv"),
            "item_id,name,category\ncoffee,Coffee,drinks\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("site-a.csv"),
            "customer_id,order_id,timestamp,item_id,quantity,consent\n\
             c1,o1,2024-01-01T10:00:00Z,coffee,1,true\n\
             c1,o2,2024-01-02T10:00:00Z,cake,1,true\n",
        )
        .unwrap();
        let err = csv_dir(dir.path()).expect_err("cake is not on the menu");
        let text = err.to_string();
        assert!(text.contains("site-a.csv:3:"), "{text}");
    }
}
