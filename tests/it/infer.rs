//! Evaluation and global inference against real loader processes, and the cyclone
//! tracker on the model's output: a short training run on a tiny synthetic store of
//! `vo` and `z`, then `atmorep eval` (rows per task, field, level and baseline with bootstrap
//! intervals; the training split's per-point climatology beats the global mean, the model
//! beats the global mean on `z`), `atmorep infer` (a Zarr store the loader opens, holding the model's global
//! reconstruction within a fraction of the truth's spread; `--forecast`, the future hidden,
//! as good as eval's forecast task and far better than `--untrained`), a second loader serving
//! that store and `atmorep track` on it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{Dataset, Hyperslab};
use atmorep_proto::calendar::{TimeFormat, format_time};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_testkit::{Server, atmorep_bin};
use atmorep_trainer::{RunOptions, TrainConfig, Trainer};
use tempfile::TempDir;

/// 10° grid, 40 steps of 6 h, `vo` and `z` on 850 and 500 hPa.
fn store_config() -> SynthConfig {
    SynthConfig {
        grid_deg: 10.0,
        steps: 40,
        step_hours: 6,
        levels: vec![850, 500],
        variables: vec!["vo".into(), "z".into()],
        ..SynthConfig::default()
    }
}

async fn serve(dir: &Path, name: &str, store: &Path) -> Server {
    let dataset = format!("{name}={}", store.display());
    Server::start(
        &["--dataset".into(), dataset],
        &dir.join(format!("{name}.log")),
    )
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(atmorep_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running atmorep");
    assert!(
        out.status.success(),
        "atmorep {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Root-mean-square difference and the spread (std) of `truth`.
fn rmse_and_spread(model: &[f32], truth: &[f32]) -> (f64, f64) {
    let n = truth.len() as f64;
    let mean = truth.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let spread = (truth
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let rmse = (model
        .iter()
        .zip(truth)
        .map(|(&m, &t)| (f64::from(m) - f64::from(t)).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    (rmse, spread)
}

/// Per (field, level) of the store an `infer` wrote: its RMSE against the truth, the truth's
/// spread and eval's RMSE of the model on `task`. The store starts `past` steps after the truth
/// (a forecast's first steps have no past) and must hold finite values on the truth's levels.
async fn level_errors(
    store: &Path,
    truth: &Dataset,
    rows: &[serde_json::Value],
    task: &str,
    past: usize,
) -> Vec<(&'static str, f64, f64, f64, f64)> {
    let model = Dataset::open(store.to_str().unwrap()).await.unwrap();
    assert_eq!(model.times, truth.times[past..], "{}", store.display());
    let mut out = Vec::new();
    for name in ["vo", "z"] {
        let (mv, tv) = (model.variable(name).unwrap(), truth.variable(name).unwrap());
        assert_eq!(mv.levels, tv.levels);
        let m = model.read(&Hyperslab::full(&model, mv)).await.unwrap();
        let t = truth.read(&Hyperslab::full(truth, tv)).await.unwrap();
        assert!(m.iter().all(|v| v.is_finite()), "{name}: non-finite output");
        let plane = truth.lats.len() * truth.lons.len();
        let levels = mv.levels.len();
        for l in 0..levels {
            // (time, level, lat, lon) planes of level `l`, from time index `skip` on.
            let pick = |v: &[f32], skip: usize| -> Vec<f32> {
                v.chunks(plane)
                    .skip(skip * levels)
                    .enumerate()
                    .filter(|(k, _)| k % levels == l)
                    .flat_map(|(_, p)| p.to_vec())
                    .collect()
            };
            let (rmse, spread) = rmse_and_spread(&pick(&m, 0), &pick(&t, past));
            let eval_rmse = rows
                .iter()
                .find(|r| {
                    r["task"] == task
                        && r["field"] == name
                        && r["level"] == mv.levels[l]
                        && r["baseline"] == "climatology"
                })
                .unwrap()["model_rmse"]
                .as_f64()
                .unwrap();
            out.push((name, mv.levels[l], rmse, spread, eval_rmse));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_and_global_inference_on_a_loader_and_tracking_on_the_output() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("tiny.zarr");
    write_store(&store_config(), &store, &NoProgress).expect("writing the store");
    let truth = Dataset::open(store.to_str().unwrap()).await.unwrap();
    GlobalStats::compute_into(
        &truth,
        &GlobalStats::default_dir(&store),
        false,
        &NoProgress,
    )
    .await
    .expect("statistics");
    let server = serve(dir.path(), "tiny", &store).await;
    let endpoint = server.endpoint();

    // The tiny model on `vo` and `z` instead of `t` and `z`.
    let mut cfg = TrainConfig::example();
    cfg.steps = 150;
    cfg.request.dataset = "tiny".into();
    cfg.model.fields[0].name = "vo".into();
    cfg.request.fields[0].name = "vo".into();
    cfg.validation.every = 0;
    let run_dir = dir.path().join("run");
    let client = LoaderClient::connect(ClientConfig::new([endpoint.clone()]))
        .await
        .unwrap();
    let mut trainer = Trainer::new(cfg).unwrap();
    let opts = RunOptions {
        out: Some(run_dir.clone()),
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(120), trainer.run(&client, &opts))
        .await
        .expect("training took over 120 s")
        .unwrap();
    let run_arg = run_dir.to_str().unwrap();

    // Eval: one row per task × field × level × applicable baseline, in physical units.
    let report = dir.path().join("eval.parquet");
    let out = run(&[
        "eval",
        run_arg,
        "--loader",
        &endpoint,
        "--split",
        "test",
        "--batches",
        "8",
        "--json",
        "--out",
        report.to_str().unwrap(),
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();

    assert!(report.exists());
    for task in ["bert", "forecast"] {
        for field in ["vo", "z"] {
            for level in [850.0, 500.0] {
                let find = |baseline: &str| {
                    rows.iter()
                        .find(|r| {
                            r["task"] == task
                                && r["field"] == field
                                && r["level"] == level
                                && r["baseline"] == baseline
                        })
                        .unwrap_or_else(|| panic!("no {baseline} row for {task} {field} {level}"))
                };
                let (clim, global) = (find("climatology"), find("global mean"));
                let f = |r: &serde_json::Value, key: &str| r[key].as_f64().unwrap();
                let ci = |r: &serde_json::Value, key: &str| {
                    [r[key][0].as_f64().unwrap(), r[key][1].as_f64().unwrap()]
                };
                let (model, base) = (f(clim, "model_rmse"), f(clim, "baseline_rmse"));
                assert!(model.is_finite() && base > 0.0, "{clim}");
                // Every score within its bootstrap interval, from more than one sample.
                for (value, interval) in [
                    (model, ci(clim, "model_rmse_ci")),
                    (base, ci(clim, "baseline_rmse_ci")),
                    (f(clim, "skill"), ci(clim, "skill_ci")),
                ] {
                    assert!(interval[0] <= value && value <= interval[1], "{clim}");
                }
                assert!(clim["samples"].as_u64().unwrap() > 1, "{clim}");
                // The training split's mean at each point is closer to the truth than one
                // global mean per level and month.
                assert!(base < f(global, "baseline_rmse"), "{clim}\n{global}");
                if field == "z" {
                    assert!(
                        model < f(global, "baseline_rmse"),
                        "the model does not beat the global mean: {global}"
                    );
                }
            }
        }
    }
    // Forecast masks always have a past: persistence is scored there.
    assert!(
        rows.iter()
            .any(|r| r["task"] == "forecast" && r["baseline"] == "persistence"),
        "{rows:?}"
    );

    // Global inference: a store the loader opens, on the truth's grid and time axis.
    let model_store = dir.path().join("model.zarr");
    run(&[
        "infer",
        run_arg,
        "--loader",
        &endpoint,
        "--out",
        model_store.to_str().unwrap(),
    ]);
    let model = Dataset::open(model_store.to_str().unwrap()).await.unwrap();
    // The grid from the loader's (first, step) description: equal up to rounding.
    let close = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    };
    assert!(close(&model.lats, &truth.lats), "{:?}", model.lats);
    assert!(close(&model.lons, &truth.lons), "{:?}", model.lons);
    // Per level: the reconstruction is close to the truth where a misplaced tile, a wrong level
    // or month, or a missing denormalization is not. Every token predicted with half its
    // neighbours masked: about the BERT error eval measured.
    for (name, level, rmse, spread, eval_rmse) in
        level_errors(&model_store, &truth, &rows, "bert", 0).await
    {
        assert!(
            rmse < 1.3 * eval_rmse && rmse < spread,
            "{name} level {level}: reconstruction RMSE {rmse}, eval's BERT RMSE {eval_rmse}, \
             spread {spread}"
        );
    }

    // A forecast: each tile's last step hidden, tiles a step apart, so every step with a
    // past is forecast once — about as well as eval's forecast task measured. The same from
    // the untrained model (the checkpoint's config, its seeded initial weights) is far worse:
    // what the network learned.
    let forecast_store = dir.path().join("forecast.zarr");
    let untrained_store = dir.path().join("untrained.zarr");
    for (store, untrained) in [(&forecast_store, false), (&untrained_store, true)] {
        let mut args = vec![
            "infer",
            run_arg,
            "--loader",
            &endpoint,
            "--forecast",
            "--out",
            store.to_str().unwrap(),
        ];
        if untrained {
            args.push("--untrained");
        }
        run(&args);
    }
    // The first step has no past.
    let trained = level_errors(&forecast_store, &truth, &rows, "forecast", 1).await;
    let untrained = level_errors(&untrained_store, &truth, &rows, "forecast", 1).await;
    for (&(name, level, rmse, spread, eval_rmse), &(.., untrained_rmse, _, _)) in
        trained.iter().zip(&untrained)
    {
        assert!(
            rmse < 1.3 * eval_rmse && rmse < spread && 1.4 * rmse < untrained_rmse,
            "{name} {level}: forecast RMSE {rmse}, eval's {eval_rmse}, untrained \
             {untrained_rmse}, spread {spread}"
        );
    }
    // A forecast needs its past: a --start without one is refused, naming it.
    let out = Command::new(atmorep_bin())
        .args([
            "infer",
            run_arg,
            "--loader",
            &endpoint,
            "--forecast",
            "--out",
        ])
        .arg(dir.path().join("early.zarr"))
        .args(["--start", &format_time(truth.times[0], TimeFormat::Iso)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--start") && stderr.contains("1 steps before"),
        "{stderr}"
    );

    // Embeddings: one D-vector per token of each exported sample, with its token info.
    let emb = dir.path().join("emb.zarr");
    run(&[
        "embed",
        run_arg,
        "--loader",
        &endpoint,
        "--out",
        emb.to_str().unwrap(),
        "--samples",
        "12",
    ]);
    let store = std::sync::Arc::new(zarrs::filesystem::FilesystemStore::new(&emb).unwrap());
    for field in ["vo", "z"] {
        let array =
            zarrs::array::Array::open(store.clone(), &format!("/{field}_embedding")).unwrap();
        assert_eq!(array.shape(), &[12, 16, 32], "{field}");
        let values: Vec<f32> = array
            .retrieve_array_subset(&zarrs::array::ArraySubset::new_with_shape(vec![12, 16, 32]))
            .unwrap();
        assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|&v| v != 0.0));
        let info =
            zarrs::array::Array::open(store.clone(), &format!("/{field}_token_info")).unwrap();
        assert_eq!(info.shape(), &[12, 16, 8]);
    }

    // The tracker runs on the model's output exactly as on reanalysis.
    let model_server = serve(dir.path(), "model", &model_store).await;
    let tracks = dir.path().join("tracks.csv");
    run(&[
        "track",
        "--loader",
        &model_server.endpoint(),
        "--dataset",
        "model",
        "--out",
        tracks.to_str().unwrap(),
    ]);
    let csv = std::fs::read_to_string(&tracks).unwrap();
    assert!(
        csv.lines()
            .next()
            .is_some_and(|h| h.starts_with("SID,ISO_TIME,LAT,LON")),
        "{csv}"
    );
}
