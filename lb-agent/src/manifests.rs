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
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;

use crate::model::{LABEL_SERVICE_NAME, ObjectRef, Objects, Problem};
use crate::services::CompactService;
use crate::slices::CompactSlice;

/// The manifests directory itself is unusable (problems with single files are
/// [`Problem`]s in the [`Scan`] instead).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The directory cannot be listed.
    // The reason is part of the message (and deliberately not a `#[source]`, which would
    // print it twice in an error chain): "cannot read manifests directory /x: No such file
    // or directory".
    #[error("cannot read manifests directory {}: {}", path.display(), io_reason(reason))]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// What the kernel said.
        reason: std::io::Error,
    },
}

impl ManifestError {
    /// Stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ReadDir { .. } => "read_dir",
        }
    }
}

/// An I/O error in words, without the "(os error N)" suffix.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .map_or_else(|| text.clone(), str::to_owned),
        None => text,
    }
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
    Service(Arc<CompactService>),
    Slice(Arc<CompactSlice>),
    Endpoints(Arc<Endpoints>),
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
    /// Opens `path`, failing clearly if it cannot be read. Nothing is parsed yet: the first
    /// [`rescan`](Self::rescan) (or [`scan`](Self::scan)) does that.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ManifestError> {
        let path = path.as_ref().to_path_buf();
        if let Err(reason) = fs::read_dir(&path) {
            return Err(ManifestError::ReadDir { path, reason });
        }
        Ok(Self {
            path,
            files: BTreeMap::new(),
            last: None,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads what changed and returns the full current scan, changed or not (for the
    /// synchronous first scan at start-up).
    pub fn scan(&mut self) -> Result<Scan, ManifestError> {
        if let Some(scan) = self.rescan()? {
            return Ok(scan);
        }
        Ok(self.last.clone().unwrap_or_default())
    }

    /// Re-reads the files whose modification time or size changed (a file whose content
    /// turns out the same counts as unchanged). Returns the new scan when the objects in
    /// force or the problems changed (always on the first call), `None` otherwise.
    pub fn rescan(&mut self) -> Result<Option<Scan>, ManifestError> {
        let entries = fs::read_dir(&self.path).map_err(|reason| ManifestError::ReadDir {
            path: self.path.clone(),
            reason,
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
                        objects.services.insert(key, s.clone());
                    }
                    Obj::Slice(s) => {
                        objects.endpoint_slices.insert(key, s.clone());
                    }
                    Obj::Endpoints(e) => {
                        objects.endpoints.insert(key, e.clone());
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

/// Parses one file into objects and notes; any error rejects the whole file, so that a
/// half-edited file never replaces its last good content with part of itself.
fn parse_file(text: &str, path: &Path) -> Result<Parsed, String> {
    let docs = if path.extension().is_some_and(|e| e == "json") {
        json_documents(text)?
    } else {
        yaml_documents(text)?
    };
    let mut objs = Vec::new();
    let mut notes = Vec::new();
    for (i, (line, doc)) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let where_ = format!("document {} (line {line})", i + 1);
        collect(doc, &where_, &mut objs, &mut notes)?;
    }
    Ok((objs, notes))
}

/// The documents of a JSON file (one value, or several in a row as kubectl accepts), each
/// with the line it starts on.
fn json_documents(text: &str) -> Result<Vec<(usize, Value)>, String> {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    loop {
        let offset = stream.byte_offset();
        let Some(next) = stream.next() else {
            return Ok(docs);
        };
        let doc = next.map_err(|e| {
            format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        let start = offset + (text[offset..].len() - text[offset..].trim_start().len());
        docs.push((line_of(text, start), doc));
    }
}

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The non-empty documents of a YAML file, each with the line it starts on.
///
/// The file is split at document markers (`---`, `...` at the start of a line) and each
/// document parsed on its own, so that errors carry the file's line numbers and a
/// document's index counts empty documents too. YAML forbids these markers at the start of
/// a line inside any scalar, so the split is exact.
fn yaml_documents(text: &str) -> Result<Vec<(usize, Value)>, String> {
    let mut chunks: Vec<(usize, String)> = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if let Some(rest) = marker("---") {
            // Content may follow the marker on the same line (`--- !tag` or a flow
            // value); blanking the marker keeps its columns.
            chunks.push((i + 1, format!("   {rest}\n")));
        } else if marker("...").is_some() {
            chunks.push((i + 2, String::new()));
        } else if let Some((_, chunk)) = chunks.last_mut() {
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    let mut docs = Vec::new();
    for (start, chunk) in chunks {
        let blank = chunk.lines().all(|l| {
            let l = l.trim_start();
            l.is_empty() || l.starts_with('#') || l.starts_with('%')
        });
        if blank {
            continue;
        }
        let doc: Value = serde_saphyr::from_str(&chunk).map_err(|e| yaml_error(&e, start))?;
        docs.push((start, doc));
    }
    Ok(docs)
}

/// A YAML error with its position in the file (`start` is the document's first line).
fn yaml_error(e: &serde_saphyr::Error, start: usize) -> String {
    let text = e.to_string();
    // The message repeats the position relative to the document; the file's is below.
    let mut first = text.lines().next().unwrap_or_default();
    first = first.strip_prefix("error: ").unwrap_or(first);
    if let Some(rest) = first.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
        && rest
            .split_once(": ")
            .is_some_and(|(pos, _)| pos.contains(" column "))
    {
        first = after;
    }
    match e.location() {
        Some(loc) => format!(
            "invalid YAML at line {} column {}: {first}",
            start as u64 + loc.line() - 1,
            loc.column()
        ),
        None => format!("invalid YAML in the document at line {start}: {first}"),
    }
}

/// Turns one document (or the items of a `List`) into objects.
fn collect(
    mut doc: Value,
    where_: &str,
    objs: &mut Vec<(ObjectRef, Obj)>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let field = |doc: &Value, name: &str| {
        doc.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field(&doc, "apiVersion"), field(&doc, "kind"));
    if kind.is_empty() || api_version.is_empty() {
        return Err(format!("{where_}: apiVersion and kind are required"));
    }
    if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
        let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) else {
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
    if name.is_empty() {
        return Err(format!("{where_}: {kind} has no metadata.name"));
    }
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_owned();
    let r = ObjectRef::new(&kind, &namespace, &name);
    // As kubectl does: an object without a namespace goes to `default`. Set it before
    // deserializing so that the typed object says where it lives.
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("namespace".to_owned(), Value::String(namespace.clone()));
    }
    let bad = |e: serde_json::Error| format!("{where_}: {r}: {e}");
    let obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let svc: Service = serde_json::from_value(doc).map_err(bad)?;
            Obj::Service(Arc::new(CompactService::from(&svc)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = serde_json::from_value(doc).map_err(bad)?;
            let owned = slice
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(LABEL_SERVICE_NAME));
            if !owned {
                notes.push(format!(
                    "{where_}: {r} has no {LABEL_SERVICE_NAME} label, so it belongs to no \
                     Service"
                ));
            }
            Obj::Slice(Arc::new(CompactSlice::from(&slice)))
        }
        ("v1", "Endpoints") => Obj::Endpoints(Arc::new(serde_json::from_value(doc).map_err(bad)?)),
        _ => {
            notes.push(format!(
                "{where_}: {api_version} {r} is not used by lb-agent; skipped"
            ));
            return Ok(());
        }
    };
    objs.push((r, obj));
    Ok(())
}

/// Follows `dir`: rescans it every `interval` and sends every scan that changed. Returns
/// once every receiver is gone.
///
/// The caller usually takes a first scan with [`ManifestDir::scan`] before (to program the
/// maps before anything else starts) and seeds the channel with it; this loop then only
/// sends changes. If the directory becomes unreadable, the last objects stay in force and
/// the error is logged once.
pub async fn watch(mut dir: ManifestDir, interval: Duration, tx: tokio::sync::watch::Sender<Scan>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tx.closed() => return,
        }
        // Reading a directory of small files is quick; it is not worth a blocking thread.
        match dir.rescan() {
            Ok(changed) => {
                if last_error.take().is_some() {
                    tracing::info!(dir = %dir.path.display(), "manifests directory readable again");
                }
                if let Some(scan) = changed
                    && tx.send(scan).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!("{text}; keeping the objects read before");
                    last_error = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    /// Distinct, increasing modification times for every write of every test, so that a
    /// rewrite is always seen whatever the filesystem's timestamp granularity.
    static TICK: AtomicU64 = AtomicU64::new(1);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "lb-manifests-test-{}-{}",
                std::process::id(),
                TICK.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn write(&self, name: &str, text: &str) {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            let t = SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_000_000 + TICK.fetch_add(1, Ordering::Relaxed));
            let f = fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(t).unwrap();
        }

        fn open(&self) -> ManifestDir {
            ManifestDir::open(&self.0).unwrap()
        }
    }

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
        let o = &scan.objects;
        let mut v: Vec<String> = o
            .services
            .keys()
            .map(|(n, s)| format!("svc {n}/{s}"))
            .collect();
        v.extend(
            o.endpoint_slices
                .keys()
                .map(|(n, s)| format!("slice {n}/{s}")),
        );
        v.extend(o.endpoints.keys().map(|(n, s)| format!("ep {n}/{s}")));
        v
    }

    fn problems(scan: &Scan) -> Vec<String> {
        scan.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn multi_document_yaml_and_default_namespace() {
        let d = TempDir::new();
        d.write("web.yaml", &format!("# web\n---\n{SVC}---\n{SLICE}...\n"));
        let mut m = d.open();
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["svc default/web", "slice default/web-1"]);
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        let svc = &scan.objects.services[&("default".into(), "web".into())];
        assert_eq!(&*svc.namespace, "default");
        assert!(m.rescan().unwrap().is_none(), "nothing changed");
        assert_eq!(
            m.scan().unwrap(),
            scan,
            "scan() returns the current state anyway"
        );
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
        d.write(
            "slices.json",
            r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSliceList","items":[
                {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4","endpoints":[]}]}
               {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"b","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4","endpoints":[]}"#,
        );
        let scan = d.open().rescan().unwrap().unwrap();
        assert_eq!(
            names(&scan),
            [
                "svc db/ext",
                "slice default/a",
                "slice default/b",
                "ep db/ext"
            ]
        );
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    }

    #[test]
    fn unknown_kinds_are_reported_once_and_skipped() {
        let d = TempDir::new();
        d.write(
            "mixed.yaml",
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n{SVC}"),
        );
        let mut m = d.open();
        let scan = m.rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["svc default/web"]);
        let file = d.0.join("mixed.yaml");
        assert_eq!(
            problems(&scan),
            [format!(
                "File {}: document 1 (line 1): apps/v1 Deployment default/web is not used by \
                 lb-agent; skipped",
                file.display()
            )]
        );
        assert!(m.rescan().unwrap().is_none(), "not reported again");
    }

    #[test]
    fn errors_name_the_file_document_line_and_object() {
        let d = TempDir::new();
        d.write(
            "web.yaml",
            &format!(
                "# comment\n---\n---\n{SVC}---\n{}",
                SLICE.replace("port: 8080", "port: http")
            ),
        );
        let scan = d.open().rescan().unwrap().unwrap();
        let p = problems(&scan);
        assert_eq!(p.len(), 1);
        let prefix = format!(
            "File {}: document 2 (line 14): EndpointSlice default/web-1: invalid type",
            d.0.join("web.yaml").display()
        );
        assert!(p[0].starts_with(&prefix), "{}", p[0]);

        d.write("bad.yaml", &format!("{SVC}---\nkind: [\n"));
        d.write("bad.json", "{\"apiVersion\": \"v1\",\n \"kind\": }\n");
        let scan = d.open().rescan().unwrap().unwrap();
        let p = problems(&scan);
        assert!(
            p[0].contains("bad.json: invalid JSON at line 2 column"),
            "{}",
            p[0]
        );
        assert!(
            p[1].ends_with("bad.yaml: invalid YAML at line 12 column 7: unclosed bracket '['"),
            "{}",
            p[1]
        );
    }

    #[test]
    fn malformed_file_keeps_its_last_good_content() {
        let d = TempDir::new();
        d.write("web.yaml", SVC);
        d.write("slice.yaml", SLICE);
        let mut m = d.open();
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
        let p = problems(&scan);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("web.yaml: invalid YAML at line")
                && p[0].ends_with("keeping its last good content (1 objects)"),
            "{}",
            p[0]
        );
        let svc = &scan.objects.services[&("default".into(), "web".into())];
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );

        // A type error also keeps the last good content.
        d.write(
            "web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: eighty}]\n",
        );
        let scan = m.rescan().unwrap().unwrap();
        assert!(problems(&scan)[0].contains("document 1 (line 1): Service default/web: "));
        assert_eq!(names(&scan), ["svc default/web", "slice default/web-1"]);

        // Fixed again: the problem goes away.
        d.write("web.yaml", SVC);
        let scan = m.rescan().unwrap().unwrap();
        assert!(scan.problems.is_empty());
    }

    #[test]
    fn a_file_never_good_contributes_nothing() {
        let d = TempDir::new();
        d.write("bad.yaml", "kind: Service\n");
        let scan = d.open().rescan().unwrap().unwrap();
        assert!(names(&scan).is_empty());
        let p = problems(&scan);
        assert!(
            p[0].ends_with("document 1 (line 1): apiVersion and kind are required"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn a_rewrite_with_the_same_content_changes_nothing() {
        let d = TempDir::new();
        d.write("web.yaml", SVC);
        let mut m = d.open();
        m.rescan().unwrap().unwrap();
        d.write("web.yaml", SVC);
        assert!(m.rescan().unwrap().is_none());
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let d = TempDir::new();
        d.write("web.yaml", SVC);
        d.write("slice.yaml", SLICE);
        let mut m = d.open();
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
        let mut m = d.open();
        let scan = m.rescan().unwrap().unwrap();
        let svc = &scan.objects.services[&("default".into(), "web".into())];
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        assert_eq!(
            problems(&scan),
            [format!(
                "File {}: Service default/web is already defined in {}; ignored here",
                d.0.join("b.yaml").display(),
                d.0.join("a.yaml").display()
            )]
        );
        // The first file goes: the second one's object takes over.
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        let scan = m.rescan().unwrap().unwrap();
        let svc = &scan.objects.services[&("default".into(), "web".into())];
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.11")
        );
        assert!(scan.problems.is_empty());
    }

    #[test]
    fn slices_without_a_service_are_noted() {
        let d = TempDir::new();
        d.write(
            "slice.yaml",
            &SLICE.replace("  labels:\n    kubernetes.io/service-name: web\n", ""),
        );
        let scan = d.open().rescan().unwrap().unwrap();
        assert_eq!(names(&scan), ["slice default/web-1"]);
        assert!(problems(&scan)[0].contains("has no kubernetes.io/service-name label"));
    }

    #[test]
    fn ignores_other_files_and_subdirectories() {
        let d = TempDir::new();
        d.write("README.md", "not a manifest");
        d.write(".web.yaml.swp", "junk");
        fs::create_dir(d.0.join("sub.yaml")).unwrap();
        fs::create_dir(d.0.join("nested")).unwrap();
        d.write("nested/web.yaml", SVC);
        let scan = d.open().rescan().unwrap().unwrap();
        assert!(names(&scan).is_empty() && scan.problems.is_empty());
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = ManifestDir::open("/nonexistent/lb-manifests").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read manifests directory /nonexistent/lb-manifests: No such file or directory"
        );
        let d = TempDir::new();
        let mut m = d.open();
        fs::remove_dir(&d.0).unwrap();
        assert!(m.rescan().is_err());
    }

    #[tokio::test]
    async fn watch_sends_changes_until_the_receiver_goes() {
        let d = TempDir::new();
        d.write("web.yaml", SVC);
        let mut dir = d.open();
        let first = dir.scan().unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(first);
        let task = tokio::spawn(watch(dir, Duration::from_millis(5), tx));
        d.write("slice.yaml", SLICE);
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a change within 5 s")
            .unwrap();
        assert_eq!(
            names(&rx.borrow_and_update()),
            ["svc default/web", "slice default/web-1"]
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch returns once the receiver is gone")
            .unwrap();
    }
}
