//! The trainer against a real loader process: every test starts `atmorep loader serve` on
//! `127.0.0.1:0` over a tiny synthetic store and trains the tiny model in this process through
//! the trainer library (or runs `atmorep train`) over gRPC.
//!
//! Covered: a short run in which the loss falls, with validation, a checkpoint and
//! the metrics table; exact resume (k steps, a checkpoint, a fresh trainer from it for N − k
//! steps: the same losses, gradient norms, learning rates and final weights as N uninterrupted
//! steps, bit for bit; also with the temporal prior, whose errors are measured once); `atmorep train --bench` and its `--resume`, which refuses a mismatched
//! config without touching the run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use atmorep_proto::client::LoaderClient;
use atmorep_testkit::streams::{client_config, connect};
use atmorep_testkit::tiny::serve_tiny_store;
use atmorep_testkit::{Server, atmorep_bin, workspace_root};
use atmorep_trainer::config::{Prior, TokenGrid};
use atmorep_trainer::metrics_log::read_steps;
use atmorep_trainer::tail::PRIOR_ERROR_DEFAULT;
use atmorep_trainer::{RunOptions, TrainConfig, Trainer, checkpoint};
use tempfile::TempDir;

async fn client(server: &Server) -> LoaderClient {
    connect(client_config(vec![server.endpoint()])).await
}

/// Fails the test instead of hanging when a run stalls.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 60 s"))
}

/// `examples/train.toml` on the test store, `steps` long.
fn config(steps: u64) -> TrainConfig {
    let mut cfg = TrainConfig::example();
    cfg.steps = steps;
    cfg.request.dataset = "tiny".into();
    cfg.optimizer.warmup_steps = 5;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_falls_in_a_short_run_against_a_loader_process() {
    let dir = TempDir::new().unwrap();
    let server = serve_tiny_store(dir.path()).await;
    let client = client(&server).await;
    let mut cfg = config(60);
    cfg.validation.every = 30;
    cfg.validation.batches = 2;
    cfg.checkpoint.every = 30;
    let out = dir.path().join("run");
    let mut trainer = Trainer::new(cfg).unwrap();
    let opts = RunOptions {
        out: Some(out.clone()),
        ..Default::default()
    };
    let summary = within("the run", trainer.run(&client, &opts))
        .await
        .unwrap();

    let losses = summary.losses();
    assert_eq!(losses.len(), 60);
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[50..]));
    assert!(
        last < 0.7 * first,
        "the loss did not fall: first 10 steps {first:.4}, last 10 {last:.4}: {losses:?}"
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    let vals: Vec<_> = summary.steps.iter().filter_map(|s| s.val_loss).collect();
    assert_eq!(vals.len(), 2, "validation after steps 30 and 60");
    assert!(vals.iter().all(|v| v.is_finite() && *v > 0.0));
    // Both tasks were drawn.
    let tasks: std::collections::HashSet<_> =
        summary.steps.iter().map(|s| s.tasks.as_str()).collect();
    assert!(
        tasks.contains("bert") && tasks.contains("forecast"),
        "{tasks:?}"
    );

    // Per field: a training loss on every step that masked it (in the model's order; with one
    // micro-batch the step's loss is their mean), a validation loss on validation steps.
    let names: Vec<&str> = trainer
        .config()
        .model
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    for s in &summary.steps {
        let got: Vec<&str> = s.field_losses.iter().map(|(n, _)| n.as_str()).collect();
        assert!(!got.is_empty(), "step {}: no per-field losses", s.step);
        assert!(
            names.iter().filter(|n| got.contains(n)).eq(got.iter()),
            "step {}: {got:?} is not in the order of {names:?}",
            s.step
        );
        let mean = s.field_losses.iter().map(|(_, v)| v).sum::<f64>() / got.len() as f64;
        assert!(
            (mean - s.loss).abs() <= 1e-5 * s.loss.abs().max(1e-3),
            "step {}: loss {} but per-field mean {mean}",
            s.step,
            s.loss
        );
        let val: Vec<&str> = s.val_field_losses.iter().map(|(n, _)| n.as_str()).collect();
        if s.val_loss.is_some() {
            assert_eq!(val, names, "step {}", s.step);
            assert!(
                s.val_field_losses
                    .iter()
                    .all(|(_, v)| v.is_finite() && *v > 0.0)
            );
        } else {
            assert!(val.is_empty(), "step {}: {val:?}", s.step);
        }
    }
    // Both fields were trained on.
    for name in &names {
        assert!(
            summary
                .steps
                .iter()
                .any(|s| s.field_losses.iter().any(|(n, _)| n == name)),
            "{name} never had a loss"
        );
    }

    // The metrics table holds every step, the checkpoint the last one.
    let rows = read_steps(&out).unwrap();
    assert_eq!(rows, summary.steps);
    assert_eq!(summary.metrics_files.len(), 2);
    let ckpt = checkpoint::load(&out, &atmorep_trainer::Device::Cpu).unwrap();
    assert_eq!(ckpt.step, 60);
    assert_eq!(Some(ckpt.dir), summary.checkpoint);
    let b = summary.breakdown(5);
    assert!(
        b.tokens_per_s > 0.0 && b.data_wait_fraction() < 1.0,
        "{b:?}"
    );
    eprint!("tiny, in-process trainer: {}", b.to_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_reproduces_the_uninterrupted_run_bit_for_bit() {
    resume_reproduces(config(24)).await;
}

/// The same with the temporal prior, whose errors a fresh run measures before its first step
/// and a resumed one takes from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_with_the_temporal_prior_reproduces_the_uninterrupted_run() {
    let mut cfg = config(24);
    cfg.model.prior = Prior::Temporal;
    for f in &mut cfg.model.fields {
        f.grid = Some(TokenGrid {
            num_tokens: [2, 2, 2],
            token_size: [1, 3, 4],
        });
    }
    let weights = resume_reproduces(cfg).await;
    let errors: Vec<_> = weights
        .iter()
        .filter(|(name, _)| name.ends_with(".prior_error"))
        .collect();
    assert_eq!(errors.len(), 2, "one per field");
    for (name, values) in errors {
        assert!(
            values.iter().all(|v| v.is_finite() && *v > 0.0),
            "{name}: {values:?}"
        );
        // Measured: the interpolated and one-sided kinds occur in the first batches.
        assert_ne!(
            values[..2],
            PRIOR_ERROR_DEFAULT[..2]
                .iter()
                .map(|v| *v as f32)
                .collect::<Vec<_>>(),
            "{name} kept its defaults"
        );
    }
}

/// Runs `cfg` for its steps at once and in two parts with a checkpoint between; asserts the
/// two agree bit for bit and returns the final weights.
async fn resume_reproduces(mut cfg: TrainConfig) -> Vec<(String, Vec<f32>)> {
    let dir = TempDir::new().unwrap();
    let server = serve_tiny_store(dir.path()).await;
    let client = client(&server).await;
    // Accumulation and validation in the mix: neither may disturb the run's state.
    let (n, k) = (cfg.steps, 10);
    cfg.optimizer.accumulation = 2;
    cfg.validation.every = 4;
    cfg.validation.batches = 1;
    let opts = |out: &Path, stop: Option<u64>| RunOptions {
        stop_at: stop,
        out: Some(out.to_path_buf()),
        ..Default::default()
    };

    let whole_out = dir.path().join("whole");
    let mut whole = Trainer::new(cfg.clone()).unwrap();
    let a = within("N steps", whole.run(&client, &opts(&whole_out, None)))
        .await
        .unwrap();

    let split_out = dir.path().join("split");
    let mut first = Trainer::new(cfg.clone()).unwrap();
    let b1 = first
        .run(&client, &opts(&split_out, Some(k)))
        .await
        .unwrap();
    assert_eq!(first.step(), k);
    drop(first);
    let ckpt = checkpoint::load(&split_out, &atmorep_trainer::Device::Cpu).unwrap();
    assert_eq!(ckpt.step, k);
    let mut resumed = Trainer::from_checkpoint(ckpt, Some(cfg)).unwrap();
    let b2 = within("N - k steps", resumed.run(&client, &opts(&split_out, None)))
        .await
        .unwrap();

    type Bits = (
        u64,
        String,
        u64,
        u64,
        u64,
        Option<u64>,
        Vec<(String, u64)>,
        Vec<(String, u64)>,
    );
    let bits = |steps: &[atmorep_trainer::metrics_log::StepRecord]| -> Vec<Bits> {
        let per_field = |l: &[(String, f64)]| -> Vec<(String, u64)> {
            l.iter().map(|(n, v)| (n.clone(), v.to_bits())).collect()
        };
        steps
            .iter()
            .map(|s| {
                (
                    s.step,
                    s.tasks.clone(),
                    s.loss.to_bits(),
                    s.lr.to_bits(),
                    s.grad_norm.to_bits(),
                    s.val_loss.map(f64::to_bits),
                    per_field(&s.field_losses),
                    per_field(&s.val_field_losses),
                )
            })
            .collect()
    };
    let joined = [b1.steps.clone(), b2.steps.clone()].concat();
    assert_eq!(
        bits(&joined),
        bits(&a.steps),
        "losses {:?} vs {:?}",
        b2.losses(),
        &a.losses()[k as usize..]
    );
    assert_eq!(whole.cursors(), resumed.cursors());
    for ((name, x), (_, y)) in whole
        .snapshot()
        .weights
        .iter()
        .zip(&resumed.snapshot().weights)
    {
        let (x, y) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
            "weights of `{name}` differ"
        );
    }
    // The resumed run's metrics continue the first part's.
    let steps: Vec<u64> = read_steps(&split_out)
        .unwrap()
        .iter()
        .map(|s| s.step)
        .collect();
    assert_eq!(steps, (1..=n).collect::<Vec<_>>());
    resumed
        .snapshot()
        .weights
        .iter()
        .map(|(name, t)| (name.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// `atmorep train --bench` for a few steps, then `--resume` of its folder with a config that
/// differs: a clear error naming the setting, and the run's checkpoint is untouched; a resume
/// whose newest checkpoint is corrupt continues from the one before, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_train_command_benches_and_refuses_a_mismatched_resume() {
    let dir = TempDir::new().unwrap();
    let server = serve_tiny_store(dir.path()).await;
    let example = std::fs::read_to_string(workspace_root().join("examples/train.toml")).unwrap();
    let config = dir.path().join("train.toml");
    std::fs::write(
        &config,
        example.replace("dataset = \"era5\"", "dataset = \"tiny\""),
    )
    .unwrap();
    let out = dir.path().join("run");
    let train = |args: &[&str]| {
        Command::new(atmorep_bin())
            .arg("train")
            .arg("--loader")
            .arg(server.endpoint())
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running atmorep train")
    };
    let cfg_arg = config.to_str().unwrap();
    let run = train(&["--config", cfg_arg, "--steps", "20", "--bench", "--quiet"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for want in [
        "tokens/s",
        "data wait",
        "forward",
        "backward",
        "optimizer",
        "checkpoint:",
    ] {
        assert!(stdout.contains(want), "no `{want}` in:\n{stdout}");
    }
    eprintln!("atmorep train --bench (tiny):\n{stdout}");

    // A new run into the same folder would overwrite it: refused.
    let again = train(&["--config", cfg_arg, "--steps", "2", "--quiet"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    let latest = out.join("checkpoints/LATEST");
    let before = std::fs::read_to_string(&latest).unwrap();
    let other = dir.path().join("other.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&other, text.replace("lr = 3e-3", "lr = 1e-3")).unwrap();
    let bad = train(&[
        "--config",
        other.to_str().unwrap(),
        "--resume",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("optimizer.lr") && stderr.contains("train.toml"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&latest).unwrap(), before);

    // Resuming under its own config continues to step 25.
    let ok = train(&[
        "--resume",
        out.to_str().unwrap(),
        "--steps",
        "25",
        "--quiet",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ckpt = checkpoint::load(&out, &atmorep_trainer::Device::Cpu).unwrap();
    assert_eq!(ckpt.step, 25);

    // A bit flipped in the newest checkpoint's weights (step 25; step 20 is kept too): the
    // resume says so and continues from step 20.
    let weights = out.join("checkpoints/step-00000025/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    let resumed = train(&[
        "--resume",
        out.to_str().unwrap(),
        "--steps",
        "30",
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.safetensors")
            && stderr.contains("CRC-32")
            && stderr.contains("resuming from step-00000020"),
        "{stderr}"
    );
    let ckpt = checkpoint::load(&out, &atmorep_trainer::Device::Cpu).unwrap();
    assert_eq!(ckpt.step, 30);
}

/// A loader that does not serve a field the model needs: the run fails naming the field, and
/// nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_without_a_field_of_the_model_is_named() {
    let dir = TempDir::new().unwrap();
    let server = serve_tiny_store(dir.path()).await;
    let client = client(&server).await;
    let mut cfg = config(10);
    cfg.model.fields[0].name = "q".into();
    cfg.request.fields[0].name = "q".into();
    let out = dir.path().join("run");
    let mut trainer = Trainer::new(cfg).unwrap();
    let opts = RunOptions {
        out: Some(out.clone()),
        ..Default::default()
    };
    let err = within("the run", trainer.run(&client, &opts))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`q`"), "{err}");
    assert!(!checkpoint::has_checkpoints(&out));
}

/// `atmorep train --metrics-bind` serves the training metrics for Prometheus while it trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_train_command_serves_prometheus_metrics() {
    use std::io::{Read, Write};
    let dir = TempDir::new().unwrap();
    let server = serve_tiny_store(dir.path()).await;
    let example = std::fs::read_to_string(workspace_root().join("examples/train.toml")).unwrap();
    let config = dir.path().join("train.toml");
    std::fs::write(
        &config,
        example
            .replace("dataset = \"era5\"", "dataset = \"tiny\"")
            .replace("steps = 200", "steps = 100000"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(atmorep_bin())
        .args([
            "train",
            "--quiet",
            "--loader",
            &server.endpoint(),
            "--config",
        ])
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("run"))
        .args(["--metrics-bind", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = atmorep_testkit::ChildGuard(Some(child));
    let scrape = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Past the first step, whose gauges were all set before the second step counted.
        if let Some(body) = scrape()
            && body.contains("atmorep_train_steps_total")
            && !body.contains("atmorep_train_steps_total 1\n")
        {
            for name in [
                "atmorep_train_loss",
                "atmorep_train_tokens_per_second",
                "atmorep_train_step_seconds",
                "atmorep_train_field_loss{field=\"t\"}",
                "atmorep_train_field_loss{field=\"z\"}",
            ] {
                assert!(body.contains(name), "{name} missing:\n{body}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no training metrics on 127.0.0.1:{port} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
