//! Identifiers, parsed once at the edge.
//!
//! Conversations, runs, messages and batches carry prefixed ULIDs (`conv_…`, `run_…`, `msg_…`,
//! `batch_…`): sortable by creation time, unguessable enough to hand out, and self-describing
//! in logs. A user id is an opaque string chosen by the caller (or a token's `sub`), limited in
//! length and alphabet so it is safe in keys, logs and URLs. Deeper code only ever receives
//! these types, so it cannot be handed a malformed id.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("expected an id starting with `{0}` followed by a 26-character ULID")]
    Prefixed(&'static str),
    #[error("a user id is 1–128 characters of letters, digits and `-_.@:`")]
    User,
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id.
            pub fn new() -> Self {
                Self(format!("{}{}", $prefix, ulid::Ulid::new()))
            }

            /// Parses an id, checking the prefix and the ULID part.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let ulid = s.strip_prefix($prefix).ok_or(IdError::Prefixed($prefix))?;
                ulid::Ulid::from_string(ulid).map_err(|_| IdError::Prefixed($prefix))?;
                Ok(Self(s.to_owned()))
            }

            /// Wraps an id read back from our own storage, where it was validated on the way in.
            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// A conversation: the thread of messages a chat page shows.
    ConversationId,
    "conv_"
);
prefixed_id!(
    /// A run: one chat turn executed as a durable job.
    RunId,
    "run_"
);
prefixed_id!(
    /// A stored message of a conversation.
    MessageId,
    "msg_"
);
prefixed_id!(
    /// A batch of queued prompts.
    BatchId,
    "batch_"
);

/// The person a request acts for. Every query is scoped by it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// The longest accepted user id.
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let valid_char =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':');
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(valid_char) {
            return Err(IdError::User);
        }
        Ok(Self(s.to_owned()))
    }

    /// Wraps a user id read back from our own storage.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A run's event sequence number: 1, 2, 3, … across all attempts of the run.
pub type Seq = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_ids_round_trip_and_reject_the_wrong_kind() {
        let run = RunId::new();
        assert!(run.as_str().starts_with("run_"));
        assert_eq!(RunId::parse(run.as_str()).unwrap(), run);
        assert!(ConversationId::parse(run.as_str()).is_err());
        assert!(RunId::parse("run_notaulid").is_err());
        assert!(RunId::parse("").is_err());
    }

    #[test]
    fn user_ids_are_limited_in_length_and_alphabet() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("auth0|123").is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
    }
}
