//! Self-supervised masking of one field's token sequence (docs/design.md §3).
//!
//! # Token layout
//!
//! A field sample is `num_tokens = levels · nt · nlat · nlon` tokens in (level, t, lat, lon) order
//! (longitude fastest), each `token_numel` consecutive f32 values, described by [`MaskGeometry`].
//! Token `i` has time slice `(i / (nlat · nlon)) % nt`.
//!
//! # Strategies ([`MaskSpec`])
//!
//! - **BERT**: per sample and field a ratio `r ~ U(0, r_max)`; `round(r · num_tokens)` tokens are
//!   chosen uniformly without replacement (partial Fisher–Yates). Each chosen token is, with
//!   probability `noise_fraction` (independently), filled with standard-normal noise (ziggurat),
//!   otherwise with `mask_value`.
//! - **Forecast**: the last `k` time slices, at every level, latitude and longitude.
//! - **Interpolation**: `k` distinct interior time slices (never the first or the last), chosen
//!   uniformly at random, at every level, latitude and longitude.
//! - **None**: nothing is masked (inference, downstream use).
//!
//! Forecast and interpolation fill masked tokens with [`DEFAULT_MASK_VALUE`] (0, the mean in
//! normalized units). Targets are the original values of the masked tokens.
//!
//! # Determinism
//!
//! [`apply`] consumes the generator in a fixed order (BERT: ratio, selection, then per masked token
//! in ascending index order the noise decision and, for noised tokens, `token_numel` normal
//! values; interpolation: the slice selection), so the output is a pure function of the inputs and
//! the generator state. Callers seed the generator with
//! [`sample_rng`](crate::pipeline::seeding::sample_rng)
//! `(seed, epoch, sample, field, Purpose::Mask)`.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The value forecast and interpolation masks write (0 = the mean in normalized units).
pub const DEFAULT_MASK_VALUE: f32 = 0.0;

/// The shape of one field's token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MaskGeometry {
    pub levels: usize,
    pub nt: usize,
    pub nlat: usize,
    pub nlon: usize,
    /// Values per token (`t · lat · lon` grid points).
    pub token_numel: usize,
}

impl MaskGeometry {
    /// `levels · nt · nlat · nlon`.
    pub fn num_tokens(&self) -> usize {
        self.levels * self.nt * self.nlat * self.nlon
    }

    /// `num_tokens · token_numel`: the length of a field sample.
    pub fn num_values(&self) -> usize {
        self.num_tokens() * self.token_numel
    }

    /// The index of token (level, t, lat, lon).
    pub fn token_index(&self, level: usize, t: usize, lat: usize, lon: usize) -> usize {
        ((level * self.nt + t) * self.nlat + lat) * self.nlon + lon
    }

    /// The time slice of token `index`.
    pub fn time_of(&self, index: usize) -> usize {
        (index / (self.nlat * self.nlon).max(1)) % self.nt.max(1)
    }

    /// Every dimension is at least 1 and token indices fit `u32`.
    pub fn validate(&self) -> Result<(), MaskError> {
        for (what, v) in [
            ("levels", self.levels),
            ("nt", self.nt),
            ("nlat", self.nlat),
            ("nlon", self.nlon),
            ("token_numel", self.token_numel),
        ] {
            if v == 0 {
                return Err(MaskError::ZeroDimension { what });
            }
        }
        let tokens = [self.levels, self.nt, self.nlat, self.nlon]
            .into_iter()
            .try_fold(1usize, usize::checked_mul);
        match tokens.and_then(|n| n.checked_mul(self.token_numel).map(|_| n)) {
            Some(n) if u32::try_from(n).is_ok() => Ok(()),
            _ => Err(MaskError::TooManyTokens),
        }
    }
}

fn default_noise_fraction() -> f32 {
    0.1
}

/// How a field's tokens are masked. Serialized with a kebab-case `kind` tag, e.g.
/// `{ kind = "bert", r_max = 0.5, noise_fraction = 0.1, mask_value = 0.0 }` or
/// `{ kind = "forecast", k = 2 }`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MaskSpec {
    /// Random tokens, ratio `r ~ U(0, r_max)` per sample and field.
    Bert {
        r_max: f32,
        /// Probability that a masked token gets noise instead of `mask_value` (default 0.1).
        #[serde(default = "default_noise_fraction")]
        noise_fraction: f32,
        /// Value written into masked, non-noised tokens (default 0).
        #[serde(default)]
        mask_value: f32,
    },
    /// The last `k` time slices.
    Forecast { k: usize },
    /// `k` random interior time slices.
    Interpolation { k: usize },
    /// No masking.
    #[default]
    None,
}

/// Why a mask cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskError {
    #[error("bert: r_max must be in [0, 1), got {0}")]
    RMax(f32),
    #[error("bert: noise_fraction must be in [0, 1], got {0}")]
    NoiseFraction(f32),
    #[error("bert: mask_value must be finite, got {0}")]
    MaskValue(f32),
    #[error("forecast: k must be at least 1 and less than nt = {nt}, got {k}")]
    ForecastK { k: usize, nt: usize },
    #[error(
        "interpolation: k must be at least 1 and at most nt - 2 (interior slices only; nt = {nt}), got {k}"
    )]
    InterpolationK { k: usize, nt: usize },
    #[error("mask geometry: {what} must be at least 1")]
    ZeroDimension { what: &'static str },
    #[error("mask geometry: the token count does not fit u32 indices")]
    TooManyTokens,
    #[error("tokens hold {got} values, the geometry expects {expected}")]
    TokenLength { expected: usize, got: usize },
}

impl MaskSpec {
    /// The most values a mask of this spec can take into its target: what a reused target
    /// buffer needs room for, so that it never grows.
    pub fn max_target_len(&self, geometry: &MaskGeometry) -> usize {
        let n = geometry.num_tokens();
        let tokens = match *self {
            Self::None => 0,
            Self::Bert { r_max, .. } => ((f64::from(r_max) * n as f64).round() as usize).min(n),
            Self::Forecast { k } | Self::Interpolation { k } => {
                (n / geometry.nt.max(1)) * k.min(geometry.nt)
            }
        };
        tokens * geometry.token_numel
    }

    /// Checks the parameters against the geometry (and the geometry itself).
    pub fn validate(&self, geometry: &MaskGeometry) -> Result<(), MaskError> {
        geometry.validate()?;
        match *self {
            MaskSpec::Bert {
                r_max,
                noise_fraction,
                mask_value,
            } => {
                if !(0.0..1.0).contains(&r_max) {
                    return Err(MaskError::RMax(r_max));
                }
                if !(0.0..=1.0).contains(&noise_fraction) {
                    return Err(MaskError::NoiseFraction(noise_fraction));
                }
                if !mask_value.is_finite() {
                    return Err(MaskError::MaskValue(mask_value));
                }
            }
            MaskSpec::Forecast { k } => {
                if k == 0 || k >= geometry.nt {
                    return Err(MaskError::ForecastK { k, nt: geometry.nt });
                }
            }
            MaskSpec::Interpolation { k } => {
                if k == 0 || k + 2 > geometry.nt {
                    return Err(MaskError::InterpolationK { k, nt: geometry.nt });
                }
            }
            MaskSpec::None => {}
        }
        Ok(())
    }
}

/// A masked field sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Masked {
    /// The tokens with the masked ones replaced (the model input).
    pub source: Vec<f32>,
    /// The original values of the masked tokens, in `masked_indices` order (the loss target).
    pub target: Vec<f32>,
    /// Indices of the masked tokens, ascending.
    pub masked_indices: Vec<u32>,
    /// The masked tokens that received noise rather than the mask value (BERT only), ascending;
    /// a subset of `masked_indices`.
    pub noised_indices: Vec<u32>,
}

impl Masked {
    /// Number of masked tokens.
    pub fn num_masked(&self) -> usize {
        self.masked_indices.len()
    }
}

/// Masks `tokens` according to `spec`.
///
/// # Panics
/// If `spec` is invalid for `geometry` or `tokens.len() != geometry.num_values()`; use
/// [`try_apply`] to get an error instead.
pub fn apply(
    spec: &MaskSpec,
    geometry: &MaskGeometry,
    tokens: &[f32],
    rng: &mut impl Rng,
) -> Masked {
    try_apply(spec, geometry, tokens, rng).unwrap_or_else(|e| panic!("masking::apply: {e}"))
}

/// Masks `tokens` according to `spec`, validating the spec and the token count first.
pub fn try_apply(
    spec: &MaskSpec,
    geometry: &MaskGeometry,
    tokens: &[f32],
    rng: &mut impl Rng,
) -> Result<Masked, MaskError> {
    try_apply_in_place(spec, geometry, tokens.to_vec(), Vec::new(), rng)
}

/// [`try_apply`] that masks `tokens` in place (it becomes the source) and collects the targets
/// into the reused `target` buffer, sparing a copy of every token.
pub fn try_apply_in_place(
    spec: &MaskSpec,
    geometry: &MaskGeometry,
    tokens: Vec<f32>,
    target: Vec<f32>,
    rng: &mut impl Rng,
) -> Result<Masked, MaskError> {
    let expected = geometry.num_values();
    if tokens.len() != expected {
        spec.validate(geometry)?;
        return Err(MaskError::TokenLength {
            expected,
            got: tokens.len(),
        });
    }
    Ok(try_plan(spec, geometry, rng)?.apply(tokens, target))
}

/// Draws the mask of `spec` before the tokens exist: a mask depends on the random draws alone,
/// never on the values, so drawing first and applying later gives the same bytes as
/// [`try_apply_in_place`] with the same generator (which is this, applied at once).
pub fn try_plan(
    spec: &MaskSpec,
    geometry: &MaskGeometry,
    rng: &mut impl Rng,
) -> Result<MaskPlan, MaskError> {
    spec.validate(geometry)?;
    let numel = geometry.token_numel;
    let mut plan = MaskPlan {
        token_numel: numel,
        num_tokens: geometry.num_tokens(),
        ..MaskPlan::default()
    };
    match *spec {
        MaskSpec::None => {}
        MaskSpec::Bert {
            r_max,
            noise_fraction,
            mask_value,
        } => {
            let n = geometry.num_tokens();
            let r = f64::from(rng.random::<f32>() * r_max);
            let count = ((r * n as f64).round() as usize).min(n);
            plan.masked_indices = choose_sorted(n, count, rng);
            plan.fill = mask_value;
            for &i in &plan.masked_indices {
                if rng.random::<f32>() < noise_fraction {
                    let start = plan.noise.len();
                    plan.noise.resize(start + numel, 0.0);
                    fill_standard_normal(&mut plan.noise[start..], rng);
                    plan.noised_indices.push(i);
                }
            }
        }
        MaskSpec::Forecast { .. } | MaskSpec::Interpolation { .. } => {
            let slices = masked_time_slices(spec, geometry, rng);
            plan.mask_time_slices(geometry, &slices);
        }
    }
    Ok(plan)
}

/// Which time slices a forecast or interpolation mask masks (none for other specs).
fn masked_time_slices(spec: &MaskSpec, geometry: &MaskGeometry, rng: &mut impl Rng) -> Vec<bool> {
    match *spec {
        MaskSpec::Forecast { k } => (0..geometry.nt).map(|t| t >= geometry.nt - k).collect(),
        MaskSpec::Interpolation { k } => {
            // Partial Fisher–Yates over the interior slices 1..nt-1.
            let mut interior: Vec<usize> = (1..geometry.nt - 1).collect();
            for i in 0..k {
                let j = rng.random_range(i..interior.len());
                interior.swap(i, j);
            }
            let mut slices = vec![false; geometry.nt];
            for &t in &interior[..k] {
                slices[t] = true;
            }
            slices
        }
        _ => vec![false; geometry.nt],
    }
}

/// A mask drawn ahead of the tokens ([`try_plan`]): which tokens are masked and what replaces
/// each in the source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaskPlan {
    /// Indices of the masked tokens, ascending.
    pub masked_indices: Vec<u32>,
    /// The masked tokens that receive noise rather than the fill value, ascending.
    pub noised_indices: Vec<u32>,
    /// The value of the other masked tokens.
    fill: f32,
    /// The noised tokens' values, a token after the other in `noised_indices` order.
    noise: Vec<f32>,
    token_numel: usize,
    num_tokens: usize,
}

impl MaskPlan {
    fn mask_time_slices(&mut self, geometry: &MaskGeometry, slices: &[bool]) {
        self.fill = DEFAULT_MASK_VALUE;
        self.masked_indices = (0..geometry.num_tokens())
            .filter(|&i| slices[geometry.time_of(i)])
            .map(|i| i as u32)
            .collect();
    }

    /// Values per token.
    pub fn token_numel(&self) -> usize {
        self.token_numel
    }

    /// Writes the masked tokens' replacements (fill value or noise) into `source`.
    pub fn fill_source(&self, source: &mut [f32]) {
        let numel = self.token_numel;
        let mut noised = self
            .noised_indices
            .iter()
            .zip(self.noise.chunks_exact(numel));
        let mut next = noised.next();
        for &i in &self.masked_indices {
            let token = &mut source[i as usize * numel..(i as usize + 1) * numel];
            match next {
                Some((&n, values)) if n == i => {
                    token.copy_from_slice(values);
                    next = noised.next();
                }
                _ => token.fill(self.fill),
            }
        }
    }

    /// Masks `tokens` (the source after this) and collects the masked tokens' values into the
    /// reused `target` buffer.
    pub fn apply(self, mut tokens: Vec<f32>, mut target: Vec<f32>) -> Masked {
        let numel = self.token_numel;
        target.clear();
        target.reserve(self.masked_indices.len() * numel);
        for &i in &self.masked_indices {
            target.extend_from_slice(&tokens[i as usize * numel..(i as usize + 1) * numel]);
        }
        self.fill_source(&mut tokens);
        Masked {
            source: tokens,
            target,
            masked_indices: self.masked_indices,
            noised_indices: self.noised_indices,
        }
    }
}

/// Chooses `count` distinct indices of `0..n` uniformly (partial Fisher–Yates), sorted.
fn choose_sorted(n: usize, count: usize, rng: &mut impl Rng) -> Vec<u32> {
    // `n` fits u32: checked by `MaskGeometry::validate`.
    let mut idx: Vec<u32> = (0..n as u32).collect();
    for i in 0..count {
        let j = rng.random_range(i..n);
        idx.swap(i, j);
    }
    idx.truncate(count);
    idx.sort_unstable();
    idx
}

/// Fills `out` with independent standard-normal values (the ziggurat method: mostly one draw
/// and a table lookup per value, where Box–Muller's logarithm, sine and cosine per pair showed up
/// in a streaming server's profile).
pub fn fill_standard_normal(out: &mut [f32], rng: &mut impl Rng) {
    for value in out {
        *value = rng.sample(rand_distr::StandardNormal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The former one-pass masking (the values copied and replaced as the draws are made), kept
    /// as the reference the drawn-ahead plan must reproduce bit for bit.
    fn one_pass(
        spec: &MaskSpec,
        geometry: &MaskGeometry,
        tokens: Vec<f32>,
        rng: &mut impl Rng,
    ) -> Masked {
        match *spec {
            MaskSpec::None => Masked {
                source: tokens,
                ..Masked::default()
            },
            MaskSpec::Bert {
                r_max,
                noise_fraction,
                mask_value,
            } => bert(
                geometry,
                tokens,
                Vec::new(),
                r_max,
                noise_fraction,
                mask_value,
                rng,
            ),
            // The slices are drawn as before; what is compared is what is done with them.
            MaskSpec::Forecast { .. } | MaskSpec::Interpolation { .. } => {
                let slices = masked_time_slices(spec, geometry, rng);
                mask_time_slices(geometry, tokens, Vec::new(), &slices)
            }
        }
    }

    fn bert(
        geometry: &MaskGeometry,
        mut source: Vec<f32>,
        mut target: Vec<f32>,
        r_max: f32,
        noise_fraction: f32,
        mask_value: f32,
        rng: &mut impl Rng,
    ) -> Masked {
        let n = geometry.num_tokens();
        let numel = geometry.token_numel;
        let r = f64::from(rng.random::<f32>() * r_max);
        let count = ((r * n as f64).round() as usize).min(n);
        let masked_indices = choose_sorted(n, count, rng);

        target.reserve(count * numel);
        let mut noised_indices = Vec::new();
        for &i in &masked_indices {
            let range = i as usize * numel..(i as usize + 1) * numel;
            target.extend_from_slice(&source[range.clone()]);
            if rng.random::<f32>() < noise_fraction {
                fill_standard_normal(&mut source[range], rng);
                noised_indices.push(i);
            } else {
                source[range].fill(mask_value);
            }
        }
        Masked {
            source,
            target,
            masked_indices,
            noised_indices,
        }
    }

    fn mask_time_slices(
        geometry: &MaskGeometry,
        mut source: Vec<f32>,
        mut target: Vec<f32>,
        slices: &[bool],
    ) -> Masked {
        let numel = geometry.token_numel;
        let mut masked_indices = Vec::new();
        for i in 0..geometry.num_tokens() {
            if slices[geometry.time_of(i)] {
                let range = i * numel..(i + 1) * numel;
                target.extend_from_slice(&source[range.clone()]);
                source[range].fill(DEFAULT_MASK_VALUE);
                masked_indices.push(i as u32);
            }
        }
        Masked {
            source,
            target,
            masked_indices,
            noised_indices: Vec::new(),
        }
    }

    #[test]
    fn no_mask_takes_more_than_its_spec_s_largest_target() {
        let geometry = geometry();
        let tokens = vec![1.0f32; geometry.num_values()];
        let specs = [
            (MaskSpec::None, true),
            (
                MaskSpec::Bert {
                    r_max: 0.95,
                    noise_fraction: 0.1,
                    mask_value: 0.0,
                },
                false,
            ),
            (MaskSpec::Forecast { k: 1 }, true),
            (MaskSpec::Interpolation { k: 1 }, true),
        ];
        for (spec, exact) in &specs {
            let max = spec.max_target_len(&geometry);
            let mut largest = 0;
            for seed in 0..400 {
                let masked = try_apply(
                    spec,
                    &geometry,
                    &tokens,
                    &mut ChaCha8Rng::seed_from_u64(seed),
                )
                .unwrap();
                assert!(masked.target.len() <= max, "{spec:?} seed {seed}");
                largest = largest.max(masked.target.len());
            }
            if *exact {
                assert_eq!(largest, max, "{spec:?}");
            } else {
                assert!(largest * 10 >= max * 9, "{spec:?}: {largest} of {max}");
            }
        }
    }

    #[test]
    fn masks_drawn_ahead_are_the_same_bytes_as_one_pass_masking() {
        let geometry = geometry();
        let tokens: Vec<f32> = (0..geometry.num_values())
            .map(|i| i as f32 * 0.25 - 7.0)
            .collect();
        let specs = [
            MaskSpec::None,
            MaskSpec::Bert {
                r_max: 0.9,
                noise_fraction: 0.3,
                mask_value: -1.5,
            },
            MaskSpec::Forecast { k: 1 },
            MaskSpec::Interpolation { k: 1 },
        ];
        for spec in &specs {
            for seed in 0..50 {
                let want = one_pass(
                    spec,
                    &geometry,
                    tokens.clone(),
                    &mut ChaCha8Rng::seed_from_u64(seed),
                );
                let plan = try_plan(spec, &geometry, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
                // Applied at once, and as a reader that gathers the targets itself and fills the
                // source afterwards.
                let numel = plan.token_numel();
                let mut target = Vec::new();
                for &i in &plan.masked_indices {
                    target.extend_from_slice(&tokens[i as usize * numel..(i as usize + 1) * numel]);
                }
                let mut source = tokens.clone();
                plan.fill_source(&mut source);
                let cut = Masked {
                    source,
                    target,
                    masked_indices: plan.masked_indices.clone(),
                    noised_indices: plan.noised_indices.clone(),
                };
                let at_once = plan.apply(tokens.clone(), Vec::new());
                for got in [&at_once, &cut] {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got.source),
                        bits(&want.source),
                        "{spec:?} seed {seed}"
                    );
                    assert_eq!(
                        bits(&got.target),
                        bits(&want.target),
                        "{spec:?} seed {seed}"
                    );
                    assert_eq!(got.masked_indices, want.masked_indices);
                    assert_eq!(got.noised_indices, want.noised_indices);
                }
            }
        }
    }

    fn geometry() -> MaskGeometry {
        MaskGeometry {
            levels: 2,
            nt: 6,
            nlat: 4,
            nlon: 8,
            token_numel: 5,
        }
    }

    /// Distinct, non-zero token values so masked tokens are recognizable.
    fn tokens(g: &MaskGeometry) -> Vec<f32> {
        (0..g.num_values()).map(|i| 1.0 + i as f32 * 0.25).collect()
    }

    fn check_consistent(g: &MaskGeometry, tokens: &[f32], m: &Masked) {
        let numel = g.token_numel;
        assert!(m.masked_indices.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m.source.len(), tokens.len());
        assert_eq!(m.target.len(), m.masked_indices.len() * numel);
        let mut masked = vec![false; g.num_tokens()];
        for (j, &i) in m.masked_indices.iter().enumerate() {
            let i = i as usize;
            masked[i] = true;
            assert_eq!(
                &m.target[j * numel..(j + 1) * numel],
                &tokens[i * numel..(i + 1) * numel]
            );
        }
        for i in 0..g.num_tokens() {
            if !masked[i] {
                assert_eq!(
                    &m.source[i * numel..(i + 1) * numel],
                    &tokens[i * numel..(i + 1) * numel]
                );
            }
        }
    }

    #[test]
    fn noise_is_standard_normal_in_its_tails_too() {
        // Mean and variance alone would pass a uniform or a two-point law; the normal's share of
        // values beyond 1, 2 and 3 standard deviations would not.
        let mut values = vec![0.0f32; 400_000];
        fill_standard_normal(&mut values, &mut ChaCha8Rng::seed_from_u64(7));
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n - mean * mean;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
        for (k, expected) in [(1.0f32, 0.317_311), (2.0, 0.045_500), (3.0, 0.002_700)] {
            let share = values.iter().filter(|v| v.abs() > k).count() as f64 / n;
            // Four binomial standard errors.
            let tolerance = 4.0 * (expected * (1.0 - expected) / n).sqrt();
            assert!(
                (share - expected).abs() < tolerance,
                "P(|x| > {k}) = {share}"
            );
        }
        let mut again = vec![0.0f32; 1000];
        fill_standard_normal(&mut again, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(again, values[..1000], "a pure function of the generator");
    }

    #[test]
    fn bert_ratio_noise_and_values_match_the_spec() {
        let g = geometry(); // 384 tokens
        let t = tokens(&g);
        let (r_max, noise_fraction, mask_value) = (0.5, 0.2, -7.5);
        let spec = MaskSpec::Bert {
            r_max,
            noise_fraction,
            mask_value,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let n = g.num_tokens() as f64;
        let (mut sum, mut min, mut max) = (0.0f64, f64::MAX, 0.0f64);
        let (mut masked_total, mut noised_total) = (0usize, 0usize);
        let (mut noise_sum, mut noise_sq, mut noise_count) = (0.0f64, 0.0f64, 0usize);
        let draws = 4000;
        for _ in 0..draws {
            let m = apply(&spec, &g, &t, &mut rng);
            check_consistent(&g, &t, &m);
            let frac = m.num_masked() as f64 / n;
            sum += frac;
            min = min.min(frac);
            max = max.max(frac);
            masked_total += m.num_masked();
            noised_total += m.noised_indices.len();
            let mut noised = m.noised_indices.iter().peekable();
            for &i in &m.masked_indices {
                let tok = &m.source[i as usize * 5..(i as usize + 1) * 5];
                if noised.peek() == Some(&&i) {
                    noised.next();
                    for &v in tok {
                        assert!(v.is_finite());
                        noise_sum += f64::from(v);
                        noise_sq += f64::from(v) * f64::from(v);
                        noise_count += 1;
                    }
                } else {
                    assert!(tok.iter().all(|&v| v == mask_value));
                }
            }
            assert!(noised.next().is_none(), "noised ⊄ masked");
        }
        let mean = sum / f64::from(draws);
        assert!((mean - f64::from(r_max) / 2.0).abs() < 0.01, "mean {mean}");
        assert!(min < 0.005, "min {min}");
        assert!(
            max > f64::from(r_max) - 0.01 && max <= f64::from(r_max),
            "max {max}"
        );
        let share = noised_total as f64 / masked_total as f64;
        assert!(
            (share - f64::from(noise_fraction)).abs() < 0.02,
            "share {share}"
        );
        let nm = noise_sum / noise_count as f64;
        let var = noise_sq / noise_count as f64 - nm * nm;
        assert!(nm.abs() < 0.02 && (var - 1.0).abs() < 0.03, "{nm} {var}");
    }

    #[test]
    fn bert_extremes() {
        let g = geometry();
        let t = tokens(&g);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let zero = MaskSpec::Bert {
            r_max: 0.0,
            noise_fraction: 0.5,
            mask_value: 0.0,
        };
        let m = apply(&zero, &g, &t, &mut rng);
        assert_eq!(m.source, t);
        assert!(m.masked_indices.is_empty() && m.target.is_empty());
        let all_noise = MaskSpec::Bert {
            r_max: 0.9,
            noise_fraction: 1.0,
            mask_value: 0.0,
        };
        for _ in 0..20 {
            let m = apply(&all_noise, &g, &t, &mut rng);
            assert_eq!(m.noised_indices, m.masked_indices);
        }
    }

    #[test]
    fn forecast_masks_exactly_the_last_k_slices() {
        let g = geometry();
        let t = tokens(&g);
        for k in 1..g.nt {
            let m = apply(
                &MaskSpec::Forecast { k },
                &g,
                &t,
                &mut ChaCha8Rng::seed_from_u64(0),
            );
            check_consistent(&g, &t, &m);
            let mut expected = Vec::new();
            for l in 0..g.levels {
                for ti in g.nt - k..g.nt {
                    for y in 0..g.nlat {
                        for x in 0..g.nlon {
                            expected.push(g.token_index(l, ti, y, x) as u32);
                        }
                    }
                }
            }
            expected.sort_unstable();
            assert_eq!(m.masked_indices, expected);
            for &i in &m.masked_indices {
                let s = &m.source[i as usize * 5..(i as usize + 1) * 5];
                assert!(s.iter().all(|&v| v == DEFAULT_MASK_VALUE));
            }
            assert!(m.noised_indices.is_empty());
        }
    }

    #[test]
    fn interpolation_masks_k_interior_slices() {
        let g = geometry();
        let t = tokens(&g);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let per_slice = g.levels * g.nlat * g.nlon;
        let mut hit = vec![0usize; g.nt];
        for k in 1..=g.nt - 2 {
            for _ in 0..50 {
                let m = apply(&MaskSpec::Interpolation { k }, &g, &t, &mut rng);
                check_consistent(&g, &t, &m);
                assert_eq!(m.num_masked(), k * per_slice);
                let mut slices: Vec<usize> = m
                    .masked_indices
                    .iter()
                    .map(|&i| g.time_of(i as usize))
                    .collect();
                slices.sort_unstable();
                slices.dedup();
                assert_eq!(slices.len(), k);
                assert!(!slices.contains(&0) && !slices.contains(&(g.nt - 1)));
                // Whole slices: every (level, lat, lon) of a chosen slice is masked.
                for &s in &slices {
                    let count = m
                        .masked_indices
                        .iter()
                        .filter(|&&i| g.time_of(i as usize) == s)
                        .count();
                    assert_eq!(count, per_slice);
                    hit[s] += 1;
                }
            }
        }
        // Every interior slice gets chosen at some point.
        assert!(hit[1..g.nt - 1].iter().all(|&h| h > 0), "{hit:?}");
    }

    #[test]
    fn none_masks_nothing() {
        let g = geometry();
        let t = tokens(&g);
        let m = apply(&MaskSpec::None, &g, &t, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(m.source, t);
        assert!(m.target.is_empty() && m.masked_indices.is_empty() && m.noised_indices.is_empty());
    }

    #[test]
    fn validation_errors_name_the_parameter() {
        let g = geometry();
        let bert = |r_max, noise_fraction| MaskSpec::Bert {
            r_max,
            noise_fraction,
            mask_value: 0.0,
        };
        let err = |s: MaskSpec| s.validate(&g).unwrap_err().to_string();
        assert!(err(bert(1.0, 0.1)).contains("r_max"));
        assert!(err(bert(-0.1, 0.1)).contains("r_max"));
        assert!(err(bert(f32::NAN, 0.1)).contains("r_max"));
        assert!(err(bert(0.5, 1.5)).contains("noise_fraction"));
        assert!(err(bert(0.5, -0.01)).contains("noise_fraction"));
        bert(0.0, 0.0).validate(&g).unwrap();
        bert(0.99, 1.0).validate(&g).unwrap();
        assert!(
            err(MaskSpec::Bert {
                r_max: 0.5,
                noise_fraction: 0.1,
                mask_value: f32::INFINITY
            })
            .contains("mask_value")
        );

        assert!(err(MaskSpec::Forecast { k: 0 }).contains("forecast: k"));
        assert!(err(MaskSpec::Forecast { k: 6 }).contains("forecast: k"));
        MaskSpec::Forecast { k: 5 }.validate(&g).unwrap();
        assert!(err(MaskSpec::Interpolation { k: 0 }).contains("interpolation: k"));
        assert!(err(MaskSpec::Interpolation { k: 5 }).contains("interpolation: k"));
        MaskSpec::Interpolation { k: 4 }.validate(&g).unwrap();
        MaskSpec::None.validate(&g).unwrap();

        let bad = MaskGeometry { nt: 0, ..g };
        assert_eq!(
            MaskSpec::None.validate(&bad),
            Err(MaskError::ZeroDimension { what: "nt" })
        );
        let huge = MaskGeometry {
            levels: 1 << 16,
            nt: 1 << 16,
            ..g
        };
        assert_eq!(
            MaskSpec::None.validate(&huge),
            Err(MaskError::TooManyTokens)
        );

        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            try_apply(&MaskSpec::None, &g, &[0.0; 3], &mut rng),
            Err(MaskError::TokenLength {
                expected: g.num_values(),
                got: 3
            })
        );
        assert!(try_apply(&bert(1.0, 0.0), &g, &tokens(&g), &mut rng).is_err());
    }

    #[test]
    #[should_panic(expected = "r_max")]
    fn apply_panics_on_invalid_spec() {
        let g = geometry();
        let spec = MaskSpec::Bert {
            r_max: 2.0,
            noise_fraction: 0.0,
            mask_value: 0.0,
        };
        apply(&spec, &g, &tokens(&g), &mut ChaCha8Rng::seed_from_u64(0));
    }

    #[test]
    fn same_seed_gives_identical_output() {
        let g = geometry();
        let t = tokens(&g);
        for spec in [
            MaskSpec::Bert {
                r_max: 0.9,
                noise_fraction: 0.5,
                mask_value: 0.0,
            },
            MaskSpec::Interpolation { k: 2 },
            MaskSpec::Forecast { k: 2 },
        ] {
            let a = apply(&spec, &g, &t, &mut ChaCha8Rng::seed_from_u64(77));
            let b = apply(&spec, &g, &t, &mut ChaCha8Rng::seed_from_u64(77));
            assert_eq!(a, b);
            let mut rng = crate::pipeline::seeding::sample_rng(
                1,
                2,
                3,
                0,
                crate::pipeline::seeding::Purpose::Mask,
            );
            let c = apply(&spec, &g, &t, &mut rng);
            let mut rng = crate::pipeline::seeding::sample_rng(
                1,
                2,
                3,
                0,
                crate::pipeline::seeding::Purpose::Mask,
            );
            assert_eq!(c, apply(&spec, &g, &t, &mut rng));
        }
        let spec = MaskSpec::Bert {
            r_max: 0.9,
            noise_fraction: 0.5,
            mask_value: 0.0,
        };
        let a = apply(&spec, &g, &t, &mut ChaCha8Rng::seed_from_u64(77));
        let b = apply(&spec, &g, &t, &mut ChaCha8Rng::seed_from_u64(78));
        assert_ne!(a, b);
    }

    #[test]
    fn spec_serde_uses_kebab_case_tag() {
        let spec: MaskSpec = serde_json::from_str(r#"{"kind": "bert", "r_max": 0.5}"#).unwrap();
        assert_eq!(
            spec,
            MaskSpec::Bert {
                r_max: 0.5,
                noise_fraction: 0.1,
                mask_value: 0.0
            }
        );
        for spec in [
            MaskSpec::Forecast { k: 3 },
            MaskSpec::Interpolation { k: 1 },
            MaskSpec::None,
            spec,
        ] {
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<MaskSpec>(&json).unwrap(), spec);
        }
        assert_eq!(
            serde_json::to_string(&MaskSpec::Interpolation { k: 2 }).unwrap(),
            r#"{"kind":"interpolation","k":2}"#
        );
        assert_eq!(
            serde_json::to_string(&MaskSpec::None).unwrap(),
            r#"{"kind":"none"}"#
        );
    }
}
