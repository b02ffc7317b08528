//! lb-agent: Kubernetes objects -> desired service tables -> BPF maps.
//!
//! Data flows one way: a source ([`manifests`] or [`kube_source`]) yields objects, [`model::desired_state`]
//! turns them into the tables the datapath needs (a pure function), [`apply::Applier`]
//! diffs them against what the maps hold and writes only the difference through the
//! [`maps::ServiceMaps`] seam, which [`datapath`] implements over the pinned BPF maps.
pub mod apply;
pub mod datapath;
pub mod features;
pub mod frames;
pub mod healthcheck;
pub mod http;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod maps;
pub mod model;
pub mod services;
pub mod slices;
pub mod state;
pub mod telemetry;
