//! An in-process fake Kubernetes API server for tests, served over loopback HTTP.
//!
//! It is stateful rather than scripted (see `KUBE-TESTING.md` §3b): the agent's real
//! kube-rs client, watcher and reflector talk to it in whatever order they like, so the
//! tests exercise relists, resumes and backoff as they happen against a real apiserver.
//!
//! What it models:
//! - one global, monotonic `resourceVersion`, stamped (with `uid`, `creationTimestamp`,
//!   `kind` and `apiVersion`) on every write;
//! - list (with `kind`, `apiVersion` and `metadata.resourceVersion`) and get;
//! - watch: resume from a resourceVersion through the event history, synthetic `ADDED`
//!   events for RV `0`/unset, `sendInitialEvents` with the initial-events-end bookmark,
//!   periodic `BOOKMARK`s when `allowWatchBookmarks`, `timeoutSeconds`, and `ERROR` 410
//!   `Expired` for a resourceVersion below the compaction floor;
//! - `labelSelector` (`=`, `==`, `!=`, exists, `!`exists; comma means AND) and
//!   `fieldSelector` on `metadata.name` / `metadata.namespace`;
//! - legacy discovery (`/api`, `/api/v1`, `/apis`, `/apis/discovery.k8s.io/v1`, with
//!   short names) and `/version`;
//! - writes over HTTP, enough for `kubectl create`, `apply` (client-side and
//!   `--server-side`), `replace`, `patch`, `label` and `delete` (with `--validate=false`:
//!   no OpenAPI is served): POST, PUT (with resourceVersion conflicts), DELETE, and PATCH
//!   as JSON merge patch (RFC 7386), strategic merge patch approximated by a merge patch
//!   whose `$` directives are dropped (lists are replaced whole), and server-side apply
//!   for a single field manager (the applied object replaces the stored one).
//!
//! Tests change objects through [`FakeApiServer::upsert`] and [`FakeApiServer::delete`]
//! (or over HTTP) and inject faults with [`FakeApiServer::fail_next`],
//! [`FakeApiServer::throttle_next`], [`FakeApiServer::stall_watches`],
//! [`FakeApiServer::compact`], [`FakeApiServer::disconnect_watches`] and
//! [`FakeApiServer::set_unavailable`].
use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// How many events the history keeps; older ones raise the compaction floor, as etcd's
/// compaction does.
const HISTORY_LIMIT: usize = 10_000;

/// Interval between `BOOKMARK` events on watches that asked for them. Real apiservers send
/// them about once a minute; tests want to see them quickly.
const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

/// Creation timestamp put on every object. The fake has no use for a real clock here, and
/// a constant keeps responses reproducible.
const CREATION_TIMESTAMP: &str = "2026-01-01T00:00:00Z";

/// A resource type the fake serves.
struct Resource {
    plural: &'static str,
    kind: &'static str,
    group_version: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
}

const RESOURCES: &[Resource] = &[
    Resource {
        plural: "services",
        kind: "Service",
        group_version: "v1",
        namespaced: true,
        short_names: &["svc"],
    },
    Resource {
        plural: "endpoints",
        kind: "Endpoints",
        group_version: "v1",
        namespaced: true,
        short_names: &["ep"],
    },
    Resource {
        plural: "nodes",
        kind: "Node",
        group_version: "v1",
        namespaced: false,
        short_names: &["no"],
    },
    Resource {
        plural: "namespaces",
        kind: "Namespace",
        group_version: "v1",
        namespaced: false,
        short_names: &["ns"],
    },
    Resource {
        plural: "endpointslices",
        kind: "EndpointSlice",
        group_version: "discovery.k8s.io/v1",
        namespaced: true,
        short_names: &[],
    },
];

fn resource_by_kind(kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

fn resource_by_path(group_version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group_version == group_version && r.plural == plural)
}

/// Identity of a stored object: resource plural, namespace (empty when cluster-scoped),
/// name.
type ObjectKey = (&'static str, String, String);

/// One change, as kept in the history and sent to live watches.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    kind: &'static str,
    /// The object after the change (for `DELETED`, its last state with the deletion's RV).
    object: Value,
    /// The object before the change, so that a watch whose selector the object enters or
    /// leaves sees `ADDED`/`DELETED`, as from a real apiserver.
    previous: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Expired.
    compacted_below: u64,
    /// The next this many resource requests fail with 500.
    fail_next: u32,
    /// The next this many resource requests are throttled: 429 with `Retry-After: 1`.
    throttle_next: u32,
    /// Every request fails with 503 (an apiserver that is down or unreachable).
    unavailable: bool,
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped by [`FakeApiServer::disconnect_watches`]; every open watch ends when it
    /// changes.
    disconnects: watch::Sender<u64>,
    /// While `true`, open watches deliver nothing (no events, no bookmarks) and stay
    /// open: a stalled stream, as behind a stuck proxy.
    stalled: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock has failed already; the state is
        // still consistent enough to serve the remaining requests.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `object` as `resource` `namespace`/`name` (creating or replacing it),
    /// stamping the server-owned fields; returns the stored object.
    fn put(
        &self,
        store: &mut Store,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Value {
        store.rv += 1;
        let rv = store.rv;
        let key = (resource.plural, namespace.to_owned(), name.to_owned());
        let previous = store.objects.get(&key).cloned();
        let uid = match &previous {
            Some(p) => p["metadata"]["uid"].clone(),
            None => json!(format!("fake-uid-{rv}")),
        };
        object["apiVersion"] = json!(resource.group_version);
        object["kind"] = json!(resource.kind);
        let meta = &mut object["metadata"];
        meta["name"] = json!(name);
        if resource.namespaced {
            meta["namespace"] = json!(namespace);
        }
        meta["uid"] = uid;
        meta["resourceVersion"] = json!(rv.to_string());
        meta["creationTimestamp"] = json!(CREATION_TIMESTAMP);
        store.objects.insert(key, object.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(
            store,
            Change {
                rv,
                plural: resource.plural,
                kind,
                object: object.clone(),
                previous,
            },
        );
        object
    }

    /// Deletes an object; returns its last state (at the deletion's RV) if it existed.
    fn remove(
        &self,
        store: &mut Store,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let key = (resource.plural, namespace.to_owned(), name.to_owned());
        let previous = store.objects.remove(&key)?;
        store.rv += 1;
        let rv = store.rv;
        // The DELETED event carries the object's last state at the deletion's RV.
        let mut object = previous.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            store,
            Change {
                rv,
                plural: resource.plural,
                kind: "DELETED",
                object: object.clone(),
                previous: Some(previous),
            },
        );
        Some(object)
    }

    fn record(&self, store: &mut Store, change: Change) {
        if store.history.len() == HISTORY_LIMIT
            && let Some(oldest) = store.history.pop_front()
        {
            store.compacted_below = oldest.rv;
        }
        store.history.push_back(change.clone());
        // Sent under the lock, so that a watch that subscribes under the lock sees every
        // change after its snapshot exactly once. No receiver is not an error.
        let _ = self.changes.send(change);
    }
}

/// Error from [`FakeApiServer::upsert`].
#[derive(Debug, thiserror::Error)]
pub enum UpsertError {
    /// The object has no `kind`, `metadata.name`, or a kind the fake does not serve.
    #[error("invalid object: {0}")]
    Invalid(String),
}

/// A running fake API server; it stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and serves in a task on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::serve(listener)
    }

    /// Serves on an already bound listener, in a task on the current tokio runtime. The
    /// end-to-end tests bind it inside the node's network namespace, where the agent runs.
    pub fn from_listener(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Self::serve(tokio::net::TcpListener::from_std(listener)?)
    }

    fn serve(listener: tokio::net::TcpListener) -> std::io::Result<Self> {
        let (changes, _) = broadcast::channel(HISTORY_LIMIT);
        let (disconnects, _) = watch::channel(0);
        let (stalled, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
            disconnects,
            stalled,
        });
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            // Serving only ends with an I/O error on the listener; the test then sees its
            // requests fail, which says more than a panic in a background task.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { shared, addr, task })
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) whose current context points at this server, with no
    /// credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// Creates or replaces an object (JSON with `apiVersion`, `kind` and
    /// `metadata.name`; `metadata.namespace` defaults to `default` for namespaced kinds).
    /// Returns the resourceVersion given to it.
    pub fn upsert(&self, object: Value) -> Result<u64, UpsertError> {
        let kind = object["kind"]
            .as_str()
            .ok_or_else(|| UpsertError::Invalid("no kind".into()))?;
        let resource = resource_by_kind(kind)
            .ok_or_else(|| UpsertError::Invalid(format!("kind {kind} is not served")))?;
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| UpsertError::Invalid("no metadata.name".into()))?
            .to_owned();
        let namespace = if resource.namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let mut store = self.shared.lock();
        self.shared
            .put(&mut store, resource, &namespace, &name, object);
        Ok(store.rv)
    }

    /// Deletes an object by kind (`Service`, `EndpointSlice`, …), namespace (ignored for
    /// cluster-scoped kinds) and name. Returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(resource) = resource_by_kind(kind) else {
            return false;
        };
        let namespace = if resource.namespaced { namespace } else { "" };
        let mut store = self.shared.lock();
        self.shared
            .remove(&mut store, resource, namespace, name)
            .is_some()
    }

    /// Forgets the event history: watches from any resourceVersion older than the current
    /// one get `410 Expired` and must relist.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.compacted_below = store.rv;
        store.history.clear();
    }

    /// Makes the next `n` resource requests (list, get, watch; not discovery) fail with
    /// 500 Internal Server Error.
    pub fn fail_next(&self, n: u32) {
        self.shared.lock().fail_next = n;
    }

    /// Makes the next `n` resource requests fail with 429 Too Many Requests and
    /// `Retry-After: 1`, as an apiserver shedding load (API priority and fairness) does.
    pub fn throttle_next(&self, n: u32) {
        self.shared.lock().throttle_next = n;
    }

    /// Stalls (`true`) or releases (`false`) every watch stream: while stalled, open
    /// streams stay connected but deliver nothing, bookmarks included; changes made
    /// meanwhile arrive once released (or through the resume after a disconnect).
    pub fn stall_watches(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// Ends every open watch stream, as a restarting apiserver or a dropped connection
    /// does. Clients resume from the last resourceVersion they saw.
    pub fn disconnect_watches(&self) {
        self.shared.disconnects.send_modify(|g| *g += 1);
    }

    /// Takes the server down (`true`: open watches end, and every request, discovery
    /// included, fails with 503 until it is back) or brings it back (`false`) with the
    /// same objects and history. Test-side writes keep working meanwhile, as changes
    /// made by other clients of a real, unreachable apiserver would.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
        if unavailable {
            self.disconnect_watches();
        }
    }

    /// The requests served so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a request addresses, parsed from its path.
struct Target {
    resource: &'static Resource,
    /// `None`: all namespaces.
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        // `/api/v1/namespaces/NAME` is the Namespace object itself.
        ["namespaces", name] => (None, "namespaces", Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let resource = resource_by_path(&group_version, plural)?;
    Some(Target {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

/// Query parameters the fake understands; others are ignored.
#[derive(Default)]
struct Params {
    watch: bool,
    resource_version: Option<String>,
    timeout: Option<Duration>,
    bookmarks: bool,
    send_initial_events: bool,
    labels: Vec<LabelTerm>,
    fields: Vec<FieldTerm>,
}

fn parse_params(query: &str) -> Result<Params, String> {
    let mut params = Params::default();
    for (key, value) in form_pairs(query) {
        match key.as_str() {
            "watch" => params.watch = value == "true" || value == "1",
            "resourceVersion" => params.resource_version = Some(value),
            "timeoutSeconds" => {
                let s: u64 = value
                    .parse()
                    .map_err(|_| format!("timeoutSeconds {value:?}"))?;
                params.timeout = Some(Duration::from_secs(s));
            }
            "allowWatchBookmarks" => params.bookmarks = value == "true",
            "sendInitialEvents" => params.send_initial_events = value == "true",
            "labelSelector" => params.labels = parse_label_selector(&value)?,
            "fieldSelector" => params.fields = parse_field_selector(&value)?,
            _ => {}
        }
    }
    Ok(params)
}

/// Splits an `application/x-www-form-urlencoded` query into decoded pairs.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, PartialEq)]
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelTerm>, String> {
    let mut terms = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let parsed = if let Some(key) = term.strip_prefix('!') {
            LabelTerm::NotExists(key.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelTerm::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelTerm::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelTerm::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if term.contains(' ') {
            // Set-based selectors (`in`, `notin`) are not needed by lb yet.
            return Err(format!("unsupported label selector term {term:?}"));
        } else {
            LabelTerm::Exists(term.to_owned())
        };
        terms.push(parsed);
    }
    Ok(terms)
}

#[derive(Debug, PartialEq)]
struct FieldTerm {
    /// `metadata.name` or `metadata.namespace`.
    field: &'static str,
    value: String,
    negated: bool,
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldTerm>, String> {
    let mut terms = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, false)
        } else {
            return Err(format!("field selector term {term:?} has no operator"));
        };
        let field = match field.trim() {
            "metadata.name" => "metadata.name",
            "metadata.namespace" => "metadata.namespace",
            other => return Err(format!("field label not supported: {other}")),
        };
        terms.push(FieldTerm {
            field,
            value: value.trim().to_owned(),
            negated,
        });
    }
    Ok(terms)
}

impl Params {
    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|t| match t {
            LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
            // As in Kubernetes, `k!=v` also selects objects without the label.
            LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
        });
        let fields_match = self.fields.iter().all(|t| {
            let actual = match t.field {
                "metadata.name" => object["metadata"]["name"].as_str(),
                _ => object["metadata"]["namespace"].as_str(),
            };
            (actual.unwrap_or("") == t.value) != t.negated
        });
        labels_match && fields_match
    }
}

fn in_scope(target: &Target, namespace: &str) -> bool {
    target.namespace.as_deref().is_none_or(|ns| ns == namespace)
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(code: StatusCode, reason: &str, message: &str) -> Response {
    json_response(code, &status(code, reason, message))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = query.unwrap_or_default();
    {
        let mut store = shared.lock();
        store.requests.push(format!("{method} {path}?{query}"));
        if store.unavailable {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the apiserver is unavailable (injected)",
            );
        }
    }
    if let Some(body) = discovery(&path) {
        return json_response(StatusCode::OK, &body);
    }
    let Some(target) = parse_target(&path) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    {
        let mut store = shared.lock();
        if store.fail_next > 0 {
            store.fail_next -= 1;
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "injected failure",
            );
        }
        if store.throttle_next > 0 {
            store.throttle_next -= 1;
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "injected throttling, please try again later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
    }
    let params = match parse_params(&query) {
        Ok(p) => p,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &why),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    match (&method, &target.name, params.watch) {
        (&Method::GET, _, true) => watch_response(shared, target, params),
        (&Method::GET, Some(name), false) => get(&shared, &target, name),
        (&Method::GET, None, false) => list(&shared, &target, &params),
        (&Method::POST, None, _) => create(&shared, &target, &body),
        (&Method::PUT, Some(name), _) => replace(&shared, &target, name, &body),
        (&Method::PATCH, Some(name), _) => patch(&shared, &target, name, content_type, &body),
        (&Method::DELETE, Some(name), _) => delete(&shared, &target, name),
        _ => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{method} is not supported on {path}"),
        ),
    }
}

/// The namespace an object of `target` lives in: the path's, else `default`; empty for
/// cluster-scoped resources.
fn namespace_of(target: &Target) -> String {
    if target.resource.namespaced {
        target
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    } else {
        String::new()
    }
}

/// Parses a request body as a JSON object; the error is the reason, for a 400.
fn parse_body(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err("the body is not an object".to_owned()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

fn not_found(target: &Target, name: &str) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", target.resource.plural),
    )
}

/// POST to a collection.
fn create(shared: &Shared, target: &Target, body: &[u8]) -> Response {
    let object = match parse_body(body) {
        Ok(v) => v,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &why),
    };
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "Invalid",
            "metadata.name is required",
        );
    };
    if object["metadata"]["resourceVersion"].is_string() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "resourceVersion should not be set on objects to be created",
        );
    }
    let ns = namespace_of(target);
    let mut store = shared.lock();
    if store
        .objects
        .contains_key(&(target.resource.plural, ns.clone(), name.clone()))
    {
        return error_response(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", target.resource.plural),
        );
    }
    let stored = shared.put(&mut store, target.resource, &ns, &name, object);
    json_response(StatusCode::CREATED, &stored)
}

/// PUT to an object: replaces it; a resourceVersion in the body must be the current one.
fn replace(shared: &Shared, target: &Target, name: &str, body: &[u8]) -> Response {
    let object = match parse_body(body) {
        Ok(v) => v,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &why),
    };
    let ns = namespace_of(target);
    let mut store = shared.lock();
    let Some(current) = store
        .objects
        .get(&(target.resource.plural, ns.clone(), name.to_owned()))
    else {
        return not_found(target, name);
    };
    if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
    {
        return error_response(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified",
                target.resource.plural
            ),
        );
    }
    let stored = shared.put(&mut store, target.resource, &ns, name, object);
    json_response(StatusCode::OK, &stored)
}

/// RFC 7386 JSON merge patch of `target` with `patch`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(fields) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Drops strategic-merge-patch directives (`$patch`, `$setElementOrder/...`,
/// `$retainKeys`, `$deleteFromPrimitiveList/...`), leaving a plain merge patch.
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            fields.retain(|k, _| !k.starts_with('$'));
            fields.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

/// PATCH of an object, by content type.
fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Response {
    let mut patch = match parse_body(body) {
        Ok(v) => v,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &why),
    };
    let ns = namespace_of(target);
    let mut store = shared.lock();
    let current = store
        .objects
        .get(&(target.resource.plural, ns.clone(), name.to_owned()))
        .cloned();
    let media = content_type.split(';').next().unwrap_or("").trim();
    let updated = match (media, current) {
        // Server-side apply with one field manager: the applied configuration is the
        // object. It creates the object if it does not exist.
        ("application/apply-patch+yaml", _) => patch,
        (_, None) => return not_found(target, name),
        ("application/merge-patch+json", Some(mut current)) => {
            merge_patch(&mut current, &patch);
            current
        }
        ("application/strategic-merge-patch+json", Some(mut current)) => {
            strip_directives(&mut patch);
            merge_patch(&mut current, &patch);
            current
        }
        (other, Some(_)) => {
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("the fake apiserver does not support {other} patches"),
            );
        }
    };
    let stored = shared.put(&mut store, target.resource, &ns, name, updated);
    json_response(StatusCode::OK, &stored)
}

/// DELETE of an object: gone at once (no finalizers, no grace period).
fn delete(shared: &Shared, target: &Target, name: &str) -> Response {
    let ns = namespace_of(target);
    let mut store = shared.lock();
    match shared.remove(&mut store, target.resource, &ns, name) {
        Some(object) => json_response(StatusCode::OK, &object),
        None => not_found(target, name),
    }
}

fn get(shared: &Shared, target: &Target, name: &str) -> Response {
    let store = shared.lock();
    let ns = if target.resource.namespaced {
        target.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    match store
        .objects
        .get(&(target.resource.plural, ns, name.to_owned()))
    {
        Some(object) => json_response(StatusCode::OK, object),
        None => error_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", target.resource.plural),
        ),
    }
}

/// The objects of `target` that `params` select, from the current state.
fn select<'a>(store: &'a Store, target: &Target, params: &Params) -> Vec<&'a Value> {
    store
        .objects
        .iter()
        .filter(|((plural, ns, _), object)| {
            *plural == target.resource.plural && in_scope(target, ns) && params.matches(object)
        })
        .map(|(_, object)| object)
        .collect()
}

fn list(shared: &Shared, target: &Target, params: &Params) -> Response {
    let store = shared.lock();
    let items = select(&store, target, params);
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.group_version,
            "metadata": { "resourceVersion": store.rv.to_string() },
            "items": items,
        }),
    )
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(resource: &Resource, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    watch_line(
        "BOOKMARK",
        &json!({ "kind": resource.kind, "apiVersion": resource.group_version, "metadata": metadata }),
    )
}

/// State of one watch stream between the lines it yields.
struct WatchStream {
    target: Target,
    params: Params,
    /// Lines decided when the watch started (synthetic ADDED, history replay, errors).
    queued: VecDeque<Bytes>,
    /// Whether the stream ends once `queued` is drained (after an ERROR).
    finished: bool,
    /// The highest resourceVersion this stream has passed, delivered or filtered out;
    /// bookmarks carry it, so a client resuming from one misses nothing.
    seen_rv: u64,
    changes: broadcast::Receiver<Change>,
    disconnects: watch::Receiver<u64>,
    stalled: watch::Receiver<bool>,
    deadline: Option<tokio::time::Instant>,
    bookmarks: tokio::time::Interval,
}

impl WatchStream {
    /// The line to send for `change`, if this watch selects it.
    fn line_for(&self, change: &Change) -> Option<Bytes> {
        if change.plural != self.target.resource.plural {
            return None;
        }
        let ns = change.object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("");
        if !in_scope(&self.target, ns) {
            return None;
        }
        let now = change.kind != "DELETED" && self.params.matches(&change.object);
        let before = change
            .previous
            .as_ref()
            .is_some_and(|p| self.params.matches(p));
        let kind = match (before, now) {
            (false, false) => return None,
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (true, true) => change.kind,
        };
        Some(watch_line(kind, &change.object))
    }

    /// Waits while the streams are stalled; `false` when the stream is cut meanwhile.
    async fn wait_unstalled(&mut self) -> bool {
        while *self.stalled.borrow_and_update() {
            tokio::select! {
                _ = self.disconnects.changed() => return false,
                r = self.stalled.changed() => if r.is_err() { return false },
            }
        }
        true
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        // A stalled stream says nothing at all, not even the replay queued when it
        // opened (a watch resumed just before the stall would otherwise leak it).
        if !self.wait_unstalled().await {
            return None;
        }
        if let Some(line) = self.queued.pop_front() {
            return Some(line);
        }
        if self.finished {
            return None;
        }
        loop {
            if !self.wait_unstalled().await {
                return None;
            }
            let deadline = async {
                match self.deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.disconnects.changed() => return None,
                r = self.stalled.changed() => if r.is_err() { return None },
                () = deadline => return None,
                change = self.changes.recv() => match change {
                    Ok(change) => {
                        self.seen_rv = self.seen_rv.max(change.rv);
                        if let Some(line) = self.line_for(&change) {
                            return Some(line);
                        }
                    }
                    // A watcher that fell this far behind is cut off; it resumes from the
                    // last RV it saw, as from a real apiserver.
                    Err(_) => return None,
                },
                _ = self.bookmarks.tick(), if self.params.bookmarks => {
                    return Some(bookmark(self.target.resource, self.seen_rv, false));
                }
            }
        }
    }
}

fn watch_response(shared: Arc<Shared>, target: Target, params: Params) -> Response {
    let store = shared.lock();
    // Subscribed under the lock: every change after the snapshot below reaches us.
    let changes = shared.changes.subscribe();
    let mut disconnects = shared.disconnects.subscribe();
    disconnects.mark_unchanged();
    let stalled = shared.stalled.subscribe();
    let mut queued = VecDeque::new();
    let mut finished = false;
    let mut replay_after = None;
    let start: Option<u64> = params
        .resource_version
        .as_deref()
        .filter(|rv| !rv.is_empty())
        .and_then(|rv| rv.parse().ok());
    match start {
        _ if params.send_initial_events => {
            for object in select(&store, &target, &params) {
                queued.push_back(watch_line("ADDED", object));
            }
            queued.push_back(bookmark(target.resource, store.rv, true));
        }
        None | Some(0) => {
            for object in select(&store, &target, &params) {
                queued.push_back(watch_line("ADDED", object));
            }
        }
        Some(rv) if rv < store.compacted_below => {
            let message = format!("too old resource version: {rv} ({})", store.compacted_below);
            queued.push_back(watch_line(
                "ERROR",
                &status(StatusCode::GONE, "Expired", &message),
            ));
            finished = true;
        }
        Some(rv) => replay_after = Some(rv),
    }
    let mut stream = WatchStream {
        target,
        params,
        queued,
        finished,
        seen_rv: store.rv,
        changes,
        disconnects,
        stalled,
        deadline: None,
        bookmarks: tokio::time::interval_at(
            tokio::time::Instant::now() + BOOKMARK_INTERVAL,
            BOOKMARK_INTERVAL,
        ),
    };
    // Resuming: the history after the client's RV, then live changes.
    if let Some(rv) = replay_after {
        let replay: Vec<Bytes> = store
            .history
            .iter()
            .filter(|c| c.rv > rv)
            .filter_map(|c| stream.line_for(c))
            .collect();
        stream.queued.extend(replay);
    }
    drop(store);
    stream.deadline = stream
        .params
        .timeout
        .map(|t| tokio::time::Instant::now() + t);
    let body = futures::stream::unfold(stream, |mut s| async move {
        let line = s.next_line().await?;
        Some((Ok::<_, Infallible>(line), s))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Legacy discovery documents and `/version`, enough for kube-rs (and most of kubectl).
fn discovery(path: &str) -> Option<Value> {
    let resource_list = |group_version: &str| {
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group_version == group_version)
            .map(|r| {
                json!({
                    "name": r.plural,
                    "singularName": r.kind.to_lowercase(),
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    "shortNames": r.short_names,
                })
            })
            .collect();
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources })
    };
    Some(match path.trim_end_matches('/') {
        "/version" => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": CREATION_TIMESTAMP,
            "goVersion": "", "compiler": "", "platform": "linux/amd64",
        }),
        "/api" => {
            json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] })
        }
        "/api/v1" => resource_list("v1"),
        "/apis" => json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{
                "name": "discovery.k8s.io",
                "versions": [{ "groupVersion": "discovery.k8s.io/v1", "version": "v1" }],
                "preferredVersion": { "groupVersion": "discovery.k8s.io/v1", "version": "v1" },
            }],
        }),
        "/apis/discovery.k8s.io/v1" => resource_list("discovery.k8s.io/v1"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Sends one GET over a fresh connection and returns the raw response (headers and
    /// body) once the server closes it.
    async fn get_raw(fake: &FakeApiServer, path_and_query: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(fake.addr).await.unwrap();
        let request =
            format!("GET {path_and_query} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut response))
            .await
            .expect("response not finished")
            .unwrap();
        response
    }

    fn service(name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "labels": labels },
        })
    }

    #[test]
    fn label_selectors() {
        let params = Params {
            labels: parse_label_selector("a=1,b==2,c!=3,d,!e").unwrap(),
            ..Params::default()
        };
        let obj = |labels: Value| json!({ "metadata": { "labels": labels } });
        assert!(params.matches(&obj(json!({"a": "1", "b": "2", "d": ""}))));
        assert!(params.matches(&obj(json!({"a": "1", "b": "2", "c": "4", "d": "x"}))));
        assert!(!params.matches(&obj(json!({"a": "1", "b": "2", "c": "3", "d": ""}))));
        assert!(!params.matches(&obj(json!({"a": "1", "b": "2", "d": "", "e": ""}))));
        assert!(!params.matches(&obj(json!({"a": "1", "b": "2"}))));
        assert!(parse_label_selector("a in (x)").is_err());
    }

    #[test]
    fn field_selectors_and_query_decoding() {
        let pairs = form_pairs("fieldSelector=metadata.name%3Dnode-1&labelSelector=%21x");
        assert_eq!(
            pairs[0],
            ("fieldSelector".into(), "metadata.name=node-1".into())
        );
        assert_eq!(pairs[1], ("labelSelector".into(), "!x".into()));
        let params = parse_params("fieldSelector=metadata.name%3Dnode-1").unwrap();
        assert!(params.matches(&json!({ "metadata": { "name": "node-1" } })));
        assert!(!params.matches(&json!({ "metadata": { "name": "node-2" } })));
        assert!(parse_field_selector("spec.nodeName=x").is_err());
    }

    #[test]
    fn paths() {
        let t = parse_target("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/b").unwrap();
        assert_eq!(
            (t.resource.kind, t.namespace.as_deref(), t.name.as_deref()),
            ("EndpointSlice", Some("a"), Some("b"))
        );
        let t = parse_target("/api/v1/namespaces/kube-system").unwrap();
        assert_eq!(
            (t.resource.kind, t.name.as_deref()),
            ("Namespace", Some("kube-system"))
        );
        let t = parse_target("/api/v1/services").unwrap();
        assert_eq!((t.resource.kind, t.namespace), ("Service", None));
        assert!(parse_target("/api/v1/pods").is_none());
    }

    #[tokio::test]
    async fn writes_stamp_resource_versions() {
        let fake = FakeApiServer::start().await.unwrap();
        assert_eq!(fake.upsert(service("a", json!({}))).unwrap(), 1);
        assert_eq!(fake.upsert(service("a", json!({"x": "1"}))).unwrap(), 2);
        assert!(fake.delete("Service", "default", "a"));
        assert!(!fake.delete("Service", "default", "a"));
        assert_eq!(fake.resource_version(), 3);
        assert!(
            fake.upsert(json!({"kind": "Pod", "metadata": {"name": "p"}}))
                .is_err()
        );
    }

    #[tokio::test]
    async fn list_watch_bookmarks_and_timeout() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.upsert(service("a", json!({"team": "x"}))).unwrap();
        fake.upsert(service("b", json!({}))).unwrap();
        let list = get_raw(
            &fake,
            "/api/v1/namespaces/default/services?labelSelector=team%3Dx",
        )
        .await;
        assert!(list.contains(r#""kind":"ServiceList""#), "{list}");
        assert!(list.contains(r#""resourceVersion":"2""#), "{list}");
        assert!(
            list.contains(r#""name":"a""#) && !list.contains(r#""name":"b""#),
            "{list}"
        );

        // Resume from RV 1: `b` (rv 2) is replayed, then bookmarks until the timeout.
        let watch = get_raw(
            &fake,
            "/api/v1/services?watch=true&resourceVersion=1&allowWatchBookmarks=true&timeoutSeconds=1",
        )
        .await;
        assert!(
            watch.contains(r#""type":"ADDED""#) && watch.contains(r#""name":"b""#),
            "{watch}"
        );
        assert!(!watch.contains(r#""name":"a""#), "{watch}");
        assert!(watch.contains(r#""type":"BOOKMARK""#), "{watch}");
    }

    #[tokio::test]
    async fn compaction_expires_old_resource_versions() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.upsert(service("a", json!({}))).unwrap();
        fake.upsert(service("b", json!({}))).unwrap();
        fake.compact();
        let watch = get_raw(&fake, "/api/v1/services?watch=true&resourceVersion=1").await;
        assert!(
            watch.contains(r#""type":"ERROR""#) && watch.contains(r#""code":410"#),
            "{watch}"
        );

        fake.fail_next(1);
        let failed = get_raw(&fake, "/api/v1/services").await;
        assert!(failed.starts_with("HTTP/1.1 500"), "{failed}");
        let ok = get_raw(&fake, "/api/v1/services").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }

    /// `kubectl` (when on PATH) creates, applies, patches, lists and deletes through the
    /// fake. No OpenAPI is served, hence `--validate=false`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kubectl_writes() {
        let Ok(found) = std::process::Command::new("kubectl")
            .args(["version", "--client"])
            .output()
        else {
            eprintln!("kubectl is not on PATH; skipped");
            return;
        };
        assert!(found.status.success());
        let fake = FakeApiServer::start().await.unwrap();
        let dir =
            std::env::temp_dir().join(format!("fake-apiserver-kubectl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, fake.kubeconfig()).unwrap();
        let manifest = dir.join("svc.json");
        let run = move |args: Vec<String>| {
            let kubeconfig = kubeconfig.clone();
            let cache = kubeconfig.with_file_name("cache");
            async move {
                tokio::task::spawn_blocking(move || {
                    let out = std::process::Command::new("kubectl")
                        .arg("--kubeconfig")
                        .arg(&kubeconfig)
                        .arg("--cache-dir")
                        .arg(&cache)
                        .args(&args)
                        .output()
                        .unwrap();
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert!(out.status.success(), "kubectl {args:?}: {text}");
                    text
                })
                .await
                .unwrap()
            }
        };
        let file = manifest.display().to_string();
        let write = |port: u16, label: &str| {
            let svc = json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "web", "labels": { "team": label } },
                "spec": { "ports": [{ "port": port, "protocol": "TCP" }] },
            });
            std::fs::write(&manifest, svc.to_string()).unwrap();
        };
        write(80, "a");
        let out = run(vec![
            "apply".into(),
            "--validate=false".into(),
            "-f".into(),
            file.clone(),
        ])
        .await;
        assert!(out.contains("created"), "{out}");
        write(81, "b");
        let out = run(vec![
            "apply".into(),
            "--validate=false".into(),
            "-f".into(),
            file.clone(),
        ])
        .await;
        assert!(out.contains("configured"), "{out}");
        write(82, "c");
        let out = run(vec![
            "apply".into(),
            "--server-side".into(),
            "--validate=false".into(),
            "-f".into(),
            file.clone(),
        ])
        .await;
        assert!(out.contains("serverside-applied"), "{out}");
        let out = run(vec![
            "get".into(),
            "svc".into(),
            "-l".into(),
            "team=c".into(),
            "-o".into(),
            "name".into(),
        ])
        .await;
        assert_eq!(out.trim(), "service/web");
        let out = run(vec![
            "get".into(),
            "svc".into(),
            "web".into(),
            "-o".into(),
            "jsonpath={.spec.ports[0].port}".into(),
        ])
        .await;
        assert_eq!(out.trim(), "82");
        run(vec![
            "label".into(),
            "svc".into(),
            "web".into(),
            "team=d".into(),
            "--overwrite".into(),
        ])
        .await;
        let out = run(vec!["delete".into(), "-f".into(), file.clone()]).await;
        assert!(out.contains("deleted"), "{out}");
        assert!(fake.shared.lock().objects.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
