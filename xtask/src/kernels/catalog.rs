//! The kernels of the matrix: where each comes from (a distribution's apt archive), which
//! packages hold its image and modules, and what the matrix expects of it.

/// An apt archive: one `deb` line of a sources list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Archive {
    pub uri: &'static str,
    pub suite: &'static str,
    pub component: &'static str,
    pub keyring: Keyring,
}

/// The key an archive's index is verified with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keyring {
    /// Debian's, from the host's debian-archive-keyring package.
    Debian,
    /// Ubuntu's, from Debian's ubuntu-keyring package: fetched from [`TRIXIE`], whose index
    /// Debian's key verifies, so the chain of trust starts at the host's Debian keyring.
    Ubuntu,
}

/// Debian's archive key on the host (package debian-archive-keyring, Debian and Ubuntu alike).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Where Debian's ubuntu-keyring package puts Ubuntu's archive key.
pub const UBUNTU_KEYRING_IN_PACKAGE: &str = "usr/share/keyrings/ubuntu-archive-keyring.gpg";

const fn debian(suite: &'static str) -> Archive {
    Archive {
        uri: "http://deb.debian.org/debian",
        suite,
        component: "main",
        keyring: Keyring::Debian,
    }
}

const fn debian_security(suite: &'static str) -> Archive {
    Archive {
        uri: "http://deb.debian.org/debian-security",
        suite,
        component: "main",
        keyring: Keyring::Debian,
    }
}

const fn ubuntu(suite: &'static str) -> Archive {
    Archive {
        uri: "http://archive.ubuntu.com/ubuntu",
        suite,
        component: "main",
        keyring: Keyring::Ubuntu,
    }
}

/// Debian 13: only for its ubuntu-keyring package.
pub const TRIXIE: Archive = debian("trixie");

/// What the matrix expects of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `mesh-agent check` passes and the suites pass.
    Runs,
    /// `mesh-agent check` fails, its output naming this (the missing feature); no suite runs.
    Refused(&'static str),
}

/// One kernel of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// Who ships it, for the table.
    pub distribution: &'static str,
    /// Where its packages are (a release and its security updates).
    pub archives: &'static [Archive],
    /// The image package, `{abi}` standing for the ABI (`6.1.0-57`).
    pub image: &'static str,
    /// The ABI: this prefix, a number (the newest in the archive is taken), this suffix.
    pub abi: (&'static str, &'static str),
    /// Further packages of the same ABI with the modules (`{abi}` as in `image`).
    pub modules: &'static [&'static str],
    pub expect: Expect,
}

impl Kernel {
    /// The image package's name with `abi`.
    pub fn image_package(&self, abi: &str) -> String {
        self.image.replace("{abi}", abi)
    }

    /// Every package to fetch for `abi`: the image, then the modules.
    pub fn packages(&self, abi: &str) -> Vec<String> {
        std::iter::once(self.image)
            .chain(self.modules.iter().copied())
            .map(|p| p.replace("{abi}", abi))
            .collect()
    }

    /// The ABI of an image package of this kernel's line (`linux-image-6.1.0-57-cloud-amd64-
    /// unsigned` gives `6.1.0-57`) and its number (57), or None for another package.
    pub fn abi_of(&self, package: &str) -> Option<(String, u64)> {
        let (before, after) = self.image.split_once("{abi}")?;
        let abi = package.strip_prefix(before)?.strip_suffix(after)?;
        let number = abi.strip_prefix(self.abi.0)?.strip_suffix(self.abi.1)?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((abi.to_owned(), number.parse().ok()?))
    }
}

/// The matrix, oldest first. What each row found is in docs/kernels.md.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        distribution: "Debian 11",
        // Its security updates (bullseye-security) are not served by every mirror: the release's.
        archives: &[debian("bullseye")],
        image: "linux-image-{abi}-cloud-amd64-unsigned",
        abi: ("5.10.0-", ""),
        modules: &[],
        expect: Expect::Refused("SO_NETNS_COOKIE"),
    },
    Kernel {
        name: "5.15",
        distribution: "Ubuntu 22.04",
        archives: &[ubuntu("jammy-updates")],
        image: "linux-image-unsigned-{abi}-generic",
        abi: ("5.15.0-", ""),
        modules: &["linux-modules-{abi}-generic"],
        expect: Expect::Refused("ingress_ifindex"),
    },
    Kernel {
        name: "5.17",
        distribution: "Ubuntu 22.04 OEM",
        archives: &[ubuntu("jammy-updates")],
        image: "linux-image-unsigned-{abi}-oem",
        abi: ("5.17.0-", ""),
        modules: &["linux-modules-{abi}-oem"],
        expect: Expect::Runs,
    },
    Kernel {
        name: "6.1",
        distribution: "Debian 12",
        archives: &[debian("bookworm"), debian_security("bookworm-security")],
        image: "linux-image-{abi}-cloud-amd64-unsigned",
        abi: ("6.1.0-", ""),
        modules: &[],
        expect: Expect::Runs,
    },
    Kernel {
        name: "6.8",
        distribution: "Ubuntu 24.04",
        archives: &[ubuntu("noble-updates")],
        image: "linux-image-unsigned-{abi}-generic",
        abi: ("6.8.0-", ""),
        modules: &["linux-modules-{abi}-generic"],
        expect: Expect::Runs,
    },
    Kernel {
        name: "6.12",
        distribution: "Debian 12 backports, 13",
        archives: &[debian("bookworm"), debian_security("bookworm-security")],
        image: "linux-image-{abi}-cloud-amd64-unsigned",
        abi: ("6.12.", "+deb12"),
        modules: &[],
        expect: Expect::Runs,
    },
];

/// The kernels named in `names` (all when empty), in the matrix's order; an error names an
/// unknown one and lists the known.
pub fn select(names: &[String]) -> anyhow::Result<Vec<&'static Kernel>> {
    if names.is_empty() {
        return Ok(KERNELS.iter().collect());
    }
    for name in names {
        if !KERNELS.iter().any(|k| k.name == name) {
            anyhow::bail!(
                "no kernel {name:?} in the matrix; it has {} (xtask/src/kernels/catalog.rs \
                 says how to add one)",
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(KERNELS
        .iter()
        .filter(|k| names.iter().any(|n| n == k.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str) -> &'static Kernel {
        KERNELS
            .iter()
            .find(|k| k.name == name)
            .expect("in the matrix")
    }

    #[test]
    fn abi_of_takes_only_the_line_of_the_kernel() {
        let debian = kernel("6.1");
        assert_eq!(
            debian.abi_of("linux-image-6.1.0-57-cloud-amd64-unsigned"),
            Some(("6.1.0-57".into(), 57))
        );
        assert_eq!(debian.abi_of("linux-image-6.1.0-57-cloud-amd64"), None);
        assert_eq!(
            debian.abi_of("linux-image-6.12.107+deb12-cloud-amd64-unsigned"),
            None
        );
        let backport = kernel("6.12");
        assert_eq!(
            backport.abi_of("linux-image-6.12.107+deb12-cloud-amd64-unsigned"),
            Some(("6.12.107+deb12".into(), 107))
        );
        let ubuntu = kernel("5.15");
        assert_eq!(
            ubuntu.abi_of("linux-image-unsigned-5.15.0-208-generic"),
            Some(("5.15.0-208".into(), 208))
        );
        assert_eq!(
            ubuntu.abi_of("linux-image-unsigned-5.15.0-1025-nvidia-lowlatency"),
            None
        );
        assert_eq!(
            ubuntu.packages("5.15.0-208"),
            [
                "linux-image-unsigned-5.15.0-208-generic",
                "linux-modules-5.15.0-208-generic"
            ]
        );
    }

    #[test]
    fn select_names_the_unknown_kernel() {
        let err = select(&["4.19".into()]).expect_err("not in the matrix");
        assert!(err.to_string().contains("\"4.19\""), "{err}");
        let picked = select(&["6.12".into(), "6.1".into()]).expect("known");
        assert_eq!(
            picked.iter().map(|k| k.name).collect::<Vec<_>>(),
            ["6.1", "6.12"]
        );
    }
}
