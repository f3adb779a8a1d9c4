//! Fault tolerance of a training run, with real processes and real `kill -9`s.
//!
//! Every test runs `atmorep train` against `atmorep loader serve` processes on loopback over
//! one tiny synthetic store, and compares the faulted run with an uninterrupted run of the same
//! config: the per-step metrics of the Parquet step log (everything but wall times) and the
//! final checkpoint (weights, AdamW moments, loader cursors, the task RNG) must be identical bit
//! for bit. Two uninterrupted runs are first checked to agree with each other, so a failure
//! below is a fault-handling bug, not nondeterminism.
//!
//! - The loader is killed mid-run and restarted on the same port: the trainer pauses,
//!   reconnects (its `loader reconnects: N` line), its task streams resume mid-epoch from their
//!   cursors (the new loader's log) and it loses and repeats nothing.
//! - The trainer is killed inside a checkpoint write (held there by the
//!   `ATMOREP_FAULT_CHECKPOINT` hook, so the SIGKILL lands mid-write every time): the half
//!   written checkpoint is never picked, `--resume` of the run folder continues from the last
//!   complete one and the finished run equals the uninterrupted one.
//!
//! Waits poll the run's files; their deadlines only turn a hang into a failure.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use atmorep_testkit::tiny::{store_with_stats, tiny_config};
use atmorep_testkit::{ChildGuard, Server, atmorep_bin};
use atmorep_trainer::checkpoint::{self, Checkpoint};
use atmorep_trainer::metrics_log::{StepRecord, read_steps};
use atmorep_trainer::{Device, TrainConfig};
use tempfile::TempDir;

/// Optimizer steps of every run.
const STEPS: u64 = 60;
/// A checkpoint every this many steps.
const EVERY: u64 = 10;
/// Longest any wait below may take before the test fails instead of hanging.
const HANG: Duration = Duration::from_secs(180);

/// The tiny store (10° grid, 40 steps of 6 h, `z` and `t` on two levels) with its statistics,
/// written once per test process; loaders only read it.
fn store() -> &'static Path {
    static STORE: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = STORE.get_or_init(|| {
        let dir = TempDir::new().unwrap();
        let path = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(store_with_stats(dir.path(), "tiny.zarr", &tiny_config(40)));
        (dir, path)
    });
    path
}

/// `atmorep loader serve` of the store as dataset `tiny` on `bind`, its log in `dir`.
fn serve(dir: &Path, bind: &str, log: &str) -> Server {
    let dataset = format!("tiny={}", store().display());
    Server::start_on(bind, &["--dataset".into(), dataset], &dir.join(log))
}

/// The example config on dataset `tiny`: [`STEPS`] steps with two tasks, accumulation,
/// validation and a checkpoint every [`EVERY`] steps — every part of a run's state in play.
fn write_config(dir: &Path) -> PathBuf {
    let mut cfg = TrainConfig::example();
    cfg.steps = STEPS;
    cfg.request.dataset = "tiny".into();
    cfg.optimizer.warmup_steps = 5;
    cfg.optimizer.accumulation = 2;
    cfg.validation.every = 15;
    cfg.validation.batches = 1;
    cfg.checkpoint.every = EVERY;
    cfg.checkpoint.keep = 2;
    let path = dir.join("train.toml");
    std::fs::write(&path, cfg.to_toml_string()).unwrap();
    path
}

/// A running `atmorep train`, its stdout and stderr in files of `dir`.
struct Trainer {
    child: ChildGuard,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Trainer {
    /// `atmorep train --quiet --loader ENDPOINT ARGS` with the extra environment `env`.
    fn start(dir: &Path, name: &str, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child: Child = Command::new(atmorep_bin())
            .args(["train", "--quiet", "--loader", endpoint])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting atmorep train");
        Self {
            child: ChildGuard(Some(child)),
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Polls `ready` until it holds; fails if the trainer exits first.
    fn wait_for(&mut self, what: &str, mut ready: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            if !self.child.is_running() {
                panic!("the trainer exited before {what}:\n{}", self.output());
            }
            assert!(start.elapsed() < HANG, "no {what}:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the trainer to exit; returns its stdout, failing the test unless it
    /// succeeded.
    fn finish(mut self) -> String {
        self.wait_for_exit();
        let status = self.child.child().wait().unwrap();
        assert!(status.success(), "atmorep train failed:\n{}", self.output());
        std::fs::read_to_string(&self.stdout).unwrap()
    }

    fn wait_for_exit(&mut self) {
        let start = Instant::now();
        while self.child.is_running() {
            assert!(
                start.elapsed() < HANG,
                "the trainer hangs:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, and checks that it was the kill that ended the process.
    fn kill9(mut self) {
        let child = self.child.child();
        child.kill().expect("SIGKILL the trainer");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}:\n{}", self.output());
    }
}

/// The step `out/checkpoints/LATEST` names (0 while there is none).
fn latest_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join(checkpoint::DIR).join(checkpoint::LATEST))
        .ok()
        .and_then(|name| name.trim().strip_prefix("step-")?.parse().ok())
        .unwrap_or(0)
}

/// The loader reconnects `atmorep train` reported.
fn reconnects(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("loader reconnects: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `loader reconnects` line in:\n{stdout}"))
}

/// An uninterrupted run's folder, made once per test process: run twice, and the two runs
/// must agree bit for bit (the determinism every comparison below relies on).
fn uninterrupted() -> &'static Path {
    static RUN: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    let (_, out) = RUN.get_or_init(|| {
        let dir = TempDir::new().unwrap();
        let loader = serve(dir.path(), "127.0.0.1:0", "loader.log");
        let config = write_config(dir.path());
        let run = |name: &str| {
            let out = dir.path().join(name);
            let args = [
                "--config",
                config.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ];
            let stdout = Trainer::start(dir.path(), name, &loader.endpoint(), &args, &[]).finish();
            assert_eq!(reconnects(&stdout), 0, "{stdout}");
            out
        };
        let (a, b) = (run("a"), run("b"));
        assert_same_run(
            &a,
            &b,
            "two uninterrupted runs (is training deterministic?)",
        );
        (dir, a)
    });
    out
}

/// What a step log row holds apart from wall times, as bits.
fn step_bits(s: &StepRecord) -> String {
    let fields = |l: &[(String, f64)]| -> Vec<(String, u64)> {
        l.iter().map(|(n, v)| (n.clone(), v.to_bits())).collect()
    };
    format!(
        "step {} tasks {} loss {:#x} lr {:#x} grad_norm {:#x} tokens {} val {:?} fields {:?} val \
         fields {:?}",
        s.step,
        s.tasks,
        s.loss.to_bits(),
        s.lr.to_bits(),
        s.grad_norm.to_bits(),
        s.tokens,
        s.val_loss.map(f64::to_bits),
        fields(&s.field_losses),
        fields(&s.val_field_losses)
    )
}

/// The runs in `a` and `b` logged the same steps and ended in the same state, bit for bit.
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (sa, sb) = (read_steps(a).unwrap(), read_steps(b).unwrap());
    assert_eq!(
        sa.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>(),
        "{what}: the step log of {} does not hold every step once",
        a.display()
    );
    assert_eq!(sa.len(), sb.len(), "{what}: step log lengths");
    for (x, y) in sa.iter().zip(&sb) {
        assert_eq!(step_bits(x), step_bits(y), "{what}: step {}", x.step);
    }
    let load = |p: &Path| -> Checkpoint { checkpoint::load(p, &Device::Cpu).unwrap() };
    let (ca, cb) = (load(a), load(b));
    assert_eq!(
        (ca.step, cb.step),
        (STEPS, STEPS),
        "{what}: final checkpoints"
    );
    assert_eq!(ca.tasks, cb.tasks, "{what}: loader cursors");
    assert_eq!(ca.rng, cb.rng, "{what}: the task RNG");
    assert_eq!(ca.config, cb.config, "{what}: configs");
    // safetensors orders tensors by type and name, so equal tensors make equal files.
    for file in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
        let bytes = |c: &Checkpoint| std::fs::read(c.dir.join(file)).unwrap();
        assert!(bytes(&ca) == bytes(&cb), "{what}: {file} differs");
    }
}

/// `kill -9` of the loader mid-run, a restart on the same port: the trainer pauses, reconnects,
/// and its run equals the uninterrupted one.
#[test]
fn a_loader_killed_mid_run_costs_the_trainer_a_pause_and_nothing_else() {
    let reference = uninterrupted();
    let dir = TempDir::new().unwrap();
    let mut loader = serve(dir.path(), "127.0.0.1:0", "loader-1.log");
    let addr = loader.addr.to_string();
    let config = write_config(dir.path());
    let out = dir.path().join("run");
    // A small transport window: with the default 8 MiB the task streams hold more batches
    // than the rest of this short run needs and would never notice the loader died.
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--stream-window-kib",
        "64",
        "--prefetch",
        "1",
    ];
    let mut trainer = Trainer::start(dir.path(), "train", &loader.endpoint(), &args, &[]);
    // Past the first checkpoint, well before the end: the kill lands mid-run.
    trainer.wait_for("the first checkpoint", |_| latest_step(&out) >= EVERY);
    let killed_at = latest_step(&out);
    assert!(killed_at < STEPS, "the run ended before the kill");
    loader.kill9();
    // The trainer runs on what it holds until a call fails (at the latest the next
    // validation's); then it pauses, retrying with backoff, until a loader is back.
    trainer.wait_for("a failed loader call", |t| {
        std::fs::read_to_string(&t.stderr).is_ok_and(|e| e.contains("loader call failed; retrying"))
    });
    let _restarted = serve(dir.path(), &addr, "loader-2.log");
    let stdout = trainer.finish();
    let n = reconnects(&stdout);
    assert!(n >= 1, "the trainer reports no reconnect:\n{stdout}");
    // The task streams themselves resumed mid-epoch on the new loader (validation streams
    // always start at the beginning).
    let log = std::fs::read_to_string(dir.path().join("loader-2.log")).unwrap();
    let resumed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stream opened"))
        .filter_map(|l| l.split("resume=").nth(1))
        .filter(|r| !r.starts_with("EpochCursor { epoch: 0, position: 0 }"))
        .collect();
    assert!(
        !resumed.is_empty(),
        "no task stream resumed on the restarted loader:\n{log}"
    );
    eprintln!("loader killed after checkpoint {killed_at}; {n} reconnects; resumed at {resumed:?}");
    assert_same_run(&out, reference, "a run whose loader was killed");
}

/// `kill -9` of the trainer inside a checkpoint write, at two points: with only the weights in
/// the temporary folder, and with the new checkpoint complete under its final name but not yet
/// in `LATEST`. `--resume` of the run folder continues from the last complete checkpoint
/// `LATEST` names and finishes the run exactly as the uninterrupted one.
#[test]
fn a_trainer_killed_mid_checkpoint_resumes_from_the_last_good_one() {
    let reference = uninterrupted();
    let dir = TempDir::new().unwrap();
    let loader = serve(dir.path(), "127.0.0.1:0", "loader.log");
    let config = write_config(dir.path());
    for (point, step) in [("after-weights", 2 * EVERY), ("before-latest", STEPS)] {
        let out = dir.path().join(point);
        let root = out.join(checkpoint::DIR);
        let name = checkpoint::step_dir_name(step);
        let fault = format!("{point}@{step}");
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        let env = [(checkpoint::FAULT_ENV, fault.as_str())];
        let mut trainer = Trainer::start(dir.path(), point, &loader.endpoint(), &args, &env);
        let stalled = format!("{}: stalled at {point} of {name}", checkpoint::FAULT_ENV);
        trainer.wait_for(&stalled, |t| {
            std::fs::read_to_string(&t.stderr).is_ok_and(|e| e.contains(&stalled))
        });
        // The write is under way: the last good checkpoint is still the one `LATEST` names.
        let previous = step - EVERY;
        assert_eq!(latest_step(&out), previous, "{point}");
        match point {
            "after-weights" => {
                let tmp = root.join(format!(".tmp-{name}"));
                assert!(tmp.join(checkpoint::MODEL_FILE).exists(), "{point}");
                assert!(!tmp.join(checkpoint::STATE_FILE).exists(), "{point}");
                assert!(!root.join(&name).exists(), "{point}");
            }
            _ => assert!(
                root.join(&name).join(checkpoint::STATE_FILE).exists(),
                "{point}"
            ),
        }
        trainer.kill9();

        // The interrupted write is never resumed from.
        let resolved = checkpoint::resolve(&out).unwrap();
        assert_eq!(resolved, root.join(checkpoint::step_dir_name(previous)));
        let resume = ["--resume", out.to_str().unwrap()];
        let name = format!("{point}-resumed");
        let stdout = Trainer::start(dir.path(), &name, &loader.endpoint(), &resume, &[]).finish();
        let resumed = format!("resuming {} at step {previous}", resolved.display());
        assert!(
            stdout.contains(&resumed),
            "{point}: no `{resumed}` in:\n{stdout}"
        );
        assert_same_run(&out, reference, &format!("a run killed {point} of {name}"));
        let left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{point}: temporaries left: {left:?}");
    }
}
