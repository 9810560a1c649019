//! Generated protobuf messages, tonic services and pbjson serde impls. Included, never
//! edited: the `.proto` files in `proto/` are the source of truth.

#![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]

pub mod wkt;

/// `package filesystem`: the upstream-compatible filesystem service.
pub mod filesystem {
    tonic::include_proto!("filesystem");
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

/// `package process`: the upstream-compatible process service.
pub mod process {
    tonic::include_proto!("process");
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `package envd_ext`: our own extension services.
pub mod envd_ext {
    tonic::include_proto!("envd_ext");
    include!(concat!(env!("OUT_DIR"), "/envd_ext.serde.rs"));
}

/// Encoded `FileDescriptorSet` of everything in `proto/`, for gRPC server reflection: source
/// info (comments, locations) left out, as in the descriptors envd serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reflection.bin"));
