//! `atmorep ablate` against a real loader process: a tiny ablation (the example training config
//! on a 10° store, a few steps per variant) run twice as the CLI.
//!
//! Covered: the table has one row per variant, in order, with the mean ± std over three
//! seeds; the blurred variant is scored on the same unblurred values as the base; the two runs
//! write the same
//! table and the same evaluation numbers (every variant's stream and weights are pure functions
//! of the seeds); the Parquet holds every variant's rows; both charts are PNGs with content.
//! Bad input — an unknown `--only` name, a base config whose field the loader lacks — fails
//! naming it and writes no table.

use std::path::Path;

use arrow_array::Array;

use atmorep_testkit::cli::{atmorep, stdout_of_success};
use atmorep_testkit::tiny::{store_with_stats, tiny_with};
use atmorep_testkit::{Server, workspace_root};

fn assert_png(path: &Path) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .to_rgb8();
    assert!(
        img.width() >= 1000 && img.height() >= 300,
        "{}",
        path.display()
    );
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 50,
        "{}: {} colours",
        path.display(),
        colours.len()
    );
}

/// The example training config (`t` and `z`) on dataset `tiny`, with an ablation of blur and
/// two explicit variants, 5 steps each; returns the ablation file.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let example = std::fs::read_to_string(workspace_root().join("examples/train.toml")).unwrap();
    let train = example
        .replace("dataset = \"era5\"", "dataset = \"tiny\"")
        .replacen("every = 50", "every = 3", 1);
    std::fs::write(dir.join("train.toml"), train).unwrap();
    let ablation = dir.join("ablation.toml");
    std::fs::write(
        &ablation,
        r#"
base = "train.toml"
steps = 5
studies = ["blur"]
blur_sigma = 0.8

[[variants]]
name = "aux=class-token"
aux_info = "class-token"

[[variants]]
name = "no-pe-no-info"
aux_info = "none"
pe = "none"

[[variants]]
name = "ensemble=3"
ensemble = 3

[eval]
batches = 1
"#,
    )
    .unwrap();
    ablation
}

/// The rows of the markdown's first table (the variants), as their first cells.
fn variant_rows(md: &str) -> Vec<String> {
    md.lines()
        .skip_while(|l| !l.starts_with("| variant"))
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .map(|l| l.split('|').nth(1).unwrap().trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_runs_of_an_ablation_give_the_same_table_with_one_row_per_variant() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_stats(dir.path(), "tiny.zarr", &tiny_with(&["t", "z"])).await;
    let server = Server::start(
        &["--dataset".into(), format!("tiny={}", store.display())],
        &dir.path().join("loader.log"),
    );
    let config = write_config(dir.path());
    let endpoint = server.endpoint();
    let run = |out: &str| {
        let out = dir.path().join(out);
        let stdout = stdout_of_success(&atmorep(&[
            "ablate",
            "--config",
            config.to_str().unwrap(),
            "--loader",
            &endpoint,
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]));
        (out, stdout)
    };
    let (first, stdout) = run("first");
    let md = std::fs::read_to_string(first.join("ablation.md")).unwrap();
    assert!(stdout.contains(&md), "the table is printed:\n{stdout}");
    let expected = [
        "base",
        "blur=0.8",
        "aux=class-token",
        "no-pe-no-info",
        "ensemble=3",
    ];
    assert_eq!(variant_rows(&md), expected, "{md}");
    // Every variant was scored on both fields (no empty cell) from three seeds (mean ± std),
    // and the baselines are there.
    let rows: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| variant"))
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .collect();
    assert_eq!(rows.len(), 5, "{md}");
    for line in rows {
        assert!(!line.contains("| – |"), "{line}");
        assert_eq!(
            line.matches(" ± ").count(),
            5,
            "loss, two RMSEs, two skills: {line}"
        );
    }
    assert!(md.contains("3 model seeds per variant"), "{md}");
    // The ensemble's own table: CRPS and spread–skill per field, mean ± std over the seeds.
    let ensemble_rows: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("Ensembles"))
        .filter(|l| l.starts_with("| ensemble=3 |"))
        .collect();
    assert_eq!(ensemble_rows.len(), 1, "{md}");
    assert!(ensemble_rows[0].starts_with("| ensemble=3 | 3 |"), "{md}");
    assert_eq!(
        ensemble_rows[0].matches(" ± ").count(),
        4,
        "two CRPS, two spread–skill ratios: {md}"
    );
    for b in ["climatology", "global mean", "persistence", "interpolation"] {
        assert!(md.contains(&format!("| {b} |")), "{md}");
    }
    // The blurred variant was scored on the same (unblurred) values as the base: every
    // baseline's error, a function of the targets alone, is the same for both.
    let baseline_errors = |variant: &str| -> Vec<(String, f64)> {
        let file = std::fs::File::open(first.join("ablation.parquet")).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let col = |name: &str| batch.column_by_name(name).unwrap().clone();
            let strings = |name: &str| {
                col(name)
                    .as_any()
                    .downcast_ref::<arrow_array::StringArray>()
                    .unwrap()
                    .clone()
            };
            let floats = |name: &str| {
                col(name)
                    .as_any()
                    .downcast_ref::<arrow_array::Float64Array>()
                    .unwrap()
                    .clone()
            };
            let seeds = col("seed");
            let seeds = seeds
                .as_any()
                .downcast_ref::<arrow_array::UInt64Array>()
                .unwrap();
            let (v, t, f, b) = (
                strings("variant"),
                strings("task"),
                strings("field"),
                strings("baseline"),
            );
            let (level, base) = (floats("level"), floats("baseline_rmse"));
            let crps = floats("crps");
            for i in 0..batch.num_rows() {
                // Ensemble scores where the model has members, and only there.
                assert_eq!(
                    crps.is_valid(i),
                    v.value(i) == "ensemble=3",
                    "{} crps {:?}",
                    v.value(i),
                    crps.is_valid(i).then(|| crps.value(i))
                );
                if v.value(i) == variant && seeds.value(i) == 0 {
                    let key = format!(
                        "{} {} {} {}",
                        t.value(i),
                        f.value(i),
                        level.value(i),
                        b.value(i)
                    );
                    out.push((key, base.value(i)));
                }
            }
        }
        out
    };
    let (base, blurred) = (baseline_errors("base"), baseline_errors("blur=0.8"));
    assert!(!base.is_empty());
    assert_eq!(base, blurred);
    for chart in ["ablation-bars.png", "ablation-losses.png"] {
        assert_png(&first.join(chart));
    }
    let parquet = std::fs::read(first.join("ablation.parquet")).unwrap();
    assert!(parquet.starts_with(b"PAR1") && parquet.ends_with(b"PAR1"));
    for v in expected {
        assert!(
            parquet.windows(v.len()).any(|w| w == v.as_bytes()),
            "variant {v} is in the Parquet"
        );
    }
    for v in expected {
        let run = first.join("runs").join(v.replace('=', "_"));
        assert!(run.join("metrics").is_dir(), "{}", run.display());
        let seed2 = first
            .join("runs")
            .join(format!("{}-seed2", v.replace('=', "_")));
        assert!(seed2.join("metrics").is_dir(), "{}", seed2.display());
    }

    let (second, _) = run("second");
    let again = std::fs::read_to_string(second.join("ablation.md")).unwrap();
    let strip = |s: &str| {
        s.replace(first.to_str().unwrap(), "")
            .replace(second.to_str().unwrap(), "")
    };
    assert_eq!(strip(&md), strip(&again), "two runs, two tables");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_field_or_an_unknown_variant_is_named_and_writes_no_table() {
    let dir = tempfile::tempdir().unwrap();
    // The loader's `tiny` has `t` only; the config also asks for `z`.
    let store = store_with_stats(dir.path(), "t-only.zarr", &tiny_with(&["t"])).await;
    let server = Server::start(
        &["--dataset".into(), format!("tiny={}", store.display())],
        &dir.path().join("loader.log"),
    );
    let endpoint = server.endpoint();

    let config = write_config(dir.path());
    let out = dir.path().join("unknown");
    let failed = atmorep(&[
        "ablate",
        "--config",
        config.to_str().unwrap(),
        "--loader",
        &endpoint,
        "--out",
        out.to_str().unwrap(),
        "--only",
        "aux=telepathy",
    ]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("aux=telepathy") && err.contains("no-pe-no-info"),
        "{err}"
    );
    assert!(!out.join("ablation.md").exists());

    // The first variant's stream is refused, naming the field.
    let out = dir.path().join("missing");
    let failed = atmorep(&[
        "ablate",
        "--config",
        config.to_str().unwrap(),
        "--loader",
        &endpoint,
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("z"), "names the field: {err}");
    assert!(err.contains("base"), "names the variant: {err}");
    assert!(!out.join("ablation.md").exists());
}
