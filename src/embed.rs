//! `atmorep embed`: exports the encoder's embedding of every token of a split's samples (and
//! the tokens' 8-float info) as a Zarr store, for analysis outside the trainer (probing,
//! clustering, nearest neighbours).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use atmorep_loader::store::writer::{DenseArray, write_arrays};
use atmorep_proto::MaskConfig;
use atmorep_trainer::{DType, DeviceSpec, FieldInput, batch_tensors};
use clap::Args;
use serde_json::json;

use crate::saved_run::{SavedRun, connect, parse_split};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    ckpt: PathBuf,
    /// Loader endpoint(s), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    loader: Vec<String>,
    /// The Zarr store to write: per field `FIELD_embedding` [sample, token, channel] and
    /// `FIELD_token_info` [sample, token, 8].
    #[arg(long)]
    out: PathBuf,
    /// The time split the samples come from: train, validation or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Samples at most (the first ones of the split's first epoch).
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Bearer token for the loaders.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the model computes: `cpu`, or `cuda` (GPU 0) / `cuda:N` in a build with the `cuda`
    /// feature.
    #[arg(long, env = "ATMOREP_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
}

pub async fn embed(args: EmbedArgs) -> Result<PathBuf> {
    let split = parse_split(&args.split)?;
    if args.samples == 0 {
        bail!("--samples: at least 1");
    }
    let SavedRun { dir, trainer, .. } = crate::eval::load_on(&args.ckpt, args.device)?;
    let (model, config, device) = (trainer.model(), trainer.config(), trainer.device());
    let client = connect(&args.loader, args.token.as_deref()).await?;
    // Unmasked samples: the embedding of what the model sees when nothing is hidden.
    let mut request = config.request.clone();
    for f in &mut request.fields {
        f.mask = MaskConfig::None;
    }
    request.split = split;
    request.resume = None;
    request.end_epoch = Some(1);
    let fields = &model.config().fields;
    let d = model.config().d_model;
    let mut embeddings: Vec<Vec<f32>> = vec![Vec::new(); fields.len()];
    let mut infos: Vec<Vec<f32>> = vec![Vec::new(); fields.len()];
    let mut ids: Vec<u64> = Vec::new();
    let bar = indicatif::ProgressBar::new(args.samples as u64);
    let mut stream = client.stream(request.to_proto());
    while ids.len() < args.samples {
        let Some(batch) = stream.next().await else {
            break;
        };
        let batch = batch.with_context(|| format!("the {} split", args.split))?;
        if batch.is_empty() {
            if batch.end_of_stream {
                break;
            }
            continue;
        }
        let take = batch.len().min(args.samples - ids.len());
        let tensors = batch_tensors(&batch, model.config(), DType::F32, device)?;
        let inputs: Vec<FieldInput> = tensors.iter().map(|f| f.input.clone()).collect();
        let out = model.encode(&inputs)?;
        for (k, (e, spec)) in out.iter().zip(fields).enumerate() {
            let values = e.narrow(0, 0, take)?.flatten_all()?.to_vec1::<f32>()?;
            embeddings[k].extend(values);
            let fb = batch.field(&spec.name).expect("batch_tensors found it");
            infos[k].extend_from_slice(
                &fb.token_info[..take * spec.num_tokens * atmorep_proto::TOKEN_INFO_LEN],
            );
        }
        ids.extend(&batch.sample_ids[..take]);
        bar.inc(take as u64);
        if batch.end_of_stream {
            break;
        }
    }
    bar.finish_and_clear();
    if ids.is_empty() {
        bail!("the {} split of the loader sent no samples", args.split);
    }
    let s = ids.len() as u64;
    let mut arrays = Vec::new();
    for ((spec, e), info) in fields.iter().zip(embeddings).zip(infos) {
        let n = spec.num_tokens as u64;
        let attributes = |what: &str| {
            let mut a = serde_json::Map::new();
            a.insert("field".into(), json!(spec.name));
            a.insert("long_name".into(), json!(what));
            a.insert("sample_ids".into(), json!(ids));
            a
        };
        arrays.push(DenseArray {
            name: format!("{}_embedding", spec.name),
            dims: vec!["sample".into(), "token".into(), "channel".into()],
            shape: vec![s, n, d as u64],
            data: e,
            attributes: attributes("last encoder layer output per token"),
        });
        arrays.push(DenseArray {
            name: format!("{}_token_info", spec.name),
            dims: vec!["sample".into(), "token".into(), "info".into()],
            shape: vec![s, n, atmorep_proto::TOKEN_INFO_LEN as u64],
            data: info,
            attributes: attributes(
                "year, day of year, hour, level, lat, lon, time step (h), grid spacing (deg)",
            ),
        });
    }
    let out = write_arrays(
        &args.out,
        &arrays,
        &format!("atmorep-rs token embeddings of {}", dir.display()),
    )?;
    println!(
        "{s} samples × {} fields × D = {d} → {}",
        fields.len(),
        out.display()
    );
    Ok(out)
}
