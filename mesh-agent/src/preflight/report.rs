//! What `mesh-agent check` found: one named check per line, `ok`, `warn`, `FAIL` or `skip`.

use std::fmt;

use super::Error;

/// How one check ended.
#[derive(Debug)]
pub enum Outcome {
    Ok(String),
    /// Not a failure, worth knowing (a kernel release older than
    /// [`super::MIN_KERNEL`]).
    Warn(String),
    Failed(Error),
    /// Not run, because what it needs failed or is missing (an earlier line says what).
    Skipped(String),
}

/// One named check and how it ended.
#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
}

/// The checks in the order they ran.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// Records a check that passed; returns `true`.
    pub fn ok(&mut self, name: impl Into<String>, detail: impl Into<String>) -> bool {
        self.push(name, Outcome::Ok(detail.into()));
        true
    }

    /// Records advice that does not fail the report; returns `true`.
    pub fn warn(&mut self, name: impl Into<String>, detail: impl Into<String>) -> bool {
        self.push(name, Outcome::Warn(detail.into()));
        true
    }

    /// Records a failed check; returns `false`.
    pub fn fail(&mut self, name: impl Into<String>, error: Error) -> bool {
        self.push(name, Outcome::Failed(error));
        false
    }

    /// Records a check that could not run, and why.
    pub fn skip(&mut self, name: impl Into<String>, why: impl Into<String>) {
        self.push(name, Outcome::Skipped(why.into()));
    }

    fn push(&mut self, name: impl Into<String>, outcome: Outcome) {
        self.checks.push(Check {
            name: name.into(),
            outcome,
        });
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
    }

    /// No check failed (advice and skipped checks do not fail a report; a check is skipped
    /// only because another failed, or for lack of privileges, which fails too).
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The check of that name.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

impl Check {
    /// Why it failed, if it did.
    pub fn error(&self) -> Option<&Error> {
        match &self.outcome {
            Outcome::Failed(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for Check {
    /// `ok   <name>: <detail>`, `FAIL <name>: <message>`; the lines of a long message (the
    /// verifier's) follow, indented.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (status, text) = match &self.outcome {
            Outcome::Ok(detail) => ("ok", detail.clone()),
            Outcome::Warn(detail) => ("warn", detail.clone()),
            Outcome::Failed(error) => ("FAIL", error.to_string()),
            Outcome::Skipped(why) => ("skip", why.clone()),
        };
        let mut lines = text.lines();
        write!(
            f,
            "{status:<4} {}: {}",
            self.name,
            lines.next().unwrap_or("")
        )?;
        for line in lines {
            write!(f, "\n       {line}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.checks.iter().try_for_each(|c| writeln!(f, "{c}"))
    }
}
