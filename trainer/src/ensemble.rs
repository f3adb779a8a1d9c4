//! Scores of an ensemble forecast, for a model whose tail has more than one member: the
//! continuous ranked probability score and the spread–skill ratio, with bootstrap intervals over
//! samples like every other score ([`crate::bootstrap`]).
//!
//! - **CRPS** of members `x₁ … x_m` against the truth `y`, the standard ensemble estimator
//!   `(1/m) Σᵢ |xᵢ − y| − 1/(2m²) Σᵢ Σⱼ |xᵢ − xⱼ|` (Gneiting & Raftery 2007, eq. 21), averaged
//!   over values. In the field's units; for one member it is the absolute error, lower is better.
//! - **Spread–skill ratio**: `√((m + 1)/m) · spread / RMSE`, the spread the root of the mean
//!   unbiased ensemble variance and the RMSE that of the ensemble mean; the factor makes a
//!   reliable finite ensemble score 1 (Fortin et al. 2014). Below 1 the ensemble is
//!   overconfident, above 1 underconfident.

use crate::bootstrap::{Bootstrap, Interval};

/// CRPS of `members` against `truth` (the estimator of the [module documentation](self)).
pub fn crps(members: &[f64], truth: f64) -> f64 {
    let m = members.len() as f64;
    let skill: f64 = members.iter().map(|x| (x - truth).abs()).sum::<f64>() / m;
    let mut spread = 0.0;
    for (i, a) in members.iter().enumerate() {
        for b in &members[i + 1..] {
            spread += (a - b).abs();
        }
    }
    // Each unordered pair stands for two ordered ones.
    skill - spread / (m * m)
}

/// Per sample: values, CRPS sum, sum of unbiased ensemble variances, squared error of the
/// ensemble mean.
pub type EnsembleSums = [f64; 4];

/// Adds one value's members and truth to a sample's sums.
pub fn add_value(sums: &mut EnsembleSums, members: &[f64], truth: f64) {
    let m = members.len() as f64;
    let mean = members.iter().sum::<f64>() / m;
    let var = members.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0).max(1.0);
    sums[0] += 1.0;
    sums[1] += crps(members, truth);
    sums[2] += var;
    sums[3] += (mean - truth).powi(2);
}

/// The ensemble's scores of one (task, field, level).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnsembleScore {
    pub members: usize,
    pub crps: f64,
    pub crps_ci: Interval,
    /// Root of the mean unbiased ensemble variance.
    pub spread: f64,
    pub spread_skill: f64,
    pub spread_skill_ci: Interval,
}

impl EnsembleScore {
    /// The scores of per-sample sums of an ensemble of `members`.
    pub fn from_samples(samples: &[EnsembleSums], members: usize, bootstrap: &Bootstrap) -> Self {
        let factor = ((members as f64 + 1.0) / members as f64).sqrt();
        let stat = |t: &EnsembleSums| {
            let spread = (t[2] / t[0]).sqrt();
            [t[1] / t[0], spread, factor * spread / (t[3] / t[0]).sqrt()]
        };
        let mut total = [0.0; 4];
        for s in samples {
            for (t, v) in total.iter_mut().zip(s) {
                *t += v;
            }
        }
        let [crps, spread, spread_skill] = stat(&total);
        let [crps_ci, _, spread_skill_ci] = bootstrap.intervals(samples, stat);
        Self {
            members,
            crps,
            crps_ci,
            spread,
            spread_skill,
            spread_skill_ci,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crps_has_its_hand_computed_values() {
        // One member: the absolute error.
        assert_eq!(crps(&[3.0], 1.0), 2.0);
        // {0, 2} against 1: mean |x − y| = 1, pairs |0 − 2| = 2 counted twice over 2·4 → ½.
        assert_eq!(crps(&[0.0, 2.0], 1.0), 0.5);
        // {1, 2, 4} against 0: (1 + 2 + 4)/3 − (1 + 3 + 2)·2/(2·9) = 7/3 − 2/3 = 5/3.
        assert!((crps(&[1.0, 2.0, 4.0], 0.0) - 5.0 / 3.0).abs() < 1e-12);
        // Members all at the truth score 0; the CRPS is never negative.
        assert_eq!(crps(&[5.0; 4], 5.0), 0.0);
        assert!(crps(&[-1.0, 1.0, 0.5], 0.2) >= 0.0);
    }

    #[test]
    fn spread_skill_of_a_hand_made_ensemble() {
        // Two values, members {−1, 1} around truths 0 and 2 (mean 0 both times): unbiased
        // variance 2 each, squared errors of the mean 0 and 4 → spread √2, RMSE √2, ratio
        // √(3/2).
        let mut s = [0.0; 4];
        add_value(&mut s, &[-1.0, 1.0], 0.0);
        add_value(&mut s, &[-1.0, 1.0], 2.0);
        assert_eq!(s, [2.0, 0.5 + 1.5, 4.0, 4.0]);
        let e = EnsembleScore::from_samples(&[s, s], 2, &Bootstrap::default());
        assert!((e.spread - 2f64.sqrt()).abs() < 1e-12);
        assert!((e.spread_skill - 1.5f64.sqrt()).abs() < 1e-12, "{e:?}");
        assert_eq!(e.crps, 1.0);
        assert_eq!(e.crps_ci, [1.0, 1.0]);
    }
}
