//! Figures for the benches: durations in milliseconds and nearest-rank percentiles.

use std::time::Duration;

/// The value after `name` on the command line, parsed.
pub fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
}

/// The median of `v`.
pub fn median(v: &[f64]) -> f64 {
    percentiles(v.to_vec(), [0.5])[0]
}

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

/// The `micros=` figure of an agent log line (a CNI request's handling time), in µs.
pub fn logged_micros(line: &str) -> Option<f64> {
    line.split("micros=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
