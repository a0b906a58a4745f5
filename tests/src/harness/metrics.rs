//! Reading a Prometheus scrape in tests: series by their exact name and labels.

use std::collections::HashMap;

/// One scrape of a `/metrics` endpoint.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Series (`name{labels}` exactly as served) to value.
    series: HashMap<String, f64>,
}

impl Scrape {
    /// Parses OpenMetrics / Prometheus text.
    pub fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { series }
    }

    /// The value of a series, e.g. `conveyor_llm_retries_total{reason="rate_limited"}`; 0 when
    /// it is absent (a family child appears on first use).
    pub fn value(&self, series: &str) -> f64 {
        self.series.get(series).copied().unwrap_or(0.0)
    }

    /// The value of a counter or gauge that counts things (a whole number); 0 when absent.
    pub fn count(&self, series: &str) -> u64 {
        let value = self.value(series);
        assert!(
            value >= 0.0 && value.fract() == 0.0,
            "{series} = {value} is not a count"
        );
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked to be a non-negative whole number"
        )]
        let count = value as u64;
        count
    }

    /// Whether the scrape has this series at all.
    pub fn has(&self, series: &str) -> bool {
        self.series.contains_key(series)
    }

    /// The sum of every series of `name` (all label values).
    pub fn sum(&self, name: &str) -> f64 {
        self.series
            .iter()
            .filter(|(series, _)| {
                series.as_str() == name || series.starts_with(&format!("{name}{{"))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_read_by_name_and_labels() {
        let scrape = Scrape::parse(
            "# TYPE a counter\na_total{reason=\"x\"} 2\na_total{reason=\"y\"} 3\nb 1.5\n# EOF\n",
        );
        assert!((scrape.value("a_total{reason=\"x\"}") - 2.0).abs() < f64::EPSILON);
        assert!((scrape.sum("a_total") - 5.0).abs() < f64::EPSILON);
        assert!((scrape.value("b") - 1.5).abs() < f64::EPSILON);
        assert!(scrape.value("missing").abs() < f64::EPSILON);
        assert!(!scrape.has("missing"));
    }
}
