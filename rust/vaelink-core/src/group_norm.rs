//! GroupNorm statistics over a whole activation map, for exact tiling: every tile of a step is
//! normalised with the image's statistics, not its own, so they are reduced here once per step.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{tensor_err, Result};

/// Per-group mean and `1 / sqrt(variance + eps)` of a GroupNorm, `batch * groups` of each in
/// `[N, G]` order.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Elements summed in float32 before the partial sum joins a float64 total: long enough for SIMD,
/// short enough that float32 rounding stays near 1e-7 relative.
const BLOCK: usize = 4096;

/// The statistics of `x`, a contiguous `[N, C, H, W]` map whose `C * H * W` elements per item
/// split into `groups` equal groups (GroupNorm's: channels `C / G` at a time, all positions). Two
/// passes per group (mean, then the centred sum of squares), so a large mean costs the variance
/// nothing; groups run in parallel.
pub fn group_stats(x: &[f32], batch: usize, groups: usize, eps: f64) -> Result<GroupStats> {
    if batch == 0 || groups == 0 || x.is_empty() || x.len() % (batch * groups) != 0 {
        return tensor_err!(
            "{} elements do not split into {batch} items of {groups} equal groups",
            x.len()
        );
    }
    let per_group = x.len() / (batch * groups);
    group_stats_window(x, batch, groups, 0..per_group, groups, eps)
}

/// The statistics of the elements `window` of every channel plane of `x`, a contiguous
/// `[N, C, plane]` map: a row strip stored with halo rows counts only its own rows
/// (`r0 * W .. r1 * W`).
pub fn group_stats_window(
    x: &[f32],
    batch: usize,
    channels: usize,
    window: Range<usize>,
    groups: usize,
    eps: f64,
) -> Result<GroupStats> {
    if batch == 0 || channels == 0 || groups == 0 || channels % groups != 0 {
        return tensor_err!("{channels} channels do not split into {groups} equal groups");
    }
    if x.is_empty() || x.len() % (batch * channels) != 0 {
        return tensor_err!("{} elements are not {batch} x {channels} planes", x.len());
    }
    let plane = x.len() / (batch * channels);
    if window.is_empty() || window.end > plane {
        return tensor_err!("window {window:?} is not inside planes of {plane} elements");
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return tensor_err!("eps must be a finite non-negative number, got {eps}");
    }
    let per_group = channels / groups;
    let n = (per_group * window.len()) as f64;
    let (mean, rstd) = (0..batch * groups)
        .into_par_iter()
        .map(|group| {
            let planes = x[group * per_group * plane..(group + 1) * per_group * plane]
                .chunks_exact(plane)
                .map(|p| &p[window.clone()]);
            let mean = planes.clone().map(|p| blocked_sum(p, |v| v)).sum::<f64>() / n;
            let m = mean as f32;
            let centred = planes
                .map(|p| blocked_sum(p, |v| (v - m) * (v - m)))
                .sum::<f64>()
                / n;
            // The float32 mean's rounding, corrected: E[(x - m)^2] = var + (mean - m)^2.
            let shift = mean - f64::from(m);
            let variance = (centred - shift * shift).max(0.0);
            (mean as f32, (1.0 / (variance + eps).sqrt()) as f32)
        })
        .unzip();
    Ok(GroupStats { mean, rstd })
}

/// The sum of `f(v)` over `values`: float32 lanes within a block, float64 across blocks.
#[inline]
fn blocked_sum(values: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f64 {
    values
        .chunks(BLOCK)
        .map(|block| {
            let mut lanes = [0f32; 16];
            let mut chunks = block.chunks_exact(16);
            for chunk in &mut chunks {
                for (lane, &v) in lanes.iter_mut().zip(chunk) {
                    *lane += f(v);
                }
            }
            let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
            f64::from(lanes.iter().sum::<f32>() + tail)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook statistics in float64, one group at a time.
    fn reference(x: &[f32], batch: usize, groups: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        x.chunks(x.len() / (batch * groups))
            .map(|g| {
                let n = g.len() as f64;
                let mean = g.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = g
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                (mean, 1.0 / (var + eps).sqrt())
            })
            .unzip()
    }

    fn pseudo_random(len: usize, offset: f32) -> Vec<f32> {
        let mut state = 0x2545_f491_u32;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                offset + (state as f32 / u32::MAX as f32 - 0.5) * 3.0
            })
            .collect()
    }

    #[test]
    fn matches_float64_statistics_even_with_a_large_mean() {
        // 2 items, 32 channels of 37 x 41 in 8 groups; a mean 1000x the spread.
        for offset in [0.0, 1500.0] {
            let x = pseudo_random(2 * 32 * 37 * 41, offset);
            let stats = group_stats(&x, 2, 8, 1e-6).unwrap();
            let (mean, rstd) = reference(&x, 2, 8, 1e-6);
            assert_eq!(stats.mean.len(), 16);
            for g in 0..16 {
                let m = f64::from(stats.mean[g]);
                assert!(
                    (m - mean[g]).abs() <= 1e-6 * mean[g].abs().max(1.0),
                    "{offset} {g}"
                );
                let r = f64::from(stats.rstd[g]);
                assert!(
                    (r - rstd[g]).abs() <= 1e-5 * rstd[g],
                    "{offset} {g}: {r} {}",
                    rstd[g]
                );
            }
        }
    }

    #[test]
    fn a_constant_group_has_the_rstd_of_eps() {
        let x = vec![2.5f32; 4 * 10];
        let stats = group_stats(&x, 1, 4, 1e-6).unwrap();
        assert_eq!(stats.mean, vec![2.5; 4]);
        for r in stats.rstd {
            assert!((f64::from(r) - 1e3).abs() < 1e-2);
        }
    }

    #[test]
    fn a_window_counts_only_its_rows() {
        // 2 items, 8 channels of 6 x 5 in 4 groups: rows 1..4 of each plane against the same
        // rows copied out on their own.
        let (batch, channels, h, w) = (2, 8, 6, 5);
        let x = pseudo_random(batch * channels * h * w, 3.0);
        let rows: Vec<f32> = x
            .chunks_exact(h * w)
            .flat_map(|plane| plane[w..4 * w].iter().copied())
            .collect();
        let windowed = group_stats_window(&x, batch, channels, w..4 * w, 4, 1e-6).unwrap();
        let copied = group_stats(&rows, batch, 4, 1e-6).unwrap();
        for (a, b) in windowed.mean.iter().zip(&copied.mean) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0));
        }
        for (a, b) in windowed.rstd.iter().zip(&copied.rstd) {
            assert!((a - b).abs() <= 1e-5 * b);
        }
        assert!(group_stats_window(&x, batch, channels, 0..h * w + 1, 4, 1e-6).is_err());
        assert!(group_stats_window(&x, batch, channels, 3..3, 4, 1e-6).is_err());
        assert!(group_stats_window(&x, batch, 7, 0..5, 4, 1e-6).is_err());
    }

    #[test]
    fn shapes_that_do_not_split_are_errors() {
        assert!(group_stats(&[0.0; 10], 1, 3, 1e-6).is_err());
        assert!(group_stats(&[0.0; 12], 0, 3, 1e-6).is_err());
        assert!(group_stats(&[], 1, 1, 1e-6).is_err());
        assert!(group_stats(&[0.0; 12], 1, 3, f64::NAN).is_err());
    }
}
