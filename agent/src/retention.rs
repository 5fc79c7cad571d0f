//! Retention: orders older than `[data] retention_days` are purged, by the
//! running agent once an hour and by `potluck-agent purge`; every purge that
//! deletes something is written to the audit log.

use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::audit::{AuditError, AuditLog};
use crate::config::DataPolicy;
use crate::import::retention_cutoff;
use crate::store::{PurgeCounts, SiteStore, StoreError, StoreHandle};

/// How often the running agent purges.
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Why a purge failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionError {
    /// The store failed; nothing was deleted.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The purge happened but could not be recorded.
    #[error("the purge was done but could not be recorded in the audit log: {0}")]
    Audit(#[from] AuditError),
}

/// What a purge did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Purge {
    /// The retention period, in days.
    pub retention_days: u32,
    /// Orders before this time (Unix seconds) were deleted.
    pub cutoff: i64,
    /// What was deleted.
    pub deleted: PurgeCounts,
}

/// Purge what is past retention at `now`; `None` if the policy keeps orders
/// until erased.
pub fn purge_expired(
    store: &SiteStore,
    policy: &DataPolicy,
    audit: &AuditLog,
    now: OffsetDateTime,
) -> Result<Option<Purge>, RetentionError> {
    let Some(retention_days) = policy.retention_days else {
        return Ok(None);
    };
    let cutoff = retention_cutoff(retention_days, now);
    let deleted = store.purge(cutoff)?;
    let purge = Purge {
        retention_days,
        cutoff,
        deleted,
    };
    if deleted.order_lines > 0 || deleted.customers > 0 {
        audit.append(
            "purge",
            serde_json::to_value(purge).expect("purges serialise"),
        )?;
        tracing::info!(
            retention_days,
            order_lines = deleted.order_lines,
            customers = deleted.customers,
            "purged orders past retention"
        );
    }
    Ok(Some(purge))
}

/// Purge now and then every [`PURGE_EVERY`], for as long as the task lives.
pub async fn purge_periodically(store: StoreHandle, policy: DataPolicy, audit: AuditLog) {
    if policy.retention_days.is_none() {
        return;
    }
    let mut ticks = tokio::time::interval(PURGE_EVERY);
    loop {
        ticks.tick().await;
        let (store, policy, audit) = (store.clone(), policy.clone(), audit.clone());
        let done = tokio::task::spawn_blocking(move || {
            let store = store.open()?;
            purge_expired(&store, &policy, &audit, OffsetDateTime::now_utc())
        })
        .await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention purge failed; retrying in an hour"),
            Err(e) => tracing::warn!(error = %e, "retention purge task failed"),
        }
    }
}
