//! The tokio runtime of the data path, the node agent's and the waypoint's: how many worker
//! threads, and the scheduler slice they ask for.
//!
//! - `MESH_WORKER_THREADS` (1 to 256; default one per core, as ztunnel's
//!   `ZTUNNEL_WORKER_THREADS`).
//! - `MESH_SCHED_SLICE_US` (100 to 100000, or 0, the default, for the kernel's own): every
//!   runtime thread asks for that scheduler slice (`sys::set_sched_slice`; Linux 6.12 and
//!   later honour it, earlier kernels ignore it). A thread with a slice shorter than the
//!   running one's preempts it when woken instead of waiting. Off by default: in the lab at
//!   1000 requests/s, 100 µs took 10% off the latency the full mesh adds (p50 and p99) but
//!   added 80 µs at p50 to the capture-only passthrough, whose agent then preempts the
//!   application threads that woke it (docs/performance.md, "Tail latency").

use anyhow::Context as _;

/// The scheduler slice the data path's threads ask for by default, in microseconds (0: none,
/// the kernel's).
pub const DEFAULT_SLICE_US: u64 = 0;

/// What the runtime was built with, for the start-up log line.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// `None`: one per core (tokio's default).
    pub workers: Option<usize>,
    /// The slice asked for, in microseconds (0: none asked).
    pub slice_us: u64,
    /// The slice the kernel reports in force for the calling thread, in nanoseconds (0: the
    /// kernel ignored the request, or none was made).
    pub slice_in_force_ns: u64,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.workers {
            Some(n) => write!(f, "{n} worker threads")?,
            None => write!(f, "one worker thread per core")?,
        }
        match (self.slice_us, self.slice_in_force_ns) {
            (0, _) => write!(f, ", the kernel's scheduler slice"),
            (us, 0) => write!(
                f,
                ", scheduler slice {us} µs asked for and ignored (Linux 6.12 or later honours it)"
            ),
            (_, ns) => write!(f, ", scheduler slice {} µs", ns / 1000),
        }
    }
}

/// Builds the multi-thread runtime from the environment (module documentation); the calling
/// thread asks for the same slice, since it drives the runtime's main future.
pub fn build() -> anyhow::Result<(tokio::runtime::Runtime, Shape)> {
    let workers = env_number("MESH_WORKER_THREADS", 1, 256)?;
    let slice_us = match env_number("MESH_SCHED_SLICE_US", 0, 100_000)? {
        None => DEFAULT_SLICE_US,
        Some(0) => 0,
        Some(us) if us >= 100 => us as u64,
        Some(us) => anyhow::bail!(
            "MESH_SCHED_SLICE_US={us}: use 0 (the kernel's slice) or 100 to 100000 (the kernel \
             allows no shorter slice than 100 µs)"
        ),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    if slice_us > 0 {
        // A thread that cannot have it runs with the kernel's slice: a latency matter, not a
        // fault (the start-up line says what the kernel did with the request).
        builder.on_thread_start(move || {
            let _ = crate::sys::set_sched_slice(slice_us * 1000);
        });
    }
    let runtime = builder.enable_all().build()?;
    let slice_in_force_ns = if slice_us > 0 {
        crate::sys::set_sched_slice(slice_us * 1000).context("asking for a scheduler slice")?
    } else {
        0
    };
    Ok((
        runtime,
        Shape {
            workers,
            slice_us,
            slice_in_force_ns,
        },
    ))
}

/// A number from the environment variable `name`, within `min..=max`; `None` when unset or
/// empty.
fn env_number(name: &str, min: usize, max: usize) -> anyhow::Result<Option<usize>> {
    let Some(value) = std::env::var(name).ok().filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    value
        .parse()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .map(Some)
        .with_context(|| format!("{name}={value}: use a number from {min} to {max}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_up_line_says_what_the_kernel_did() {
        let shape = |slice_us, slice_in_force_ns| Shape {
            workers: Some(2),
            slice_us,
            slice_in_force_ns,
        };
        assert_eq!(
            shape(100, 100_000).to_string(),
            "2 worker threads, scheduler slice 100 µs"
        );
        assert!(shape(100, 0).to_string().contains("ignored"));
        assert!(shape(0, 0).to_string().contains("the kernel's"));
    }

    #[test]
    fn this_kernel_reports_the_slice_it_was_asked_for() {
        // Linux 6.12 and later report the custom slice; earlier ones 0. Either way no error,
        // and the thread gets its default back.
        let got = crate::sys::set_sched_slice(200_000).expect("sched_setattr");
        assert!(got == 0 || got == 200_000, "{got}");
        let _ = crate::sys::set_sched_slice(0);
    }
}
