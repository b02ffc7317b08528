//! The datapath-cost benchmark's profile: after each case's timed runs, a bounded pass of
//! the same runs during which
//!
//! - the kernel keeps its run statistics for BPF programs (`BPF_ENABLE_STATS`): run count
//!   and run time of the program alone, without `BPF_PROG_TEST_RUN`'s own work;
//! - `bpftool prog profile` counts cycles and instructions in the program (fentry/fexit
//!   around it, hardware counters read at both ends), when bpftool is built with its
//!   profiler and the CPU's counters are reachable;
//! - `perf record -e cpu-clock` samples this process (optional, one size): which kernel
//!   functions the time of a whole test run goes to — the JITed program, the helpers it
//!   calls, and the test run's own setup.
//!
//! Besides, the static size of each program as the kernel holds it.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::sys::{Stats, enable_stats};
use lb_agent::datapath::Datapath;

/// bpftool, where Debian installs it (root's PATH has /usr/sbin, sudo's may not).
const BPFTOOL: &str = "/usr/sbin/bpftool";

/// Sampling frequency of `perf record` (Hz).
const PERF_HZ: &str = "10000";

/// Symbols kept per case from `perf report`.
const HOT_SYMBOLS: usize = 6;

/// A BPF instruction's size in bytes (`struct bpf_insn`).
const INSN_BYTES: u32 = 8;

/// What one profile pass found for one case.
#[derive(Default)]
pub struct CaseProfile {
    /// Program runs the kernel counted during the pass.
    pub runs: u64,
    /// The kernel's run time over its run count, ns.
    pub stats_ns: Option<f64>,
    /// Per run, from `bpftool prog profile`.
    pub instructions: Option<f64>,
    /// Per run, from `bpftool prog profile`.
    pub cycles: Option<f64>,
    /// Where the pass's `perf record` samples landed, when it sampled.
    pub samples: Option<Samples>,
}

/// A program's size as the kernel holds it after loading.
pub struct ProgramSize {
    /// Program name.
    pub name: &'static str,
    /// Instructions after the verifier's rewrites (`xlated_prog_len` / 8).
    pub xlated_insns: Option<u32>,
    /// Bytes of machine code (`jited_prog_len`).
    pub jited_bytes: u32,
    /// Instructions the verifier processed over all paths (`verified_insns`).
    pub verified_insns: Option<u32>,
}

/// The size of program `name` of `dp`.
pub fn program_size(dp: &Datapath, name: &'static str) -> Result<ProgramSize> {
    let info = dp.program(name).context("program")?.info()?;
    Ok(ProgramSize {
        name,
        xlated_insns: info.size_translated().map(|b| b / INSN_BYTES),
        jited_bytes: info.size_jitted(),
        verified_insns: info.verified_instruction_count(),
    })
}

/// Runs the profile passes and remembers, once, why a tool gives nothing here.
pub struct Profiler {
    /// How long a pass lasts (at least; the tools' own start-up comes on top).
    pass: Duration,
    /// Why `bpftool prog profile` gives no counters, once it has said so.
    pub no_counters: Option<String>,
    /// Why `perf record` gives no samples, once it has failed.
    pub no_samples: Option<String>,
    /// What `perf stat` says about the hardware counters, if they are missing.
    pub no_pmu: Option<String>,
}

impl Profiler {
    pub fn new(pass: Duration) -> Self {
        Self {
            pass,
            no_counters: None,
            no_samples: None,
            no_pmu: hardware_counters_missing(),
        }
    }

    /// One pass on program `prog` of `dp`: `run(k)` makes the k-th run (a fresh frame for
    /// new flows) or returns false to end the runs early; `sample` adds `perf record`.
    pub fn pass(
        &mut self,
        dp: &Datapath,
        prog: &str,
        sample: bool,
        mut run: impl FnMut(usize) -> Result<bool>,
    ) -> Result<CaseProfile> {
        let p = dp.program(prog).context("program")?;
        let id = p.info()?.id();
        // BPF_ENABLE_STATS rather than the kernel.bpf_stats_enabled sysctl: the statistics
        // stay on only while this descriptor is open, so they are off again after the
        // pass even if the benchmark dies in it, and the sysctl is never touched.
        let stats = match enable_stats(Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                println!("datapath-cost: no BPF run statistics: {e}");
                None
            }
        };
        let before = p.info()?;
        let mut bpftool = if self.no_counters.is_none() {
            match self.spawn_bpftool(id) {
                Ok(c) => Some(c),
                Err(e) => {
                    self.no_counters = Some(format!("{e:#}"));
                    None
                }
            }
        } else {
            None
        };
        let perf_data =
            std::env::temp_dir().join(format!("lb-bench-{}-{prog}.perf.data", std::process::id()));
        let mut perf = if sample && self.no_samples.is_none() {
            match self.spawn_perf(&perf_data) {
                Ok(c) => Some(c),
                Err(e) => {
                    self.no_samples = Some(format!("{e:#}"));
                    None
                }
            }
        } else {
            None
        };
        // Keep the program busy for the pass and until both tools are done; bpftool and
        // perf stop on their own (duration, `sleep`), the deadline is for a hung tool.
        let started = Instant::now();
        let deadline = self.pass + Duration::from_secs(30);
        let mut k = 0;
        let mut more = true;
        loop {
            if more {
                for _ in 0..64 {
                    if !run(k)? {
                        more = false;
                        break;
                    }
                    k += 1;
                }
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            let tools_done = [&mut bpftool, &mut perf].into_iter().all(|c| {
                c.as_mut()
                    .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
            });
            if tools_done && (!more || started.elapsed() >= self.pass) {
                break;
            }
            if started.elapsed() > deadline {
                for c in [&mut bpftool, &mut perf].into_iter().flatten() {
                    let _ = c.kill();
                }
                break;
            }
        }
        let after = p.info()?;
        let stats_on = stats.is_some();
        drop(stats);
        let mut profile = CaseProfile::default();
        if stats_on {
            profile.runs = after.run_count().saturating_sub(before.run_count());
            let ns = after
                .run_time()
                .saturating_sub(before.run_time())
                .as_nanos() as f64;
            if profile.runs > 0 {
                profile.stats_ns = Some(ns / profile.runs as f64);
            }
        } else {
            profile.runs = k as u64;
        }
        if let Some(child) = bpftool {
            match read_bpftool(child) {
                Ok((instructions, cycles)) => {
                    profile.instructions = instructions;
                    profile.cycles = cycles;
                }
                Err(why) => {
                    println!("datapath-cost: no hardware counters from bpftool: {why}");
                    self.no_counters = Some(why);
                }
            }
        }
        if let Some(child) = perf {
            match read_perf(child, &perf_data) {
                Ok(samples) => profile.samples = Some(samples),
                Err(e) => self.no_samples = Some(format!("{e:#}")),
            }
            let _ = std::fs::remove_file(&perf_data);
        }
        Ok(profile)
    }

    fn spawn_bpftool(&self, id: u32) -> Result<Child> {
        // bpftool takes whole seconds.
        let seconds = self.pass.as_secs_f64().ceil().max(1.0).to_string();
        Command::new(BPFTOOL)
            .args(["--json", "prog", "profile", "id", &id.to_string()])
            .args(["duration", &seconds, "cycles", "instructions"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {BPFTOOL}"))
    }

    fn spawn_perf(&self, data: &PathBuf) -> Result<Child> {
        Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", PERF_HZ, "-p"])
            .arg(std::process::id().to_string())
            .arg("-o")
            .arg(data)
            .args(["--", "sleep", &format!("{:.3}", self.pass.as_secs_f64())])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run perf")
    }
}

/// Instructions and cycles per run from `bpftool --json prog profile`, or why there are
/// none. bpftool reports its own errors as `{"error": ..}`, with exit status 0 when it was
/// built without the profiler.
fn read_bpftool(child: Child) -> Result<(Option<f64>, Option<f64>), String> {
    let out = child
        .wait_with_output()
        .map_err(|e| format!("bpftool: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        format!(
            "bpftool prog profile exited with {} and said: {}",
            out.status,
            stderr.trim()
        )
    })?;
    if let Some(e) = value.get("error").and_then(|e| e.as_str()) {
        return Err(format!("bpftool prog profile: {e}"));
    }
    let readings = value
        .as_array()
        .ok_or_else(|| format!("bpftool prog profile printed {value}"))?;
    let per_run = |metric: &str| {
        let r = readings.iter().find(|r| r["metric"] == metric)?;
        let runs = r["run_cnt"].as_f64()?;
        let mut v = r["value"].as_f64()?;
        let (enabled, running) = (r["enabled"].as_f64()?, r["running"].as_f64()?);
        // A counter that shared the hardware with others ran part of the time: scale it
        // up as perf does.
        if running > 0.0 && running < enabled {
            v *= enabled / running;
        }
        (runs > 0.0).then(|| v / runs)
    };
    Ok((per_run("instructions"), per_run("cycles")))
}

/// Where `perf record`'s samples landed.
fn read_perf(child: Child, data: &PathBuf) -> Result<Samples> {
    let out = child.wait_with_output().context("perf record")?;
    anyhow::ensure!(
        out.status.success(),
        "perf record failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "-q",
            "--sort",
            "sym",
            "--percent-limit",
            "0",
        ])
        .arg("-i")
        .arg(data)
        .output()
        .context("cannot run perf report")?;
    anyhow::ensure!(
        report.status.success(),
        "perf report failed: {}",
        String::from_utf8_lossy(&report.stderr).trim()
    );
    Ok(parse_perf_report(&String::from_utf8_lossy(&report.stdout)))
}

/// Where the samples of a pass landed.
#[derive(Default)]
pub struct Samples {
    /// Share of the samples (%) per [`Part`], in [`Part::ALL`] order.
    pub parts: [f64; 5],
    /// The symbols with the largest shares (%).
    pub hot: Vec<(String, f64)>,
}

/// What a sampled kernel or user-space symbol belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// JITed BPF code (`bpf_prog_<tag>_<name>` in kallsyms).
    Program,
    /// Map lookups and updates (hash, LRU, array, LPM code).
    Maps,
    /// Other helpers the program calls: checksums, stores, time, random numbers.
    Helpers,
    /// The rest of the kernel: the test run's skb and socket setup, copies, the syscall.
    TestRun,
    /// The benchmark itself.
    User,
}

impl Part {
    pub const ALL: [Part; 5] = [
        Part::Program,
        Part::Maps,
        Part::Helpers,
        Part::TestRun,
        Part::User,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::Program => "JITed program",
            Part::Maps => "map code",
            Part::Helpers => "other helpers",
            Part::TestRun => "test run + syscall",
            Part::User => "user space",
        }
    }

    fn of(symbol: &str, user: bool) -> Self {
        const MAPS: [&str; 8] = [
            "htab_",
            "lru",
            "lookup_nulls",
            "array_map",
            "percpu_array",
            "trie_",
            "jhash",
            "bpf_map_",
        ];
        const HELPERS: [&str; 7] = [
            "csum",
            "skb_store_bytes",
            "skb_ensure_writable",
            "ktime",
            "prandom",
            "rnd_u32",
            "skb_load_bytes",
        ];
        if user {
            Part::User
        } else if jited_name(symbol).is_some() {
            Part::Program
        } else if MAPS.iter().any(|m| symbol.contains(m)) {
            Part::Maps
        } else if HELPERS.iter().any(|h| symbol.contains(h)) {
            Part::Helpers
        } else {
            Part::TestRun
        }
    }
}

/// `lb_tc_ingress` for a JITed program's kallsyms name `bpf_prog_<16 hex digits>_lb_tc_ingress`.
fn jited_name(symbol: &str) -> Option<&str> {
    let (tag, name) = symbol.strip_prefix("bpf_prog_")?.split_once('_')?;
    (tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

/// `    26.49%  [k] do_syscall_64` lines -> shares per [`Part`] and the hottest symbols.
fn parse_perf_report(text: &str) -> Samples {
    let mut samples = Samples::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(share) = words
            .next()
            .and_then(|w| w.strip_suffix('%'))
            .and_then(|w| w.parse::<f64>().ok())
        else {
            continue;
        };
        let user = words.next() == Some("[.]");
        let symbol = words.collect::<Vec<_>>().join(" ");
        let part = Part::of(&symbol, user);
        if let Some(i) = Part::ALL.iter().position(|&p| p == part) {
            samples.parts[i] += share;
        }
        if samples.hot.len() < HOT_SYMBOLS {
            let shown = match jited_name(&symbol) {
                Some(name) => format!("{name} (JITed)"),
                None => symbol,
            };
            samples.hot.push((shown, share));
        }
    }
    samples
}

/// Why the CPU's cycle and instruction counters cannot be read, if they cannot:
/// `perf stat` prints `<not supported>` for them (a guest without a virtual PMU).
fn hardware_counters_missing() -> Option<String> {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "cycles,instructions", "--", "true"])
        .stdout(Stdio::null())
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .any(|l| l.starts_with("<not supported>"))
        .then(|| {
            "perf stat reports cycles and instructions as <not supported>: the kernel has no \
             hardware PMU to count them (typical of a VM without a virtual PMU)"
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_report_lines() {
        let text = "    31.00%  [k] bpf_prog_6deef7357e7b4530_lb_tc_ingress\n\
                    \x20    9.00%  [k] htab_lru_map_update_elem\n\
                    \x20    8.00%  [k] bpf_prog_test_run_skb\n\
                    \n\
                    \x20    2.00%  [k] bpf_l4_csum_replace\n\
                    \x20    1.00%  [.] main\n";
        let s = parse_perf_report(text);
        assert_eq!(s.parts, [31.0, 9.0, 2.0, 8.0, 1.0]);
        assert_eq!(s.hot[0], ("lb_tc_ingress (JITed)".to_owned(), 31.0));
        assert_eq!(s.hot[2], ("bpf_prog_test_run_skb".to_owned(), 8.0));
        assert_eq!(s.hot.len(), 5);
    }
}
