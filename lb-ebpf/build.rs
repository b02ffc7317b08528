//! Rebuild the eBPF object when bpf-linker changes (a new linker can emit different
//! code for the same source).
fn main() {
    let Some(path) = std::env::var_os("PATH") else {
        return;
    };
    if let Some(linker) = std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
    {
        println!("cargo::rerun-if-changed={}", linker.display());
    }
}
