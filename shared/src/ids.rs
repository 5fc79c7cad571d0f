//! Newtype identifiers that cross module and process boundaries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A site's identifier: 1 to 64 of `a-z`, `0-9` and `-`.
///
/// The only trusted source of a peer's `SiteId` is its verified certificate
/// (see [`crate::tls::site_id_from_cert`]); a site ID inside a message is never trusted.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SiteId(String);

/// Why a string is not a valid [`SiteId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SiteIdError {
    /// The ID is empty or longer than 64 characters.
    #[error("site id must be 1 to 64 characters, got {0}")]
    Length(usize),
    /// The ID contains a character other than `a-z`, `0-9` or `-`.
    #[error("site id may contain only lowercase letters, digits and '-', found {0:?}")]
    Character(char),
}

impl SiteId {
    /// The longest site ID accepted.
    pub const MAX_LEN: usize = 64;

    /// Validate and wrap a site ID.
    pub fn new(id: impl Into<String>) -> Result<Self, SiteIdError> {
        let id = id.into();
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(SiteIdError::Length(id.chars().count()));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(SiteIdError::Character(bad));
        }
        Ok(Self(id))
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SiteId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SiteId::new(s).map_err(serde::de::Error::custom)
    }
}

impl FromStr for SiteId {
    type Err = SiteIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteId({})", self.0)
    }
}

macro_rules! counter_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The identifier that follows this one.
            pub fn next(self) -> Self {
                Self(self.0 + 1)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

counter_id!(
    /// A training round, numbered from 1 by the coordinator.
    RoundId
);
counter_id!(
    /// A version of the global model; version 0 is the initial model.
    ModelVersion
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_are_validated() {
        assert!(SiteId::new("paris-01").is_ok());
        assert_eq!(SiteId::new(""), Err(SiteIdError::Length(0)));
        assert_eq!(SiteId::new("a".repeat(65)), Err(SiteIdError::Length(65)));
        assert!(SiteId::new("a".repeat(64)).is_ok());
        assert_eq!(SiteId::new("Paris"), Err(SiteIdError::Character('P')));
        assert_eq!(SiteId::new("a_b"), Err(SiteIdError::Character('_')));
        assert_eq!(SiteId::new("a.b"), Err(SiteIdError::Character('.')));
    }

    #[test]
    fn deserialising_validates() {
        let ok: Result<SiteId, _> = serde_json_like("\"ok-1\"");
        assert!(ok.is_ok());
        assert!(serde_json_like("\"NOPE\"").is_err());
    }

    fn serde_json_like(s: &str) -> Result<SiteId, String> {
        // toml-free check through the crate's own codec, so no extra dev-dependency.
        let inner = s.trim_matches('"').to_string();
        let bytes = crate::wire::codec::encode(&inner).map_err(|e| e.to_string())?;
        crate::wire::codec::decode::<SiteId>(&bytes).map_err(|e| e.to_string())
    }
}
