//! The deploy/ manifests, the container build file and the migration page are checked
//! against the real API types and the real agent binary: every field is a field the API
//! knows, the RBAC is least-privilege, the DaemonSet runs without `privileged` with bpffs
//! mounted, and every flag they pass or document is one the agent accepts.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tests::agent::agent_binary;

fn repo() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every YAML document of every file under deploy/, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .expect("read deploy/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/ holds no manifests");
    let mut docs = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let mut chunk = String::new();
        for line in text.lines().chain(std::iter::once("---")) {
            if line.trim_end() == "---" {
                if chunk
                    .lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
                {
                    let doc: Value = serde_saphyr::from_str(&chunk)
                        .unwrap_or_else(|e| panic!("{name}: not valid YAML: {e}"));
                    docs.push((name.clone(), doc));
                }
                chunk.clear();
            } else {
                chunk.push_str(line);
                chunk.push('\n');
            }
        }
    }
    docs
}

/// Paths of every leaf in a JSON value (`spec.template.spec.containers[0].name`).
fn leaves(v: &Value, at: String, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                leaves(v, format!("{at}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                leaves(v, format!("{at}[{i}]"), out);
            }
        }
        Value::Null => {}
        _ => {
            out.insert(at);
        }
    }
}

/// Decodes `doc` as the API type `T` and checks nothing was lost on the way: a misspelt
/// or misplaced field would be silently dropped by the API server.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", doc["kind"]));
    let back = serde_json::to_value(&obj).unwrap();
    let (mut want, mut got) = (BTreeSet::new(), BTreeSet::new());
    leaves(doc, String::new(), &mut want);
    leaves(&back, String::new(), &mut got);
    let lost: Vec<_> = want.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{file}: {} fields unknown to the API: {lost:?}",
        doc["kind"]
    );
    obj
}

struct Deploy {
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    daemonset: DaemonSet,
}

fn deploy() -> Deploy {
    let mut by_kind: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        assert!(
            by_kind.insert(kind.clone(), (file, doc)).is_none(),
            "deploy/ holds two {kind} objects"
        );
    }
    let kinds: BTreeSet<&str> = by_kind.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]),
        "deploy/ kinds"
    );
    let get = |kind: &str| by_kind[kind].clone();
    let (f, d) = get("ServiceAccount");
    let account: ServiceAccount = typed(&f, &d);
    let (f, d) = get("ClusterRole");
    let role: ClusterRole = typed(&f, &d);
    let (f, d) = get("ClusterRoleBinding");
    let binding: ClusterRoleBinding = typed(&f, &d);
    let (f, d) = get("DaemonSet");
    let daemonset: DaemonSet = typed(&f, &d);
    Deploy {
        account,
        role,
        binding,
        daemonset,
    }
}

/// The long flags `lb-agent --help` lists.
fn agent_flags() -> BTreeSet<String> {
    let out = Command::new(agent_binary())
        .arg("--help")
        .output()
        .expect("run lb-agent --help");
    assert!(out.status.success(), "lb-agent --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(['.', ')', ':']).to_owned())
        .collect()
}

#[test]
fn rbac_is_least_privilege() {
    let d = deploy();
    let sa = &d.account.metadata;
    assert_eq!(sa.namespace.as_deref(), Some("kube-system"));
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for rule in d.role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "ClusterRole rule {rule:?}: only resource rules are expected"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "ClusterRole grants a wildcard: {rule:?}"
                    );
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((group.into(), resource.into(), verb.into()));
        }
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            wanted.insert((group.into(), "events".into(), verb.into()));
        }
    }
    assert_eq!(
        granted, wanted,
        "ClusterRole grants exactly what the agent uses"
    );

    let role_ref = &d.binding.role_ref;
    assert_eq!(
        (role_ref.kind.as_str(), role_ref.name.as_str()),
        ("ClusterRole", d.role.metadata.name.as_deref().unwrap())
    );
    let subjects = d.binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: the agent's ServiceAccount");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.namespace);
}

#[test]
fn daemonset_runs_like_kube_proxy_without_privileged() {
    let d = deploy();
    let ds = &d.daemonset;
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.as_ref().expect("DaemonSet spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name, d.account.metadata.name);
    assert_eq!(pod.host_network, Some(true), "host network");
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet"),
        "host-network pods need ClusterFirstWithHostNet for cluster DNS"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "no privileged container");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    assert!(
        added.contains("BPF") && added.contains("NET_ADMIN"),
        "needs CAP_BPF and CAP_NET_ADMIN: {added:?}"
    );
    let allowed = BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]);
    assert!(
        added.is_subset(&allowed),
        "more capabilities than the agent needs: {added:?}"
    );

    // bpffs from the host, so pins outlive the container.
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let bpffs = volumes
        .iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume of /sys/fs/bpf");
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.name == bpffs.name)
        .expect("bpffs mounted in the container");
    assert_eq!(mount.mount_path, "/sys/fs/bpf");
    assert_ne!(
        mount.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "Bidirectional propagation needs a privileged container"
    );

    let args = c.args.as_deref().unwrap_or_default();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("DaemonSet passes no {flag}=: {args:?}"))
    };
    assert!(
        arg("--bpffs-root").starts_with("/sys/fs/bpf/"),
        "pins under the mounted bpffs"
    );
    assert_eq!(arg("--hostname-override"), "$(NODE_NAME)");
    let env = c.env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(node_name.field_path, "spec.nodeName");

    // Probes hit the healthz server the agent is told to run.
    let healthz_port: i32 = arg("--healthz-bind-address")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("--healthz-bind-address HOST:PORT");
    for (what, probe, path) in [
        ("liveness", c.liveness_probe.as_ref(), "/livez"),
        ("readiness", c.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what} probe over HTTP"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} probe path");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(healthz_port),
            "{what} probe port"
        );
    }
}

#[test]
fn daemonset_flags_are_accepted_by_the_agent() {
    let d = deploy();
    let pod = d.daemonset.spec.unwrap().template.spec.unwrap();
    let args = pod.containers[0].args.clone().unwrap_or_default();
    let known = agent_flags();
    for a in &args {
        let flag = a.split('=').next().unwrap();
        assert!(
            known.contains(flag),
            "DaemonSet passes {flag}, which lb-agent does not know"
        );
    }
    // clap stops at --version only after every argument before it parsed: an unknown
    // flag or a bad value fails here.
    let out = Command::new(agent_binary())
        .args(&args)
        .arg("--version")
        .output()
        .expect("run lb-agent");
    assert!(
        out.status.success(),
        "lb-agent rejects the DaemonSet's arguments {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn container_image_holds_the_agent_and_its_libraries() {
    let file = read("deploy/Containerfile");
    let instr = |name: &str| -> Vec<String> {
        file.lines()
            .filter(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l[name.len()..].trim().to_owned())
            .collect()
    };
    let from = instr("FROM");
    assert_eq!(
        from,
        ["debian:bookworm-slim"],
        "built and tested on Debian 12"
    );
    // Packages come from Debian's archive only.
    for run in instr("RUN") {
        assert!(
            run.starts_with("apt-get update"),
            "RUN other than Debian packages: {run}"
        );
    }
    let copy = instr("COPY");
    assert_eq!(copy.len(), 1, "one COPY: {copy:?}");
    let (src, dst) = copy[0].split_once(' ').expect("COPY SRC DST");
    assert_eq!(src, "target/release/lb-agent");
    let entry: Vec<String> =
        serde_json::from_str(&instr("ENTRYPOINT")[0]).expect("ENTRYPOINT [..]");
    assert_eq!(entry[0], dst.trim(), "ENTRYPOINT runs what COPY put there");

    // The build context lets exactly that file through.
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules, ["*", "!target/release/lb-agent"]);

    // The binary needs nothing bookworm-slim lacks (no OpenSSL: rustls).
    let out = Command::new("ldd")
        .arg(agent_binary())
        .output()
        .expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let in_slim = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
    ];
    for line in text.lines() {
        let lib = line.split_whitespace().next().unwrap_or_default();
        let base = lib.rsplit('/').next().unwrap_or(lib);
        assert!(
            in_slim.contains(&base) || base.starts_with("ld-linux"),
            "lb-agent links {lib}, which debian:bookworm-slim does not ship:\n{text}"
        );
    }
}

#[test]
fn migration_page_names_only_real_flags() {
    let page = read("docs/migration.md");
    let known = agent_flags();
    let table: Vec<&str> = page
        .lines()
        .skip_while(|l| !l.starts_with("## Flags"))
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .collect();
    assert!(table.len() > 5, "docs/migration.md has a flag table");
    for row in table {
        let ours = row.split('|').nth(2).unwrap_or_default();
        for word in ours.split(|c: char| c == '`' || c.is_whitespace() || c == ',') {
            if word.starts_with("--") {
                assert!(
                    known.contains(word),
                    "docs/migration.md maps to {word}, which lb-agent does not know"
                );
            }
        }
    }
}
