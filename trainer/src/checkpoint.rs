//! Checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! A run's output folder holds `checkpoints/step-NNNNNNNN/` folders and a `checkpoints/LATEST`
//! file naming the newest complete one. Each checkpoint folder has
//!
//! - `model.safetensors`: the weights, by variable name;
//! - `optimizer.safetensors`: AdamW's moments, `m.<var>` and `v.<var>`;
//! - `train.toml`: the resolved training config (model and loader request spelt out);
//! - `state.json`: format name and version, the optimizer step, per task the loader cursor after
//!   the last batch the run consumed, and the task-choice RNG's state; a data-parallel run's
//!   (more than one rank) also has `ranks`, per rank its task cursors (`tasks` is rank 0's);
//!   `files`, the length and CRC-32 of each of the three files above, as written.
//!
//! Writing is atomic at two levels. The folder is written as `.tmp-step-NNNNNNNN`, every file
//! and the folder fsynced, then renamed to its final name; only then is `LATEST` replaced (a
//! temporary file, fsynced, renamed over it, the folder fsynced), and only after that are old
//! checkpoints pruned. A process killed at any point leaves `LATEST` naming a complete
//! checkpoint; leftover temporary folders are removed by the next save, and [`resolve`] never
//! picks one (named explicitly, it is refused with an error naming it).
//!
//! For the crash tests, the environment variable [`FAULT_ENV`] (`POINT@STEP`, POINT one of
//! `after-weights` and `before-latest`) stops the save of step STEP at that point: the process
//! prints `ATMOREP_FAULT_CHECKPOINT: stalled at POINT of step-NNNNNNNN` to stderr and blocks
//! until it is killed, so a test's SIGKILL lands inside the write.
//!
//! Loading checks the format, the version, each file's length and CRC-32 against `files` (a
//! flipped bit in the weights parses fine), that every file parses, and (in
//! [`crate::train::Trainer::from_checkpoint`]) that every tensor matches the model; each
//! failure is an [`Error::Checkpoint`] naming the file and the problem. Resuming a run (its
//! folder, or its `checkpoints` folder) whose latest checkpoint fails these checks falls back to
//! the newest older checkpoint that passes them, and logs which it skipped and why; a checkpoint
//! folder named explicitly is that checkpoint or an error.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use atmorep_proto::StreamCursor;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, checkpoint_err, io_err};
use crate::train::TrainConfig;

/// `state.json`'s `format`.
pub const FORMAT: &str = "atmorep-trainer-checkpoint";
/// The checkpoint layout this build writes (it reads [`OLDEST_VERSION`] on).
pub const VERSION: u32 = 4;
/// The oldest layout this build reads: version 3, the same without `files` (not verified).
pub const OLDEST_VERSION: u32 = 3;
/// The folder of a run's checkpoints inside its output folder.
pub const DIR: &str = "checkpoints";
/// The file naming the newest complete checkpoint.
pub const LATEST: &str = "LATEST";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "train.toml";
pub const STATE_FILE: &str = "state.json";
const TMP_PREFIX: &str = ".tmp-";
/// The crash tests' fault hook (see the module docs).
pub const FAULT_ENV: &str = "ATMOREP_FAULT_CHECKPOINT";

/// Where one task's stream stands: the `cursor_after` of the last batch the run consumed
/// (`None`: none yet, start at the beginning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskCursor {
    pub task: String,
    pub cursor: Option<StreamCursor>,
}

/// A ChaCha8 generator's complete state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// The 32-byte key, hex.
    pub seed: String,
    pub stream: u64,
    /// The position in the key stream in 32-bit words (a u128, as a decimal string since JSON
    /// numbers are not that wide).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> std::result::Result<ChaCha8Rng, String> {
        use rand::SeedableRng;
        let bytes = self.seed.as_bytes();
        if bytes.len() != 64 {
            return Err(format!("rng.seed has {} hex digits, not 64", bytes.len()));
        }
        let mut seed = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            seed[i] =
                u8::from_str_radix(s, 16).map_err(|_| format!("rng.seed: `{s}` is not hex"))?;
        }
        let pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| format!("rng.word_pos `{}` is not a number", self.word_pos))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: String,
    version: u32,
    /// Optimizer steps taken.
    step: u64,
    tasks: Vec<TaskCursor>,
    /// Per rank of a data-parallel run, its cursors; left out with one rank, so such a run's
    /// checkpoint reads as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ranks: Vec<Vec<TaskCursor>>,
    rng: RngState,
    /// Length and CRC-32 of the checkpoint's other files, by file name (empty in version 3).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    files: BTreeMap<String, FileSum>,
}

/// A file's length and CRC-32 (IEEE), as `state.json` records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSum {
    bytes: u64,
    /// Eight hex digits.
    crc32: String,
}

impl FileSum {
    fn of(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        Ok(Self {
            bytes,
            crc32: format!("{:08x}", hasher.finalize()),
        })
    }
}

/// What a checkpoint holds, ready to save (borrowed from a running trainer).
#[derive(Debug)]
pub struct CheckpointSnapshot<'a> {
    pub config: &'a TrainConfig,
    pub step: u64,
    pub tasks: Vec<TaskCursor>,
    /// Per rank of a data-parallel run (more than one rank), its cursors; empty otherwise.
    pub ranks: Vec<Vec<TaskCursor>>,
    pub rng: RngState,
    pub weights: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint's own folder (`…/checkpoints/step-NNNNNNNN`).
    pub dir: PathBuf,
    pub config: TrainConfig,
    pub step: u64,
    pub tasks: Vec<TaskCursor>,
    /// Per rank of a data-parallel run, its cursors; empty for a run of one rank.
    pub ranks: Vec<Vec<TaskCursor>>,
    pub rng: RngState,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// Where a save may be made to fail, for the atomicity tests (a process killed there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// After the weights are written into the temporary folder.
    AfterWeights,
    /// After the folder got its final name, before `LATEST` names it.
    BeforeLatest,
}

impl Fault {
    const ALL: [(Self, &'static str); 2] = [
        (Self::AfterWeights, "after-weights"),
        (Self::BeforeLatest, "before-latest"),
    ];

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("", |(_, n)| n)
    }
}

/// The point at which [`FAULT_ENV`] stalls the save of `step`, if it does.
fn stall_point(step: u64) -> Result<Option<Fault>> {
    match std::env::var_os(FAULT_ENV) {
        Some(value) => parse_stall(&value.to_string_lossy(), step),
        None => Ok(None),
    }
}

/// [`FAULT_ENV`]'s `value`: the point at which to stall the save of `step`, if any.
fn parse_stall(value: &str, step: u64) -> Result<Option<Fault>> {
    let bad = || {
        crate::error::train_config_err(
            FAULT_ENV,
            format!("`{value}` is not POINT@STEP with POINT after-weights or before-latest"),
        )
    };
    let (point, at) = value.split_once('@').ok_or_else(bad)?;
    let fault = Fault::ALL
        .iter()
        .find(|(_, n)| *n == point)
        .map(|(f, _)| *f)
        .ok_or_else(bad)?;
    let at: u64 = at.parse().map_err(|_| bad())?;
    Ok((at == step).then_some(fault))
}

/// What happens at `point` of a save: an injected error, a stall until the process is killed,
/// or nothing.
fn checkpoint_at(
    point: Fault,
    fault: Option<Fault>,
    stall: Option<Fault>,
    name: &str,
) -> Result<()> {
    if stall == Some(point) {
        eprintln!("{FAULT_ENV}: stalled at {} of {name}", point.name());
        // Only a kill ends this: the test needs the process frozen mid-write.
        loop {
            std::thread::park();
        }
    }
    if fault == Some(point) {
        return Err(injected());
    }
    Ok(())
}

/// The folder name of the checkpoint after `step` optimizer steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes `snap` under `out/checkpoints/` (see the module docs), keeps the newest `keep`
/// checkpoints (at least the new one) and returns the new checkpoint's folder. A checkpoint of
/// the same step that already exists and matches its sums is identical (a run that resumed and
/// stopped at once), so it is kept as it is; one that does not is written anew.
pub fn save(out: &Path, snap: &CheckpointSnapshot<'_>, keep: usize) -> Result<PathBuf> {
    save_with(out, snap, keep, None, stall_point(snap.step)?)
}

/// [`save`], failing with an error at `fault` or stalling at `stall`.
pub(crate) fn save_with(
    out: &Path,
    snap: &CheckpointSnapshot<'_>,
    keep: usize,
    fault: Option<Fault>,
    stall: Option<Fault>,
) -> Result<PathBuf> {
    let root = out.join(DIR);
    std::fs::create_dir_all(&root).map_err(io_err(&root))?;
    remove_temporaries(&root)?;
    let name = step_dir_name(snap.step);
    let dir = root.join(&name);
    // A run that resumed from an older checkpoint past a corrupt one rewrites it, not keeps it.
    if dir.join(STATE_FILE).exists() && !is_sound(&dir) {
        tracing::warn!(checkpoint = %dir.display(), "replacing a corrupt checkpoint");
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    if !dir.join(STATE_FILE).exists() {
        let tmp = root.join(format!("{TMP_PREFIX}{name}"));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        write_safetensors(&tmp.join(MODEL_FILE), &snap.weights)?;
        checkpoint_at(Fault::AfterWeights, fault, stall, &name)?;
        write_safetensors(&tmp.join(OPTIMIZER_FILE), &snap.optimizer)?;
        write_synced(
            &tmp.join(CONFIG_FILE),
            snap.config.to_toml_string().as_bytes(),
        )?;
        // Read back from the disk, so the sums vouch for what a resume will read.
        let files = [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE]
            .into_iter()
            .map(|f| Ok((f.to_string(), FileSum::of(&tmp.join(f))?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let state = State {
            format: FORMAT.into(),
            version: VERSION,
            step: snap.step,
            tasks: snap.tasks.clone(),
            ranks: snap.ranks.clone(),
            rng: snap.rng.clone(),
            files,
        };
        let json = serde_json::to_vec_pretty(&state).expect("the state always serializes");
        write_synced(&tmp.join(STATE_FILE), &json)?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        sync_dir(&root)?;
    }
    checkpoint_at(Fault::BeforeLatest, fault, stall, &name)?;
    let latest_tmp = root.join(format!("{TMP_PREFIX}{LATEST}"));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    let latest = root.join(LATEST);
    std::fs::rename(&latest_tmp, &latest).map_err(io_err(&latest))?;
    sync_dir(&root)?;
    prune(&root, &name, keep.max(1))?;
    Ok(dir)
}

fn injected() -> Error {
    Error::Io {
        path: "<injected fault>".into(),
        source: std::io::Error::other("simulated crash"),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Removes what an interrupted save left behind.
fn remove_temporaries(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// The names of the complete checkpoints under `root`, oldest first.
fn step_dirs(root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && entry.path().is_dir() {
            names.push(name);
        }
    }
    // Zero-padded step numbers sort as numbers.
    names.sort();
    Ok(names)
}

fn prune(root: &Path, latest: &str, keep: usize) -> Result<()> {
    let names = step_dirs(root)?;
    let excess = names.len().saturating_sub(keep);
    for name in names.iter().take(excess).filter(|n| n.as_str() != latest) {
        let path = root.join(name);
        std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Whether `out` already holds checkpoints (a run that `--resume` should continue rather than
/// a new run overwrite).
pub fn has_checkpoints(out: &Path) -> bool {
    out.join(DIR).join(LATEST).exists()
}

/// The checkpoint folder `path` means: a checkpoint folder itself, a `checkpoints` folder (its
/// `LATEST`), or a run's output folder (its `checkpoints/LATEST`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if name.starts_with(TMP_PREFIX) {
        // Its files may all be there, but nothing says the write finished.
        return Err(checkpoint_err(
            path,
            "an interrupted checkpoint write, never a checkpoint: resume from the run folder \
             (its LATEST names the last complete checkpoint)",
        ));
    }
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    for root in [path.to_path_buf(), path.join(DIR)] {
        let latest = root.join(LATEST);
        if latest.exists() {
            let name = std::fs::read_to_string(&latest).map_err(io_err(&latest))?;
            let name = name.trim();
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(checkpoint_err(
                    &latest,
                    format!("names no checkpoint: `{name}`"),
                ));
            }
            let dir = root.join(name);
            if !dir.join(STATE_FILE).exists() {
                return Err(checkpoint_err(
                    &latest,
                    format!("names `{name}`, which is not a complete checkpoint"),
                ));
            }
            return Ok(dir);
        }
    }
    Err(checkpoint_err(
        path,
        if path.exists() {
            format!("not a checkpoint (no {STATE_FILE}, no {LATEST}, no {DIR}/{LATEST})")
        } else {
            "does not exist".into()
        },
    ))
}

/// Reads the checkpoint `path` means (see [`resolve`]), checking its format and version, each
/// file's length and CRC-32, and that every file parses. Tensors are loaded on `device`. For a
/// run (not a checkpoint folder named explicitly) whose latest checkpoint fails those checks, the
/// newest older one that passes them, with a warning naming what was skipped and why.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let dir = resolve(path)?;
    let latest_err = match load_dir(&dir, device) {
        Ok(checkpoint) => return Ok(checkpoint),
        Err(err) => err,
    };
    if path.join(STATE_FILE).exists() {
        return Err(latest_err);
    }
    let (Some(root), Some(latest)) = (dir.parent(), dir.file_name()) else {
        return Err(latest_err);
    };
    let latest = latest.to_string_lossy().into_owned();
    tracing::warn!(checkpoint = %dir.display(), "{latest_err}");
    for name in step_dirs(root)?.into_iter().rev().filter(|n| *n < latest) {
        let older = root.join(&name);
        match load_dir(&older, device) {
            Ok(checkpoint) => {
                tracing::warn!(
                    "resuming from {name}, the newest complete checkpoint before {latest}, \
                     which is unusable: {latest_err}"
                );
                return Ok(checkpoint);
            }
            Err(err) => tracing::warn!(checkpoint = %older.display(), "skipped: {err}"),
        }
    }
    Err(latest_err)
}

/// Each file of the checkpoint `dir` against the length and CRC-32 its `state` recorded.
fn verify_files(dir: &Path, state: &State) -> Result<()> {
    for file in [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE] {
        let p = dir.join(file);
        let Some(expected) = state.files.get(file) else {
            return Err(checkpoint_err(
                &dir.join(STATE_FILE),
                format!("corrupt: no checksum of {file}"),
            ));
        };
        if !p.exists() {
            return Err(checkpoint_err(&p, "missing"));
        }
        let found = FileSum::of(&p)?;
        if found != *expected {
            return Err(checkpoint_err(
                &p,
                format!(
                    "corrupt: {} bytes with CRC-32 {}, where state.json recorded {} bytes \
                     with CRC-32 {}",
                    found.bytes, found.crc32, expected.bytes, expected.crc32
                ),
            ));
        }
    }
    Ok(())
}

/// Whether the checkpoint `dir` is complete and its files match the sums its `state.json`
/// recorded (a checkpoint without sums counts as unverified, not sound).
fn is_sound(dir: &Path) -> bool {
    std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<State>(&bytes).ok())
        .is_some_and(|state| !state.files.is_empty() && verify_files(dir, &state).is_ok())
}

/// [`load`] of one checkpoint folder, without falling back.
fn load_dir(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let dir = dir.to_path_buf();
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(io_err(&state_path))?;
    // Format and version first, so a newer layout is reported as such rather than as a
    // parse error of some field it renamed.
    let head: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| checkpoint_err(&state_path, format!("corrupt: {e}")))?;
    match head.get("format").and_then(|v| v.as_str()) {
        Some(FORMAT) => {}
        other => {
            return Err(checkpoint_err(
                &state_path,
                format!("format {other:?} is not `{FORMAT}`"),
            ));
        }
    }
    let version = match head.get("version").and_then(|v| v.as_u64()) {
        Some(v) if (u64::from(OLDEST_VERSION)..=u64::from(VERSION)).contains(&v) => v,
        other => {
            return Err(checkpoint_err(
                &state_path,
                format!(
                    "version {} is not supported (this build reads versions \
                     {OLDEST_VERSION} to {VERSION})",
                    other.map_or("missing".into(), |v| v.to_string())
                ),
            ));
        }
    };
    let state: State = serde_json::from_value(head)
        .map_err(|e| checkpoint_err(&state_path, format!("corrupt: {e}")))?;
    if version >= 4 {
        verify_files(&dir, &state)?;
    }
    let config_path = dir.join(CONFIG_FILE);
    let config_text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let config = TrainConfig::from_toml_str(&config_text, None)
        .map_err(|e| checkpoint_err(&config_path, format!("invalid: {e}")))?;
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(file);
        if !p.exists() {
            return Err(checkpoint_err(&p, "missing"));
        }
        candle_core::safetensors::load(&p, device)
            .map_err(|e| checkpoint_err(&p, format!("corrupt: {e}")))
    };
    let weights = read(MODEL_FILE)?;
    let optimizer = read(OPTIMIZER_FILE)?;
    if state.tasks.len() != config.tasks().len() {
        return Err(checkpoint_err(
            &state_path,
            format!(
                "{} task cursors for the config's {} tasks",
                state.tasks.len(),
                config.tasks().len()
            ),
        ));
    }
    Ok(Checkpoint {
        dir,
        config,
        step: state.step,
        tasks: state.tasks,
        ranks: state.ranks,
        rng: state.rng,
        weights,
        optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use rand::{Rng, SeedableRng};

    fn snapshot(config: &TrainConfig, step: u64, value: f32) -> CheckpointSnapshot<'_> {
        let t = |v: f32| Tensor::full(v, (2, 3), &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..step {
            let _: u64 = rng.random();
        }
        CheckpointSnapshot {
            config,
            step,
            tasks: config
                .tasks()
                .iter()
                .map(|t| TaskCursor {
                    task: t.name.clone(),
                    cursor: Some(StreamCursor {
                        epoch: 1,
                        position: step * 4,
                    }),
                })
                .collect(),
            ranks: Vec::new(),
            rng: RngState::capture(&rng),
            weights: vec![("w".into(), t(value))],
            optimizer: vec![("m.w".into(), t(0.5)), ("v.w".into(), t(0.25))],
        }
    }

    fn weight(c: &Checkpoint) -> f32 {
        c.weights["w"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        let snap = snapshot(&config, 7, 1.5);
        let written = save(dir.path(), &snap, 2).unwrap();
        assert_eq!(written, dir.path().join(DIR).join("step-00000007"));
        for path in [dir.path(), &dir.path().join(DIR), &written] {
            let c = load(path, &Device::Cpu).unwrap();
            assert_eq!(c.dir, written);
            assert_eq!(c.step, 7);
            assert_eq!(c.config, config);
            assert_eq!(c.tasks, snap.tasks);
            assert_eq!(c.rng, snap.rng);
            assert_eq!(weight(&c), 1.5);
            assert_eq!(c.optimizer["v.w"].dtype(), DType::F32);
            // The RNG continues where it stood.
            let mut a = c.rng.restore().unwrap();
            let mut b = ChaCha8Rng::seed_from_u64(9);
            for _ in 0..7 {
                let _: u64 = b.random();
            }
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
        assert!(has_checkpoints(dir.path()));
    }

    #[test]
    fn keeps_the_newest_and_prunes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        for step in [1, 2, 3, 4] {
            save(dir.path(), &snapshot(&config, step, step as f32), 2).unwrap();
        }
        let root = dir.path().join(DIR);
        assert_eq!(
            step_dirs(&root).unwrap(),
            ["step-00000003", "step-00000004"]
        );
        assert_eq!(weight(&load(dir.path(), &Device::Cpu).unwrap()), 4.0);
    }

    #[test]
    fn a_crash_mid_write_leaves_the_previous_checkpoint_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        save(dir.path(), &snapshot(&config, 1, 1.0), 1).unwrap();
        for fault in [Fault::AfterWeights, Fault::BeforeLatest] {
            save_with(dir.path(), &snapshot(&config, 2, 2.0), 1, Some(fault), None).unwrap_err();
            // The interrupted write is never chosen, and refused when named.
            let root = dir.path().join(DIR);
            if fault == Fault::AfterWeights {
                let tmp = root.join(".tmp-step-00000002");
                assert!(tmp.join(MODEL_FILE).exists());
                let e = load(&tmp, &Device::Cpu).unwrap_err().to_string();
                assert!(
                    e.contains(".tmp-step-00000002") && e.contains("interrupted"),
                    "{e}"
                );
            }
            let c = load(dir.path(), &Device::Cpu).unwrap();
            assert_eq!((c.step, weight(&c)), (1, 1.0), "{fault:?}");
            // The next save cleans up and succeeds.
            save(dir.path(), &snapshot(&config, 3, 3.0), 1).unwrap();
            let c = load(dir.path(), &Device::Cpu).unwrap();
            assert_eq!((c.step, weight(&c)), (3, 3.0));
            let names: Vec<String> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(names.is_empty(), "{names:?}");
            // Back to one checkpoint at step 1 for the next fault.
            std::fs::remove_dir_all(&root).unwrap();
            save(dir.path(), &snapshot(&config, 1, 1.0), 1).unwrap();
        }
    }

    #[test]
    fn the_fault_hook_names_a_point_and_a_step() {
        assert_eq!(
            parse_stall("after-weights@7", 7).unwrap(),
            Some(Fault::AfterWeights)
        );
        assert_eq!(
            parse_stall("before-latest@7", 7).unwrap(),
            Some(Fault::BeforeLatest)
        );
        assert_eq!(parse_stall("before-latest@7", 8).unwrap(), None);
        for bad in [
            "",
            "after-weights",
            "after-weights@",
            "elsewhere@7",
            "before-latest@x",
        ] {
            let e = parse_stall(bad, 7).unwrap_err().to_string();
            assert!(e.contains(FAULT_ENV), "{e}");
        }
    }

    #[test]
    fn bad_checkpoints_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        let ckpt = save(dir.path(), &snapshot(&config, 1, 1.0), 1).unwrap();
        let err = |path: &Path| load(path, &Device::Cpu).unwrap_err().to_string();

        let e = err(&dir.path().join("nowhere"));
        assert!(e.contains("does not exist"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = err(&empty);
        assert!(e.contains("not a checkpoint"), "{e}");

        let state_path = ckpt.join(STATE_FILE);
        let state = std::fs::read_to_string(&state_path).unwrap();
        std::fs::write(
            &state_path,
            state.replace(&format!("\"version\": {VERSION}"), "\"version\": 99"),
        )
        .unwrap();
        let e = err(&ckpt);
        assert!(e.contains("version 99") && e.contains(STATE_FILE), "{e}");
        std::fs::write(&state_path, state.replace(FORMAT, "something-else")).unwrap();
        assert!(err(&ckpt).contains("format"));
        std::fs::write(&state_path, &state[..state.len() / 2]).unwrap();
        assert!(err(&ckpt).contains("corrupt"));
        std::fs::write(&state_path, &state).unwrap();

        let model = ckpt.join(MODEL_FILE);
        let bytes = std::fs::read(&model).unwrap();
        std::fs::write(&model, &bytes[..bytes.len() - 5]).unwrap();
        let e = err(&ckpt);
        assert!(e.contains(MODEL_FILE) && e.contains("corrupt"), "{e}");
        std::fs::remove_file(&model).unwrap();
        let e = err(&ckpt);
        assert!(e.contains(MODEL_FILE) && e.contains("missing"), "{e}");
        std::fs::write(&model, &bytes).unwrap();

        let cfg = ckpt.join(CONFIG_FILE);
        std::fs::write(&cfg, "steps = \"many\"").unwrap();
        let e = err(&ckpt);
        assert!(e.contains(CONFIG_FILE), "{e}");

        std::fs::write(dir.path().join(DIR).join(LATEST), "step-00000099\n").unwrap();
        let e = err(dir.path());
        assert!(
            e.contains("step-00000099") && e.contains("not a complete"),
            "{e}"
        );
    }

    /// Flips one bit in the middle of `path`.
    fn flip_a_bit(path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_flipped_bit_is_named_and_a_run_resumes_from_the_checkpoint_before() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        save(dir.path(), &snapshot(&config, 1, 1.0), 3).unwrap();
        save(dir.path(), &snapshot(&config, 2, 2.0), 3).unwrap();
        let latest = save(dir.path(), &snapshot(&config, 3, 3.0), 3).unwrap();
        for file in [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE] {
            let original = std::fs::read(latest.join(file)).unwrap();
            flip_a_bit(&latest.join(file));
            // Named explicitly: that checkpoint or an error naming the file and the sums.
            let e = load(&latest, &Device::Cpu).unwrap_err().to_string();
            assert!(
                e.contains(file) && e.contains("CRC-32") && e.contains("state.json recorded"),
                "{e}"
            );
            // The run (and its checkpoints folder): the newest sound checkpoint before it.
            for run in [dir.path().to_path_buf(), dir.path().join(DIR)] {
                let c = load(&run, &Device::Cpu).unwrap();
                assert_eq!((c.step, weight(&c)), (2, 2.0), "{file}");
                assert!(c.dir.ends_with("step-00000002"));
            }
            std::fs::write(latest.join(file), original).unwrap();
        }
        assert_eq!(load(dir.path(), &Device::Cpu).unwrap().step, 3);

        // Two bad ones: back to the first; all bad: the latest's error.
        flip_a_bit(&latest.join(MODEL_FILE));
        flip_a_bit(&dir.path().join(DIR).join("step-00000002").join(MODEL_FILE));
        assert_eq!(load(dir.path(), &Device::Cpu).unwrap().step, 1);
        flip_a_bit(&dir.path().join(DIR).join("step-00000001").join(MODEL_FILE));
        let e = load(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("step-00000003") && e.contains(MODEL_FILE), "{e}");
    }

    #[test]
    fn a_save_over_a_corrupt_checkpoint_of_the_same_step_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        let ckpt = save(dir.path(), &snapshot(&config, 4, 4.0), 2).unwrap();
        flip_a_bit(&ckpt.join(MODEL_FILE));
        assert!(!is_sound(&ckpt));
        save(dir.path(), &snapshot(&config, 4, 4.0), 2).unwrap();
        assert!(is_sound(&ckpt));
        let c = load(&ckpt, &Device::Cpu).unwrap();
        assert_eq!((c.step, weight(&c)), (4, 4.0));
    }

    #[test]
    fn a_version_3_checkpoint_without_checksums_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig::example();
        let ckpt = save(dir.path(), &snapshot(&config, 5, 5.0), 1).unwrap();
        let state_path = ckpt.join(STATE_FILE);
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
        assert_eq!(state["files"].as_object().map(|f| f.len()), Some(3));
        state["version"] = 3.into();
        state.as_object_mut().unwrap().remove("files");
        std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
        let c = load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!((c.step, weight(&c)), (5, 5.0));
        // A version-4 state without its sums is corrupt.
        state["version"] = VERSION.into();
        std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
        let e = load(&ckpt, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("no checksum"), "{e}");
    }
}
