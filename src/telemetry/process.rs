//! The standard `process_*` metrics (CPU time, memory, file descriptors, threads, start time),
//! read from `/proc/self` at each scrape.
//!
//! Hand-written because `prometheus-client` (the metrics crate used everywhere else) ships no
//! process collector; the crates that do either belong to the other Prometheus library
//! (`prometheus`, whose registry cannot be mixed with ours) or pull in `procfs` for the six
//! numbers read here. Names and meanings are those of the Go and Python clients, so existing
//! dashboards and alerts work unchanged. On anything but Linux the collector reports nothing.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// One reading of `/proc/self`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub threads: u64,
    /// Unix seconds.
    pub start_time_seconds: f64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// The fields of `/proc/<pid>/stat` that the process metrics need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// User and system time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    pub num_threads: u64,
    /// Clock ticks after boot.
    pub starttime: u64,
    pub vsize_bytes: u64,
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        num_threads: field(20)?,
        starttime: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (`btime`, Unix seconds) from `/proc/stat`.
pub fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The soft limit of open files from `/proc/<pid>/limits` (`None` when unlimited).
pub fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Reads this process's numbers; `None` where `/proc` is missing (not Linux).
pub fn sample() -> Option<Sample> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let (ticks, page) = clock_ticks_and_page_size();
    #[allow(clippy::cast_precision_loss, reason = "tick counts stay far below 2^52")]
    let seconds = |t: u64| t as f64 / ticks as f64;
    Some(Sample {
        cpu_seconds: seconds(stat.utime + stat.stime),
        resident_memory_bytes: stat.rss_pages * page,
        virtual_memory_bytes: stat.vsize_bytes,
        threads: stat.num_threads,
        #[allow(clippy::cast_precision_loss, reason = "Unix seconds fit an f64 exactly")]
        start_time_seconds: boot as f64 + seconds(stat.starttime),
        open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
        max_fds: std::fs::read_to_string("/proc/self/limits").ok().as_deref().and_then(parse_max_fds),
    })
}

#[cfg(target_os = "linux")]
fn clock_ticks_and_page_size() -> (u64, u64) {
    // SAFETY: sysconf only reads configuration values; it has no preconditions.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    // sysconf answers -1 on error; Linux's fixed values are the fallback.
    (
        u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100),
        u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096),
    )
}

#[cfg(not(target_os = "linux"))]
fn clock_ticks_and_page_size() -> (u64, u64) {
    (100, 4096)
}

/// Encodes a fresh [`Sample`] at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let mut gauge = |name: &str, help: &str, unit: Option<&Unit>, value: f64| {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
        };
        #[allow(clippy::cast_precision_loss, reason = "byte and fd counts are exact below 2^53")]
        {
            gauge(
                "process_resident_memory",
                "Resident memory size",
                Some(&Unit::Bytes),
                s.resident_memory_bytes as f64,
            )?;
            gauge("process_virtual_memory", "Virtual memory size", Some(&Unit::Bytes), s.virtual_memory_bytes as f64)?;
            gauge(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                s.start_time_seconds,
            )?;
            gauge("process_threads", "Number of OS threads", None, s.threads as f64)?;
            if let Some(n) = s.open_fds {
                gauge("process_open_fds", "Number of open file descriptors", None, n as f64)?;
            }
            if let Some(n) = s.max_fds {
                gauge("process_max_fds", "Maximum number of open file descriptors", None, n as f64)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis_of_the_command_name() {
        // A command name with a space and a parenthesis, as `(tokio) rt` could be.
        let text = "4242 (flo) tilla (x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 25 0 0 20 0 7 0 123456 \
                    987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            s,
            Stat { utime: 150, stime: 25, num_threads: 7, starttime: 123456, vsize_bytes: 987654321, rss_pages: 2048 }
        );
    }

    #[test]
    fn a_truncated_stat_line_is_not_read() {
        assert_eq!(parse_stat("1 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn boot_time_and_the_open_files_limit_are_read_from_their_lines() {
        assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"), Some(1_700_000_000));
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1048576              1048576              files     \n";
        assert_eq!(parse_max_fds(limits), Some(1_048_576));
        assert_eq!(parse_max_fds("Max open files            unlimited            unlimited            files\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_as_alive_with_memory_threads_and_descriptors() {
        let s = sample().expect("/proc is readable on Linux");
        assert!(s.resident_memory_bytes > 0 && s.virtual_memory_bytes >= s.resident_memory_bytes);
        assert!(s.threads >= 1);
        assert!(s.open_fds.unwrap() >= 3 && s.max_fds.unwrap() >= s.open_fds.unwrap());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
