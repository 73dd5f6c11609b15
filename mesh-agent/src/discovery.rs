//! Sources that fill the [`crate::state::Store`] with changes (upserts and deletes of
//! namespaces, workloads and services), applied incrementally. Off Kubernetes: a YAML file
//! watched for changes (`file`), which applies the difference between two versions of the file.
//! In Kubernetes: the API server's objects, watched (`kube`), each event one change. Both
//! judge policies by the same rules (`policies`).

pub mod file;
pub mod kube;
pub mod policies;

use std::path::PathBuf;

/// Errors of discovery sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is larger than {max} bytes (at least {size}): a mesh state this \
         large is not one the agent can hold; is it the right file?"
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("the state file {path} is not valid YAML for the mesh state: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("the state file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}
