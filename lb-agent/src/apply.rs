//! Diff the desired tables against what the maps hold, and write only the difference.
//!
//! The [`Applier`] mirrors the maps' content: per frontend its service id, its slot vector
//! and its backends with their ids. Every write updates the mirror only once the kernel has
//! accepted it, so after a failure the mirror still says exactly what the maps hold.
//!
//! Writes are ordered so that at every moment — after any prefix of the writes — every
//! slot `1..=count` of every frontend names a backend that exists. This is the invariant
//! the datapath relies on:
//! 1. new backends (and backends coming back from terminating) are written first;
//! 2. slots that change in place are rewritten, then slots past the old count are added;
//! 3. the frontend header (slot 0) is written with the new count;
//! 4. slots past the new count are deleted;
//! 5. backends leaving the active set are marked terminating, and backends no longer known
//!    are deleted, once no slot names them.
//!
//! A removed backend's slot is refilled in place by a new backend, or by the last slot when
//! the Service shrinks (swap-remove), so the slots of unchanged backends are never written.
//!
//! Service and backend ids are stable for as long as the frontend (and the backend) exist,
//! including across agent restarts ([`Applier::adopt`] reads them back from the pinned
//! maps): connection-tracking entries in the kernel refer to them.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, Backend, SVC_F_ADDR_MARKER, SVC_F_AFFINITY, ServiceKey,
    ServiceValue, proto,
};

use crate::{
    maps::{MapError, ServiceMaps},
    model::{BackendAddr, Desired, DesiredService, Frontend, ObjectRef, Problem, Protocol},
};

/// Reading the maps back failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The maps could not be read to re-adopt their content.
    #[error("cannot re-adopt the pinned maps: {0}")]
    Adopt(#[source] MapError),
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries inserted or replaced.
    pub writes: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Frontends (or addresses) that could not be fully programmed, with the reason.
    pub failed: Vec<Problem>,
}

/// Smallest-first id allocator; 0 is never handed out.
#[derive(Debug, Default, Clone)]
struct Ids {
    next: u32,
    free: BTreeSet<u32>,
}

impl Ids {
    fn from_used(used: &BTreeSet<u32>) -> Self {
        let max = used.last().copied().unwrap_or(0);
        let free = (1..max).filter(|i| !used.contains(i)).collect();
        Self {
            next: max + 1,
            free,
        }
    }

    fn alloc(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        self.next = self.next.max(1);
        let id = self.next;
        self.next += 1;
        id
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// What the maps hold for one frontend.
#[derive(Debug, Clone)]
struct FrontendState {
    service_id: u32,
    owner: Option<ObjectRef>,
    /// Slot 0 as written, `None` if not written (yet).
    head: Option<ServiceValue>,
    /// Backend ids in slots 1..=len, as present in the map (may exceed the count after a
    /// failed shrink; the excess is deleted by the next sync).
    slots: Vec<u32>,
    /// Backends of this frontend: address -> (id, state).
    backends: BTreeMap<BackendAddr, (u32, u8)>,
}

impl FrontendState {
    fn count(&self) -> usize {
        self.head
            .map_or(0, |h| usize::from(h.count))
            .min(self.slots.len())
    }
}

/// A write that [`Applier::adopt`] found necessary to clean up leftovers.
#[derive(Debug, Clone)]
enum Cleanup {
    Service(ServiceKey),
    Backend(u32),
}

/// Keeps the maps equal to the desired tables.
#[derive(Debug, Default)]
pub struct Applier {
    frontends: BTreeMap<Frontend, FrontendState>,
    markers: BTreeSet<Ipv4Addr>,
    service_ids: Ids,
    backend_ids: Ids,
    cleanup: Vec<Cleanup>,
}

fn addr_of(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn key(fe: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(addr_be(fe.addr), fe.port.to_be(), fe.proto.number(), slot)
}

fn protocol(nr: u8) -> Option<Protocol> {
    match nr {
        proto::TCP => Some(Protocol::Tcp),
        proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

/// Counts writes and deletes while passing them to the maps.
struct Writer<'a, M: ServiceMaps> {
    maps: &'a mut M,
    stats: SyncStats,
}

impl<M: ServiceMaps> Writer<'_, M> {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), MapError> {
        self.maps.put_service(k, v)?;
        self.stats.writes += 1;
        Ok(())
    }
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), MapError> {
        self.maps.del_service(k)?;
        self.stats.deletes += 1;
        Ok(())
    }
    fn put_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapError> {
        self.maps.put_backend(id, b)?;
        self.stats.writes += 1;
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.maps.del_backend(id)?;
        self.stats.deletes += 1;
        Ok(())
    }
}

fn failure(owner: Option<&ObjectRef>, what: String, e: &MapError) -> Problem {
    let object = owner
        .cloned()
        .unwrap_or_else(|| ObjectRef::new("Frontend", "", &what));
    let reason = if e.is_full() {
        format!(
            "{what} not programmed: the {} map is full (other Services are unaffected; will retry)",
            e.map
        )
    } else {
        format!("{what} not programmed: {e} (will retry)")
    };
    Problem::new(object, reason)
}

impl Applier {
    /// An applier for empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the mirror from what the maps hold (after an agent restart), so that ids
    /// stay the same. Inconsistent leftovers are scheduled for deletion by the first sync.
    pub fn adopt(maps: &impl ServiceMaps) -> Result<Self, ApplyError> {
        let services = maps.services().map_err(ApplyError::Adopt)?;
        let backends = maps.backends().map_err(ApplyError::Adopt)?;
        let mut me = Self::new();
        let mut groups: BTreeMap<(u32, u16, u8), BTreeMap<u16, ServiceValue>> = BTreeMap::new();
        for (k, v) in services {
            if k.slot == 0 && k.port_be == 0 && k.proto == 0 && v.flags & SVC_F_ADDR_MARKER != 0 {
                me.markers.insert(addr_of(k.addr_be));
                continue;
            }
            groups
                .entry((k.addr_be, k.port_be, k.proto))
                .or_default()
                .insert(k.slot, v);
        }
        let mut by_service_id: BTreeMap<u32, Frontend> = BTreeMap::new();
        for ((a, p, pr), slots) in groups {
            let fe = protocol(pr).map(|proto| Frontend {
                addr: addr_of(a),
                port: u16::from_be(p),
                proto,
            });
            let head = slots.get(&0).copied();
            let (Some(fe), Some(head)) = (fe, head) else {
                for slot in slots.keys() {
                    me.cleanup
                        .push(Cleanup::Service(ServiceKey::new(a, p, pr, *slot)));
                }
                continue;
            };
            if head.service_id == 0 || by_service_id.contains_key(&head.service_id) {
                for slot in slots.keys() {
                    me.cleanup
                        .push(Cleanup::Service(ServiceKey::new(a, p, pr, *slot)));
                }
                continue;
            }
            let mut st = FrontendState {
                service_id: head.service_id,
                owner: None,
                head: Some(head),
                slots: Vec::new(),
                backends: BTreeMap::new(),
            };
            // Slots must be contiguous from 1; anything after a gap is a leftover.
            let mut contiguous = true;
            for (slot, v) in slots.iter().filter(|(s, _)| **s > 0) {
                if contiguous && usize::from(*slot) == st.slots.len() + 1 {
                    st.slots.push(v.backend_id);
                } else {
                    contiguous = false;
                    me.cleanup
                        .push(Cleanup::Service(ServiceKey::new(a, p, pr, *slot)));
                }
            }
            by_service_id.insert(head.service_id, fe);
            me.frontends.insert(fe, st);
        }
        let mut used_backend_ids = BTreeSet::new();
        for (id, b) in backends {
            let owner = by_service_id
                .get(&b.service_id)
                .and_then(|fe| me.frontends.get_mut(fe));
            let addr = BackendAddr {
                addr: addr_of(b.addr_be),
                port: u16::from_be(b.port_be),
            };
            match owner {
                Some(st) if id != 0 && !st.backends.contains_key(&addr) => {
                    st.backends.insert(addr, (id, b.state));
                    used_backend_ids.insert(id);
                }
                _ => me.cleanup.push(Cleanup::Backend(id)),
            }
        }
        me.service_ids = Ids::from_used(&by_service_id.keys().copied().collect());
        me.backend_ids = Ids::from_used(&used_backend_ids);
        Ok(me)
    }

    /// Makes the maps equal to `desired`, writing only what differs, in an order that
    /// never exposes a half-written Service. A failing frontend is reported in
    /// [`SyncStats::failed`] and does not stop the others.
    pub fn sync(
        &mut self,
        desired: &Desired,
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, ApplyError> {
        let mut w = Writer {
            maps,
            stats: SyncStats::default(),
        };
        for c in std::mem::take(&mut self.cleanup) {
            let r = match &c {
                Cleanup::Service(k) => w.del_service(k),
                Cleanup::Backend(id) => w.del_backend(*id),
            };
            if r.is_err() {
                self.cleanup.push(c);
            }
        }
        // Removals first: they free room for what comes next.
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|fe| !desired.services.contains_key(fe))
            .copied()
            .collect();
        for fe in gone {
            if let Err(e) = self.remove_frontend(&fe, &mut w) {
                let owner = self.frontends.get(&fe).and_then(|s| s.owner.clone());
                w.stats
                    .failed
                    .push(failure(owner.as_ref(), fe.to_string(), &e));
            }
        }
        for (fe, d) in &desired.services {
            if let Err(e) = self.update_frontend(fe, d, &mut w) {
                w.stats
                    .failed
                    .push(failure(Some(&d.owner), fe.to_string(), &e));
                self.undo_partial(fe, &mut w);
            }
        }
        self.sync_markers(&mut w);
        Ok(w.stats)
    }

    /// After a failed update, gives back what the frontend holds beyond its published
    /// state, so that a Service that does not fit does not take room from the others: a
    /// frontend never published is removed entirely, a published one loses the slots past
    /// its count. Best effort; what fails here is retried by the next sync.
    fn undo_partial<M: ServiceMaps>(&mut self, fe: &Frontend, w: &mut Writer<'_, M>) {
        let Some(st) = self.frontends.get_mut(fe) else {
            return;
        };
        if st.head.is_none() {
            let _ = self.remove_frontend(fe, w);
            return;
        }
        let count = st.count();
        while st.slots.len() > count {
            if w.del_service(&key(fe, st.slots.len() as u16)).is_err() {
                return;
            }
            st.slots.pop();
        }
    }

    fn remove_frontend<M: ServiceMaps>(
        &mut self,
        fe: &Frontend,
        w: &mut Writer<'_, M>,
    ) -> Result<(), MapError> {
        let st = self.frontends.get_mut(fe).expect("listed above");
        if st.head.is_some() {
            w.del_service(&key(fe, 0))?;
            st.head = None;
        }
        while let Some(_id) = st.slots.last() {
            w.del_service(&key(fe, st.slots.len() as u16))?;
            st.slots.pop();
        }
        while let Some((addr, (id, _))) = st.backends.pop_first() {
            if let Err(e) = w.del_backend(id) {
                st.backends.insert(addr, (id, 0));
                return Err(e);
            }
            self.backend_ids.release(id);
        }
        let st = self.frontends.remove(fe).expect("present");
        self.service_ids.release(st.service_id);
        Ok(())
    }

    fn update_frontend<M: ServiceMaps>(
        &mut self,
        fe: &Frontend,
        d: &DesiredService,
        w: &mut Writer<'_, M>,
    ) -> Result<(), MapError> {
        let service_ids = &mut self.service_ids;
        let st = self.frontends.entry(*fe).or_insert_with(|| FrontendState {
            service_id: service_ids.alloc(),
            owner: None,
            head: None,
            slots: Vec::new(),
            backends: BTreeMap::new(),
        });
        st.owner = Some(d.owner.clone());
        let backend = |addr: &BackendAddr, state: u8, service_id: u32| Backend {
            addr_be: addr_be(addr.addr),
            port_be: addr.port.to_be(),
            proto: fe.proto.number(),
            state,
            service_id,
        };

        // 1. Backends that new connections may reach must exist, as active, first.
        for addr in &d.active {
            match st.backends.get(addr).copied() {
                Some((_, BACKEND_ACTIVE)) => {}
                Some((id, _)) => {
                    w.put_backend(id, &backend(addr, BACKEND_ACTIVE, st.service_id))?;
                    st.backends.insert(*addr, (id, BACKEND_ACTIVE));
                }
                None => {
                    let id = self.backend_ids.alloc();
                    if let Err(e) = w.put_backend(id, &backend(addr, BACKEND_ACTIVE, st.service_id))
                    {
                        self.backend_ids.release(id);
                        return Err(e);
                    }
                    st.backends.insert(*addr, (id, BACKEND_ACTIVE));
                }
            }
        }
        for addr in &d.terminating {
            if !st.backends.contains_key(addr) {
                let id = self.backend_ids.alloc();
                if let Err(e) =
                    w.put_backend(id, &backend(addr, BACKEND_TERMINATING, st.service_id))
                {
                    self.backend_ids.release(id);
                    return Err(e);
                }
                st.backends.insert(*addr, (id, BACKEND_TERMINATING));
            }
        }

        // 2. The new slot layout: keep unchanged backends where they are, refill holes in
        // place, append the rest, then close remaining holes with the last slot.
        let active_ids: Vec<u32> = d.active.iter().map(|a| st.backends[a].0).collect();
        let wanted: BTreeSet<u32> = active_ids.iter().copied().collect();
        let live = st.count();
        let mut layout: Vec<Option<u32>> = st.slots[..live]
            .iter()
            .map(|id| wanted.contains(id).then_some(*id))
            .collect();
        let placed: BTreeSet<u32> = layout.iter().flatten().copied().collect();
        let mut to_place: VecDeque<u32> = active_ids
            .iter()
            .filter(|id| !placed.contains(id))
            .copied()
            .collect();
        for slot in layout.iter_mut().filter(|s| s.is_none()) {
            match to_place.pop_front() {
                Some(id) => *slot = Some(id),
                None => break,
            }
        }
        layout.extend(to_place.into_iter().map(Some));
        let mut i = 0;
        while i < layout.len() {
            if layout[i].is_none() {
                layout.swap_remove(i);
            } else {
                i += 1;
            }
        }
        let layout: Vec<u32> = layout.into_iter().flatten().collect();
        if layout.len() > usize::from(u16::MAX) {
            return Err(MapError {
                map: lb_common::map_names::SERVICES,
                op: "insert",
                key: fe.to_string(),
                source: std::io::Error::other("more than 65535 ready endpoints"),
            });
        }

        // In-place rewrites, then appended slots.
        for (pos, id) in layout.iter().enumerate() {
            let present = st.slots.get(pos).copied();
            let in_place_ok = pos < live || present.is_some();
            if present == Some(*id) && in_place_ok {
                continue;
            }
            let v = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            w.put_service(&key(fe, pos as u16 + 1), &v)?;
            if pos < st.slots.len() {
                st.slots[pos] = *id;
            } else {
                st.slots.push(*id);
            }
        }

        // 3. Publish the header.
        let head = ServiceValue {
            backend_id: 0,
            count: layout.len() as u16,
            flags: if d.affinity_timeout_s.is_some() {
                SVC_F_AFFINITY
            } else {
                0
            },
            service_id: st.service_id,
            affinity_timeout_s: d.affinity_timeout_s.unwrap_or(0),
        };
        if st.head != Some(head) {
            w.put_service(&key(fe, 0), &head)?;
            st.head = Some(head);
        }

        // 4. Slots past the new count.
        while st.slots.len() > layout.len() {
            w.del_service(&key(fe, st.slots.len() as u16))?;
            st.slots.pop();
        }

        // 5. Backends no slot names any more.
        let known: BTreeSet<&BackendAddr> = d.active.iter().chain(&d.terminating).collect();
        let demote: Vec<(BackendAddr, u32)> = st
            .backends
            .iter()
            .filter(|(a, (_, state))| {
                *state == BACKEND_ACTIVE && known.contains(a) && !d.active.contains(a)
            })
            .map(|(a, (id, _))| (*a, *id))
            .collect();
        for (addr, id) in demote {
            w.put_backend(id, &backend(&addr, BACKEND_TERMINATING, st.service_id))?;
            st.backends.insert(addr, (id, BACKEND_TERMINATING));
        }
        let forget: Vec<(BackendAddr, u32)> = st
            .backends
            .iter()
            .filter(|(a, _)| !known.contains(a))
            .map(|(a, (id, _))| (*a, *id))
            .collect();
        for (addr, id) in forget {
            w.del_backend(id)?;
            st.backends.remove(&addr);
            self.backend_ids.release(id);
        }
        Ok(())
    }

    /// One marker per address that has at least one published frontend.
    fn sync_markers<M: ServiceMaps>(&mut self, w: &mut Writer<'_, M>) {
        let mut wanted: BTreeMap<Ipv4Addr, Option<&ObjectRef>> = BTreeMap::new();
        for (fe, st) in &self.frontends {
            if st.head.is_some() {
                wanted.entry(fe.addr).or_insert(st.owner.as_ref());
            }
        }
        let marker = ServiceValue {
            flags: SVC_F_ADDR_MARKER,
            ..Default::default()
        };
        for (addr, owner) in &wanted {
            if self.markers.contains(addr) {
                continue;
            }
            match w.put_service(&ServiceKey::addr_marker(addr_be(*addr)), &marker) {
                Ok(()) => {
                    self.markers.insert(*addr);
                }
                Err(e) => {
                    w.stats
                        .failed
                        .push(failure(*owner, format!("address marker {addr}"), &e))
                }
            }
        }
        let stale: Vec<Ipv4Addr> = self
            .markers
            .iter()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in stale {
            match w.del_service(&ServiceKey::addr_marker(addr_be(addr))) {
                Ok(()) => {
                    self.markers.remove(&addr);
                }
                Err(e) => w
                    .stats
                    .failed
                    .push(failure(None, format!("address marker {addr}"), &e)),
            }
        }
    }

    /// Number of frontends programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{MemMaps, MemOp};

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn b(last: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 8080,
        }
    }

    fn svc(active: &[u8], terminating: &[u8], affinity: Option<u32>) -> DesiredService {
        DesiredService {
            owner: ObjectRef::new("Service", "default", "web"),
            port_name: String::new(),
            active: active.iter().map(|l| b(*l)).collect(),
            terminating: terminating.iter().map(|l| b(*l)).collect(),
            affinity_timeout_s: affinity,
        }
    }

    fn desired(entries: &[(Frontend, DesiredService)]) -> Desired {
        Desired {
            services: entries.iter().cloned().collect(),
            problems: Vec::new(),
        }
    }

    /// Per frontend (active set, terminating set, affinity), plus the marker addresses.
    type Rendering = (
        BTreeMap<Frontend, (BTreeSet<BackendAddr>, BTreeSet<BackendAddr>, Option<u32>)>,
        BTreeSet<Ipv4Addr>,
    );

    /// Checks the datapath invariant on a map state: every slot 1..=count of every
    /// frontend names an existing backend of that frontend's service.
    fn invariant(m: &MemMaps) -> Result<(), String> {
        for (k, v) in &m.services {
            if k.slot != 0 || v.flags & SVC_F_ADDR_MARKER != 0 {
                continue;
            }
            for slot in 1..=v.count {
                let sk = ServiceKey { slot, ..*k };
                let Some(sv) = m.services.get(&sk) else {
                    return Err(format!("{k:?}: slot {slot} missing (count {})", v.count));
                };
                match m.backends.get(&sv.backend_id) {
                    Some(be) if be.service_id == v.service_id => {}
                    Some(_) => {
                        return Err(format!(
                            "{k:?}: slot {slot} names another service's backend"
                        ));
                    }
                    None => {
                        return Err(format!(
                            "{k:?}: slot {slot} names missing backend {}",
                            sv.backend_id
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Replays the op log from `start`, checking the invariant after every op.
    fn replay_invariant(start: &MemMaps, log: &[MemOp]) {
        let mut m = start.clone();
        m.log.clear();
        for (i, op) in log.iter().enumerate() {
            match op {
                MemOp::PutService(k, v) => {
                    m.services.insert(*k, *v);
                }
                MemOp::DelService(k) => {
                    m.services.remove(k);
                }
                MemOp::PutBackend(id, be) => {
                    m.backends.insert(*id, *be);
                }
                MemOp::DelBackend(id) => {
                    m.backends.remove(id);
                }
            }
            if let Err(e) = invariant(&m) {
                panic!("invariant broken after op {i} ({op:?}): {e}\nlog: {log:#?}");
            }
        }
    }

    /// The maps as an independent rendering of `d` sees them: frontend -> (active backend
    /// set, terminating set, affinity), plus the marker addresses.
    fn rendering(m: &MemMaps) -> Rendering {
        let mut out = BTreeMap::new();
        let mut markers = BTreeSet::new();
        for (k, v) in &m.services {
            if v.flags & SVC_F_ADDR_MARKER != 0 {
                markers.insert(addr_of(k.addr_be));
                continue;
            }
            if k.slot != 0 {
                continue;
            }
            let f = Frontend {
                addr: addr_of(k.addr_be),
                port: u16::from_be(k.port_be),
                proto: protocol(k.proto).unwrap(),
            };
            let mut active = BTreeSet::new();
            for slot in 1..=v.count {
                let id = m.services[&ServiceKey { slot, ..*k }].backend_id;
                let be = m.backends[&id];
                assert_eq!(be.state, BACKEND_ACTIVE, "slot names a terminating backend");
                active.insert(BackendAddr {
                    addr: addr_of(be.addr_be),
                    port: u16::from_be(be.port_be),
                });
            }
            let terminating = m
                .backends
                .values()
                .filter(|be| be.service_id == v.service_id && be.state == BACKEND_TERMINATING)
                .map(|be| BackendAddr {
                    addr: addr_of(be.addr_be),
                    port: u16::from_be(be.port_be),
                })
                .collect();
            let affinity = (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s);
            out.insert(f, (active, terminating, affinity));
        }
        (out, markers)
    }

    fn expected(d: &Desired) -> Rendering {
        let services = d
            .services
            .iter()
            .map(|(f, s)| {
                (
                    *f,
                    (
                        s.active.iter().copied().collect(),
                        s.terminating.iter().copied().collect(),
                        s.affinity_timeout_s,
                    ),
                )
            })
            .collect();
        (services, d.services.keys().map(|f| f.addr).collect())
    }

    fn sync(a: &mut Applier, d: &Desired, m: &mut MemMaps) -> SyncStats {
        let before = m.clone();
        m.log.clear();
        let stats = a.sync(d, m).unwrap();
        replay_invariant(&before, &m.log);
        stats
    }

    #[test]
    fn new_service_writes_backends_then_slots_then_header_then_marker() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let d = desired(&[(fe(10, 80), svc(&[1, 2], &[], None))]);
        let stats = sync(&mut a, &d, &mut m);
        assert_eq!(stats.writes, 6);
        let kinds: Vec<&str> = m
            .log
            .iter()
            .map(|op| match op {
                MemOp::PutBackend(..) => "backend",
                MemOp::PutService(k, _) if k.port_be == 0 => "marker",
                MemOp::PutService(k, _) if k.slot == 0 => "header",
                MemOp::PutService(..) => "slot",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            ["backend", "backend", "slot", "slot", "header", "marker"]
        );
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn same_desired_state_writes_nothing() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let d = desired(&[
            (fe(10, 80), svc(&[1, 2, 3], &[4], Some(60))),
            (fe(11, 53), svc(&[], &[], None)),
        ]);
        sync(&mut a, &d, &mut m);
        let stats = sync(&mut a, &d, &mut m);
        assert_eq!((stats.writes, stats.deletes), (0, 0));
        assert!(m.log.is_empty());
    }

    #[test]
    fn removing_a_backend_refills_its_slot_from_the_last() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        sync(
            &mut a,
            &desired(&[(fe(10, 80), svc(&[1, 2, 3, 4], &[], None))]),
            &mut m,
        );
        let d = desired(&[(fe(10, 80), svc(&[1, 3, 4], &[], None))]);
        sync(&mut a, &d, &mut m);
        // Slot 2 (backend 2) gets the last slot's backend, the header shrinks, slot 4 goes,
        // then backend 2 is deleted: four operations, slots 1 and 3 untouched.
        assert_eq!(m.log.len(), 4, "{:#?}", m.log);
        assert!(matches!(m.log[0], MemOp::PutService(k, _) if k.slot == 2));
        assert!(matches!(m.log[1], MemOp::PutService(k, v) if k.slot == 0 && v.count == 3));
        assert!(matches!(m.log[2], MemOp::DelService(k) if k.slot == 4));
        assert!(matches!(m.log[3], MemOp::DelBackend(_)));
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn replacing_a_backend_rewrites_one_slot_in_place() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        sync(
            &mut a,
            &desired(&[(fe(10, 80), svc(&[1, 2, 3], &[], None))]),
            &mut m,
        );
        let d = desired(&[(fe(10, 80), svc(&[1, 3, 5], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(m.log.len(), 3, "{:#?}", m.log);
        assert!(matches!(m.log[0], MemOp::PutBackend(..)));
        assert!(matches!(m.log[1], MemOp::PutService(k, _) if k.slot == 2));
        assert!(matches!(m.log[2], MemOp::DelBackend(_)));
    }

    #[test]
    fn growing_writes_slots_before_the_count() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        sync(
            &mut a,
            &desired(&[(fe(10, 80), svc(&[1], &[], None))]),
            &mut m,
        );
        let d = desired(&[(fe(10, 80), svc(&[1, 2, 3], &[], None))]);
        sync(&mut a, &d, &mut m);
        let last = m.log.last().unwrap();
        assert!(
            matches!(last, MemOp::PutService(k, v) if k.slot == 0 && v.count == 3),
            "{last:?}"
        );
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn terminating_transitions_keep_backend_ids() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        sync(
            &mut a,
            &desired(&[(fe(10, 80), svc(&[1, 2], &[], None))]),
            &mut m,
        );
        let ids: BTreeMap<u32, Backend> = m.backends.clone();
        let d = desired(&[(fe(10, 80), svc(&[1], &[2], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(rendering(&m), expected(&d));
        assert_eq!(
            m.backends.keys().collect::<Vec<_>>(),
            ids.keys().collect::<Vec<_>>(),
            "same ids"
        );
        let d = desired(&[(fe(10, 80), svc(&[1, 2], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(rendering(&m), expected(&d));
        assert_eq!(
            m.backends.keys().collect::<Vec<_>>(),
            ids.keys().collect::<Vec<_>>(),
            "same ids"
        );
    }

    #[test]
    fn empty_service_has_a_zero_count_header() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let d = desired(&[(fe(10, 80), svc(&[], &[], None))]);
        sync(&mut a, &d, &mut m);
        let head = m.services[&key(&fe(10, 80), 0)];
        assert_eq!(head.count, 0);
        assert_ne!(head.service_id, 0);
    }

    #[test]
    fn removing_a_frontend_deletes_header_first_and_marker_last() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        sync(
            &mut a,
            &desired(&[(fe(10, 80), svc(&[1, 2], &[], None))]),
            &mut m,
        );
        sync(&mut a, &desired(&[]), &mut m);
        assert!(matches!(m.log[0], MemOp::DelService(k) if k.slot == 0 && k.port_be != 0));
        assert!(matches!(m.log.last().unwrap(), MemOp::DelService(k) if k.port_be == 0));
        assert!(m.services.is_empty() && m.backends.is_empty());
    }

    #[test]
    fn marker_stays_while_any_port_of_the_address_remains() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        sync(
            &mut a,
            &desired(&[
                (fe(10, 80), svc(&[1], &[], None)),
                (fe(10, 443), svc(&[1], &[], None)),
            ]),
            &mut m,
        );
        let d = desired(&[(fe(10, 443), svc(&[1], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn adopt_after_restart_keeps_ids_and_writes_nothing() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let d = desired(&[
            (fe(10, 80), svc(&[1, 2, 3], &[4], Some(30))),
            (fe(11, 80), svc(&[5], &[], None)),
            (fe(12, 80), svc(&[], &[], None)),
        ]);
        sync(&mut a, &d, &mut m);
        let snapshot = (m.services.clone(), m.backends.clone());
        let mut b = Applier::adopt(&m).unwrap();
        let stats = sync(&mut b, &d, &mut m);
        assert_eq!((stats.writes, stats.deletes), (0, 0), "{:#?}", m.log);
        // A change after adoption reuses nothing in use.
        let d2 = desired(&[
            (fe(10, 80), svc(&[1, 2, 3, 6], &[4], Some(30))),
            (fe(11, 80), svc(&[5], &[], None)),
            (fe(12, 80), svc(&[], &[], None)),
            (fe(13, 80), svc(&[7], &[], None)),
        ]);
        sync(&mut b, &d2, &mut m);
        assert_eq!(rendering(&m), expected(&d2));
        for (id, be) in &snapshot.1 {
            assert_eq!(m.backends.get(id), Some(be), "backend {id} changed");
        }
    }

    #[test]
    fn adopt_cleans_up_leftovers() {
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        // A slot without header, and a backend of no service.
        m.services.insert(
            key(&f, 3),
            ServiceValue {
                backend_id: 9,
                ..Default::default()
            },
        );
        m.backends.insert(
            9,
            Backend {
                addr_be: 1,
                port_be: 1,
                proto: proto::TCP,
                state: 0,
                service_id: 77,
            },
        );
        let mut a = Applier::adopt(&m).unwrap();
        sync(&mut a, &desired(&[]), &mut m);
        assert!(m.services.is_empty() && m.backends.is_empty());
    }

    #[test]
    fn full_map_fails_one_service_and_keeps_the_others() {
        let mut a = Applier::new();
        let mut m = MemMaps {
            services_capacity: Some(8),
            ..Default::default()
        };
        let d = desired(&[
            (fe(10, 80), svc(&[1, 2], &[], None)),
            (fe(11, 80), svc(&[3, 4, 5, 6, 7, 8], &[], None)),
            (fe(12, 80), svc(&[9], &[], None)),
        ]);
        let stats = sync(&mut a, &d, &mut m);
        assert_eq!(stats.failed.len(), 1, "{:#?}", stats.failed);
        let msg = stats.failed[0].to_string();
        assert!(
            msg.starts_with("Service default/web: 10.96.0.11:80/TCP not programmed"),
            "{msg}"
        );
        assert!(msg.contains("map is full"), "{msg}");
        invariant(&m).unwrap();
        let (got, _) = rendering(&m);
        assert!(got.contains_key(&fe(10, 80)));
        // Room appears: the next sync completes the failed Service.
        m.services_capacity = None;
        let stats = sync(&mut a, &d, &mut m);
        assert!(stats.failed.is_empty());
        assert_eq!(rendering(&m), expected(&d));
    }

    /// xorshift, so the test needs no extra crate and is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_changes_keep_maps_equal_to_desired_and_the_invariant_at_every_step() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        for round in 0..400 {
            let mut entries = Vec::new();
            for svc_nr in 0..rng.below(6) as u8 {
                let mut active = BTreeSet::new();
                let mut terminating = BTreeSet::new();
                for backend in 1..=12u8 {
                    match rng.below(4) {
                        0 | 1 => {
                            active.insert(backend);
                        }
                        2 if rng.below(2) == 0 => {
                            terminating.insert(backend);
                        }
                        _ => {}
                    }
                }
                let affinity = (rng.below(3) == 0).then_some(rng.below(100) as u32 + 1);
                let port = 80 + rng.below(2) as u16;
                let a: Vec<u8> = active.into_iter().collect();
                let t: Vec<u8> = terminating.into_iter().collect();
                entries.push((
                    fe(10 + svc_nr % 3, port + u16::from(svc_nr)),
                    svc(&a, &t, affinity),
                ));
            }
            let d = desired(&entries);
            sync(&mut a, &d, &mut m);
            assert_eq!(rendering(&m), expected(&d), "round {round}");
            // Every 50 rounds, restart the agent.
            if round % 50 == 49 {
                a = Applier::adopt(&m).unwrap();
                let stats = sync(&mut a, &d, &mut m);
                assert_eq!(
                    (stats.writes, stats.deletes),
                    (0, 0),
                    "round {round} after adopt"
                );
            }
        }
    }
}
