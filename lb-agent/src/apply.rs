//! Diff the desired tables against what the maps hold, and write only the difference.
//!
//! The [`Applier`] mirrors the maps' content: per frontend its service id, its header
//! (slot 0), its slot vector and its backends. For each frontend that differs, a sync
//! computes the target layout, turns the difference into an ordered list of writes, and
//! runs them. The order is chosen so that after *any prefix* of the writes every slot
//! `1..=count` of every frontend names an existing, active backend of that frontend — the
//! invariant the datapath relies on:
//! 1. new backends (and backends coming back from terminating) are written first;
//! 2. slots that change in place are rewritten;
//! 3. growing: slots past the old count are added, then the header with the new count;
//!    shrinking: the header with the new count, then the slots past it are deleted;
//! 4. backends leaving the active set are marked terminating, and backends no longer known
//!    are deleted, once no slot names them.
//!
//! A frontend's source ranges (`loadBalancerSourceRanges`) are added before its header and
//! removed after it, so a header flagged [`SVC_F_SOURCE_RANGES`] never meets a half-written
//! list that would drop allowed clients; ranges are keyed by service id, which is stable.
//!
//! A frontend's Maglev table (`lb.dev/backend-selection: maglev`) is written after the
//! backends it names and before the header that flags it; it is recomputed (and
//! rewritten) only when the frontend's active backends change, before the backends it
//! no longer names stop being active, and deleted after the header stops flagging it.
//! So every entry of a table the datapath can reach names an active backend.
//!
//! A removed backend's slot is refilled in place by a new backend (swap-in), or by the last
//! slot when the Service shrinks (swap-remove), so the slots of unchanged backends are
//! never written.
//!
//! Every write records its inverse. When a write fails (a full map, say), the writes made
//! so far for that frontend are undone in reverse order — which walks back through the same
//! safe states — so a Service that cannot be programmed keeps its previous entries (or has
//! none, if it is new), and the other Services are still applied.
//!
//! [`Applier::sync`] examines every frontend. [`Applier::sync_frontends`] examines only the
//! ones it is given (those whose desired entry changed, from `state::DesiredCache`) plus
//! the ones an earlier sync failed to program, so a change costs what it touches; both
//! write the same entries in the same order.
//!
//! Service and backend ids are stable for as long as the frontend (and the backend) exist,
//! including across agent restarts ([`Applier::adopt`] reads them back from the pinned
//! maps): connection-tracking and affinity entries in the kernel refer to them.
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_SNAT, BACKEND_TERMINATING, Backend, MAGLEV_TABLE_SIZE,
    SVC_F_ADDR_MARKER, SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_EXTERNAL, SVC_F_INTERNAL_SCOPE,
    SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRangeKey, capacity,
    map_names, proto,
};

use crate::{
    maglev,
    maps::{MapError, ServiceMaps},
    model::{
        BackendAddr, Cidr, Desired, DesiredService, Frontend, FrontendKind, ObjectRef, Problem,
        Protocol, Scope,
    },
};

/// Why the applier could not run at all (as opposed to one Service failing, which is a
/// [`Problem`] in [`SyncStats::failed`]).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The maps could not be read back, at start-up or to resynchronise the mirror after a
    /// write could not be undone.
    #[error("cannot read the service maps back: {0}")]
    Read(#[source] MapError),
}

impl ApplyError {
    /// Stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Read(_) => "read_maps",
        }
    }
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries inserted or replaced (including writes that undid a failed update).
    pub writes: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Services (or address markers) that could not be programmed, with the reason.
    pub failed: Vec<Problem>,
}

/// Smallest-first id allocator; 0 is never handed out.
#[derive(Debug, Clone)]
struct Ids {
    /// Every id below `next` that is not in use.
    free: BTreeSet<u32>,
    next: u32,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            free: BTreeSet::new(),
            next: 1,
        }
    }
}

impl Ids {
    fn from_used(used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(1, |max| max + 1);
        let free = (1..next).filter(|i| !used.contains(i)).collect();
        Self { free, next }
    }

    fn alloc(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        let id = self.next;
        self.next += 1;
        id
    }

    fn release(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

/// What the maps hold for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FrontendState {
    service_id: u32,
    /// The Service that owns the frontend, for messages (unknown right after adoption).
    owner: Option<Arc<ObjectRef>>,
    /// Slot 0, `None` when not in the map.
    head: Option<ServiceValue>,
    /// Backend id of slots `1..=len` as the map holds them (0: slot missing). Its length is
    /// the header's count.
    slots: Vec<u32>,
    /// Every backend of this frontend's service id.
    backends: BTreeMap<u32, Backend>,
    /// The source ranges of this frontend's service id.
    ranges: BTreeSet<Cidr>,
    /// The Maglev table of this frontend's service id: the backend id of each entry.
    maglev: Option<Arc<[u32]>>,
}

impl FrontendState {
    fn empty(service_id: u32) -> Self {
        Self {
            service_id,
            owner: None,
            head: None,
            slots: Vec::new(),
            backends: BTreeMap::new(),
            ranges: BTreeSet::new(),
            maglev: None,
        }
    }

    /// Whether the frontend's address needs a marker (only ClusterIPs get one).
    fn wants_marker(&self) -> bool {
        self.head.is_some_and(|h| h.flags & SVC_F_EXTERNAL == 0)
    }
}

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
    PutBackend(u32, Backend),
    DelBackend(u32),
    PutRange(SourceRangeKey, u8),
    DelRange(SourceRangeKey, u8),
    PutMaglev(u32, Arc<[u32]>),
    DelMaglev(u32),
}

/// A write and the write that undoes it.
#[derive(Debug, Clone)]
struct Step {
    op: Op,
    undo: Op,
}

/// Keeps the maps equal to the desired tables.
#[derive(Debug)]
pub struct Applier {
    frontends: BTreeMap<Frontend, FrontendState>,
    /// Addresses whose marker entry is in the map.
    markers: BTreeSet<Ipv4Addr>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Services entries found at adoption that belong to no usable frontend. They are
    /// outside every frontend's count, so deleting them first is safe.
    stray_services: Vec<ServiceKey>,
    /// Backends found at adoption that belong to no frontend. Deleted at the end of a sync,
    /// once no slot names them; their ids stay reserved until then.
    stray_backends: BTreeSet<u32>,
    /// Source ranges found at adoption that belong to no frontend, deleted by the next
    /// sync before any new frontend could take their service id.
    stray_ranges: Vec<(SourceRangeKey, u8)>,
    /// Maglev tables found at adoption that belong to no frontend, likewise.
    stray_maglev: Vec<u32>,
    /// Frontends whose last update failed, retried by the next [`Applier::sync_frontends`].
    retry: BTreeSet<Frontend>,
    /// Addresses whose marker could not be written or deleted, likewise.
    retry_markers: BTreeSet<Ipv4Addr>,
    /// Map sizes, for messages.
    services_capacity: u32,
    backends_capacity: u32,
    maglev_capacity: u32,
}

impl Default for Applier {
    fn default() -> Self {
        Self {
            frontends: BTreeMap::new(),
            markers: BTreeSet::new(),
            service_ids: Ids::default(),
            backend_ids: Ids::default(),
            stray_services: Vec::new(),
            stray_backends: BTreeSet::new(),
            stray_ranges: Vec::new(),
            stray_maglev: Vec::new(),
            retry: BTreeSet::new(),
            retry_markers: BTreeSet::new(),
            services_capacity: capacity::SERVICES,
            backends_capacity: capacity::BACKENDS,
            maglev_capacity: capacity::MAGLEV,
        }
    }
}

fn addr_of(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn backend_addr(b: &Backend) -> BackendAddr {
    BackendAddr {
        addr: addr_of(b.addr_be),
        port: u16::from_be(b.port_be),
    }
}

/// Key of slot `slot` of `fe`.
fn key(fe: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(addr_be(fe.addr), fe.port.to_be(), fe.proto.number(), slot)
        .with_scope(fe.scope.number())
}

/// Key of the slot at index `i` of a slot vector (slot `i + 1`).
fn slot_key(fe: &Frontend, i: usize) -> ServiceKey {
    // Slot vectors never exceed u16::MAX entries (checked when a target is built, and a
    // count read back from the map is a u16).
    key(fe, u16::try_from(i + 1).unwrap_or(u16::MAX))
}

fn range_key(service_id: u32, c: &Cidr) -> (SourceRangeKey, u8) {
    (
        SourceRangeKey {
            service_id,
            addr_be: addr_be(c.addr),
        },
        c.len,
    )
}

fn slot_value(backend_id: u32) -> ServiceValue {
    ServiceValue {
        backend_id,
        ..Default::default()
    }
}

const MARKER: ServiceValue = ServiceValue {
    backend_id: 0,
    count: 0,
    flags: SVC_F_ADDR_MARKER,
    service_id: 0,
    affinity_timeout_s: 0,
};

fn protocol(nr: u8) -> Option<Protocol> {
    match nr {
        proto::TCP => Some(Protocol::Tcp),
        proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

/// Passes writes to the maps and counts them.
struct Writer<'a, M: ServiceMaps> {
    maps: &'a mut M,
    stats: SyncStats,
}

impl<M: ServiceMaps> Writer<'_, M> {
    fn apply(&mut self, op: &Op) -> Result<(), MapError> {
        match op {
            Op::PutService(k, v) => self.maps.put_service(k, v)?,
            Op::DelService(k) => self.maps.del_service(k)?,
            Op::PutBackend(id, b) => self.maps.put_backend(*id, b)?,
            Op::DelBackend(id) => self.maps.del_backend(*id)?,
            Op::PutRange(k, len) => self.maps.put_source_range(k, *len)?,
            Op::DelRange(k, len) => self.maps.del_source_range(k, *len)?,
            Op::PutMaglev(id, table) => self.maps.put_maglev(*id, table)?,
            Op::DelMaglev(id) => self.maps.del_maglev(*id)?,
        }
        match op {
            Op::PutService(..) | Op::PutBackend(..) | Op::PutRange(..) | Op::PutMaglev(..) => {
                self.stats.writes += 1
            }
            Op::DelService(_) | Op::DelBackend(_) | Op::DelRange(..) | Op::DelMaglev(_) => {
                self.stats.deletes += 1
            }
        }
        Ok(())
    }

    /// Runs `steps` in order. On a failure, undoes the steps already done in reverse order
    /// and returns the error, plus the error of the undo if that failed too.
    fn run(&mut self, steps: &[Step]) -> Result<(), Box<RunError>> {
        for (done, step) in steps.iter().enumerate() {
            if let Err(error) = self.apply(&step.op) {
                for s in steps[..done].iter().rev() {
                    if let Err(undo) = self.apply(&s.undo) {
                        return Err(Box::new(RunError {
                            error,
                            undo: Some(undo),
                        }));
                    }
                }
                return Err(Box::new(RunError { error, undo: None }));
            }
        }
        Ok(())
    }
}

/// A failed write, and the failed undo if the earlier writes could not all be undone.
struct RunError {
    error: MapError,
    undo: Option<MapError>,
}

/// What happened to a frontend whose update failed.
enum Outcome {
    Added,
    Updated,
    Removed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Added => "not added",
            Self::Updated => "not updated (its previous entries stay)",
            Self::Removed => "not removed",
        })
    }
}

impl Applier {
    /// An applier for empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the map sizes used in messages (default: `lb_common::capacity`).
    pub fn with_capacity(mut self, services: u32, backends: u32) -> Self {
        self.services_capacity = services;
        self.backends_capacity = backends;
        self
    }

    /// Sets the Maglev map size used in messages (default: `lb_common::capacity`).
    pub fn with_maglev_capacity(mut self, tables: u32) -> Self {
        self.maglev_capacity = tables;
        self
    }

    /// Rebuilds the mirror from what the maps hold (after an agent restart), so that
    /// service and backend ids stay the same. Entries that fit no consistent frontend
    /// (slots past the count or without a header, a header with a duplicate or zero service
    /// id, backends or Maglev tables of no frontend) are deleted by the first sync; slots
    /// naming a missing backend or another frontend's backend are rewritten by it.
    pub fn adopt(maps: &impl ServiceMaps) -> Result<Self, ApplyError> {
        let services = maps.services().map_err(ApplyError::Read)?;
        let backends = maps.backends().map_err(ApplyError::Read)?;
        let ranges = maps.source_ranges().map_err(ApplyError::Read)?;
        let tables = maps.maglev_tables().map_err(ApplyError::Read)?;
        let mut me = Self::new();
        // Frontend entries grouped by key without the slot; BTreeMap order puts slot 0
        // first, so a stray frontend loses its header before its slots.
        let mut groups: BTreeMap<(u32, u16, u8, u8), BTreeMap<u16, ServiceValue>> = BTreeMap::new();
        for (k, v) in services {
            if k.port_be == 0 && k.proto == 0 {
                if k.slot == 0 && k.scope == 0 && v.flags & SVC_F_ADDR_MARKER != 0 {
                    me.markers.insert(addr_of(k.addr_be));
                } else {
                    me.stray_services.push(k);
                }
                continue;
            }
            groups
                .entry((k.addr_be, k.port_be, k.proto, k.scope))
                .or_default()
                .insert(k.slot, v);
        }
        let mut by_service_id: BTreeMap<u32, Frontend> = BTreeMap::new();
        for ((a, p, pr, scope), slots) in groups {
            let stray_key = |slot: u16| ServiceKey {
                scope,
                ..ServiceKey::new(a, p, pr, slot)
            };
            let fe = protocol(pr)
                .zip(Scope::from_number(scope))
                .map(|(proto, scope)| {
                    Frontend::new(addr_of(a), u16::from_be(p), proto).with_scope(scope)
                });
            let head = slots.get(&0).copied();
            let usable = match (fe, head) {
                (Some(_), Some(h)) => {
                    h.service_id != 0 && !by_service_id.contains_key(&h.service_id)
                }
                _ => false,
            };
            let (Some(fe), Some(head), true) = (fe, head, usable) else {
                me.stray_services
                    .extend(slots.keys().map(|slot| stray_key(*slot)));
                continue;
            };
            let count = head.count;
            let mut st = FrontendState::empty(head.service_id);
            st.head = Some(head);
            st.slots = (1..=count)
                .map(|slot| slots.get(&slot).map_or(0, |v| v.backend_id))
                .collect();
            me.stray_services.extend(
                slots
                    .keys()
                    .filter(|slot| **slot > count)
                    .map(|slot| stray_key(*slot)),
            );
            by_service_id.insert(head.service_id, fe);
            me.frontends.insert(fe, st);
        }
        let mut used_backend_ids = BTreeSet::new();
        for (id, b) in backends {
            used_backend_ids.insert(id);
            let owner = by_service_id
                .get(&b.service_id)
                .and_then(|fe| me.frontends.get_mut(fe));
            match owner {
                Some(st) if id != 0 => {
                    st.backends.insert(id, b);
                }
                _ => {
                    me.stray_backends.insert(id);
                }
            }
        }
        for (k, len) in ranges {
            let owner = by_service_id
                .get(&k.service_id)
                .and_then(|fe| me.frontends.get_mut(fe));
            match owner {
                Some(st) if len <= 32 => {
                    st.ranges.insert(Cidr {
                        addr: addr_of(k.addr_be),
                        len,
                    });
                }
                _ => me.stray_ranges.push((k, len)),
            }
        }
        for (id, table) in tables {
            let owner = by_service_id
                .get(&id)
                .and_then(|fe| me.frontends.get_mut(fe));
            match owner {
                Some(st) if table.len() == MAGLEV_TABLE_SIZE => st.maglev = Some(table),
                _ => me.stray_maglev.push(id),
            }
        }
        me.service_ids = Ids::from_used(&by_service_id.keys().copied().collect());
        me.backend_ids = Ids::from_used(&used_backend_ids);
        Ok(me)
    }

    /// Makes the maps equal to `desired`, writing only what differs, in an order that
    /// never exposes a half-written Service. A Service that cannot be programmed keeps its
    /// previous entries (or gets none), is reported in [`SyncStats::failed`], and does not
    /// stop the others. A second sync with the same `desired` writes nothing.
    pub fn sync(
        &mut self,
        desired: &Desired,
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, ApplyError> {
        self.sync_services(&desired.services, maps)
    }

    /// [`Applier::sync`] over the frontend table alone (what `state::DesiredCache`
    /// holds): the full sync, for the first sync after [`Applier::adopt`] and as a
    /// periodic safety net next to [`Applier::sync_frontends`].
    pub fn sync_services<D: Borrow<DesiredService>>(
        &mut self,
        desired: &BTreeMap<Frontend, D>,
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, ApplyError> {
        // Every frontend is examined, so nothing is left over to retry.
        self.retry.clear();
        self.retry_markers.clear();
        let frontends: BTreeSet<Frontend> = self
            .frontends
            .keys()
            .chain(desired.keys())
            .copied()
            .collect();
        let addrs: BTreeSet<Ipv4Addr> = self
            .markers
            .iter()
            .copied()
            .chain(frontends.iter().map(|fe| fe.addr))
            .collect();
        self.sync_some(desired, frontends, addrs, maps)
    }

    /// Like [`Applier::sync`], but examines only `frontends` (the ones whose desired
    /// entry changed since the last sync, as `state::Delta` lists them), the address
    /// markers of their addresses, and whatever an earlier sync failed to program: its
    /// cost follows the size of the change, not the number of Services. The guarantees
    /// are those of `sync`, provided every other frontend's entry in `desired` is what the
    /// previous sync was given.
    pub fn sync_frontends<D: Borrow<DesiredService>>(
        &mut self,
        desired: &BTreeMap<Frontend, D>,
        frontends: impl IntoIterator<Item = Frontend>,
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, ApplyError> {
        // A frontend that failed before is out of step with its (unchanged) desired entry
        // and would otherwise wait for the next full sync.
        let mut frontends: BTreeSet<Frontend> = frontends.into_iter().collect();
        frontends.append(&mut self.retry);
        let mut addrs: BTreeSet<Ipv4Addr> = frontends.iter().map(|fe| fe.addr).collect();
        addrs.append(&mut self.retry_markers);
        self.sync_some(desired, frontends, addrs, maps)
    }

    /// Brings `frontends` and the markers of `addrs` to `desired`; frontends and markers
    /// that fail are remembered for the next [`Applier::sync_frontends`].
    fn sync_some<D: Borrow<DesiredService>>(
        &mut self,
        desired: &BTreeMap<Frontend, D>,
        frontends: BTreeSet<Frontend>,
        addrs: BTreeSet<Ipv4Addr>,
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, ApplyError> {
        let mut w = Writer {
            maps,
            stats: SyncStats::default(),
        };
        let mut resync = false;

        let stray = std::mem::take(&mut self.stray_services);
        for k in stray {
            if w.apply(&Op::DelService(k)).is_err() {
                self.stray_services.push(k);
            }
        }
        let stray = std::mem::take(&mut self.stray_ranges);
        for (k, len) in stray {
            if w.apply(&Op::DelRange(k, len)).is_err() {
                self.stray_ranges.push((k, len));
            }
        }
        let stray = std::mem::take(&mut self.stray_maglev);
        for id in stray {
            if w.apply(&Op::DelMaglev(id)).is_err() {
                self.stray_maglev.push(id);
            }
        }

        // Removals first, then updates that do not grow, then the rest: what leaves makes
        // room for what comes.
        let mut order: Vec<(u8, Frontend)> = frontends
            .into_iter()
            .filter_map(|fe| {
                let class = match (
                    self.frontends.get(&fe),
                    desired.get(&fe).map(Borrow::borrow),
                ) {
                    (Some(_), None) => 0,
                    (Some(st), Some(d)) => {
                        let grows = d.active.len() > st.slots.len()
                            || d.active.len() + d.terminating.len() > st.backends.len();
                        if grows { 2 } else { 1 }
                    }
                    (None, Some(_)) => 3,
                    (None, None) => return None,
                };
                Some((class, fe))
            })
            .collect();
        order.sort();
        for (_, fe) in order {
            if let Err((problem, undo_failed)) =
                self.apply_frontend(&fe, desired.get(&fe).map(Borrow::borrow), &mut w)
            {
                w.stats.failed.push(problem);
                self.retry.insert(fe);
                resync |= undo_failed;
            }
        }

        self.sync_markers(addrs, &mut w);
        self.delete_stray_backends(&mut w);

        if resync {
            // A write could not be undone: the mirror no longer knows what the maps hold.
            // Read them back; the next sync converges from there.
            let owners: BTreeMap<Frontend, Arc<ObjectRef>> = self
                .frontends
                .iter()
                .filter_map(|(fe, st)| Some((*fe, st.owner.clone()?)))
                .collect();
            let fresh = Self::adopt(&*w.maps)?;
            *self = Self {
                services_capacity: self.services_capacity,
                backends_capacity: self.backends_capacity,
                maglev_capacity: self.maglev_capacity,
                retry: std::mem::take(&mut self.retry),
                retry_markers: std::mem::take(&mut self.retry_markers),
                ..fresh
            };
            for (fe, owner) in owners {
                if let Some(st) = self.frontends.get_mut(&fe) {
                    st.owner = Some(owner);
                }
            }
        }
        Ok(w.stats)
    }

    /// Brings one frontend to `desired` (`None`: removes it). On failure, returns the
    /// problem and whether the partial writes could not be undone.
    fn apply_frontend<M: ServiceMaps>(
        &mut self,
        fe: &Frontend,
        desired: Option<&DesiredService>,
        w: &mut Writer<'_, M>,
    ) -> Result<(), (Problem, bool)> {
        let existing = self.frontends.get(fe);
        let (outcome, owner) = match (existing, desired) {
            (_, Some(d)) if existing.is_none() => (Outcome::Added, Some(d.owner.clone())),
            (_, Some(d)) => (Outcome::Updated, Some(d.owner.clone())),
            (Some(st), None) => (Outcome::Removed, st.owner.clone()),
            (None, None) => return Ok(()),
        };
        let problem = |why: String| {
            let object = owner.as_deref().map_or_else(
                || ObjectRef::new("Frontend", "", &fe.to_string()),
                ObjectRef::clone,
            );
            Problem::new(object, format!("{fe} {outcome}: {why}"))
        };
        let new_service_id = existing.is_none().then(|| self.service_ids.alloc());
        let old = match existing {
            Some(st) => st.clone(),
            None => FrontendState::empty(new_service_id.unwrap_or_default()),
        };
        let mut target = match desired {
            Some(d) => match self.target(fe, &old, d) {
                Ok(t) => t,
                Err(why) => {
                    if let Some(id) = new_service_id {
                        self.service_ids.release(id);
                    }
                    return Err((problem(why), false));
                }
            },
            None => FrontendState::empty(old.service_id),
        };
        target.owner = owner.clone();

        let steps = transition(fe, &old, &target);
        if let Err(failure) = w.run(&steps) {
            let RunError {
                error: e,
                undo: undo_err,
            } = *failure;
            // The maps hold `old` again: give back the ids taken for `target`. If the undo
            // failed, the maps may still name them; they stay taken until the resync
            // reads the maps back.
            if undo_err.is_none() {
                for id in target.backends.keys() {
                    if !old.backends.contains_key(id) {
                        self.backend_ids.release(*id);
                    }
                }
                if let Some(id) = new_service_id {
                    self.service_ids.release(id);
                }
            }
            let mut why = self.describe(&e);
            if let Some(u) = &undo_err {
                why.push_str(&format!(
                    "; undoing its partial update failed too ({}), re-reading the maps",
                    self.describe(u)
                ));
            }
            return Err((problem(why), undo_err.is_some()));
        }
        for id in old.backends.keys() {
            if !target.backends.contains_key(id) {
                self.backend_ids.release(*id);
            }
        }
        if desired.is_some() {
            self.frontends.insert(*fe, target);
        } else {
            self.frontends.remove(fe);
            self.service_ids.release(old.service_id);
        }
        Ok(())
    }

    /// The layout `d` asks for, starting from `old`: known backends keep their ids, and
    /// slots of backends that stay keep their positions.
    fn target(
        &mut self,
        fe: &Frontend,
        old: &FrontendState,
        d: &DesiredService,
    ) -> Result<FrontendState, String> {
        let Ok(count) = u16::try_from(d.active.len()) else {
            return Err(format!(
                "{} ready endpoints, at most {} fit one frontend",
                d.active.len(),
                u16::MAX
            ));
        };
        // Lowest id first: after an inconsistent adoption an address may have two.
        let mut known: BTreeMap<BackendAddr, u32> = BTreeMap::new();
        for (id, b) in &old.backends {
            known.entry(backend_addr(b)).or_insert(*id);
        }
        let mut ids: BTreeMap<BackendAddr, u32> = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let mut active = Vec::with_capacity(d.active.len());
        for (list, state) in [
            (&d.active, BACKEND_ACTIVE),
            (&d.terminating, BACKEND_TERMINATING),
        ] {
            for a in list {
                if ids.contains_key(a) {
                    continue;
                }
                let id = match known.get(a) {
                    Some(id) => *id,
                    None => self.backend_ids.alloc(),
                };
                ids.insert(*a, id);
                if state == BACKEND_ACTIVE {
                    active.push(id);
                }
                backends.insert(
                    id,
                    Backend {
                        addr_be: addr_be(a.addr),
                        port_be: a.port.to_be(),
                        proto: fe.proto.number(),
                        state,
                        service_id: old.service_id,
                        flags: if d.snat.binary_search(a).is_ok() {
                            BACKEND_F_SNAT
                        } else {
                            0
                        },
                        _pad: [0; 3],
                    },
                );
            }
        }
        let slots = layout_slots(&old.slots, &active);
        debug_assert!(slots.len() <= usize::from(count));
        let maglev = (d.maglev && !d.active.is_empty()).then(|| maglev_entries(old, d, &ids));
        let mut flags = 0;
        for (on, flag) in [
            (d.affinity_timeout_s.is_some(), SVC_F_AFFINITY),
            (d.source_ranges.is_some(), SVC_F_SOURCE_RANGES),
            (d.drop_when_empty, SVC_F_DROP_EMPTY),
            (d.kind != FrontendKind::ClusterIp, SVC_F_EXTERNAL),
            (maglev.is_some(), SVC_F_MAGLEV),
            (d.internal_twin, SVC_F_INTERNAL_SCOPE),
        ] {
            if on {
                flags |= flag;
            }
        }
        let head = ServiceValue {
            backend_id: 0,
            count: slots.len() as u16,
            flags,
            service_id: old.service_id,
            affinity_timeout_s: d.affinity_timeout_s.unwrap_or(0),
        };
        Ok(FrontendState {
            service_id: old.service_id,
            owner: None,
            head: Some(head),
            slots,
            backends,
            ranges: d.source_ranges.iter().flatten().copied().collect(),
            maglev,
        })
    }

    /// One marker per address that has at least one ClusterIP frontend in the map; written after
    /// the frontends it covers, deleted after the last of them. Only `addrs` are looked at.
    fn sync_markers<M: ServiceMaps>(&mut self, addrs: BTreeSet<Ipv4Addr>, w: &mut Writer<'_, M>) {
        let mut wanted: Vec<(Ipv4Addr, Option<Arc<ObjectRef>>)> = Vec::new();
        let mut stale: Vec<Ipv4Addr> = Vec::new();
        for addr in addrs {
            // Frontends sort by address first: this range is the address's frontends.
            let first = Frontend::new(addr, 0, Protocol::Tcp);
            let last = Frontend::new(addr, u16::MAX, Protocol::Udp).with_scope(Scope::Internal);
            let covered = self
                .frontends
                .range(first..=last)
                .find(|(_, st)| st.wants_marker());
            match covered {
                Some((_, st)) if !self.markers.contains(&addr) => {
                    wanted.push((addr, st.owner.clone()));
                }
                None if self.markers.contains(&addr) => stale.push(addr),
                _ => {}
            }
        }
        let mut failed = Vec::new();
        for (addr, owner) in wanted {
            match w.apply(&Op::PutService(
                ServiceKey::addr_marker(addr_be(addr)),
                MARKER,
            )) {
                Ok(()) => {
                    self.markers.insert(addr);
                }
                Err(e) => {
                    self.retry_markers.insert(addr);
                    failed.push(Problem::new(
                        owner.as_deref().map_or_else(
                            || ObjectRef::new("Address", "", &addr.to_string()),
                            ObjectRef::clone,
                        ),
                        format!(
                            "address marker {addr} not added (ports it does not define are \
                             passed instead of rejected): {}",
                            self.describe(&e)
                        ),
                    ));
                }
            }
        }
        for addr in stale {
            match w.apply(&Op::DelService(ServiceKey::addr_marker(addr_be(addr)))) {
                Ok(()) => {
                    self.markers.remove(&addr);
                }
                Err(e) => {
                    self.retry_markers.insert(addr);
                    failed.push(Problem::new(
                        ObjectRef::new("Address", "", &addr.to_string()),
                        format!("address marker not removed: {}", self.describe(&e)),
                    ));
                }
            }
        }
        w.stats.failed.extend(failed);
    }

    /// Deletes adopted backends of no frontend, unless a slot still names one (the update
    /// that was to rewrite that slot failed); those wait for the next sync.
    fn delete_stray_backends<M: ServiceMaps>(&mut self, w: &mut Writer<'_, M>) {
        if self.stray_backends.is_empty() {
            return;
        }
        let named: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|st| st.slots.iter().copied())
            .collect();
        let stray = std::mem::take(&mut self.stray_backends);
        for id in stray {
            if !named.contains(&id) && w.apply(&Op::DelBackend(id)).is_ok() {
                self.backend_ids.release(id);
            } else {
                self.stray_backends.insert(id);
            }
        }
    }

    /// A map error in words, with the map's size when it is full.
    fn describe(&self, e: &MapError) -> String {
        if !e.is_full() {
            return e.to_string();
        }
        if e.map == map_names::BACKENDS {
            format!("backends map is full ({} entries)", self.backends_capacity)
        } else if e.map == map_names::MAGLEV {
            format!("Maglev map is full ({} tables)", self.maglev_capacity)
        } else {
            format!("services map is full ({} entries)", self.services_capacity)
        }
    }

    /// Number of frontends in the maps.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// The service id of `fe`, if it is in the maps.
    pub fn service_id(&self, fe: &Frontend) -> Option<u32> {
        self.frontends.get(fe).map(|st| st.service_id)
    }

    /// The Maglev table of `fe` (backend id of each entry), if it has one in the maps.
    pub fn maglev_table(&self, fe: &Frontend) -> Option<Arc<[u32]>> {
        self.frontends.get(fe)?.maglev.clone()
    }

    /// The backend id of `backend` under `fe`, if it is in the maps.
    pub fn backend_id(&self, fe: &Frontend, backend: &BackendAddr) -> Option<u32> {
        let st = self.frontends.get(fe)?;
        st.backends
            .iter()
            .find(|(_, b)| backend_addr(b) == *backend)
            .map(|(id, _)| *id)
    }
}

/// The Maglev table of `d`'s active backends as backend ids (`ids` gives each its id):
/// the one `old` has if the active backends and their ids are the same, as the table
/// depends on nothing else; computed otherwise.
fn maglev_entries(
    old: &FrontendState,
    d: &DesiredService,
    ids: &BTreeMap<BackendAddr, u32>,
) -> Arc<[u32]> {
    if let Some(table) = &old.maglev {
        let had: BTreeMap<BackendAddr, u32> = old
            .backends
            .iter()
            .filter(|(_, b)| b.state == BACKEND_ACTIVE)
            .map(|(id, b)| (backend_addr(b), *id))
            .collect();
        if had.len() == d.active.len() && d.active.iter().all(|a| had.get(a) == ids.get(a)) {
            return table.clone();
        }
    }
    let table = maglev::table(&d.active);
    // Every active backend has an id: `target` gave one to each.
    let by_index: Vec<u32> = table
        .backends
        .iter()
        .map(|a| ids.get(a).copied().unwrap_or(0))
        .collect();
    table
        .entries
        .iter()
        .map(|i| by_index[*i as usize])
        .collect()
}

/// The new slot vector: backends that stay keep their slots, new ones fill the holes of
/// removed ones (swap-in), extra ones are appended, and remaining holes are closed by
/// moving the last slot into them (swap-remove). `active` has no duplicates.
fn layout_slots(old: &[u32], active: &[u32]) -> Vec<u32> {
    let wanted: BTreeSet<u32> = active.iter().copied().collect();
    let mut placed = BTreeSet::new();
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|id| (wanted.contains(id) && placed.insert(*id)).then_some(*id))
        .collect();
    let mut missing = active.iter().filter(|id| !placed.contains(*id)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match missing.next() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    slots.extend(missing.map(Some));
    while let Some(hole) = slots.iter().position(Option::is_none) {
        slots.swap_remove(hole);
    }
    slots.into_iter().flatten().collect()
}

/// The writes that take the maps from `old` to `new` for `fe`, in the safe order (see the
/// module documentation), each with its undo. `new.head == None` removes the frontend:
/// header first, then slots, then backends.
fn transition(fe: &Frontend, old: &FrontendState, new: &FrontendState) -> Vec<Step> {
    let mut steps = Vec::new();
    let prev_slot = |i: usize| match old.slots.get(i) {
        Some(&id) if id != 0 => Op::PutService(slot_key(fe, i), slot_value(id)),
        _ => Op::DelService(slot_key(fe, i)),
    };
    let prev_backend = |id: u32| match old.backends.get(&id) {
        Some(b) => Op::PutBackend(id, *b),
        None => Op::DelBackend(id),
    };
    let head_key = key(fe, 0);
    let prev_head = match old.head {
        Some(h) => Op::PutService(head_key, h),
        None => Op::DelService(head_key),
    };

    // Source ranges the header may ask for, first.
    for c in new.ranges.difference(&old.ranges) {
        let (k, len) = range_key(new.service_id, c);
        steps.push(Step {
            op: Op::PutRange(k, len),
            undo: Op::DelRange(k, len),
        });
    }
    // Backends that slots will name, or that are new, next.
    for (id, b) in &new.backends {
        let before = old.backends.get(id);
        if before != Some(b) && (b.state == BACKEND_ACTIVE || before.is_none()) {
            steps.push(Step {
                op: Op::PutBackend(*id, *b),
                undo: prev_backend(*id),
            });
        }
    }
    // The Maglev table, once the backends it names are written (and before those it no
    // longer names stop being active, below).
    if let Some(table) = &new.maglev
        && old.maglev.as_ref() != Some(table)
    {
        steps.push(Step {
            op: Op::PutMaglev(new.service_id, table.clone()),
            undo: match &old.maglev {
                Some(before) => Op::PutMaglev(old.service_id, before.clone()),
                None => Op::DelMaglev(new.service_id),
            },
        });
    }
    let (old_len, new_len) = (old.slots.len(), new.slots.len());
    for i in 0..old_len.min(new_len) {
        if old.slots[i] != new.slots[i] {
            steps.push(Step {
                op: Op::PutService(slot_key(fe, i), slot_value(new.slots[i])),
                undo: prev_slot(i),
            });
        }
    }
    let head = match (old.head, new.head) {
        (before, Some(h)) if before != Some(h) => Some(Op::PutService(head_key, h)),
        (Some(_), None) => Some(Op::DelService(head_key)),
        _ => None,
    }
    .map(|op| Step {
        op,
        undo: prev_head,
    });
    if new_len > old_len {
        for i in old_len..new_len {
            steps.push(Step {
                op: Op::PutService(slot_key(fe, i), slot_value(new.slots[i])),
                undo: prev_slot(i),
            });
        }
        steps.extend(head);
    } else {
        steps.extend(head);
        for i in new_len..old_len {
            steps.push(Step {
                op: Op::DelService(slot_key(fe, i)),
                undo: prev_slot(i),
            });
        }
    }
    // A table the header no longer asks for.
    if let (Some(before), None) = (&old.maglev, &new.maglev) {
        steps.push(Step {
            op: Op::DelMaglev(old.service_id),
            undo: Op::PutMaglev(old.service_id, before.clone()),
        });
    }
    // Backends leaving the slots become terminating only now, and the ones no longer
    // known go last.
    for (id, b) in &new.backends {
        let before = old.backends.get(id);
        if before.is_some() && before != Some(b) && b.state != BACKEND_ACTIVE {
            steps.push(Step {
                op: Op::PutBackend(*id, *b),
                undo: prev_backend(*id),
            });
        }
    }
    for (id, b) in &old.backends {
        if !new.backends.contains_key(id) {
            steps.push(Step {
                op: Op::DelBackend(*id),
                undo: Op::PutBackend(*id, *b),
            });
        }
    }
    for c in old.ranges.difference(&new.ranges) {
        let (k, len) = range_key(old.service_id, c);
        steps.push(Step {
            op: Op::DelRange(k, len),
            undo: Op::PutRange(k, len),
        });
    }
    steps
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::maps::{MaglevTables, MemMaps, MemOp};
    use lb_common::{SCOPE_ALL, SCOPE_INTERNAL};

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend::new(Ipv4Addr::new(10, 96, 0, last), port, Protocol::Tcp)
    }

    fn b(last: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 8080,
        }
    }

    fn svc(active: &[u8], terminating: &[u8], affinity: Option<u32>) -> DesiredService {
        owned("web", active, terminating, affinity)
    }

    fn owned(
        name: &str,
        active: &[u8],
        terminating: &[u8],
        affinity: Option<u32>,
    ) -> DesiredService {
        DesiredService {
            owner: Arc::new(ObjectRef::new("Service", "default", name)),
            port_name: String::new(),
            active: active.iter().map(|l| b(*l)).collect(),
            terminating: terminating.iter().map(|l| b(*l)).collect(),
            affinity_timeout_s: affinity,
            kind: FrontendKind::ClusterIp,
            source_ranges: None,
            drop_when_empty: false,
            snat: Vec::new(),
            maglev: false,
            internal_twin: false,
        }
    }

    fn desired(entries: &[(Frontend, DesiredService)]) -> Desired {
        Desired {
            services: entries.iter().cloned().collect(),
            problems: Vec::new(),
        }
    }

    type FrontendView = (BTreeSet<BackendAddr>, BTreeSet<BackendAddr>, Option<u32>);

    /// Per frontend (active set, terminating set, affinity), plus the marker addresses.
    type Rendering = (BTreeMap<Frontend, FrontendView>, BTreeSet<Ipv4Addr>);

    /// Checks the datapath invariant on a map state: every slot 1..=count of every
    /// frontend names an existing, active backend of that frontend's service.
    fn invariant(m: &MemMaps) -> Result<(), String> {
        invariant_cached(m, &mut TableIds::default())
    }

    /// The backend ids each Maglev table names (sorted, without duplicates), by table.
    /// The key holds the table, so its address is not reused while it is cached.
    #[derive(Default)]
    struct TableIds(Vec<(Arc<[u32]>, Vec<u32>)>);

    impl TableIds {
        fn of(&mut self, table: &Arc<[u32]>) -> &[u32] {
            let i = match self.0.iter().position(|(t, _)| Arc::ptr_eq(t, table)) {
                Some(i) => i,
                None => {
                    let mut ids = table.to_vec();
                    ids.sort_unstable();
                    ids.dedup();
                    self.0.push((table.clone(), ids));
                    self.0.len() - 1
                }
            };
            &self.0[i].1
        }
    }

    /// [`invariant`], with the ids of the tables seen before in `tables`.
    fn invariant_cached(m: &MemMaps, tables: &mut TableIds) -> Result<(), String> {
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
                    Some(be) if be.service_id != v.service_id => {
                        return Err(format!(
                            "{k:?}: slot {slot} names another service's backend"
                        ));
                    }
                    Some(be) if be.state != BACKEND_ACTIVE => {
                        return Err(format!("{k:?}: slot {slot} names a terminating backend"));
                    }
                    Some(_) => {}
                    None => {
                        return Err(format!(
                            "{k:?}: slot {slot} names missing backend {}",
                            sv.backend_id
                        ));
                    }
                }
            }
            if v.flags & SVC_F_MAGLEV != 0 {
                maglev_invariant(m, k, v, tables)?;
            }
        }
        Ok(())
    }

    /// A header flagged Maglev has a full table whose every entry names an existing,
    /// active backend of its service.
    fn maglev_invariant(
        m: &MemMaps,
        k: &ServiceKey,
        v: &ServiceValue,
        tables: &mut TableIds,
    ) -> Result<(), String> {
        let Some(table) = m.maglev.get(&v.service_id) else {
            return Err(format!("{k:?}: flagged Maglev without a table"));
        };
        if table.len() != MAGLEV_TABLE_SIZE {
            return Err(format!("{k:?}: Maglev table of {} entries", table.len()));
        }
        for id in tables.of(table) {
            match m.backends.get(id) {
                Some(be) if be.service_id == v.service_id && be.state == BACKEND_ACTIVE => {}
                other => {
                    return Err(format!(
                        "{k:?}: Maglev entry names backend {id}, which is {other:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The maps hold a Maglev table for exactly the headers flagged Maglev, which are the
    /// frontends of `d` that ask for it and have active backends; each table names, entry
    /// by entry, the backends that [`maglev::table`] gives for the frontend's active
    /// backends. Frontends missing from the maps (a failed update) are skipped.
    fn check_maglev(m: &MemMaps, d: &Desired) {
        for (f, ds) in &d.services {
            let Some(head) = m.services.get(&key(f, 0)) else {
                continue;
            };
            let want = ds.maglev && !ds.active.is_empty();
            assert_eq!(head.flags & SVC_F_MAGLEV != 0, want, "{f}");
            if !want {
                continue;
            }
            let table = &m.maglev[&head.service_id];
            let reference = maglev::table(&ds.active);
            for (i, id) in table.iter().enumerate() {
                let got = backend_addr(&m.backends[id]);
                assert_eq!(Some(got), reference.backend(i), "{f}: entry {i}");
            }
        }
        let flagged: BTreeSet<u32> = m
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & SVC_F_MAGLEV != 0)
            .map(|(_, v)| v.service_id)
            .collect();
        let present: BTreeSet<u32> = m.maglev.keys().copied().collect();
        assert_eq!(present, flagged);
    }

    /// Replays the op log from `start`, checking the invariant after every op.
    pub(crate) fn replay_invariant(start: &MemMaps, log: &[MemOp]) {
        let mut m = start.clone();
        m.log.clear();
        let mut tables = TableIds::default();
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
                MemOp::PutSourceRange(k, len) => {
                    m.source_ranges.insert((*k, *len));
                }
                MemOp::DelSourceRange(k, len) => {
                    m.source_ranges.remove(&(*k, *len));
                }
                MemOp::PutMaglev(id, table) => {
                    m.maglev.insert(*id, table.clone());
                }
                MemOp::DelMaglev(id) => {
                    m.maglev.remove(id);
                }
            }
            if let Err(e) = invariant_cached(&m, &mut tables) {
                panic!("invariant broken after op {i} ({op:?}): {e}\nlog: {log:#?}");
            }
        }
    }

    /// The maps read back independently of the applier: frontend -> (active backends,
    /// terminating backends, affinity), plus the marker addresses. Panics on entries that
    /// no frontend accounts for.
    fn rendering(m: &MemMaps) -> Rendering {
        let mut out = BTreeMap::new();
        let mut markers = BTreeSet::new();
        let mut accounted_services = BTreeSet::new();
        let mut accounted_backends = BTreeSet::new();
        let mut service_ids = BTreeSet::new();
        for (k, v) in &m.services {
            if v.flags & SVC_F_ADDR_MARKER != 0 {
                assert_eq!((k.port_be, k.proto, k.slot), (0, 0, 0));
                markers.insert(addr_of(k.addr_be));
                accounted_services.insert(*k);
                continue;
            }
            if k.slot != 0 {
                continue;
            }
            assert!(service_ids.insert(v.service_id), "service id reused");
            assert_ne!(v.service_id, 0);
            let f = Frontend::new(
                addr_of(k.addr_be),
                u16::from_be(k.port_be),
                protocol(k.proto).unwrap(),
            )
            .with_scope(Scope::from_number(k.scope).unwrap());
            accounted_services.insert(*k);
            let mut active = BTreeSet::new();
            for slot in 1..=v.count {
                let sk = ServiceKey { slot, ..*k };
                accounted_services.insert(sk);
                let id = m.services[&sk].backend_id;
                let be = m.backends[&id];
                assert_eq!(be.state, BACKEND_ACTIVE, "slot names a terminating backend");
                assert!(active.insert(backend_addr(&be)), "backend in two slots");
            }
            let mut terminating = BTreeSet::new();
            for (id, be) in &m.backends {
                if be.service_id != v.service_id {
                    continue;
                }
                accounted_backends.insert(*id);
                assert_eq!(be.proto, k.proto);
                if be.state == BACKEND_TERMINATING {
                    terminating.insert(backend_addr(be));
                } else {
                    assert!(active.contains(&backend_addr(be)), "unused active backend");
                }
            }
            let affinity = (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s);
            out.insert(f, (active, terminating, affinity));
        }
        let stray: Vec<_> = m
            .services
            .keys()
            .filter(|k| !accounted_services.contains(k))
            .collect();
        assert!(stray.is_empty(), "stray services entries {stray:?}");
        let stray: Vec<_> = m
            .backends
            .keys()
            .filter(|id| !accounted_backends.contains(id))
            .collect();
        assert!(stray.is_empty(), "stray backends {stray:?}");
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
        let markers = d
            .services
            .iter()
            .filter(|(_, s)| s.kind == FrontendKind::ClusterIp)
            .map(|(f, _)| f.addr)
            .collect();
        (services, markers)
    }

    /// Syncs with a fresh op log and checks the invariant after every op.
    fn sync(a: &mut Applier, d: &Desired, m: &mut MemMaps) -> SyncStats {
        let before = m.clone();
        m.log.clear();
        let stats = a.sync(d, m).unwrap();
        replay_invariant(&before, &m.log);
        stats
    }

    fn head(count: u16, service_id: u32) -> ServiceValue {
        ServiceValue {
            backend_id: 0,
            count,
            flags: 0,
            service_id,
            affinity_timeout_s: 0,
        }
    }

    fn backend(last: u8, state: u8, service_id: u32) -> Backend {
        let a = b(last);
        Backend {
            addr_be: addr_be(a.addr),
            port_be: a.port.to_be(),
            proto: proto::TCP,
            state,
            service_id,
            flags: 0,
            _pad: [0; 3],
        }
    }

    fn put_slot(f: &Frontend, slot: u16, id: u32) -> MemOp {
        MemOp::PutService(key(f, slot), slot_value(id))
    }

    #[test]
    fn new_service_writes_backends_then_slots_then_header_then_marker() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        let d = desired(&[(f, svc(&[1, 2], &[3], None))]);
        let stats = sync(&mut a, &d, &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::PutBackend(1, backend(1, BACKEND_ACTIVE, 1)),
                MemOp::PutBackend(2, backend(2, BACKEND_ACTIVE, 1)),
                MemOp::PutBackend(3, backend(3, BACKEND_TERMINATING, 1)),
                put_slot(&f, 1, 1),
                put_slot(&f, 2, 2),
                MemOp::PutService(key(&f, 0), head(2, 1)),
                MemOp::PutService(ServiceKey::addr_marker(addr_be(f.addr)), MARKER),
            ]
        );
        assert_eq!((stats.writes, stats.deletes), (7, 0));
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
        assert_eq!(stats, SyncStats::default());
        assert!(m.log.is_empty());
    }

    #[test]
    fn growing_writes_new_backends_and_slots_before_the_count() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        sync(&mut a, &desired(&[(f, svc(&[1], &[], None))]), &mut m);
        let d = desired(&[(f, svc(&[1, 2, 3], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::PutBackend(2, backend(2, BACKEND_ACTIVE, 1)),
                MemOp::PutBackend(3, backend(3, BACKEND_ACTIVE, 1)),
                put_slot(&f, 2, 2),
                put_slot(&f, 3, 3),
                MemOp::PutService(key(&f, 0), head(3, 1)),
            ]
        );
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn shrinking_moves_the_last_slot_into_the_hole_then_lowers_the_count() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        sync(
            &mut a,
            &desired(&[(f, svc(&[1, 2, 3, 4], &[], None))]),
            &mut m,
        );
        let d = desired(&[(f, svc(&[1, 3, 4], &[], None))]);
        sync(&mut a, &d, &mut m);
        // Slots 1 and 3 are untouched.
        assert_eq!(
            m.log,
            [
                put_slot(&f, 2, 4),
                MemOp::PutService(key(&f, 0), head(3, 1)),
                MemOp::DelService(key(&f, 4)),
                MemOp::DelBackend(2),
            ]
        );
        assert_eq!(rendering(&m), expected(&d));

        // Down to nothing: the count goes to 0 first, the header stays.
        let d = desired(&[(f, svc(&[], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(m.log[0], MemOp::PutService(key(&f, 0), head(0, 1)));
        assert_eq!(m.log.len(), 1 + 3 + 3);
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn replacing_a_backend_rewrites_only_its_slot() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        sync(&mut a, &desired(&[(f, svc(&[1, 2, 3], &[], None))]), &mut m);
        let d = desired(&[(f, svc(&[1, 3, 5], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::PutBackend(4, backend(5, BACKEND_ACTIVE, 1)),
                put_slot(&f, 2, 4),
                MemOp::DelBackend(2),
            ]
        );
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn terminating_transitions_keep_backend_ids_and_order_their_writes() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        sync(&mut a, &desired(&[(f, svc(&[1, 2], &[], None))]), &mut m);

        // Active -> terminating: out of the slots first, then marked.
        let d = desired(&[(f, svc(&[1], &[2], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::PutService(key(&f, 0), head(1, 1)),
                MemOp::DelService(key(&f, 2)),
                MemOp::PutBackend(2, backend(2, BACKEND_TERMINATING, 1)),
            ]
        );
        assert_eq!(rendering(&m), expected(&d));

        // Terminating -> active: marked first, then into a slot.
        let d = desired(&[(f, svc(&[1, 2], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::PutBackend(2, backend(2, BACKEND_ACTIVE, 1)),
                put_slot(&f, 2, 2),
                MemOp::PutService(key(&f, 0), head(2, 1)),
            ]
        );

        // Terminating -> gone.
        sync(&mut a, &desired(&[(f, svc(&[1], &[2], None))]), &mut m);
        let d = desired(&[(f, svc(&[1], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(m.log, [MemOp::DelBackend(2)]);
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn affinity_changes_rewrite_only_the_header() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        sync(&mut a, &desired(&[(f, svc(&[1, 2], &[], None))]), &mut m);
        sync(
            &mut a,
            &desired(&[(f, svc(&[1, 2], &[], Some(30)))]),
            &mut m,
        );
        let want = ServiceValue {
            flags: SVC_F_AFFINITY,
            affinity_timeout_s: 30,
            ..head(2, 1)
        };
        assert_eq!(m.log, [MemOp::PutService(key(&f, 0), want)]);
    }

    #[test]
    fn empty_service_has_a_zero_count_header() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        let d = desired(&[(f, svc(&[], &[4], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(m.services[&key(&f, 0)], head(0, 1));
        assert_eq!(rendering(&m), expected(&d));
    }

    #[test]
    fn removing_a_frontend_deletes_header_then_slots_then_backends_then_marker() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        sync(&mut a, &desired(&[(f, svc(&[1, 2], &[3], None))]), &mut m);
        sync(&mut a, &desired(&[]), &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::DelService(key(&f, 0)),
                MemOp::DelService(key(&f, 1)),
                MemOp::DelService(key(&f, 2)),
                MemOp::DelBackend(1),
                MemOp::DelBackend(2),
                MemOp::DelBackend(3),
                MemOp::DelService(ServiceKey::addr_marker(addr_be(f.addr))),
            ]
        );
        assert!(m.services.is_empty() && m.backends.is_empty());
        assert_eq!(a.frontend_count(), 0);
    }

    #[test]
    fn source_ranges_come_before_the_header_and_go_after_it_and_external_frontends_get_no_marker() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        let cidr = |s: &str| match crate::model::parse_cidr(s) {
            Some(crate::model::ParsedCidr::V4(c)) => c,
            _ => panic!("{s}"),
        };
        let lb = |ranges: Option<Vec<Cidr>>, drop_when_empty: bool| DesiredService {
            kind: FrontendKind::LoadBalancer,
            source_ranges: ranges,
            drop_when_empty,
            ..svc(&[1], &[], None)
        };
        let range = |c: &str| range_key(1, &cidr(c));
        let flags = SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES;
        let with_flags = |flags| ServiceValue {
            flags,
            ..head(1, 1)
        };

        let d = desired(&[(f, lb(Some(vec![cidr("10.1.0.0/16")]), false))]);
        sync(&mut a, &d, &mut m);
        let (k, len) = range("10.1.0.0/16");
        assert_eq!(
            m.log,
            [
                MemOp::PutSourceRange(k, len),
                MemOp::PutBackend(1, backend(1, BACKEND_ACTIVE, 1)),
                put_slot(&f, 1, 1),
                MemOp::PutService(key(&f, 0), with_flags(flags)),
            ],
            "no marker for a LoadBalancer IP"
        );

        // Ranges replaced: the new one first, the old one after the (unchanged) header.
        let d = desired(&[(f, lb(Some(vec![cidr("10.2.0.0/16")]), false))]);
        sync(&mut a, &d, &mut m);
        let (k2, len2) = range("10.2.0.0/16");
        assert_eq!(
            m.log,
            [
                MemOp::PutSourceRange(k2, len2),
                MemOp::DelSourceRange(k, len)
            ]
        );

        // No restriction any more: the header loses its flag, then the range goes.
        let d = desired(&[(f, lb(None, true))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(
            m.log,
            [
                MemOp::PutService(key(&f, 0), with_flags(SVC_F_EXTERNAL | SVC_F_DROP_EMPTY)),
                MemOp::DelSourceRange(k2, len2),
            ]
        );

        // A restart adopts the ranges and the external flag: nothing to write.
        let d = desired(&[(f, lb(Some(vec![cidr("10.3.0.0/16")]), false))]);
        sync(&mut a, &d, &mut m);
        let mut adopted = Applier::adopt(&m).unwrap();
        assert_eq!(adopted.sync(&d, &mut m).unwrap(), SyncStats::default());
        // Removing the frontend removes its range too.
        adopted.sync(&desired(&[]), &mut m).unwrap();
        assert!(m.source_ranges.is_empty() && m.services.is_empty() && m.backends.is_empty());
    }

    #[test]
    fn marker_lives_while_any_frontend_of_its_address_does() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let marker = ServiceKey::addr_marker(addr_be(fe(10, 80).addr));
        let both = desired(&[
            (fe(10, 80), svc(&[1], &[], None)),
            (fe(10, 443), svc(&[1], &[], None)),
        ]);
        sync(&mut a, &both, &mut m);
        let markers = |m: &MemMaps| {
            m.log.iter().filter(|op| matches!(op, MemOp::PutService(k, _) | MemOp::DelService(k) if *k == marker)).count()
        };
        assert_eq!(markers(&m), 1, "one marker for two ports");
        let one = desired(&[(fe(10, 443), svc(&[1], &[], None))]);
        sync(&mut a, &one, &mut m);
        assert_eq!(markers(&m), 0, "marker untouched");
        assert_eq!(rendering(&m), expected(&one));
        sync(&mut a, &desired(&[]), &mut m);
        assert_eq!(m.log.last(), Some(&MemOp::DelService(marker)));
        assert!(m.services.is_empty());
    }

    #[test]
    fn freed_ids_are_reused_lowest_first_and_zero_is_never_used() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let (f, g) = (fe(10, 80), fe(11, 80));
        sync(
            &mut a,
            &desired(&[(f, svc(&[1, 2, 3], &[], None)), (g, svc(&[4], &[], None))]),
            &mut m,
        );
        assert_eq!((a.service_id(&f), a.service_id(&g)), (Some(1), Some(2)));
        assert_eq!(a.backend_id(&g, &b(4)), Some(4));
        sync(&mut a, &desired(&[(g, svc(&[4], &[], None))]), &mut m);
        let h = fe(12, 80);
        sync(
            &mut a,
            &desired(&[(g, svc(&[4], &[], None)), (h, svc(&[7, 8], &[], None))]),
            &mut m,
        );
        assert_eq!(a.service_id(&h), Some(1));
        assert_eq!(a.backend_id(&h, &b(7)), Some(1));
        assert_eq!(a.backend_id(&h, &b(8)), Some(2));
        assert!(!m.backends.contains_key(&0));
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
        // Some churn so that slots are not in address order.
        let d = desired(&[
            (fe(10, 80), svc(&[1, 3, 6], &[4], Some(30))),
            (fe(11, 80), svc(&[5], &[], None)),
            (fe(12, 80), svc(&[], &[], None)),
        ]);
        sync(&mut a, &d, &mut m);
        let snapshot = (m.services.clone(), m.backends.clone());
        let mut b = Applier::adopt(&m).unwrap();
        let stats = sync(&mut b, &d, &mut m);
        assert_eq!(stats, SyncStats::default(), "{:#?}", m.log);
        for f in d.services.keys() {
            assert_eq!(b.service_id(f), a.service_id(f));
        }
        // A change after adoption reuses no id in use and touches no existing backend.
        let d2 = desired(&[
            (fe(10, 80), svc(&[1, 3, 6, 7], &[4], Some(30))),
            (fe(11, 80), svc(&[5], &[], None)),
            (fe(12, 80), svc(&[], &[], None)),
            (fe(13, 80), svc(&[8], &[], None)),
        ]);
        sync(&mut b, &d2, &mut m);
        assert_eq!(rendering(&m), expected(&d2));
        for (id, be) in &snapshot.1 {
            assert_eq!(m.backends.get(id), Some(be), "backend {id} changed");
        }
    }

    #[test]
    fn an_in_cluster_twin_is_keyed_at_its_scope_flagged_on_its_frontend_and_adopted() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let outer = fe(20, 80);
        let twin = outer.with_scope(Scope::Internal);
        let external = |active: &[u8], internal_twin: bool| DesiredService {
            kind: FrontendKind::ExternalIp,
            internal_twin,
            ..svc(active, &[], None)
        };
        let d = desired(&[
            (outer, external(&[], true)),
            (twin, external(&[1, 2], false)),
        ]);
        sync(&mut a, &d, &mut m);
        assert_eq!(rendering(&m), expected(&d));
        let head =
            |m: &MemMaps, scope: u8| m.services.get(&key(&outer, 0).with_scope(scope)).copied();
        let (outer_head, twin_head) = (
            head(&m, SCOPE_ALL).unwrap(),
            head(&m, SCOPE_INTERNAL).unwrap(),
        );
        assert_ne!(outer_head.flags & SVC_F_INTERNAL_SCOPE, 0);
        assert_eq!(twin_head.flags & SVC_F_INTERNAL_SCOPE, 0);
        assert_eq!((outer_head.count, twin_head.count), (0, 2));
        assert_ne!(outer_head.service_id, twin_head.service_id);
        for slot in 1..=2 {
            assert!(m.services.contains_key(&key(&twin, slot)));
            assert!(!m.services.contains_key(&key(&outer, slot)));
        }
        // A restarted agent takes both over as they are.
        let mut b = Applier::adopt(&m).unwrap();
        assert_eq!(
            sync(&mut b, &d, &mut m),
            SyncStats::default(),
            "{:#?}",
            m.log
        );
        assert_eq!(b.service_id(&twin), a.service_id(&twin));
        // The policy back to `Cluster`: the twin goes, the frontend loses its flag.
        let d = desired(&[(outer, external(&[1, 2], false))]);
        sync(&mut b, &d, &mut m);
        assert_eq!(rendering(&m), expected(&d));
        assert_eq!(head(&m, SCOPE_INTERNAL), None);
        assert_eq!(head(&m, SCOPE_ALL).unwrap().flags & SVC_F_INTERNAL_SCOPE, 0);
    }

    #[test]
    fn adopt_repairs_and_cleans_up_leftovers() {
        let mut m = MemMaps::default();
        let (f, g, s) = (fe(10, 80), fe(11, 80), fe(12, 80));
        // f: count 2, slot 2 names a missing backend, a slot 3 past the count.
        m.services.insert(key(&f, 0), head(2, 5));
        m.services.insert(key(&f, 1), slot_value(1));
        m.services.insert(key(&f, 2), slot_value(99));
        m.services.insert(key(&f, 3), slot_value(1));
        m.backends.insert(1, backend(1, BACKEND_ACTIVE, 5));
        // g: a header reusing f's service id, with a slot.
        m.services.insert(key(&g, 0), head(1, 5));
        m.services.insert(key(&g, 1), slot_value(1));
        // A slot without header, a backend of no service, a slot under a marker key.
        m.services.insert(key(&s, 4), slot_value(1));
        m.backends.insert(7, backend(7, BACKEND_ACTIVE, 42));
        m.services.insert(ServiceKey::addr_marker(9), slot_value(0));
        m.services.insert(
            ServiceKey {
                slot: 1,
                ..ServiceKey::addr_marker(9)
            },
            slot_value(0),
        );

        let mut a = Applier::adopt(&m).unwrap();
        let d = desired(&[(f, svc(&[1, 2], &[], None)), (g, svc(&[3], &[], None))]);
        m.log.clear();
        a.sync(&d, &mut m).unwrap();
        assert_eq!(rendering(&m), expected(&d));
        assert_eq!(a.service_id(&f), Some(5), "f keeps its id");
        assert_eq!(a.backend_id(&f, &b(1)), Some(1));
        let pos = |op: &MemOp| m.log.iter().position(|o| o == op).unwrap();
        assert!(
            pos(&MemOp::DelBackend(7)) > pos(&put_slot(&f, 2, 2)),
            "stray backends go last"
        );
        let stats = sync(&mut a, &d, &mut m);
        assert_eq!(stats, SyncStats::default());
    }

    #[test]
    fn full_map_keeps_the_failing_service_as_it_was_and_applies_the_others() {
        let mut a = Applier::new().with_capacity(9, 100);
        let mut m = MemMaps {
            services_capacity: Some(9),
            ..Default::default()
        };
        let (f, g, h) = (fe(10, 80), fe(11, 80), fe(12, 80));
        // f: header + 2 slots + marker = 4 entries; g would need 8; h needs 3.
        let d = desired(&[
            (f, owned("a", &[1, 2], &[], None)),
            (g, owned("b", &[3, 4, 5, 6, 7, 8], &[], None)),
            (h, owned("c", &[9], &[], None)),
        ]);
        let stats = sync(&mut a, &d, &mut m);
        assert_eq!(
            stats
                .failed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["Service default/b: 10.96.0.11:80/TCP not added: services map is full (9 entries)"]
        );
        let (got, markers) = rendering(&m);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            [&f, &h],
            "g left nothing behind"
        );
        assert_eq!(markers.len(), 2);

        // f grows beyond what fits: it keeps exactly its old entries.
        let before = m.clone();
        let d2 = desired(&[
            (f, owned("a", &[1, 2, 10, 11, 12], &[], None)),
            (h, owned("c", &[9], &[], None)),
        ]);
        let stats = sync(&mut a, &d2, &mut m);
        assert_eq!(stats.failed.len(), 1, "{:#?}", stats.failed);
        assert!(
            stats.failed[0]
                .to_string()
                .starts_with("Service default/a: 10.96.0.10:80/TCP not updated"),
            "{}",
            stats.failed[0]
        );
        assert_eq!(
            (&m.services, &m.backends),
            (&before.services, &before.backends)
        );

        // Room appears: the next sync completes, and then nothing is left to do.
        m.services_capacity = None;
        let stats = sync(&mut a, &d, &mut m);
        assert!(stats.failed.is_empty());
        assert_eq!(rendering(&m), expected(&d));
        assert_eq!(sync(&mut a, &d, &mut m), SyncStats::default());
    }

    /// The log as short labels: `b+3`/`b-3` (backend 3 put/deleted), `s2`/`s-2` (slot 2),
    /// `h`/`h-` (header), `m+`/`m-` (Maglev table); markers and ranges are left out.
    fn labels(log: &[MemOp]) -> Vec<String> {
        log.iter()
            .filter_map(|op| {
                Some(match op {
                    MemOp::PutBackend(id, _) => format!("b+{id}"),
                    MemOp::DelBackend(id) => format!("b-{id}"),
                    MemOp::PutService(k, _) if k.port_be == 0 => return None,
                    MemOp::DelService(k) if k.port_be == 0 => return None,
                    MemOp::PutService(k, _) if k.slot == 0 => "h".to_owned(),
                    MemOp::DelService(k) if k.slot == 0 => "h-".to_owned(),
                    MemOp::PutService(k, _) => format!("s{}", k.slot),
                    MemOp::DelService(k) => format!("s-{}", k.slot),
                    MemOp::PutMaglev(..) => "m+".to_owned(),
                    MemOp::DelMaglev(_) => "m-".to_owned(),
                    MemOp::PutSourceRange(..) | MemOp::DelSourceRange(..) => return None,
                })
            })
            .collect()
    }

    #[test]
    fn maglev_table_follows_the_active_backends_in_the_safe_order() {
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        let f = fe(10, 80);
        let maglev = |active: &[u8], terminating: &[u8], affinity| DesiredService {
            maglev: true,
            kind: FrontendKind::NodePort,
            ..svc(active, terminating, affinity)
        };
        // New: backends, then the table, then slots and the header that flags it.
        let d = desired(&[(f, maglev(&[1, 2, 3], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(
            labels(&m.log),
            ["b+1", "b+2", "b+3", "m+", "s1", "s2", "s3", "h"]
        );
        assert_eq!(m.services[&key(&f, 0)].flags, SVC_F_EXTERNAL | SVC_F_MAGLEV);
        check_maglev(&m, &d);
        let table = a.maglev_table(&f).expect("table");
        assert_eq!(*m.maglev[&1], *table);
        // The same backends: nothing written, even when the header changes.
        assert_eq!(sync(&mut a, &d, &mut m), SyncStats::default());
        let d = desired(&[(f, maglev(&[1, 2, 3], &[], Some(60)))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(labels(&m.log), ["h"]);
        // A backend starts terminating: the new table first, then the backend's state.
        let d = desired(&[(f, maglev(&[1, 3], &[2], Some(60)))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(labels(&m.log), ["m+", "s2", "h", "s-3", "b+2"]);
        check_maglev(&m, &d);
        // After a restart the table is adopted as it is: nothing to write.
        let mut a = Applier::adopt(&m).unwrap();
        assert_eq!(sync(&mut a, &d, &mut m), SyncStats::default());
        // No active backend: no table, and the header stops asking for one first.
        let d = desired(&[(f, maglev(&[], &[1, 2, 3], Some(60)))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(labels(&m.log), ["h", "s-1", "s-2", "m-", "b+1", "b+3"]);
        assert!(m.maglev.is_empty());
        // Back, then back to random selection, then gone.
        let d = desired(&[(f, maglev(&[1, 2, 3], &[], None))]);
        sync(&mut a, &d, &mut m);
        check_maglev(&m, &d);
        let random = DesiredService {
            maglev: false,
            ..maglev(&[1, 2, 3], &[], None)
        };
        let d = desired(&[(f, random)]);
        sync(&mut a, &d, &mut m);
        assert_eq!(labels(&m.log), ["h", "m-"]);
        sync(&mut a, &d, &mut m);
        let d = desired(&[(f, maglev(&[1, 2, 3], &[], None))]);
        sync(&mut a, &d, &mut m);
        assert_eq!(labels(&m.log), ["m+", "h"]);
        sync(&mut a, &desired(&[]), &mut m);
        assert_eq!(
            labels(&m.log),
            ["h-", "s-1", "s-2", "s-3", "m-", "b-1", "b-2", "b-3"]
        );
        assert!(m.maglev.is_empty() && m.services.is_empty() && m.backends.is_empty());
    }

    #[test]
    fn adoption_deletes_maglev_tables_of_no_frontend() {
        let mut m = MemMaps::default();
        m.put_maglev(9, &[1; MAGLEV_TABLE_SIZE]).unwrap();
        let mut a = Applier::adopt(&m).unwrap();
        let stats = sync(&mut a, &desired(&[]), &mut m);
        assert_eq!(stats.deletes, 1);
        assert!(m.maglev.is_empty());
    }

    #[test]
    fn layout_keeps_positions_swaps_in_and_swap_removes() {
        assert_eq!(layout_slots(&[1, 2, 3, 4], &[1, 3, 4]), [1, 4, 3]);
        assert_eq!(layout_slots(&[1, 2, 3, 4], &[1, 3, 4, 9]), [1, 9, 3, 4]);
        assert_eq!(layout_slots(&[1, 2, 3, 4], &[4]), [4]);
        assert_eq!(layout_slots(&[1, 2], &[2, 1, 5, 6]), [1, 2, 5, 6]);
        assert_eq!(layout_slots(&[1, 1, 0, 3], &[1, 3]), [1, 3]);
        assert_eq!(layout_slots(&[], &[]), Vec::<u32>::new());
    }

    /// Maps that fail chosen writes, to exercise undo and resync paths.
    struct Flaky {
        inner: MemMaps,
        /// Fail the n-th write from now (0-based) ...
        fail: BTreeSet<usize>,
        writes: usize,
    }

    impl ServiceMaps for Flaky {
        fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
            self.inner.services()
        }
        fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
            self.inner.backends()
        }
        fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), MapError> {
            self.check("insert")?;
            self.inner.put_service(k, v)
        }
        fn del_service(&mut self, k: &ServiceKey) -> Result<(), MapError> {
            self.check("remove")?;
            self.inner.del_service(k)
        }
        fn put_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapError> {
            self.check("insert")?;
            self.inner.put_backend(id, b)
        }
        fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
            self.check("remove")?;
            self.inner.del_backend(id)
        }
        fn source_ranges(&self) -> Result<Vec<(SourceRangeKey, u8)>, MapError> {
            self.inner.source_ranges()
        }
        fn put_source_range(&mut self, k: &SourceRangeKey, len: u8) -> Result<(), MapError> {
            self.check("insert")?;
            self.inner.put_source_range(k, len)
        }
        fn del_source_range(&mut self, k: &SourceRangeKey, len: u8) -> Result<(), MapError> {
            self.check("remove")?;
            self.inner.del_source_range(k, len)
        }
        fn maglev_tables(&self) -> Result<MaglevTables, MapError> {
            self.inner.maglev_tables()
        }
        fn put_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), MapError> {
            self.check("insert")?;
            self.inner.put_maglev(id, table)
        }
        fn del_maglev(&mut self, id: u32) -> Result<(), MapError> {
            self.check("remove")?;
            self.inner.del_maglev(id)
        }
    }

    impl Flaky {
        fn check(&mut self, op: &'static str) -> Result<(), MapError> {
            let n = self.writes;
            self.writes += 1;
            if self.fail.contains(&n) {
                return Err(MapError {
                    map: map_names::SERVICES,
                    op,
                    key: String::new(),
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            Ok(())
        }
    }

    #[test]
    fn a_write_that_cannot_be_undone_makes_the_applier_read_the_maps_back() {
        let mut a = Applier::new();
        let f = fe(10, 80);
        let mut m = Flaky {
            inner: MemMaps::default(),
            fail: BTreeSet::new(),
            writes: 0,
        };
        a.sync(&desired(&[(f, svc(&[1], &[], None))]), &mut m)
            .unwrap();
        // Growing f: backend 2, backend 3, slot 2, slot 3 (fails); the undo of slot 2
        // fails too, so slot 2 stays past the count.
        m.writes = 0;
        m.fail = BTreeSet::from([3, 4]);
        let d = desired(&[(f, svc(&[1, 2, 3], &[], None))]);
        let stats = a.sync(&d, &mut m).unwrap();
        assert_eq!(stats.failed.len(), 1);
        assert!(
            stats.failed[0].to_string().contains("re-reading the maps"),
            "{}",
            stats.failed[0]
        );
        invariant(&m.inner).unwrap();
        m.fail.clear();
        a.sync(&d, &mut m.inner).unwrap();
        assert_eq!(rendering(&m.inner), expected(&d));
        assert_eq!(a.sync(&d, &mut m.inner).unwrap(), SyncStats::default());
    }

    /// xorshift, so the test needs no extra crate and is reproducible.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_desired(rng: &mut Rng) -> Desired {
        let mut entries = Vec::new();
        for nr in 0..rng.below(7) as u8 {
            let mut active = Vec::new();
            let mut terminating = Vec::new();
            for backend in 1..=12u8 {
                match rng.below(5) {
                    0 | 1 => active.push(backend),
                    2 => terminating.push(backend),
                    _ => {}
                }
            }
            let affinity = (rng.below(3) == 0).then(|| rng.below(100) as u32 + 1);
            let port = 80 + rng.below(2) as u16 + u16::from(nr);
            // Rarely: a table costs milliseconds to compute and check in a debug build.
            let maglev = rng.below(6) == 0;
            entries.push((
                fe(10 + nr % 3, port),
                DesiredService {
                    maglev,
                    ..owned(&format!("s{nr}"), &active, &terminating, affinity)
                },
            ));
        }
        desired(&entries)
    }

    #[test]
    fn random_changes_keep_maps_equal_to_desired_and_the_invariant_at_every_step() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut a = Applier::new();
        let mut m = MemMaps::default();
        for round in 0..600 {
            let d = random_desired(&mut rng);
            // Every few rounds the services map is nearly full.
            let tight = rng.below(4) == 0;
            m.services_capacity = tight.then(|| m.services.len() + rng.below(6) as usize);
            let before = rendering(&m).0;
            let stats = sync(&mut a, &d, &mut m);
            assert!(
                tight || stats.failed.is_empty(),
                "round {round}: {:#?}",
                stats.failed
            );
            let (got, markers) = rendering(&m);
            let failed: BTreeSet<Frontend> = d
                .services
                .keys()
                .chain(before.keys())
                .filter(|f| {
                    let prefix = format!("{f} ");
                    stats.failed.iter().any(|p| p.reason.starts_with(&prefix))
                })
                .copied()
                .collect();
            let want = expected(&d).0;
            for f in d.services.keys().chain(before.keys()) {
                if failed.contains(f) {
                    // Old entries, or nothing.
                    assert_eq!(got.get(f), before.get(f), "round {round}: failed {f}");
                } else {
                    assert_eq!(got.get(f), want.get(f), "round {round}: {f}");
                }
            }
            let addrs: BTreeSet<Ipv4Addr> = got.keys().map(|f| f.addr).collect();
            if stats
                .failed
                .iter()
                .any(|p| p.reason.starts_with("address marker"))
            {
                assert!(markers.is_subset(&addrs), "round {round}");
            } else {
                assert_eq!(markers, addrs, "round {round}");
            }

            // A restart now and then: adoption must see exactly what the applier knew.
            m.services_capacity = None;
            if round % 25 == 24 {
                a = Applier::adopt(&m).unwrap();
            }
            let stats = sync(&mut a, &d, &mut m);
            assert!(stats.failed.is_empty(), "round {round}");
            assert_eq!(rendering(&m), expected(&d), "round {round}");
            check_maglev(&m, &d);
            assert_eq!(
                sync(&mut a, &d, &mut m),
                SyncStats::default(),
                "round {round}"
            );
        }
    }

    #[test]
    fn random_failures_never_break_the_invariant_and_always_converge() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut a = Applier::new();
        let mut m = Flaky {
            inner: MemMaps::default(),
            fail: BTreeSet::new(),
            writes: 0,
        };
        for round in 0..300 {
            let d = random_desired(&mut rng);
            m.writes = 0;
            m.fail = (0..3).map(|_| rng.below(40) as usize).collect();
            let before = m.inner.clone();
            m.inner.log.clear();
            a.sync(&d, &mut m).unwrap();
            replay_invariant(&before, &m.inner.log);
            m.fail.clear();
            let stats = sync(&mut a, &d, &mut m.inner);
            assert!(stats.failed.is_empty(), "round {round}");
            assert_eq!(rendering(&m.inner), expected(&d), "round {round}");
            assert_eq!(
                sync(&mut a, &d, &mut m.inner),
                SyncStats::default(),
                "round {round}"
            );
        }
    }
}
