//! The multiformer: per-field embeddings, coupled encoder layers, per-field decoders and tails.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{ModelConfig, Prior};
use crate::decoder::{DecoderAttention, DecoderLayer};
use crate::embed::{TOKEN_INFO_LEN, TokenEmbedding};
use crate::encoder::{EncoderAttention, EncoderLayer};
use crate::error::{Result, input_err};
use crate::init::initialize;
use crate::tail::Tail;

/// One field's part of a batch, as the loader sends it (see `atmorep_proto::batch::FieldBatch`).
#[derive(Debug, Clone)]
pub struct FieldInput {
    /// `[B, T, V]`: the token values after masking.
    pub source: Tensor,
    /// `[B, T, 8]`: raw token info.
    pub token_info: Tensor,
    /// `[B, T, W]`: positional encoding.
    pub pe: Tensor,
    /// What the tail's output corrects under [`crate::config::Prior::Temporal`]
    /// ([`crate::batch::temporal_prior`] of the visible values); `None` otherwise.
    pub prior: Option<PriorInput>,
}

/// A field's temporal prior as the model takes it.
#[derive(Debug, Clone)]
pub struct PriorInput {
    /// `[B, T, V]`: the prior's values.
    pub values: Tensor,
    /// `[B, T, V, K]`: one-hot, how each value's prior was made
    /// ([`crate::batch::PREDICTED_PRIOR_KINDS`]); all zero for visible values.
    pub kind: Tensor,
}

/// Every attention map of one forward pass, indexed `[layer][field]`.
#[derive(Debug, Clone, Default)]
pub struct AttentionMaps {
    pub encoder: Vec<Vec<EncoderAttention>>,
    pub decoder: Vec<Vec<DecoderAttention>>,
}

/// The AtmoRep-style multiformer. Variables live under `embed.<field>`, `encoder.<layer>.<field>`,
/// `decoder.<layer>.<field>` and `tail.<field>`.
#[derive(Debug, Clone)]
pub struct MultiFormer {
    cfg: ModelConfig,
    dtype: DType,
    embeds: Vec<TokenEmbedding>,
    encoder: Vec<EncoderLayer>,
    /// `[layer][field]`.
    decoder: Vec<Vec<DecoderLayer>>,
    tails: Vec<Tail>,
}

impl MultiFormer {
    /// Builds the model (validating `cfg`) with variables from `vb`: a checkpoint, or a `VarMap`
    /// that [`crate::init::initialize`] fills afterwards.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let embeds = cfg
            .fields
            .iter()
            .map(|f| TokenEmbedding::new(vb.pp("embed").pp(&f.name), f, cfg))
            .collect::<candle_core::Result<_>>()?;
        let encoder = (0..cfg.encoder_layers)
            .map(|l| EncoderLayer::new(vb.pp("encoder").pp(l), cfg))
            .collect::<candle_core::Result<_>>()?;
        let decoder = (0..cfg.decoder_layers)
            .map(|l| {
                cfg.fields
                    .iter()
                    .map(|f| DecoderLayer::new(vb.pp("decoder").pp(l).pp(&f.name), cfg))
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<_>>()?;
        let tails = cfg
            .fields
            .iter()
            .map(|f| Tail::new(vb.pp("tail").pp(&f.name), f, cfg))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            embeds,
            encoder,
            decoder,
            tails,
        })
    }

    /// A fresh model with its variables in a new `VarMap`, initialized from `seed`.
    pub fn seeded(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let model = Self::new(VarBuilder::from_varmap(&varmap, dtype, device), cfg)?;
        initialize(&varmap, seed)?;
        Ok((model, varmap))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Field `f`'s `[K]` RMS error of each kind of temporal prior (see
    /// [`crate::tail::PRIOR_ERROR`]); `None` without a temporal prior.
    pub fn prior_error(&self, f: usize) -> Option<&Tensor> {
        self.tails.get(f)?.prior_error()
    }

    /// Per field, the predictions `[B, T, E, V]`.
    pub fn forward(&self, inputs: &[FieldInput]) -> Result<Vec<Tensor>> {
        Ok(self.run(inputs, false)?.0)
    }

    /// Per field, the predictions `[B, T, E, V]`, and every attention map.
    pub fn forward_with_attention(
        &self,
        inputs: &[FieldInput],
    ) -> Result<(Vec<Tensor>, AttentionMaps)> {
        let (preds, maps) = self.run(inputs, true)?;
        Ok((preds, maps.expect("asked for")))
    }

    /// Per field, the last encoder layer's output for each token, `[B, T, D]` (without the
    /// class token of [`crate::AuxInfo::ClassToken`]): the embeddings `atmorep embed` exports.
    pub fn encode(&self, inputs: &[FieldInput]) -> Result<Vec<Tensor>> {
        let (encoder_outputs, _, _) = self.run_encoder(inputs, false)?;
        let last = encoder_outputs
            .last()
            .expect("a validated config has encoder layers");
        let extra = self.cfg.aux_info.extra_tokens();
        Ok(last
            .iter()
            .zip(&self.cfg.fields)
            .map(|(x, spec)| x.narrow(1, extra, spec.num_tokens))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Embedding and encoder: every encoder layer's per-field outputs, the per-field info
    /// embeddings, and the encoder's attention maps when `want`.
    #[allow(clippy::type_complexity)]
    fn run_encoder(
        &self,
        inputs: &[FieldInput],
        want: bool,
    ) -> Result<(Vec<Vec<Tensor>>, Vec<Option<Tensor>>, Option<AttentionMaps>)> {
        self.check_inputs(inputs)?;
        let mut xs = Vec::with_capacity(inputs.len());
        let mut infos = Vec::with_capacity(inputs.len());
        for (embed, input) in self.embeds.iter().zip(inputs) {
            // Under a temporal prior the model sees the prior: a visible value is its own prior,
            // and a hidden token shows its first guess instead of a mask value or noise.
            let e = match (&self.cfg.prior, &input.prior) {
                (Prior::Temporal, Some(prior)) => embed.forward(
                    &prior.values,
                    &input.token_info,
                    &input.pe,
                    Some(&prior.kind.mean(2)?),
                )?,
                _ => embed.forward(&input.source, &input.token_info, &input.pe, None)?,
            };
            xs.push(e.tokens);
            infos.push(e.info);
        }
        let mut maps = want.then(AttentionMaps::default);
        let mut encoder_outputs = Vec::with_capacity(self.encoder.len());
        for layer in &self.encoder {
            let (next, w) = layer.forward(&xs, &infos, want)?;
            xs = next;
            encoder_outputs.push(xs.clone());
            if let (Some(m), Some(w)) = (maps.as_mut(), w) {
                m.encoder.push(w);
            }
        }
        Ok((encoder_outputs, infos, maps))
    }

    fn run(
        &self,
        inputs: &[FieldInput],
        want: bool,
    ) -> Result<(Vec<Tensor>, Option<AttentionMaps>)> {
        let (encoder_outputs, infos, mut maps) = self.run_encoder(inputs, want)?;
        let mut xs = encoder_outputs.last().cloned().unwrap_or_default();
        // The decoder reads the encoder's layers in reverse, as AtmoRep does (a U-Net-like
        // skip: early decoder layers see the most-mixed features, later ones less-mixed ones).
        for (l, layer) in self.decoder.iter().enumerate() {
            let memory = &encoder_outputs[encoder_outputs.len().saturating_sub(l + 1)];
            let mut layer_maps = Vec::with_capacity(xs.len());
            for (f, field_layer) in layer.iter().enumerate() {
                let (y, w) = field_layer.forward(&xs[f], &memory[f], infos[f].as_ref(), want)?;
                xs[f] = y;
                layer_maps.extend(w);
            }
            if let Some(m) = maps.as_mut() {
                m.decoder.push(layer_maps);
            }
        }
        let extra = self.cfg.aux_info.extra_tokens();
        let preds = xs
            .iter()
            .zip(&self.tails)
            .zip(&self.cfg.fields)
            .zip(inputs)
            .map(|(((x, tail), spec), input)| {
                let x = x.narrow(1, extra, spec.num_tokens)?;
                match self.cfg.prior {
                    Prior::None => tail.forward(&x),
                    Prior::Temporal => tail.forward_with_prior(
                        &x,
                        input.prior.as_ref().expect("checked by check_inputs"),
                    ),
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Ok((preds, maps))
    }

    fn check_inputs(&self, inputs: &[FieldInput]) -> Result<()> {
        let fields = &self.cfg.fields;
        if inputs.len() != fields.len() {
            return Err(input_err(
                "fields",
                format!(
                    "the model has {} fields, got {} inputs",
                    fields.len(),
                    inputs.len()
                ),
            ));
        }
        let batch = inputs[0].source.dims().first().copied().unwrap_or(0);
        for (spec, input) in fields.iter().zip(inputs) {
            let t = spec.num_tokens;
            for (what, tensor, want) in [
                ("source", &input.source, [batch, t, spec.token_numel]),
                ("token_info", &input.token_info, [batch, t, TOKEN_INFO_LEN]),
                ("pe", &input.pe, [batch, t, spec.pe_width]),
            ] {
                if tensor.dims() != want {
                    return Err(input_err(
                        format!("{}.{what}", spec.name),
                        format!("expected shape {want:?}, got {:?}", tensor.dims()),
                    ));
                }
                if tensor.dtype() != self.dtype {
                    return Err(input_err(
                        format!("{}.{what}", spec.name),
                        format!(
                            "dtype {:?} but the model is {:?}",
                            tensor.dtype(),
                            self.dtype
                        ),
                    ));
                }
            }
            if self.cfg.prior == Prior::Temporal {
                let prior = input.prior.as_ref().ok_or_else(|| {
                    input_err(
                        format!("{}.prior", spec.name),
                        "the model adds its output to a temporal prior; the input has none",
                    )
                })?;
                let mut kind_dims = input.source.dims().to_vec();
                kind_dims.push(crate::batch::PREDICTED_PRIOR_KINDS.len());
                for (what, tensor, want) in [
                    ("values", &prior.values, input.source.dims()),
                    ("kind", &prior.kind, kind_dims.as_slice()),
                ] {
                    if tensor.dims() != want || tensor.dtype() != self.dtype {
                        return Err(input_err(
                            format!("{}.prior.{what}", spec.name),
                            format!(
                                "{:?} of {:?}, expected {want:?} of {:?}",
                                tensor.dims(),
                                tensor.dtype(),
                                self.dtype
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
