//! The programs attached as the agent attaches a pod's (`capture::pins`), to the check's own
//! cgroup and network namespace: cgroup links, sk_lookup, link pinning and link update.

use std::{
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;
use mesh_common::programs;

use super::{Error, Report, Scratch, CGROUP_LINKS, LINK_PINNING, LINK_UPDATE, SK_LOOKUP};
use crate::{
    capture::{
        self,
        ebpf::Loaded,
        pins::{self, Target},
    },
    sys::{bpf, Netns},
};

/// Cgroup links, sk_lookup, link pinning and link update: the programs that loaded
/// (`usable`) attached as to a pod, to the check's cgroup and network namespace.
pub(super) fn check(
    loaded: &mut Loaded,
    scratch: &mut Scratch,
    cgroup2: Option<&Path>,
    netns: &Netns,
    usable: &[&str],
    report: &mut Report,
) {
    let all = [&CGROUP_LINKS, &SK_LOOKUP, &LINK_PINNING, &LINK_UPDATE];
    let skip_all =
        |report: &mut Report, why: &str| all.iter().for_each(|f| report.skip(f.check(), why));
    let Some(root) = cgroup2 else {
        return skip_all(report, "not checked without a cgroup v2 mount (above)");
    };
    // A container may have cgroup v2 read-only (the agent only opens pods' cgroups, it never
    // writes there): the cgroup links are then left to a check on the host, the rest is done.
    let (cgroup, no_cgroup) = match scratch.cgroup(root) {
        Ok(cgroup) => (cgroup, None),
        Err(Error::Scratch { path, source, .. }) if source.raw_os_error() == Some(libc::EROFS) => {
            let why = format!(
                "not checked: the check cannot make its cgroup {}: {source} (a container whose \
                 cgroup v2 mount is read-only?): run `mesh-agent check` on the host",
                path.display()
            );
            match File::open(root) {
                // sk_lookup attaches to the namespace alone; the cgroup stays unused.
                Ok(mount) => (mount, Some(why)),
                Err(source) => {
                    report.fail(
                        "cgroup",
                        Error::Io {
                            what: root.display().to_string(),
                            source,
                        },
                    );
                    return skip_all(report, &why);
                }
            }
        }
        Err(e) => {
            report.fail("cgroup", e);
            return skip_all(
                report,
                "not checked without a cgroup of the check's own (above)",
            );
        }
    };
    let target = Target {
        pod: "mesh-agent check",
        cgroup: &cgroup,
        netns,
    };
    let unusable = |programs: &[&str]| {
        let missing: Vec<&str> = programs
            .iter()
            .filter(|p| !usable.contains(p))
            .copied()
            .collect();
        (!missing.is_empty())
            .then(|| format!("not checked: {} did not load (above)", missing.join(", ")))
    };
    let mut links: Vec<(&'static str, FdLink)> = Vec::new();
    let in_cgroup = [programs::CONNECT4, programs::CONNECT6, programs::SOCK_OPS];
    if let Some(why) = no_cgroup.or_else(|| unusable(&in_cgroup)) {
        report.skip(CGROUP_LINKS.check(), why);
    } else {
        let attached = in_cgroup.iter().try_for_each(|&program| {
            links.push((program, pins::attach_link(loaded, program, &target)?));
            Ok::<(), capture::Error>(())
        });
        match attached {
            Ok(()) => report.ok(
                CGROUP_LINKS.check(),
                format!(
                    "{} attached to a cgroup through bpf links",
                    in_cgroup.join(", ")
                ),
            ),
            Err(e) => report.fail(CGROUP_LINKS.check(), CGROUP_LINKS.missing(attach_detail(e))),
        };
    }
    if let Some(why) = unusable(&[programs::SK_LOOKUP]) {
        report.skip(SK_LOOKUP.check(), why);
    } else {
        match pins::attach_link(loaded, programs::SK_LOOKUP, &target) {
            Ok(link) => {
                links.push((programs::SK_LOOKUP, link));
                report.ok(
                    SK_LOOKUP.check(),
                    "attached to a network namespace through a bpf link",
                )
            }
            Err(e) => report.fail(SK_LOOKUP.check(), SK_LOOKUP.missing(attach_detail(e))),
        };
    }
    if links.is_empty() {
        report.skip(
            LINK_PINNING.check(),
            "not checked: no link was made (above)",
        );
        return report.skip(LINK_UPDATE.check(), "not checked: no link was made (above)");
    }
    pin_and_update(
        loaded,
        links,
        &scratch.dir().join("links"),
        &cgroup,
        netns,
        report,
    );
}

/// Pins the links as the agent pins a pod's, reads them back, replaces the program of each as
/// an upgraded agent does, and unpins them (they detach).
fn pin_and_update(
    loaded: &mut Loaded,
    links: Vec<(&'static str, FdLink)>,
    dir: &Path,
    cgroup: &File,
    netns: &Netns,
    report: &mut Report,
) {
    let pinned = pin_links(links, dir, cgroup, netns);
    let updated = pinned
        .as_ref()
        .map(|pins| {
            pins.iter()
                .try_for_each(|(program, pin)| update(loaded, program, pin))
        })
        .map_err(|_| ());
    // The links detach as their pins go (the probe holds no other descriptor of them).
    let unpinned = pinned.and_then(|pins| {
        pins.iter().try_for_each(|(_, pin)| {
            std::fs::remove_file(pin)
                .map_err(|e| format!("removing the pin {}: {e}", pin.display()))
        })?;
        Ok(pins.len())
    });
    match unpinned {
        Ok(n) => report.ok(
            LINK_PINNING.check(),
            format!(
                "{} pinned, each read back attached where it was attached, and unpinned",
                count(n, "link")
            ),
        ),
        Err(detail) => report.fail(LINK_PINNING.check(), LINK_PINNING.missing(detail)),
    };
    match updated {
        Ok(Ok(())) => report.ok(
            LINK_UPDATE.check(),
            "the program of each pinned link replaced in place, as an upgraded agent does",
        ),
        Ok(Err(detail)) => report.fail(LINK_UPDATE.check(), LINK_UPDATE.missing(detail)),
        Err(()) => {
            report.skip(
                LINK_UPDATE.check(),
                "not checked without pinned links (above)",
            );
            false
        }
    };
}

fn attach_detail(e: capture::Error) -> String {
    match e {
        capture::Error::Attach {
            program, message, ..
        } => format!("attaching {program}: {message}"),
        e => e.to_string(),
    }
}

/// Pins each link as the agent pins a pod's, `dir/<program>`, and reads it back from its pin:
/// it must be attached to the check's cgroup or network namespace.
fn pin_links(
    links: Vec<(&'static str, FdLink)>,
    dir: &Path,
    cgroup: &File,
    netns: &Netns,
) -> Result<Vec<(&'static str, PathBuf)>, String> {
    std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let cgroup_id = cgroup.metadata().map(|m| m.ino()).ok();
    let netns_ino = netns.inode().ok();
    let mut pinned = Vec::with_capacity(links.len());
    for (program, link) in links {
        let pin = dir.join(program);
        // As the agent does: from here on the pin alone holds the link.
        link.pin(&pin).map(drop).map_err(|e| {
            format!(
                "pinning the {program} link at {}: {}",
                pin.display(),
                capture::chain(&e)
            )
        })?;
        let info = bpf::obj_get(&pin)
            .and_then(|fd| bpf::link_info(fd.as_fd()))
            .map_err(|e| format!("opening the link pinned at {}: {e}", pin.display()))?;
        if !pins::attached_to(info.target, cgroup_id, netns_ino) {
            return Err(format!(
                "the {program} link pinned at {} reads back attached to {:?}, not to the check's \
                 cgroup or network namespace",
                pin.display(),
                info.target
            ));
        }
        pinned.push((program, pin));
    }
    Ok(pinned)
}

/// `1 link`, `2 links`.
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Replaces the program of the link pinned at `pin` with the same program, as an upgraded
/// agent replaces those of the links it adopts, and reads the link back.
fn update(loaded: &mut Loaded, program: &'static str, pin: &Path) -> Result<(), String> {
    let link = bpf::obj_get(pin).map_err(|e| format!("opening {}: {e}", pin.display()))?;
    let program = loaded
        .program(program)
        .map_err(|e| e.to_string())?
        .fd()
        .map_err(|e| capture::chain(&e))?;
    bpf::link_update(link.as_fd(), program.as_fd()).map_err(|e| {
        format!(
            "BPF_LINK_UPDATE on the link pinned at {}: {e}",
            pin.display()
        )
    })?;
    let want = bpf::prog_id(program.as_fd()).map_err(|e| format!("reading the program: {e}"))?;
    let runs = bpf::link_info(link.as_fd())
        .map_err(|e| format!("reading the link back: {e}"))?
        .prog_id;
    if runs == want {
        Ok(())
    } else {
        Err(format!(
            "the link runs program {runs} after the update, not {want}"
        ))
    }
}
