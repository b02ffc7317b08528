//! lb-agent: Kubernetes objects -> desired service tables -> BPF maps.
pub mod maps;
