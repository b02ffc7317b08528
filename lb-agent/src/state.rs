//! The desired state kept up to date one Service at a time.
//!
//! [`model::desired_state`] recomputes every Service on every change. [`DesiredCache`]
//! holds each Service's [`ServiceClaims`] and recomputes only the Services a change can
//! affect: the ones named in [`ChangedKeys`], the owners (before and after) of changed
//! EndpointSlices, and the Services of changed v1 Endpoints. Frontend conflicts are settled
//! as `desired_state` settles them — the claimant whose (namespace, name) sorts first wins —
//! from a per-frontend set of claimants, so a loser takes over when the winner goes away.
//! [`Delta`] names the frontends whose entry changed, which is what
//! [`crate::apply::Applier::sync_frontends`] needs to look at. The node the state is
//! computed for ([`NodeContext`]: its name and NodePort addresses) is part of the cache;
//! when it changes, [`DesiredCache::set_context`] recomputes every Service.
//!
//! The agent's loop: a source reports [`Update`]s — a watch each changed object on its own
//! and each (re)list whole, the manifests directory whole lists after every rescan — and a
//! [`Tracker`] applies them to the one copy of the objects and notes the changed keys
//! ([`ChangedKeys`]); then [`DesiredCache::update`] ->
//! `applier.sync_frontends(cache.services(), delta.frontends(), maps)`. After
//! `Applier::adopt` the first sync must be the full `Applier::sync_services`, since the
//! maps may hold frontends the cache never reported. One watch event thus costs work for
//! the objects it names, whatever the number of Services; only whole lists are compared
//! object by object, and shared objects (`Arc`) that did not change are recognised by
//! their address.
use std::{
    borrow::Borrow,
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::core::v1::Endpoints;

use crate::model::{
    self, Desired, DesiredService, Frontend, Key, NodeContext, Objects, Problem, ServiceClaims,
};
use crate::services::CompactService;
use crate::slices::CompactSlice;
use crate::telemetry;

/// Keys of the objects that were added, changed or deleted between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedKeys {
    /// Services.
    pub services: BTreeSet<Key>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeSet<Key>,
    /// v1 Endpoints.
    pub endpoints: BTreeSet<Key>,
}

impl ChangedKeys {
    /// The keys whose object differs between `old` and `new` (present in one only, or
    /// not equal). Both snapshots are walked side by side in key order, so the cost is one
    /// comparison per object and no allocation for unchanged ones.
    pub fn between(old: &Objects, new: &Objects) -> Self {
        Self {
            services: changed_keys(&old.services, &new.services),
            endpoint_slices: changed_keys(&old.endpoint_slices, &new.endpoint_slices),
            endpoints: changed_keys(&old.endpoints, &new.endpoints),
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty() && self.endpoints.is_empty()
    }
}

/// One change a watching source reports, applied to the [`Objects`] it describes with
/// [`Update::apply`]. A whole list replaces every object of its kind (the initial list and
/// every relist, so objects deleted while the watch was down go away); an object update
/// replaces or (`None`) removes one object.
#[derive(Debug, Clone)]
pub enum Update {
    /// Every Service there is.
    Services(BTreeMap<Key, Arc<CompactService>>),
    /// Every EndpointSlice there is.
    EndpointSlices(BTreeMap<Key, Arc<CompactSlice>>),
    /// One Service, as it is now or gone.
    Service(Key, Option<Arc<CompactService>>),
    /// One EndpointSlice, as it is now or gone.
    EndpointSlice(Key, Option<Arc<CompactSlice>>),
    /// Every v1 Endpoints object there is (manifests only: in a cluster the mirroring
    /// controller turns them into EndpointSlices).
    Endpoints(BTreeMap<Key, Arc<Endpoints>>),
}

impl Update {
    /// Applies the update to `objects` and adds the keys whose object it changed to
    /// `changed`.
    pub fn apply(self, objects: &mut Objects, changed: &mut ChangedKeys) {
        match self {
            Self::Services(all) => {
                changed
                    .services
                    .extend(changed_keys(&objects.services, &all));
                objects.services = all;
            }
            Self::EndpointSlices(all) => {
                changed
                    .endpoint_slices
                    .extend(changed_keys(&objects.endpoint_slices, &all));
                objects.endpoint_slices = all;
            }
            Self::Endpoints(all) => {
                changed
                    .endpoints
                    .extend(changed_keys(&objects.endpoints, &all));
                objects.endpoints = all;
            }
            Self::Service(key, now) => {
                if replace(&mut objects.services, &key, now) {
                    changed.services.insert(key);
                }
            }
            Self::EndpointSlice(key, now) => {
                if replace(&mut objects.endpoint_slices, &key, now) {
                    changed.endpoint_slices.insert(key);
                }
            }
        }
    }
}

/// The objects a stream of [`Update`]s describes, with what changed since the changes
/// were last taken: the input of [`DesiredCache::update`].
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    objects: Objects,
    changed: ChangedKeys,
    /// Trigger times of the EndpointSlice changes not taken yet.
    triggers: Vec<SystemTime>,
    services_listed: bool,
    slices_listed: bool,
}

impl Tracker {
    /// Applies one update.
    pub fn apply(&mut self, update: Update) {
        match &update {
            Update::Services(_) => self.services_listed = true,
            Update::EndpointSlices(all) => {
                self.slices_listed = true;
                let old = &self.objects.endpoint_slices;
                self.triggers.extend(all.iter().filter_map(|(key, new)| {
                    let old = old.get(key);
                    if old.is_some_and(|old| Arc::ptr_eq(old, new)) {
                        return None;
                    }
                    telemetry::trigger_time(old.map(|s| &**s), new)
                }));
            }
            Update::EndpointSlice(key, Some(new)) => {
                let old = self.objects.endpoint_slices.get(key).map(|s| &**s);
                self.triggers.extend(telemetry::trigger_time(old, new));
            }
            Update::Service(..) | Update::EndpointSlice(_, None) | Update::Endpoints(_) => {}
        }
        update.apply(&mut self.objects, &mut self.changed);
    }

    /// Whether Services and EndpointSlices have both been listed: before that, the objects
    /// are not the cluster's, and nothing may be programmed from them.
    pub fn complete(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// The objects now.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The keys changed since the last call, and the trigger times of those changes.
    pub fn take_changes(&mut self) -> (ChangedKeys, Vec<SystemTime>) {
        (
            std::mem::take(&mut self.changed),
            std::mem::take(&mut self.triggers),
        )
    }
}

/// Puts `now` (or nothing) at `key`; whether that changed what is there.
fn replace<V: PartialEq>(map: &mut BTreeMap<Key, Arc<V>>, key: &Key, now: Option<Arc<V>>) -> bool {
    match now {
        Some(v) => match map.entry(key.clone()) {
            Entry::Occupied(mut e) => {
                let same = Arc::ptr_eq(e.get(), &v) || **e.get() == *v;
                e.insert(v);
                !same
            }
            Entry::Vacant(e) => {
                e.insert(v);
                true
            }
        },
        None => map.remove(key).is_some(),
    }
}

fn changed_keys<V: PartialEq>(
    old: &BTreeMap<Key, Arc<V>>,
    new: &BTreeMap<Key, Arc<V>>,
) -> BTreeSet<Key> {
    let mut out = BTreeSet::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let changed = match (a.peek().copied(), b.peek().copied()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                a.next();
                Some(k)
            }
            (None, Some((k, _))) => {
                b.next();
                Some(k)
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    a.next();
                    Some(ka)
                }
                Ordering::Greater => {
                    b.next();
                    Some(kb)
                }
                Ordering::Equal => {
                    a.next();
                    b.next();
                    // The same allocation is the same object; only copies are compared.
                    (!Arc::ptr_eq(va, vb) && va != vb).then_some(ka)
                }
            },
        };
        out.extend(changed.cloned());
    }
    out
}

/// The frontends whose desired entry changed in one [`DesiredCache::update`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Frontends that had no entry and have one now.
    pub added: BTreeSet<Frontend>,
    /// Frontends whose entry differs (backends, affinity, port name, or owner).
    pub changed: BTreeSet<Frontend>,
    /// Frontends that had an entry and have none now.
    pub removed: BTreeSet<Frontend>,
    /// Whether the list of problems changed.
    pub problems_changed: bool,
}

impl Delta {
    /// Every frontend whose entry changed, in order.
    pub fn frontends(&self) -> impl Iterator<Item = Frontend> + '_ {
        self.added
            .iter()
            .chain(&self.changed)
            .chain(&self.removed)
            .copied()
    }

    /// Whether no entry changed (problems aside).
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// [`model::desired_state`] kept up to date incrementally.
///
/// After every [`DesiredCache::update`], [`DesiredCache::services`] and
/// [`DesiredCache::problems`] are what `desired_state` gives for the same objects and the
/// cache's [`NodeContext`].
#[derive(Debug, Clone, Default)]
pub struct DesiredCache {
    /// The node the state is computed for.
    ctx: NodeContext,
    /// What each Service claims on its own.
    claims: BTreeMap<Key, ServiceClaims>,
    /// The Services claiming each frontend; the first holds it.
    claimants: BTreeMap<Frontend, SmallSet<Key>>,
    /// The settled table: each frontend's entry from the Service that holds it (the same
    /// allocation as in that Service's claims).
    services: BTreeMap<Frontend, Arc<DesiredService>>,
    /// The problems of each Service that has any, sorted.
    problems: BTreeMap<Key, Vec<Problem>>,
    /// Which EndpointSlices belong to which Service.
    slices: SliceIndex,
}

/// Which EndpointSlices belong to which Service (names only), followed one changed slice
/// at a time, so that a changed slice costs a lookup and its owners before and after are
/// known. A slice and its Service share a namespace, so each side keeps the other's name
/// alone.
#[derive(Debug, Clone, Default)]
pub struct SliceIndex {
    /// The name of the Service each EndpointSlice belongs to (slices the label filter
    /// drops: none).
    owner: BTreeMap<Key, Box<str>>,
    /// The names of the EndpointSlices of each Service.
    slices_of: BTreeMap<Key, SmallSet<Box<str>>>,
}

impl SliceIndex {
    /// Follows slice `key`, which now belongs to Service `owner` of its namespace (`None`:
    /// it is gone, or belongs to no Service), and adds the Services it belonged to before
    /// and belongs to now to `dirty`: both must be recomputed.
    pub fn update(&mut self, key: &Key, owner: Option<&str>, dirty: &mut BTreeSet<Key>) {
        let (ns, name) = key;
        if let Some(old) = self.owner.remove(key) {
            let service = (ns.clone(), old.into_string());
            if let Entry::Occupied(mut e) = self.slices_of.entry(service.clone()) {
                e.get_mut().remove(name.as_str());
                if e.get().is_empty() {
                    e.remove();
                }
            }
            dirty.insert(service);
        }
        if let Some(owner) = owner {
            let service = (ns.clone(), owner.to_owned());
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(name.as_str().into());
            self.owner.insert(key.clone(), owner.into());
            dirty.insert(service);
        }
    }

    /// The keys of the EndpointSlices of Service `service`.
    pub fn slices_of<'a>(&'a self, service: &'a Key) -> impl Iterator<Item = Key> + 'a {
        self.slices_of
            .get(service)
            .into_iter()
            .flatten()
            .map(|name| (service.0.clone(), name.to_string()))
    }
}

/// A sorted set in one vector, for the sets the cache keeps per Service and per frontend:
/// nearly all hold one element, and a `BTreeSet` would allocate a node for eleven.
#[derive(Debug, Clone)]
struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    fn insert(&mut self, v: T) {
        if let Err(i) = self.0.binary_search(&v) {
            self.0.insert(i, v);
        }
    }

    fn remove<Q: Ord + ?Sized>(&mut self, v: &Q)
    where
        T: Borrow<Q>,
    {
        if let Ok(i) = self.0.binary_search_by(|x| x.borrow().cmp(v)) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl DesiredCache {
    /// An empty cache (as for empty objects) for the node `ctx` describes.
    pub fn new(ctx: NodeContext) -> Self {
        Self {
            ctx,
            ..Self::default()
        }
    }

    /// A cache holding the desired state of `objects` on the node `ctx` describes, and
    /// the delta from nothing to it.
    pub fn build(objects: &Objects, ctx: NodeContext) -> (Self, Delta) {
        let mut cache = Self::new(ctx);
        let delta = cache.update(objects, &ChangedKeys::between(&Objects::default(), objects));
        (cache, delta)
    }

    /// The node the state is computed for.
    pub fn context(&self) -> &NodeContext {
        &self.ctx
    }

    /// Switches to another node context (its addresses or name changed) for the same
    /// `objects` the cache was last brought to, recomputing every Service; returns the
    /// frontends whose entry changed.
    pub fn set_context(&mut self, objects: &Objects, ctx: NodeContext) -> Delta {
        if ctx == self.ctx {
            return Delta::default();
        }
        self.ctx = ctx;
        let all = ChangedKeys {
            services: objects.services.keys().cloned().collect(),
            ..ChangedKeys::default()
        };
        self.update(objects, &all)
    }

    /// Brings the cache to `objects`, given the keys that changed since the objects of
    /// the previous call (every key that differs must be named; naming more only costs
    /// time). Recomputes only the Services those keys can affect, and returns the
    /// frontends whose entry changed.
    pub fn update(&mut self, objects: &Objects, changed: &ChangedKeys) -> Delta {
        let mut dirty: BTreeSet<Key> = changed.services.clone();
        dirty.extend(changed.endpoints.iter().cloned());
        for key in &changed.endpoint_slices {
            let owner = objects.endpoint_slices.get(key).and_then(|s| s.service());
            self.slices.update(key, owner, &mut dirty);
        }

        // Recompute the dirty Services, and note every frontend they claimed or claim.
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        for key in &dirty {
            let new = objects.services.get(key).map(|svc| {
                let slices: Vec<&CompactSlice> = self
                    .slices
                    .slices_of(key)
                    .filter_map(|s| objects.endpoint_slices.get(&s).map(|s| &**s))
                    .collect();
                model::service_claims(objects, key, svc, &slices, &self.ctx)
            });
            let old = match new {
                Some(new) => self.claims.insert(key.clone(), new),
                None => self.claims.remove(key),
            };
            for fe in old.iter().flat_map(|c| c.frontends.keys()) {
                if !self
                    .claims
                    .get(key)
                    .is_some_and(|c| c.frontends.contains_key(fe))
                    && let Entry::Occupied(mut e) = self.claimants.entry(*fe)
                {
                    e.get_mut().remove(key);
                    if e.get().is_empty() {
                        e.remove();
                    }
                }
                touched.insert(*fe);
            }
            for fe in self.claims.get(key).iter().flat_map(|c| c.frontends.keys()) {
                self.claimants.entry(*fe).or_default().insert(key.clone());
                touched.insert(*fe);
            }
        }

        // Settle the touched frontends; every claimant of one may gain or lose a problem.
        let mut delta = Delta::default();
        let mut recheck = dirty;
        for fe in &touched {
            let winner = self.claimants.get(fe).and_then(|c| c.first());
            let entry = winner
                .and_then(|k| self.claims.get(k))
                .and_then(|c| c.frontends.get_shared(fe));
            match (self.services.get_mut(fe), entry) {
                (Some(have), Some(want)) if have != want => {
                    *have = want.clone();
                    delta.changed.insert(*fe);
                }
                (Some(have), Some(want)) => {
                    // Equal: share the new claim's allocation, so the old one is freed.
                    *have = want.clone();
                }
                (None, Some(want)) => {
                    self.services.insert(*fe, want.clone());
                    delta.added.insert(*fe);
                }
                (Some(_), None) => {
                    self.services.remove(fe);
                    delta.removed.insert(*fe);
                }
                (None, None) => {}
            }
            recheck.extend(self.claimants.get(fe).into_iter().flatten().cloned());
        }
        for key in recheck {
            let problems: Vec<Problem> = self
                .claims
                .get(&key)
                .map(|c| {
                    c.problems_with(|fe| self.services.get(fe).map(|s| &*s.owner))
                        .into_iter()
                        .collect()
                })
                .unwrap_or_default();
            let before = self.problems.get(&key).map_or(&[][..], Vec::as_slice);
            if before != problems.as_slice() {
                delta.problems_changed = true;
                if problems.is_empty() {
                    self.problems.remove(&key);
                } else {
                    self.problems.insert(key, problems);
                }
            }
        }
        delta
    }

    /// The desired entry of every frontend.
    pub fn services(&self) -> &BTreeMap<Frontend, Arc<DesiredService>> {
        &self.services
    }

    /// Every problem, sorted as in [`Desired::problems`].
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        // Problems sort by Service (namespace, name) first, the order of the keys.
        self.problems.values().flatten()
    }

    /// The whole desired state, as [`model::desired_state`] returns it (a copy).
    pub fn desired(&self) -> Desired {
        Desired {
            services: self
                .services
                .iter()
                .map(|(fe, s)| (*fe, DesiredService::clone(s)))
                .collect(),
            problems: self.problems().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        apply::{
            Applier, SyncStats,
            tests::{Rng, replay_invariant},
        },
        maps::MemMaps,
        model::{
            LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, Protocol, desired_state,
            fixtures::{Slice, Svc, endpoints, slice, svc},
        },
    };

    /// The agent both ways: full recompute and sync, and cache plus `sync_frontends`,
    /// each on its own maps.
    struct Both {
        objects: Objects,
        full: (Applier, MemMaps),
        incremental: (DesiredCache, Applier, MemMaps),
        /// The objects as the incremental path sees them: fed updates as a watch gives.
        tracker: Tracker,
        steps: usize,
    }

    impl Both {
        fn new() -> Self {
            let mut tracker = Tracker::default();
            tracker.apply(Update::Services(BTreeMap::new()));
            tracker.apply(Update::EndpointSlices(BTreeMap::new()));
            Self {
                objects: Objects::default(),
                full: (Applier::new(), MemMaps::default()),
                incremental: (DesiredCache::new(ctx()), Applier::new(), MemMaps::default()),
                tracker,
                steps: 0,
            }
        }

        /// What a watch reports for the change from `before` to `after`: each changed
        /// object on its own, or (every fifth step, as after a relist) whole lists.
        fn updates(step: usize, before: &Objects, after: &Objects) -> Vec<Update> {
            let changed = ChangedKeys::between(before, after);
            let mut updates = Vec::new();
            if step.is_multiple_of(5) {
                updates.push(Update::Services(after.services.clone()));
                updates.push(Update::EndpointSlices(after.endpoint_slices.clone()));
            } else {
                for key in changed.services {
                    let now = after.services.get(&key).cloned();
                    updates.push(Update::Service(key, now));
                }
                for key in changed.endpoint_slices {
                    let now = after.endpoint_slices.get(&key).cloned();
                    updates.push(Update::EndpointSlice(key, now));
                }
            }
            if !changed.endpoints.is_empty() {
                updates.push(Update::Endpoints(after.endpoints.clone()));
            }
            updates
        }

        /// Applies `change` to the objects, runs both paths, checks they agree, and
        /// returns the delta and what the incremental sync did.
        fn step(&mut self, change: impl FnOnce(&mut Objects)) -> (Delta, SyncStats) {
            let before = self.objects.clone();
            let old = desired_state(&before, &ctx());
            change(&mut self.objects);
            let want = desired_state(&self.objects, &ctx());

            let (fa, fm) = &mut self.full;
            fm.log.clear();
            let full_stats = fa.sync(&want, fm).unwrap();

            self.steps += 1;
            for u in Self::updates(self.steps, &before, &self.objects) {
                self.tracker.apply(u);
            }
            let (changed, _) = self.tracker.take_changes();
            assert_eq!(self.tracker.objects(), &self.objects);
            assert_eq!(changed, ChangedKeys::between(&before, &self.objects));
            let (cache, ia, im) = &mut self.incremental;
            let delta = cache.update(self.tracker.objects(), &changed);
            assert_eq!(cache.desired(), want, "cache differs from desired_state");
            let exact: BTreeSet<Frontend> = old
                .services
                .keys()
                .chain(want.services.keys())
                .filter(|fe| old.services.get(fe) != want.services.get(fe))
                .copied()
                .collect();
            assert_eq!(delta.frontends().collect::<BTreeSet<_>>(), exact);
            assert_eq!(delta.problems_changed, old.problems != want.problems);

            let start = im.clone();
            im.log.clear();
            let stats = ia
                .sync_frontends(cache.services(), delta.frontends(), im)
                .unwrap();
            replay_invariant(&start, &im.log);
            assert_eq!(stats, full_stats);
            assert_eq!(im.log, fm.log, "same writes in the same order");
            assert_eq!((&im.services, &im.backends), (&fm.services, &fm.backends));
            (delta, stats)
        }
    }

    /// The node the tests compute for: a name endpoints may carry, and two addresses
    /// that answer NodePorts.
    fn ctx() -> NodeContext {
        NodeContext {
            node_name: "here".to_owned(),
            nodeport_addrs: ["10.96.0.1", "192.168.0.1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            ..NodeContext::default()
        }
    }

    fn put_svc(o: &mut Objects, s: Svc) {
        let m = &s.0.metadata;
        let key = (m.namespace.clone().unwrap(), m.name.clone().unwrap());
        o.services.insert(key, Arc::new(CompactService::from(&s.0)));
    }

    fn put_slice(o: &mut Objects, s: Slice) {
        let m = &s.0.metadata;
        let key = (m.namespace.clone().unwrap(), m.name.clone().unwrap());
        o.endpoint_slices
            .insert(key, Arc::new(CompactSlice::from(&s.0)));
    }

    fn k(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    fn fe(ip: &str, port: u16) -> Frontend {
        Frontend::new(ip.parse().unwrap(), port, Protocol::Tcp)
    }

    fn owner_of(c: &DesiredCache, f: &Frontend) -> String {
        c.services()[f].owner.name.clone()
    }

    #[test]
    fn conflict_goes_to_the_first_service_and_the_loser_takes_over() {
        let mut both = Both::new();
        let f = fe("10.96.0.10", 80);
        let web = |name: &str| {
            svc("default", name)
                .cluster_ip("10.96.0.10")
                .port("", 80, "TCP", "80")
        };
        both.step(|o| put_svc(o, web("b")));
        // "a" sorts first: it takes the frontend from "b", which gets a problem.
        let (delta, _) = both.step(|o| put_svc(o, web("a")));
        assert_eq!(delta.changed, BTreeSet::from([f]));
        let cache = &both.incremental.0;
        assert_eq!(owner_of(cache, &f), "a");
        assert_eq!(
            cache
                .problems()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "Service default/b: 10.96.0.10:80/TCP is already claimed by Service default/a; this port is ignored"
            ]
        );
        // A change to the loser alone changes no entry.
        let (delta, stats) = both.step(|o| {
            put_slice(
                o,
                slice("default", "b-1", "b")
                    .ready("10.0.0.9")
                    .port("", 80, "TCP"),
            );
        });
        assert!(delta.is_empty() && !delta.problems_changed);
        assert_eq!(stats, SyncStats::default());
        // The winner goes: the loser takes over with its own endpoints, problem resolved.
        let (delta, _) = both.step(|o| {
            o.services.remove(&k("default", "a"));
        });
        assert_eq!(delta.changed, BTreeSet::from([f]));
        assert!(delta.problems_changed);
        let cache = &both.incremental.0;
        assert_eq!(owner_of(cache, &f), "b");
        assert_eq!(cache.problems().count(), 0);
        // The winner moves away to another port: same.
        both.step(|o| put_svc(o, web("a")));
        both.step(|o| {
            put_svc(
                o,
                svc("default", "a")
                    .cluster_ip("10.96.0.10")
                    .port("", 81, "TCP", "80"),
            );
        });
        assert_eq!(owner_of(&both.incremental.0, &f), "b");
        // The loser goes: only a problem changes.
        both.step(|o| put_svc(o, web("a")));
        let (delta, stats) = both.step(|o| {
            o.services.remove(&k("default", "b"));
        });
        assert!(delta.is_empty() && delta.problems_changed);
        assert_eq!(stats, SyncStats::default());
    }

    #[test]
    fn a_slice_relabelled_to_another_service_moves_its_endpoints() {
        let mut both = Both::new();
        both.step(|o| {
            put_svc(
                o,
                svc("default", "a")
                    .cluster_ip("10.96.0.1")
                    .port("", 80, "TCP", "80"),
            );
            put_svc(
                o,
                svc("default", "b")
                    .cluster_ip("10.96.0.2")
                    .port("", 80, "TCP", "80"),
            );
            put_slice(
                o,
                slice("default", "s", "a")
                    .ready("10.0.0.1")
                    .port("", 80, "TCP"),
            );
        });
        let (delta, _) = both.step(|o| {
            put_slice(
                o,
                slice("default", "s", "b")
                    .ready("10.0.0.1")
                    .port("", 80, "TCP"),
            );
        });
        assert_eq!(
            delta.changed,
            BTreeSet::from([fe("10.96.0.1", 80), fe("10.96.0.2", 80)])
        );
        let cache = &both.incremental.0;
        assert!(cache.services()[&fe("10.96.0.1", 80)].active.is_empty());
        assert_eq!(cache.services()[&fe("10.96.0.2", 80)].active.len(), 1);
        // Filtered out by a label: the Service falls back to its v1 Endpoints.
        let (delta, _) = both.step(|o| {
            o.endpoints.insert(
                k("default", "b"),
                endpoints("default", "b", &["10.0.0.7"], &[], &[("", 80, "TCP")]).into(),
            );
            put_slice(
                o,
                slice("default", "s", "b")
                    .label(LABEL_HEADLESS, "")
                    .ready("10.0.0.1")
                    .port("", 80, "TCP"),
            );
        });
        assert_eq!(delta.changed, BTreeSet::from([fe("10.96.0.2", 80)]));
        assert_eq!(
            both.incremental.0.services()[&fe("10.96.0.2", 80)].active[0].addr,
            "10.0.0.7".parse::<std::net::Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn irrelevant_changes_write_nothing() {
        let mut both = Both::new();
        both.step(|o| {
            put_svc(
                o,
                svc("default", "a")
                    .cluster_ip("10.96.0.1")
                    .port("", 80, "TCP", "80"),
            );
            put_slice(
                o,
                slice("default", "a-1", "a")
                    .ready("10.0.0.1")
                    .port("", 80, "TCP"),
            );
        });
        for change in [
            // A slice of no Service, a label that changes nothing, Endpoints shadowed by
            // a slice, a Service for another proxy.
            Box::new(|o: &mut Objects| {
                put_slice(
                    o,
                    slice("default", "x-1", "x")
                        .ready("10.0.0.2")
                        .port("", 80, "TCP"),
                );
            }) as Box<dyn FnOnce(&mut Objects)>,
            Box::new(|o: &mut Objects| {
                put_svc(
                    o,
                    svc("default", "a")
                        .cluster_ip("10.96.0.1")
                        .port("", 80, "TCP", "80")
                        .label("team", "web"),
                );
            }),
            Box::new(|o: &mut Objects| {
                o.endpoints.insert(
                    k("default", "a"),
                    endpoints("default", "a", &["10.0.0.9"], &[], &[("", 80, "TCP")]).into(),
                );
            }),
            Box::new(|o: &mut Objects| {
                put_svc(
                    o,
                    svc("default", "p")
                        .cluster_ip("10.96.0.3")
                        .port("", 80, "TCP", "80")
                        .label(LABEL_SERVICE_PROXY_NAME, "other"),
                );
            }),
            Box::new(|_: &mut Objects| {}),
        ] {
            let (delta, stats) = both.step(change);
            assert_eq!(delta, Delta::default());
            assert_eq!(stats, SyncStats::default());
            assert!(both.incremental.2.log.is_empty());
        }
    }

    #[test]
    fn changed_keys_name_exactly_what_differs() {
        let mut a = Objects::default();
        put_svc(&mut a, svc("default", "a").cluster_ip("10.96.0.1"));
        put_svc(&mut a, svc("default", "b").cluster_ip("10.96.0.2"));
        put_svc(&mut a, svc("default", "c").cluster_ip("10.96.0.3"));
        let mut b = a.clone();
        b.services.remove(&k("default", "a"));
        put_svc(&mut b, svc("default", "c").cluster_ip("10.96.0.4"));
        put_svc(&mut b, svc("default", "d").cluster_ip("10.96.0.5"));
        let changed = ChangedKeys::between(&a, &b);
        assert_eq!(
            changed.services,
            BTreeSet::from([k("default", "a"), k("default", "c"), k("default", "d")])
        );
        assert!(changed.endpoint_slices.is_empty() && changed.endpoints.is_empty());
        assert!(ChangedKeys::between(&b, &b).is_empty());
    }

    #[test]
    fn tracker_is_complete_after_both_lists_and_names_what_changed() {
        let mut t = Tracker::default();
        let mut o = Objects::default();
        put_svc(&mut o, svc("default", "a").cluster_ip("10.96.0.1"));
        put_svc(&mut o, svc("default", "b").cluster_ip("10.96.0.2"));
        t.apply(Update::Services(o.services.clone()));
        assert!(!t.complete(), "only the Services are listed");
        t.apply(Update::EndpointSlices(BTreeMap::new()));
        assert!(t.complete());
        let (changed, triggers) = t.take_changes();
        assert_eq!(
            changed.services,
            BTreeSet::from([k("default", "a"), k("default", "b")])
        );
        assert!(triggers.is_empty());

        // The same object again, or a copy equal to it: nothing changed.
        let a = o.services[&k("default", "a")].clone();
        t.apply(Update::Service(k("default", "a"), Some(a.clone())));
        t.apply(Update::Service(
            k("default", "a"),
            Some(Arc::new((*a).clone())),
        ));
        t.apply(Update::Service(k("default", "gone"), None));
        assert!(t.take_changes().0.is_empty());

        // A relist that misses "b" (deleted while the watch was down) removes it.
        let mut relisted = o.services.clone();
        relisted.remove(&k("default", "b"));
        t.apply(Update::Services(relisted));
        let (changed, _) = t.take_changes();
        assert_eq!(changed.services, BTreeSet::from([k("default", "b")]));
        assert!(!t.objects().services.contains_key(&k("default", "b")));
    }

    #[test]
    fn tracker_collects_trigger_times_of_changed_slices() {
        let stamped = |t: &str| {
            let mut s = slice("default", "a-1", "a")
                .ready("10.0.0.1")
                .port("", 80, "TCP")
                .0;
            s.metadata.annotations =
                Some([(telemetry::TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())].into());
            Arc::new(CompactSlice::from(s))
        };
        let mut t = Tracker::default();
        let key = k("default", "a-1");
        let first = stamped("2026-01-01T00:00:00Z");
        t.apply(Update::EndpointSlices(
            [(key.clone(), first.clone())].into(),
        ));
        assert_eq!(t.take_changes().1.len(), 1, "a new slice counts");
        t.apply(Update::EndpointSlice(
            key.clone(),
            Some(stamped("2026-01-01T00:00:00Z")),
        ));
        assert!(
            t.take_changes().1.is_empty(),
            "the same trigger time counts once"
        );
        t.apply(Update::EndpointSlice(
            key.clone(),
            Some(stamped("2026-01-01T00:00:09Z")),
        ));
        let (changed, triggers) = t.take_changes();
        assert_eq!(changed.endpoint_slices, BTreeSet::from([key]));
        assert_eq!(triggers.len(), 1);
    }

    const NAMES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];

    fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
        from[rng.below(from.len() as u64) as usize]
    }

    /// A Service from a small pool of addresses and ports, so that conflicts, repeated
    /// ports, skipped Services and every problem come up.
    fn random_service(rng: &mut Rng, ns: &str, name: &str) -> Svc {
        let ips = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "fd00::1", "junk"];
        let mut s = svc(ns, name);
        s = match rng.below(10) {
            0 => s.cluster_ip("None"),
            1 => s.type_("ExternalName"),
            2 => s.cluster_ips(&[pick(rng, &ips), pick(rng, &ips)]),
            _ => s.cluster_ip(pick(rng, &ips[..3])),
        };
        for _ in 0..rng.below(4) {
            let (pname, port, proto) = match rng.below(6) {
                0 => ("dns", 53, "UDP"),
                1 => ("dns-tcp", 53, "TCP"),
                2 => ("", 80, "TCP"),
                3 => ("http", 80, "TCP"),
                4 => ("s", 90, "SCTP"),
                _ => ("https", 443, "TCP"),
            };
            s = s.port(pname, port, proto, "8080");
            if rng.below(3) == 0 {
                s = s.node_port(*[30080, 30081, 40000].get(rng.below(3) as usize).unwrap());
            }
        }
        // North-south: types, external addresses (some shared with ClusterIPs and node
        // addresses, to make conflicts), ranges and traffic policies.
        match rng.below(4) {
            0 => s = s.type_("NodePort"),
            1 => {
                s = s
                    .type_("LoadBalancer")
                    .lb_ingress(pick(rng, &ips[..3]), None)
            }
            _ => {}
        }
        if rng.below(4) == 0 {
            s = s.external_ips(&[pick(rng, &["10.96.0.2", "203.0.113.1", "junk"])]);
        }
        if rng.below(4) == 0 {
            s = s.source_ranges(&[pick(rng, &["10.0.0.0/8", "bad", "10.1.0.0/16"])]);
        }
        if rng.below(3) == 0 {
            s = s.etp("Local");
        }
        if rng.below(3) == 0 {
            s = s.itp("Local");
        }
        if rng.below(4) == 0 {
            s = s.affinity((rng.below(2) == 0).then(|| rng.below(100_000) as i32));
        }
        if rng.below(12) == 0 {
            s = s.label(LABEL_SERVICE_PROXY_NAME, "other");
        }
        s
    }

    fn random_slice(rng: &mut Rng, ns: &str, name: &str) -> Slice {
        let mut s = slice(ns, name, pick(rng, &NAMES));
        for e in 1..=5 {
            let cond = |rng: &mut Rng| match rng.below(3) {
                0 => None,
                1 => Some(false),
                _ => Some(true),
            };
            if rng.below(2) == 0 {
                let (r, sv, t) = (cond(rng), cond(rng), cond(rng));
                s = s.endpoint_with(&format!("10.0.0.{e}"), r, sv, t);
                if rng.below(2) == 0 {
                    s = s.on(pick(rng, &["here", "there"]));
                }
            }
        }
        for _ in 0..rng.below(3) {
            let (pname, proto) = match rng.below(4) {
                0 => ("dns", "UDP"),
                1 => ("dns-tcp", "TCP"),
                2 => ("", "TCP"),
                _ => ("http", "TCP"),
            };
            s = s.port(pname, 8000 + rng.below(3) as i32, proto);
        }
        match rng.below(10) {
            0 => s.label(LABEL_HEADLESS, ""),
            1 => s.address_type("IPv6"),
            _ => s,
        }
    }

    fn random_change(rng: &mut Rng, o: &mut Objects) {
        let ns = pick(rng, &["a", "b"]);
        match rng.below(3) {
            0 => {
                let name = pick(rng, &NAMES);
                if rng.below(4) == 0 {
                    o.services.remove(&k(ns, name));
                } else {
                    put_svc(o, random_service(rng, ns, name));
                }
            }
            1 => {
                let name = pick(rng, &["e0", "e1", "e2", "e3", "e4", "e5"]);
                if rng.below(4) == 0 {
                    o.endpoint_slices.remove(&k(ns, name));
                } else {
                    put_slice(o, random_slice(rng, ns, name));
                }
            }
            _ => {
                let name = pick(rng, &NAMES);
                if rng.below(3) == 0 {
                    o.endpoints.remove(&k(ns, name));
                } else {
                    let ip = |rng: &mut Rng| format!("10.0.1.{}", rng.below(4));
                    let (r, n) = (ip(rng), ip(rng));
                    let port = pick(rng, &["", "http", "dns"]);
                    o.endpoints.insert(
                        k(ns, name),
                        endpoints(ns, name, &[&r], &[&n], &[(port, 8080, "TCP")]).into(),
                    );
                }
            }
        }
    }

    #[test]
    fn random_changes_give_the_same_maps_both_ways() {
        let mut rng = Rng(0x853c_49e6_748f_ea9b);
        for run in 0..20 {
            let mut both = Both::new();
            for step in 0..100 {
                let changes = 1 + rng.below(3);
                both.step(|o| {
                    for _ in 0..changes {
                        random_change(&mut rng, o);
                    }
                });
                if step % 30 == 29 {
                    // A restart: both adopt the maps and fully sync, which writes nothing,
                    // and the incremental path carries on from the adopted ids.
                    let (fa, fm) = &mut both.full;
                    *fa = Applier::adopt(fm).unwrap();
                    let d = desired_state(&both.objects, &ctx());
                    assert_eq!(fa.sync(&d, fm).unwrap(), SyncStats::default());
                    let (cache, ia, im) = &mut both.incremental;
                    *ia = Applier::adopt(im).unwrap();
                    let stats = ia.sync_services(cache.services(), im).unwrap();
                    assert_eq!(stats, SyncStats::default());
                }
            }
            // A last full sync on the incremental maps finds nothing left to do.
            let (_, a, m) = &mut both.incremental;
            let d = desired_state(&both.objects, &ctx());
            assert_eq!(a.sync(&d, m).unwrap(), SyncStats::default(), "run {run}");
        }
    }

    #[test]
    fn random_changes_on_nearly_full_maps_give_the_same_maps_both_ways() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut both = Both::new();
        for _ in 0..1500 {
            let cap =
                (rng.below(3) == 0).then(|| both.full.1.services.len() + rng.below(8) as usize);
            both.full.1.services_capacity = cap;
            both.incremental.2.services_capacity = cap;
            let changes = 1 + rng.below(3);
            both.step(|o| {
                for _ in 0..changes {
                    random_change(&mut rng, o);
                }
            });
        }
    }

    #[test]
    fn a_new_node_context_recomputes_every_service() {
        let mut rng = Rng(0x6a09_e667_f3bc_c908);
        let mut o = Objects::default();
        for _ in 0..200 {
            random_change(&mut rng, &mut o);
        }
        let (mut cache, _) = DesiredCache::build(&o, ctx());
        let old = cache.desired();
        let other = NodeContext {
            node_name: "there".to_owned(),
            nodeport_addrs: ["192.168.0.2".parse().unwrap()].into(),
            ..ctx()
        };
        let delta = cache.set_context(&o, other.clone());
        let want = desired_state(&o, &other);
        assert_eq!(cache.desired(), want);
        let exact: BTreeSet<Frontend> = old
            .services
            .keys()
            .chain(want.services.keys())
            .filter(|fe| old.services.get(fe) != want.services.get(fe))
            .copied()
            .collect();
        assert_eq!(delta.frontends().collect::<BTreeSet<_>>(), exact);
        assert!(cache.set_context(&o, other).frontends().next().is_none());
    }

    #[test]
    fn build_equals_desired_state() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut o = Objects::default();
        for _ in 0..200 {
            random_change(&mut rng, &mut o);
        }
        let (cache, delta) = DesiredCache::build(&o, ctx());
        let want = desired_state(&o, &ctx());
        assert_eq!(cache.desired(), want);
        assert_eq!(
            delta.added,
            want.services.keys().copied().collect::<BTreeSet<_>>()
        );
        assert!(delta.changed.is_empty() && delta.removed.is_empty());
    }
}
