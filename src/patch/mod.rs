//! Patches: sequenced fix-up scripts a control plane rolls into sandboxes ("install this
//! package", "rewrite this config"). Each is applied here at most once, in ascending order
//! of sequence, and the [`record`] of what was applied lives in the guest filesystem so
//! that snapshots and their forks carry it. Transport-free: `http::patches` parses
//! requests into [`Patch`]es and renders the [`Attempt`].
//!
//! The rules, checked before anything runs:
//! - a patch whose sequence is in the record with the same script hash is skipped;
//! - a patch whose sequence is in the record with another script, or whose sequence is
//!   below the last applied one but was never applied here (it would run out of order), is
//!   a [`Error::Conflict`] and nothing runs;
//! - the others run in ascending order, each recorded (atomically) as soon as it succeeds;
//!   the first failure stops the attempt and the rest are not run. A failed patch is not
//!   recorded, so it may be re-sent, fixed, with the same sequence.
//!
//! Attempts are serialized: one runs at a time, start to end, even when its caller leaves.

pub mod record;
pub mod run;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Result};
use crate::patch::record::{Applied, Record};
use crate::patch::run::{Finished, Job};

/// Most patches in one request: a control plane sends its whole list, which is short.
pub const MAX_PATCHES: usize = 1000;
/// Largest script: room for an embedded config file, not for a payload (ship those as files).
pub const MAX_SCRIPT_BYTES: usize = 1024 * 1024;
/// A patch's timeout when it names none: long enough for a package install.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// One patch as the control plane sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// Its place in the order; positive, unique within a request.
    pub sequence: u64,
    /// The script.
    pub script: String,
    /// Who runs it; the default user when `None`.
    pub user: Option<String>,
    /// When its process group is terminated; [`DEFAULT_TIMEOUT`] (or the configured
    /// maximum, if lower) when `None`.
    pub timeout: Option<Duration>,
}

/// What happened to one patch of an attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It ran, exited 0, and is now in the record.
    Applied {
        /// How long it ran.
        duration: Duration,
    },
    /// It was in the record already, with the same script.
    Skipped,
    /// It did not succeed; it is not in the record.
    Failed(Failure),
    /// An earlier patch failed, so it was not run.
    NotRun,
}

/// Why a patch failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// One line for people: `exit status 2`, `timed out after 5000 ms (signal: killed)`,
    /// `user 'app' does not exist`...
    pub error: String,
    /// How it ran, when it did start.
    pub run: Option<Finished>,
}

/// One patch's result.
#[derive(Debug, Clone)]
pub struct PatchResult {
    /// The patch's sequence.
    pub sequence: u64,
    /// What happened.
    pub outcome: Outcome,
}

/// One `apply` call, in ascending order of sequence.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it started running (after waiting for any attempt before it).
    pub started_at: SystemTime,
    /// When it ended.
    pub finished_at: SystemTime,
    /// One result per patch sent.
    pub results: Vec<PatchResult>,
    /// The last applied sequence once it ended.
    pub last_applied: u64,
}

/// What `GET /patches` shows.
#[derive(Debug, Clone)]
pub struct Status {
    /// The record as it is on disk.
    pub record: Record,
    /// The sequence running right now, if any.
    pub running: Option<u64>,
    /// The last attempt this daemon made (since it started), if any.
    pub last_attempt: Option<Attempt>,
}

/// The daemon's side of the environment a patch runs in, taken when a request arrives.
#[derive(Debug, Clone)]
pub struct Context {
    /// The user patches run as when they name none.
    pub default_user: String,
    /// The environment every process gets (internal and `/init` variables).
    pub base_env: BTreeMap<String, String>,
}

/// The daemon's patch state: where the record is and the lock that serializes attempts.
#[derive(Debug)]
pub struct Patcher {
    record_path: PathBuf,
    /// Time between a timed-out patch's SIGTERM and SIGKILL.
    kill_grace: Duration,
    /// Longest timeout a patch may ask for.
    max_timeout: Duration,
    /// Held from an attempt's first record read to its last write, so two attempts never
    /// run the same patch or run patches out of order.
    applying: Arc<tokio::sync::Mutex<()>>,
    /// What `GET /patches` reports besides the record; short critical sections only.
    progress: Mutex<Progress>,
}

#[derive(Debug, Default)]
struct Progress {
    running: Option<u64>,
    last_attempt: Option<Attempt>,
}

/// What to do with each patch, decided against the record before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Skip,
    Run,
}

impl Patcher {
    /// Patches recorded in `record_path`, with timeouts up to `max_timeout`; timed-out
    /// patches get `kill_grace` between SIGTERM and SIGKILL.
    pub fn new(record_path: PathBuf, kill_grace: Duration, max_timeout: Duration) -> Self {
        Patcher {
            record_path,
            kill_grace,
            max_timeout,
            applying: Arc::new(tokio::sync::Mutex::new(())),
            progress: Mutex::new(Progress::default()),
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The record on disk, the patch running now and the last attempt.
    ///
    /// # Errors
    /// As [`Record::load`].
    pub async fn status(&self) -> Result<Status> {
        let record = load(self.record_path.clone()).await?;
        let progress = self.progress();
        Ok(Status {
            record,
            running: progress.running,
            last_attempt: progress.last_attempt.clone(),
        })
    }

    /// Applies `patches` (unique sequences, any order) as described in the module docs.
    /// Waiting for an earlier attempt ends if the caller goes away; once this attempt has
    /// the lock it runs to its end on its own task, whether or not the caller waits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a request breaking the rules of [`Patcher::validate`];
    /// [`Error::Conflict`] naming the sequences that contradict the record; [`Error::DataLoss`]
    /// for a corrupt record and [`Error::Io`] for one that cannot be read or written. In
    /// every error case nothing ran.
    pub async fn apply(self: &Arc<Self>, patches: Vec<Patch>, context: Context) -> Result<Attempt> {
        self.validate(&patches)?;
        let guard = self.applying.clone().lock_owned().await;
        let patcher = self.clone();
        tokio::spawn(async move { patcher.apply_locked(guard, patches, context).await }).await?
    }

    /// Checks a request on its own, before it waits for the lock: at most [`MAX_PATCHES`]
    /// patches; sequences positive and unique; scripts non-empty and at most
    /// [`MAX_SCRIPT_BYTES`]; users, when named, non-empty; timeouts positive and at most
    /// the configured maximum.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending patch.
    pub fn validate(&self, patches: &[Patch]) -> Result<()> {
        if patches.len() > MAX_PATCHES {
            return Err(Error::InvalidArgument(format!(
                "{} patches in one request; at most {MAX_PATCHES}",
                patches.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for patch in patches {
            let invalid = |why: String| {
                Err(Error::InvalidArgument(format!(
                    "patch {}: {why}",
                    patch.sequence
                )))
            };
            if patch.sequence == 0 {
                return invalid("sequences start at 1".into());
            }
            if !seen.insert(patch.sequence) {
                return invalid("the sequence appears more than once".into());
            }
            if patch.script.is_empty() {
                return invalid("the script is empty".into());
            }
            if patch.script.len() > MAX_SCRIPT_BYTES {
                return invalid(format!(
                    "the script is {} bytes; at most {MAX_SCRIPT_BYTES}",
                    patch.script.len()
                ));
            }
            if patch.user.as_deref() == Some("") {
                return invalid("the user is empty (omit it for the default user)".into());
            }
            if let Some(timeout) = patch.timeout {
                if timeout.is_zero() || timeout > self.max_timeout {
                    return invalid(format!(
                        "timeoutMs must be between 1 and {}",
                        self.max_timeout.as_millis()
                    ));
                }
            }
        }
        Ok(())
    }

    async fn apply_locked(
        &self,
        _guard: OwnedMutexGuard<()>,
        mut patches: Vec<Patch>,
        context: Context,
    ) -> Result<Attempt> {
        let started_at = SystemTime::now();
        let mut record = load(self.record_path.clone()).await?;
        patches.sort_by_key(|patch| patch.sequence);
        let steps = plan(&record, &patches)?;
        if steps.contains(&Step::Run) {
            // Write the record once, unchanged, before running anything: a record that
            // cannot be written fails the call now rather than after a patch has run.
            save(&record, self.record_path.clone()).await?;
        }
        let mut results = Vec::with_capacity(patches.len());
        let mut failed = false;
        for (patch, step) in patches.into_iter().zip(steps) {
            let outcome = match step {
                Step::Skip => Outcome::Skipped,
                Step::Run if failed => Outcome::NotRun,
                Step::Run => {
                    self.progress().running = Some(patch.sequence);
                    let outcome = self.run_one(&mut record, &patch, &context).await;
                    self.progress().running = None;
                    failed = matches!(outcome, Outcome::Failed(_));
                    outcome
                }
            };
            results.push(PatchResult {
                sequence: patch.sequence,
                outcome,
            });
        }
        let attempt = Attempt {
            started_at,
            finished_at: SystemTime::now(),
            results,
            last_applied: record.last_applied(),
        };
        self.progress().last_attempt = Some(attempt.clone());
        Ok(attempt)
    }

    /// Runs one patch and records it if it succeeds.
    async fn run_one(&self, record: &mut Record, patch: &Patch, context: &Context) -> Outcome {
        let job = Job {
            sequence: patch.sequence,
            script: patch.script.clone(),
            user: patch
                .user
                .clone()
                .unwrap_or_else(|| context.default_user.clone()),
            timeout: patch
                .timeout
                .unwrap_or_else(|| DEFAULT_TIMEOUT.min(self.max_timeout)),
            kill_grace: self.kill_grace,
            base_env: context.base_env.clone(),
        };
        let finished = match run::run(&job).await {
            Ok(finished) => finished,
            Err(err) => {
                tracing::warn!(sequence = patch.sequence, %err, "patch could not start");
                return Outcome::Failed(Failure {
                    error: format!("could not start: {err}"),
                    run: None,
                });
            }
        };
        if !finished.succeeded() {
            let error = if finished.timed_out {
                format!(
                    "timed out after {} ms ({})",
                    job.timeout.as_millis(),
                    finished.exit.status
                )
            } else {
                finished.exit.status.clone()
            };
            tracing::warn!(sequence = patch.sequence, %error, "patch failed");
            return Outcome::Failed(Failure {
                error,
                run: Some(finished),
            });
        }
        let mut updated = record.clone();
        updated.applied.insert(
            patch.sequence,
            Applied {
                sha256: record::hash(&patch.script),
                applied_at: record::timestamp(SystemTime::now()),
            },
        );
        if let Err(err) = save(&updated, self.record_path.clone()).await {
            // It ran, but nothing says so: the next attempt would run it again. Report it
            // as the failure it is and stop here.
            tracing::error!(sequence = patch.sequence, %err, "a patch ran but could not be recorded");
            return Outcome::Failed(Failure {
                error: format!("ran successfully but could not be recorded: {err}"),
                run: Some(finished),
            });
        }
        *record = updated;
        tracing::info!(sequence = patch.sequence, duration = ?finished.duration, "patch applied");
        Outcome::Applied {
            duration: finished.duration,
        }
    }
}

/// Decides, for `patches` in ascending order, which are skipped and which run.
///
/// # Errors
/// [`Error::Conflict`] naming every sequence that was applied with another script or lies
/// below the last applied sequence without having been applied.
fn plan(record: &Record, patches: &[Patch]) -> Result<Vec<Step>> {
    let last = record.last_applied();
    let mut conflicts = Vec::new();
    let mut steps = Vec::with_capacity(patches.len());
    for patch in patches {
        match record.applied.get(&patch.sequence) {
            Some(applied) if applied.sha256 == record::hash(&patch.script) => {
                steps.push(Step::Skip);
            }
            Some(applied) => conflicts.push(format!(
                "patch {} was applied with a different script (sha256 {} here)",
                patch.sequence, applied.sha256
            )),
            None if patch.sequence < last => conflicts.push(format!(
                "patch {} was never applied here and is below the last applied patch {last}; \
                 it cannot run out of order",
                patch.sequence
            )),
            None => steps.push(Step::Run),
        }
    }
    if conflicts.is_empty() {
        Ok(steps)
    } else {
        Err(Error::Conflict(format!(
            "{}; nothing was run",
            conflicts.join("; ")
        )))
    }
}

async fn load(path: PathBuf) -> Result<Record> {
    tokio::task::spawn_blocking(move || Record::load(&path)).await?
}

async fn save(record: &Record, path: PathBuf) -> Result<()> {
    let record = record.clone();
    tokio::task::spawn_blocking(move || record.save(&path)).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(sequence: u64, script: &str) -> Patch {
        Patch {
            sequence,
            script: script.into(),
            user: None,
            timeout: None,
        }
    }

    fn patcher(path: PathBuf) -> Arc<Patcher> {
        Arc::new(Patcher::new(
            path,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ))
    }

    #[test]
    fn validates_requests_on_their_own() {
        let patcher = patcher(PathBuf::from("/nowhere"));
        let big = "x".repeat(MAX_SCRIPT_BYTES + 1);
        let with = |f: fn(&mut Patch)| {
            let mut p = patch(3, "true");
            f(&mut p);
            p
        };
        let cases: Vec<(Vec<Patch>, &str)> = vec![
            (vec![patch(0, "true")], "patch 0: sequences start at 1"),
            (
                vec![patch(2, "true"), patch(1, "true"), patch(2, "x")],
                "patch 2: the sequence appears more than once",
            ),
            (vec![patch(1, "")], "patch 1: the script is empty"),
            (vec![patch(1, &big)], "at most 1048576"),
            (
                vec![with(|p| p.user = Some(String::new()))],
                "patch 3: the user is empty",
            ),
            (
                vec![with(|p| p.timeout = Some(Duration::ZERO))],
                "timeoutMs must be between 1 and 3600000",
            ),
            (
                vec![with(|p| p.timeout = Some(Duration::from_secs(3601)))],
                "timeoutMs must be between 1 and 3600000",
            ),
            (
                (1..=1001).map(|n| patch(n, "true")).collect(),
                "1001 patches in one request; at most 1000",
            ),
        ];
        for (patches, want) in cases {
            let err = patcher.validate(&patches).expect_err(want);
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{err}");
        }
        let fine = [
            patch(5, &"y".repeat(MAX_SCRIPT_BYTES)),
            with(|p| p.timeout = Some(Duration::from_secs(3600))),
            with(|p| p.user = Some("root".into())),
        ];
        for patch in fine {
            patcher
                .validate(std::slice::from_ref(&patch))
                .expect("valid");
        }
        patcher.validate(&[]).expect("an empty list is valid");
    }

    fn recorded(entries: &[(u64, &str)]) -> Record {
        Record {
            applied: entries
                .iter()
                .map(|(sequence, script)| {
                    (
                        *sequence,
                        Applied {
                            sha256: record::hash(script),
                            applied_at: String::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn plans_against_the_record() {
        use Step::{Run, Skip};
        // (record, patches sent in ascending order, steps or the conflict's words)
        type Case<'a> = (
            &'a [(u64, &'a str)],
            &'a [(u64, &'a str)],
            std::result::Result<&'a [Step], &'a str>,
        );
        let cases: &[Case<'_>] = &[
            (&[], &[(1, "a"), (2, "b")], Ok(&[Run, Run])),
            (&[], &[], Ok(&[])),
            (&[(1, "a")], &[(1, "a"), (2, "b")], Ok(&[Skip, Run])),
            (
                &[(1, "a"), (2, "b")],
                &[(1, "a"), (2, "b")],
                Ok(&[Skip, Skip]),
            ),
            // Only new patches sent; gaps above the last applied are fine.
            (&[(1, "a"), (2, "b")], &[(7, "c")], Ok(&[Run])),
            (
                &[(1, "a"), (2, "b")],
                &[(1, "a"), (2, "B"), (3, "c")],
                Err("patch 2 was applied with a different script"),
            ),
            (
                &[(1, "a"), (3, "c")],
                &[(2, "b")],
                Err("patch 2 was never applied here and is below the last applied patch 3"),
            ),
            (
                &[(1, "a"), (3, "c")],
                &[(1, "x"), (2, "b"), (3, "c")],
                Err("patch 1 was applied with a different script (sha256 "),
            ),
        ];
        for (record, patches, want) in cases {
            let record = recorded(record);
            let patches: Vec<Patch> = patches.iter().map(|(s, p)| patch(*s, p)).collect();
            match (plan(&record, &patches), want) {
                (Ok(steps), Ok(want)) => assert_eq!(steps, *want, "{patches:?}"),
                (Err(err), Err(want)) => {
                    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
                    let message = err.to_string();
                    assert!(message.contains(want), "{message}");
                    assert!(message.ends_with("nothing was run"), "{message}");
                }
                (got, want) => panic!("{patches:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn every_conflict_is_named() {
        let record = recorded(&[(1, "a"), (2, "b"), (5, "e")]);
        let err =
            plan(&record, &[patch(1, "A"), patch(3, "c"), patch(5, "E")]).expect_err("conflicts");
        let message = err.to_string();
        for sequence in ["patch 1 ", "patch 3 ", "patch 5 "] {
            assert!(message.contains(sequence), "{message}");
        }
    }

    fn me() -> String {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .expect("passwd entry")
            .name
    }

    #[tokio::test]
    async fn applies_records_and_stops_at_the_first_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("patches.json");
        let log = dir.path().join("log");
        let patcher = patcher(path.clone());
        let context = Context {
            default_user: me(),
            base_env: BTreeMap::new(),
        };
        let line = |n: u64| format!("echo {n} >> '{}'", log.display());
        let attempt = patcher
            .apply(
                vec![patch(3, &line(3)), patch(1, &line(1)), patch(2, "exit 4")],
                context.clone(),
            )
            .await
            .expect("apply");
        let kinds: Vec<_> = attempt
            .results
            .iter()
            .map(|r| (r.sequence, std::mem::discriminant(&r.outcome)))
            .collect();
        let applied = std::mem::discriminant(&Outcome::Applied {
            duration: Duration::ZERO,
        });
        let not_run = std::mem::discriminant(&Outcome::NotRun);
        assert_eq!(kinds[0], (1, applied));
        assert!(
            matches!(&attempt.results[1].outcome, Outcome::Failed(f) if f.error == "exit status 4")
        );
        assert_eq!(kinds[2], (3, not_run));
        assert_eq!(attempt.last_applied, 1);
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "1\n");
        let status = patcher.status().await.expect("status");
        assert_eq!(status.record.last_applied(), 1);
        assert!(status.running.is_none());
        assert_eq!(status.last_attempt.expect("last").results.len(), 3);

        let again = patcher
            .apply(
                vec![patch(1, &line(1)), patch(2, "true"), patch(3, &line(3))],
                context,
            )
            .await
            .expect("resume");
        assert!(matches!(again.results[0].outcome, Outcome::Skipped));
        assert!(matches!(again.results[1].outcome, Outcome::Applied { .. }));
        assert!(matches!(again.results[2].outcome, Outcome::Applied { .. }));
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "1\n3\n");
        assert_eq!(Record::load(&path).expect("load").last_applied(), 3);
    }

    #[tokio::test]
    async fn an_unwritable_record_runs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        // Reading finds no record; its directory cannot be created, even by root.
        let patcher = patcher(PathBuf::from("/proc/self/envd-no-such-dir/patches.json"));
        let err = patcher
            .apply(
                vec![patch(1, &format!("echo 1 >> '{}'", log.display()))],
                Context {
                    default_user: me(),
                    base_env: BTreeMap::new(),
                },
            )
            .await
            .expect_err("unwritable");
        assert!(
            err.to_string().starts_with("writing the patch record"),
            "{err}"
        );
        assert!(!log.exists());
        assert!(
            patcher
                .status()
                .await
                .expect("status")
                .last_attempt
                .is_none()
        );
    }
}
