//! Request counters, so tests and benchmarks can check what the fake actually served (how many
//! retries reached it, how many faults it injected) instead of trusting the caller's account.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

use super::config::FaultKind;

/// A snapshot of the counters, as served by `GET /stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeLlmStats {
    /// Chat completion requests received (all of them, faulted or not).
    pub requests: u64,
    /// Of those, requests with `"stream": true`.
    pub streamed: u64,
    /// Answers that were a tool call (including cut ones).
    pub tool_calls: u64,
    /// Injected faults by kind, from directives and from `--fault-rate`.
    pub faults: FaultStats,
    /// Requests being answered right now (a streamed answer counts until its last frame).
    pub in_flight: u64,
    /// The most requests ever answered at once: what a concurrency limit must keep down.
    pub max_in_flight: u64,
}

/// Injected faults by kind; serialised with the kinds' names (`"429"`, `"500"`, `"cut"`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStats {
    #[serde(rename = "429")]
    pub rate_limited: u64,
    #[serde(rename = "500")]
    pub server_error: u64,
    pub cut: u64,
    #[serde(rename = "400")]
    pub bad_request: u64,
    #[serde(rename = "401")]
    pub unauthorized: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub streamed: AtomicU64,
    pub tool_calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    rate_limited: AtomicU64,
    server_error: AtomicU64,
    cut: AtomicU64,
    bad_request: AtomicU64,
    unauthorized: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed)
    }

    pub fn fault(&self, kind: FaultKind) {
        Self::bump(match kind {
            FaultKind::RateLimited => &self.rate_limited,
            FaultKind::ServerError => &self.server_error,
            FaultKind::Cut => &self.cut,
            FaultKind::BadRequest => &self.bad_request,
            FaultKind::Unauthorized => &self.unauthorized,
        });
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    pub fn snapshot(&self) -> FakeLlmStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FakeLlmStats {
            requests: get(&self.requests),
            streamed: get(&self.streamed),
            tool_calls: get(&self.tool_calls),
            in_flight: get(&self.in_flight),
            max_in_flight: get(&self.max_in_flight),
            faults: FaultStats {
                rate_limited: get(&self.rate_limited),
                server_error: get(&self.server_error),
                cut: get(&self.cut),
                bad_request: get(&self.bad_request),
                unauthorized: get(&self.unauthorized),
            },
        }
    }
}

/// A request being answered. A streamed answer drops it just before its last frame goes out,
/// so a client that reads the end of a stream and at once sends the next request is never
/// counted twice.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
