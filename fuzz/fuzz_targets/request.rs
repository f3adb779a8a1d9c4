//! Request validation: arbitrary bytes decoded as a `BatchRequest` or a `SampleRequest` (the
//! first byte picks which) and checked by the server exactly as `StreamBatches` and `GetSample`
//! check them before reading any data. It must never panic, and a bad request must be refused
//! with a code a client can act on (over a server limit: RESOURCE_EXHAUSTED), never INTERNAL or
//! UNKNOWN.
//!
//! The server serves a tiny synthetic store (written once under the temporary folder) as
//! dataset `tiny`.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use atmorep_loader::Dataset;
use atmorep_loader::pipeline::normalization::{GLOBAL_FILE, GlobalStats};
use atmorep_loader::progress::NoProgress;
use atmorep_loader::service::{LoaderService, ServerConfig};
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_proto::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Code;

struct Server {
    runtime: tokio::runtime::Runtime,
    service: LoaderService,
}

/// 10° grid, 40 steps of 6 h, `z` and `t` on two levels, with global statistics.
fn store() -> PathBuf {
    let path = std::env::temp_dir().join("atmorep-fuzz-request.zarr");
    let stats = GlobalStats::default_dir(&path);
    if !stats.join(GLOBAL_FILE).exists() {
        let config = SynthConfig {
            grid_deg: 10.0,
            steps: 40,
            step_hours: 6,
            levels: vec![850, 500],
            variables: vec!["z".into(), "t".into()],
            ..SynthConfig::default()
        };
        write_store(&config, &path, &NoProgress).expect("writing the store");
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let dataset = Dataset::open(path.to_str().unwrap()).await.unwrap();
            GlobalStats::compute_into(&dataset, &stats, true, &NoProgress)
                .await
                .expect("statistics");
        });
    }
    path
}

static SERVER: LazyLock<Server> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config: ServerConfig = serde_json::from_value(serde_json::json!({
        "datasets": [{ "name": "tiny", "url": store().to_str().unwrap() }],
    }))
    .unwrap();
    let service = runtime
        .block_on(LoaderService::open(config))
        .expect("serving the store");
    Server { runtime, service }
});

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let server = &*SERVER;
    let _entered = server.runtime.enter();
    let checked = if kind % 2 == 0 {
        let Ok(request) = pb::BatchRequest::decode(bytes) else {
            return;
        };
        server.service.check_batch_request(&request)
    } else {
        let Ok(request) = pb::SampleRequest::decode(bytes) else {
            return;
        };
        server.service.check_sample_request(request)
    };
    if let Err(status) = checked {
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
            ),
            "a request refused with {:?}: {}",
            status.code(),
            status.message()
        );
    }
});
