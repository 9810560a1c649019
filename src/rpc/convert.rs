//! Conversions between the core's types and the protobuf messages. The only place that
//! knows both.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::fs::entry::{EntryInfo, FileKind};
use crate::fs::watch::{EventKind, FsEvent};
use crate::process::exit::Exit;
use crate::process::registry::Config;
use crate::proto::filesystem as pb;
use crate::proto::process as ppb;

impl From<FileKind> for pb::FileType {
    fn from(kind: FileKind) -> Self {
        match kind {
            FileKind::Unspecified => pb::FileType::Unspecified,
            FileKind::File => pb::FileType::File,
            FileKind::Directory => pb::FileType::Directory,
        }
    }
}

impl From<EntryInfo> for pb::EntryInfo {
    fn from(entry: EntryInfo) -> Self {
        pb::EntryInfo {
            name: entry.name,
            r#type: pb::FileType::from(entry.kind) as i32,
            path: entry.path.to_string_lossy().into_owned(),
            size: entry.size,
            mode: entry.mode,
            permissions: entry.permissions,
            owner: entry.owner,
            group: entry.group,
            modified_time: entry.modified.map(timestamp),
            symlink_target: entry
                .symlink_target
                .map(|target| target.to_string_lossy().into_owned()),
            metadata: entry.metadata.into_iter().collect(),
            is_symlink: entry.is_symlink,
        }
    }
}

impl From<EventKind> for pb::EventType {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::Create => pb::EventType::Create,
            EventKind::Write => pb::EventType::Write,
            EventKind::Remove => pb::EventType::Remove,
            EventKind::Rename => pb::EventType::Rename,
            EventKind::Chmod => pb::EventType::Chmod,
        }
    }
}

impl From<FsEvent> for pb::FilesystemEvent {
    fn from(event: FsEvent) -> Self {
        pb::FilesystemEvent {
            name: event.name,
            r#type: pb::EventType::from(event.kind) as i32,
            entry: event.entry.map(Into::into),
        }
    }
}

impl From<&Config> for ppb::ProcessConfig {
    fn from(config: &Config) -> Self {
        ppb::ProcessConfig {
            cmd: config.cmd.clone(),
            args: config.args.clone(),
            envs: config.envs.clone().into_iter().collect(),
            cwd: config.cwd.clone(),
        }
    }
}

impl From<Exit> for ppb::process_event::EndEvent {
    fn from(exit: Exit) -> Self {
        ppb::process_event::EndEvent {
            exit_code: exit.exit_code,
            exited: exit.exited,
            status: exit.status,
            error: exit.error,
        }
    }
}

/// A protobuf timestamp for a system time (negative for times before the epoch).
pub fn timestamp(time: SystemTime) -> crate::proto::wkt::Timestamp {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => crate::proto::wkt::Timestamp {
            seconds: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(after.subsec_nanos()).unwrap_or(0),
        },
        Err(before) => {
            let before = before.duration();
            let mut seconds = -i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            let mut nanos = -i32::try_from(before.subsec_nanos()).unwrap_or(0);
            if nanos < 0 {
                seconds -= 1;
                nanos += 1_000_000_000;
            }
            crate::proto::wkt::Timestamp { seconds, nanos }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_normalise_nanos() {
        let after = UNIX_EPOCH + Duration::new(5, 250);
        assert_eq!(
            timestamp(after),
            crate::proto::wkt::Timestamp {
                seconds: 5,
                nanos: 250
            }
        );
        let before = UNIX_EPOCH - Duration::new(1, 500_000_000);
        assert_eq!(
            timestamp(before),
            crate::proto::wkt::Timestamp {
                seconds: -2,
                nanos: 500_000_000
            }
        );
    }
}
