//! Compiles the .proto files with protox (no protoc needed) and keeps the
//! encoded descriptor set for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["sandbox/v1/sandbox.proto", "agent/v1/agent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".")
        // `Processes.Connect` would clash with the generated `connect` constructor;
        // clients are built with `new(channel)` instead.
        .build_transport(false)
        .compile_fds(descriptors)?;
    for proto in ["sandbox/v1", "agent/v1"] {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
