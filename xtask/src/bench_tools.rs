//! The datapath benchmark's cross-check with standard load tools: the same variants
//! measured by tools other people use, beside `lbt-client`'s figures.
//!
//! netperf (client `netperf`, server `netserver`) is the reference tool and is used when
//! both are on PATH; Debian 12 does not package it, so otherwise iperf3 measures
//! TCP_STREAM and sockperf's ping-pong mode TCP_RR and UDP_RR (TCP_CRR has no such tool
//! there: it is netperf's alone). The servers are processes started in the first pod's
//! namespace; the clients run in the client namespace, one at a time.
//!
//! The tools' ports are on the measured Service with the first pod as their only
//! endpoint: iperf3 and netperf open a control connection and then data connections to
//! the same address, which a Service with two endpoints would spread over both pods (no
//! session affinity), so that the data would reach a server that never saw the test.
use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ::tests::netns::{NetNs, command_in};
use anyhow::{Context as _, Result, bail, ensure};

use crate::bench_net::{Kids, Test, run_clients};

/// iperf3's port, and netperf's data port for TCP_STREAM, on the first pod and on the
/// Service.
pub const STREAM_PORT: u16 = 5201;
/// sockperf's port (TCP and UDP), and netperf's data port for the request/response
/// tests, on the first pod and on the Service.
pub const RR_PORT: u16 = 11112;
/// netserver's control port on the first pod and on the Service.
pub const NETSERVER_PORT: u16 = 12865;
/// The tools' ports as (name, protocol, port), for the measured Service.
pub const PORTS: [(&str, &str, u16); 4] = [
    ("tools-stream", "tcp", STREAM_PORT),
    ("tools-rr", "tcp", RR_PORT),
    ("tools-rr-udp", "udp", RR_PORT),
    ("tools-control", "tcp", NETSERVER_PORT),
];

/// Which tools run the cross-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    /// netperf and netserver.
    Netperf,
    /// iperf3 (TCP_STREAM) and sockperf (TCP_RR, UDP_RR), Debian's.
    Debian,
}

/// The tools found on this machine.
pub struct Tools {
    suite: Suite,
    /// Each tool's name and the first line of its `--version`.
    pub versions: Vec<(&'static str, String)>,
}

impl Tools {
    /// netperf where both of its programs are on PATH, else iperf3 and sockperf, which
    /// must then be installed.
    pub fn find() -> Result<Self> {
        if on_path("netperf") && on_path("netserver") {
            return Ok(Self {
                suite: Suite::Netperf,
                versions: vec![("netperf", version("netperf", "-V"))],
            });
        }
        for tool in ["iperf3", "sockperf"] {
            ensure!(
                on_path(tool),
                "{tool} is missing (netperf is not on PATH either): install Debian's \
                 `{tool}` package, as scripts/setup.sh does"
            );
        }
        Ok(Self {
            suite: Suite::Debian,
            versions: vec![
                ("iperf3", version("iperf3", "--version")),
                ("sockperf", version("sockperf", "--version")),
            ],
        })
    }

    /// Whether these tools measure `test`.
    pub fn measures(&self, test: Test) -> bool {
        match self.suite {
            Suite::Netperf => test != Test::UdpFlood,
            Suite::Debian => matches!(test, Test::TcpStream | Test::TcpRr | Test::UdpRr),
        }
    }

    /// The tool and its mode, for the report.
    pub fn describe(&self, test: Test) -> &'static str {
        match (self.suite, test) {
            (Suite::Netperf, Test::TcpStream) => "netperf TCP_STREAM",
            (Suite::Netperf, Test::TcpRr) => "netperf TCP_RR",
            (Suite::Netperf, Test::UdpRr) => "netperf UDP_RR",
            (Suite::Netperf, Test::TcpCrr) => "netperf TCP_CRR",
            (Suite::Debian, Test::TcpStream) => "iperf3",
            (Suite::Debian, Test::TcpRr) => "sockperf ping-pong --tcp",
            (Suite::Debian, Test::UdpRr) => "sockperf ping-pong",
            _ => "–",
        }
    }

    /// Whether the tool is netperf (the reference).
    pub fn is_netperf(&self) -> bool {
        self.suite == Suite::Netperf
    }

    /// One measurement of `test` from the client namespace to `addr`: MB/s for
    /// TCP_STREAM, transactions (or connections) per second otherwise.
    pub fn run(&self, client: &NetNs, addr: Ipv4Addr, test: Test, seconds: u32) -> Result<f64> {
        let argv = self.client_argv(addr, test, seconds)?;
        // The tools' own connect timeouts are a few seconds; this bounds everything else.
        let limit = Duration::from_secs(u64::from(seconds) + 15);
        let out = run_clients(client, std::slice::from_ref(&argv), limit)?
            .pop()
            .unwrap_or_default();
        let v = match (self.suite, test) {
            (Suite::Netperf, Test::TcpStream) => parse_netperf(&out).map(|mbit| mbit / 8.0),
            (Suite::Netperf, _) => parse_netperf(&out),
            (Suite::Debian, Test::TcpStream) => parse_iperf3(&out),
            (Suite::Debian, _) => parse_sockperf(&out),
        }
        .with_context(|| format!("unexpected output of {}: {}", argv[0], out.trim()))?;
        ensure!(v > 0.0, "no traffic got through");
        Ok(v)
    }

    fn client_argv(&self, addr: Ipv4Addr, test: Test, seconds: u32) -> Result<Vec<String>> {
        let (addr, secs) = (addr.to_string(), seconds.to_string());
        let (stream, rr) = (STREAM_PORT.to_string(), RR_PORT.to_string());
        let argv: Vec<&str> = match (self.suite, test) {
            (Suite::Netperf, _) => {
                let data = if test == Test::TcpStream {
                    STREAM_PORT
                } else {
                    RR_PORT
                };
                let control = NETSERVER_PORT.to_string();
                let data = format!(",{data}");
                // -P 0: no banner; -o THROUGHPUT: the figure alone (10^6 bits/s for
                // TCP_STREAM, transactions/s otherwise).
                return Ok([
                    "netperf",
                    "-P",
                    "0",
                    "-H",
                    &addr,
                    "-p",
                    &control,
                    "-t",
                    test.name(),
                    "-l",
                    &secs,
                    "--",
                    "-P",
                    &data,
                    "-o",
                    "THROUGHPUT",
                ]
                .map(str::to_owned)
                .to_vec());
            }
            (Suite::Debian, Test::TcpStream) => vec![
                "iperf3",
                "-c",
                &addr,
                "-p",
                &stream,
                "-t",
                &secs,
                "-J",
                "--connect-timeout",
                "5000",
            ],
            (Suite::Debian, Test::TcpRr) => vec![
                "sockperf",
                "ping-pong",
                "-i",
                &addr,
                "-p",
                &rr,
                "--tcp",
                "-t",
                &secs,
            ],
            (Suite::Debian, Test::UdpRr) => {
                vec!["sockperf", "ping-pong", "-i", &addr, "-p", &rr, "-t", &secs]
            }
            (Suite::Debian, _) => bail!("{} has no Debian tool here", test.name()),
        };
        Ok(argv.into_iter().map(str::to_owned).collect())
    }
}

/// The tools' servers in one pod namespace, killed on drop.
pub struct Servers {
    _kids: Kids,
}

impl Servers {
    /// Starts the servers in `pod` and waits until they listen.
    pub fn start(tools: &Tools, pod: &NetNs) -> Result<Self> {
        let (stream, rr) = (STREAM_PORT.to_string(), RR_PORT.to_string());
        let control = NETSERVER_PORT.to_string();
        let argvs: Vec<Vec<&str>> = match tools.suite {
            // -D: stay in the foreground, so that the guard owns the process.
            Suite::Netperf => vec![vec!["netserver", "-D", "-p", &control]],
            Suite::Debian => vec![
                // --idle-timeout: a server stuck on a client that went away restarts.
                vec!["iperf3", "-s", "-p", &stream, "--idle-timeout", "30"],
                vec!["sockperf", "server", "-i", "0.0.0.0", "-p", &rr, "--tcp"],
                vec!["sockperf", "server", "-i", "0.0.0.0", "-p", &rr],
            ],
        };
        let mut kids = Kids(Vec::new());
        for argv in &argvs {
            kids.0.push(
                command_in(pod, argv)
                    .stdin(Stdio::null())
                    // iperf3 reports every test on stdout; nobody reads it.
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("cannot run {}", argv.join(" ")))?,
            );
        }
        let wanted: Vec<(&str, u16)> = match tools.suite {
            Suite::Netperf => vec![("-Hltn", NETSERVER_PORT)],
            Suite::Debian => vec![
                ("-Hltn", STREAM_PORT),
                ("-Hltn", RR_PORT),
                ("-Hlun", RR_PORT),
            ],
        };
        let started = Instant::now();
        loop {
            for (c, argv) in kids.0.iter_mut().zip(&argvs) {
                if let Some(status) = c.try_wait()? {
                    bail!("{} exited ({status})", argv.join(" "));
                }
            }
            let listening = wanted.iter().all(|(flags, port)| {
                command_in(pod, &["ss", flags, &format!("sport = :{port}")])
                    .output()
                    .is_ok_and(|o| !o.stdout.trim_ascii().is_empty())
            });
            if listening {
                return Ok(Self { _kids: kids });
            }
            ensure!(
                started.elapsed() < Duration::from_secs(5),
                "the tools' servers ({}) did not listen within 5 s",
                argvs.iter().map(|a| a[0]).collect::<Vec<_>>().join(", ")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The first line `TOOL FLAG` prints (stdout, else stderr), without terminal colours.
fn version(tool: &str, flag: &str) -> String {
    let Ok(out) = Command::new(tool).arg(flag).stdin(Stdio::null()).output() else {
        return String::new();
    };
    let text = [out.stdout, out.stderr]
        .iter()
        .map(|b| strip_ansi(&String::from_utf8_lossy(b)))
        .find(|s| !s.trim().is_empty())
        .unwrap_or_default();
    text.lines().next().unwrap_or_default().trim().to_owned()
}

/// `s` without ANSI escape sequences (sockperf colours its output).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// MB/s (10^6 bytes) received, from `iperf3 -J`'s `end.sum_received.bits_per_second`.
fn parse_iperf3(out: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(out).ok()?;
    let bps = v
        .get("end")?
        .get("sum_received")?
        .get("bits_per_second")?
        .as_f64()?;
    Some(bps / 8.0 / 1e6)
}

/// Round trips per second, from sockperf ping-pong's measured window:
/// `[Valid Duration] RunTime=0.550 sec; SentMessages=25795; ReceivedMessages=25795`.
/// (Its `avg-latency` is half a round trip.)
fn parse_sockperf(out: &str) -> Option<f64> {
    let out = strip_ansi(out);
    let line = out.lines().find(|l| l.contains("[Valid Duration]"))?;
    let field = |name: &str| -> Option<f64> {
        let rest = &line[line.find(name)? + name.len()..];
        rest.split([' ', ';']).next()?.parse().ok()
    };
    let secs = field("RunTime=")?;
    let received = field("ReceivedMessages=")?;
    (secs > 0.0).then(|| received / secs)
}

/// The figure from `netperf -P 0 ... -- -o THROUGHPUT`: its last line.
fn parse_netperf(out: &str) -> Option<f64> {
    out.lines()
        .rev()
        .find(|l| !l.trim().is_empty())?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf() {
        let out = "sockperf: \u{1b}[2;35m== version #3.7-no.git == \u{1b}[0m\n\
            sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; SentMessages=46276; ReceivedMessages=46275\n\
            sockperf: ========= Printing statistics for Server No: 0\n\
            sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=25795; ReceivedMessages=25795\n\
            sockperf: \u{1b}[2;35m====> avg-latency=10.651 (std-dev=47.182)\u{1b}[0m\n";
        let v = parse_sockperf(out).unwrap();
        assert!((v - 25795.0 / 0.55).abs() < 1e-6);
        assert_eq!(parse_sockperf("sockperf: Test ended\n"), None);
    }

    #[test]
    fn parses_iperf3() {
        let out = r#"{"start": {}, "end": {"sum_sent": {"bits_per_second": 9e9},
            "sum_received": {"bits_per_second": 8e9}}}"#;
        assert_eq!(parse_iperf3(out), Some(1_000.0));
        assert_eq!(parse_iperf3(r#"{"error": "unable to connect"}"#), None);
    }

    #[test]
    fn parses_netperf() {
        assert_eq!(parse_netperf("12345.67\n"), Some(12_345.67));
        assert_eq!(parse_netperf("Throughput\n12.5\n\n"), Some(12.5));
        assert_eq!(parse_netperf(""), None);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("a\u{1b}[2;35mb\u{1b}[0mc"), "abc");
    }
}
