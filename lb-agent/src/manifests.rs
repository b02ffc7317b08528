//! The embedded default source: a directory of Kubernetes manifests, as `kubectl apply -f
//! DIR` would take it, followed live.
//!
//! Files ending in `.yaml`, `.yml` or `.json` directly in the directory are read (in name
//! order, not recursively, like kubectl). A file may hold several YAML documents and
//! `kind: List` objects. Services, `discovery.k8s.io/v1` EndpointSlices and v1 Endpoints
//! are used; other kinds are reported once and skipped. The namespace defaults to
//! `default`.
//!
//! A file that cannot be read or parsed is reported, naming the file, the document and the
//! object where known, and its last good content stays in force: a typo saved in an editor
//! never takes Services down. A deleted file's objects go away.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;

use crate::model::{ObjectRef, Objects, Problem};

/// The directory itself is unusable.
#[derive(Debug, thiserror::Error)]
#[error("cannot read manifests directory {path}: {source}")]
pub struct ManifestError {
    /// The directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The objects a scan found and what was wrong on the way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// Objects in force (including last good content of broken files).
    pub objects: Objects,
    /// Problems with files and objects, sorted.
    pub problems: Vec<Problem>,
}

/// One object read from a file.
#[derive(Debug, Clone, PartialEq)]
enum Obj {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Endpoints(Box<Endpoints>),
}

#[derive(Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    /// The bytes last parsed (`None` before the first read).
    content: Option<Vec<u8>>,
    /// Objects of the last successful parse, with their references.
    good: Vec<(ObjectRef, Obj)>,
    /// Why the current content is not used, if it is not.
    error: Option<String>,
    /// Non-fatal notes (skipped kinds).
    notes: Vec<String>,
}

/// A watched manifests directory.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    last: Option<Scan>,
}

impl ManifestDir {
    /// Opens `path`, failing clearly if it cannot be read.
    pub fn open(path: &Path) -> Result<Self, ManifestError> {
        fs::read_dir(path).map_err(|source| ManifestError {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            files: BTreeMap::new(),
            last: None,
        })
    }

    /// Re-reads changed files. Returns the new scan when the objects in force or the
    /// problems changed (always on the first call), `None` otherwise.
    pub fn rescan(&mut self) -> Result<Option<Scan>, ManifestError> {
        let entries = fs::read_dir(&self.path).map_err(|source| ManifestError {
            path: self.path.clone(),
            source,
        })?;
        let mut present = BTreeSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_manifest = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            // Editors' swap and backup files start with a dot.
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !is_manifest || hidden || !path.is_file() {
                continue;
            }
            present.insert(path.clone());
            let state = self.files.entry(path.clone()).or_default();
            refresh_file(&path, state);
        }
        self.files.retain(|p, _| present.contains(p));
        let scan = self.assemble();
        if self.last.as_ref() == Some(&scan) {
            return Ok(None);
        }
        self.last = Some(scan.clone());
        Ok(Some(scan))
    }

    fn assemble(&self) -> Scan {
        let mut objects = Objects::default();
        let mut problems = BTreeSet::new();
        let mut origin: BTreeMap<ObjectRef, &Path> = BTreeMap::new();
        for (path, state) in &self.files {
            let file = file_ref(path);
            if let Some(e) = &state.error {
                let kept = if state.good.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; keeping its last good content ({} objects)",
                        state.good.len()
                    )
                };
                problems.insert(Problem::new(file.clone(), format!("{e}{kept}")));
            }
            for note in &state.notes {
                problems.insert(Problem::new(file.clone(), note.clone()));
            }
            for (r, obj) in &state.good {
                if let Some(first) = origin.get(r) {
                    problems.insert(Problem::new(
                        file.clone(),
                        format!(
                            "{r} is already defined in {}; ignored here",
                            first.display()
                        ),
                    ));
                    continue;
                }
                origin.insert(r.clone(), path);
                let key = (r.namespace.clone(), r.name.clone());
                match obj {
                    Obj::Service(s) => {
                        objects.services.insert(key, (**s).clone());
                    }
                    Obj::Slice(s) => {
                        objects.endpoint_slices.insert(key, (**s).clone());
                    }
                    Obj::Endpoints(e) => {
                        objects.endpoints.insert(key, (**e).clone());
                    }
                }
            }
        }
        Scan {
            objects,
            problems: problems.into_iter().collect(),
        }
    }
}

fn file_ref(path: &Path) -> ObjectRef {
    ObjectRef::new("File", "", &path.display().to_string())
}

fn refresh_file(path: &Path, state: &mut FileState) {
    let stamp = fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if stamp.is_some() && stamp == state.stamp {
        return;
    }
    let content = match fs::read(path) {
        Ok(c) => c,
        Err(e) => {
            state.error = Some(format!("cannot read: {e}"));
            return;
        }
    };
    state.stamp = stamp;
    if state.content.as_ref() == Some(&content) {
        // Touched but not changed.
        return;
    }
    let content = state.content.insert(content);
    let text = match std::str::from_utf8(content) {
        Ok(t) => t,
        Err(e) => {
            state.error = Some(format!("not UTF-8: {e}"));
            return;
        }
    };
    match parse_file(text, path) {
        Ok((objs, notes)) => {
            state.good = objs;
            state.notes = notes;
            state.error = None;
        }
        Err(e) => state.error = Some(e),
    }
}

type Parsed = (Vec<(ObjectRef, Obj)>, Vec<String>);

/// Parses one file into objects and notes; any error rejects the whole file.
fn parse_file(text: &str, path: &Path) -> Result<Parsed, String> {
    let docs: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        vec![v]
    } else {
        serde_saphyr::from_multiple::<Value>(text).map_err(|e| yaml_error(&e))?
    };
    let mut objs = Vec::new();
    let mut notes = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let where_ = format!("document {}", i + 1);
        collect(doc, &where_, &mut objs, &mut notes)?;
    }
    Ok((objs, notes))
}

fn yaml_error(e: &serde_saphyr::Error) -> String {
    let first = e.to_string().lines().next().unwrap_or_default().to_owned();
    match e.location() {
        Some(loc) => format!(
            "invalid YAML at line {} column {}: {first}",
            loc.line(),
            loc.column()
        ),
        None => format!("invalid YAML: {first}"),
    }
}

fn collect(
    doc: Value,
    where_: &str,
    objs: &mut Vec<(ObjectRef, Obj)>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind.is_empty() || api_version.is_empty() {
        return Err(format!("{where_}: apiVersion and kind are required"));
    }
    if kind == "List" || kind.ends_with("List") && doc.get("items").is_some() {
        let Some(Value::Array(items)) = doc.get("items").cloned() else {
            return Err(format!("{where_}: {kind} without items"));
        };
        for (j, item) in items.into_iter().enumerate() {
            collect(item, &format!("{where_}, item {}", j + 1), objs, notes)?;
        }
        return Ok(());
    }
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_owned();
    let r = ObjectRef::new(&kind, &namespace, &name);
    if name.is_empty() {
        return Err(format!("{where_}: {kind} has no metadata.name"));
    }
    let bad = |e: serde_json::Error| format!("{where_} ({r}): {e}");
    let obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Obj::Service(Box::new(with_namespace(
            serde_json::from_value(doc).map_err(bad)?,
            &namespace,
        ))),
        ("discovery.k8s.io/v1", "EndpointSlice") => Obj::Slice(Box::new(with_namespace(
            serde_json::from_value(doc).map_err(bad)?,
            &namespace,
        ))),
        ("v1", "Endpoints") => Obj::Endpoints(Box::new(with_namespace(
            serde_json::from_value(doc).map_err(bad)?,
            &namespace,
        ))),
        _ => {
            notes.push(format!(
                "{where_}: {api_version} {kind} {namespace}/{name} is not used by lb-agent; skipped"
            ));
            return Ok(());
        }
    };
    objs.push((r, obj));
    Ok(())
}

/// Objects whose namespace is set to `namespace` when missing.
trait HasNamespace {
    fn set_namespace(&mut self, ns: &str);
}

macro_rules! has_namespace {
    ($($t:ty),*) => {$(
        impl HasNamespace for $t {
            fn set_namespace(&mut self, ns: &str) {
                self.metadata.namespace = Some(ns.to_owned());
            }
        }
    )*};
}
has_namespace!(Service, EndpointSlice, Endpoints);

fn with_namespace<T: HasNamespace>(mut obj: T, ns: &str) -> T {
    obj.set_namespace(ns);
    obj
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "lb-manifests-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn write(&self, name: &str, text: &str) {
            // A new length or content is what the scan looks for; mtime granularity may
            // hide two writes within one tick, which content comparison does not care about.
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            let t = SystemTime::now()
                + std::time::Duration::from_secs(N.fetch_add(1, Ordering::Relaxed).into());
            let f = fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(t).unwrap();
        }
    }

    static N: AtomicU32 = AtomicU32::new(1);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SVC: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

    const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
ports:
- name: http
  port: 8080
";

    fn names(scan: &Scan) -> Vec<String> {
        let mut v: Vec<String> = scan
            .objects
            .services
            .keys()
            .map(|(n, s)| format!("svc {n}/{s}"))
            .collect();
        v.extend(
            scan.objects
                .endpoint_slices
                .keys()
                .map(|(n, s)| format!("slice {n}/{s}")),
        );
        v.extend(
            scan.objects
                .endpoints
                .keys()
                .map(|(n, s)| format!("ep {n}/{s}")),
        );
        v
    }

    #[test]
    fn multi_document_yaml_and_default_namespace() {
        let d = TempDir::new();
        d.write("web.yaml", &format!("{SVC}---\n{SLICE}"));
        let mut m = ManifestDir::open(&d.0).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["svc default/web", "slice default/web-1"]);
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        assert_eq!(
            scan.objects.services[&("default".into(), "web".into())]
                .metadata
                .namespace
                .as_deref(),
            Some("default")
        );
        assert!(m.rescan().unwrap().is_none(), "nothing changed");
    }

    #[test]
    fn list_json_and_endpoints() {
        let d = TempDir::new();
        d.write(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Endpoints\n  metadata: {name: ext, namespace: db}\n  subsets:\n  - addresses: [{ip: 192.168.1.10}]\n    ports: [{port: 5432}]\n",
        );
        d.write(
            "svc.json",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"ext","namespace":"db"},"spec":{"clusterIP":"10.96.0.30","ports":[{"port":5432}]}}"#,
        );
        let mut m = ManifestDir::open(&d.0).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["svc db/ext", "ep db/ext"]);
    }

    #[test]
    fn unknown_kinds_are_noted_and_skipped() {
        let d = TempDir::new();
        d.write(
            "mixed.yaml",
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n{SVC}"),
        );
        let mut m = ManifestDir::open(&d.0).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["svc default/web"]);
        assert_eq!(scan.problems.len(), 1);
        let p = scan.problems[0].to_string();
        assert!(
            p.contains("mixed.yaml")
                && p.contains("Deployment default/web")
                && p.contains("skipped"),
            "{p}"
        );
    }

    #[test]
    fn malformed_file_keeps_its_last_good_content() {
        let d = TempDir::new();
        d.write("web.yaml", SVC);
        d.write("slice.yaml", SLICE);
        let mut m = ManifestDir::open(&d.0).unwrap();
        m.rescan().unwrap().unwrap();
        d.write(
            "web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [ {port: 80\n",
        );
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(
            names(&scan),
            ["svc default/web", "slice default/web-1"],
            "last good kept"
        );
        assert_eq!(scan.problems.len(), 1);
        let p = scan.problems[0].to_string();
        assert!(
            p.contains("web.yaml") && p.contains("invalid YAML at line") && p.contains("last good"),
            "{p}"
        );

        // A type error names the document and the object.
        d.write("web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: eighty}]\n");
        let scan = m.rescan().unwrap().unwrap();
        let p = scan.problems[0].to_string();
        assert!(p.contains("document 1 (Service default/web)"), "{p}");

        // Fixed again: the problem goes away.
        d.write("web.yaml", SVC);
        let scan = m.rescan().unwrap().unwrap();
        assert!(scan.problems.is_empty());
    }

    #[test]
    fn a_file_never_good_contributes_nothing() {
        let d = TempDir::new();
        d.write("bad.yaml", "kind: Service\n");
        let mut m = ManifestDir::open(&d.0).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        assert!(names(&scan).is_empty());
        assert!(
            scan.problems[0]
                .to_string()
                .contains("apiVersion and kind are required")
        );
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let d = TempDir::new();
        d.write("web.yaml", SVC);
        d.write("slice.yaml", SLICE);
        let mut m = ManifestDir::open(&d.0).unwrap();
        m.rescan().unwrap().unwrap();
        fs::remove_file(d.0.join("slice.yaml")).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["svc default/web"]);
    }

    #[test]
    fn duplicate_objects_first_file_wins() {
        let d = TempDir::new();
        d.write("a.yaml", SVC);
        d.write("b.yaml", &SVC.replace("10.96.0.10", "10.96.0.11"));
        let mut m = ManifestDir::open(&d.0).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        let svc = &scan.objects.services[&("default".into(), "web".into())];
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        assert_eq!(scan.problems.len(), 1);
        assert!(scan.problems[0].to_string().contains("already defined in"));
    }

    #[test]
    fn ignores_other_files_and_reports_missing_directory() {
        let d = TempDir::new();
        d.write("README.md", "not a manifest");
        d.write(".web.yaml.swp", "junk");
        let mut m = ManifestDir::open(&d.0).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        assert!(names(&scan).is_empty() && scan.problems.is_empty());
        let err = ManifestDir::open(Path::new("/nonexistent/lb-manifests")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read manifests directory /nonexistent/lb-manifests: No such file or directory (os error 2)"
        );
    }
}
