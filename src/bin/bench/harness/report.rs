//! The rows the benchmark produces, the table it prints and the JSON it writes.

use std::fmt::Write as _;
use std::path::Path;

use super::stats::Summary;

/// One measured thing, with its floor measured in the same run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Stable identifier (the smoke test and scripts look rows up by it).
    pub id: &'static str,
    /// What was measured, for people.
    pub title: String,
    /// Unit of `median` and `p99` of both sides.
    pub unit: &'static str,
    /// The daemon's samples.
    pub daemon: Summary,
    /// The floor's samples, where the row has one.
    pub floor: Option<Summary>,
    /// How the floor was measured.
    pub floor_is: &'static str,
    /// Whole-run rate where the row has one (files/s, requests/s): daemon, floor.
    pub rate: Option<Rate>,
    /// The row's headline ratio (see `ratio_is`).
    pub ratio: Option<f64>,
    /// What `ratio` is: "daemon/floor" for rates, "floor/daemon" ...
    pub ratio_is: &'static str,
    /// The target for this round and whether this run met it.
    pub target: Option<Target>,
    /// Peak RSS of the daemon during the row (VmHWM after a reset), KiB.
    pub daemon_peak_rss_kib: Option<u64>,
    /// Anything else the row measured, in words (printed under the table).
    pub note: Option<String>,
}

/// A whole-run rate, both sides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rate {
    /// Unit, e.g. `files/s`.
    pub unit: &'static str,
    /// The daemon's.
    pub daemon: f64,
    /// The floor's.
    pub floor: Option<f64>,
}

/// A target and the verdict of this run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    /// The target in words, e.g. `>= 0.90 of floor`.
    pub text: String,
    /// Whether this run met it.
    pub met: bool,
}

impl Target {
    /// `value >= min`.
    pub fn at_least(text: &str, value: Option<f64>, min: f64) -> Option<Target> {
        Some(Target {
            text: text.to_owned(),
            met: value.is_some_and(|v| v >= min),
        })
    }

    /// `value <= max`.
    pub fn at_most(text: &str, value: Option<f64>, max: f64) -> Option<Target> {
        Some(Target {
            text: text.to_owned(),
            met: value.is_some_and(|v| v <= max),
        })
    }
}

/// Everything one run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Format version of this JSON.
    pub version: u32,
    /// `quick` or `full`.
    pub mode: &'static str,
    /// The sizes and counts used.
    pub options: serde_json::Value,
    /// The machine: cores, kernel, load when the run started and ended.
    pub machine: serde_json::Value,
    /// The daemon binary measured.
    pub daemon_binary: String,
    /// Whether the run directory takes `user.*` xattrs (metadata rows are without
    /// metadata otherwise).
    pub xattrs: bool,
    /// The rows, in the order.
    pub rows: Vec<Row>,
}

/// Writes the report as pretty JSON.
///
/// # Errors
/// When the file cannot be written.
pub fn write_json(report: &Report, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    Ok(())
}

/// The report as a plain-text table.
pub fn table(report: &Report) -> String {
    let header = [
        "row",
        "unit",
        "daemon p50",
        "daemon p99",
        "floor p50",
        "floor p99",
        "rate daemon",
        "rate floor",
        "ratio",
        "target",
        "met",
        "peak RSS",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for row in &report.rows {
        let rate = row.rate.as_ref();
        lines.push(vec![
            row.id.to_owned(),
            row.unit.to_owned(),
            num(row.daemon.median),
            num(row.daemon.p99),
            row.floor.map_or("-".into(), |f| num(f.median)),
            row.floor.map_or("-".into(), |f| num(f.p99)),
            rate.map_or("-".into(), |r| format!("{} {}", num(r.daemon), r.unit)),
            rate.and_then(|r| r.floor).map_or("-".into(), num),
            row.ratio
                .map_or("-".into(), |r| format!("{r:.2} {}", row.ratio_is)),
            row.target.as_ref().map_or("-".into(), |t| t.text.clone()),
            row.target
                .as_ref()
                .map_or("-".into(), |t| if t.met { "yes" } else { "NO" }.into()),
            row.daemon_peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, width))| {
                if c < 2 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    out.push('\n');
    for row in &report.rows {
        let _ = writeln!(out, "{}: {}", row.id, row.title);
        let _ = writeln!(out, "    floor: {}", row.floor_is);
        for line in row.note.iter().flat_map(|note| note.lines()) {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// A number with three significant figures or so, no exponent.
fn num(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}
