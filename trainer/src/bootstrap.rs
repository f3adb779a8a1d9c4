//! Percentile bootstrap over samples: how far a score computed from a few test samples could be
//! from the score of the population they were drawn from.
//!
//! The values of one sample (a window) are strongly correlated — neighbouring grid points and
//! time steps of the same weather — so resampling values would make the intervals far too
//! narrow; the unit resampled is the sample. Each sample contributes its sums (value count and
//! one or more sums of errors); a resample draws as many samples as there are, with replacement,
//! adds their sums and computes the statistics from the totals. The interval is the central
//! 95 % of the resampled statistics (linear interpolation between order statistics). The draws
//! come from a seeded generator, so an interval is the same on every run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How intervals are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bootstrap {
    /// Resamples per interval.
    pub resamples: usize,
    /// Seeds the draws.
    pub seed: u64,
    /// Central coverage of the interval, in (0, 1).
    pub level: f64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self {
            resamples: 1000,
            seed: 0,
            level: 0.95,
        }
    }
}

/// A confidence interval `[lo, hi]`.
pub type Interval = [f64; 2];

impl Bootstrap {
    /// Intervals of `K` statistics, each a function of the totals over a resample of `samples`
    /// (per sample, `S` sums); all `K` from the same resamples. Without samples every interval
    /// is `[NaN, NaN]`.
    pub fn intervals<const S: usize, const K: usize>(
        &self,
        samples: &[[f64; S]],
        stat: impl Fn(&[f64; S]) -> [f64; K],
    ) -> [Interval; K] {
        if samples.is_empty() || self.resamples == 0 {
            return [[f64::NAN; 2]; K];
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut draws: [Vec<f64>; K] = std::array::from_fn(|_| Vec::with_capacity(self.resamples));
        for _ in 0..self.resamples {
            let mut total = [0.0; S];
            for _ in 0..samples.len() {
                let s = &samples[rng.random_range(0..samples.len())];
                for (t, v) in total.iter_mut().zip(s) {
                    *t += v;
                }
            }
            for (d, v) in draws.iter_mut().zip(stat(&total)) {
                d.push(v);
            }
        }
        let tail = (1.0 - self.level) / 2.0;
        draws.map(|mut d| {
            // NaN (a 0/0 skill) sorts last and so only reaches an interval that includes it.
            d.sort_by(f64::total_cmp);
            [quantile(&d, tail), quantile(&d, 1.0 - tail)]
        })
    }
}

/// The `q` quantile of sorted `values` (interpolating linearly between order statistics).
fn quantile(values: &[f64], q: f64) -> f64 {
    let at = q * (values.len() - 1) as f64;
    let (i, w) = (at.floor() as usize, at.fract());
    if i + 1 < values.len() {
        values[i] + (values[i + 1] - values[i]) * w
    } else {
        values[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rmse(t: &[f64; 2]) -> [f64; 1] {
        [(t[1] / t[0]).sqrt()]
    }

    #[test]
    fn identical_samples_give_a_zero_width_interval() {
        let samples = vec![[4.0, 36.0]; 17];
        let [ci] = Bootstrap::default().intervals(&samples, rmse);
        assert_eq!(ci, [3.0, 3.0]);
    }

    #[test]
    fn two_samples_span_their_own_scores() {
        // A resample of two is AA (¼), AB or BA (½) or BB (¼): the 2.5 % and 97.5 % points are
        // the scores of A alone and B alone.
        let samples = [[1.0, 1.0], [1.0, 4.0]];
        let [ci] = Bootstrap::default().intervals(&samples, rmse);
        assert_eq!(ci, [1.0, 2.0]);
    }

    #[test]
    fn a_mean_gets_the_normal_theory_interval() {
        // 400 samples of values 0..19 (mean 9.5, sd √33.25): the interval of the mean is about
        // ±1.96 · sd / √400 around it.
        let samples: Vec<[f64; 2]> = (0..400).map(|i| [1.0, (i % 20) as f64]).collect();
        let mean = |t: &[f64; 2]| [t[1] / t[0]];
        let [ci] = Bootstrap::default().intervals(&samples, mean);
        let half = 1.96 * 33.25f64.sqrt() / 20.0;
        for (got, want) in ci.iter().zip([9.5 - half, 9.5 + half]) {
            assert!((got - want).abs() < 0.1 * half, "{ci:?} vs ±{half}");
        }
    }

    #[test]
    fn the_seed_makes_it_reproducible() {
        let samples: Vec<[f64; 2]> = (0..50).map(|i| [2.0, (i * i % 17) as f64]).collect();
        let b = Bootstrap::default();
        assert_eq!(b.intervals(&samples, rmse), b.intervals(&samples, rmse));
        let other = Bootstrap { seed: 1, ..b };
        assert_ne!(b.intervals(&samples, rmse), other.intervals(&samples, rmse));
        assert!(b.intervals::<2, 1>(&[], rmse)[0][0].is_nan());
    }
}
