//! Data-subject requests: what a site tells a customer (or its data-protection
//! officer) about their data, and what erasure does.

use serde::Serialize;

use crate::config::DataPolicy;
use crate::store::SubjectData;

/// Why each kind of data is held, and for how long, under `policy`.
pub fn purposes(policy: &DataPolicy) -> Vec<Purpose> {
    let retention = match policy.retention_days {
        Some(days) => {
            format!("each order is deleted {days} days after it was placed, or when erased")
        }
        None => "kept until erased".to_string(),
    };
    let mut out = vec![
        Purpose {
            data: "orders (order, item, time, quantity)".into(),
            purpose: format!(
                "training the franchise's recommendation model at this site, evaluating it, and recommending items at the till, only with consent; {retention}"
            ),
        },
        Purpose {
            data: "customer identifier".into(),
            purpose: "finding the customer's data for recommendations and their requests; never used for training (training sees a pseudonym) and never sent anywhere; deleted with the last order or when erased".into(),
        },
        Purpose {
            data: "consent".into(),
            purpose: "deciding whether the orders may be used for training and personal recommendations".into(),
        },
    ];
    let audit = policy.audit_columns();
    if !audit.is_empty() {
        out.push(Purpose {
            data: format!("attributes ({})", audit.join(", ")),
            purpose: "fairness audits of the model at this site only (checking it serves every group equally well); never a model feature, never sent anywhere; deleted with the last order or when erased".into(),
        });
    }
    out
}

/// What training did with the data, and what erasure can and cannot undo.
pub const TRAINING_AND_ERASURE: &str = "\
Nothing about this customer ever left the site. In each training round the site \
sampled consenting customers at random; a sampled customer's orders produced one \
small model change, which was clipped to a fixed maximum size, added to other \
customers' changes, and noised (distributed differential privacy, within the \
privacy budget stated for the model) before it was sent, masked, to the \
coordinator, which only ever saw the sum over many sites. The model has no \
per-customer parameters: nothing in it belongs to this customer or can be \
traced back to them beyond what the privacy guarantee allows (epsilon per \
customer, for the model's whole life). Erasure deletes every order and the \
identifier from this site's store and destroys the customer's encryption key, \
so nothing of them can be decrypted from the store file or its free pages \
afterwards. Backups of the store and its key ring made before the erasure still \
hold the data: after restoring one, erase again (the audit log lists erasures \
by pseudonym). Models already trained are not retrained: the customer's \
influence on them is bounded by the differential-privacy guarantee, and the \
customer takes no part in any later round.";

/// A data-subject export.
#[derive(Debug, Serialize)]
pub struct Export<'a> {
    /// The data held.
    pub data: &'a SubjectData,
    /// Purposes and retention, per kind of data.
    pub purposes: Vec<Purpose>,
    /// What training did with the data.
    pub training: &'static str,
}

/// One purpose.
#[derive(Debug, Serialize)]
pub struct Purpose {
    /// The data.
    pub data: String,
    /// Why it is held and for how long.
    pub purpose: String,
}

impl<'a> Export<'a> {
    /// The export of `data`.
    pub fn new(data: &'a SubjectData, policy: &DataPolicy) -> Self {
        Self {
            data,
            purposes: purposes(policy),
            training: TRAINING_AND_ERASURE,
        }
    }

    /// The export as text a person can read.
    pub fn describe(&self) -> String {
        let d = self.data;
        let mut out = format!(
            "customer {} (pseudonym {}), consent to training: {}\n",
            d.customer_id,
            d.pseudonym,
            if d.consent { "given" } else { "not given" },
        );
        if !d.attributes.is_empty() {
            let attributes: Vec<String> = d
                .attributes
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect();
            out.push_str(&format!(
                "attributes (audit only): {}\n",
                attributes.join(", ")
            ));
        }
        out.push_str(&format!("{} order lines:\n", d.lines.len()));
        for l in &d.lines {
            let time = local_time(l.time, l.utc_offset);
            out.push_str(&format!(
                "  {time}  order {}  {} x {}\n",
                l.order_id, l.quantity, l.item_id
            ));
        }
        out.push_str("purposes and retention:\n");
        for p in &self.purposes {
            out.push_str(&format!("  {}: {}\n", p.data, p.purpose));
        }
        out.push_str("what training did with it:\n  ");
        out.push_str(self.training);
        out.push('\n');
        out
    }
}

/// RFC 3339 in the site's local offset at the time.
fn local_time(unix: i64, offset: i32) -> String {
    let offset = time::UtcOffset::from_whole_seconds(offset).unwrap_or(time::UtcOffset::UTC);
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.to_offset(offset)
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
