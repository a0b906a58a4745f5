//! Global settings of the fake LLM server.
//!
//! One struct serves both the `fake-llm` binary (clap flags with `FAKE_LLM_*` environment
//! fallbacks) and in-process use (`FakeLlmConfig { ttft_ms: 50, ..Default::default() }`, or
//! `FakeLlmConfig::demo()` for a person to watch).
//! `Default` is written out by hand rather than derived from clap so that an in-process test
//! never picks up a stray `FAKE_LLM_*` variable from the environment.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// The model name served when `--models` is not given.
pub const DEFAULT_MODEL: &str = "fake-model";

const DEFAULT_CHUNKS: usize = 8;
const DEFAULT_SEED: u64 = 1;
const DEFAULT_RETRY_AFTER_MS: u64 = 100;

/// The demo's pace, the same as the compose `demo` profile and the README's quick start: a
/// pause like a hosted model's before the first word, then words quickly enough to read along.
const DEMO_TTFT_MS: u64 = 200;
const DEMO_CHUNK_DELAY_MS: u64 = 20;

/// Settings for one fake LLM server. Per-request `[[…]]` directives override the timing
/// fields for that request only.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "fake-llm",
    about = "Deterministic OpenAI-compatible chat completions server for Conveyor's tests and benchmarks"
)]
pub struct FakeLlmConfig {
    /// Address to listen on; port 0 picks a free port. The bound address is printed as the
    /// first stdout line: `listening on 127.0.0.1:PORT`.
    #[arg(long, env = "FAKE_LLM_ADDR", default_value_t = default_addr())]
    pub addr: SocketAddr,

    /// Simulated time to first token, slept after the response headers and before the first
    /// chunk (non-streaming: part of the total delay before the response).
    #[arg(long, env = "FAKE_LLM_TTFT_MS", default_value_t = 0)]
    pub ttft_ms: u64,

    /// Simulated time between two chunks.
    #[arg(long, env = "FAKE_LLM_CHUNK_DELAY_MS", default_value_t = 0)]
    pub chunk_delay_ms: u64,

    /// Minimum number of one-word chunks in an echo answer (filler words are added up to it).
    #[arg(long, env = "FAKE_LLM_CHUNKS", default_value_t = DEFAULT_CHUNKS)]
    pub chunks: usize,

    /// Fraction (0.0–1.0) of requests that get a random fault from `--faults`.
    #[arg(long, env = "FAKE_LLM_FAULT_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_rate: f64,

    /// Fault kinds injected at `--fault-rate`: any of 429, 500, cut, 400, 401.
    #[arg(
        long,
        env = "FAKE_LLM_FAULTS",
        value_delimiter = ',',
        default_value = "429,500,cut"
    )]
    pub faults: Vec<FaultKind>,

    /// Seed of the random fault sequence: the n-th request gets the same decision every run.
    #[arg(long, env = "FAKE_LLM_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,

    /// Value of the `retry-after-ms` header on a 429 (`Retry-After` is this, rounded up to
    /// whole seconds).
    #[arg(long, env = "FAKE_LLM_RETRY_AFTER_MS", default_value_t = DEFAULT_RETRY_AFTER_MS)]
    pub retry_after_ms: u64,

    /// Model names listed by `GET /v1/models`. Requests for any other model are served too.
    #[arg(long, env = "FAKE_LLM_MODELS", value_delimiter = ',', default_value = DEFAULT_MODEL)]
    pub models: Vec<String>,

    /// Keep every chat completion request body, for `FakeLlm::recorded_requests` (in-process
    /// only; off by default so benchmarks do not grow memory).
    #[arg(skip)]
    pub record_requests: bool,
}

impl Default for FakeLlmConfig {
    fn default() -> Self {
        Self {
            addr: default_addr(),
            ttft_ms: 0,
            chunk_delay_ms: 0,
            chunks: DEFAULT_CHUNKS,
            fault_rate: 0.0,
            faults: vec![
                FaultKind::RateLimited,
                FaultKind::ServerError,
                FaultKind::Cut,
            ],
            seed: DEFAULT_SEED,
            retry_after_ms: DEFAULT_RETRY_AFTER_MS,
            models: vec![DEFAULT_MODEL.to_owned()],
            record_requests: false,
        }
    }
}

impl FakeLlmConfig {
    /// Settings for a person watching the answers arrive: the defaults, with a time to first
    /// token and a delay between words so that streaming is visible. The defaults answer at
    /// once, which is what tests and benchmarks want.
    pub fn demo() -> Self {
        Self {
            ttft_ms: DEMO_TTFT_MS,
            chunk_delay_ms: DEMO_CHUNK_DELAY_MS,
            ..Self::default()
        }
    }
}

fn default_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0.0 and 1.0"))
    }
}

/// A failure the fake can inject, named as in directives and `--faults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `429`: rate limited, with `Retry-After` and `retry-after-ms` headers.
    RateLimited,
    /// `500`: internal server error.
    ServerError,
    /// `cut`: part of the body is sent, then the connection is closed (no `[DONE]`).
    Cut,
    /// `400`: invalid request (must not be retried).
    BadRequest,
    /// `401`: invalid API key (must not be retried).
    Unauthorized,
}

impl FaultKind {
    /// The name used in directives, flags and `/stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "429",
            Self::ServerError => "500",
            Self::Cut => "cut",
            Self::BadRequest => "400",
            Self::Unauthorized => "401",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fault name that is not one of 429, 500, cut, 400, 401.
#[derive(Debug, thiserror::Error)]
#[error("unknown fault {0:?} (expected 429, 500, cut, 400 or 401)")]
pub struct UnknownFault(String);

impl FromStr for FaultKind {
    type Err = UnknownFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "429" => Ok(Self::RateLimited),
            "500" => Ok(Self::ServerError),
            "cut" => Ok(Self::Cut),
            "400" => Ok(Self::BadRequest),
            "401" => Ok(Self::Unauthorized),
            other => Err(UnknownFault(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_parse_and_match_defaults() {
        let parsed = FakeLlmConfig::try_parse_from([
            "fake-llm",
            "--faults",
            "429,cut",
            "--fault-rate",
            "0.25",
            "--models",
            "a,b",
        ])
        .unwrap();
        assert_eq!(parsed.faults, [FaultKind::RateLimited, FaultKind::Cut]);
        assert!((parsed.fault_rate - 0.25).abs() < f64::EPSILON);
        assert_eq!(parsed.models, ["a", "b"]);
        assert!(FakeLlmConfig::try_parse_from(["fake-llm", "--fault-rate", "2"]).is_err());
        assert!(FakeLlmConfig::try_parse_from(["fake-llm", "--faults", "503"]).is_err());

        let defaults = FakeLlmConfig::default();
        assert_eq!(defaults.addr, default_addr());
        assert_eq!(defaults.chunks, DEFAULT_CHUNKS);
        assert_eq!(defaults.models, [DEFAULT_MODEL]);
        assert_eq!((defaults.ttft_ms, defaults.chunk_delay_ms), (0, 0));
    }

    #[test]
    fn demo_streams_at_a_visible_pace_and_otherwise_keeps_the_defaults() {
        let demo = FakeLlmConfig::demo();
        assert!(demo.ttft_ms > 0 && demo.chunk_delay_ms > 0);
        let defaults = FakeLlmConfig::default();
        assert_eq!(demo.addr, defaults.addr);
        assert_eq!(demo.chunks, defaults.chunks);
        assert_eq!(demo.faults, defaults.faults);
        assert!(demo.fault_rate.abs() < f64::EPSILON);
        assert_eq!(demo.models, defaults.models);
        assert!(!demo.record_requests);
    }
}
