//! `mesh-agent`: the node agent of the mesh, its CNI plugin and its tools. The agent is the
//! `mesh_agent` library (src/lib.rs); its command line is `mesh_agent::cli`.
#![forbid(unsafe_code)]

/// jemalloc with the options of .cargo/config.toml: freed memory goes back to the system
/// within seconds, also while the agent is idle (glibc's malloc kept the high-water mark of a
/// burst of connections: docs/performance.md, "Memory").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    mesh_agent::cli::main(allocator())
}

#[cfg(feature = "jemalloc")]
fn allocator() -> mesh_agent::cli::Allocator {
    use tikv_jemalloc_ctl::{config, opt, version};
    // jemalloc's strings come with their terminating NUL.
    let text =
        |s: tikv_jemalloc_ctl::Result<&'static str>| s.unwrap_or_default().trim_end_matches('\0');
    let mut options = text(config::malloc_conf::read()).to_owned();
    if let Ok(env) = std::env::var("_RJEM_MALLOC_CONF") {
        options = format!("{options} then _RJEM_MALLOC_CONF={env}");
    }
    // "5.3.1-0-g<commit>": the release is enough.
    let release = text(version::read()).split('-').next().unwrap_or_default();
    mesh_agent::cli::Allocator {
        name: format!("jemalloc {release}"),
        options,
        returns_idle_memory: opt::background_thread::read().unwrap_or(false),
    }
}

#[cfg(not(feature = "jemalloc"))]
fn allocator() -> mesh_agent::cli::Allocator {
    mesh_agent::cli::Allocator {
        name: "the C library's malloc".into(),
        options: String::new(),
        returns_idle_memory: false,
    }
}
