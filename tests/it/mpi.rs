//! Data-parallel `atmorep train` under `mpirun`: built only with the `atmorep` package's `mpi`
//! feature, which also builds the `atmorep` binary the tests run with MPI (see
//! [`atmorep_bin`]). Needs OpenMPI's `mpirun` (`.ci/run` installs it from Debian).
//!
//! One loader process serves a tiny store. `mpirun -np 2` trains with batch size `B` per rank;
//! both ranks must end with bit-identical weights (each prints a digest of its weights) and the
//! run must match one process trained on batches of `2B` on the same seed, within float
//! tolerance, step by step (training and validation losses) and in its final weights. The
//! batches agree because the loader shards an epoch by position (`i ≡ rank mod world`): rank 0's
//! first batch holds positions 0, 2, …, 2B − 2 and rank 1's 1, 3, …, 2B − 1, together the
//! positions 0 .. 2B of one process's first batch, and every sample (its mask too) is a function
//! of its id alone; only the order in which the losses are summed differs. A run stopped
//! half-way and resumed under `mpirun` must end bit for bit where the uninterrupted one did.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use atmorep_testkit::tiny::serve_tiny_store;
use atmorep_testkit::{ChildGuard, Server, atmorep_bin};
use atmorep_trainer::metrics_log::read_steps;
use atmorep_trainer::{Device, TrainConfig, Trainer, checkpoint};
use tempfile::TempDir;

/// Per-rank batch size.
const B: u32 = 2;
/// The run's steps: validation and a checkpoint after step 2 and step 4.
const STEPS: u64 = 4;

/// `examples/train.toml` (both tasks) on the test store with batch size `batch`, written to
/// `dir/name`.
fn write_config(dir: &Path, name: &str, batch: u32) -> PathBuf {
    let mut cfg = TrainConfig::example();
    cfg.steps = STEPS;
    cfg.request.dataset = "tiny".into();
    cfg.request.batch_size = batch;
    cfg.optimizer.warmup_steps = 1;
    cfg.validation.every = 2;
    cfg.validation.batches = 1;
    cfg.checkpoint.every = 2;
    let path = dir.join(name);
    std::fs::write(&path, cfg.to_toml_string()).unwrap();
    path
}

/// Runs `cmd` to completion (at most 5 minutes) and returns its stdout; fails the test with
/// its output if it fails.
fn run(mut cmd: Command, what: &str) -> String {
    let started = Instant::now();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut guard = ChildGuard(Some(child));
    while guard.is_running() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{what} took over 5 minutes:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = guard.wait_output();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    stdout
}

/// `atmorep train --config CONFIG --loader SERVER --out OUT --quiet EXTRA…`, under
/// `mpirun -np ranks` when `ranks` is given.
fn train(ranks: Option<u32>, server: &Server, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = match ranks {
        Some(n) => {
            let mut cmd = Command::new("mpirun");
            // Root in CI containers; two ranks on however few cores; no pinning of both to one
            // core; no cross-memory attach, which containers often forbid.
            cmd.args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["-np", &n.to_string()])
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .arg(atmorep_bin());
            cmd
        }
        None => Command::new(atmorep_bin()),
    };
    cmd.arg("train")
        .args(["--loader", &server.endpoint(), "--quiet", "--out"])
        .arg(out)
        .args(extra);
    cmd
}

/// The digests the ranks printed (`rank R of N: weights digest H`), by rank.
fn digests(stdout: &str, ranks: usize) -> Vec<String> {
    let mut found = vec![None; ranks];
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("rank ") else {
            continue;
        };
        let (rank, rest) = rest.split_once(" of ").expect("rank R of N");
        let digest = rest.split_once(": weights digest ").expect("the digest").1;
        found[rank.parse::<usize>().unwrap()] = Some(digest.trim().to_string());
    }
    found
        .into_iter()
        .enumerate()
        .map(|(r, d)| d.unwrap_or_else(|| panic!("rank {r} printed no digest:\n{stdout}")))
        .collect()
}

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let ckpt = checkpoint::load(out, &Device::Cpu).unwrap();
    let mut w: Vec<(String, Vec<f32>)> = ckpt
        .weights
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpirun_np_2_trains_in_lockstep_like_one_process_on_the_combined_batch() {
    let dir = TempDir::new().unwrap();
    let server = serve_tiny_store(dir.path()).await;
    let one_cfg = write_config(dir.path(), "one.toml", 2 * B);
    let two_cfg = write_config(dir.path(), "two.toml", B);
    let (one_cfg, two_cfg) = (one_cfg.to_str().unwrap(), two_cfg.to_str().unwrap());

    // One process on batches of 2B.
    let one = dir.path().join("one");
    run(
        train(None, &server, &one, &["--config", one_cfg]),
        "one process",
    );

    // Two ranks on batches of B: in lockstep, identical weights.
    let two = dir.path().join("two");
    let stdout = run(
        train(Some(2), &server, &two, &["--config", two_cfg]),
        "mpirun -np 2",
    );
    let d = digests(&stdout, 2);
    assert_eq!(d[0], d[1], "the ranks' final weights differ");

    // The same steps as one process: tasks, tokens, losses, validation losses.
    let (a, b) = (read_steps(&one).unwrap(), read_steps(&two).unwrap());
    assert_eq!(a.len(), STEPS as usize);
    assert_eq!(b.len(), STEPS as usize, "rank 0 alone writes the metrics");
    let mut max_rel = 0f64;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.step, &x.tasks, x.tokens), (y.step, &y.tasks, y.tokens));
        assert!(
            close(x.loss, y.loss, 1e-4),
            "step {}: loss {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert!(
            close(x.grad_norm, y.grad_norm, 1e-4),
            "step {}: gradient norm {} vs {}",
            x.step,
            x.grad_norm,
            y.grad_norm
        );
        assert_eq!(x.val_loss.is_some(), y.val_loss.is_some());
        if let (Some(u), Some(v)) = (x.val_loss, y.val_loss) {
            assert!(close(u, v, 1e-4), "step {}: validation {u} vs {v}", x.step);
        }
        assert_eq!(
            x.field_losses.len(),
            y.field_losses.len(),
            "step {}",
            x.step
        );
        for ((n, u), (m, v)) in x.field_losses.iter().zip(&y.field_losses) {
            assert!(
                n == m && close(*u, *v, 1e-4),
                "step {}: {n} {u} vs {m} {v}",
                x.step
            );
        }
        max_rel = max_rel.max((x.loss - y.loss).abs() / x.loss.abs());
    }

    // The same final weights, within float tolerance.
    let (wa, wb) = (weights(&one), weights(&two));
    assert_eq!(
        wa.iter().map(|w| &w.0).collect::<Vec<_>>(),
        wb.iter().map(|w| &w.0).collect::<Vec<_>>()
    );
    let mut max_diff = 0f32;
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() <= 1e-4, "`{name}`: {u} vs {v}");
            max_diff = max_diff.max((u - v).abs());
        }
    }
    // Not trivially equal: the run did move the weights away from their start.
    let mut initial = Trainer::new(TrainConfig::from_toml_file(Path::new(one_cfg)).unwrap())
        .unwrap()
        .snapshot()
        .weights;
    initial.sort_by(|a, b| a.0.cmp(&b.0));
    let moved = initial
        .iter()
        .zip(&wa)
        .flat_map(|((_, s), (_, x))| {
            let s = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            s.iter()
                .zip(x)
                .map(|(p, q)| (p - q).abs())
                .collect::<Vec<_>>()
        })
        .fold(0f32, f32::max);
    assert!(
        moved > 100.0 * max_diff,
        "weights moved {moved}, ranks differ by {max_diff}"
    );
    eprintln!(
        "2 ranks × batch {B} vs 1 process × batch {}: max |Δw| {max_diff:e} (weights moved up to \
         {moved:e}), max relative loss difference {max_rel:e}",
        2 * B
    );

    // The checkpoint holds both ranks' cursors: disjoint shards, the same progress.
    let ckpt = checkpoint::load(&two, &Device::Cpu).unwrap();
    assert_eq!(ckpt.ranks.len(), 2);
    assert_eq!(ckpt.tasks, ckpt.ranks[0]);
    assert_eq!(
        (ckpt.config.request.rank, ckpt.config.request.world_size),
        (0, 2)
    );
    let one_ckpt = checkpoint::load(&one, &Device::Cpu).unwrap();
    for (t, task) in ckpt.ranks[1].iter().enumerate() {
        let (c0, c1) = (ckpt.ranks[0][t].cursor, task.cursor);
        assert_eq!(c0, c1, "task {t}: both ranks consumed as many batches");
        // A rank's position is in its shard: half of one process's position.
        if let (Some(c), Some(whole)) = (c0, one_ckpt.tasks[t].cursor) {
            assert_eq!((2 * c.position, c.epoch), (whole.position, whole.epoch));
        }
    }

    // Stopped after 2 steps and resumed under mpirun: bit for bit the uninterrupted run.
    let split = dir.path().join("split");
    run(
        train(
            Some(2),
            &server,
            &split,
            &["--config", two_cfg, "--steps", "2"],
        ),
        "mpirun -np 2, 2 steps",
    );
    let resumed = run(
        train(
            Some(2),
            &server,
            &split,
            &["--resume", split.to_str().unwrap()],
        ),
        "mpirun -np 2 --resume",
    );
    assert_eq!(digests(&resumed, 2), d, "the resumed run ends elsewhere");
    let c = read_steps(&split).unwrap();
    let bits = |s: &[atmorep_trainer::metrics_log::StepRecord]| -> Vec<(u64, u64)> {
        s.iter().map(|r| (r.step, r.loss.to_bits())).collect()
    };
    assert_eq!(bits(&c), bits(&b));

    // A world-2 checkpoint does not resume in one process.
    let out = Command::new(atmorep_bin())
        .arg("train")
        .args(["--loader", &server.endpoint(), "--quiet", "--resume"])
        .arg(&split)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("2 data-parallel rank"),
        "{stderr}"
    );
}
