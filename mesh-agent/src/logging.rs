//! The log filter, changeable while the agent runs (`POST /logging?level=` on the admin
//! endpoint). The process's subscriber installs the reload function at start (`cli`); a filter
//! that does not parse is refused and the one in force stays.

use std::sync::{Mutex, OnceLock};

type Reload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

struct Filter {
    reload: Reload,
    /// The filter in force, as it was given.
    current: Mutex<String>,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Makes the filter changeable: `reload` replaces the subscriber's filter, `current` is the one
/// it starts with. Once per process; later calls are ignored.
pub fn install(
    current: String,
    reload: impl Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync + 'static,
) {
    let _ = FILTER.set(Filter {
        reload: Box::new(reload),
        current: Mutex::new(current),
    });
}

/// The filter in force; `None` when this process's filter cannot be changed.
pub fn current() -> Option<String> {
    let f = FILTER.get()?;
    Some(f.current.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Replaces the filter with `spec` (tracing's `EnvFilter` syntax, as `MESH_LOG`): an error
/// naming what is wrong, and the filter in force unchanged, when it does not parse.
pub fn set(spec: &str) -> Result<(), String> {
    let f = FILTER
        .get()
        .ok_or("the log filter of this process cannot be changed")?;
    let spec = spec.trim();
    if spec.is_empty() {
        return Err("an empty filter: give one, e.g. info or info,mesh_agent::proxy=debug".into());
    }
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(spec)
        .map_err(|e| format!("{spec:?} is not a log filter: {e}"))?;
    (f.reload)(filter)?;
    *f.current.lock().unwrap_or_else(|e| e.into_inner()) = spec.to_owned();
    Ok(())
}
