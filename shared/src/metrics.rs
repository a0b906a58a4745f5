//! Prometheus metrics plumbing shared by the API and the worker: the text encoding of a
//! registry and a lock-free histogram.
//!
//! Both processes build their own [`Registry`] (`prometheus-client`: explicit registries, no
//! global recorder) and serve it as OpenMetrics text at `/metrics`. The hot path must stay
//! cheap: counters and gauges are `prometheus-client`'s atomics, label children are resolved
//! once at start-up (a `Family` lookup takes a read lock), and [`AtomicHistogram`] replaces the
//! crate's histogram, whose `observe` takes a mutex.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
    registry::Registry,
};

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds (seconds) for latencies from about a millisecond to about two minutes:
/// MCP calls, time to first token, whole turns.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail; an encoding error would be a bug in a metric type.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}

/// A histogram whose `observe` is a few relaxed atomic adds (no lock). A scrape that races an
/// observation may see the count one ahead of the buckets; Prometheus tolerates that.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One per bound, plus `+Inf`; not cumulative.
    buckets: Box<[AtomicU64]>,
    /// The sum in microseconds (observations are durations), so it adds atomically.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with the given upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            inner: Arc::new(HistogramInner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_micros: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }),
        }
    }

    /// A histogram with [`LATENCY_BUCKETS`].
    pub fn latency() -> Self {
        Self::new(LATENCY_BUCKETS)
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = self
            .inner
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.inner.bounds.len());
        self.inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.inner.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        #[expect(
            clippy::cast_precision_loss,
            reason = "a sum of microseconds stays far below 2^52 in practice"
        )]
        let sum = inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            inner.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[test]
    fn histogram_encodes_cumulative_buckets_sum_and_count() {
        let mut registry = Registry::default();
        let histogram = AtomicHistogram::new(&[0.01, 0.1]);
        registry.register("latency_seconds", "test", histogram.clone());
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_secs(2));
        let text = encode(&registry);
        assert!(text.contains("latency_seconds_count 3\n"), "{text}");
        assert!(text.contains("latency_seconds_sum 2.055\n"), "{text}");
        assert!(
            text.contains("latency_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn histograms_work_in_labelled_families() {
        let mut registry = Registry::default();
        let family: Family<[(&'static str, &'static str); 1], AtomicHistogram> =
            Family::new_with_constructor(AtomicHistogram::latency);
        registry.register("call_seconds", "test", family.clone());
        let child = family.get_or_create(&[("server", "tasks")]).clone();
        child.observe(Duration::from_millis(3));
        let text = encode(&registry);
        assert!(
            text.contains("call_seconds_count{server=\"tasks\"} 1\n"),
            "{text}"
        );
    }
}
