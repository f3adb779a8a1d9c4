//! Seeded weight initialization.
//!
//! candle's CPU RNG cannot be seeded, so every variable is created as a constant and then filled
//! here from ChaCha streams. Each variable gets its own stream, selected by a stable hash of its
//! name: its values depend only on (seed, name, shape), not on which other variables exist or on
//! the (undefined) order in which a `VarMap` lists them. Same seed → bit-identical weights.
//!
//! Schemes, chosen by name and rank:
//! - `….bias` → zeros; a rank-1 `….weight` (a layer-norm gain) → ones;
//! - a rank-2 `….weight` (a `Linear`) → Xavier/Glorot uniform, `±√(6 / (fan_in + fan_out))`,
//!   which keeps activations at order 1 whatever the layer widths (the tiny test models are far
//!   narrower than the widths a fixed 0.02 is tuned for);
//! - the weights of a temporal-prior tail's projections (`tail.*.proj_*.weight`) → the same
//!   Xavier bounds times [`PRIOR_PROJ_GAIN`]: an untrained model starts at the prior plus a
//!   hundredth of its error, not plus noise as large as the error, and every variable still
//!   gets a gradient from the first step;
//! - `….prior_error` (a temporal-prior tail's statistic, not trained) →
//!   [`crate::tail::PRIOR_ERROR_DEFAULT`] until a run measures it;
//! - anything else (learned tokens, embeddings) → normal(0, 0.02).

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// How one variable is initialized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    Zeros,
    Ones,
    XavierUniform,
    /// [`Scheme::XavierUniform`] times a gain.
    ScaledXavierUniform(f64),
    Normal {
        std: f64,
    },
    PriorError,
}

/// The gain on the Xavier bounds of a temporal-prior tail's projections.
pub const PRIOR_PROJ_GAIN: f64 = 1e-2;

/// Standard deviation of [`Scheme::Normal`] for learned tokens and embeddings.
pub const NORMAL_STD: f64 = 0.02;

/// The scheme for a variable called `name` of shape `dims`.
pub fn scheme_for(name: &str, dims: &[usize]) -> Scheme {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    match (leaf, dims.len()) {
        ("bias", _) => Scheme::Zeros,
        (crate::tail::PRIOR_ERROR, _) => Scheme::PriorError,
        ("weight", 1) => Scheme::Ones,
        ("weight", 2) if name.contains(".proj_") => Scheme::ScaledXavierUniform(PRIOR_PROJ_GAIN),
        ("weight", 2) => Scheme::XavierUniform,
        _ => Scheme::Normal { std: NORMAL_STD },
    }
}

/// FNV-1a: a hash that, unlike `std`'s, is fixed across Rust versions and platforms.
fn stable_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The values of a variable called `name` of shape `dims` for `seed`, in f64.
pub fn init_values(name: &str, dims: &[usize], seed: u64) -> Vec<f64> {
    let n: usize = dims.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stable_hash(name));
    let scheme = scheme_for(name, dims);
    match scheme {
        Scheme::Zeros => vec![0.0; n],
        Scheme::Ones => vec![1.0; n],
        Scheme::XavierUniform | Scheme::ScaledXavierUniform(_) => {
            let gain = match scheme {
                Scheme::ScaledXavierUniform(gain) => gain,
                _ => 1.0,
            };
            let bound = gain * (6.0 / (dims[0] + dims[1]) as f64).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        }
        Scheme::Normal { std } => (0..n).map(|_| std * standard_normal(&mut rng)).collect(),
        Scheme::PriorError => (0..n)
            .map(|i| crate::tail::PRIOR_ERROR_DEFAULT[i % crate::tail::PRIOR_ERROR_DEFAULT.len()])
            .collect(),
    }
}

/// Box–Muller (rand 0.9 itself has no normal distribution).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    // 1 − u lies in (0, 1], so the logarithm is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Sets every variable of `varmap` from `seed` (see the module docs).
pub fn initialize(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<(&String, &Var)> = data.iter().collect();
    // The order does not change the values (one stream per name); sorting keeps any error
    // reported first the same from run to run.
    vars.sort_by(|a, b| a.0.cmp(b.0));
    for (name, var) in vars {
        let dims = var.dims().to_vec();
        let values = init_values(name, &dims, seed);
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(scheme_for("a.qkv.bias", &[6]), Scheme::Zeros);
        assert_eq!(scheme_for("a.ln1.weight", &[6]), Scheme::Ones);
        assert_eq!(scheme_for("a.qkv.weight", &[6, 2]), Scheme::XavierUniform);
        assert_eq!(
            scheme_for("tail.t.proj.weight", &[6, 2]),
            Scheme::XavierUniform
        );
        assert_eq!(
            scheme_for("tail.t.proj_one_sided.weight", &[6, 2]),
            Scheme::ScaledXavierUniform(PRIOR_PROJ_GAIN)
        );
        assert_eq!(scheme_for("tail.t.prior_error", &[3]), Scheme::PriorError);
        assert_eq!(
            scheme_for("embed.t.class_token", &[6]),
            Scheme::Normal { std: NORMAL_STD }
        );
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let a = init_values("x.weight", &[8, 4], 1);
        assert_eq!(a, init_values("x.weight", &[8, 4], 1));
        assert_ne!(a, init_values("x.weight", &[8, 4], 2));
        assert_ne!(a, init_values("y.weight", &[8, 4], 1));
        let bound = (6.0f64 / 12.0).sqrt();
        assert!(a.iter().all(|v| v.abs() < bound));
        let small = init_values("tail.t.proj_interpolated.weight", &[8, 4], 1);
        assert!(small.iter().all(|v| v.abs() < PRIOR_PROJ_GAIN * bound));
        assert!(
            small
                .iter()
                .any(|v| v.abs() > 0.1 * PRIOR_PROJ_GAIN * bound)
        );
        let n = init_values("cls", &[20_000], 5);
        let mean = n.iter().sum::<f64>() / n.len() as f64;
        let std = (n.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n.len() as f64).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - NORMAL_STD).abs() < 1e-3,
            "{mean} {std}"
        );
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
    }
}
