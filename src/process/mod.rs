//! The process core: spawning (pipes or a terminal, as a chosen user), output fan-out to
//! any number of subscribers, input, signals to the whole process group, exit retention.
//! Transport-free: `rpc::process` maps it to the `process.Process` service.

pub mod deadline;
pub mod exit;
pub mod keeper;
pub mod output;
pub mod pty;
pub mod registry;
pub mod spawn;
