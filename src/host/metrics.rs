//! Machine load for `GET /metrics` (reference §3.2), read from the kernel: CPU time from
//! `/proc/stat`, memory from `/proc/meminfo`, disk from `statvfs("/")`. Blocking.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

const PROC_STAT: &str = "/proc/stat";
const PROC_MEMINFO: &str = "/proc/meminfo";
const MIB: u64 = 1024 * 1024;

/// One reading, serialized with envd's keys in envd's order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// When it was taken (Unix seconds, UTC).
    pub ts: i64,
    /// Logical CPUs online.
    pub cpu_count: u32,
    /// Share of CPU time spent busy since the previous reading, in percent, 2 decimals.
    pub cpu_used_pct: f64,
    /// `mem_total` in MiB (deprecated upstream, still sent).
    pub mem_total_mib: u64,
    /// `mem_used` in MiB (deprecated upstream, still sent).
    pub mem_used_mib: u64,
    /// Physical memory, bytes.
    pub mem_total: u64,
    /// Memory in use, bytes: total minus what the kernel says is available.
    pub mem_used: u64,
    /// Page cache, bytes.
    pub mem_cache: u64,
    /// Used space of `/`, bytes, including blocks reserved for root.
    pub disk_used: u64,
    /// Size of `/`, bytes.
    pub disk_total: u64,
}

/// Aggregate CPU times from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// All time except guest time (already counted in user and nice).
    pub total: u64,
    /// Idle and iowait.
    pub idle: u64,
}

/// Turns consecutive CPU readings into a usage percentage. The first reading is compared
/// with boot (usage since boot); each later one with the reading before it.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Mutex<Option<CpuTimes>>,
}

impl CpuSampler {
    /// Records `now` and returns the busy share since the previous reading (0 when no time
    /// has passed).
    pub fn usage(&self, now: CpuTimes) -> f64 {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = last.replace(now).unwrap_or_default();
        busy_percent(before, now)
    }
}

/// Takes a reading of the whole machine.
///
/// # Errors
/// [`Error::Internal`] when a kernel interface cannot be read or parsed.
pub fn collect(cpu: &CpuSampler) -> Result<Metrics> {
    let stat = read(PROC_STAT)?;
    let (times, cpu_count) = parse_stat(&stat)
        .ok_or_else(|| Error::Internal(format!("unexpected format of {PROC_STAT}")))?;
    let meminfo = read(PROC_MEMINFO)?;
    let memory = parse_meminfo(&meminfo)
        .ok_or_else(|| Error::Internal(format!("unexpected format of {PROC_MEMINFO}")))?;
    let disk = nix::sys::statvfs::statvfs(Path::new("/"))
        .map_err(|err| Error::Internal(format!("statvfs /: {err}")))?;
    // Block counts and sizes are u64 on the 64-bit targets the daemon is built for.
    let block = disk.fragment_size();
    let disk_total = disk.blocks() * block;
    let disk_used = disk.blocks().saturating_sub(disk.blocks_available()) * block;
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Ok(Metrics {
        ts,
        cpu_count,
        cpu_used_pct: (cpu.usage(times) * 100.0).round() / 100.0,
        mem_total_mib: memory.total / MIB,
        mem_used_mib: memory.used / MIB,
        mem_total: memory.total,
        mem_used: memory.used,
        mem_cache: memory.cache,
        disk_used,
        disk_total,
    })
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|err| Error::Internal(format!("reading {path}: {err}")))
}

fn busy_percent(before: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(before.total);
    let idle = now.idle.saturating_sub(before.idle).min(total);
    if total == 0 {
        return 0.0;
    }
    (total - idle) as f64 * 100.0 / total as f64
}

/// The aggregate `cpu` line and the number of `cpuN` lines.
fn parse_stat(text: &str) -> Option<(CpuTimes, u32)> {
    let mut times = None;
    let mut count = 0u32;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                let values: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
                // user nice system idle iowait irq softirq steal [guest guest_nice]
                let field = |i: usize| values.get(i).copied().unwrap_or(0);
                if values.len() < 4 {
                    return None;
                }
                times = Some(CpuTimes {
                    total: (0..8).map(field).sum(),
                    idle: field(3) + field(4),
                });
            }
            Some(name) if name.starts_with("cpu") => count += 1,
            _ => {}
        }
    }
    Some((times?, count.max(1)))
}

struct Memory {
    total: u64,
    used: u64,
    cache: u64,
}

fn parse_meminfo(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    let total = field("MemTotal")?;
    // MemAvailable exists since Linux 3.14; older kernels get the classic estimate.
    let available = field("MemAvailable").unwrap_or_else(|| {
        field("MemFree").unwrap_or(0) + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0)
    });
    Some(Memory {
        total,
        used: total.saturating_sub(available),
        cache: field("Cached").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let text = "cpu  100 5 50 800 20 3 2 0 7 0\ncpu0 50 2 25 400 10 1 1 0 0 0\ncpu1 50 3 25 400 10 2 1 0 0 0\nintr 1 2 3\nctxt 9\n";
        let (times, count) = parse_stat(text).expect("parse");
        assert_eq!(count, 2);
        assert_eq!(times.total, 100 + 5 + 50 + 800 + 20 + 3 + 2);
        assert_eq!(times.idle, 820);
        assert!(parse_stat("intr 1\n").is_none());
        assert!(parse_stat("cpu 1 x 3 4\n").is_none());
    }

    #[test]
    fn cpu_usage_is_relative_to_the_previous_reading() {
        let sampler = CpuSampler::default();
        let first = sampler.usage(CpuTimes {
            total: 1000,
            idle: 750,
        });
        assert!((first - 25.0).abs() < 1e-9, "{first}");
        let second = sampler.usage(CpuTimes {
            total: 1100,
            idle: 760,
        });
        assert!((second - 90.0).abs() < 1e-9, "{second}");
        let idle = sampler.usage(CpuTimes {
            total: 1100,
            idle: 760,
        });
        assert_eq!(idle, 0.0);
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    12000000 kB\nBuffers:          100000 kB\nCached:          3000000 kB\n";
        let memory = parse_meminfo(text).expect("parse");
        assert_eq!(memory.total, 16_000_000 * 1024);
        assert_eq!(memory.used, 4_000_000 * 1024);
        assert_eq!(memory.cache, 3_000_000 * 1024);
        assert!(parse_meminfo("Cached: 1 kB\n").is_none());
    }

    #[test]
    fn collects_from_this_machine() {
        let metrics = collect(&CpuSampler::default()).expect("collect");
        assert!(metrics.cpu_count >= 1);
        assert!(metrics.mem_total > 0 && metrics.mem_used <= metrics.mem_total);
        assert!(metrics.disk_total > 0 && metrics.disk_used <= metrics.disk_total);
        assert!((0.0..=100.0).contains(&metrics.cpu_used_pct));
        let json = serde_json::to_string(&metrics).expect("json");
        let keys = [
            "ts",
            "cpu_count",
            "cpu_used_pct",
            "mem_total_mib",
            "mem_used_mib",
            "mem_total",
            "mem_used",
            "mem_cache",
            "disk_used",
            "disk_total",
        ];
        let mut at = 0;
        for key in keys {
            let found = json[at..]
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} missing or out of order in {json}"));
            at += found;
        }
    }
}
