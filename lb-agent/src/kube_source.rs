//! The Kubernetes API source: reflectors over Services and EndpointSlices, turned into
//! [`Objects`] snapshots for the same desired-state -> apply path the manifests source
//! feeds.
//!
//! Level-triggered: the stores are the truth, and every snapshot is taken from them whole.
//! Watch events only say *when* to take one; no map entry is ever derived from a `Delete`
//! event. Nothing is sent until both initial lists are complete, so a half-listed cluster
//! never empties the maps.
use std::{collections::BTreeMap, path::Path, sync::Arc};

use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::watch;
use tracing::{debug, info, instrument, warn};

use crate::model::{Key, Objects};

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

/// Which of the two reflectors an item came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
}

/// One item from either reflector, reduced to what the sync loop needs.
enum Signal {
    /// An initial list or relist completed; the store now holds it.
    InitDone(Kind),
    /// An object changed in the store.
    Changed(Kind),
    /// A relist is in progress (the store is unchanged until its `InitDone`).
    Relisting(Kind),
    /// The watch failed; the watcher retries with backoff.
    Error(Kind, watcher::Error),
}

/// Watches `K` with `selector` into a new store, as a stream of [`Signal`]s.
fn reflect<K>(
    client: &Client,
    selector: &str,
    kind: Kind,
) -> (reflector::Store<K>, BoxStream<'static, Signal>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().labels(selector);
    let stream = watcher(Api::<K>::all(client.clone()), config)
        .default_backoff()
        // managedFields are large and unused; the stores hold every object of the cluster.
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |item| match item {
            Ok(watcher::Event::InitDone) => Signal::InitDone(kind),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Signal::Relisting(kind),
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Signal::Changed(kind),
            Err(e) => Signal::Error(kind, e),
        })
        .boxed();
    (store, stream)
}

/// Snapshot of both stores as the model's input.
fn snapshot(
    services: &reflector::Store<Service>,
    slices: &reflector::Store<EndpointSlice>,
) -> Objects {
    Objects {
        services: by_key(services),
        endpoint_slices: by_key(slices),
        // v1 Endpoints are not watched: in a cluster the EndpointSlice mirroring
        // controller turns hand-written Endpoints into slices, as kube-proxy relies on.
        endpoints: Default::default(),
    }
}

/// The objects of `store`, owned, by (namespace, name).
fn by_key<K>(store: &reflector::Store<K>) -> BTreeMap<Key, K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .into_iter()
        .map(|o| {
            let o = Arc::unwrap_or_clone(o);
            ((o.namespace().unwrap_or_default(), o.name_any()), o)
        })
        .collect()
}

/// Most items taken into one snapshot: under a constant stream of events the loop still
/// sends snapshots (and yields to the runtime) regularly.
const MAX_BATCH: usize = 1024;

/// The next item if it is ready now and the batch (`taken` so far) is not full.
fn next_ready(
    signals: &mut (impl futures::Stream<Item = Signal> + Unpin),
    taken: usize,
) -> Option<Signal> {
    if taken >= MAX_BATCH {
        return None;
    }
    signals.next().now_or_never().flatten()
}

/// Per-reflector bookkeeping of the sync loop.
#[derive(Default)]
struct Progress {
    /// The first list completed; the store is complete from now on (relists swap in
    /// atomically at their `InitDone`).
    listed: bool,
    /// In a failure streak, already logged.
    failing: bool,
}

/// Watches Services and EndpointSlices and sends an [`Objects`] snapshot to `tx` once
/// both initial lists are complete and after every change from then on. Returns when
/// every receiver of `tx` is gone.
///
/// Bursts are coalesced: all items that are ready are taken before one snapshot is sent,
/// while a lone change is sent at once. Watch failures (including 410 Gone) make the
/// watchers relist with backoff; the stores, and so the maps, keep their last content
/// meanwhile, and each failure streak is logged once.
#[instrument(skip_all)]
pub async fn run(client: Client, tx: watch::Sender<Option<Objects>>) {
    let (services, service_stream) = reflect::<Service>(&client, SERVICE_SELECTOR, Kind::Services);
    let (slices, slice_stream) =
        reflect::<EndpointSlice>(&client, ENDPOINT_SLICE_SELECTOR, Kind::EndpointSlices);
    let mut signals = futures::stream::select(service_stream, slice_stream);
    let mut service_progress = Progress::default();
    let mut slice_progress = Progress::default();
    loop {
        let first = tokio::select! {
            s = signals.next() => s,
            () = tx.closed() => return,
        };
        // Both watcher streams are endless (errors are items); this is unreachable in
        // practice, but returning is the honest answer if it ever happens.
        let Some(first) = first else { return };
        let mut dirty = false;
        let mut signal = Some(first);
        let mut taken = 0;
        while let Some(s) = signal {
            taken += 1;
            let init_done = matches!(s, Signal::InitDone(_));
            let (kind, changed) = match s {
                Signal::InitDone(kind) | Signal::Changed(kind) => (kind, true),
                Signal::Relisting(kind) => (kind, false),
                Signal::Error(kind, e) => {
                    let progress = match kind {
                        Kind::Services => &mut service_progress,
                        Kind::EndpointSlices => &mut slice_progress,
                    };
                    if !progress.failing {
                        warn!(resource = ?kind, error = %e, "watch failed; retrying with backoff, keeping the last state");
                    } else {
                        debug!(resource = ?kind, error = %e, "watch still failing");
                    }
                    progress.failing = true;
                    signal = next_ready(&mut signals, taken);
                    continue;
                }
            };
            let progress = match kind {
                Kind::Services => &mut service_progress,
                Kind::EndpointSlices => &mut slice_progress,
            };
            if progress.failing {
                info!(resource = ?kind, "watch recovered");
                progress.failing = false;
            }
            progress.listed |= init_done;
            dirty |= changed;
            // Take whatever else is already waiting, without yielding to the runtime, so
            // that a burst of events becomes one snapshot.
            signal = next_ready(&mut signals, taken);
        }
        if dirty
            && service_progress.listed
            && slice_progress.listed
            && tx.send(Some(snapshot(&services, &slices))).is_err()
        {
            return;
        }
    }
}
