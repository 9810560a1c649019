//! Compiles `proto/` with protox (pure Rust, no system `protoc`), then generates the
//! prost messages, the tonic services and the pbjson serde impls used by the Connect
//! JSON codec. The descriptor set is also written out, without source info, for gRPC server
//! reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/filesystem/filesystem.proto",
    "proto/process/process.proto",
    "proto/envd_ext/processes.proto",
    "proto/envd_ext/metadata.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    let descriptor_path = out_dir.join("descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    // What reflection serves: the same descriptors without source info (comments and
    // locations), as protoc-gen-go embeds them in envd. With it, the two reflection
    // services held hundreds of KiB of decoded locations for as long as the daemon ran.
    let mut reflection = fds.clone();
    for file in &mut reflection.file {
        file.source_code_info = None;
    }
    std::fs::write(
        out_dir.join("reflection.bin"),
        prost::Message::encode_to_vec(&reflection),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf.Timestamp", "crate::proto::wkt::Timestamp")
        .compile_fds(fds)?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .extern_path(".google.protobuf.Timestamp", "crate::proto::wkt::Timestamp")
        .ignore_unknown_fields()
        .build(&[".filesystem", ".process", ".envd_ext"])?;
    Ok(())
}
