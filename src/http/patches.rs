//! `POST /patches` and `GET /patches`: JSON in, [`crate::patch`] does the work, JSON out.
//! Nothing here decides what runs; this module only translates.

use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::http::json::json_no_store;
use crate::patch::record::{Record, timestamp};
use crate::patch::{Attempt, Context, Outcome, Patch, PatchResult};
use crate::state::AppState;

/// Largest `POST /patches` body: a long list of scripts with embedded config files.
pub const MAX_PATCHES_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Serves `POST /patches`.
pub async fn post_patches(State(state): State<AppState>, body: Body) -> Response {
    match apply(&state, body).await {
        Ok(attempt) => json_no_store(&AttemptJson::from(&attempt)),
        Err(err) => err.into_response(),
    }
}

async fn apply(state: &AppState, body: Body) -> Result<Attempt> {
    let body = to_bytes(body, MAX_PATCHES_BODY_BYTES)
        .await
        .map_err(|err| {
            Error::InvalidArgument(format!(
                "error reading the request body (at most {MAX_PATCHES_BODY_BYTES} bytes): {err}"
            ))
        })?;
    let patches = parse(&body)?;
    let context = Context {
        default_user: state.identity.defaults().user,
        base_env: state.env.snapshot(),
    };
    state.patches.apply(patches, context).await
}

/// Serves `GET /patches`.
pub async fn get_patches(State(state): State<AppState>) -> Response {
    match state.patches.status().await {
        Ok(status) => json_no_store(&StatusJson {
            last_applied: status.record.last_applied(),
            applied: applied(&status.record),
            running: status.running,
            last_attempt: status.last_attempt.as_ref().map(AttemptJson::from),
        }),
        Err(err) => err.into_response(),
    }
}

/// The request body. Unknown fields are refused: a misspelt `timeoutMs` must not silently
/// become the default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchesBody {
    patches: Vec<PatchJson>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PatchJson {
    sequence: u64,
    script: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Parses a `POST /patches` body.
///
/// # Errors
/// [`Error::InvalidArgument`] when it is not `{"patches": [...]}` with well-typed fields.
pub fn parse(body: &[u8]) -> Result<Vec<Patch>> {
    let parsed: PatchesBody = serde_json::from_slice(body)
        .map_err(|err| Error::InvalidArgument(format!("error decoding the request body: {err}")))?;
    Ok(parsed
        .patches
        .into_iter()
        .map(|patch| Patch {
            sequence: patch.sequence,
            script: patch.script,
            user: patch.user,
            timeout: patch.timeout_ms.map(Duration::from_millis),
        })
        .collect())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusJson {
    last_applied: u64,
    applied: Vec<AppliedJson>,
    running: Option<u64>,
    last_attempt: Option<AttemptJson>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AppliedJson {
    sequence: u64,
    sha256: String,
    applied_at: String,
}

fn applied(record: &Record) -> Vec<AppliedJson> {
    record
        .applied
        .iter()
        .map(|(&sequence, applied)| AppliedJson {
            sequence,
            sha256: applied.sha256.clone(),
            applied_at: applied.applied_at.clone(),
        })
        .collect()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AttemptJson {
    started_at: String,
    finished_at: String,
    last_applied: u64,
    results: Vec<ResultJson>,
}

impl From<&Attempt> for AttemptJson {
    fn from(attempt: &Attempt) -> Self {
        AttemptJson {
            started_at: timestamp(attempt.started_at),
            finished_at: timestamp(attempt.finished_at),
            last_applied: attempt.last_applied,
            results: attempt.results.iter().map(ResultJson::from).collect(),
        }
    }
}

/// One patch's result. `applied` carries `durationMs`; `failed` carries `error` and, when
/// the script started, `exitCode` (absent when a signal ended it), `timedOut`, the output
/// tails and whether they were cut.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultJson {
    sequence: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timed_out: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_truncated: Option<bool>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<&PatchResult> for ResultJson {
    fn from(result: &PatchResult) -> Self {
        let sequence = result.sequence;
        match &result.outcome {
            Outcome::Applied { duration } => ResultJson {
                sequence,
                status: "applied",
                duration_ms: Some(millis(*duration)),
                ..ResultJson::default()
            },
            Outcome::Skipped => ResultJson {
                sequence,
                status: "skipped",
                ..ResultJson::default()
            },
            Outcome::NotRun => ResultJson {
                sequence,
                status: "not_run",
                ..ResultJson::default()
            },
            Outcome::Failed(failure) => {
                let mut json = ResultJson {
                    sequence,
                    status: "failed",
                    error: Some(failure.error.clone()),
                    ..ResultJson::default()
                };
                if let Some(run) = &failure.run {
                    json.duration_ms = Some(millis(run.duration));
                    json.exit_code = run.exit.exited.then_some(run.exit.exit_code);
                    json.timed_out = Some(run.timed_out);
                    json.stdout = Some(run.stdout.text());
                    json.stderr = Some(run.stderr.text());
                    json.stdout_truncated = Some(run.stdout.dropped > 0);
                    json.stderr_truncated = Some(run.stderr.dropped > 0);
                }
                json
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_patches() {
        let body = br#"{"patches":[
            {"sequence":2,"script":"echo b","user":"app","timeoutMs":1500},
            {"sequence":1,"script":"echo a","user":null}
        ]}"#;
        let patches = parse(body).expect("parse");
        assert_eq!(
            patches,
            vec![
                Patch {
                    sequence: 2,
                    script: "echo b".into(),
                    user: Some("app".into()),
                    timeout: Some(Duration::from_millis(1500)),
                },
                Patch {
                    sequence: 1,
                    script: "echo a".into(),
                    user: None,
                    timeout: None,
                },
            ]
        );
        assert!(parse(br#"{"patches":[]}"#).expect("empty").is_empty());
    }

    #[test]
    fn refuses_malformed_bodies() {
        let cases: &[&[u8]] = &[
            b"",
            b"[]",
            b"{}",
            b"null",
            br#"{"patches":null}"#,
            br#"{"patches":[{"script":"x"}]}"#,
            br#"{"patches":[{"sequence":1}]}"#,
            br#"{"patches":[{"sequence":-1,"script":"x"}]}"#,
            br#"{"patches":[{"sequence":1.5,"script":"x"}]}"#,
            br#"{"patches":[{"sequence":"1","script":"x"}]}"#,
            br#"{"patches":[{"sequence":1,"script":"x","timeoutMs":-5}]}"#,
            br#"{"patches":[{"sequence":1,"script":"x","timeout_ms":5}]}"#,
            br#"{"patches":[{"sequence":1,"script":7}]}"#,
            br#"{"patches":[],"extra":true}"#,
        ];
        for body in cases {
            let err = parse(body).expect_err(&String::from_utf8_lossy(body));
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        }
    }
}
