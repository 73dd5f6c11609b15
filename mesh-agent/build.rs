//! Locates the eBPF object that `cargo xtask build-ebpf` builds, and embeds its path.
//!
//! There is one definition of how the object is built (xtask build-ebpf). A plain `cargo build`
//! on a fresh checkout stops here with the command to run first. Without the `ebpf` feature
//! (`--no-default-features`) nothing is embedded and nothing is needed.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let object = match std::env::var_os("MESH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(
                std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            );
            manifest.join("../mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nthe eBPF object {} does not exist.\nBuild it first with `cargo xtask build-ebpf` \
             (or `cargo xtask build`), which also installs rust-src and bpf-linker if missing.\n\
             (Only the pure code, without capture: --no-default-features.)\n\n",
            object.display()
        );
    }
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}
