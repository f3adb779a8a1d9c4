//! The optimizer side of a training step: AdamW with state that checkpoints can save and
//! restore, the learning-rate schedule (warm-up, then cosine or linear decay), global-norm
//! gradient clipping and gradient accumulation.
//!
//! candle-nn's `AdamW` keeps its moments private, so a resumed run could not continue with the
//! same moments; this one keeps them in the open, aligned with the model's variables sorted by
//! name (a `VarMap` lists them in no fixed order, and a reduction over gradients in a varying
//! order would not be bit-for-bit repeatable).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Result, train_config_err};

/// How the learning rate falls after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decay {
    /// Half a cosine from the peak down to `min_lr` at the last step.
    #[default]
    Cosine,
    /// A straight line from the peak down to `min_lr` at the last step.
    Linear,
    /// The peak until the end.
    Constant,
}

fn default_lr() -> f64 {
    1e-3
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.05
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_accumulation() -> usize {
    1
}

/// Optimizer settings (the `[optimizer]` table of a training config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate (reached at the end of the warm-up).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learning rate at the last step of the schedule.
    #[serde(default)]
    pub min_lr: f64,
    /// Steps of linear warm-up from `lr / warmup_steps` to `lr`.
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub decay: Decay,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only: decaying layer-norm gains, biases and
    /// learned tokens towards zero only fights the normalization they implement.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it. 0 = no clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip_norm: f64,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    #[serde(default = "default_accumulation")]
    pub accumulation: usize,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            min_lr: 0.0,
            warmup_steps: 0,
            decay: Decay::default(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            grad_clip_norm: default_grad_clip(),
            accumulation: default_accumulation(),
        }
    }
}

impl OptimizerConfig {
    /// Rejects impossible settings; the error names the setting (`optimizer.lr`).
    pub fn validate(&self) -> Result<()> {
        let err = |what: &str, why: String| Err(train_config_err(format!("optimizer.{what}"), why));
        for (what, v) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
            ("grad_clip_norm", self.grad_clip_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(what, format!("{v} must be finite and not negative"));
            }
        }
        if self.lr == 0.0 {
            return err("lr", "must be positive".into());
        }
        if self.min_lr > self.lr {
            return err("min_lr", format!("{} is above lr {}", self.min_lr, self.lr));
        }
        for (what, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return err(what, format!("{v} must lie in [0, 1)"));
            }
        }
        if self.accumulation == 0 {
            return err("accumulation", "must be at least 1".into());
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based) of a `total`-step schedule. Steps
    /// past the end keep `min_lr` (a run may stop later than its schedule).
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).saturating_sub(1);
        let p = if span == 0 {
            1.0
        } else {
            ((step - self.warmup_steps) as f64 / span as f64).min(1.0)
        };
        let (hi, lo) = (self.lr, self.min_lr);
        match self.decay {
            Decay::Constant => hi,
            Decay::Linear => hi - (hi - lo) * p,
            Decay::Cosine => lo + (hi - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }
}

/// The model's trainable variables, sorted by name: the order every per-variable list here
/// (gradients, moments) follows.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Whether the optimizer updates the variable `name`: every weight, not the statistics a run
/// measures ([`crate::tail::PRIOR_ERROR`]).
pub fn is_trainable(name: &str) -> bool {
    name.rsplit('.').next() != Some(crate::tail::PRIOR_ERROR)
}

/// One gradient per variable (aligned with [`sorted_vars`]); `None` where the loss does not
/// depend on the variable.
#[derive(Debug, Clone, Default)]
pub struct Grads(pub Vec<Option<Tensor>>);

impl Grads {
    /// The gradients of `vars` in `store`, scaled by `scale` (1 / accumulation steps).
    pub fn from_store(store: &GradStore, vars: &[(String, Var)], scale: f64) -> Result<Self> {
        let grads = vars
            .iter()
            .map(|(_, var)| {
                store
                    .get(var.as_tensor())
                    .map(|g| {
                        if scale == 1.0 {
                            Ok(g.clone())
                        } else {
                            g.affine(scale, 0.0)
                        }
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self(grads))
    }

    /// Adds `other` (another micro-batch) into `self`.
    pub fn accumulate(&mut self, other: Self) -> Result<()> {
        if self.0.is_empty() {
            *self = other;
            return Ok(());
        }
        for (acc, g) in self.0.iter_mut().zip(other.0) {
            *acc = match (acc.take(), g) {
                (Some(a), Some(g)) => Some((a + g)?),
                (a, g) => a.or(g),
            };
        }
        Ok(())
    }

    /// The global L2 norm over all gradients. Accumulated in f64 over variables in name order,
    /// so it is the same number on every run.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sum = 0.0f64;
        for g in self.0.iter().flatten() {
            sum += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sum.sqrt())
    }

    /// Scales all gradients so their global norm is at most `max_norm` (0 = no limit); returns
    /// the norm before clipping.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for g in self.0.iter_mut().flatten() {
                *g = g.affine(scale, 0.0)?;
            }
        }
        Ok(norm)
    }
}

/// AdamW (Loshchilov & Hutter) with decoupled weight decay, as `torch.optim.AdamW`:
/// `θ ← θ·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `θ ← θ − lr · m̂ / (√v̂ + ε)` with `m̂ = m / (1−β₁ᵗ)`, `v̂ = v / (1−β₂ᵗ)`.
#[derive(Debug)]
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    step: u64,
}

impl AdamW {
    /// An optimizer over every variable of `varmap`, moments at zero.
    pub fn new(varmap: &VarMap, cfg: &OptimizerConfig) -> Result<Self> {
        let vars: Vec<_> = sorted_vars(varmap)
            .into_iter()
            .filter(|(name, _)| is_trainable(name))
            .collect();
        // Each moment its own buffer: the CPU step updates them in place.
        let zeros = || {
            vars.iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Self {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            m: zeros()?,
            v: zeros()?,
            vars,
            step: 0,
        })
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Whether a variable of rank `rank` is decayed (matrices only).
    pub fn decays(rank: usize) -> bool {
        rank >= 2
    }

    /// One update with learning rate `lr`. A variable without a gradient is left alone,
    /// moments included (as torch does for a parameter whose `grad` is `None`).
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        assert_eq!(grads.0.len(), self.vars.len(), "one gradient per variable");
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        for (i, g) in grads.0.iter().enumerate() {
            let Some(g) = g else { continue };
            let (_, var) = &self.vars[i];
            if var.device().is_cpu() && matches!(var.dtype(), DType::F32 | DType::F64) {
                let decay = self.weight_decay > 0.0 && Self::decays(var.rank());
                let update = inplace::Update {
                    beta1: b1,
                    beta2: b2,
                    inv_bias1: 1.0 / bias1,
                    inv_bias2: 1.0 / bias2,
                    eps: self.eps,
                    lr,
                    decay: if decay {
                        1.0 - lr * self.weight_decay
                    } else {
                        1.0
                    },
                };
                inplace::step(var.as_tensor(), &self.m[i], &self.v[i], g, update)?;
                continue;
            }
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mut theta = var.as_tensor().clone();
            if self.weight_decay > 0.0 && Self::decays(theta.rank()) {
                theta = (theta * (1.0 - lr * self.weight_decay))?;
            }
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            var.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<var>`, `v.<var>`), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .flat_map(|((name, _), (m, v))| {
                // Copies: the next step updates the moments in place.
                [
                    (format!("m.{name}"), m.copy().expect("a copy of a tensor")),
                    (format!("v.{name}"), v.copy().expect("a copy of a tensor")),
                ]
            })
            .collect()
    }

    /// Restores the moments and the step count written by [`Self::state_tensors`]; `Err(what)`
    /// names a missing, surplus or misshapen tensor.
    pub fn load_state(
        &mut self,
        mut tensors: HashMap<String, Tensor>,
        step: u64,
    ) -> std::result::Result<(), String> {
        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (prefix, out) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| format!("no tensor `{key}`"))?;
                if t.dims() != var.dims() {
                    return Err(format!(
                        "tensor `{key}` has shape {:?}, the model's `{name}` is {:?}",
                        t.dims(),
                        var.dims()
                    ));
                }
                // Its own buffer (`to_dtype` to the same type shares it), updated in place.
                let t = t
                    .to_dtype(var.dtype())
                    .and_then(|t| t.copy())
                    .map_err(|e| e.to_string())?;
                out.push(t);
            }
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(format!(
                "tensor `{extra}` belongs to no variable of the model"
            ));
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }
}

/// AdamW's step on the CPU as in-place kernels over the variable and its moments: no fresh
/// tensor per variable and step, the same arithmetic as the tensor-op path.
mod inplace {
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
    use num_traits::Float;

    #[derive(Debug, Clone, Copy)]
    pub struct Update {
        pub beta1: f64,
        pub beta2: f64,
        pub inv_bias1: f64,
        pub inv_bias2: f64,
        pub eps: f64,
        pub lr: f64,
        /// `1 − lr·wd`, or 1 for a variable that is not decayed.
        pub decay: f64,
    }

    /// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, then the variable `theta`.
    pub fn step(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, u: Update) -> Result<()> {
        let g = g.to_dtype(theta.dtype())?.contiguous()?;
        m.inplace_op2(
            &g,
            &Moment {
                beta: u.beta1,
                square: false,
            },
        )?;
        v.inplace_op2(
            &g,
            &Moment {
                beta: u.beta2,
                square: true,
            },
        )?;
        theta.inplace_op3(m, v, &u)
    }

    /// The contiguous range of a layout.
    fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(a..b),
            None => candle_core::bail!("adamw: operand not contiguous"),
        }
    }

    /// The variable's data and the operands', all of one float type.
    macro_rules! by_dtype {
        ($s1:expr, $l1:expr, [$($s:expr, $l:expr),*], |$dst:ident, $src:ident| $body:expr) => {
            match $s1 {
                CpuStorage::F32(d) => {
                    let $dst = &mut d[range($l1)?];
                    let $src = [$(match $s {
                        CpuStorage::F32(v) => &v[range($l)?],
                        _ => candle_core::bail!("adamw: operands of mixed types"),
                    }),*];
                    $body
                }
                CpuStorage::F64(d) => {
                    let $dst = &mut d[range($l1)?];
                    let $src = [$(match $s {
                        CpuStorage::F64(v) => &v[range($l)?],
                        _ => candle_core::bail!("adamw: operands of mixed types"),
                    }),*];
                    $body
                }
                _ => candle_core::bail!("adamw: no in-place step for this type"),
            }
        };
    }

    struct Moment {
        beta: f64,
        square: bool,
    }

    fn moment<T: Float>(m: &mut [T], g: &[T], beta: f64, square: bool) {
        let b = T::from(beta).expect("a constant");
        let c = T::from(1.0 - beta).expect("a constant");
        for (m, &g) in m.iter_mut().zip(g) {
            let g = if square { g * g } else { g };
            *m = *m * b + g * c;
        }
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            by_dtype!(s1, l1, [s2, l2], |m, g| moment(
                m,
                g[0],
                self.beta,
                self.square
            ));
            Ok(())
        }
    }

    fn update<T: Float>(theta: &mut [T], m: &[T], v: &[T], u: &Update) {
        let k = |x: f64| T::from(x).expect("a constant");
        let (ib1, ib2, eps, lr, decay) = (
            k(u.inv_bias1),
            k(u.inv_bias2),
            k(u.eps),
            k(u.lr),
            k(u.decay),
        );
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            let step = (m * ib1) / ((v * ib2).sqrt() + eps);
            *t = *t * decay - step * lr;
        }
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            by_dtype!(s1, l1, [s2, l2, s3, l3], |theta, mv| update(
                theta, mv[0], mv[1], self
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn varmap_with(values: &[(&str, Vec<f64>, &[usize])]) -> VarMap {
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().unwrap();
            for (name, vals, dims) in values {
                let t = Tensor::from_vec(vals.clone(), *dims, &Device::Cpu).unwrap();
                data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
            }
        }
        vm
    }

    fn values(var: &Var) -> Vec<f64> {
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn adamw_matches_a_hand_computation() {
        let vm = varmap_with(&[
            ("a.weight", vec![1.0, -2.0, 0.5, 3.0], &[2, 2]),
            ("a.bias", vec![0.25, -0.75], &[2]),
        ]);
        let cfg = OptimizerConfig {
            beta1: 0.8,
            beta2: 0.9,
            eps: 1e-3,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&vm, &cfg).unwrap();
        assert_eq!(opt.vars()[0].0, "a.bias", "sorted by name");
        let gw = [0.5, -1.0, 2.0, 0.0];
        let gb = [1.0, -3.0];
        let g =
            |v: &[f64], dims: &[usize]| Some(Tensor::from_slice(v, dims, &Device::Cpu).unwrap());
        let lr = 0.01;

        // By hand, two steps of the same gradient.
        let by_hand = |theta0: &[f64], grad: &[f64], decay: bool| -> Vec<f64> {
            let (mut theta, mut m, mut v) = (
                theta0.to_vec(),
                vec![0.0; grad.len()],
                vec![0.0; grad.len()],
            );
            for t in 1..=2 {
                for i in 0..grad.len() {
                    if decay {
                        theta[i] *= 1.0 - lr * 0.1;
                    }
                    m[i] = 0.8 * m[i] + 0.2 * grad[i];
                    v[i] = 0.9 * v[i] + 0.1 * grad[i] * grad[i];
                    let mh = m[i] / (1.0 - 0.8f64.powi(t));
                    let vh = v[i] / (1.0 - 0.9f64.powi(t));
                    theta[i] -= lr * mh / (vh.sqrt() + 1e-3);
                }
            }
            theta
        };
        for _ in 0..2 {
            opt.step(&Grads(vec![g(&gb, &[2]), g(&gw, &[2, 2])]), lr)
                .unwrap();
        }
        let want_w = by_hand(&[1.0, -2.0, 0.5, 3.0], &gw, true);
        let want_b = by_hand(&[0.25, -0.75], &gb, false);
        for (got, want) in [
            (values(&opt.vars()[1].1), want_w),
            (values(&opt.vars()[0].1), want_b),
        ] {
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{got:?} vs {want:?}");
            }
        }
        assert_eq!(opt.steps_taken(), 2);

        // A variable without a gradient stays put.
        let before = values(&opt.vars()[0].1);
        opt.step(&Grads(vec![None, g(&gw, &[2, 2])]), lr).unwrap();
        assert_eq!(values(&opt.vars()[0].1), before);
    }

    #[test]
    fn state_round_trip_and_mismatches() {
        let vm = varmap_with(&[("w", vec![1.0, 2.0], &[2])]);
        let mut opt = AdamW::new(&vm, &OptimizerConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f64, -0.5], &Device::Cpu).unwrap();
        opt.step(&Grads(vec![Some(g)]), 0.1).unwrap();
        let state: HashMap<_, _> = opt.state_tensors().into_iter().collect();
        let mut other = AdamW::new(&vm, &OptimizerConfig::default()).unwrap();
        other.load_state(state.clone(), 1).unwrap();
        assert_eq!(other.steps_taken(), 1);
        assert_eq!(
            other.m[0].to_vec1::<f64>().unwrap(),
            opt.m[0].to_vec1::<f64>().unwrap()
        );
        // The step updates moments in place: saved and restored state is nobody's buffer.
        let saved = state["m.w"].to_vec1::<f64>().unwrap();
        let g = Grads(vec![Some(
            Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap(),
        )]);
        other.step(&g, 0.1).unwrap();
        opt.step(&g, 0.1).unwrap();
        assert_eq!(state["m.w"].to_vec1::<f64>().unwrap(), saved);
        assert_ne!(other.m[0].to_vec1::<f64>().unwrap(), saved);
        assert_ne!(
            other.m[0].to_vec1::<f64>().unwrap(),
            other.v[0].to_vec1::<f64>().unwrap()
        );

        let mut missing = state.clone();
        missing.remove("v.w");
        assert!(other.load_state(missing, 1).unwrap_err().contains("`v.w`"));
        let mut wrong = state.clone();
        wrong.insert(
            "m.w".into(),
            Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
        );
        let e = other.load_state(wrong, 1).unwrap_err();
        assert!(e.contains("`m.w`") && e.contains("[3]"), "{e}");
        let mut extra = state;
        extra.insert(
            "m.x".into(),
            Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
        );
        assert!(other.load_state(extra, 1).unwrap_err().contains("`m.x`"));
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let t = |v: &[f64]| Some(Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap());
        // Norm √(9 + 16 + 144) = 13.
        let mut g = Grads(vec![t(&[3.0, 4.0]), None, t(&[12.0])]);
        assert_eq!(g.clip(0.0).unwrap(), 13.0);
        assert_eq!(g.global_norm().unwrap(), 13.0, "0 = no clipping");
        assert_eq!(g.clip(26.0).unwrap(), 13.0);
        assert_eq!(g.global_norm().unwrap(), 13.0, "below the limit: unchanged");
        assert_eq!(g.clip(1.3).unwrap(), 13.0);
        assert!((g.global_norm().unwrap() - 1.3).abs() < 1e-6);
        let first = g.0[0].as_ref().unwrap().to_vec1::<f64>().unwrap();
        assert!((first[0] / first[1] - 0.75).abs() < 1e-12, "direction kept");
    }

    #[test]
    fn accumulation_sums() {
        let t = |v: f64| Some(Tensor::new(&[v], &Device::Cpu).unwrap());
        let mut acc = Grads::default();
        acc.accumulate(Grads(vec![t(1.0), None])).unwrap();
        acc.accumulate(Grads(vec![t(2.5), t(4.0)])).unwrap();
        let got: Vec<f64> = acc
            .0
            .iter()
            .map(|g| g.as_ref().unwrap().to_vec1::<f64>().unwrap()[0])
            .collect();
        assert_eq!(got, [3.5, 4.0]);
    }

    #[test]
    fn schedule_values() {
        let cfg = OptimizerConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            ..Default::default()
        };
        // Warm-up: 1/4, 2/4, 3/4, 1; then cosine over steps 4..=14 (span 10).
        let lrs: Vec<f64> = (0..16).map(|s| cfg.lr_at(s, 15)).collect();
        assert_eq!(&lrs[..5], &[0.25, 0.5, 0.75, 1.0, 1.0]);
        assert!(
            (lrs[9] - 0.55).abs() < 1e-12,
            "half way: the mean of peak and floor"
        );
        assert!((lrs[14] - 0.1).abs() < 1e-12);
        assert!((lrs[15] - 0.1).abs() < 1e-12, "past the end: the floor");
        let linear = OptimizerConfig {
            decay: Decay::Linear,
            ..cfg.clone()
        };
        assert!((linear.lr_at(6, 15) - (1.0 - 0.9 * 0.2)).abs() < 1e-12);
        let constant = OptimizerConfig {
            decay: Decay::Constant,
            ..cfg.clone()
        };
        assert_eq!(constant.lr_at(14, 15), 1.0);
        // No warm-up, one step: the peak... then the floor.
        let one = OptimizerConfig {
            warmup_steps: 0,
            ..cfg
        };
        assert_eq!(one.lr_at(0, 10), 1.0);
        assert!((one.lr_at(9, 10) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn validation_names_the_setting() {
        for (edit, setting) in [
            (
                OptimizerConfig {
                    lr: 0.0,
                    ..Default::default()
                },
                "optimizer.lr",
            ),
            (
                OptimizerConfig {
                    beta2: 1.0,
                    ..Default::default()
                },
                "optimizer.beta2",
            ),
            (
                OptimizerConfig {
                    accumulation: 0,
                    ..Default::default()
                },
                "optimizer.accumulation",
            ),
            (
                OptimizerConfig {
                    min_lr: 1.0,
                    ..Default::default()
                },
                "optimizer.min_lr",
            ),
            (
                OptimizerConfig {
                    grad_clip_norm: f64::NAN,
                    ..Default::default()
                },
                "optimizer.grad_clip_norm",
            ),
        ] {
            let e = edit.validate().unwrap_err().to_string();
            assert!(e.contains(setting), "{e}");
        }
    }
}
