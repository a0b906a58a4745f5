//! The agent loop: stream a chat completion, call the tools it asks for over the held MCP
//! connections, feed the results back, until the model answers in text.

mod completion;
mod emitter;
mod prompt;
mod turn;

pub use completion::{Completion, LlmError, RetryPolicy};
pub use emitter::Emitter;
pub use prompt::{SYSTEM_INSTRUCTIONS, history_messages};
pub use turn::{Agent, AgentOutput, ExecutedCall, RunScope, Step, TurnError};
