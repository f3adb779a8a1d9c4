//! `atmorep plot` against real processes: a loader process (`atmorep loader serve`) over a tiny
//! synthetic store, a short `atmorep train` run, and every plot command run as the CLI.
//!
//! Covered: each command writes PNGs that decode, have the size the command reports
//! and are no flat picture; the attention figures have one panel per layer and head; the token
//! GIF has a frame per time slice; the training figure has its per-field loss chart. Bad input — a missing run folder or log, a sample id out of
//! range, a checkpoint whose fields the loader lacks, a level the store lacks — fails with an
//! error naming it and leaves no picture behind.

use std::path::{Path, PathBuf};
use std::process::Output;

use atmorep_testkit::cli::{atmorep, stdout_of_success};
use atmorep_testkit::tiny::{store_with_stats, tiny_with};
use atmorep_testkit::{Server, workspace_root};
use tempfile::TempDir;

fn serve(store: &Path, log: &Path) -> Server {
    let dataset = format!("tiny={}", store.display());
    Server::start(&["--dataset".into(), dataset], log)
}

fn stderr_of_failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A 20-step `atmorep train` of the example config into `dir/run`, validating every 10 steps.
fn train(dir: &Path, server: &Server) -> PathBuf {
    let example = std::fs::read_to_string(workspace_root().join("examples/train.toml")).unwrap();
    let config = dir.join("train.toml");
    std::fs::write(
        &config,
        example
            .replace("dataset = \"era5\"", "dataset = \"tiny\"")
            .replacen("every = 50", "every = 10", 1),
    )
    .unwrap();
    let run = dir.join("run");
    let endpoint = server.endpoint();
    stdout_of_success(&atmorep(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--loader",
        &endpoint,
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "20",
        "--quiet",
    ]));
    run
}

/// The `wrote PATH (W×H, N panels)` lines of a plot command.
fn written(stdout: &str) -> Vec<(PathBuf, (u32, u32), usize)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("wrote ")?;
            let (path, dims) = rest.split_once(" (")?;
            let (size, panels) = dims.split_once(", ")?;
            let (w, h) = size.split_once('×')?;
            let panels = panels.strip_suffix(" panels)")?;
            Some((
                PathBuf::from(path),
                (w.parse().ok()?, h.parse().ok()?),
                panels.parse().ok()?,
            ))
        })
        .collect()
}

/// Decodes the PNG, checks its size and that it is no flat picture.
fn assert_png(path: &Path, size: (u32, u32)) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .to_rgb8();
    assert_eq!(img.dimensions(), size, "{}", path.display());
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 50,
        "{}: only {} colours",
        path.display(),
        colours.len()
    );
}

fn pictures_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plot_command_draws_from_a_loader_process_and_a_training_run() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "tiny.zarr", &tiny_with(&["z", "t"])).await;
    let server = serve(&store, &dir.path().join("server.log"));
    let run = train(dir.path(), &server);
    let endpoint = server.endpoint();
    let figs = dir.path().join("figs");
    let (run_s, figs_s) = (run.to_str().unwrap(), figs.to_str().unwrap());

    // Attention: per field a matrix figure and a query map, each layers × heads panels.
    let out = stdout_of_success(&atmorep(&[
        "plot",
        "attention",
        run_s,
        "--loader",
        &endpoint,
        "--sample",
        "0",
        "--out",
        figs_s,
    ]));
    let ckpt = atmorep_trainer::checkpoint::load(&run, &atmorep_trainer::Device::Cpu).unwrap();
    let model = &ckpt.config.model;
    let attention = written(&out);
    assert_eq!(attention.len(), 2 * model.fields.len(), "{out}");
    for (path, size, panels) in &attention {
        assert_eq!(*panels, model.encoder_layers * model.num_heads, "{out}");
        assert_png(path, *size);
    }

    // Tokens: a PNG and a GIF per field and level; the GIF has a frame per time slice.
    let out = stdout_of_success(&atmorep(&[
        "plot", "tokens", run_s, "--loader", &endpoint, "--sample", "1", "--out", figs_s,
    ]));
    let tokens = written(&out);
    assert_eq!(tokens.len(), 4, "{out}");
    for (path, size, panels) in &tokens {
        assert_eq!(*panels, 4 * 2, "4 rows × 2 time slices");
        assert_png(path, *size);
        let gif = std::fs::File::open(path.with_extension("gif")).unwrap();
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif)).unwrap();
        assert_eq!(image::AnimationDecoder::into_frames(decoder).count(), 2);
    }

    // The sample centred on a storm of the store: its window holds the storm's centre.
    let tracks = atmorep_track::read_tracks_csv(&dir.path().join("tiny.tracks.csv")).unwrap();
    let storm = &tracks[0].points[tracks[0].points.len() / 2];
    let at = format!(
        "{},{},{}",
        atmorep_proto::calendar::format_time(
            storm.time_unix,
            atmorep_proto::calendar::TimeFormat::Iso
        ),
        storm.lat,
        storm.lon
    );
    let out = stdout_of_success(&atmorep(&[
        "plot", "tokens", run_s, "--loader", &endpoint, "--at", &at, "--out", figs_s,
    ]));
    assert_eq!(written(&out).len(), 4, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("the sample centred at"))
        .unwrap_or_else(|| panic!("no window line: {out}"));
    let numbers: Vec<f64> = line
        .split(['…', ',', ' ', '°'])
        .filter_map(|w| w.parse().ok())
        .collect();
    let [.., lat0, lat1, lon0, lon1] = numbers[..] else {
        panic!("{line}")
    };
    assert!(
        (lat0..=lat1).contains(&storm.lat) && (lon0..=lon1).contains(&storm.lon),
        "{line} does not hold {at}"
    );
    let err = stderr_of_failure(&atmorep(&[
        "plot",
        "tokens",
        run_s,
        "--loader",
        &endpoint,
        "--at",
        "2020-01-01,95,0",
        "--out",
        figs_s,
    ]));
    assert!(err.contains("latitude `95`"), "{err}");

    // Training curves from the run's Parquet log: the log has per-field losses, so the loss
    // per field is a fifth chart.
    let out = stdout_of_success(&atmorep(&["plot", "training", run_s]));
    let training = written(&out);
    assert_eq!(training.len(), 1, "{out}");
    assert_eq!(training[0].0, run.join("training.png"));
    assert_eq!(training[0].2, 5, "{out}");
    assert_png(&training[0].0, training[0].1);
    let rows = atmorep_trainer::metrics_log::read_steps(&run).unwrap();
    assert_eq!(
        atmorep_trainer::metrics_log::field_names(&rows),
        ["t", "z"],
        "the per-field columns of the step log"
    );

    // A field of the store with the synthetic cyclones' tracks.
    let field_png = figs.join("field.png");
    let tracks = dir.path().join("tiny.tracks.csv");
    let out = stdout_of_success(&atmorep(&[
        "plot",
        "field",
        store.to_str().unwrap(),
        "--var",
        "z",
        "--level",
        "850",
        "--time",
        "2020-09-03T00:00:00Z",
        "--tracks",
        tracks.to_str().unwrap(),
        "--out",
        field_png.to_str().unwrap(),
    ]));
    let field = written(&out);
    assert_eq!(field.len(), 1, "{out}");
    assert_eq!(field[0].0, field_png);
    assert_png(&field_png, field[0].1);

    // Nothing but the pictures (no temporary files left over).
    let mut names = pictures_in(&figs);
    names.sort();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with('.') && (n.ends_with(".png") || n.ends_with(".gif"))),
        "{names:?}"
    );
    assert_eq!(names.len(), 4 + 8 + 1, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_clearly_and_writes_no_picture() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "tiny.zarr", &tiny_with(&["z", "t"])).await;
    let server = serve(&store, &dir.path().join("server.log"));
    let run = train(dir.path(), &server);
    let endpoint = server.endpoint();
    let figs = dir.path().join("figs");
    let (run_s, figs_s) = (run.to_str().unwrap(), figs.to_str().unwrap());

    // A run folder that does not exist, and one without a step log.
    let missing = dir.path().join("no-such-run");
    let err = stderr_of_failure(&atmorep(&["plot", "training", missing.to_str().unwrap()]));
    assert!(
        err.contains("no-such-run") && err.contains("does not exist"),
        "{err}"
    );
    let empty = dir.path().join("empty-run");
    std::fs::create_dir(&empty).unwrap();
    let err = stderr_of_failure(&atmorep(&["plot", "training", empty.to_str().unwrap()]));
    assert!(err.contains("step log") && err.contains("metrics"), "{err}");
    assert!(pictures_in(&empty).is_empty());

    // A sample id past the split's end.
    let err = stderr_of_failure(&atmorep(&[
        "plot",
        "attention",
        run_s,
        "--loader",
        &endpoint,
        "--sample",
        "100000",
        "--out",
        figs_s,
    ]));
    assert!(
        err.contains("sample 100000") && err.contains("outside"),
        "{err}"
    );

    // A loader whose dataset lacks the checkpoint's field `t`.
    let only_z = store_with_stats(dir.path(), "only-z.zarr", &tiny_with(&["z"])).await;
    let other = serve(&only_z, &dir.path().join("other.log"));
    let err = stderr_of_failure(&atmorep(&[
        "plot",
        "tokens",
        run_s,
        "--loader",
        &other.endpoint(),
        "--sample",
        "0",
        "--out",
        figs_s,
    ]));
    assert!(
        err.contains("field `t`") && err.contains("checkpoint"),
        "{err}"
    );

    // A level the store does not have.
    let err = stderr_of_failure(&atmorep(&[
        "plot",
        "field",
        store.to_str().unwrap(),
        "--var",
        "z",
        "--level",
        "700",
        "--time",
        "0",
        "--out",
        figs.join("field.png").to_str().unwrap(),
    ]));
    assert!(err.contains("--level 700") && err.contains("850"), "{err}");

    assert!(pictures_in(&figs).is_empty(), "{:?}", pictures_in(&figs));
}
