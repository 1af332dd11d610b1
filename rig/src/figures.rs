//! Figures for the benches: durations in milliseconds and nearest-rank percentiles.

use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sorts `v` and returns the values at each of `qs` (0.0..=1.0); NaN when empty.
pub fn percentiles<const N: usize>(mut v: Vec<f64>, qs: [f64; N]) -> [f64; N] {
    v.sort_by(|a, b| a.total_cmp(b));
    qs.map(|q| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    })
}
