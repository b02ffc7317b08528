//! lb-agent: Kubernetes objects -> desired service tables -> BPF maps.
pub mod datapath;
pub mod maps;
