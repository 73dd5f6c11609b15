use super::*;

#[test]
fn finds_cgroup2_in_hybrid_layout() {
    let info = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
    assert_eq!(
        parse_cgroup2_mount(info),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    assert_eq!(
        parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
        None
    );
}

#[test]
fn kernel_versions() {
    assert!(kernel_at_least("6.18.44-fc-v769", (5, 15)));
    assert!(kernel_at_least("5.15.0", (5, 15)));
    assert!(!kernel_at_least("5.10.200-generic", (5, 15)));
    assert!(!kernel_at_least("garbage", (5, 15)));
}

#[test]
fn an_old_kernel_is_advice_naming_the_minimum_not_a_failure() {
    assert_eq!(kernel_advice("6.18.44-fc-v1300"), None);
    let (major, minor) = MIN_KERNEL;
    assert_eq!(kernel_advice(&format!("{major}.{minor}.0")), None);
    let advice = kernel_advice("4.19.0-generic").expect("4.19 is older than the minimum");
    assert!(
        advice.contains(&format!("Linux {major}.{minor}")) && advice.contains("ingress_ifindex"),
        "{advice}"
    );
    let mut report = Report::default();
    report.warn("kernel", format!("4.19.0-generic (x86_64): {advice}"));
    assert!(report.passed(), "advice failed the report");
    assert!(report
        .to_string()
        .starts_with("warn kernel: 4.19.0-generic (x86_64): older than"));
}

#[test]
fn each_check_is_one_line_with_its_status_and_long_messages_continue_indented() {
    let mut report = Report::default();
    report.ok("kernel", "6.18.0 (x86_64)");
    report.skip(
        "feature sk_lookup",
        "not checked: a program did not load (above)",
    );
    report.fail(
        "program mesh_connect4",
        Error::Verifier {
            program: "mesh_connect4",
            hook: "cgroup/connect4",
            since: "4.17",
            log: "0: R1=ctx() R10=fp0\ninvalid bpf_context access off=4080 size=4".into(),
        },
    );
    report.fail("cgroup v2", Error::NoCgroup2);
    assert_eq!(
        report.to_string(),
        "ok   kernel: 6.18.0 (x86_64)\n\
         skip feature sk_lookup: not checked: a program did not load (above)\n\
         FAIL program mesh_connect4: the kernel's verifier rejected program mesh_connect4 \
         (cgroup/connect4, since Linux 4.17); its last lines say why:\n       \
         0: R1=ctx() R10=fp0\n       \
         invalid bpf_context access off=4080 size=4\n\
         FAIL cgroup v2: no cgroup v2 file system is mounted (looked for fstype cgroup2 in \
         /proc/self/mountinfo): mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`, and \
         mount it into the agent's pod\n"
    );
    assert!(!report.passed());
    let failed: Vec<&str> = report.failures().map(|c| c.name.as_str()).collect();
    assert_eq!(failed, ["program mesh_connect4", "cgroup v2"]);
    assert!(report
        .get("program mesh_connect4")
        .and_then(Check::error)
        .is_some());
    assert!(report.get("kernel").and_then(Check::error).is_none());
}

#[test]
fn a_report_with_skipped_checks_only_passes() {
    let mut report = Report::default();
    report.ok("capabilities", "running as root");
    report.skip("eBPF", "not checked");
    assert!(report.passed());
}

#[test]
fn a_missing_feature_says_what_it_is_since_when_and_what_the_agent_needs_it_for() {
    let mut names = std::collections::HashSet::new();
    for feature in probe::FEATURES {
        assert!(
            names.insert(feature.check()),
            "two features named {}",
            feature.name
        );
        let e = Error::Feature {
            feature,
            detail: "Invalid argument (os error 22)".into(),
        };
        let text = e.to_string();
        for part in [
            feature.what,
            &format!("Linux {} and later", feature.since),
            feature.used_for,
            "Invalid argument (os error 22)",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text:?}");
        }
    }
}

#[test]
fn a_map_the_kernel_cannot_create_is_named_with_its_type() {
    let (map_type, since) = probe::map_type(9);
    let e = Error::MapCreate {
        map: "MESH_ORIG_DST".into(),
        map_type,
        since: format!("Linux {since} and later"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    };
    assert_eq!(
        e.to_string(),
        "the kernel cannot create map MESH_ORIG_DST, a BPF_MAP_TYPE_LRU_HASH (Linux 4.10 and \
         later): Invalid argument (os error 22); the object's maps are created together, so none \
         of its programs could load"
    );
    assert_eq!(probe::map_type(4242), ("map type 4242".to_owned(), "?"));
}

#[test]
fn the_scratch_goes_beside_the_pin_directory_on_bpffs() {
    let root = std::env::temp_dir().join(format!("mesh-preflight-base-{}", std::process::id()));
    let bpffs = root.join("bpf");
    std::fs::create_dir_all(bpffs.join("agent")).expect("mkdir");
    std::fs::create_dir_all(root.join("other")).expect("mkdir");
    let on_bpffs = |p: &Path| p.starts_with(&bpffs);
    // Missing directories are looked through to their nearest existing ancestor.
    assert_eq!(
        scratch::base(&bpffs.join("mesh/n1"), on_bpffs),
        Some(bpffs.clone())
    );
    assert_eq!(
        scratch::base(&bpffs.join("agent"), on_bpffs),
        Some(bpffs.clone())
    );
    // The pin directory is the mount point: its parent is not bpffs.
    assert_eq!(scratch::base(&bpffs, on_bpffs), Some(bpffs.clone()));
    assert_eq!(scratch::base(&root.join("other/x"), on_bpffs), None);
    assert_eq!(scratch::base(Path::new("relative"), |_| true), None);
    std::fs::remove_dir_all(&root).expect("cleanup");
}
