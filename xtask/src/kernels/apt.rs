//! Fetching kernel packages with apt, through a private configuration under
//! `target/kernels/apt`: its own sources list, indexes and cache, nothing of the host's apt
//! touched or read (`APT_CONFIG` names a configuration read first, which turns off the host's
//! configuration file and fragments, its sources and its preferences). Every
//! index is verified: Debian's with the host's Debian keyring, Ubuntu's with the key in
//! Debian's ubuntu-keyring package (so the chain starts at Debian's key).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::catalog::{self, Archive, Kernel, Keyring};
use crate::build::{run, stdout_of};

/// A private apt configuration.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// Prepares `dir` and updates the indexes of the archives of `kernels` (and Debian 13's
    /// for Ubuntu's key when an Ubuntu kernel is among them).
    pub fn prepare(dir: &Path, kernels: &[&Kernel]) -> Result<Self> {
        if !Path::new(catalog::DEBIAN_KEYRING).is_file() {
            bail!(
                "{} is missing: install Debian's archive key (`apt-get install \
                 debian-archive-keyring`, Debian and Ubuntu alike): the kernel packages' indexes \
                 are verified with it",
                catalog::DEBIAN_KEYRING
            );
        }
        for sub in [
            "state/lists/partial",
            "cache/archives/partial",
            "empty",
            "debs",
        ] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        std::fs::write(dir.join("status"), "")
            .with_context(|| format!("writing {}", dir.join("status").display()))?;
        // Read by apt before anything else (APT_CONFIG): no configuration fragment or main
        // file of the host's is read after it, so no host setting (an insecure repository
        // allowed, say) applies; verification is required whatever the host says.
        let conf = format!(
            "Dir::Etc::Parts \"{}\";\nDir::Etc::main \"/dev/null\";\n\
             Acquire::AllowInsecureRepositories \"false\";\n\
             Acquire::AllowDowngradeToInsecureRepositories \"false\";\n\
             APT::Get::AllowUnauthenticated \"false\";\n",
            dir.join("empty").display()
        );
        std::fs::write(dir.join("apt.conf"), conf)
            .with_context(|| format!("writing {}", dir.join("apt.conf").display()))?;
        let apt = Apt {
            dir: dir.to_path_buf(),
        };
        let mut archives: Vec<Archive> = Vec::new();
        for a in kernels.iter().flat_map(|k| k.archives) {
            if !archives.contains(a) {
                archives.push(*a);
            }
        }
        if archives.iter().any(|a| a.keyring == Keyring::Ubuntu) {
            apt.fetch_ubuntu_keyring()?;
        }
        apt.write_sources(&archives)?;
        apt.update()?;
        Ok(apt)
    }

    fn ubuntu_keyring(&self) -> PathBuf {
        self.dir
            .join("ubuntu-keyring")
            .join(catalog::UBUNTU_KEYRING_IN_PACKAGE)
    }

    /// Ubuntu's archive key, from Debian 13's ubuntu-keyring package.
    fn fetch_ubuntu_keyring(&self) -> Result<()> {
        if self.ubuntu_keyring().is_file() {
            return Ok(());
        }
        eprintln!("xtask: fetching Ubuntu's archive key (Debian's ubuntu-keyring package)");
        self.write_sources(&[catalog::TRIXIE])?;
        self.update()?;
        let deb = self.download("ubuntu-keyring")?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(self.dir.join("ubuntu-keyring")))?;
        if !self.ubuntu_keyring().is_file() {
            bail!(
                "{} has no {}: Ubuntu's archive key moved in that package",
                deb.display(),
                catalog::UBUNTU_KEYRING_IN_PACKAGE
            );
        }
        Ok(())
    }

    fn write_sources(&self, archives: &[Archive]) -> Result<()> {
        let mut list = String::new();
        for a in archives {
            let key = match a.keyring {
                Keyring::Debian => PathBuf::from(catalog::DEBIAN_KEYRING),
                Keyring::Ubuntu => self.ubuntu_keyring(),
            };
            list.push_str(&format!(
                "deb [arch=amd64 signed-by={}] {} {} {}\n",
                key.display(),
                a.uri,
                a.suite,
                a.component
            ));
        }
        let path = self.dir.join("sources.list");
        std::fs::write(&path, list).with_context(|| format!("writing {}", path.display()))
    }

    /// `program` (apt-get, apt-cache) with this configuration and nothing of the host's.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.dir.join("apt.conf"));
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("empty")),
            ("Dir::Etc::Parts", d("empty")),
            ("Dir::Etc::Preferences", d("empty/preferences")),
            ("Dir::Etc::PreferencesParts", d("empty")),
            ("Dir::State", d("state")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            ("APT::Architecture", "amd64".into()),
            ("APT::Architectures", "amd64".into()),
            ("Acquire::Languages", "none".into()),
            ("APT::Sandbox::User", "root".into()),
            ("Debug::NoLocking", "1".into()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd.arg("-q");
        cmd
    }

    fn update(&self) -> Result<()> {
        let mut cmd = self.command("apt-get");
        cmd.arg("update");
        let out = cmd.output().context("cannot start apt-get")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // apt-get update exits 0 on some failed fetches: its warnings say so.
        if !out.status.success() || stderr.contains("W: Failed") || stderr.contains("E: ") {
            bail!(
                "apt-get update with {} failed (the kernel packages come from Debian's and \
                 Ubuntu's archives: is deb.debian.org / archive.ubuntu.com reachable?): {}",
                self.dir.join("sources.list").display(),
                stderr.trim()
            );
        }
        Ok(())
    }

    /// The ABIs of `kernel`'s line in its archives (`6.1.0-57`), newest first.
    pub fn abis(&self, kernel: &Kernel) -> Result<Vec<String>> {
        let prefix = kernel.image.split("{abi}").next().unwrap_or_default();
        let mut cmd = self.command("apt-cache");
        cmd.args(["pkgnames", prefix]);
        let names = stdout_of(&mut cmd)?;
        let mut abis: Vec<(String, u64)> = names
            .lines()
            .filter_map(|p| kernel.abi_of(p.trim()))
            .collect();
        abis.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        if abis.is_empty() {
            let archives: Vec<String> = kernel
                .archives
                .iter()
                .map(|a| format!("{} {}", a.uri, a.suite))
                .collect();
            bail!(
                "no package {} in {}: the archives no longer carry that line",
                kernel.image,
                archives.join(", ")
            );
        }
        Ok(abis.into_iter().map(|(abi, _)| abi).collect())
    }

    /// The packages of the newest ABI of `kernel` that downloads whole: an index may list a
    /// version its mirror does not serve (yet, or any more), so up to three are tried.
    pub fn fetch(&self, kernel: &Kernel) -> Result<(String, Vec<PathBuf>)> {
        let mut errors = Vec::new();
        for abi in self.abis(kernel)?.into_iter().take(3) {
            match kernel
                .packages(&abi)
                .iter()
                .map(|p| self.download(p))
                .collect::<Result<Vec<_>>>()
            {
                Ok(debs) => return Ok((abi, debs)),
                Err(e) => {
                    eprintln!("xtask: {abi} did not download ({e:#}); trying the one before");
                    errors.push(format!("{abi}: {e:#}"));
                }
            }
        }
        bail!(
            "no build of kernel {} downloads: {}",
            kernel.name,
            errors.join("; ")
        )
    }

    /// Downloads `package` (once: a .deb already in the cache is reused) and returns its path.
    pub fn download(&self, package: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        if let Some(found) = cached(&debs, package)? {
            return Ok(found);
        }
        let mut cmd = self.command("apt-get");
        cmd.current_dir(&debs).args(["download", package]);
        let out = cmd.output().context("cannot start apt-get")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("E:")).collect();
            bail!("apt-get download {package} failed: {}", errors.join(" "));
        }
        cached(&debs, package)?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                debs.display()
            )
        })
    }
}

/// The .deb of `package` in `dir` (`<package>_<version>_<arch>.deb`), if there is one.
fn cached(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}
