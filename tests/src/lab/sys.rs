//! Small system helpers: mounts, entering namespaces and cgroups, processes, atomic writes.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

/// One mount of /proc/self/mountinfo: mount point and filesystem type.
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ...`
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((
                PathBuf::from(unescape_mountinfo(mount_point)),
                fstype.to_owned(),
            ))
        })
        .collect())
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the cgroup v2 hierarchy is mounted (for example `/sys/fs/cgroup` or
/// `/sys/fs/cgroup/unified` in the hybrid layout), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|(_, fstype)| fstype == "cgroup2")
        .map(|(path, _)| path)
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted (nothing of type cgroup2 in /proc/self/mountinfo)"))
}

/// Mounts bpffs at /sys/fs/bpf unless a bpf filesystem is already mounted there.
pub(crate) fn ensure_bpffs() -> Result<()> {
    let target = Path::new("/sys/fs/bpf");
    if mounts()?
        .iter()
        .any(|(path, fstype)| path == target && fstype == "bpf")
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs at /sys/fs/bpf (the agents pin their programs there)")
}

/// Runs a one-shot command and fails with its command line and stderr if it does not succeed.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has entered the network namespace at `netns` (a file such as
/// /run/netns/NAME). Only that thread changes namespace; it ends when `f` returns.
pub(crate) fn in_netns<T, F>(netns: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let file = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let name = netns.display().to_string();
    let handle = std::thread::Builder::new()
        .name("mesh-lab-netns".to_owned())
        .spawn(move || {
            // SAFETY: setns on a valid, open namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!(io::Error::last_os_error()))
                    .with_context(|| format!("setns into network namespace {name}"));
            }
            f()
        })
        .context("spawning a thread to enter a network namespace")?;
    handle.join().map_err(|_| {
        anyhow!(
            "the thread inside network namespace {} panicked",
            netns.display()
        )
    })?
}

/// Writes a sysctl (`net.ipv4.ip_forward`) inside a network namespace.
pub(crate) fn sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let value = value.to_owned();
    let what = format!("sysctl {key}={value} in {}", netns.display());
    // /proc/sys/net resolves against the network namespace of the calling thread.
    in_netns(netns, move || {
        std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
    })
    .context(what)
}

/// Where a child process should run; applied between fork and exec.
#[derive(Debug, Default)]
pub(crate) struct Enter<'a> {
    /// cgroup v2 directory to join (before entering the netns).
    pub cgroup: Option<&'a Path>,
    /// Network namespace file to enter.
    pub netns: Option<&'a Path>,
    /// Start a new session so the child outlives its parent's terminal and process group.
    pub setsid: bool,
}

/// Arranges for `cmd`'s child to join a cgroup, enter a network namespace and/or start a session.
/// Everything that allocates happens here, before the fork; the hook only makes system calls.
pub(crate) fn enter(cmd: &mut Command, how: Enter<'_>) -> Result<()> {
    let procs = how
        .cgroup
        .map(|dir| {
            let path = dir.join("cgroup.procs");
            CString::new(path.as_os_str().as_bytes())
                .with_context(|| format!("cgroup path {} contains a NUL byte", path.display()))
        })
        .transpose()?;
    let netns = how
        .netns
        .map(|path| {
            File::open(path)
                .with_context(|| format!("opening network namespace {}", path.display()))
        })
        .transpose()?;
    let setsid = how.setsid;
    let hook = move || -> io::Result<()> {
        if let Some(procs) = &procs {
            // SAFETY: plain system calls on a NUL-terminated path and a local buffer.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
        }
        if let Some(file) = &netns {
            // SAFETY: the namespace fd stays open as long as the hook (it is owned by it); the
            // File is close-on-exec so the program does not inherit it.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: setsid has no memory-safety preconditions.
        if setsid && unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook only calls async-signal-safe functions (open, write, close, setns,
    // setsid) and does not allocate.
    unsafe { cmd.pre_exec(hook) };
    Ok(())
}

/// True if `pid` exists and is not a zombie.
pub(crate) fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `<pid> (<comm>) <state> ...`; comm may contain spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// True if the command line of `pid` contains `needle` (false if the process is gone).
pub(crate) fn cmdline_contains(pid: u32, needle: &str) -> bool {
    let mut buf = Vec::new();
    File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read_to_end(&mut buf))
        .is_ok()
        && String::from_utf8_lossy(&buf).contains(needle)
}

/// Sends `signal` to `pid`.
pub(crate) fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `done` returns true, polling every 20 ms; false if `timeout` passed first.
pub(crate) fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `create_dir_all` that holds up against another test process's sweep, which removes the
/// labs' shared parents (`/run/mesh-lab`, `<cgroup2>/mesh-lab`, `/sys/fs/bpf/mesh-lab`) once
/// they hold no lab: should a parent vanish between two levels, start over (a few times).
pub(crate) fn create_dirs(path: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 5 => tries += 1,
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, then rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// A random lab id: six lowercase hex digits.
pub(crate) fn random_id() -> Result<String> {
    let mut bytes = [0u8; 3];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a lab id")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn own_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
