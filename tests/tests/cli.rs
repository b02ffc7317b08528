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
        "--external-ip-cidrs",
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

/// The CVE-2020-8554 guard, through the real binary: an externalIP outside
/// `--external-ip-cidrs` gets no frontend and a problem naming the Service, while the
/// allowed one and every other Service are programmed as before.
#[test]
fn external_ips_outside_the_allowed_cidrs_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("lb-cli-extip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the manifests directory");
    std::fs::write(
        dir.join("svc.yaml"),
        r#"apiVersion: v1
kind: Service
metadata: {name: grab, namespace: default}
spec:
  clusterIP: 10.96.7.1
  externalIPs: [203.0.113.9, 8.8.8.8]
  ports: [{port: 53, protocol: UDP, targetPort: 53}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  clusterIP: 10.96.7.2
  ports: [{port: 80, targetPort: 8080}]
"#,
    )
    .expect("write the manifest");
    let out = Command::new(agent_binary())
        .arg("--manifests")
        .arg(&dir)
        .args(["--dry-run", "--external-ip-cidrs", "203.0.113.0/24"])
        .output()
        .expect("run lb-agent");
    let _ = std::fs::remove_dir_all(&dir);
    let (json, log) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{log}");
    assert!(
        json.contains("203.0.113.9:53/UDP") && json.contains("10.96.7.2:80/TCP"),
        "{json}"
    );
    assert!(!json.contains("8.8.8.8:53"), "{json}");
    assert!(
        log.contains("default/grab") && log.contains("externalIP 8.8.8.8 is outside"),
        "{log}"
    );
    // A malformed list is refused before anything starts.
    let (ok, err) = agent(&[
        "--manifests",
        "/nonexistent",
        "--external-ip-cidrs",
        "8.8.8.8",
    ]);
    assert!(!ok && err.contains("--external-ip-cidrs"), "{err}");
}
