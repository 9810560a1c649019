//! The filesystem core: path resolution, users, entry descriptions, xattr metadata,
//! directory creation, atomic uploads and the RPC operations. Transport-free: it never sees
//! protobuf or HTTP types, and every function here blocks (callers use `spawn_blocking`).

pub mod dirs;
pub mod entry;
pub mod journal;
pub mod lookups;
pub mod metadata;
pub mod ops;
pub mod owner;
pub mod path;
pub mod unnamed;
pub mod user;
pub mod watch;
pub mod write;
