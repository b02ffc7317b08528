//! The agent's command line: clear one-line errors and documented flags.
use std::process::Command;

use tests::agent::agent_binary;

fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(agent_binary())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lb-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(agent_binary())
        .arg("--help")
        .output()
        .expect("run lb-agent");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--manifests",
        "--devices",
        "--bpffs-root",
        "--ebpf-object",
        "--poll-interval-ms",
        "--dry-run",
        "--log-level",
        "--kubeconfig",
        "--hostname-override",
        "--cleanup",
        "--detach-on-exit",
        "--cgroup-path",
        "--nodeport-localhost",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn unreadable_manifests_directory_is_one_clear_line() {
    let (ok, err) = agent(&["--manifests", "/nonexistent/lb-dir", "--devices", "lbc*"]);
    assert!(!ok);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(
            "cannot read manifests directory /nonexistent/lb-dir: No such file or directory"
        ),
        "{err}"
    );
}

#[test]
fn unreadable_kubeconfig_is_one_clear_line() {
    let (ok, err) = agent(&[
        "--kubeconfig",
        "/nonexistent/lb-kubeconfig",
        "--devices",
        "lbc*",
    ]);
    assert!(!ok);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("cannot use kubeconfig /nonexistent/lb-kubeconfig"),
        "{err}"
    );
}

#[test]
fn missing_privilege_is_one_clear_line() {
    tests::require_root();
    let dir = std::env::temp_dir().join(format!("lb-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Drop to `nobody` with no capabilities, as an unprivileged DaemonSet would run.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(agent_binary())
        .arg("--manifests")
        .arg(&dir)
        .args([
            "--devices",
            "lbc*",
            "--bpffs-root",
            "/sys/fs/bpf/lb-cli-test",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("run setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not enough privilege"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "{err}"
    );
}

#[test]
fn dry_run_prints_the_tables_without_privilege() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(agent_binary())
        .args(["--manifests", demo, "--dry-run"])
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("10.96.0.10:80/TCP") && json.contains("10.201.3.2:8080"),
        "{json}"
    );
}
