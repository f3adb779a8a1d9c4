//! Compiles `proto/atmorep/loader/v1/loader.proto` with the pure-Rust `protox` (no `protoc` on
//! the build machines) and generates prost messages plus tonic client and server code from the
//! resulting descriptor set. The encoded descriptor set is also written to `OUT_DIR` so the
//! server can answer gRPC reflection with exactly the schema it was built from.

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &["proto/atmorep/loader/v1/loader.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("atmorep_loader_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor payloads stay `Bytes`: decoding slices the received buffer instead of copying
        // it into a `Vec<u8>`, and servers can hand over buffers they already own.
        .bytes(".atmorep.loader.v1.Tensor.data")
        // Encodes each message into a buffer reserved at its exact size (see `codec.rs`).
        .codec_path("crate::codec::ReservingCodec")
        .compile_fds(fds)?;
    Ok(())
}
