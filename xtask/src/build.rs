//! Building: the eBPF object and the release binaries.

pub fn ebpf() -> anyhow::Result<()> {
    anyhow::bail!("not yet implemented")
}

pub fn all() -> anyhow::Result<()> {
    ebpf()
}
