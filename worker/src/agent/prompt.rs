//! The system instructions and the conversion of stored history into Chat Completions
//! messages.

use conveyor_shared::store::messages::Message;
use serde_json::{Value, json};

/// The seed's task-assistant instructions, prepended to every request (never stored).
pub const SYSTEM_INSTRUCTIONS: &str = "You are Conveyor, a friendly assistant that helps people manage their task list. \
Use the tools to add, list, complete, delete, update and prioritise tasks whenever the user asks for it; \
do not claim you changed something unless a tool call succeeded. \
Confirm what you did in one or two short sentences. Refer to tasks by their title and number. \
Never mention internal identifiers such as user, run or conversation ids. \
If a tool reports an error, explain it plainly and suggest what the user can do.";

/// The request's `messages`: the system instructions, then the stored history.
///
/// A window that starts in the middle of a tool exchange would be rejected by providers, so
/// leading tool results without their call are skipped.
pub fn history_messages(history: &[Message]) -> Vec<Value> {
    let mut messages = Vec::with_capacity(history.len() + 1);
    messages.push(json!({"role": "system", "content": SYSTEM_INSTRUCTIONS}));
    let start = history
        .iter()
        .position(|m| m.role != "tool")
        .unwrap_or(history.len());
    for message in &history[start..] {
        messages.push(match message.role.as_str() {
            "assistant" => assistant_message(&message.content, &message.tool_calls),
            "tool" => json!({
                "role": "tool",
                "tool_call_id": message.tool_call_id,
                "content": message.content,
            }),
            _ => json!({"role": "user", "content": message.content}),
        });
    }
    messages
}

/// An assistant message in request form; stored `tool_calls` are `[{id, name, arguments}]`.
pub fn assistant_message(content: &str, tool_calls: &Value) -> Value {
    let calls: Vec<Value> = tool_calls
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| {
                    json!({
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"].to_string()},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if calls.is_empty() {
        json!({"role": "assistant", "content": content})
    } else {
        json!({"role": "assistant", "content": content, "tool_calls": calls})
    }
}
