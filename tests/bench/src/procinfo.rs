//! Resource use of a process from `/proc`: CPU seconds (user + system, `/proc/<pid>/stat`) and
//! peak and current resident memory (`VmHWM`, `VmRSS` in `/proc/<pid>/status`).

use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
    pub rss_kib: u64,
}

/// Reads `pid`'s usage; `None` when the process is gone.
pub(crate) fn read(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(Usage {
        cpu_secs: (utime + stime) / ticks_per_second(),
        peak_rss_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    })
}

/// CPU seconds of every process now running, by pid.
pub(crate) fn all_processes() -> std::collections::HashMap<u32, f64> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read(pid)?.cpu_secs)))
        .collect()
}

/// CPU seconds processes other than `ours` used between two [`all_processes`] readings: a lower
/// bound (a process that started and ended in between is not seen), to show whether something
/// else on the machine competed with the measurement.
pub(crate) fn others_cpu(
    before: &std::collections::HashMap<u32, f64>,
    after: &std::collections::HashMap<u32, f64>,
    ours: &[u32],
) -> f64 {
    after
        .iter()
        .filter(|(pid, _)| !ours.contains(pid))
        .map(|(pid, secs)| secs - before.get(pid).copied().unwrap_or(0.0))
        .filter(|d| *d > 0.0)
        .sum()
}

/// `pid`'s parent pid.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The live children of `pid`.
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| parent_of(*child) == Some(pid))
        .collect()
}

/// A process and its children together (PostgreSQL: the postmaster and its backends): their CPU
/// seconds, those of children already gone and waited for included, and their resident memory.
pub(crate) fn read_tree(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let waited: f64 = fields.get(13)?.parse::<f64>().ok()? + fields.get(14)?.parse::<f64>().ok()?;
    let mut total = read(pid)?;
    total.cpu_secs += waited / ticks_per_second();
    for child in children(pid) {
        if let Some(u) = read(child) {
            total.cpu_secs += u.cpu_secs;
            total.rss_kib += u.rss_kib;
            total.peak_rss_kib += u.peak_rss_kib;
        }
    }
    Some(total)
}
