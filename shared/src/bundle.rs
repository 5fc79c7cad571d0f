//! The site bundle: what enrolment writes and the agent reads.
//!
//! ```text
//! site.pem  site.key (0600)  ca.pem  agent.toml  [menu.csv]
//! ```

use std::net::SocketAddr;

use crate::SiteId;

/// The site certificate.
pub const SITE_CERT: &str = "site.pem";
/// The site's private key.
pub const SITE_KEY: &str = "site.key";
/// The franchise CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// The agent configuration.
pub const AGENT_CONFIG: &str = "agent.toml";
/// The franchise menu, when enrolment was given one.
pub const MENU: &str = "menu.csv";

/// A starter `agent.toml` whose paths are relative to the bundle.
pub fn agent_toml(
    site: &SiteId,
    coordinator: SocketAddr,
    server_name: &str,
    with_menu: bool,
) -> String {
    let menu = if with_menu {
        format!("menu = \"{MENU}\"\n")
    } else {
        String::new()
    };
    format!(
        "# Potluck agent configuration for site {site}.\n\
         # Relative paths are relative to this file.\n\
         site_id = \"{site}\"\n\
         coordinator = \"{coordinator}\"\n\
         server_name = \"{server_name}\"\n\
         state_dir = \"state\"\n\
         {menu}\n\
         [tls]\n\
         ca = \"{CA_CERT}\"\n\
         cert = \"{SITE_CERT}\"\n\
         key = \"{SITE_KEY}\"\n\
         \n\
         # This site's own privacy limit per model lineage, enforced whatever the\n\
         # coordinator asks (see the README, \"Differential privacy\").\n\
         [privacy]\n\
         max_epsilon = 8.0\n\
         delta = 1e-6\n\
         require = true\n\
         # Send the coordinator exact, unnoised evaluation counts of every model it\n\
         # sends: a counting oracle on your customers. Research on synthetic data only.\n\
         dangerous_plain_evaluation = false\n\
         \n\
         # The least this site accepts of secure aggregation, whatever the\n\
         # coordinator proposes: the smallest cohort, and how many cohort members\n\
         # it assumes may collude with the coordinator. Each assumed colluder\n\
         # raises the threshold this site needs (2t > n + colluders) and the\n\
         # privacy it charges itself (only t - colluders sites' noise counts).\n\
         [secure_aggregation]\n\
         min_cohort = 3\n\
         colluders = 0\n\
         # Refuse private rounds whose noise multiplier, counting only the honest\n\
         # survivors' noise, is below this (0: no floor).\n\
         min_noise_multiplier = 0.0\n\
         \n\
         # What is kept of the orders CSV, and for how long. The order columns\n\
         # (customer_id, order_id, timestamp, item_id, quantity) and consent are\n\
         # always kept; other columns only if declared here, and only as\n\
         # \"audit_only\": kept encrypted for fairness audits at this site, never\n\
         # a model feature, never sent. Everything else is dropped at import.\n\
         [data]\n\
         # columns = {{ age_band = \"audit_only\", gender = \"audit_only\" }}\n\
         # Orders older than this are deleted (checked hourly); unset keeps them until erased.\n\
         # retention_days = 730\n\
         \n\
         # The till's recommendations API (bearer token in STATE_DIR/api.token,\n\
         # created on first start).\n\
         [api]\n\
         enabled = true\n\
         listen = \"127.0.0.1:8477\"\n"
    )
}
