//! The event vocabulary and its wire form.

use std::{str::FromStr, sync::Arc};

use serde::Serialize;
use serde_json::Value;

use crate::{
    domain::{ErrorBody, UnknownValue},
    ids::{ConversationId, MessageId, RunId, Seq},
};

/// The `event:` name of an SSE event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    RunQueued,
    RunStarted,
    MessageDelta,
    ToolCall,
    ToolResult,
    RunRetrying,
    MessageCompleted,
    RunCompleted,
    RunFailed,
    RunCancelled,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunQueued => "run.queued",
            Self::RunStarted => "run.started",
            Self::MessageDelta => "message.delta",
            Self::ToolCall => "tool.call",
            Self::ToolResult => "tool.result",
            Self::RunRetrying => "run.retrying",
            Self::MessageCompleted => "message.completed",
            Self::RunCompleted => "run.completed",
            Self::RunFailed => "run.failed",
            Self::RunCancelled => "run.cancelled",
        }
    }

    /// The stream of a run ends after a terminal event.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::RunCompleted | Self::RunFailed | Self::RunCancelled
        )
    }

    /// Text deltas are the only events not kept in Postgres.
    pub fn is_durable(self) -> bool {
        !matches!(self, Self::MessageDelta)
    }
}

impl FromStr for EventKind {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "run.queued" => Self::RunQueued,
            "run.started" => Self::RunStarted,
            "message.delta" => Self::MessageDelta,
            "tool.call" => Self::ToolCall,
            "tool.result" => Self::ToolResult,
            "run.retrying" => Self::RunRetrying,
            "message.completed" => Self::MessageCompleted,
            "run.completed" => Self::RunCompleted,
            "run.failed" => Self::RunFailed,
            "run.cancelled" => Self::RunCancelled,
            _ => return Err(UnknownValue(s.to_owned())),
        })
    }
}

/// An event with its data, before it has a sequence number.
#[derive(Debug, Clone)]
pub enum RunEvent {
    Queued {
        conversation_id: ConversationId,
        position: u32,
    },
    Started {
        attempt: i32,
        worker: String,
    },
    Delta {
        text: String,
    },
    ToolCall {
        call_id: String,
        name: String,
        arguments: Value,
    },
    ToolResult {
        call_id: String,
        name: String,
        /// `Ok(result)` or `Err(message)`.
        outcome: Result<Value, String>,
    },
    Retrying {
        attempt: i32,
        reason: String,
        retry_in_ms: u64,
    },
    MessageCompleted {
        message_id: MessageId,
        text: String,
    },
    Completed {
        message_id: MessageId,
    },
    Failed {
        error: ErrorBody,
    },
    Cancelled,
}

impl RunEvent {
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Queued { .. } => EventKind::RunQueued,
            Self::Started { .. } => EventKind::RunStarted,
            Self::Delta { .. } => EventKind::MessageDelta,
            Self::ToolCall { .. } => EventKind::ToolCall,
            Self::ToolResult { .. } => EventKind::ToolResult,
            Self::Retrying { .. } => EventKind::RunRetrying,
            Self::MessageCompleted { .. } => EventKind::MessageCompleted,
            Self::Completed { .. } => EventKind::RunCompleted,
            Self::Failed { .. } => EventKind::RunFailed,
            Self::Cancelled => EventKind::RunCancelled,
        }
    }

    /// The event's data as a JSON object, without `run_id` and `seq` (added on the way out).
    pub fn data_json(&self) -> String {
        #[derive(Serialize)]
        struct ToolResultOk<'a> {
            call_id: &'a str,
            name: &'a str,
            ok: bool,
            result: &'a Value,
        }
        #[derive(Serialize)]
        struct ToolResultErr<'a> {
            call_id: &'a str,
            name: &'a str,
            ok: bool,
            error: &'a str,
        }
        let value = match self {
            Self::Queued {
                conversation_id,
                position,
            } => serde_json::json!({"conversation_id": conversation_id, "position": position}),
            Self::Started { attempt, worker } => {
                serde_json::json!({"attempt": attempt, "worker": worker})
            }
            Self::Delta { text } => serde_json::json!({ "text": text }),
            Self::ToolCall {
                call_id,
                name,
                arguments,
            } => serde_json::json!({"call_id": call_id, "name": name, "arguments": arguments}),
            Self::ToolResult {
                call_id,
                name,
                outcome: Ok(result),
            } => serde_json::to_value(ToolResultOk {
                call_id,
                name,
                ok: true,
                result,
            })
            .unwrap_or_default(),
            Self::ToolResult {
                call_id,
                name,
                outcome: Err(error),
            } => serde_json::to_value(ToolResultErr {
                call_id,
                name,
                ok: false,
                error,
            })
            .unwrap_or_default(),
            Self::Retrying {
                attempt,
                reason,
                retry_in_ms,
            } => {
                serde_json::json!({"attempt": attempt, "reason": reason, "retry_in_ms": retry_in_ms})
            }
            Self::MessageCompleted { message_id, text } => {
                serde_json::json!({"message_id": message_id, "text": text})
            }
            Self::Completed { message_id } => {
                serde_json::json!({"status": "completed", "message_id": message_id})
            }
            Self::Failed { error } => serde_json::json!({"status": "failed", "error": error}),
            Self::Cancelled => serde_json::json!({"status": "cancelled"}),
        };
        value.to_string()
    }
}

/// An event as stored and relayed: kind, seq and data (a JSON object without run id/seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: Seq,
    pub kind: EventKind,
    pub data: Arc<str>,
}

impl StoredEvent {
    /// The SSE `data:` payload: the event's data with `run_id` and `seq` in front.
    pub fn sse_data(&self, run_id: &RunId) -> String {
        let rest = self.data.trim_start().strip_prefix('{').unwrap_or("}");
        let rest = rest.trim_start();
        let sep = if rest.starts_with('}') { "" } else { "," };
        // The run id is a validated ULID string: no escaping needed.
        format!(r#"{{"run_id":"{run_id}","seq":{}{sep}{rest}"#, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_data_puts_run_id_and_seq_first() {
        let run_id = RunId::new();
        let event = StoredEvent {
            seq: 7,
            kind: EventKind::MessageDelta,
            data: RunEvent::Delta { text: "hi".into() }.data_json().into(),
        };
        let v: Value = serde_json::from_str(&event.sse_data(&run_id)).unwrap();
        assert_eq!(v["run_id"], run_id.as_str());
        assert_eq!(v["seq"], 7);
        assert_eq!(v["text"], "hi");
        let empty = StoredEvent {
            seq: 1,
            kind: EventKind::RunCancelled,
            data: "{}".into(),
        };
        let v: Value = serde_json::from_str(&empty.sse_data(&run_id)).unwrap();
        assert_eq!(v["seq"], 1);
    }

    #[test]
    fn tool_results_carry_either_result_or_error() {
        let ok: Value = serde_json::from_str(
            &RunEvent::ToolResult {
                call_id: "c".into(),
                name: "add_task".into(),
                outcome: Ok(serde_json::json!({"id": 1})),
            }
            .data_json(),
        )
        .unwrap();
        assert_eq!(ok["ok"], true);
        assert_eq!(ok["result"]["id"], 1);
        assert!(ok.get("error").is_none());
        let err: Value = serde_json::from_str(
            &RunEvent::ToolResult {
                call_id: "c".into(),
                name: "add_task".into(),
                outcome: Err("task 7 not found".into()),
            }
            .data_json(),
        )
        .unwrap();
        assert_eq!(err["ok"], false);
        assert_eq!(err["error"], "task 7 not found");
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [
            EventKind::RunQueued,
            EventKind::RunStarted,
            EventKind::MessageDelta,
            EventKind::ToolCall,
            EventKind::ToolResult,
            EventKind::RunRetrying,
            EventKind::MessageCompleted,
            EventKind::RunCompleted,
            EventKind::RunFailed,
            EventKind::RunCancelled,
        ] {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
    }
}
