//! Preflight: the commands a task runs that the workspace does not build, looked up on `PATH`
//! (as `command -v` does) before anything starts. Missing ones are installed with apt-get when
//! xtask runs as root on a Debian-like system, as `build-ebpf` installs bpf-linker; otherwise
//! the task stops at once with one error naming each missing command and its Debian package.
//!
//! The lists are the one place these commands are written down: `.ci/run` relies on them.

use std::{ffi::OsStr, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use anyhow::{bail, Result};

use crate::build::run;

/// An external command a task runs, and the Debian package that has it.
#[derive(Debug, PartialEq, Eq)]
pub struct Tool {
    /// The program name, looked up on `PATH`.
    pub command: &'static str,
    /// The Debian (and Ubuntu) package that installs it.
    pub package: &'static str,
    /// Who runs it, for the messages.
    pub why: &'static str,
}

/// Building the agent (every command that builds it): the C parts of its dependencies.
pub const BUILD: &[Tool] = &[
    Tool {
        command: "cc",
        package: "gcc",
        why: "ring and jemalloc (the agent's allocator) compile C with it, and Rust links with it",
    },
    Tool {
        command: "make",
        package: "make",
        why: "jemalloc, the agent's allocator, is built from source with it",
    },
];

/// Every lab: `lab up`, `demo`, `bench` and the end-to-end tests.
pub const LAB: &[Tool] = &[
    Tool {
        command: "ip",
        package: "iproute2",
        why: "the lab makes its namespaces, veths, bridge and routes with it",
    },
    Tool {
        command: "mount",
        package: "mount",
        why: "the lab mounts bpffs at /sys/fs/bpf when it is not mounted",
    },
];

/// The unit tests (`cargo xtask test` checks these with or without root).
pub const UNIT: &[Tool] = &[
    Tool {
        command: "openssl",
        package: "openssl",
        why: "an identity test makes a bring-your-own CA with the openssl CLI",
    },
    Tool {
        command: "cpio",
        package: "cpio",
        why: "a test of xtask reads back the initramfs archive `xtask kernels` writes",
    },
];

/// The end-to-end tests, besides [`LAB`].
pub const TEST: &[Tool] = &[
    Tool {
        command: "dumpcap",
        package: "wireshark-common",
        why: "the HBONE tests capture the underlay with it",
    },
    Tool {
        command: "tshark",
        package: "tshark",
        why: "the HBONE tests check with it that only TLS crosses the underlay",
    },
    Tool {
        command: "nsenter",
        package: "util-linux",
        why: "the tests start dumpcap in the underlay namespace with it",
    },
    Tool {
        command: "sysctl",
        package: "procps",
        why: "a test narrows a pod's local port range with it",
    },
];

/// The lab's Kubernetes mode (`lab up --kube`, the demo, the Kubernetes tests), besides
/// [`LAB`] and [`MANIFESTS`] (python3 for KMock).
pub const KUBE_LAB: &[Tool] = &[Tool {
    command: "curl",
    package: "curl",
    why: "the lab's Kubernetes mode creates and labels objects in the API emulator with it; \
          the waypoint tests and the demo read a waypoint's readiness and metrics in its pod",
}];

/// `cargo xtask manifests` and the Kubernetes discovery tests (both run by `cargo xtask
/// test`): the rest (kubectl, kubernetes-validate; KMock) is pinned in venvs they make
/// (xtask/src/manifests.rs, xtask/src/kmock.rs).
pub const MANIFESTS: &[Tool] = &[Tool {
    command: "python3",
    package: "python3-venv",
    why: "the manifest checks run kubectl and kubernetes-validate, and the Kubernetes \
          discovery tests KMock's API emulator, from venvs it makes",
}];

/// `cargo xtask bench`, besides [`LAB`].
pub const BENCH: &[Tool] = &[
    Tool {
        command: "iperf3",
        package: "iperf3",
        why: "the throughput scenario's load",
    },
    Tool {
        command: "sockperf",
        package: "sockperf",
        why: "the latency scenario measures the direct and the full mesh path with it too, \
              beside mesh-labtool rr, as a load generator users know",
    },
];

/// `cargo xtask kernels`, besides [`BUILD`]: booting other kernels under emulation.
pub const KERNELS: &[Tool] = &[
    Tool {
        command: "qemu-system-x86_64",
        package: "qemu-system-x86",
        why: "each kernel of the matrix boots in it (TCG: no KVM needed)",
    },
    Tool {
        command: "busybox",
        package: "busybox-static",
        why: "the guest's shell and tools (statically linked: the guest has no other libc)",
    },
    Tool {
        command: "objcopy",
        package: "binutils",
        why: "the binaries copied into the guest are stripped of debug info with it, and \
              modules' dependencies read from their .modinfo",
    },
    Tool {
        command: "dpkg-deb",
        package: "dpkg",
        why: "the kernel packages are unpacked with it",
    },
    Tool {
        command: "ldd",
        package: "libc-bin",
        why: "it lists the shared libraries the guest needs for ip, the agent and the tests",
    },
    Tool {
        command: "xz",
        package: "xz-utils",
        why: "Debian's newer kernels compress their modules with xz",
    },
    Tool {
        command: "zstd",
        package: "zstd",
        why: "Ubuntu's newer kernels compress their modules with zstd",
    },
];

/// Makes sure every command of `sets` is on `PATH` for `task`, installing what is missing when
/// it can (root and apt-get), else failing with what to install.
pub fn ensure(task: &str, sets: &[&'static [Tool]]) -> Result<()> {
    let tools: Vec<&Tool> = sets.iter().flat_map(|set| set.iter()).collect();
    let path = std::env::var_os("PATH");
    let absent = missing(&tools, path.as_deref());
    if absent.is_empty() {
        return Ok(());
    }
    let packages = packages(&absent);
    let listed = packages.join(" ");
    let obstacle = if !is_root() {
        Some("xtask installs them only as root")
    } else if !on_path("apt-get", path.as_deref()) {
        Some("apt-get is not available to install them")
    } else {
        None
    };
    if let Some(obstacle) = obstacle {
        bail!(
            "{task} needs commands that are not on PATH: {}; {obstacle}: install them (Debian, \
             Ubuntu: `apt-get install {listed}`) and run this again",
            describe(&absent)
        );
    }
    eprintln!(
        "xtask: installing {listed} with apt-get for {task}, which needs {}",
        describe(&absent)
    );
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still = missing(&tools, path.as_deref());
    if !still.is_empty() {
        bail!(
            "apt-get installed {listed}, yet these are still not on PATH ({}): {}",
            path.as_deref().unwrap_or_default().to_string_lossy(),
            describe(&still)
        );
    }
    Ok(())
}

/// Warns when the filesystem of the build directory has less than `need_gib` GiB free: a build
/// from scratch would stop half-way with "No space left on device", which names neither the
/// task nor how much it needs. Only a warning: what is already built needs less.
pub fn disk_space(task: &str, need_gib: u64) {
    let dir = crate::build::target_dir();
    // The build directory may not exist yet: its nearest existing ancestor has its filesystem.
    let Some(existing) = dir.ancestors().find(|d| d.exists()) else {
        return;
    };
    match free_bytes(existing) {
        Ok(free) if free < need_gib << 30 => eprintln!(
            "xtask: warning: {:.1} GiB free for {} (the build directory); {task} from scratch \
             needs about {need_gib} GiB and would fail with \"No space left on device\": free \
             some (`cargo clean` removes the build directory)",
            free as f64 / f64::from(1u32 << 30),
            dir.display()
        ),
        Ok(_) => {}
        Err(e) => eprintln!("xtask: warning: free space of {}: {e}", existing.display()),
    }
}

/// Bytes an unprivileged user may still write on the filesystem of `path` (statvfs).
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs only writes the struct it is given; an all-zero statvfs is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a live, writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// True when xtask runs as root (it can install packages, and the lab can run).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The tools whose command is not an executable file in any directory of `path` (a `PATH`
/// value; an empty entry is the current directory, as for the shell).
pub fn missing<'a>(tools: &[&'a Tool], path: Option<&OsStr>) -> Vec<&'a Tool> {
    tools
        .iter()
        .copied()
        .filter(|tool| !on_path(tool.command, path))
        .collect()
}

/// True if `command` is an executable file in a directory of `path`.
fn on_path(command: &str, path: Option<&OsStr>) -> bool {
    path.map(std::env::split_paths)
        .into_iter()
        .flatten()
        .any(|dir| executable(&dir.join(command)))
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `dumpcap (Debian package wireshark-common: the HBONE tests capture ...), ...`
fn describe(tools: &[&Tool]) -> String {
    let each: Vec<String> = tools
        .iter()
        .map(|t| format!("{} (Debian package {}: {})", t.command, t.package, t.why))
        .collect();
    each.join(", ")
}

/// The packages of `tools`, each once.
fn packages(tools: &[&Tool]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = tools.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    packages
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsString, fs};

    use super::*;

    const PRESENT: Tool = Tool {
        command: "xtask-preflight-present",
        package: "present-pkg",
        why: "test",
    };
    const NOT_EXECUTABLE: Tool = Tool {
        command: "xtask-preflight-noexec",
        package: "noexec-pkg",
        why: "test",
    };
    const ABSENT: Tool = Tool {
        command: "xtask-preflight-absent",
        package: "absent-pkg",
        why: "test",
    };

    #[test]
    fn finds_executables_on_path_only() {
        let dir = std::env::temp_dir().join(format!("xtask-preflight-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating a temporary directory");
        for (tool, mode) in [(&PRESENT, 0o755), (&NOT_EXECUTABLE, 0o644)] {
            let file = dir.join(tool.command);
            fs::write(&file, "#!/bin/sh\n").expect("writing a fake command");
            fs::set_permissions(&file, fs::Permissions::from_mode(mode))
                .expect("setting the mode of a fake command");
        }
        let tools = [&PRESENT, &NOT_EXECUTABLE, &ABSENT];
        let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).expect("a PATH value");
        let absent = missing(&tools, Some(&path));
        let other_path = OsString::from("/nonexistent");
        let none_found = missing(&tools, Some(&other_path));
        let no_path = missing(&tools, None);
        fs::remove_dir_all(&dir).expect("removing the temporary directory");

        assert_eq!(absent, [&NOT_EXECUTABLE, &ABSENT]);
        assert_eq!(none_found, tools);
        assert_eq!(no_path, tools);
        assert_eq!(packages(&absent), ["absent-pkg", "noexec-pkg"]);
        assert!(describe(&absent).starts_with(
            "xtask-preflight-noexec (Debian package noexec-pkg: test), xtask-preflight-absent"
        ));
    }

    #[test]
    fn the_shell_is_found_on_the_real_path() {
        let sh = Tool {
            command: "sh",
            package: "dash",
            why: "test",
        };
        assert!(missing(&[&sh], std::env::var_os("PATH").as_deref()).is_empty());
    }

    #[test]
    fn free_space_is_read_and_a_missing_path_is_an_error() {
        assert!(free_bytes(Path::new("/")).is_ok_and(|free| free > 0));
        assert!(free_bytes(Path::new("/nonexistent/xtask-test")).is_err());
    }

    #[test]
    fn each_command_is_listed_once() {
        let all: Vec<&str> = [BUILD, UNIT, LAB, TEST, MANIFESTS, KUBE_LAB, BENCH]
            .iter()
            .flat_map(|set| set.iter().map(|t| t.command))
            .collect();
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(all.len(), unique.len(), "{all:?}");
    }
}
