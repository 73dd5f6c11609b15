//! `mesh-agent`: the node agent of the mesh, its CNI plugin and its tools. The agent is the
//! `mesh_agent` library (src/lib.rs); its command line is `mesh_agent::cli`.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    mesh_agent::cli::main()
}
