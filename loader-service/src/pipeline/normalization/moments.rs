//! Numerically stable streaming moments: f64 accumulation per block, merged with Chan's parallel
//! formula, so statistics of a whole store come out of one pass in any block order.

use serde::{Deserialize, Serialize};

/// Count, mean, variance (as M2), min and max of the finite values seen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
    pub min: f64,
    pub max: f64,
    /// Values that were NaN (missing).
    pub missing: u64,
}

impl Default for Moments {
    fn default() -> Self {
        Self {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            missing: 0,
        }
    }
}

impl Moments {
    /// Moments of one block of values (NaN counts as missing).
    pub fn from_values(values: &[f32]) -> Self {
        // Two passes over the block: the mean first, then deviations from it, which keeps M2
        // exact to f64 rounding even for fields with a large offset (geopotential ~5e4).
        let mut count = 0u64;
        let mut sum = 0.0f64;
        let mut min = f64::INFINITY;
        let mut max = f64::NEG_INFINITY;
        for &v in values {
            if v.is_nan() {
                continue;
            }
            let v = v as f64;
            count += 1;
            sum += v;
            min = min.min(v);
            max = max.max(v);
        }
        let missing = values.len() as u64 - count;
        if count == 0 {
            return Self {
                missing,
                ..Self::default()
            };
        }
        let mean = sum / count as f64;
        let m2 = values
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| (v as f64 - mean).powi(2))
            .sum();
        Self {
            count,
            mean,
            m2,
            min,
            max,
            missing,
        }
    }

    /// Combines two sets of moments (Chan et al.).
    pub fn merge(self, other: Self) -> Self {
        if self.count == 0 {
            return Self {
                missing: self.missing + other.missing,
                ..other
            };
        }
        if other.count == 0 {
            return Self {
                missing: self.missing + other.missing,
                ..self
            };
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        Self {
            count: self.count + other.count,
            mean: self.mean + delta * other.count as f64 / n,
            m2: self.m2 + other.m2 + delta * delta * self.count as f64 * other.count as f64 / n,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
            missing: self.missing + other.missing,
        }
    }

    /// Population standard deviation.
    pub fn std(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_blocks_equal_one_pass_in_f64() {
        let values: Vec<f32> = (0..10_000)
            .map(|i| {
                5.0e4 + ((i * 7919) % 1000) as f32 * 0.37 - if i % 97 == 0 { f32::NAN } else { 0.0 }
            })
            .collect();
        let whole = Moments::from_values(&values);
        let merged = values
            .chunks(333)
            .map(Moments::from_values)
            .fold(Moments::default(), Moments::merge);
        let finite: Vec<f64> = values
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| v as f64)
            .collect();
        let mean = finite.iter().sum::<f64>() / finite.len() as f64;
        let std =
            (finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / finite.len() as f64).sqrt();
        for m in [whole, merged] {
            assert_eq!(m.count, finite.len() as u64);
            assert_eq!(m.missing, (values.len() - finite.len()) as u64);
            assert!((m.mean - mean).abs() < 1e-9 * mean.abs());
            assert!((m.std() - std).abs() < 1e-9 * std);
        }
        assert_eq!(merged.min, whole.min);
        assert_eq!(merged.max, whole.max);
    }
}
