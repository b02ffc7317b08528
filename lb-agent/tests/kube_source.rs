//! The Kubernetes API source against the in-repo fake apiserver over loopback HTTP: the
//! real kube-rs client, watcher and reflectors run; only the apiserver is fake. No root.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_apiserver::FakeApiServer;
use lb_agent::{
    kube_source,
    model::{self, Objects},
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Generous: a relist after a failure waits out the watcher's backoff (0.8 s, doubling).
const TIMEOUT: Duration = Duration::from_secs(20);

fn service(name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{ "name": "http", "port": port, "protocol": "TCP", "targetPort": 8080 }],
        },
    })
}

fn slice(name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({ "addresses": [a], "conditions": { "ready": true } }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
    })
}

fn with_label(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["labels"][key] = json!(value);
    object
}

/// The fake, the source task feeding `rx`, and every snapshot the source sent (as far as
/// a watch channel shows them).
struct Harness {
    fake: FakeApiServer,
    rx: watch::Receiver<Option<Objects>>,
    seen: Arc<Mutex<Vec<Objects>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Harness {
    /// Starts the source against `fake` (seeded and primed by the caller as needed).
    async fn start(fake: FakeApiServer) -> Self {
        let config = kube::Config::new(fake.url().parse().expect("fake URL"));
        let client = kube::Client::try_from(config).expect("client");
        Self::with_client(fake, client)
    }

    fn with_client(fake: FakeApiServer, client: kube::Client) -> Self {
        let (tx, rx) = watch::channel(None);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut collector = rx.clone();
        let log = seen.clone();
        let tasks = vec![
            tokio::spawn(kube_source::run(client, tx)),
            tokio::spawn(async move {
                while collector.changed().await.is_ok() {
                    if let Some(objects) = collector.borrow_and_update().clone() {
                        log.lock().unwrap().push(objects);
                    }
                }
            }),
        ];
        Self {
            fake,
            rx,
            seen,
            tasks,
        }
    }

    /// Waits until a snapshot satisfies `pred`, and returns it.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Objects) -> bool) -> Objects {
        let found =
            tokio::time::timeout(TIMEOUT, self.rx.wait_for(|o| o.as_ref().is_some_and(&pred)))
                .await;
        let found = found.map(|r| r.map(|objects| objects.clone().unwrap_or_default()));
        match found {
            Ok(Ok(objects)) => objects,
            Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; last snapshot: {:?}\nrequests: {:#?}",
                self.rx.borrow().as_ref().map(names),
                self.fake.requests()
            ),
        }
    }

    /// The snapshots the collector has recorded, once it has recorded at least one.
    async fn seen(&self) -> Vec<Objects> {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let seen = self.seen.lock().unwrap().clone();
                if !seen.is_empty() {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the collector recorded nothing")
    }

    /// Number of (non-watch) lists of `plural` the fake served.
    fn lists_of(&self, plural: &str) -> usize {
        self.fake
            .requests()
            .iter()
            .filter(|r| {
                r.starts_with(&format!("GET /api/v1/{plural}?")) && !r.contains("watch=true")
            })
            .count()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Service and slice names in a snapshot, for assertions and messages.
fn names(o: &Objects) -> (Vec<String>, Vec<String>) {
    (
        o.services.keys().map(|(_, n)| n.clone()).collect(),
        o.endpoint_slices.keys().map(|(_, n)| n.clone()).collect(),
    )
}

fn has(o: &Objects, services: &[&str], slices: &[&str]) -> bool {
    let (s, e) = names(o);
    s == services && e == slices
}

/// Backend addresses the model computes for the frontend on `port`.
fn backends(o: &Objects, port: u16) -> Vec<String> {
    let desired = model::desired_state(o, &model::NodeContext::default());
    desired
        .services
        .iter()
        .filter(|(f, _)| f.port == port)
        .flat_map(|(_, s)| s.active.iter().map(|b| format!("{}:{}", b.addr, b.port)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_snapshot_waits_for_both_lists() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    fake.upsert(slice("web-a", "web", &["10.0.0.1"])).unwrap();
    // One of the two initial lists fails and is retried after backoff; nothing may be
    // sent until it succeeds.
    fake.fail_next(1);
    let mut h = Harness::start(fake).await;
    let o = h
        .wait_for("the first snapshot", |o| has(o, &["web"], &["web-a"]))
        .await;
    assert_eq!(backends(&o, 80), ["10.0.0.1:8080"]);
    let seen = h.seen().await;
    assert!(
        has(&seen[0], &["web"], &["web-a"]),
        "a snapshot was sent before both lists were done: {:?}",
        seen.iter().map(names).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_file_connects() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    let path = std::env::temp_dir().join(format!("lb-kubeconfig-{}", std::process::id()));
    std::fs::write(&path, fake.kubeconfig()).unwrap();
    let client = kube_source::client(Some(&path))
        .await
        .expect("client from kubeconfig");
    std::fs::remove_file(&path).unwrap();
    let mut h = Harness::with_client(fake, client);
    h.wait_for("web", |o| has(o, &["web"], &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_modify_delete_propagate() {
    let fake = FakeApiServer::start().await.unwrap();
    let mut h = Harness::start(fake).await;
    h.wait_for("the empty initial state", |o| has(o, &[], &[]))
        .await;

    h.fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    h.fake.upsert(slice("web-a", "web", &["10.0.0.1"])).unwrap();
    let o = h
        .wait_for("web added", |o| has(o, &["web"], &["web-a"]))
        .await;
    assert_eq!(backends(&o, 80), ["10.0.0.1:8080"]);

    h.fake.upsert(service("web", "10.96.0.10", 81)).unwrap();
    h.fake.upsert(slice("web-a", "web", &["10.0.0.2"])).unwrap();
    h.wait_for("web modified", |o| backends(o, 81) == ["10.0.0.2:8080"])
        .await;

    assert!(h.fake.delete("EndpointSlice", "default", "web-a"));
    h.wait_for("web-a deleted", |o| has(o, &["web"], &[])).await;
    assert!(h.fake.delete("Service", "default", "web"));
    h.wait_for("web deleted", |o| has(o, &[], &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_of_one_service_are_merged() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    fake.upsert(slice("web-a", "web", &["10.0.0.1"])).unwrap();
    let mut h = Harness::start(fake).await;
    h.wait_for("web-a", |o| backends(o, 80) == ["10.0.0.1:8080"])
        .await;
    h.fake
        .upsert(slice("web-b", "web", &["10.0.0.2", "10.0.0.3"]))
        .unwrap();
    let o = h
        .wait_for("web-b merged", |o| backends(o, 80).len() == 3)
        .await;
    let mut all = backends(&o, 80);
    all.sort();
    assert_eq!(all, ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_proxies_and_headless_slices_are_filtered() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    fake.upsert(with_label(
        service("other", "10.96.0.11", 80),
        model::LABEL_SERVICE_PROXY_NAME,
        "someone-else",
    ))
    .unwrap();
    fake.upsert(slice("web-a", "web", &["10.0.0.1"])).unwrap();
    fake.upsert(with_label(
        slice("other-a", "other", &["10.0.0.9"]),
        model::LABEL_SERVICE_PROXY_NAME,
        "someone-else",
    ))
    .unwrap();
    fake.upsert(with_label(
        slice("db-a", "db", &["10.0.0.5"]),
        model::LABEL_HEADLESS,
        "",
    ))
    .unwrap();
    let mut h = Harness::start(fake).await;
    h.wait_for("only web", |o| has(o, &["web"], &["web-a"]))
        .await;

    // A label change that takes an object out of the selection removes it, and one that
    // brings it in adds it.
    h.fake
        .upsert(with_label(
            service("web", "10.96.0.10", 80),
            model::LABEL_SERVICE_PROXY_NAME,
            "someone-else",
        ))
        .unwrap();
    h.wait_for("web handed to another proxy", |o| has(o, &[], &["web-a"]))
        .await;
    h.fake.upsert(service("other", "10.96.0.11", 80)).unwrap();
    h.wait_for("other taken over", |o| has(o, &["other"], &["web-a"]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_compaction_drops_objects_deleted_meanwhile() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    fake.upsert(service("old", "10.96.0.11", 80)).unwrap();
    fake.upsert(slice("web-a", "web", &["10.0.0.1"])).unwrap();
    fake.upsert(slice("old-a", "old", &["10.0.0.2"])).unwrap();
    let mut h = Harness::start(fake).await;
    h.wait_for("initial state", |o| {
        has(o, &["old", "web"], &["old-a", "web-a"])
    })
    .await;
    let lists_before = h.lists_of("services");

    // Cut the watches and keep them out while objects change and history is compacted:
    // the deletes are never seen as events, only through the relist that 410 forces.
    h.fake.fail_next(u32::MAX);
    h.fake.disconnect_watches();
    assert!(h.fake.delete("Service", "default", "old"));
    assert!(h.fake.delete("EndpointSlice", "default", "old-a"));
    h.fake.upsert(service("new", "10.96.0.12", 80)).unwrap();
    h.fake.compact();
    h.fake.fail_next(0);

    h.wait_for("the relisted state", |o| {
        has(o, &["new", "web"], &["web-a"])
    })
    .await;
    assert!(
        h.lists_of("services") > lists_before,
        "no relist: {:#?}",
        h.fake.requests()
    );
}

/// Failing requests (`fail`: the next `n` answered with an error) on the initial lists and
/// on the re-watch after a dropped stream: the state is kept, and the change made meanwhile
/// arrives once the server answers again.
async fn requests_are_retried(what: &str, fail: impl Fn(&FakeApiServer, u32)) {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    fail(&fake, 3);
    let mut h = Harness::start(fake).await;
    h.wait_for(&format!("web despite {what}"), |o| has(o, &["web"], &[]))
        .await;
    fail(&h.fake, 3);
    h.fake.disconnect_watches();
    h.fake.upsert(slice("web-a", "web", &["10.0.0.1"])).unwrap();
    let o = h
        .wait_for(&format!("web-a after {what}"), |o| {
            has(o, &["web"], &["web-a"])
        })
        .await;
    assert_eq!(backends(&o, 80), ["10.0.0.1:8080"]);
    assert!(
        h.seen
            .lock()
            .unwrap()
            .iter()
            .all(|o| !o.services.is_empty()),
        "a snapshot lost web during {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried() {
    requests_are_retried("server errors (500)", |f, n| f.fail_next(n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_requests_are_retried() {
    // 429 with Retry-After.
    requests_are_retried("throttling (429)", |f, n| f.throttle_next(n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_resumes_without_relisting() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    let mut h = Harness::start(fake).await;
    h.wait_for("web", |o| has(o, &["web"], &[])).await;
    let lists_before = h.lists_of("services");

    h.fake.disconnect_watches();
    h.fake.upsert(service("api", "10.96.0.20", 80)).unwrap();
    h.wait_for("api after the reconnect", |o| has(o, &["api", "web"], &[]))
        .await;
    assert_eq!(
        h.lists_of("services"),
        lists_before,
        "the watcher relisted instead of resuming: {:#?}",
        h.fake.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_keeps_the_state_and_catches_up() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.upsert(service("web", "10.96.0.10", 80)).unwrap();
    let mut h = Harness::start(fake).await;
    h.wait_for("web", |o| has(o, &["web"], &[])).await;

    // The streams stay open and say nothing: what the agent has stays as it is.
    h.fake.stall_watches(true);
    h.fake.upsert(service("api", "10.96.0.20", 80)).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        h.seen.lock().unwrap().iter().all(|o| has(o, &["web"], &[])),
        "a change arrived through a stalled stream"
    );

    // The connection drops while stalled (as a stuck proxy finally gives up): the
    // watcher resumes and the change made meanwhile arrives.
    h.fake.disconnect_watches();
    h.fake.stall_watches(false);
    h.wait_for("api after the stall", |o| has(o, &["api", "web"], &[]))
        .await;
}
