//! The committed seed corpora of the fuzz targets (`fuzz/corpus/<target>/`), made from real
//! inputs: the requests of `examples/train.toml` and `examples/request.toml` encoded with prost, the CF time
//! attributes and metadata documents of the fixture stores. The test fails when a committed
//! seed differs from what this file makes (the wire format or a fixture changed); run it with
//! `ATMOREP_BLESS_FUZZ_SEEDS=1` to rewrite them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atmorep_proto::pb;
use atmorep_proto::request::RequestConfig;
use atmorep_testkit::workspace_root;
use atmorep_trainer::TrainConfig;
use prost::Message;
use serde_json::{Map, Value};

/// The seeds of each target, by file name.
fn seeds() -> BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> {
    let root = workspace_root();
    let mut all = BTreeMap::new();

    // request: a kind byte (even: BatchRequest, odd: SampleRequest), then the message.
    // The training example's tasks fit the fuzz target's store (the tests' tiny store); the
    // request example asks for a 1° window, too big for it.
    let train = TrainConfig::example();
    let mut requests = BTreeMap::new();
    let mut put = |name: &str, kind: u8, bytes: Vec<u8>| {
        requests.insert(name.to_string(), [vec![kind], bytes].concat());
    };
    for i in 0..train.tasks().len() {
        let mut task = train.task_request(i);
        task.dataset = "tiny".into();
        put(
            &format!("batch-train-task-{i}"),
            0,
            task.to_proto().encode_to_vec(),
        );
        let mut validation = train.validation_request(i);
        validation.dataset = "tiny".into();
        put(
            &format!("batch-validation-task-{i}"),
            0,
            validation.to_proto().encode_to_vec(),
        );
    }
    let text = std::fs::read_to_string(root.join("examples/request.toml")).unwrap();
    let mut example = RequestConfig::from_toml(&text).expect("examples/request.toml");
    example.dataset = "tiny".into();
    put(
        "batch-request-example",
        0,
        example.to_proto().encode_to_vec(),
    );
    let mut batch = train.task_request(0);
    batch.dataset = "tiny".into();
    let batch = batch.to_proto();
    let mut resumed = batch.clone();
    resumed.resume = Some(pb::Cursor {
        epoch: 1,
        position: 3,
    });
    resumed.end_epoch = Some(2);
    resumed.rank = 1;
    resumed.world_size = 2;
    put("batch-resumed-rank1of2", 0, resumed.encode_to_vec());
    let mut other = batch.clone();
    other.dataset = "era5".into();
    put("batch-unknown-dataset", 0, other.encode_to_vec());
    // Valid-but-huge requests, refused by their cost before anything is allocated (the
    // hostile-client table of tests/it/hostile.rs): mutations of these probe its arithmetic.
    let huge = |edit: &dyn Fn(&mut pb::BatchRequest)| {
        let mut r = batch.clone();
        edit(&mut r);
        r.encode_to_vec()
    };
    let points = |r: &mut pb::BatchRequest, num_tokens: [u32; 3]| {
        r.fields.truncate(1);
        r.fields[0].num_tokens = num_tokens.to_vec();
        r.fields[0].token_size = vec![1, 1, 1];
    };
    let plan = |samples_per_block| {
        Some(pb::ReadPlan {
            block_steps: 0,
            samples_per_block,
            buffer_blocks: 0,
        })
    };
    put(
        "batch-huge-pe-beyond-the-grid",
        0,
        huge(&|r| {
            points(r, [1, 1000, 1000]);
            r.fields[0].pe = pb::PeMode::Standard as i32;
            r.fields[0].pe_width = 4096;
        }),
    );
    put(
        "batch-huge-pe",
        0,
        huge(&|r| {
            points(r, [30, 19, 36]);
            r.fields[0].pe_width = 4096;
        }),
    );
    put(
        "batch-huge-batch",
        0,
        huge(&|r| {
            points(r, [30, 19, 36]);
            r.batch_size = 256;
        }),
    );
    put(
        "batch-huge-samples-per-block",
        0,
        huge(&|r| r.read_plan = plan(1_000_000_000)),
    );
    put(
        "batch-overflowing-samples-per-block",
        0,
        huge(&|r| r.read_plan = plan(u64::MAX)),
    );
    put(
        "batch-huge-blur",
        0,
        huge(&|r| r.fields[0].blur_sigma = 10_000.0),
    );
    put(
        "batch-one-point-tiles",
        0,
        huge(&|r| {
            points(r, [1, 1, 1]);
            r.mode = pb::Mode::Tiles as i32;
        }),
    );
    let by_id = pb::SampleRequest {
        request: Some(batch.clone()),
        selector: Some(pb::sample_request::Selector::ById(pb::SampleById {
            epoch: 0,
            id: 2,
        })),
    };
    put("sample-by-id", 1, by_id.encode_to_vec());
    for (name, time) in [
        ("index", pb::sample_by_centre::Time::TimeIndex(3)),
        (
            "iso",
            pb::sample_by_centre::Time::IsoTime("2020-01-01T06:00:00Z".into()),
        ),
    ] {
        let at = pb::SampleRequest {
            request: Some(batch.clone()),
            selector: Some(pb::sample_request::Selector::ByCentre(pb::SampleByCentre {
                lat: 45.0,
                lon: -30.0,
                time: Some(time),
            })),
        };
        put(&format!("sample-by-centre-{name}"), 1, at.encode_to_vec());
    }
    all.insert("request", requests);

    // cf_time: units, a newline, the calendar, a NUL, then little-endian f64 values.
    let mut times = BTreeMap::new();
    let values: Vec<u8> = [0.0f64, 1.0, 6.0, -1.5, 1e6]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut units = std::collections::BTreeSet::new();
    for file in fixture_metadata_files(&root.join("tests/fixtures")) {
        collect_time_units(
            &serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap(),
            &mut units,
        );
    }
    units.insert((
        "hours since 1900-01-01 00:00:00.0".into(),
        Some("gregorian".into()),
    ));
    units.insert(("seconds since 1970-01-01T00:00:00+01:00".into(), None));
    assert!(units.len() >= 5, "{units:?}");
    for (i, (u, calendar)) in units.iter().enumerate() {
        let mut bytes = u.as_bytes().to_vec();
        if let Some(c) = calendar {
            bytes.push(b'\n');
            bytes.extend_from_slice(c.as_bytes());
        }
        bytes.push(0);
        bytes.extend_from_slice(&values);
        times.insert(format!("units-{i:02}"), bytes);
    }
    all.insert("cf_time", times);

    // metadata: a kind byte (even: `.zmetadata`, odd: `zarr.json`), then the document.
    let mut metadata = BTreeMap::new();
    let fixtures = root.join("tests/fixtures");
    let v3 = std::fs::read(fixtures.join("xr_v3_sharded.zarr/zarr.json")).unwrap();
    metadata.insert("v3-sharded".into(), [vec![1], v3].concat());
    let packed = std::fs::read(fixtures.join("xr_v2_packed.zarr/.zmetadata")).unwrap();
    metadata.insert("v2-packed".into(), [vec![0], packed].concat());
    let gzip = consolidate_v2(&fixtures.join("xr_v2_gzip.zarr"));
    metadata.insert("v2-gzip".into(), [vec![0], gzip].concat());
    all.insert("metadata", metadata);
    all
}

/// Every `.zattrs`, `.zmetadata` and `zarr.json` under `dir`.
fn fixture_metadata_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                pending.push(path);
            } else if [".zattrs", ".zmetadata", "zarr.json"].contains(&name.as_str()) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The `(units, calendar)` pairs of every object in `value` whose units are a time encoding.
fn collect_time_units(
    value: &Value,
    out: &mut std::collections::BTreeSet<(String, Option<String>)>,
) {
    match value {
        Value::Object(map) => {
            if let Some(u) = map.get("units").and_then(Value::as_str)
                && u.contains(" since ")
            {
                let calendar = map.get("calendar").and_then(Value::as_str);
                out.insert((u.to_string(), calendar.map(str::to_string)));
            }
            map.values().for_each(|v| collect_time_units(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_time_units(v, out)),
        _ => {}
    }
}

/// The `.zmetadata` that consolidating the v2 store at `store` would write.
fn consolidate_v2(store: &Path) -> Vec<u8> {
    let mut entries = Map::new();
    let read = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    for name in [".zgroup", ".zattrs"] {
        entries.insert(name.into(), read(&store.join(name)));
    }
    let mut arrays: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| store.join(n).join(".zarray").exists())
        .collect();
    arrays.sort();
    for name in arrays {
        for file in [".zarray", ".zattrs"] {
            let path = store.join(&name).join(file);
            if path.exists() {
                entries.insert(format!("{name}/{file}"), read(&path));
            }
        }
    }
    let doc = serde_json::json!({ "metadata": entries, "zarr_consolidated_format": 1 });
    serde_json::to_vec_pretty(&doc).unwrap()
}

#[test]
fn the_committed_fuzz_seeds_are_current() {
    let corpus = workspace_root().join("fuzz/corpus");
    let bless = std::env::var_os("ATMOREP_BLESS_FUZZ_SEEDS").is_some();
    for (target, files) in seeds() {
        let dir = corpus.join(target);
        if bless {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut committed: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (bless the seeds)", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        committed.sort();
        if bless {
            for (name, bytes) in &files {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            continue;
        }
        assert_eq!(
            committed,
            files.keys().cloned().collect::<Vec<_>>(),
            "{target}: seed files (ATMOREP_BLESS_FUZZ_SEEDS=1 rewrites them)"
        );
        for (name, bytes) in &files {
            assert!(
                std::fs::read(dir.join(name)).unwrap() == *bytes,
                "{target}/{name} is stale (ATMOREP_BLESS_FUZZ_SEEDS=1 rewrites it)"
            );
        }
    }
}
