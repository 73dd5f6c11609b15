//! The probe against the running kernel (root only: skipped loudly otherwise, a failure with
//! MESH_REQUIRE_PRIVILEGED=1), with the embedded object and with copies of it broken on
//! purpose, and what it says of the object without running it.

use std::{path::PathBuf, sync::Mutex};

use super::*;
use crate::{
    preflight::{self, scratch, Outcome},
    sys,
};

/// Where the tests say the agent's pins would be: the scratch goes beside it.
const BPF_DIR: &str = "/sys/fs/bpf/mesh-check-unit-test";

/// The scratch names carry the process id, shared by the tests of this binary: one at a time,
/// so that each can tell that it left nothing behind.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The embedded object when this process may probe the kernel (root, a cgroup v2 mount, a
/// build with the object); else `None` after saying the test is skipped, or a panic when
/// `MESH_REQUIRE_PRIVILEGED=1` (CI), as the lab's tests do.
fn privileged(test: &str) -> Option<&'static [u8]> {
    let problem = if sys::euid() != 0 {
        format!(
            "not running as root (euid {}): the probe loads eBPF programs",
            sys::euid()
        )
    } else if !matches!(preflight::cgroup2_mount(), Ok(Some(_))) {
        "no cgroup v2 mount".to_owned()
    } else if let Some(object) = capture::ebpf::object() {
        return Some(object);
    } else {
        "built without the eBPF object (cargo feature `ebpf`)".to_owned()
    };
    if std::env::var("MESH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{test}: MESH_REQUIRE_PRIVILEGED=1 but the probe cannot run here: {problem}");
    }
    eprintln!(
        "\n*** SKIPPED {test}: {problem} (set MESH_REQUIRE_PRIVILEGED=1 to make this a failure) ***\n"
    );
    None
}

/// Runs the whole check with `object`, then asserts it left no scratch pins or cgroup behind.
fn check_with(object: &[u8]) -> preflight::Report {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = preflight::run(Path::new(BPF_DIR), Some(object));
    let left = leftovers();
    assert!(left.is_empty(), "left behind: {left:?}\n{report}");
    report
}

/// Scratch pin directories and cgroups of this process.
fn leftovers() -> Vec<PathBuf> {
    let prefix = format!("{}{}-", scratch::PREFIX, std::process::id());
    let on_bpffs = |p: &Path| sys::fs_magic(p).is_ok_and(|m| m == preflight::BPF_FS_MAGIC);
    let bpffs = scratch::base(Path::new(BPF_DIR), on_bpffs).expect("a bpffs beside BPF_DIR");
    let cgroup2 = preflight::cgroup2_mount()
        .ok()
        .flatten()
        .expect("cgroup v2");
    [bpffs, cgroup2]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("listing").flatten())
        .map(|entry| entry.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

fn outcome<'a>(report: &'a preflight::Report, name: &str) -> &'a Outcome {
    &report
        .get(name)
        .unwrap_or_else(|| panic!("no check {name:?} in:\n{report}"))
        .outcome
}

fn all_checks() -> Vec<String> {
    let mut names: Vec<String> = ["capabilities", "cgroup v2", "bpffs"]
        .map(String::from)
        .to_vec();
    names.extend(maps::ALL.iter().map(|m| format!("map {m}")));
    names.extend(programs::ALL.iter().map(|p| format!("program {p}")));
    names.extend(FEATURES.iter().map(|f| f.check()));
    names.push("cleanup".into());
    names
}

#[test]
fn the_whole_check_passes_on_this_kernel_and_leaves_nothing_behind() {
    let Some(object) =
        privileged("the_whole_check_passes_on_this_kernel_and_leaves_nothing_behind")
    else {
        return;
    };
    let report = check_with(object);
    assert!(report.passed(), "{report}");
    for name in all_checks() {
        assert!(
            matches!(outcome(&report, &name), Outcome::Ok(_)),
            "{name} did not pass:\n{report}"
        );
    }
    assert!(
        matches!(
            outcome(&report, "kernel"),
            Outcome::Ok(_) | Outcome::Warn(_)
        ),
        "{report}"
    );
    assert_eq!(report.checks.len(), all_checks().len() + 1, "{report}");
}

#[test]
fn a_program_the_verifier_rejects_is_named_with_the_verifiers_last_lines() {
    let Some(object) =
        privileged("a_program_the_verifier_rejects_is_named_with_the_verifiers_last_lines")
    else {
        return;
    };
    let mut broken = object.to_vec();
    // The first instruction of connect4 becomes a read of its context far past its end:
    // `r0 = *(u32 *)(r1 + 4080)`, as a program reads a field an older kernel does not have.
    let (start, _) = section(&broken, "cgroup/connect4");
    broken[start..start + 8].copy_from_slice(&[0x61, 0x10, 0xf0, 0x0f, 0, 0, 0, 0]);
    let report = check_with(&broken);
    assert!(!report.passed(), "{report}");
    let line = report
        .get("program mesh_connect4")
        .expect("the program's check")
        .to_string();
    assert!(
        line.starts_with(
            "FAIL program mesh_connect4: the kernel's verifier rejected program mesh_connect4 \
             (cgroup/connect4, since Linux 4.17)"
        ),
        "{report}"
    );
    assert!(
        line.contains("invalid bpf_context access off=4080"),
        "{report}"
    );
    for program in [programs::CONNECT6, programs::SOCK_OPS, programs::SK_LOOKUP] {
        assert!(matches!(
            outcome(&report, &format!("program {program}")),
            Outcome::Ok(_)
        ));
    }
    // The cgroup links need connect4; the other features do not.
    assert!(
        matches!(outcome(&report, &CGROUP_LINKS.check()), Outcome::Skipped(why) if why.contains("mesh_connect4")),
        "{report}"
    );
    for f in FEATURES.iter().filter(|f| f.name != CGROUP_LINKS.name) {
        assert!(
            matches!(outcome(&report, &f.check()), Outcome::Ok(_)),
            "{report}"
        );
    }
    assert!(
        matches!(outcome(&report, "cleanup"), Outcome::Ok(_)),
        "{report}"
    );
}

#[test]
fn a_map_the_kernel_cannot_create_is_named_with_its_type() {
    let Some(object) = privileged("a_map_the_kernel_cannot_create_is_named_with_its_type") else {
        return;
    };
    let mut broken = object.to_vec();
    // MESH_ORIG_DST with room for no entry: the kernel refuses to create it.
    let (start, _) = section(&broken, "maps");
    let def = start + symbol(&broken, maps::ORIG_DST);
    // struct bpf_map_def: type, key_size, value_size, max_entries, ...
    broken[def + 12..def + 16].copy_from_slice(&0u32.to_le_bytes());
    let report = check_with(&broken);
    assert!(!report.passed(), "{report}");
    let line = report
        .get(&format!("map {}", maps::ORIG_DST))
        .expect("the map's check")
        .to_string();
    assert!(
        line.starts_with(
            "FAIL map MESH_ORIG_DST: the kernel cannot create map MESH_ORIG_DST, a \
             BPF_MAP_TYPE_LRU_HASH (Linux 4.10 and later): Invalid argument"
        ),
        "{report}"
    );
    for program in programs::ALL {
        assert!(matches!(
            outcome(&report, &format!("program {program}")),
            Outcome::Skipped(_)
        ));
    }
    assert!(
        matches!(outcome(&report, "cleanup"), Outcome::Ok(_)),
        "{report}"
    );
}

#[test]
fn a_read_only_cgroup_mount_leaves_the_cgroup_links_to_a_check_on_the_host() {
    let Some(object) =
        privileged("a_read_only_cgroup_mount_leaves_the_cgroup_links_to_a_check_on_the_host")
    else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup2 = preflight::cgroup2_mount()
        .ok()
        .flatten()
        .expect("cgroup v2");
    // The cgroup v2 mount read-only, as a container without write access to it sees it: a
    // bind mount in a mount namespace of the probing thread's own (nothing else sees it).
    let ro = std::env::temp_dir().join(format!("mesh-check-ro-{}", std::process::id()));
    std::fs::create_dir_all(&ro).expect("the mount point");
    let probed = std::thread::spawn({
        let ro = ro.clone();
        move || {
            sys::unshare_mounts().expect("a mount namespace of the thread's own");
            let mount = |args: &[&std::ffi::OsStr]| {
                let status = std::process::Command::new("mount").args(args).status();
                assert!(status.is_ok_and(|s| s.success()), "mount {args:?}");
            };
            mount(&["--make-rprivate".as_ref(), "/".as_ref()]);
            mount(&["--bind".as_ref(), cgroup2.as_os_str(), ro.as_os_str()]);
            mount(&["-o".as_ref(), "remount,bind,ro".as_ref(), ro.as_os_str()]);
            let mut report = preflight::Report::default();
            run(object, Path::new(BPF_DIR), Some(&ro), &mut report);
            report
        }
    })
    .join();
    std::fs::remove_dir(&ro).expect("removing the mount point");
    let report = probed.expect("the probing thread");
    let left = leftovers();
    assert!(left.is_empty(), "left behind: {left:?}\n{report}");
    assert!(report.passed(), "{report}");
    assert!(
        matches!(
            outcome(&report, &CGROUP_LINKS.check()),
            Outcome::Skipped(why) if why.contains("Read-only file system")
                && why.contains("run `mesh-agent check` on the host")
        ),
        "{report}"
    );
    for f in FEATURES.iter().filter(|f| f.name != CGROUP_LINKS.name) {
        assert!(
            matches!(outcome(&report, &f.check()), Outcome::Ok(_)),
            "{report}"
        );
    }
}

#[test]
fn a_scratch_dropped_on_the_way_out_takes_its_pins_and_cgroup_with_it() {
    if privileged("a_scratch_dropped_on_the_way_out_takes_its_pins_and_cgroup_with_it").is_none() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup2 = preflight::cgroup2_mount()
        .ok()
        .flatten()
        .expect("cgroup v2");
    let made = std::sync::Mutex::new(Vec::new());
    let panicked = std::panic::catch_unwind(|| {
        let mut scratch = Scratch::create(Path::new(BPF_DIR)).expect("the scratch directory");
        let _cgroup = scratch.cgroup(&cgroup2).expect("the scratch cgroup");
        std::fs::create_dir(scratch.dir().join("links")).expect("a directory in it");
        *made.lock().expect("made") = leftovers();
        std::panic::panic_any("a probe fails half way");
    });
    let payload = panicked.expect_err("the closure panics");
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"a probe fails half way")
    );
    assert_eq!(
        made.lock().expect("made").len(),
        2,
        "the scratch was not made"
    );
    let left = leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn each_hook_is_the_section_of_its_program_in_the_object() {
    let Some(object) = capture::ebpf::object() else {
        return eprintln!("SKIPPED: built without the eBPF object");
    };
    let parsed = aya_obj::Object::parse(object).expect("the embedded object parses");
    for (program, hook, _) in HOOKS {
        let section = &parsed.programs.get(program).expect("the program").section;
        let want: aya_obj::ProgramSection = hook.parse().expect("a section name");
        assert_eq!(format!("{section:?}"), format!("{want:?}"), "{program}");
    }
    assert_eq!(HOOKS.len(), programs::ALL.len());
}

#[test]
fn every_map_of_the_object_has_a_known_type() {
    let Some(object) = capture::ebpf::object() else {
        return eprintln!("SKIPPED: built without the eBPF object");
    };
    let parsed = aya_obj::Object::parse(object).expect("the embedded object parses");
    for (name, map) in &parsed.maps {
        let (map_type, since) = map_type(map.map_type());
        assert!(since != "?", "map {name}: {map_type} is not in MAP_TYPES");
    }
    assert_eq!(
        declared_type(object, maps::ORIG_DST),
        (
            "BPF_MAP_TYPE_LRU_HASH".into(),
            "Linux 4.10 and later".into()
        )
    );
}

/// The file offset and size of an ELF64 (little-endian) object's section.
fn section(elf: &[u8], name: &str) -> (usize, usize) {
    let index = sections(elf)
        .position(|(n, ..)| n == name)
        .unwrap_or_else(|| panic!("no section {name}"));
    let (_, offset, size, ..) = sections(elf).nth(index).expect("the section");
    (offset, size)
}

/// The value (the offset in its section) of a symbol.
fn symbol(elf: &[u8], name: &str) -> usize {
    let all: Vec<_> = sections(elf).collect();
    let (_, offset, size, _, link) = all
        .iter()
        .find(|(.., kind, _)| *kind == 2) // SHT_SYMTAB
        .cloned()
        .expect("a symbol table");
    let strings = all[link].1;
    (offset..offset + size)
        .step_by(24)
        .find(|&sym| cstr(elf, strings + word(elf, sym, 4)) == name)
        .map(|sym| word(elf, sym + 8, 8))
        .unwrap_or_else(|| panic!("no symbol {name}"))
}

/// Each section: name, file offset, size, type and link.
fn sections(elf: &[u8]) -> impl Iterator<Item = (String, usize, usize, usize, usize)> + '_ {
    let (table, entry, count, names) = (
        word(elf, 0x28, 8),
        word(elf, 0x3a, 2),
        word(elf, 0x3c, 2),
        word(elf, 0x3e, 2),
    );
    let strings = word(elf, table + names * entry + 0x18, 8);
    (0..count).map(move |i| {
        let h = table + i * entry;
        (
            cstr(elf, strings + word(elf, h, 4)),
            word(elf, h + 0x18, 8),
            word(elf, h + 0x20, 8),
            word(elf, h + 4, 4),
            word(elf, h + 0x28, 4),
        )
    })
}

fn word(elf: &[u8], at: usize, len: usize) -> usize {
    let mut bytes = [0u8; 8];
    bytes[..len].copy_from_slice(&elf[at..at + len]);
    usize::try_from(u64::from_le_bytes(bytes)).expect("an offset")
}

fn cstr(elf: &[u8], at: usize) -> String {
    let end = elf[at..]
        .iter()
        .position(|&b| b == 0)
        .map_or(elf.len(), |n| at + n);
    String::from_utf8_lossy(&elf[at..end]).into_owned()
}
