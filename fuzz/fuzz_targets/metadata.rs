//! Store discovery: arbitrary bytes as the metadata document the loader reads first (the first
//! byte picks `.zmetadata`, Zarr v2 consolidated, or `zarr.json`, Zarr v3 with or without
//! consolidated metadata) in an in-memory store, through the same discovery the loader runs on
//! a real store: JSON, array metadata, codecs, data types, dimension names and attributes. It
//! must never panic: an error names what is wrong.

#![no_main]

use std::sync::{Arc, LazyLock};

use atmorep_loader::StoreLocation;
use atmorep_loader::store::discovery::discover;
use libfuzzer_sys::fuzz_target;
use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutPayload};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let key = if kind % 2 == 0 { ".zmetadata" } else { "zarr.json" };
    RUNTIME.block_on(async {
        let store = Arc::new(InMemory::new());
        store
            .put(&key.into(), PutPayload::from(bytes.to_vec()))
            .await
            .unwrap();
        let location = StoreLocation::from_store("memory://fuzz", store, "");
        let _ = discover(&location).await;
    });
});
