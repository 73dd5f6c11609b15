//! Sources that fill the [`crate::state::Store`]. Off Kubernetes: a YAML file watched for
//! changes (`file`). The Kubernetes source comes later and produces the same snapshot.

pub mod file;

use std::path::PathBuf;

/// Errors of discovery sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state file {path} is not valid YAML for the mesh state: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("the state file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}
