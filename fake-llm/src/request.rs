//! The parts of an OpenAI Chat Completions request that the fake reads.
//!
//! Parsing is deliberately lenient: every field is optional, `null` is accepted anywhere and
//! unknown fields are ignored, so the fake tests the caller's behaviour rather than rejecting
//! a request shape some real provider would accept.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub tools: Option<Vec<Tool>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Message {
    pub role: Option<String>,
    /// A string, an array of content parts, or null (an assistant message with tool calls).
    pub content: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Tool {
    pub function: Option<Function>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Function {
    pub name: Option<String>,
    /// The JSON schema of the arguments.
    pub parameters: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

impl ChatRequest {
    pub fn messages(&self) -> &[Message] {
        self.messages.as_deref().unwrap_or_default()
    }

    pub fn functions(&self) -> impl Iterator<Item = &Function> {
        self.tools
            .iter()
            .flatten()
            .filter_map(|tool| tool.function.as_ref())
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

impl Message {
    pub fn role(&self) -> &str {
        self.role.as_deref().unwrap_or_default()
    }

    /// The message's text: the string content, or the text parts joined by newlines.
    pub fn text(&self) -> Cow<'_, str> {
        match &self.content {
            Value::String(s) => Cow::Borrowed(s),
            Value::Null => Cow::Borrowed(""),
            Value::Array(parts) => Cow::Owned(
                parts
                    .iter()
                    .filter_map(|p| p.as_str().or_else(|| p.get("text")?.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            other => Cow::Owned(other.to_string()),
        }
    }

    /// A rough size used for the `usage` numbers.
    pub fn approx_len(&self) -> usize {
        match &self.content {
            Value::String(s) => s.len(),
            Value::Null => 0,
            _ => self.text().len(),
        }
    }
}
