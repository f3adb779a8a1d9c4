//! A trainer's state and how it comes to be: a fresh run from a config, or a run resumed from a
//! checkpoint whose weights, moments, loader cursors and task RNG must fit the config; and how
//! that state is saved again, by one process or gathered from every rank of a data-parallel run.

use std::path::{Path, PathBuf};

use atmorep_proto::StreamCursor;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::TrainConfig;
use crate::checkpoint::{self, Checkpoint, CheckpointSnapshot, RngState, TaskCursor};
use crate::collective::{Collective, SingleProcess};
use crate::error::{Error, Result, checkpoint_err, train_config_err};
use crate::model::MultiFormer;
use crate::optim::{AdamW, sorted_vars};

/// A model, its optimizer and everything else a run's state is made of.
pub struct Trainer {
    pub(super) config: TrainConfig,
    pub(super) model: MultiFormer,
    pub(super) varmap: VarMap,
    pub(super) opt: AdamW,
    /// Draws the task of each micro-batch.
    pub(super) rng: ChaCha8Rng,
    /// Per task, the cursor after the last batch consumed.
    pub(super) cursors: Vec<Option<StreamCursor>>,
    pub(super) device: Device,
    pub(super) dtype: DType,
    /// The ranks of a data-parallel run; [`SingleProcess`] alone.
    pub(super) collective: Box<dyn Collective>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `VarMap` has no `Debug`; the variables are listed through the optimizer.
        f.debug_struct("Trainer")
            .field("step", &self.step())
            .field("cursors", &self.cursors)
            .field("model", &self.model)
            .field("opt", &self.opt)
            .field("collective", &self.collective)
            .finish_non_exhaustive()
    }
}

/// The task-choice RNG's stream, apart from the weights' (which use one per variable name).
const TASK_RNG_STREAM: u64 = 0x7461_736b;

impl Trainer {
    /// A fresh run on the CPU: weights from the config's seed, moments at zero, streams at their
    /// start.
    pub fn new(config: TrainConfig) -> Result<Self> {
        Self::new_in(config, Box::new(SingleProcess), &Device::Cpu)
    }

    /// [`Self::new`] on `device`, as one rank of the data-parallel run of `collective` (see the
    /// module docs; [`SingleProcess`] for a run of one process). With more than one rank the
    /// config's request must name the run's layout: `world_size` the collective's, `rank` 0
    /// (each rank streams its own shard of it). The weights are drawn on the host and copied to
    /// `device`, so they start from the same bits on every device.
    pub fn new_in(
        config: TrainConfig,
        collective: Box<dyn Collective>,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let world = collective.world_size();
        if world > 1 && (config.request.world_size != world || config.request.rank != 0) {
            return Err(train_config_err(
                "request.world_size",
                format!(
                    "rank {} of world size {} in a data-parallel run of {world} ranks: the \
                     request must name the run's layout (world size {world}, rank 0)",
                    config.request.rank, config.request.world_size
                ),
            ));
        }
        let (device, dtype) = (device.clone(), DType::F32);
        let (model, varmap) = MultiFormer::seeded(&config.model, config.seed, dtype, &device)?;
        let opt = AdamW::new(&varmap, &config.optimizer)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(TASK_RNG_STREAM);
        let cursors = vec![None; config.tasks().len()];
        Ok(Self {
            config,
            model,
            varmap,
            opt,
            rng,
            cursors,
            device,
            dtype,
            collective,
        })
    }

    /// Continues the run of `ckpt`. With `config` (e.g. from `--config`), its identity settings
    /// (model, request, tasks, optimizer, steps, seed) must equal the checkpoint's; its
    /// validation and checkpoint cadence replace the checkpoint's. The model computes on the
    /// CPU.
    pub fn from_checkpoint(ckpt: Checkpoint, config: Option<TrainConfig>) -> Result<Self> {
        Self::from_checkpoint_in(ckpt, config, Box::new(SingleProcess), &Device::Cpu)
    }

    /// [`Self::from_checkpoint`] on `device`, as one rank of the data-parallel run of
    /// `collective`: the checkpoint must come from a run of as many ranks, and this rank
    /// continues its own shard. The checkpoint's tensors are copied to `device` where they were
    /// loaded elsewhere (load them there, `checkpoint::load(path, device)`, to save the copy).
    pub fn from_checkpoint_in(
        ckpt: Checkpoint,
        config: Option<TrainConfig>,
        collective: Box<dyn Collective>,
        device: &Device,
    ) -> Result<Self> {
        let dir = ckpt.dir.clone();
        let config = match config {
            Some(given) => {
                let diff = ckpt.config.identity_differences(&given);
                if !diff.is_empty() {
                    return Err(checkpoint_err(
                        &dir.join(checkpoint::CONFIG_FILE),
                        format!(
                            "was trained with another config: it differs from the given one in {} \
                             (resume without a config to use the checkpoint's)",
                            diff.iter()
                                .map(|d| format!("`{d}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                given
            }
            None => ckpt.config.clone(),
        };
        let mut trainer = Self::new_in(config, collective, device)?;
        let model_path = dir.join(checkpoint::MODEL_FILE);
        let mut weights = ckpt.weights;
        // Every variable: the weights and the statistics the optimizer leaves alone.
        for (name, var) in &sorted_vars(&trainer.varmap) {
            let t = weights.remove(name).ok_or_else(|| {
                checkpoint_err(
                    &model_path,
                    format!("no tensor `{name}`, which the model needs"),
                )
            })?;
            if t.dims() != var.dims() {
                return Err(checkpoint_err(
                    &model_path,
                    format!(
                        "tensor `{name}` has shape {:?}, the model needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            // A tensor already on the device (always so on the CPU) is not copied.
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = weights.keys().min() {
            return Err(checkpoint_err(
                &model_path,
                format!("tensor `{extra}` belongs to no variable of the model"),
            ));
        }
        let moments = ckpt
            .optimizer
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_device(&trainer.device)?)))
            .collect::<Result<_>>()?;
        trainer
            .opt
            .load_state(moments, ckpt.step)
            .map_err(|what| checkpoint_err(&dir.join(checkpoint::OPTIMIZER_FILE), what))?;
        let state_path = dir.join(checkpoint::STATE_FILE);
        let (rank, world) = (trainer.collective.rank(), trainer.collective.world_size());
        let saved_ranks = ckpt.ranks.len().max(1);
        if saved_ranks != world as usize {
            return Err(checkpoint_err(
                &state_path,
                format!(
                    "holds the loader cursors of {saved_ranks} data-parallel rank(s); it \
                     continues with {saved_ranks}, not {world}"
                ),
            ));
        }
        let mine = if ckpt.ranks.is_empty() {
            ckpt.tasks
        } else {
            ckpt.ranks
                .into_iter()
                .nth(rank as usize)
                .unwrap_or_default()
        };
        if mine.len() != trainer.cursors.len() {
            return Err(checkpoint_err(
                &state_path,
                format!(
                    "{} task cursors for rank {rank}; the config has {} tasks",
                    mine.len(),
                    trainer.cursors.len()
                ),
            ));
        }
        for (task, saved) in trainer.config.tasks().iter().zip(&mine) {
            if task.name != saved.task {
                return Err(checkpoint_err(
                    &state_path,
                    format!(
                        "a cursor for task `{}` where the config has `{}`",
                        saved.task, task.name
                    ),
                ));
            }
        }
        trainer.cursors = mine.iter().map(|t| t.cursor).collect();
        trainer.rng = ckpt
            .rng
            .restore()
            .map_err(|what| checkpoint_err(&state_path, what))?;
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn model(&self) -> &MultiFormer {
        &self.model
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The device the model computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.opt.steps_taken()
    }

    /// Per task, the cursor after the last batch consumed.
    pub fn cursors(&self) -> &[Option<StreamCursor>] {
        &self.cursors
    }

    /// The collective this trainer is a rank of.
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// The run's state as a checkpoint would save it (this rank's cursors only; see
    /// [`Self::save_checkpoint_all_ranks`]).
    pub fn snapshot(&self) -> CheckpointSnapshot<'_> {
        CheckpointSnapshot {
            config: &self.config,
            step: self.step(),
            tasks: self.task_cursors(&self.cursors),
            ranks: Vec::new(),
            rng: RngState::capture(&self.rng),
            weights: sorted_vars(&self.varmap)
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect(),
            optimizer: self.opt.state_tensors(),
        }
    }

    fn task_cursors(&self, cursors: &[Option<StreamCursor>]) -> Vec<TaskCursor> {
        self.config
            .tasks()
            .into_iter()
            .zip(cursors)
            .map(|(t, c)| TaskCursor {
                task: t.name,
                cursor: *c,
            })
            .collect()
    }

    /// Writes a checkpoint under `out` and returns its folder.
    pub fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        checkpoint::save(out, &self.snapshot(), self.config.checkpoint.keep)
    }

    /// A checkpoint of a data-parallel run, called on every rank at the same step: gathers every
    /// rank's loader cursors, checks that all ranks hold the same weights, and has rank 0 write
    /// the checkpoint (its folder is returned there, `None` elsewhere). With one rank it is
    /// [`Self::save_checkpoint`].
    pub fn save_checkpoint_all_ranks(&self, out: &Path) -> Result<Option<PathBuf>> {
        let world = self.collective.world_size();
        if world == 1 {
            return self.save_checkpoint(out).map(Some);
        }
        self.check_lockstep()?;
        // Per task: present, epoch, position.
        let mine: Vec<u64> = self
            .cursors
            .iter()
            .flat_map(|c| match c {
                Some(c) => [1, c.epoch, c.position],
                None => [0, 0, 0],
            })
            .collect();
        let all = self.collective.all_gather_u64(&mine)?;
        let ranks: Vec<Vec<TaskCursor>> = all
            .chunks(mine.len().max(1))
            .map(|rank| {
                let cursors: Vec<Option<StreamCursor>> = rank
                    .chunks(3)
                    .map(|c| {
                        (c[0] == 1).then_some(StreamCursor {
                            epoch: c[1],
                            position: c[2],
                        })
                    })
                    .collect();
                self.task_cursors(&cursors)
            })
            .collect();
        if self.collective.rank() != 0 {
            return Ok(None);
        }
        let mut snap = self.snapshot();
        snap.ranks = ranks;
        checkpoint::save(out, &snap, self.config.checkpoint.keep).map(Some)
    }

    /// A fingerprint of the weights (FNV-1a over their bits, variables in name order): equal on
    /// every rank of a data-parallel run that is in lockstep.
    pub fn weights_digest(&self) -> Result<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (_, var) in self.opt.vars() {
            let values = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for v in values {
                for b in v.to_bits().to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        Ok(h)
    }

    /// Fails on every rank if the ranks' weights differ (a broken all-reduce, a rank that
    /// resumed from another checkpoint): they would go on training different models.
    fn check_lockstep(&self) -> Result<()> {
        let digests = self.collective.all_gather_u64(&[self.weights_digest()?])?;
        if digests.iter().any(|d| *d != digests[0]) {
            return Err(Error::Collective(format!(
                "the ranks' weights differ after step {} (digests by rank: {})",
                self.step(),
                digests
                    .iter()
                    .map(|d| format!("{d:016x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    #[test]
    fn checkpoint_weights_must_fit_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = Trainer::new(TrainConfig::example()).unwrap();
        trainer.save_checkpoint(dir.path()).unwrap();

        // Resumes as saved.
        let ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        let back = Trainer::from_checkpoint(ckpt, None).unwrap();
        assert_eq!(back.step(), 0);

        // Another config: named.
        let mut other = TrainConfig::example();
        other.optimizer.weight_decay = 0.1;
        let ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        let e = Trainer::from_checkpoint(ckpt, Some(other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimizer.weight_decay"), "{e}");

        // A tensor of the wrong shape, a missing one, an unknown one.
        let model_path = dir
            .path()
            .join("checkpoints/step-00000000")
            .join(checkpoint::MODEL_FILE);
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        let name = ckpt.weights.keys().min().unwrap().clone();
        ckpt.weights.insert(
            name.clone(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name) && e.contains("[7]"), "{e}");
        assert!(e.contains(&model_path.display().to_string()), "{e}");
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        ckpt.weights.remove(&name);
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name) && e.contains("no tensor"), "{e}");
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        ckpt.weights.insert(
            "bogus".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bogus`"), "{e}");
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        ckpt.optimizer.remove(&format!("v.{name}"));
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(checkpoint::OPTIMIZER_FILE) && e.contains(&format!("v.{name}")),
            "{e}"
        );
    }
}
