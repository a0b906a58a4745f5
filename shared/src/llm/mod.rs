//! The LLM provider factory: which OpenAI-compatible endpoint, model and key a worker uses.
//!
//! Every supported provider speaks Chat Completions, so one client type serves them all; only
//! the base URL, the key's variable and the default model differ.

mod client;
pub mod limiter;
mod provider;

pub use client::{LlmClient, LlmHttpError, build_client};
pub use limiter::{AcquireError, LimitSettings, LlmLimiter, Permit};
pub use provider::{LlmSettings, Provider};
