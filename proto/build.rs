//! Compiles the .proto files with the protoc binary vendored by the
//! `protoc-bin-vendored` crate, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/raftmq/v1/messaging.proto",
            "proto/raftmq/v1/acl.proto",
            "proto/raftmq/raft/v1/raft.proto",
        ],
        &["proto"],
    )?;

    // RocketMQ 5 gRPC API (apache.rocketmq.v2) for the official SDKs. The
    // google/protobuf imports come from the vendored protoc's include directory;
    // prost maps them to prost_types. The descriptor set of these files is kept
    // for the wire-compatibility test (tests/rocketmq_wire.rs).
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("rocketmq_v2_descriptor.bin"))
        .compile_protos(
            &[
                PathBuf::from("proto/apache/rocketmq/v2/definition.proto"),
                PathBuf::from("proto/apache/rocketmq/v2/service.proto"),
            ],
            &[PathBuf::from("proto"), well_known],
        )?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
