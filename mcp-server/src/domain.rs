//! The task domain: validated values built once at the tool edge.
//!
//! Tool arguments arrive as loosely typed JSON written by a model. Everything below the tool
//! layer receives these types instead, so the store can never be handed an empty title, an
//! over-long description, an unknown priority or a missing user.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest accepted user id, in characters (matches the API's limit for path ids).
pub const USER_ID_MAX_CHARS: usize = 128;
/// Longest accepted title, in characters, after trimming (the `tasks` table checks the same).
pub const TITLE_MAX_CHARS: usize = 500;
/// Longest accepted description, in characters (the `tasks` table checks the same).
pub const DESCRIPTION_MAX_CHARS: usize = 5_000;
/// Longest accepted idempotency key, in characters; keys are opaque ids, not payloads.
pub const IDEMPOTENCY_KEY_MAX_CHARS: usize = 255;

/// Why a tool argument was refused. The messages are written for the model that sent the
/// argument: each one says what was wrong and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("user_id must be 1 to {USER_ID_MAX_CHARS} characters long (got {0} characters)")]
    UserIdLength(usize),
    #[error("title must not be empty")]
    EmptyTitle,
    #[error(
        "title is {0} characters long; the limit is {TITLE_MAX_CHARS}. Shorten it and move details into the description"
    )]
    TitleTooLong(usize),
    #[error("description must not be empty; leave it out instead")]
    EmptyDescription,
    #[error("description is {0} characters long; the limit is {DESCRIPTION_MAX_CHARS}")]
    DescriptionTooLong(usize),
    #[error("priority must be one of \"low\", \"medium\", \"high\" (got {0:?})")]
    UnknownPriority(String),
    #[error("status must be one of \"all\", \"pending\", \"completed\" (got {0:?})")]
    UnknownStatus(String),
    #[error("nothing to update: give a new title, a new description, or both")]
    NothingToUpdate,
    #[error(
        "_meta \"conveyor/idempotency_key\" must be a string of 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters"
    )]
    BadIdempotencyKey,
}

/// The person a task belongs to. Every query is scoped by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: String) -> Result<Self, ValidationError> {
        let chars = raw.chars().count();
        if (1..=USER_ID_MAX_CHARS).contains(&chars) {
            Ok(Self(raw))
        } else {
            Err(ValidationError::UserIdLength(chars))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A task's id: a database identity. Any integer is a valid question ("is there a task -1?"
/// simply has the answer "not found"), so there is nothing to validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(
    inline,
    description = "A task id, as returned by add_task and list_tasks."
)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A title that is stored trimmed and is 1–500 characters long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTitle(String);

impl TaskTitle {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let trimmed = raw.trim();
        let chars = trimmed.chars().count();
        if chars == 0 {
            Err(ValidationError::EmptyTitle)
        } else if chars > TITLE_MAX_CHARS {
            Err(ValidationError::TitleTooLong(chars))
        } else {
            Ok(Self(trimmed.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A description of at most 5,000 characters. Blank descriptions are refused rather than
/// stored: "no description" is spelled by leaving the argument out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDescription(String);

impl TaskDescription {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let trimmed = raw.trim();
        let chars = trimmed.chars().count();
        if chars == 0 {
            Err(ValidationError::EmptyDescription)
        } else if chars > DESCRIPTION_MAX_CHARS {
            Err(ValidationError::DescriptionTooLong(chars))
        } else {
            Ok(Self(trimmed.to_owned()))
        }
    }

    /// Parses an optional argument: absent (or JSON `null`) means "no description".
    pub fn parse_optional(raw: Option<&str>) -> Result<Option<Self>, ValidationError> {
        raw.map(Self::parse).transpose()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How urgent a task is; stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum TaskPriority {
    Low,
    #[default]
    Medium,
    High,
}

impl TaskPriority {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        match raw {
            "low" => Ok(Self::Low),
            "medium" => Ok(Self::Medium),
            "high" => Ok(Self::High),
            other => Err(ValidationError::UnknownPriority(other.to_owned())),
        }
    }

    /// Parses an optional argument, falling back to the default (`medium`).
    pub fn parse_or_default(raw: Option<&str>) -> Result<Self, ValidationError> {
        raw.map_or(Ok(Self::default()), Self::parse)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

impl fmt::Display for TaskPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which tasks `list_tasks` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum TaskStatusFilter {
    #[default]
    All,
    Pending,
    Completed,
}

impl TaskStatusFilter {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        match raw {
            "all" => Ok(Self::All),
            "pending" => Ok(Self::Pending),
            "completed" => Ok(Self::Completed),
            other => Err(ValidationError::UnknownStatus(other.to_owned())),
        }
    }

    /// Parses an optional argument, falling back to the default (`all`).
    pub fn parse_or_default(raw: Option<&str>) -> Result<Self, ValidationError> {
        raw.map_or(Ok(Self::default()), Self::parse)
    }

    /// The value of `completed` this filter selects, or `None` for every task.
    pub fn completed(self) -> Option<bool> {
        match self {
            Self::All => None,
            Self::Pending => Some(false),
            Self::Completed => Some(true),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Pending => "pending",
            Self::Completed => "completed",
        }
    }
}

/// The key that makes a mutating call exactly-once: a repeat with the same key (for the same
/// user) answers the first call's result instead of repeating its effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let chars = raw.chars().count();
        if (1..=IDEMPOTENCY_KEY_MAX_CHARS).contains(&chars) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValidationError::BadIdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored task, as the tools report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Task {
    pub id: TaskId,
    pub title: String,
    pub description: Option<String>,
    pub priority: TaskPriority,
    pub completed: bool,
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub created_at: DateTime<Utc>,
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub updated_at: DateTime<Utc>,
}

/// One change a mutating tool makes; the store applies it as a single statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskChange {
    Add {
        title: TaskTitle,
        description: Option<TaskDescription>,
        priority: TaskPriority,
    },
    Complete(TaskId),
    Delete(TaskId),
    Update {
        id: TaskId,
        title: Option<TaskTitle>,
        description: Option<TaskDescription>,
    },
    SetPriority {
        id: TaskId,
        priority: TaskPriority,
    },
}

impl TaskChange {
    /// The name of the tool that makes this change; recorded with an idempotency key so a key
    /// reused for another tool is refused instead of answered with an unrelated result.
    pub fn tool_name(&self) -> &'static str {
        match self {
            Self::Add { .. } => "add_task",
            Self::Complete(_) => "complete_task",
            Self::Delete(_) => "delete_task",
            Self::Update { .. } => "update_task",
            Self::SetPriority { .. } => "set_priority",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_is_trimmed_and_limited_by_characters_not_bytes() {
        assert_eq!(
            TaskTitle::parse("  buy milk \n").unwrap().as_str(),
            "buy milk"
        );
        assert_eq!(TaskTitle::parse(" \t "), Err(ValidationError::EmptyTitle));
        let max = "é".repeat(TITLE_MAX_CHARS);
        assert!(TaskTitle::parse(&max).is_ok());
        assert_eq!(
            TaskTitle::parse(&format!("{max}x")),
            Err(ValidationError::TitleTooLong(TITLE_MAX_CHARS + 1))
        );
    }

    #[test]
    fn description_must_be_non_blank_and_at_most_5000_characters() {
        assert_eq!(TaskDescription::parse_optional(None), Ok(None));
        assert_eq!(
            TaskDescription::parse(""),
            Err(ValidationError::EmptyDescription)
        );
        assert!(TaskDescription::parse(&"x".repeat(DESCRIPTION_MAX_CHARS)).is_ok());
        assert_eq!(
            TaskDescription::parse(&"x".repeat(DESCRIPTION_MAX_CHARS + 1)),
            Err(ValidationError::DescriptionTooLong(
                DESCRIPTION_MAX_CHARS + 1
            ))
        );
    }

    #[test]
    fn priority_and_status_parse_only_their_names() {
        assert_eq!(
            TaskPriority::parse_or_default(None),
            Ok(TaskPriority::Medium)
        );
        assert_eq!(TaskPriority::parse("high"), Ok(TaskPriority::High));
        assert!(TaskPriority::parse("High").is_err());
        assert_eq!(
            TaskStatusFilter::parse_or_default(None),
            Ok(TaskStatusFilter::All)
        );
        assert_eq!(TaskStatusFilter::Pending.completed(), Some(false));
        assert!(TaskStatusFilter::parse("done").is_err());
    }

    #[test]
    fn user_id_is_1_to_128_characters() {
        assert!(UserId::parse(String::new()).is_err());
        assert!(UserId::parse("a".repeat(USER_ID_MAX_CHARS)).is_ok());
        assert!(UserId::parse("a".repeat(USER_ID_MAX_CHARS + 1)).is_err());
    }
}
