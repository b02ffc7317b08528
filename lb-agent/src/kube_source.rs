//! The Kubernetes API source: watches over Services and EndpointSlices, turned into
//! [`Update`]s for the same desired-state -> apply path the manifests source feeds; and a
//! reflector over this node's own Node object ([`watch_node`]), for the node's addresses
//! and labels and for whether it is being drained ([`NodeState`]).
//!
//! Each list and relist is sent whole, and each later watch event as the one object it
//! carries ([`Update`]); the sync loop's [`Tracker`] holds the objects and knows what
//! changed, so one change costs work for one object, not a pass over the cluster. Nothing
//! is programmed until both initial lists are complete, so a half-listed cluster never
//! empties the maps, and a relist replaces every object of its kind, so objects deleted
//! while a watch was down go away. Each object is turned into the form the agent keeps
//! ([`CompactService`], [`CompactSlice`]) as it arrives, so nothing else of it is held.
use std::{collections::BTreeMap, path::Path, sync::Arc};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, instrument, warn};

use crate::{
    model::{Key, Objects},
    services::CompactService,
    slices::CompactSlice,
    state::{Tracker, Update},
    telemetry::Telemetry,
};

/// kube-proxy's Service selector: Services handled by another proxy are not ours.
/// (Headless Services are skipped by the model.)
pub const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";

/// kube-proxy's EndpointSlice selector: no other proxy's slices and no headless slices.
pub const ENDPOINT_SLICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Errors setting up the Kubernetes client. The messages add context only; the cause is
/// the `source` (printed by `{:#}`), so it is not repeated.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig file could not be read or parsed.
    #[error("cannot use kubeconfig {path}")]
    Kubeconfig {
        /// The file given with `--kubeconfig`.
        path: String,
        /// Why it failed.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither in-cluster configuration nor a default kubeconfig was found.
    #[error("no Kubernetes configuration (in-cluster or kubeconfig)")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client")]
    Client(#[from] kube::Error),
}

impl KubeSourceError {
    /// A short, stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kubeconfig { .. } => "kubeconfig",
            Self::Infer(_) => "infer_config",
            Self::Client(_) => "client",
        }
    }
}

/// Builds a client from `kubeconfig`, or else from the in-cluster configuration or the
/// default kubeconfig (`KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Which of the two watches an item came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
}

impl Kind {
    /// The resource's plural, as metric label.
    fn label(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
        }
    }
}

/// One item from either watch, reduced to what the sync loop needs.
enum Signal {
    /// A change for the sync loop: a complete (re)list or one object.
    Update(Kind, Update),
    /// A relist is in progress (nothing changes until it completes).
    Relisting(Kind),
    /// The watch failed; the watcher retries with backoff.
    Error(Kind, watcher::Error),
}

/// Watches `K` with `selector`, as a stream of [`Signal`]s: each object is turned into the
/// form the agent keeps (`ingest`) as it arrives, every object of a (re)list is gathered
/// and handed over whole when the list completes (`whole`), and each later event as one
/// object (`one`). The objects are only held here while a list is in progress; after that
/// the sync loop's [`Objects`] holds the one copy there is.
fn watch_kind<K, V>(
    client: &Client,
    selector: &str,
    kind: Kind,
    ingest: fn(K) -> V,
    whole: fn(BTreeMap<Key, Arc<V>>) -> Update,
    one: fn(Key, Option<Arc<V>>) -> Update,
) -> BoxStream<'static, Signal>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    V: Send + Sync + 'static,
{
    let config = watcher::Config::default().labels(selector);
    let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
    let mut listing: BTreeMap<Key, Arc<V>> = BTreeMap::new();
    watcher(Api::<K>::all(client.clone()), config)
        .default_backoff()
        .map(move |item| match item {
            Ok(watcher::Event::Init) => {
                listing.clear();
                Signal::Relisting(kind)
            }
            Ok(watcher::Event::InitApply(o)) => {
                listing.insert(key(&o), Arc::new(ingest(o)));
                Signal::Relisting(kind)
            }
            Ok(watcher::Event::InitDone) => {
                Signal::Update(kind, whole(std::mem::take(&mut listing)))
            }
            Ok(watcher::Event::Apply(o)) => {
                Signal::Update(kind, one(key(&o), Some(Arc::new(ingest(o)))))
            }
            Ok(watcher::Event::Delete(o)) => Signal::Update(kind, one(key(&o), None)),
            Err(e) => Signal::Error(kind, e),
        })
        .boxed()
}

/// Per-watch bookkeeping of the loop.
#[derive(Default)]
struct Progress {
    /// In a failure streak, already logged.
    failing: bool,
}

/// Watches Services and EndpointSlices and sends an [`Update`] to `tx` for each completed
/// (re)list and each changed object, noting in `telemetry` when an update is queued for
/// the sync loop and when a watch fails and restarts. Returns when the receiver is gone.
///
/// Level-triggered: a relist (after 410 Gone or a failure) is sent whole, so objects
/// deleted while the watch was down disappear then. Nothing is flushed on a failure: the
/// watchers retry with backoff and the sync loop keeps the last state, and each failure
/// streak is logged once. The receiver waits for both first lists ([`Tracker::complete`])
/// before it programs anything, and takes every update that is waiting into one sync.
#[instrument(skip_all)]
pub async fn run_observed(
    client: Client,
    tx: mpsc::UnboundedSender<Update>,
    telemetry: Arc<Telemetry>,
) {
    let services = watch_kind::<Service, _>(
        &client,
        SERVICE_SELECTOR,
        Kind::Services,
        CompactService::from,
        Update::Services,
        Update::Service,
    );
    let slices = watch_kind::<EndpointSlice, _>(
        &client,
        ENDPOINT_SLICE_SELECTOR,
        Kind::EndpointSlices,
        CompactSlice::from,
        Update::EndpointSlices,
        Update::EndpointSlice,
    );
    let mut signals = futures::stream::select(services, slices);
    let mut service_progress = Progress::default();
    let mut slice_progress = Progress::default();
    loop {
        let signal = tokio::select! {
            s = signals.next() => s,
            () = tx.closed() => return,
        };
        // Both watcher streams are endless (errors are items); this is unreachable in
        // practice, but returning is the honest answer if it ever happens.
        let Some(signal) = signal else { return };
        let kind = match &signal {
            Signal::Update(kind, _) | Signal::Relisting(kind) | Signal::Error(kind, _) => *kind,
        };
        let progress = match kind {
            Kind::Services => &mut service_progress,
            Kind::EndpointSlices => &mut slice_progress,
        };
        match signal {
            Signal::Error(kind, e) => {
                if !progress.failing {
                    warn!(resource = ?kind, error = %e, "watch failed; retrying with backoff, keeping the last state");
                } else {
                    debug!(resource = ?kind, error = %e, "watch still failing");
                }
                progress.failing = true;
                telemetry.watch_restarted(kind.label());
            }
            Signal::Relisting(_) => {}
            Signal::Update(kind, update) => {
                if progress.failing {
                    info!(resource = ?kind, "watch recovered");
                    progress.failing = false;
                }
                telemetry.queued();
                if tx.send(update).is_err() {
                    return;
                }
            }
        }
    }
}

/// Most updates taken into one batch: under a constant stream of events the receiver
/// still syncs (and yields to the runtime) regularly.
pub const MAX_BATCH: usize = 4096;

/// Waits for the next update and takes every other one that is already waiting (up to
/// [`MAX_BATCH`]), so that a burst becomes one sync while a lone change is synced at once.
/// `None` once the sender is gone.
pub async fn next_batch(rx: &mut mpsc::UnboundedReceiver<Update>) -> Option<Vec<Update>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(u) => batch.push(u),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// [`run_observed`] as whole snapshots: sends the [`Objects`] to `tx` once both first
/// lists are complete and after every batch of changes from then on. Returns when every
/// receiver of `tx` is gone.
pub async fn run(client: Client, tx: watch::Sender<Option<Objects>>) {
    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let source = run_observed(client, updates_tx, Arc::new(Telemetry::default()));
    let follow = async {
        let mut tracker = Tracker::default();
        let mut sent = false;
        loop {
            let batch = tokio::select! {
                b = next_batch(&mut updates) => b,
                () = tx.closed() => return,
            };
            let Some(batch) = batch else { return };
            for u in batch {
                tracker.apply(u);
            }
            let (changed, _) = tracker.take_changes();
            if tracker.complete() && (!sent || !changed.is_empty()) {
                sent = true;
                if tx.send(Some(tracker.objects().clone())).is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = source => {}
        () = follow => {}
    }
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// This node as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodeState {
    /// Not listed yet, or no API at all (manifests mode).
    #[default]
    Unknown,
    /// The Node object.
    Present(NodeInfo),
    /// The Node object was seen, and is gone now.
    Deleted,
}

impl NodeState {
    /// Whether the node may take traffic from external load balancers (kube-proxy's
    /// `nodeEligible`): true until the API says otherwise, false while the node is being
    /// deleted or is tainted for deletion by the cluster autoscaler, and once it is gone.
    pub fn eligible(&self) -> bool {
        match self {
            Self::Unknown => true,
            Self::Present(node) => !node.deleting && !node.to_be_deleted,
            Self::Deleted => false,
        }
    }
}

/// What the agent uses of its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `status.addresses` as (type, address): `InternalIP`, `ExternalIP`, `Hostname`...
    pub addresses: Vec<(String, String)>,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// Tainted [`TO_BE_DELETED_TAINT`].
    pub to_be_deleted: bool,
}

impl From<&Node> for NodeInfo {
    fn from(node: &Node) -> Self {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|list| {
                list.iter()
                    .map(|a| (a.type_.clone(), a.address.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let to_be_deleted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        Self {
            name: node.name_any(),
            addresses,
            labels: node.labels().clone(),
            deleting: node.metadata.deletion_timestamp.is_some(),
            to_be_deleted,
        }
    }
}

/// Watches the Node named `name` (a `metadata.name` field selector, as kube-proxy does)
/// and publishes its state to `tx` whenever it changes. Failures are retried with
/// backoff, counted in `telemetry` and logged once per streak; the last state stays
/// published meanwhile. Returns when every receiver of `tx` is gone.
#[instrument(skip_all, fields(node = %name))]
pub async fn watch_node(
    client: Client,
    name: String,
    tx: watch::Sender<NodeState>,
    telemetry: Arc<Telemetry>,
) {
    let (store, writer) = reflector::store::<Node>();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(Api::<Node>::all(client), config)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .boxed();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = tx.closed() => return,
        };
        let Some(event) = event else { return };
        match event {
            Err(e) => {
                if !failing {
                    warn!(error = %e, "node watch failed; retrying with backoff, keeping the last state");
                }
                failing = true;
                telemetry.watch_restarted("nodes");
                continue;
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
            }
        }
        if failing {
            info!("node watch recovered");
            failing = false;
        }
        let node = store.state().into_iter().find(|n| n.name_any() == name);
        tx.send_if_modified(|current| {
            let next = match (&node, &*current) {
                (Some(n), _) => NodeState::Present(NodeInfo::from(n.as_ref())),
                (None, NodeState::Unknown) => NodeState::Unknown,
                (None, _) => NodeState::Deleted,
            };
            if next == *current {
                return false;
            }
            if next.eligible() != current.eligible() {
                info!(
                    eligible = next.eligible(),
                    state = ?next,
                    "node eligibility changed; /healthz reports it"
                );
            } else {
                debug!(state = ?next, "node updated");
            }
            *current = next;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_eligibility() {
        let node = |deleting: bool, taint: Option<&str>| {
            let mut n: Node = serde_json::from_value(serde_json::json!({
                "metadata": { "name": "n1", "labels": { "zone": "a" } },
                "status": { "addresses": [{ "type": "InternalIP", "address": "10.0.0.1" }] },
            }))
            .unwrap();
            if deleting {
                n.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ));
            }
            if let Some(key) = taint {
                n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
                    taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                        key: key.to_owned(),
                        effect: "NoSchedule".to_owned(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                });
            }
            NodeState::Present(NodeInfo::from(&n))
        };
        assert!(NodeState::Unknown.eligible());
        assert!(!NodeState::Deleted.eligible());
        let healthy = node(false, Some("other"));
        assert!(healthy.eligible());
        let NodeState::Present(info) = &healthy else {
            unreachable!()
        };
        assert_eq!(info.addresses, [("InternalIP".into(), "10.0.0.1".into())]);
        assert_eq!(info.labels.get("zone").map(String::as_str), Some("a"));
        assert!(!node(true, None).eligible());
        assert!(!node(false, Some(TO_BE_DELETED_TAINT)).eligible());
    }

    /// The node reflector against the fake apiserver: only the named Node is watched, and
    /// its taint, deletion and disappearance show in the published state.
    #[tokio::test]
    async fn node_watch_follows_the_named_node() {
        let fake = fake_apiserver::FakeApiServer::start().await.unwrap();
        let client = Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap();
        let node = |name: &str, taint: Option<&str>| {
            let taints: Vec<serde_json::Value> = taint
                .map(|k| serde_json::json!({ "key": k, "effect": "NoSchedule" }))
                .into_iter()
                .collect();
            serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": { "name": name },
                "spec": { "taints": taints },
            })
        };
        fake.upsert(node("other", Some(TO_BE_DELETED_TAINT)))
            .unwrap();
        let (tx, rx) = watch::channel(NodeState::Unknown);
        let task = tokio::spawn(watch_node(
            client,
            "me".into(),
            tx,
            Arc::new(Telemetry::default()),
        ));
        let wait =
            |rx: &watch::Receiver<NodeState>, what: &'static str, pred: fn(&NodeState) -> bool| {
                let mut rx = rx.clone();
                async move {
                    tokio::time::timeout(std::time::Duration::from_secs(10), rx.wait_for(pred))
                        .await
                        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                        .map(|s| s.clone())
                        .unwrap()
                }
            };
        fake.upsert(node("me", None)).unwrap();
        let state = wait(&rx, "the node", |s| matches!(s, NodeState::Present(_))).await;
        assert!(state.eligible());
        fake.upsert(node("me", Some(TO_BE_DELETED_TAINT))).unwrap();
        wait(&rx, "the taint", |s| !s.eligible()).await;
        fake.upsert(node("me", None)).unwrap();
        wait(&rx, "the taint removed", NodeState::eligible).await;
        assert!(fake.delete("Node", "", "me"));
        wait(&rx, "the deletion", |s| *s == NodeState::Deleted).await;
        assert!(
            fake.requests()
                .iter()
                .any(|r| r.contains("fieldSelector=metadata.name%3Dme"))
        );
        task.abort();
    }
}
