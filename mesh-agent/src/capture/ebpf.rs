//! Loading the eBPF object: globals, pins, typed map handles, and the kernel counters.

use std::{os::fd::AsFd, path::Path, sync::Arc};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    direction, globals, maps, programs, CidrKey, ConnKey, ListenerKey, PodAddr, PodConfig, PortKey,
    Reason, GLOBAL_SCOPE,
};
use tracing::{debug, info};

use super::Error;
use crate::{
    config::CaptureExclusions,
    metrics::{ProgramReason, ReadCounters},
};

/// The object built by `cargo xtask build-ebpf`, embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// The loaded programs and the maps the control path writes.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub pods: HashMap<MapData, u64, PodConfig>,
    pub pod_addrs: HashMap<MapData, PodAddr, PodConfig>,
    pub ports: HashMap<MapData, PortKey, u8>,
    pub cidrs: LpmTrie<MapData, CidrKey, u8>,
    pub listeners: SockHash<MapData, ListenerKey>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

/// The eBPF counters, read at each scrape.
pub type Collector = Box<dyn prometheus_client::collector::Collector>;

/// The map the data path reads (`MESH_ORIG_DST`), shared by every accept loop.
#[derive(Debug)]
pub struct OrigDstMap(MapData);

impl OrigDstMap {
    /// Takes the original destination recorded for a client address (one syscall).
    pub fn take(&self, key: &ConnKey) -> std::io::Result<Option<mesh_common::OrigDst>> {
        crate::sys::map_lookup_and_delete(self.0.fd().as_fd(), key)
    }
}

/// Loads the object, pins programs and maps under `dir`, clears state a previous agent left in
/// reused pinned maps, and installs the global exclusions.
pub fn load(
    dir: &Path,
    global: &CaptureExclusions,
) -> Result<(Loaded, Arc<OrigDstMap>, Collector), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .override_global(globals::OUTBOUND_PORT, &mesh_common::ports::OUTBOUND, true)
        .load(OBJECT)
        .map_err(|e| Error::Load(super::chain(&e)))?;
    for name in programs::ALL {
        let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        let loaded = match name {
            programs::CONNECT4 | programs::CONNECT6 => {
                <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load())
            }
            programs::SOCK_OPS => <&mut SockOps>::try_from(program).and_then(|p| p.load()),
            _ => <&mut SkLookup>::try_from(program).and_then(|p| p.load()),
        };
        loaded.map_err(|e| Error::Verifier {
            program: name,
            message: verifier_message(&e),
        })?;
        let pin = dir.join(name);
        // A pin from a previous agent refers to the previous program: replace it.
        let _ = std::fs::remove_file(&pin);
        let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        program.pin(&pin).map_err(|e| Error::Pin {
            path: pin.clone(),
            message: super::chain(&e),
        })?;
        debug!(program = name, pin = %pin.display(), "program loaded");
    }
    let mut take = |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap(name));
    let map_err = |name: &'static str| {
        move |e: aya::maps::MapError| Error::Map {
            map: name,
            message: super::chain(&e),
        }
    };
    let pods = HashMap::try_from(take(maps::PODS)?).map_err(map_err(maps::PODS))?;
    let pod_addrs = HashMap::try_from(take(maps::POD_ADDRS)?).map_err(map_err(maps::POD_ADDRS))?;
    let ports =
        HashMap::try_from(take(maps::EXCLUDED_PORTS)?).map_err(map_err(maps::EXCLUDED_PORTS))?;
    let cidrs =
        LpmTrie::try_from(take(maps::EXCLUDED_CIDRS)?).map_err(map_err(maps::EXCLUDED_CIDRS))?;
    let listeners = SockHash::try_from(take(maps::LISTENERS)?).map_err(map_err(maps::LISTENERS))?;
    let orig_dst = match take(maps::ORIG_DST)? {
        aya::maps::Map::LruHashMap(data) => data,
        _ => {
            return Err(Error::Map {
                map: maps::ORIG_DST,
                message: "not an LRU hash map".into(),
            })
        }
    };
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(take(maps::COUNTERS)?).map_err(map_err(maps::COUNTERS))?;
    let mut loaded = Loaded {
        ebpf,
        pods,
        pod_addrs,
        ports,
        cidrs,
        listeners,
    };
    loaded.clear()?;
    loaded.set_exclusions(GLOBAL_SCOPE, global, true)?;
    info!(dir = %dir.display(), "eBPF programs loaded and pinned");
    Ok((
        loaded,
        Arc::new(OrigDstMap(orig_dst)),
        Box::new(counter_collector(counters)),
    ))
}

fn verifier_message(e: &aya::programs::ProgramError) -> String {
    // The verifier log is long; its tail says what was rejected.
    let text = format!("{e:#}");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn counter_collector(
    counters: PerCpuArray<MapData, u64>,
) -> impl prometheus_client::collector::Collector {
    ReadCounters {
        name: "mesh_capture_events",
        help: "eBPF capture decisions by program and reason (redirects, skips, failures)",
        read: move || {
            Reason::ALL
                .iter()
                .map(|r| {
                    let total = counters
                        .get(&(*r as u32), 0)
                        .map(|v| v.iter().sum())
                        .unwrap_or(0);
                    let (program, reason) = r.labels();
                    (ProgramReason { program, reason }, total)
                })
                .collect()
        },
    }
}

impl Loaded {
    /// Removes every entry of the control maps (left by a previous agent in pinned maps).
    fn clear(&mut self) -> Result<(), Error> {
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| Error::Map {
                map,
                message: super::chain(&e),
            }
        };
        let keys: Vec<u64> = self.pods.keys().filter_map(Result::ok).collect();
        for k in keys {
            self.pods.remove(&k).map_err(map_err(maps::PODS))?;
        }
        let keys: Vec<PodAddr> = self.pod_addrs.keys().filter_map(Result::ok).collect();
        for k in keys {
            self.pod_addrs
                .remove(&k)
                .map_err(map_err(maps::POD_ADDRS))?;
        }
        let keys: Vec<PortKey> = self.ports.keys().filter_map(Result::ok).collect();
        for k in keys {
            self.ports
                .remove(&k)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        let keys: Vec<Key<CidrKey>> = self.cidrs.keys().filter_map(Result::ok).collect();
        for k in keys {
            self.cidrs
                .remove(&k)
                .map_err(map_err(maps::EXCLUDED_CIDRS))?;
        }
        Ok(())
    }

    /// Installs (`add`) or removes the exclusions of one scope.
    pub fn set_exclusions(
        &mut self,
        scope: u32,
        ex: &CaptureExclusions,
        add: bool,
    ) -> Result<(), Error> {
        let ports = ex
            .exclude_outbound_ports
            .iter()
            .map(|p| (*p, direction::OUTBOUND))
            .chain(
                ex.exclude_inbound_ports
                    .iter()
                    .map(|p| (*p, direction::INBOUND)),
            );
        for (port, direction) in ports {
            let key = PortKey {
                scope,
                port,
                direction,
                _pad: 0,
            };
            let res = if add {
                self.ports.insert(key, 1, 0)
            } else {
                self.ports.remove(&key)
            };
            res.map_err(|e| Error::Map {
                map: maps::EXCLUDED_PORTS,
                message: super::chain(&e),
            })?;
        }
        for net in &ex.exclude_outbound_cidrs {
            let (ip, len) = match net {
                ipnet::IpNet::V4(n) => (n.addr().to_ipv6_mapped(), 96 + u32::from(n.prefix_len())),
                ipnet::IpNet::V6(n) => (n.addr(), u32::from(n.prefix_len())),
            };
            let key = Key::new(
                32 + len,
                CidrKey {
                    scope_be: scope.to_be(),
                    ip: super::words(ip),
                },
            );
            let res = if add {
                self.cidrs.insert(&key, 1, 0)
            } else {
                self.cidrs.remove(&key)
            };
            res.map_err(|e| Error::Map {
                map: maps::EXCLUDED_CIDRS,
                message: super::chain(&e),
            })?;
        }
        Ok(())
    }

    /// A program by name, for attaching.
    pub fn program(&mut self, name: &'static str) -> Result<&mut aya::programs::Program, Error> {
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))
    }
}
