//! Test support for Conveyor's end-to-end tests and benchmarks.
//!
//! [`fake_llm`] is the OpenAI-compatible server every test, benchmark and demo talks to
//! instead of a real provider.

pub mod fake_llm;
pub mod harness;
