//! The guest's initramfs: busybox (static), the host's `ip` and `ss` and the shared libraries of every
//! dynamic binary, the agent, mesh-labtool and the test binaries (stripped of debug info), the
//! kernel's modules the lab needs (`veth`, `bridge`, `tcp_diag` and what they depend on,
//! decompressed), and
//! an `/init` that mounts what the agent needs, runs `mesh-agent check`, then the suites, prints
//! markers the host reads (guest.rs), sends the kept lab logs out on the second serial port and
//! powers off.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::cpio;
use crate::build::run;

/// Modules the lab needs when the kernel builds them as modules (Debian's and Ubuntu's do):
/// veths and the bridge for the lab's network, tcp_diag for `ss` (a test kills a tunnel's
/// socket with `ss -K`, which finds no socket without it).
const WANTED_MODULES: &[&str] = &["veth", "bridge", "tcp_diag"];

/// Where the guest finds the mesh's binaries and the suites.
const GUEST_BIN: &str = "mesh/bin";
const GUEST_TESTS: &str = "mesh/tests";
const GUEST_MODULES: &str = "lib/modules/mesh";

/// What every guest carries, staged once per run.
pub struct Payload {
    /// (path in the guest, file on the host, mode)
    files: Vec<(String, PathBuf, u32)>,
}

/// What to run in the guest.
pub struct Plan {
    pub suites: Vec<String>,
    pub repeat: u32,
    pub filter: Option<String>,
    pub test_threads: u32,
}

/// Stages the binaries into `dir` (stripped copies, refreshed when the build is newer) and
/// lists them with the libraries they need.
pub fn stage(
    dir: &Path,
    agent: &Path,
    labtool: &Path,
    suites: &[(String, PathBuf)],
) -> Result<Payload> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let mut dynamic = Vec::new();
    for (name, src, guest_dir) in [
        ("mesh-agent", agent, GUEST_BIN),
        ("mesh-labtool", labtool, GUEST_BIN),
    ]
    .into_iter()
    .chain(
        suites
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path(), GUEST_TESTS)),
    ) {
        let stripped = dir.join(name);
        strip(src, &stripped)?;
        dynamic.push(stripped.clone());
        files.push((format!("{guest_dir}/{name}"), stripped, 0o755));
    }
    // iproute2's: the lab makes namespaces, veths and the bridge with ip; a test kills a
    // tunnel's sockets with ss -K.
    for tool in ["ip", "ss"] {
        let path = which(tool)?;
        dynamic.push(path.clone());
        files.push((format!("usr/sbin/{tool}"), path, 0o755));
    }
    let busybox = which("busybox")?;
    if !libraries(&busybox)?.is_empty() {
        bail!(
            "{} is dynamically linked: the guest needs the static one (`apt-get install \
             busybox-static`)",
            busybox.display()
        );
    }
    files.push(("bin/busybox".into(), busybox, 0o755));
    let mut libs = BTreeSet::new();
    for binary in &dynamic {
        libs.extend(libraries(binary)?);
    }
    for lib in libs {
        let guest = lib.to_string_lossy().trim_start_matches('/').to_owned();
        files.push((guest, lib, 0o755));
    }
    Ok(Payload { files })
}

/// Copies `src` to `dst` without debug info (a debug build's tests are hundreds of MiB with
/// it), unless `dst` is already newer.
fn strip(src: &Path, dst: &Path) -> Result<()> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(s), Some(d)) = (modified(src), modified(dst)) {
        if d > s {
            return Ok(());
        }
    }
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(dst))
}

fn which(command: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(command))
        .find(|p| p.is_file())
        .with_context(|| format!("{command} is not on PATH"))
}

/// The shared libraries `binary` loads (ldd's resolved paths, the dynamic loader included);
/// empty for a static binary.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot start ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.trim(),
                None => line,
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A kernel unpacked from its packages.
pub struct Unpacked {
    pub vmlinuz: PathBuf,
    /// `uname -r` of it.
    pub release: String,
    /// Decompressed modules to load, in order (dependencies first): (name, file).
    pub modules: Vec<(String, PathBuf)>,
}

/// Unpacks `debs` into `dir` and prepares the image and the modules the lab needs.
pub fn unpack(debs: &[PathBuf], dir: &Path) -> Result<Unpacked> {
    let root = dir.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("emptying {}", root.display()))?;
    }
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("the kernel packages have no {}", boot.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let tree = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|d| d.is_dir())
        .with_context(|| format!("the packages of {release} have no modules directory"))?;
    let modules = module_closure(&tree, &dir.join("modules"))?;
    Ok(Unpacked {
        vmlinuz,
        release,
        modules,
    })
}

/// The wanted modules and their dependencies, decompressed into `out`, dependencies first.
/// A wanted module the kernel builds in (modules.builtin) needs nothing.
fn module_closure(tree: &Path, out: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut index = std::collections::HashMap::new();
    let mut pending = vec![tree.join("kernel")];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = module_name(&path) {
                index.insert(name, path);
            }
        }
    }
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for wanted in WANTED_MODULES {
        if !index.contains_key(*wanted) {
            if builtin
                .lines()
                .any(|l| module_name(Path::new(l)).as_deref() == Some(*wanted))
            {
                continue;
            }
            bail!(
                "{} has neither a module {wanted} nor {wanted} built in: the lab needs it",
                tree.display()
            );
        }
        visit(wanted, &index, out, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &std::collections::HashMap<String, PathBuf>,
    out: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let src = index
        .get(name)
        .with_context(|| format!("module {name} (a dependency) is not in the packages"))?;
    let ko = out.join(format!("{name}.ko"));
    decompress(src, &ko)?;
    for dep in depends(&ko)? {
        visit(&dep, index, out, seen, order)?;
    }
    order.push((name.to_owned(), ko));
    Ok(())
}

/// A module's name from its file (`nf_conntrack` for `nf-conntrack.ko.zst`), or None.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_string_lossy().into_owned();
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn decompress(src: &Path, dst: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::copy(src, dst)
            .map(drop)
            .with_context(|| format!("copying {}", src.display())),
        Some(tool) => {
            let data = Command::new(tool)
                .args(["-d", "-c"])
                .arg(src)
                .output()
                .with_context(|| format!("cannot start {tool}"))?;
            if !data.status.success() {
                bail!("{tool} -d {} failed", src.display());
            }
            std::fs::write(dst, data.stdout).with_context(|| format!("writing {}", dst.display()))
        }
    }
}

/// The `depends=` of a module's .modinfo section.
fn depends(ko: &Path) -> Result<Vec<String>> {
    let info = ko.with_extension("modinfo");
    run(Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.modinfo"])
        .arg(ko)
        .arg(&info))?;
    let bytes = std::fs::read(&info).with_context(|| format!("reading {}", info.display()))?;
    Ok(bytes
        .split(|b| *b == 0)
        .filter_map(|field| std::str::from_utf8(field).ok()?.strip_prefix("depends="))
        .flat_map(|list| list.split(','))
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// Writes the initramfs of one kernel; returns its size.
pub fn write(path: &Path, payload: &Payload, kernel: &Unpacked, plan: &Plan) -> Result<u64> {
    let mut files: Vec<(String, PathBuf, u32)> = payload.files.clone();
    for (name, ko) in &kernel.modules {
        files.push((format!("{GUEST_MODULES}/{name}.ko"), ko.clone(), 0o644));
    }
    let mut dirs = BTreeSet::new();
    for (guest, _, _) in &files {
        let mut p = Path::new(guest).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    for d in [
        "bin", "proc", "sys", "dev", "run", "tmp", "out", "etc", "root",
    ] {
        dirs.insert(d.to_owned());
    }
    let wrap = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", path.display());
    let mut w = cpio::Writer::create(path).map_err(wrap)?;
    for d in &dirs {
        w.dir(d).map_err(wrap)?;
    }
    for (guest, src, mode) in &files {
        w.file(guest, *mode, src)
            .with_context(|| format!("archiving {}", src.display()))?;
    }
    let modules: Vec<&str> = kernel.modules.iter().map(|(n, _)| n.as_str()).collect();
    w.bytes("init", 0o755, init_script(plan, &modules).as_bytes())
        .map_err(wrap)?;
    w.bytes("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")
        .map_err(wrap)?;
    w.bytes("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .map_err(wrap)?;
    w.bytes("etc/group", 0o644, b"root:x:0:\n").map_err(wrap)?;
    w.finish().map_err(wrap)
}

/// The marker every line the host reads starts with.
pub const MARK: &str = "@@mesh-kernels";

/// The guest's `/init`: busybox sh.
fn init_script(plan: &Plan, modules: &[&str]) -> String {
    let filter = plan
        .filter
        .as_deref()
        .map(|f| format!(" '{}'", f.replace('\'', "")))
        .unwrap_or_default();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /out /var
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/{GUEST_BIN} HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -s /run /var/run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
say() {{ echo "{MARK} $*"; }}
say release "$(uname -r)"
for m in {modules}; do
  insmod /{GUEST_MODULES}/$m.ko || say module-failed $m
done
say begin check
mesh-agent check --bpf-dir /sys/fs/bpf/mesh 2>&1
check=$?
say end check rc=$check
if [ "$check" = 0 ]; then
  for run in $(seq 1 {repeat}); do
    for suite in {suites}; do
      say begin suite $suite run=$run
      start=$(date +%s)
      MESH_REQUIRE_PRIVILEGED=1 MESH_AGENT_BIN=/{GUEST_BIN}/mesh-agent \
        MESH_LABTOOL_BIN=/{GUEST_BIN}/mesh-labtool MESH_LAB_FAILURES_DIR=/out/lab-failures \
        RUST_BACKTRACE=1 /{GUEST_TESTS}/$suite --test-threads={threads}{filter} 2>&1
      rc=$?
      say end suite $suite run=$run rc=$rc seconds=$(( $(date +%s) - start ))
    done
  done
fi
dmesg > /out/dmesg.txt
stty -F /dev/ttyS1 raw -echo
tar -cf /dev/ttyS1 -C /out .
say done
sync
poweroff -f
"#,
        modules = modules.join(" "),
        repeat = plan.repeat.max(1),
        suites = plan.suites.join(" "),
        threads = plan.test_threads.max(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_the_resolved_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libelf.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn module_names_ignore_compression_and_dashes() {
        assert_eq!(module_name(Path::new("a/veth.ko")).as_deref(), Some("veth"));
        assert_eq!(
            module_name(Path::new("nf-conntrack.ko.zst")).as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(
            module_name(Path::new("bridge.ko.xz")).as_deref(),
            Some("bridge")
        );
        assert_eq!(module_name(Path::new("modules.dep")), None);
    }
}
