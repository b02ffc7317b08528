//! Map definitions. Names come from `lb_common::map_names`; the loader pins the ones
//! listed in `map_names::PINNED` so that services, backends and live flows outlive the
//! agent process.
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, METRICS_LEN, MaglevTable, ServiceKey,
    ServiceValue, SourceRangeKey, capacity,
};

/// Frontends (slot 0) and their backend slots (1..=count).
#[map(name = "LB4_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

/// Backend id -> backend address.
#[map(name = "LB4_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

/// Connection tracking, forward and reverse entries. LRU so that a full table evicts the
/// least recently used flow instead of refusing new ones.
#[map(name = "LB4_CT")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CT, 0);

/// Client IP -> backend for `sessionAffinity: ClientIP`.
#[map(name = "LB4_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

/// `loadBalancerSourceRanges`: (service id, client prefix) -> 1, for frontends with
/// `SVC_F_SOURCE_RANGES`.
#[map(name = "LB4_SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// Service id -> Maglev lookup table, for frontends with `SVC_F_MAGLEV`. Each value is
/// 64 KiB: not preallocated, so that only the tables in use take memory.
#[map(name = "LB4_MAGLEV")]
pub static MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(capacity::MAGLEV, BPF_F_NO_PREALLOC);

/// `--cluster-cidr`: client prefix -> 1. Written by the agent before it attaches the
/// programs, not pinned (each agent brings its own with its programs).
#[map(name = "LB4_CLUSTER_CIDRS")]
pub static CLUSTER_CIDRS: LpmTrie<u32, u32> = LpmTrie::with_max_entries(capacity::CLUSTER_CIDRS, 0);

/// Per-CPU counters by (reason, direction).
#[map(name = "LB_METRICS")]
pub static METRICS: PerCpuArray<u64> = PerCpuArray::with_max_entries(METRICS_LEN, 0);
