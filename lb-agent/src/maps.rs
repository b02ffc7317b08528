//! The one seam between the control plane and the kernel: the service and backend tables
//! (with their source ranges and Maglev tables).
//!
//! [`ServiceMaps`] is implemented by the real pinned BPF maps (`datapath::BpfMaps`) and by
//! [`MemMaps`], an in-memory model used by unit tests of the diff-and-apply logic. Nothing
//! above this trait knows it talks to BPF.
use std::{collections::BTreeMap, sync::Arc};

use lb_common::{Backend, ServiceKey, ServiceValue, SourceRangeKey};

/// A map operation that failed, naming the map, the operation and the key.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map} for {key} failed: {source}")]
pub struct MapError {
    /// Map name (see `lb_common::map_names`).
    pub map: &'static str,
    /// "insert", "remove" or "iterate".
    pub op: &'static str,
    /// Human-readable key.
    pub key: String,
    /// What the kernel said.
    #[source]
    pub source: std::io::Error,
}

impl MapError {
    /// Whether the map is full (the kernel answers E2BIG/ENOSPC/ENOMEM to an insert).
    pub fn is_full(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
        )
    }
}

/// Maglev tables as read back: (service id, backend id of each entry).
pub type MaglevTables = Vec<(u32, Arc<[u32]>)>;

/// Read and write access to the services, backends and source ranges maps. A source
/// range is a [`SourceRangeKey`] (service id, network address) plus the client prefix
/// length, 0..=32.
pub trait ServiceMaps {
    /// Every entry of the services map (used to re-adopt state after a restart).
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError>;
    /// Every entry of the backends map.
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError>;
    /// Insert or replace one services entry.
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError>;
    /// Remove one services entry; removing a missing key is not an error.
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    /// Insert or replace one backend.
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError>;
    /// Remove one backend; removing a missing id is not an error.
    fn del_backend(&mut self, id: u32) -> Result<(), MapError>;
    /// Every source range.
    fn source_ranges(&self) -> Result<Vec<(SourceRangeKey, u8)>, MapError>;
    /// Insert one source range.
    fn put_source_range(&mut self, key: &SourceRangeKey, len: u8) -> Result<(), MapError>;
    /// Remove one source range; removing a missing one is not an error.
    fn del_source_range(&mut self, key: &SourceRangeKey, len: u8) -> Result<(), MapError>;
    /// Every Maglev table: service id -> backend id of each entry.
    fn maglev_tables(&self) -> Result<MaglevTables, MapError>;
    /// Insert or replace the Maglev table of `service_id`
    /// ([`lb_common::MAGLEV_TABLE_SIZE`] entries).
    fn put_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), MapError>;
    /// Remove the Maglev table of `service_id`; removing a missing one is not an error.
    fn del_maglev(&mut self, service_id: u32) -> Result<(), MapError>;
}

/// In-memory [`ServiceMaps`] with optional capacities, for tests of the apply logic.
#[derive(Debug, Default, Clone)]
pub struct MemMaps {
    /// Services entries.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Backends.
    pub backends: BTreeMap<u32, Backend>,
    /// Source ranges.
    pub source_ranges: std::collections::BTreeSet<(SourceRangeKey, u8)>,
    /// Maglev tables by service id.
    pub maglev: BTreeMap<u32, Arc<[u32]>>,
    /// Maximum number of services entries (`None`: unbounded).
    pub services_capacity: Option<usize>,
    /// Every write in order, for tests that check ordering and incrementality.
    pub log: Vec<MemOp>,
}

/// One write recorded by [`MemMaps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemOp {
    /// `put_service`.
    PutService(ServiceKey, ServiceValue),
    /// `del_service`.
    DelService(ServiceKey),
    /// `put_backend`.
    PutBackend(u32, Backend),
    /// `del_backend`.
    DelBackend(u32),
    /// `put_source_range`.
    PutSourceRange(SourceRangeKey, u8),
    /// `del_source_range`.
    DelSourceRange(SourceRangeKey, u8),
    /// `put_maglev`.
    PutMaglev(u32, Arc<[u32]>),
    /// `del_maglev`.
    DelMaglev(u32),
}

impl ServiceMaps for MemMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        if let Some(cap) = self.services_capacity
            && !self.services.contains_key(key)
            && self.services.len() >= cap
        {
            return Err(MapError {
                map: lb_common::map_names::SERVICES,
                op: "insert",
                key: format!("{key:?}"),
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.services.insert(*key, *value);
        self.log.push(MemOp::PutService(*key, *value));
        Ok(())
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.services.remove(key);
        self.log.push(MemOp::DelService(*key));
        Ok(())
    }

    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError> {
        self.backends.insert(id, *backend);
        self.log.push(MemOp::PutBackend(id, *backend));
        Ok(())
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.backends.remove(&id);
        self.log.push(MemOp::DelBackend(id));
        Ok(())
    }

    fn source_ranges(&self) -> Result<Vec<(SourceRangeKey, u8)>, MapError> {
        Ok(self.source_ranges.iter().copied().collect())
    }

    fn put_source_range(&mut self, key: &SourceRangeKey, len: u8) -> Result<(), MapError> {
        self.source_ranges.insert((*key, len));
        self.log.push(MemOp::PutSourceRange(*key, len));
        Ok(())
    }

    fn del_source_range(&mut self, key: &SourceRangeKey, len: u8) -> Result<(), MapError> {
        self.source_ranges.remove(&(*key, len));
        self.log.push(MemOp::DelSourceRange(*key, len));
        Ok(())
    }

    fn maglev_tables(&self) -> Result<MaglevTables, MapError> {
        Ok(self.maglev.iter().map(|(k, v)| (*k, v.clone())).collect())
    }

    fn put_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), MapError> {
        let table: Arc<[u32]> = table.into();
        self.maglev.insert(service_id, table.clone());
        self.log.push(MemOp::PutMaglev(service_id, table));
        Ok(())
    }

    fn del_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        self.maglev.remove(&service_id);
        self.log.push(MemOp::DelMaglev(service_id));
        Ok(())
    }
}
