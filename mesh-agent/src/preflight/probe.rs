//! The proof that this kernel runs the data path: every map and program of the eBPF object
//! created and loaded (the agent's own code, `capture::ebpf`), then each kernel feature the
//! agent relies on used once, the way the agent uses it (`capture::pins` attaches, as for a
//! pod). Nothing of a running agent is touched: the maps are pinned in a scratch directory of
//! their own (not the agent's), the programs attach to an empty temporary cgroup and to a new
//! network namespace (never the host's), and all of it goes afterwards, also on failure.

mod features;
mod links;

use std::path::Path;

use aya::{maps::MapError, Ebpf, EbpfError};
use mesh_common::{maps, programs};

pub use self::features::{
    Feature, CGROUP_LINKS, FEATURES, LINK_PINNING, LINK_UPDATE, LOOKUP_AND_DELETE, NETNS_COOKIE,
    SK_LOOKUP, SOCKHASH_LISTENERS,
};
use super::{scratch::Scratch, Error, Report};
use crate::{
    capture::{self, ebpf::Loaded},
    sys::bpf,
};

/// Each program's hook (its section in the object) and the Linux release that introduced it.
pub const HOOKS: [(&str, &str, &str); 4] = [
    (programs::CONNECT4, "cgroup/connect4", "4.17"),
    (programs::CONNECT6, "cgroup/connect6", "4.17"),
    (programs::SOCK_OPS, "sockops", "4.13"),
    (programs::SK_LOOKUP, "sk_lookup", "5.9"),
];

/// The `bpf_map_type`s of the object's maps, with the Linux release that introduced each.
const MAP_TYPES: [(u32, &str, &str); 7] = [
    (1, "BPF_MAP_TYPE_HASH", "3.19"),
    (2, "BPF_MAP_TYPE_ARRAY", "3.19"),
    (6, "BPF_MAP_TYPE_PERCPU_ARRAY", "4.6"),
    (9, "BPF_MAP_TYPE_LRU_HASH", "4.10"),
    (11, "BPF_MAP_TYPE_LPM_TRIE", "4.11"),
    (18, "BPF_MAP_TYPE_SOCKHASH", "4.18"),
    (24, "BPF_MAP_TYPE_SK_STORAGE", "5.2"),
];

/// Probes the kernel with `object`, its scratch pins next to `bpf_dir` and its cgroup under
/// `cgroup2`, and removes them; every check goes into `report`.
pub(super) fn run(object: &[u8], bpf_dir: &Path, cgroup2: Option<&Path>, report: &mut Report) {
    let mut scratch = match Scratch::create(bpf_dir) {
        Ok(scratch) => scratch,
        Err(e) => {
            report.fail("scratch", e);
            return;
        }
    };
    probe(object, &mut scratch, cgroup2, report);
    // Every descriptor of the probe (maps, programs, links, the namespace) is closed by now.
    match scratch.remove() {
        Ok(removed) => report.ok("cleanup", removed),
        Err(e) => report.fail("cleanup", e),
    };
}

fn probe(object: &[u8], scratch: &mut Scratch, cgroup2: Option<&Path>, report: &mut Report) {
    let skip = |report: &mut Report, features: &[&Feature], why: &str| {
        features.iter().for_each(|f| report.skip(f.check(), why));
    };
    let mut usable = Vec::new();
    let loaded = match open(object, scratch.dir(), report) {
        Some(mut ebpf) => {
            for (program, hook, since) in HOOKS {
                if load(&mut ebpf, program, (hook, since), report) {
                    usable.push(program);
                }
            }
            Loaded::new(ebpf)
                .map_err(|e| report.fail("maps", e.into()))
                .ok()
        }
        None => {
            for (program, ..) in HOOKS {
                report.skip(
                    format!("program {program}"),
                    "not loaded: the object did not open",
                );
            }
            None
        }
    };
    let netns = features::private_netns()
        .map_err(|e| report.fail("network namespace", e))
        .ok();
    let links = [&CGROUP_LINKS, &SK_LOOKUP, &LINK_PINNING, &LINK_UPDATE];
    match (loaded, netns) {
        (Some((mut loaded, orig_dst, _counters)), Some((netns, listener))) => {
            links::check(&mut loaded, scratch, cgroup2, &netns, &usable, report);
            features::sockhash(&mut loaded, &listener, report);
            let cookie = features::netns_cookie(&listener, report);
            features::lookup_and_delete(&orig_dst, cookie, &listener, report);
        }
        (None, Some((_, listener))) => {
            // Only the netns cookie needs no map.
            let why = "not checked: the object did not load (above)";
            skip(report, &links, why);
            skip(report, &[&SOCKHASH_LISTENERS], why);
            features::netns_cookie(&listener, report);
            skip(report, &[&LOOKUP_AND_DELETE], why);
        }
        (_, None) => skip(
            report,
            &FEATURES,
            "not checked without a network namespace of the check's own (above)",
        ),
    }
}

/// Opens the object as the agent does, with its maps pinned in `dir`; one line per map.
fn open(object: &[u8], dir: &Path, report: &mut Report) -> Option<Ebpf> {
    match capture::ebpf::open(object, dir) {
        Ok(ebpf) => {
            for name in maps::ALL {
                match created(dir, name) {
                    Ok(detail) => report.ok(format!("map {name}"), detail),
                    Err(e) => report.fail(format!("map {name}"), e),
                };
            }
            Some(ebpf)
        }
        Err(EbpfError::MapError(MapError::CreateError { name, io_error })) => {
            let (map_type, since) = declared_type(object, &name);
            report.fail(
                format!("map {name}"),
                Error::MapCreate {
                    map: name.clone(),
                    map_type,
                    since,
                    source: io_error,
                },
            );
            for other in maps::ALL.iter().filter(|m| **m != name) {
                report.skip(
                    format!("map {other}"),
                    format!(
                        "not checked: the object's maps are created together, and {name} failed"
                    ),
                );
            }
            None
        }
        Err(e) => {
            report.fail("eBPF object", Error::Object(capture::chain(&e)));
            None
        }
    }
}

/// What the kernel says of a map pinned in `dir`.
fn created(dir: &Path, name: &str) -> Result<String, Error> {
    use std::os::fd::AsFd as _;
    let pin = dir.join(name);
    let info = bpf::obj_get(&pin)
        .and_then(|fd| bpf::map_info(fd.as_fd()))
        .map_err(|source| Error::Io {
            what: format!("the map pinned at {}", pin.display()),
            source,
        })?;
    let (map_type, _) = map_type(info.map_type);
    Ok(match info.max_entries {
        0 => format!("created and pinned ({map_type})"),
        n => format!("created and pinned ({map_type}, {n} entries)"),
    })
}

/// The type the object declares for map `name`, with the release that introduced it.
fn declared_type(object: &[u8], name: &str) -> (String, String) {
    match aya_obj::Object::parse(object)
        .ok()
        .and_then(|o| o.maps.get(name).map(aya_obj::Map::map_type))
    {
        Some(t) => {
            let (map_type, since) = map_type(t);
            (map_type, format!("Linux {since} and later"))
        }
        None => ("map of a type the object does not say".into(), "?".into()),
    }
}

/// The name of a `bpf_map_type` and the release that introduced it.
pub(super) fn map_type(t: u32) -> (String, &'static str) {
    MAP_TYPES
        .iter()
        .find(|(n, ..)| *n == t)
        .map_or((format!("map type {t}"), "?"), |(_, name, since)| {
            ((*name).to_owned(), since)
        })
}

/// Loads one program as the agent does; one line. Whether it loaded.
fn load(
    ebpf: &mut Ebpf,
    name: &'static str,
    (hook, since): (&'static str, &'static str),
    report: &mut Report,
) -> bool {
    let check = format!("program {name}");
    match capture::ebpf::load_program(ebpf, name) {
        Ok(()) => {
            // The program as the kernel holds it, after the verifier's rewrites.
            let bytes = ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .and_then(|i| i.size_translated());
            report.ok(
                check,
                match bytes {
                    Some(b) => format!("loaded ({hook}, {} instructions)", b / 8),
                    None => format!("loaded ({hook})"),
                },
            )
        }
        Err(capture::Error::Verifier { program, message }) => report.fail(
            check,
            Error::Verifier {
                program,
                hook,
                since,
                log: message,
            },
        ),
        Err(e) => report.fail(check, e.into()),
    }
}

// The probe's tests need the object: the build without it (`--no-default-features`, which
// CI runs as root too) has nothing to probe with.
#[cfg(all(test, feature = "ebpf"))]
mod tests;
