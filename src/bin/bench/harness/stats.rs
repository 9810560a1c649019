//! Median and p99 of a set of samples, by nearest rank. For rates (higher is better) the
//! "p99" is the slow tail: the rate that 99% of the samples reach.

use std::time::Duration;

/// Median, tail and sample count of one measured series.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    /// The middle sample.
    pub median: f64,
    /// The 99th percentile in the "worse" direction (slowest time, lowest rate).
    pub p99: f64,
    /// How many samples there were.
    pub samples: usize,
}

/// Summary of values where lower is better (latencies, sizes).
pub fn lower_better(values: &[f64]) -> Summary {
    let sorted = sorted(values);
    Summary {
        median: rank(&sorted, 0.5),
        p99: rank(&sorted, 0.99),
        samples: sorted.len(),
    }
}

/// Summary of values where higher is better (throughputs).
pub fn higher_better(values: &[f64]) -> Summary {
    let sorted = sorted(values);
    Summary {
        median: rank(&sorted, 0.5),
        p99: rank(&sorted, 0.01),
        samples: sorted.len(),
    }
}

/// Milliseconds, for latency series.
pub fn millis(durations: &[Duration]) -> Vec<f64> {
    durations.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

/// MiB/s for `bytes` moved in each of `durations`.
pub fn mib_per_sec(bytes: u64, durations: &[Duration]) -> Vec<f64> {
    durations
        .iter()
        .map(|d| bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(f64::MIN_POSITIVE))
        .collect()
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// Nearest-rank percentile `q` (0..=1) of sorted values; NaN when there are none.
fn rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    let index = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
    sorted[index]
}
