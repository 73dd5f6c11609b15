//! Which end-to-end tests ran and which skipped. A lab test skips when the machine cannot run
//! the lab (see [`crate::require_privileged`]); a skip is a pass for `cargo test`, so a run
//! where every lab test skipped looks like a green run. When [`TALLY_DIR_ENV`] names a
//! directory, [`crate::require_privileged`] leaves one file there per lab test saying whether
//! it ran, and `cargo xtask test` counts them: the number of lab tests comes from the tests
//! themselves.

use std::{
    fmt,
    path::{Path, PathBuf},
};

/// Environment variable naming the directory where each lab test records that it ran or
/// skipped (`cargo xtask test` sets it).
pub const TALLY_DIR_ENV: &str = "MESH_E2E_TALLY_DIR";

const RAN: &str = "ran";
const SKIPPED: &str = "skipped: ";

/// Records, when [`TALLY_DIR_ENV`] is set, that `test` of the running test binary ran
/// (`skipped` is `None`) or skipped and why. Panics if the record cannot be written: a lost
/// record would make the count wrong.
pub(crate) fn record(test: &str, skipped: Option<&str>) {
    let Some(dir) = std::env::var_os(TALLY_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let path = dir.join(record_name(&binary_name(), test));
    let content = match skipped {
        None => RAN.to_owned(),
        Some(reason) => format!("{SKIPPED}{}", reason.replace('\n', " ")),
    };
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, content + "\n"))
        .unwrap_or_else(|e| {
            panic!(
                "{test}: cannot record in {} ({TALLY_DIR_ENV}) whether it ran: {e}",
                path.display()
            )
        });
}

/// The test binary's name without cargo's hash (`capture` for `capture-0123abcd`).
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_stem)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem,
    }
}

/// One file name per test and binary, safe for any test name.
fn record_name(binary: &str, test: &str) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}--{}", safe(binary), safe(test))
}

/// What the lab tests of one run recorded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// The tests that ran (`binary--test`), sorted.
    pub ran: Vec<String>,
    /// The tests that skipped and why, sorted.
    pub skipped: Vec<(String, String)>,
}

impl Tally {
    /// Reads the records a run left in `dir`; a missing directory is an empty tally.
    pub fn read(dir: &Path) -> std::io::Result<Tally> {
        let mut tally = Tally::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(tally),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let content = std::fs::read_to_string(entry.path())?;
            let content = content.trim_end();
            match content.strip_prefix(SKIPPED) {
                Some(reason) => tally.skipped.push((name, reason.to_owned())),
                None if content == RAN => tally.ran.push(name),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}: not a tally record: {content:?}",
                            entry.path().display()
                        ),
                    ))
                }
            }
        }
        tally.ran.sort();
        tally.skipped.sort();
        Ok(tally)
    }

    /// How many lab tests recorded anything.
    pub fn total(&self) -> usize {
        self.ran.len() + self.skipped.len()
    }
}

/// `end-to-end: 28 of 28 ran`, or `end-to-end: 0 of 28 ran (28 skipped: <each reason>)`.
impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "end-to-end: {} of {} ran", self.ran.len(), self.total())?;
        if !self.skipped.is_empty() {
            let mut reasons: Vec<&str> = self.skipped.iter().map(|(_, r)| r.as_str()).collect();
            reasons.sort_unstable();
            reasons.dedup();
            write!(
                f,
                " ({} skipped: {})",
                self.skipped.len(),
                reasons.join("; ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_the_tests_recorded() {
        let dir = std::env::temp_dir().join(format!("mesh-tally-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(Tally::read(&dir).expect("no directory"), Tally::default());
        std::fs::create_dir_all(&dir).expect("creating the directory");
        for (test, content) in [
            ("a", "ran\n"),
            ("b", "skipped: not running as root\n"),
            ("c", "skipped: not running as root\n"),
            ("d", "ran\n"),
        ] {
            std::fs::write(dir.join(record_name("capture", test)), content).expect("writing");
        }
        let tally = Tally::read(&dir).expect("reading");
        assert_eq!(tally.ran, ["capture--a", "capture--d"]);
        assert_eq!(tally.total(), 4);
        assert_eq!(
            tally.to_string(),
            "end-to-end: 2 of 4 ran (2 skipped: not running as root)"
        );
        std::fs::write(dir.join("e"), "what\n").expect("writing");
        let err = Tally::read(&dir).expect_err("a stray file");
        std::fs::remove_dir_all(&dir).expect("removing the directory");
        assert!(err.to_string().contains("not a tally record"), "{err}");
        let all = Tally {
            ran: vec!["x--y".into()],
            skipped: vec![],
        };
        assert_eq!(all.to_string(), "end-to-end: 1 of 1 ran");
    }

    #[test]
    fn names_are_per_binary_and_file_safe() {
        assert_eq!(record_name("capture", "a_b"), "capture--a_b");
        assert_eq!(record_name("x", "../y z"), "x--___y_z");
        assert_ne!(record_name("capture", "t"), record_name("hbone", "t"));
    }
}
