//! The benchmark (`bench`, README "Benchmark") in quick mode against the real daemon
//! binary: it must run every row and write a well-formed JSON report. No timing is
//! asserted: speed is the benchmark's business, and this machine is shared.

#[path = "../src/bin/bench/harness/mod.rs"]
mod harness;

use std::path::PathBuf;

/// Every row id the issue asks for.
const ROWS: &[&str] = &[
    "upload_octet",
    "upload_multipart",
    "small_uploads",
    "download",
    "stat_connect_json",
    "stat_grpc",
    "listdir_grpc",
    "listdir_connect_json",
    "start_true",
    "start_bash_login",
    "idle_rss",
    "peak_rss_small_uploads",
    "cold_start",
    "binary_size",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_run_reports_every_row_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = harness::Options::quick(PathBuf::from(env!("CARGO_BIN_EXE_envd")));
    options.dir = dir.path().to_path_buf();
    let report = harness::run(&options).await.expect("quick benchmark run");
    let json_path = dir.path().join("report.json");
    harness::report::write_json(&report, &json_path).expect("write JSON");
    let table = harness::report::table(&report);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("read JSON")).expect("JSON");
    assert_eq!(json["version"], 1);
    assert_eq!(json["mode"], "quick");
    let rows = json["rows"].as_array().expect("rows");
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, ROWS, "rows in the issue's order");
    for row in rows {
        let id = &row["id"];
        assert!(row["title"].is_string(), "{id}: title");
        assert!(row["unit"].is_string(), "{id}: unit");
        for side in ["daemon", "floor"] {
            let summary = &row[side];
            if side == "floor" && summary.is_null() {
                continue;
            }
            for field in ["median", "p99"] {
                assert!(summary[field].is_number(), "{id}: {side}.{field} in {row}");
            }
            assert!(
                summary["samples"].as_u64().is_some_and(|n| n >= 1),
                "{id}: {side}.samples"
            );
        }
        if let Some(target) = row["target"].as_object() {
            assert!(
                target["text"].is_string() && target["met"].is_boolean(),
                "{id}: target"
            );
        }
        assert!(
            table.contains(id.as_str().expect("id")),
            "{id} missing from the table"
        );
    }
}
