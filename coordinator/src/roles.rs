//! Admin roles and what each may do.
//!
//! | action                                        | viewer | auditor | operator |
//! |-----------------------------------------------|--------|---------|----------|
//! | status, rounds, sites, models, metrics, dashboard | yes | yes     | yes      |
//! | audit log, privacy ledger, DPIA               | no     | yes     | no       |
//! | stop/start training, rollback, release a held model, revoke a site | no | no | yes |
//!
//! Operators cannot read the audit log: the auditor checks what operators did.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads status, rounds, sites, models and metrics.
    Viewer,
    /// Also reads the audit log, the privacy ledger and the DPIA.
    Auditor,
    /// Also changes things: training on or off, rollbacks, revocations.
    Operator,
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read status, rounds, sites, models, metrics.
    View,
    /// Read the audit log, the privacy ledger, the DPIA.
    Audit,
    /// Change training, models or sites.
    Operate,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Auditor, Role::Operator];

    /// Whether this role may do `action`.
    pub fn allows(self, action: Action) -> bool {
        match action {
            Action::View => true,
            Action::Audit => self == Role::Auditor,
            Action::Operate => self == Role::Operator,
        }
    }

    /// The role's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (viewer, auditor, operator)"))
    }
}

/// A new token secret: 32 random bytes from the OS-seeded CSPRNG, in hex.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("potluck_{}", potluck_shared::audit::hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_allows_exactly_its_actions() {
        let table = [
            (Role::Viewer, [true, false, false]),
            (Role::Auditor, [true, true, false]),
            (Role::Operator, [true, false, true]),
        ];
        for (role, allowed) in table {
            for (action, expected) in [Action::View, Action::Audit, Action::Operate]
                .into_iter()
                .zip(allowed)
            {
                assert_eq!(role.allows(action), expected, "{role} {action:?}");
            }
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("admin".parse::<Role>().is_err());
        assert_ne!(new_secret(), new_secret());
    }
}
