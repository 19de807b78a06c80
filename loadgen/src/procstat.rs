//! CPU time and memory of a process, read from /proc (Linux).

/// The fields of `/proc/<pid>/stat` after the command name (which is in parentheses and may
/// contain spaces): index 1 is the parent PID, 11..=14 utime, stime, cutime, cstime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Sum of the stat fields `range` (clock ticks), in seconds.
fn ticks_seconds(pid: u32, range: std::ops::Range<usize>) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let mut ticks = 0.0;
    for i in range {
        ticks += fields.get(i)?.parse::<f64>().ok()?;
    }
    Some(ticks / 100.0) // USER_HZ is 100 on every Linux this runs on
}

/// User + system CPU seconds consumed so far by `pid`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    ticks_seconds(pid, 11..13)
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// CPU seconds of this process (the generator itself).
pub fn self_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// Parent PID of `pid`.
fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// User + system CPU seconds of `pid` plus those of its children it has reaped (cutime,
/// cstime: a finished sshd session or agent shell lands there).
fn cpu_with_reaped(pid: u32) -> Option<f64> {
    ticks_seconds(pid, 11..15)
}

/// CPU seconds of `pid`'s whole process tree: itself, every descendant alive now, and every
/// descendant already reaped (each process counted once: live, or in the cutime of the
/// ancestor that reaped it). sshd serves each connection in child processes and the agent
/// runs each command as one, so their cost is the tree's.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            && let Some(pp) = parent(p)
        {
            all.push((p, pp));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&p) = tree.get(i) {
        tree.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    let mut total = cpu_with_reaped(pid)?;
    for p in tree.iter().skip(1) {
        total += cpu_with_reaped(*p).unwrap_or(0.0);
    }
    Some(total)
}

/// Microseconds since the Unix epoch: a clock every process on the machine shares.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
