//! Whole-model tests on tiny configs: gradients, shapes, attention maps, determinism,
//! overfitting one batch.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::config::{AuxInfo, Prior};
use crate::loss::{masked_crps, masked_mse};

/// A synthetic batch: inputs, per field the targets `[M, V]` and the masked indices.
struct Batch {
    inputs: Vec<FieldInput>,
    targets: Vec<Tensor>,
    masked: Vec<Vec<Vec<u32>>>,
}

fn tensor(rng: &mut ChaCha8Rng, dims: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Token info with plausible raw values (years, days, levels, degrees).
fn token_info(rng: &mut ChaCha8Rng, b: usize, t: usize, dtype: DType) -> Tensor {
    let ranges = [
        (1979.0, 2023.0),
        (0.0, 365.0),
        (0.0, 24.0),
        (100.0, 1000.0),
        (-90.0, 90.0),
        (0.0, 360.0),
        (1.0, 6.0),
        (0.25, 1.0),
    ];
    let v: Vec<f64> = (0..b * t)
        .flat_map(|_| ranges.map(|(lo, hi)| rng.random_range(lo..hi)))
        .collect();
    Tensor::from_vec(v, (b, t, 8), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn batch(cfg: &ModelConfig, b: usize, seed: u64, dtype: DType) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Batch {
        inputs: vec![],
        targets: vec![],
        masked: vec![],
    };
    for f in &cfg.fields {
        let (t, v) = (f.num_tokens, f.token_numel);
        // A quarter of the tokens of each sample, at least one.
        let masked: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                let mut idx: Vec<u32> = (0..t as u32).filter(|_| rng.random_bool(0.25)).collect();
                if idx.is_empty() {
                    idx.push(rng.random_range(0..t as u32));
                }
                idx
            })
            .collect();
        let mut masked = masked;
        if cfg.prior == Prior::Temporal {
            // Every time token of one grid column of sample 0 (tokens 0, 2, 4, 6 of
            // `with_temporal_prior`'s grid): values whose prior is the climatology.
            masked[0].extend([0, 2, 4, 6]);
            masked[0].sort_unstable();
            masked[0].dedup();
        }
        let m: usize = masked.iter().map(Vec::len).sum();
        let source = tensor(&mut rng, &[b, t, v], -2.0, 2.0, dtype);
        let prior = match (cfg.prior, &f.grid) {
            (Prior::Temporal, Some(grid)) => {
                let values: Vec<f32> = source
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let hidden = |i: usize, k: usize| masked[i].contains(&(k as u32));
                let p = crate::batch::temporal_prior(&values, [b, t, v], grid, hidden);
                Some(p.to_input([b, t, v], dtype, &Device::Cpu).unwrap())
            }
            _ => None,
        };
        out.inputs.push(FieldInput {
            source,
            token_info: token_info(&mut rng, b, t, dtype),
            pe: tensor(&mut rng, &[b, t, f.pe_width], -1.0, 1.0, dtype),
            prior,
        });
        out.targets
            .push(tensor(&mut rng, &[m, v], -2.0, 2.0, dtype));
        out.masked.push(masked);
    }
    out
}

/// Sum over fields of masked MSE, plus masked CRPS when the model has an ensemble.
fn loss(model: &MultiFormer, b: &Batch) -> Tensor {
    let preds = model.forward(&b.inputs).unwrap();
    let mut total: Option<Tensor> = None;
    for (f, p) in preds.iter().enumerate() {
        let mut l = masked_mse(p, &b.targets[f], &b.masked[f]).unwrap();
        if model.config().ensemble > 1 {
            l = (l + masked_crps(p, &b.targets[f], &b.masked[f]).unwrap()).unwrap();
        }
        total = Some(match total {
            Some(t) => (t + l).unwrap(),
            None => l,
        });
    }
    total.unwrap()
}

fn tiny(aux: AuxInfo) -> ModelConfig {
    ModelConfig {
        aux_info: aux,
        ..ModelConfig::tiny()
    }
}

/// `cfg` (tiny fields of 16 tokens of 12 values, here 2 levels × 4×1×2 tokens of 1×3×4
/// points, so hidden tokens fall between visible ones) with the temporal prior.
fn with_temporal_prior(cfg: ModelConfig) -> ModelConfig {
    let cfg = cfg.with_temporal_prior([4, 1, 2]);
    cfg.validate().unwrap();
    cfg
}

fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn every_variable_gets_a_gradient_for_every_aux_variant() {
    let variants = AuxInfo::ALL.map(|aux| (aux, Prior::None));
    for (aux, prior) in variants
        .into_iter()
        .chain([(AuxInfo::Concat, Prior::Temporal)])
    {
        // Two layers each so that the decoder's reversed skip reads a non-final encoder layer,
        // and an ensemble so the CRPS path is exercised too.
        // 4 heads, 1 crossing: head slices on both sides of the split, strided over batch 2.
        let mut cfg = ModelConfig {
            num_heads: 4,
            encoder_layers: 2,
            decoder_layers: 2,
            ensemble: 2,
            ..tiny(aux)
        };
        if prior == Prior::Temporal {
            cfg = with_temporal_prior(cfg);
        }
        let (model, vm) = MultiFormer::seeded(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let b = batch(&cfg, 2, 2, DType::F32);
        let l = loss(&model, &b);
        assert!(l.to_scalar::<f32>().unwrap().is_finite());
        let grads = l.backward().unwrap();
        let vars = sorted_vars(&vm);
        assert!(vars.len() > 20, "{aux}: only {} vars", vars.len());
        for (name, var) in vars {
            if !crate::optim::is_trainable(&name) {
                // A statistic the forward pass detaches.
                assert!(grads.get(&var).is_none(), "{aux}: `{name}` has a gradient");
                continue;
            }
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("{aux}: `{name}` has no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{aux}: `{name}` has a non-finite gradient"
            );
            let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 0.0, "{aux}: `{name}` has a zero gradient");
        }
    }
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    for (aux, ensemble) in [
        (AuxInfo::Concat, 1),
        (AuxInfo::ClassToken, 3),
        (AuxInfo::Reappend, 1),
        (AuxInfo::ProjectBeforeAppend, 2),
    ] {
        let cfg = ModelConfig {
            ensemble,
            ..tiny(aux)
        };
        let (model, vm) = MultiFormer::seeded(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let b = batch(&cfg, 2, 8, DType::F64);
        let grads = loss(&model, &b).backward().unwrap();
        let vars = sorted_vars(&vm);
        let mut checked = 0;
        for (name, var) in &vars {
            // A sample of every kind of variable, each at its largest gradient component.
            let wanted = [
                "embed.t.values.weight",
                "embed.z.pe.weight",
                "encoder.0.t.attn.qkv.weight",
                "encoder.0.z.ln1.weight",
                "encoder.0.t.mlp.fc1.bias",
                "decoder.0.z.cross_attn.kv.weight",
                "decoder.0.t.ln_memory.bias",
                "tail.t.proj.weight",
                "embed.t.class_token",
                "embed.z.info.weight",
                "encoder.0.t.reappend.weight",
                "decoder.0.z.reappend_cross.weight",
                "embed.t.info_out.weight",
            ];
            if !wanted.contains(&name.as_str()) {
                continue;
            }
            let g: Vec<f64> = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (i, &analytic) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model, &b).to_scalar::<f64>().unwrap()
            };
            let h = 1e-5;
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            eval(0.0);
            let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs());
            assert!(
                rel < 1e-6,
                "{aux}: `{name}`[{i}]: analytic {analytic:e}, numeric {numeric:e} (rel {rel:e})"
            );
            eprintln!("{aux}: `{name}`[{i}]: analytic {analytic:e}, rel err {rel:e}");
            checked += 1;
        }
        assert!(checked >= 8, "{aux}: only {checked} variables checked");
    }
}

#[test]
fn output_shapes_for_every_variant_and_pe_width() {
    for aux in AuxInfo::ALL {
        for pe_width in [8, 32] {
            let mut cfg = ModelConfig {
                ensemble: 3,
                ..tiny(aux)
            };
            // Fields of different sizes: nothing may assume they agree.
            cfg.fields[1].num_tokens = 10;
            cfg.fields[1].token_numel = 5;
            for f in &mut cfg.fields {
                f.pe_width = pe_width;
            }
            let (model, vm) = MultiFormer::seeded(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
            let has_pe_proj = sorted_vars(&vm).iter().any(|(n, _)| n.contains(".pe."));
            assert_eq!(has_pe_proj, pe_width != cfg.d_model, "{aux} {pe_width}");
            let b = batch(&cfg, 3, 4, DType::F32);
            let preds = model.forward(&b.inputs).unwrap();
            assert_eq!(preds[0].dims(), &[3, 16, 3, 12], "{aux} {pe_width}");
            assert_eq!(preds[1].dims(), &[3, 10, 3, 5], "{aux} {pe_width}");
            // Embeddings: one D-vector per token, class token dropped; they depend on the other
            // field's input through the cross-field heads.
            let emb = model.encode(&b.inputs).unwrap();
            assert_eq!(emb[0].dims(), &[3, 16, cfg.d_model], "{aux}");
            assert_eq!(emb[1].dims(), &[3, 10, cfg.d_model], "{aux}");
            let mut other = b.inputs.clone();
            other[1].source = (other[1].source.clone() + 1.0).unwrap();
            let moved = (model.encode(&other).unwrap()[0].clone() - &emb[0])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(moved > 0.0, "{aux}");
        }
    }
}

fn assert_weights(w: &Tensor, dims: &[usize], what: &str) {
    assert_eq!(w.dims(), dims, "{what}");
    let sums: Vec<f32> = w.sum(3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for s in sums {
        assert!((s - 1.0).abs() < 1e-5, "{what}: a row sums to {s}");
    }
}

#[test]
fn attention_maps_have_shapes_and_rows_sum_to_one() {
    // (variant, heads, cross heads): several heads on both sides of the split, with batch > 1,
    // catch head slices that are strided over the batch.
    for (aux, heads, cross) in [
        (AuxInfo::Concat, 2, 1),
        (AuxInfo::ClassToken, 4, 1),
        (AuxInfo::ProjectBeforeAppend, 8, 3),
        (AuxInfo::None, 2, 0),
        (AuxInfo::Reappend, 2, 2),
    ] {
        let mut cfg = ModelConfig {
            num_heads: heads,
            cross_heads: cross,
            encoder_layers: 2,
            decoder_layers: 3,
            ..tiny(aux)
        };
        cfg.fields[1].num_tokens = 10;
        let (model, _) = MultiFormer::seeded(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
        let b = batch(&cfg, 2, 6, DType::F32);
        let (preds, maps) = model.forward_with_attention(&b.inputs).unwrap();
        // Weights do not change the predictions.
        let plain = model.forward(&b.inputs).unwrap();
        for (p, q) in preds.iter().zip(&plain) {
            let d: f32 = (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0);
        }
        let extra = aux.extra_tokens();
        let t = [16 + extra, 10 + extra];
        let all: usize = t.iter().sum();
        let (h, hw) = (cfg.num_heads, cfg.num_heads - cross);
        assert_eq!(maps.encoder.len(), 2);
        assert_eq!(maps.decoder.len(), 3);
        for (l, layer) in maps.encoder.iter().enumerate() {
            assert_eq!(layer.len(), 2);
            for (f, m) in layer.iter().enumerate() {
                let what = format!("{aux} encoder {l} field {f}");
                match &m.within {
                    Some(w) => assert_weights(w, &[2, hw, t[f], t[f]], &what),
                    None => assert_eq!(hw, 0, "{what}"),
                }
                match &m.across {
                    Some(w) => assert_weights(w, &[2, cross, t[f], all], &what),
                    None => assert_eq!(cross, 0, "{what}"),
                }
            }
        }
        for (l, layer) in maps.decoder.iter().enumerate() {
            for (f, m) in layer.iter().enumerate() {
                let what = format!("{aux} decoder {l} field {f}");
                assert_weights(&m.self_attn, &[2, h, t[f], t[f]], &what);
                assert_weights(&m.cross_attn, &[2, h, t[f], t[f]], &what);
            }
        }
    }
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let cfg = tiny(AuxInfo::ClassToken);
    let weights = |seed| {
        let (_, vm) = MultiFormer::seeded(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
        sorted_vars(&vm)
            .into_iter()
            .map(|(n, v)| {
                let bits: Vec<u32> = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect();
                (n, bits)
            })
            .collect::<Vec<_>>()
    };
    let a = weights(11);
    assert_eq!(a, weights(11));
    let b = weights(12);
    assert_eq!(a.len(), b.len());
    let differing = a.iter().zip(&b).filter(|(x, y)| x.1 != y.1).count();
    // Everything random differs; zeros and ones (biases, norms) agree.
    assert!(differing > a.len() / 3, "{differing} of {}", a.len());
}

#[test]
fn bad_inputs_name_the_field_and_bad_configs_are_refused() {
    let cfg = ModelConfig::tiny();
    let (model, _) = MultiFormer::seeded(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let mut b = batch(&cfg, 2, 1, DType::F32);
    b.inputs[1].pe = Tensor::zeros((2, 16, 9), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&b.inputs).unwrap_err().to_string();
    assert!(err.contains("z.pe") && err.contains("[2, 16, 8]"), "{err}");
    b.inputs.pop();
    let err = model.forward(&b.inputs).unwrap_err().to_string();
    assert!(err.contains("2 fields"), "{err}");
    let b = batch(&cfg, 2, 1, DType::F64);
    let err = model.forward(&b.inputs).unwrap_err().to_string();
    assert!(err.contains("t.source") && err.contains("F64"), "{err}");

    let bad = ModelConfig {
        cross_heads: 3,
        ..cfg
    };
    let Err(err) = MultiFormer::seeded(&bad, 1, DType::F32, &Device::Cpu) else {
        panic!("an impossible config was accepted");
    };
    assert!(err.to_string().contains("cross_heads"), "{err}");
}

#[test]
fn tiny_model_overfits_one_batch() {
    let cfg = ModelConfig::tiny();
    let (model, vm) = MultiFormer::seeded(&cfg, 21, DType::F32, &Device::Cpu).unwrap();
    let b = batch(&cfg, 2, 22, DType::F32);
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let first = loss(&model, &b).to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..200 {
        let l = loss(&model, &b);
        last = l.to_scalar::<f32>().unwrap();
        opt.backward_step(&l).unwrap();
    }
    eprintln!("overfit: loss {first} → {last}");
    assert!(
        last < first / 10.0,
        "loss fell only from {first} to {last} in 200 steps"
    );
}

/// docs/design.md §4's benchmark point on this machine's CPU: one forward + backward + AdamW
/// step at batch 4. Minutes in debug and seconds in release, so only on request:
/// `cargo test -p atmorep-trainer --release bench_mid -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run on request"]
fn bench_mid_training_step_throughput() {
    let cfg = ModelConfig::bench_mid();
    let (model, vm) = MultiFormer::seeded(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    let b = batch(&cfg, 4, 2, DType::F32);
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-4,
            weight_decay: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    let tokens: usize = 4 * cfg.fields.iter().map(|f| f.num_tokens).sum::<usize>();
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let l = loss(&model, &b);
        opt.backward_step(&l).unwrap();
        times.push(start.elapsed().as_secs_f64());
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!(
        "bench-mid: {params} parameters; step times {times:.2?} s; best {:.0} tokens/s",
        tokens as f64 / best
    );
}

#[test]
fn a_temporal_prior_model_predicts_a_scaled_correction_to_the_prior() {
    let cfg = with_temporal_prior(ModelConfig {
        ensemble: 2,
        ..tiny(AuxInfo::Concat)
    });
    let (model, vm) = MultiFormer::seeded(&cfg, 9, DType::F32, &Device::Cpu).unwrap();
    let mut b = batch(&cfg, 2, 3, DType::F32);
    // Sample 0 hides everything (climatology), sample 1 keeps its random mask.
    for (f, input) in b.inputs.iter_mut().enumerate() {
        let values: Vec<f32> = input.source.flatten_all().unwrap().to_vec1().unwrap();
        let masked = &b.masked[f];
        let hidden = |i: usize, k: usize| i == 0 || masked[i].contains(&(k as u32));
        let grid = cfg.fields[f].grid.as_ref().unwrap();
        let p = crate::batch::temporal_prior(&values, [2, 16, 12], grid, hidden);
        input.prior = Some(p.to_input([2, 16, 12], DType::F32, &Device::Cpu).unwrap());
    }
    // Projections with a distinct constant output per kind, and distinct prior errors, so a
    // mix-up of the channels shows: each value moves from its prior by its kind's output times
    // its kind's error, the same for every member.
    let outputs = [0.5f64, -2.0, 3.0];
    let errors = [0.25f32, 2.0, 0.75];
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.ends_with(".prior_error") {
            var.set(&Tensor::new(&errors, &Device::Cpu).unwrap())
                .unwrap();
        }
        if let Some(k) = ["proj_interpolated", "proj_one_sided", "proj_climatology"]
            .iter()
            .position(|p| name.contains(&format!(".{p}.")))
        {
            let fill = if name.ends_with("bias") {
                outputs[k]
            } else {
                0.0
            };
            var.set(&var.ones_like().unwrap().affine(fill, 0.0).unwrap())
                .unwrap();
        }
    }
    let shift: Vec<f32> = (0..3).map(|k| outputs[k] as f32 * errors[k]).collect();
    let preds = model.forward(&b.inputs).unwrap();
    let mut seen = [0usize; 4];
    for (p, input) in preds.iter().zip(&b.inputs) {
        let prior = input.prior.as_ref().unwrap();
        let p: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        let values: Vec<f32> = prior.values.flatten_all().unwrap().to_vec1().unwrap();
        let kind: Vec<f32> = prior.kind.flatten_all().unwrap().to_vec1().unwrap();
        let (v, e) = (12, cfg.ensemble);
        for r in 0..values.len() / v {
            for m in 0..e {
                for j in 0..v {
                    let at = r * v + j;
                    let channel = (0..3).find(|&c| kind[at * 3 + c] == 1.0);
                    seen[channel.map_or(0, |c| c + 1)] += 1;
                    let want = values[at] + channel.map_or(0.0, |c| shift[c]);
                    let got = p[(r * e + m) * v + j];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "row {r} member {m} value {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
    assert!(seen.iter().all(|&n| n > 0), "every kind occurs: {seen:?}");
    // An input without its prior is refused by name.
    let mut inputs = b.inputs.clone();
    inputs[1].prior = None;
    let err = model.forward(&inputs).unwrap_err().to_string();
    assert!(err.contains("z.prior"), "{err}");
}
