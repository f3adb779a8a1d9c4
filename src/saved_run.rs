//! What the commands that use a trained model (`eval`, `infer`, `embed`, `plot`) share: a
//! checkpoint loaded into a trainer, a client of the loaders, and a time split named on the
//! command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_proto::request::SplitName;
use atmorep_trainer::{Device, Trainer, checkpoint};

/// A checkpoint (a checkpoint folder, or a run folder's latest) with the trainer it restores.
pub struct SavedRun {
    pub dir: PathBuf,
    pub step: u64,
    pub trainer: Trainer,
}

impl SavedRun {
    pub fn load(path: &Path) -> Result<Self> {
        let ckpt = checkpoint::load(path, &Device::Cpu)?;
        let (dir, step) = (ckpt.dir.clone(), ckpt.step);
        let trainer = Trainer::from_checkpoint(ckpt, None)?;
        Ok(Self { dir, step, trainer })
    }
}

/// A client of `loader` (endpoints to fail over between), with an optional bearer token.
pub async fn connect(loader: &[String], token: Option<&str>) -> Result<LoaderClient> {
    let mut config = ClientConfig::new(loader.to_vec());
    config.bearer_token = token.map(str::to_string);
    Ok(LoaderClient::connect(config).await?)
}

/// `--split` as the request names it.
pub fn parse_split(text: &str) -> Result<SplitName> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .with_context(|| format!("--split: `{text}` is not one of train, validation, test"))
}
