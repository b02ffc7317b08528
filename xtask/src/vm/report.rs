//! results/kernels.md: the kernel × feature table and what ran on each kernel.
//!
//! The guest scripts and their host runs print marker lines (`LBVM-FEATURE`, `LBVM-STEP`,
//! `LBVM-TEST`, `LBVM-BENCH`); each run of `cargo xtask vm` turns its markers into records
//! and replaces the records of the same kind in the file, so that the smoke run of the test
//! suite does not erase what the last end-to-end run found. The records are kept at the
//! end of the file in an HTML comment, and the tables are rendered from them.
use std::fmt::Write as _;

/// The comment that holds the records.
const BEGIN: &str = "<!-- lbvm-records: the tables above are rendered from these lines";
const END: &str = "-->";

/// Where a record was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The Debian 6.1 guest in QEMU.
    Guest,
    /// This machine's own kernel.
    Host,
}

impl Column {
    fn tag(self) -> &'static str {
        match self {
            Self::Guest => "guest",
            Self::Host => "host",
        }
    }

    fn from_tag(s: &str) -> Option<Self> {
        match s {
            "guest" => Some(Self::Guest),
            "host" => Some(Self::Host),
            _ => None,
        }
    }
}

/// One line of a run's findings: the marker's kind and its tab-separated fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where.
    pub column: Column,
    /// `feature`, `step`, `test`, `bench`, `bench-skip` or `run`.
    pub kind: String,
    /// The marker's fields.
    pub fields: Vec<String>,
}

/// Marker prefixes and the record kinds they become.
const MARKERS: [(&str, &str); 5] = [
    ("LBVM-FEATURE ", "feature"),
    ("LBVM-STEP ", "step"),
    ("LBVM-TEST ", "test"),
    ("LBVM-BENCH ", "bench"),
    ("LBVM-BENCH-SKIP ", "bench-skip"),
];

/// The records in a console or script output.
pub fn parse(output: &str, column: Column) -> Vec<Record> {
    let mut records = Vec::new();
    for line in output.lines() {
        for (marker, kind) in MARKERS {
            if let Some((_, rest)) = line.split_once(marker) {
                let fields = if kind == "step" {
                    // `LBVM-STEP name ok|FAILED`.
                    match rest.rsplit_once(' ') {
                        Some((name, result)) => vec![name.to_owned(), result.to_owned()],
                        None => continue,
                    }
                } else {
                    rest.split('\t').map(str::to_owned).collect()
                };
                records.push(Record {
                    column,
                    kind: kind.to_owned(),
                    fields,
                });
            }
        }
    }
    records
}

/// The records kept in an existing kernels.md (none if it has none).
pub fn load(markdown: &str) -> Vec<Record> {
    let Some((_, rest)) = markdown.split_once(BEGIN) else {
        return Vec::new();
    };
    let body = rest.split(END).next().unwrap_or_default();
    body.lines()
        .filter_map(|line| {
            let mut f = line.split('\t');
            let column = Column::from_tag(f.next()?)?;
            let kind = f.next()?.to_owned();
            Some(Record {
                column,
                kind,
                fields: f.map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// `old` with the kinds `new` brings replaced, column by column; a `run` record replaces
/// the one of the same mode, and a test binary's record that binary's (`--test` runs a
/// few).
pub fn merge(mut old: Vec<Record>, new: Vec<Record>) -> Vec<Record> {
    old.retain(|o| {
        !new.iter().any(|n| {
            n.column == o.column
                && n.kind == o.kind
                && (!matches!(o.kind.as_str(), "run" | "test")
                    || n.fields.first() == o.fields.first())
        })
    });
    // A new benchmark run leaves no skipped variants of the old one behind, and the other
    // way round.
    if new.iter().any(|n| n.kind == "bench") {
        old.retain(|o| o.kind != "bench-skip");
    }
    old.extend(new);
    old
}

fn of<'a>(records: &'a [Record], kind: &str) -> impl Iterator<Item = &'a Record> {
    let kind = kind.to_owned();
    records.iter().filter(move |r| r.kind == kind)
}

fn field(r: &Record, i: usize) -> &str {
    r.fields.get(i).map_or("", String::as_str)
}

/// Distinct values of field 0 of `kind`, in first-seen order (guest first).
fn names(records: &[Record], kind: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for column in [Column::Guest, Column::Host] {
        for r in of(records, kind).filter(|r| r.column == column) {
            let name = field(r, 0).to_owned();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

fn find<'a>(records: &'a [Record], kind: &str, column: Column, name: &str) -> Option<&'a Record> {
    of(records, kind).find(|r| r.column == column && field(r, 0) == name)
}

fn cell(s: &str) -> String {
    s.replace('|', "/")
}

/// The release a column's features name (`kernel` line), or "?".
fn release(records: &[Record], column: Column) -> String {
    find(records, "feature", column, "kernel").map_or_else(|| "?".into(), |r| field(r, 1).into())
}

/// The whole file.
pub fn render(records: &[Record]) -> String {
    let mut md = String::new();
    let g = release(records, Column::Guest);
    let h = release(records, Column::Host);
    let _ = writeln!(
        md,
        "# Kernels\n\n\
         Written by `cargo xtask vm` (xtask/src/vm.rs). The guest is Debian 12's stock\n\
         `linux-image-cloud-amd64` booted in QEMU with no network device (everything runs in\n\
         network namespaces inside it); the host column is this machine's own kernel, where\n\
         the same scripts and test binaries run in namespaces. Each run replaces its own\n\
         rows: `cargo xtask vm --smoke` (a stage of `cargo xtask test`) the features and the\n\
         smoke steps, `cargo xtask vm` the features and the end-to-end test binaries,\n\
         `cargo xtask vm --bench` the benchmark section. lb needs Linux 6.1 or newer.\n"
    );
    let runs: Vec<&Record> = of(records, "run").collect();
    if !runs.is_empty() {
        let _ = writeln!(
            md,
            "| run | where | kernel | took | date |\n|---|---|---|---|---|"
        );
        for r in runs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                cell(field(r, 0)),
                cell(field(r, 1)),
                cell(field(r, 2)),
                cell(field(r, 3)),
                cell(field(r, 4))
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "## Features\n\n\
         Probed by `lb-agent --kernel-features` (lb-agent/src/features.rs): each asks the\n\
         kernel (a trivial program or map, a link creation, a filter in a private network\n\
         namespace) rather than trusting the version; \"since\" is the first mainline kernel\n\
         with it.\n\n\
         | feature | since | Debian 6.1 guest ({g}) | host ({h}) |\n|---|---|---|---|"
    );
    for name in names(records, "feature") {
        if matches!(name.as_str(), "kernel" | "attach") {
            continue;
        }
        let since = [Column::Guest, Column::Host]
            .iter()
            .find_map(|&c| find(records, "feature", c, &name).map(|r| field(r, 1).to_owned()))
            .unwrap_or_default();
        let result = |c| {
            find(records, "feature", c, &name).map_or_else(|| "-".into(), |r| cell(field(r, 2)))
        };
        let _ = writeln!(
            md,
            "| {name} | {since} | {} | {} |",
            result(Column::Guest),
            result(Column::Host)
        );
    }
    let attach =
        |c| find(records, "feature", c, "attach").map_or_else(|| "-".into(), |r| cell(field(r, 1)));
    let _ = writeln!(
        md,
        "| **attach method** | | {} | {} |\n",
        attach(Column::Guest),
        attach(Column::Host)
    );
    render_tests(records, &mut md);
    render_steps(records, &mut md);
    render_bench(records, &mut md);
    let _ = writeln!(md, "{BEGIN}; do not edit them by hand.");
    for r in records {
        let _ = writeln!(
            md,
            "{}\t{}\t{}",
            r.column.tag(),
            r.kind,
            r.fields.join("\t")
        );
    }
    let _ = writeln!(md, "{END}");
    md
}

fn render_tests(records: &[Record], md: &mut String) {
    let _ = writeln!(
        md,
        "## End-to-end test binaries (`cargo xtask vm`)\n\n\
         Each binary of the `tests` package runs with `--test-threads=1` under a time limit.\n\
         Tests that need what a kernel lacks skip themselves, saying why; a binary that\n\
         checks no kernel behaviour is skipped in the guest, with the reason.\n\n\
         | test binary | Debian 6.1 guest | host |\n|---|---|---|"
    );
    let names = names(records, "test");
    if names.is_empty() {
        let _ = writeln!(md, "| (not run yet: `cargo xtask vm`) | | |");
    }
    for name in names {
        let result = |c| match find(records, "test", c, &name) {
            None => "not run".to_owned(),
            Some(r) => test_cell(r),
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            result(Column::Guest),
            result(Column::Host)
        );
    }
    md.push('\n');
}

/// `name rc seconds summary failed-tests` -> "passed: 12 passed; 0 failed (40 s)".
fn test_cell(r: &Record) -> String {
    let (rc, took, failed) = (field(r, 1), field(r, 2), field(r, 4));
    // libtest's `ok. 13 passed; 0 failed; 0 ignored`: the verdict is said separately.
    let summary = field(r, 3)
        .trim_start_matches("ok. ")
        .trim_start_matches("FAILED. ");
    let text = match rc {
        "skip" => format!("skipped: {summary}"),
        "0" => format!("passed ({summary}; {took} s)"),
        // timeout(1)'s status, or the signal it sends.
        "124" | "143" => format!("TIMED OUT after {took} s: {summary}"),
        _ if failed.is_empty() => format!("FAILED (status {rc}): {summary} ({took} s)"),
        _ => format!("FAILED: {summary} ({took} s); failed: {failed}"),
    };
    cell(&text)
}

fn render_steps(records: &[Record], md: &mut String) {
    let _ = writeln!(
        md,
        "## Smoke test (`cargo xtask vm --smoke`, a stage of `cargo xtask test`)\n\n\
         xtask/src/vm/smoke.sh: client, node and pod namespaces, the real agent with one\n\
         ClusterIP Service, a TCP connection through it, `kill -9` and a new agent while a\n\
         connection stays open, then `lb-agent --cleanup`.\n\n\
         | smoke step | Debian 6.1 guest | host |\n|---|---|---|"
    );
    for name in names(records, "step") {
        let result = |c| match find(records, "step", c, &name) {
            Some(r) if field(r, 1) == "ok" => "passed",
            Some(_) => "FAILED",
            None => "not run",
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            result(Column::Guest),
            result(Column::Host)
        );
    }
    md.push('\n');
}

/// Variant columns of the benchmark, in its report order.
const VARIANTS: [&str; 5] = ["direct", "iptables", "nftables", "lb", "lb XDP"];

fn render_bench(records: &[Record], md: &mut String) {
    let _ = writeln!(
        md,
        "## Benchmark in the guest (`cargo xtask vm --bench`)\n\n\
         The quick datapath comparison of `cargo xtask bench` (xtask/src/bench_net.rs: one\n\
         Service, 2 pods, `lbt-client` load, 1 s per test, one round) inside the Debian 6.1\n\
         guest. The guest runs under QEMU's TCG emulator, not KVM (nested KVM hangs here),\n\
         so the figures are an emulator's: a few hundred transactions per 1 s test, which\n\
         swing by up to 2x between runs and between variants (even direct against the\n\
         others). What the run shows is that every variant programs and carries TCP and UDP\n\
         on this kernel (lb through netlink TC, lb XDP with the XDP program in front); the\n\
         ratios are printed as measured, not as a verdict. The host's figures are in\n\
         results/bench.md.\n"
    );
    let rows: Vec<&Record> = of(records, "bench")
        .filter(|r| r.column == Column::Guest)
        .collect();
    if rows.is_empty() {
        let _ = writeln!(md, "Not run yet.\n");
        return;
    }
    let _ = writeln!(
        md,
        "| other Services | test | unit | {} | lb / direct | lb / iptables | lb / nftables | lb XDP / lb |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        VARIANTS.join(" | ")
    );
    // `size test clients variant value unit`.
    let mut keys: Vec<(String, String, String, String)> = Vec::new();
    for r in &rows {
        let key = (
            field(r, 0).to_owned(),
            field(r, 1).to_owned(),
            field(r, 2).to_owned(),
            field(r, 5).to_owned(),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (size, test, clients, unit) in keys {
        let value = |v: &str| {
            rows.iter()
                .find(|r| {
                    field(r, 0) == size
                        && field(r, 1) == test
                        && field(r, 2) == clients
                        && field(r, 3) == v
                })
                .and_then(|r| field(r, 4).parse::<f64>().ok())
        };
        let shown = |v: &str| value(v).map_or_else(|| "–".into(), |x| format!("{x:.0}"));
        let ratio = |a: &str, b: &str| match (value(a), value(b)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "–".into(),
        };
        let clients = if clients == "1" {
            String::new()
        } else {
            format!(", {clients} clients")
        };
        let _ = writeln!(
            md,
            "| {size} | {test}{clients} | {unit} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            shown("direct"),
            shown("iptables"),
            shown("nftables"),
            shown("lb"),
            shown("lb XDP"),
            ratio("lb", "direct"),
            ratio("lb", "iptables"),
            ratio("lb", "nftables"),
            ratio("lb XDP", "lb"),
        );
    }
    let skipped: Vec<&Record> = of(records, "bench-skip").collect();
    if !skipped.is_empty() {
        let _ = writeln!(md, "\nNot measured:\n");
        for r in skipped {
            let _ = writeln!(
                md,
                "- {} at {} other Services: {}",
                field(r, 1),
                field(r, 0),
                cell(field(r, 2))
            );
        }
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_become_records() {
        let r = parse(
            "noise\nLBVM-FEATURE tcx\t6.6\tno (refused)\nLBVM-STEP agent-ready ok\n\
             LBVM-TEST clusterip\t0\t41\tok. 12 passed; 0 failed\t\n",
            Column::Guest,
        );
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].fields, ["tcx", "6.6", "no (refused)"]);
        assert_eq!(r[1].fields, ["agent-ready", "ok"]);
        assert_eq!(r[2].kind, "test");
        assert_eq!(test_cell(&r[2]), "passed (12 passed; 0 failed; 41 s)");
    }

    #[test]
    fn a_run_replaces_only_its_own_kinds() {
        let old = parse(
            "LBVM-FEATURE tcx\t6.6\tno\nLBVM-STEP topology ok\nLBVM-TEST harness\t0\t3\tok\t\n",
            Column::Guest,
        );
        let new = parse(
            "LBVM-FEATURE tcx\t6.6\tyes\nLBVM-STEP topology FAILED\n",
            Column::Guest,
        );
        let merged = merge(old, new);
        assert_eq!(merged.len(), 3);
        assert!(merged.iter().any(|r| r.kind == "test"));
        assert!(merged.iter().any(|r| r.fields == ["topology", "FAILED"]));
    }

    #[test]
    fn records_survive_the_file() {
        let records = parse(
            "LBVM-FEATURE kernel\t6.1.0\nLBVM-FEATURE bpffs\t4.4\tyes\nLBVM-STEP topology ok\n\
             LBVM-BENCH 0\tTCP_RR\t1\tlb\t1000\ttransactions/s\n",
            Column::Guest,
        );
        let md = render(&records);
        assert!(md.contains("| bpffs | 4.4 | yes | - |"));
        assert_eq!(load(&md), records);
    }
}
