//! Test support for Conveyor's end-to-end tests and benchmarks.
//!
//! [`fake_llm`] is the OpenAI-compatible server every test, benchmark and demo talks to
//! instead of a real provider. It lives in its own crate, `conveyor-fake-llm`, so a program
//! can embed it; the re-export keeps `conveyor_e2e::fake_llm` as the tests' path to it.

pub use conveyor_fake_llm as fake_llm;
pub mod harness;
