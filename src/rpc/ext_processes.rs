//! `envd_ext.Processes`: our extension for process lifetimes. Lists managed processes with
//! their deadlines, state and end reasons, and changes deadlines (`SetTimeout`).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::process::registry::{EndReason, Phase, ProcessTable, Selector};
use crate::proto::envd_ext::{self as pb, processes_server::Processes};
use crate::rpc::convert::timestamp;

/// The extension service over the daemon's process table.
pub struct ProcessesExt {
    table: Arc<ProcessTable>,
    max_timeout: Duration,
}

impl ProcessesExt {
    /// A service over `table` accepting deadlines up to `max_timeout` from now.
    pub fn new(table: Arc<ProcessTable>, max_timeout: Duration) -> Self {
        ProcessesExt { table, max_timeout }
    }
}

fn phase(phase: Phase) -> pb::ProcessState {
    match phase {
        Phase::Running => pb::ProcessState::Running,
        Phase::Ending => pb::ProcessState::Ending,
        Phase::Exited => pb::ProcessState::Exited,
    }
}

fn reason(reason: EndReason) -> pb::EndReason {
    match reason {
        EndReason::Exit => pb::EndReason::Exit,
        EndReason::Deadline => pb::EndReason::Deadline,
        EndReason::Signal => pb::EndReason::Signal,
    }
}

#[tonic::async_trait]
impl Processes for ProcessesExt {
    async fn list(
        &self,
        _: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let processes = self
            .table
            .snapshots()
            .into_iter()
            .map(|p| pb::ManagedProcess {
                pid: p.pid,
                tag: p.tag,
                end_at: p.deadline.map(|d| timestamp(d.end_at)),
                state: phase(p.phase) as i32,
                config: Some((&p.config).into()),
                end_reason: p
                    .end
                    .as_ref()
                    .map_or(pb::EndReason::Unspecified, |(_, r)| reason(*r))
                    as i32,
                end: p.end.map(|(exit, _)| exit.into()),
            })
            .collect();
        Ok(Response::new(pb::ListProcessesResponse { processes }))
    }

    async fn set_timeout(
        &self,
        request: Request<pb::SetTimeoutRequest>,
    ) -> Result<Response<pb::SetTimeoutResponse>, Status> {
        let pb::SetTimeoutRequest {
            process,
            timeout_ms,
        } = request.into_inner();
        let selector = match process.and_then(|s| s.selector) {
            Some(crate::proto::process::process_selector::Selector::Pid(pid)) => Selector::Pid(pid),
            Some(crate::proto::process::process_selector::Selector::Tag(tag)) => Selector::Tag(tag),
            None => {
                return Err(Status::invalid_argument(
                    "a process selector (pid or tag) is required",
                ));
            }
        };
        let timeout = match u64::try_from(timeout_ms) {
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "timeout_ms must not be negative, got {timeout_ms}"
                )));
            }
            Ok(0) => None,
            Ok(ms) if Duration::from_millis(ms) > self.max_timeout => {
                return Err(Status::invalid_argument(format!(
                    "timeout_ms {ms} exceeds the limit of {} ms",
                    self.max_timeout.as_millis()
                )));
            }
            Ok(ms) => Some(Duration::from_millis(ms)),
        };
        let deadline = self.table.set_timeout(&selector, timeout)?;
        // The new deadline survives a restart before it is acknowledged.
        self.table.save().await;
        Ok(Response::new(pb::SetTimeoutResponse {
            end_at: deadline.map(|d| timestamp(d.end_at)),
        }))
    }
}
