//! `bench`: the side-by-side benchmark of issue 6. Starts the daemon binary itself, measures
//! every row next to its floor in one run, prints a table and writes a JSON report.
//!
//! ```sh
//! cargo build --release --locked
//! cargo run --release --locked --features bench --bin bench -- [--quick] [--json PATH]
//! ```

mod harness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use harness::{GROUPS, Options};

const MIB: u64 = 1024 * 1024;

/// Benchmark the envd daemon against the floor of this machine, side by side.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Cli {
    /// Small sizes (every row in seconds); the defaults are the issue's sizes.
    #[arg(long)]
    quick: bool,
    /// The daemon binary [default: `envd` next to this binary, i.e. target/release/envd].
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Directory for the run's files [default: the temp directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/report.json")]
    json: PathBuf,
    /// Comma-separated groups of rows to run [default: all].
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(GROUPS))]
    rows: Option<Vec<String>>,
    /// Row 1: MiB per upload.
    #[arg(long)]
    upload_mib: Option<u64>,
    /// Row 1: uploads of each kind.
    #[arg(long)]
    upload_iterations: Option<usize>,
    /// Row 2: number of small files.
    #[arg(long)]
    small_files: Option<usize>,
    /// Row 2: KiB per small file.
    #[arg(long)]
    small_kib: Option<usize>,
    /// Row 2: concurrent clients.
    #[arg(long)]
    small_clients: Option<usize>,
    /// Row 3: MiB per download.
    #[arg(long)]
    download_mib: Option<u64>,
    /// Row 3: downloads.
    #[arg(long)]
    download_iterations: Option<usize>,
    /// Row 4: Stat calls per protocol.
    #[arg(long)]
    stat_requests: Option<usize>,
    /// Row 4: concurrent callers.
    #[arg(long)]
    stat_callers: Option<usize>,
    /// Row 5: entries in the listed directory.
    #[arg(long)]
    list_entries: Option<usize>,
    /// Row 5: listings.
    #[arg(long)]
    list_iterations: Option<usize>,
    /// Row 6: starts per command.
    #[arg(long)]
    process_iterations: Option<usize>,
    /// Row 7: cold starts.
    #[arg(long)]
    cold_starts: Option<usize>,
}

impl Cli {
    fn options(self) -> anyhow::Result<Options> {
        let daemon = match self.daemon {
            Some(path) => path,
            None => std::env::current_exe()?.with_file_name("envd"),
        };
        anyhow::ensure!(
            daemon.is_file(),
            "no daemon binary at {} (run `cargo build --release` first, or pass --daemon)",
            daemon.display()
        );
        let mut o = if self.quick {
            Options::quick(daemon)
        } else {
            Options::full(daemon)
        };
        if let Some(dir) = self.dir {
            o.dir = dir;
        }
        if let Some(rows) = self.rows {
            o.groups = rows;
        }
        let set = |slot: &mut usize, value: Option<usize>| {
            if let Some(value) = value {
                *slot = value.max(1);
            }
        };
        o.upload_bytes = self.upload_mib.map_or(o.upload_bytes, |m| m.max(1) * MIB);
        o.download_bytes = self
            .download_mib
            .map_or(o.download_bytes, |m| m.max(1) * MIB);
        o.small_bytes = self.small_kib.map_or(o.small_bytes, |k| k * 1024);
        set(&mut o.upload_iterations, self.upload_iterations);
        set(&mut o.small_files, self.small_files);
        set(&mut o.small_clients, self.small_clients);
        set(&mut o.download_iterations, self.download_iterations);
        set(&mut o.stat_requests, self.stat_requests);
        set(&mut o.stat_callers, self.stat_callers);
        set(&mut o.list_entries, self.list_entries);
        set(&mut o.list_iterations, self.list_iterations);
        set(&mut o.process_iterations, self.process_iterations);
        set(&mut o.cold_starts, self.cold_starts);
        if self.quick {
            o.idle_settle = Duration::from_millis(50);
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json.clone();
    let options = match cli.options() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("bench: {err:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(harness::run(&options)) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("bench: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", harness::report::table(&report));
    if let Err(err) = harness::report::write_json(&report, &json) {
        eprintln!("bench: writing {}: {err:#}", json.display());
        return ExitCode::FAILURE;
    }
    println!("\nJSON report: {}", json.display());
    ExitCode::SUCCESS
}
