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

/// The object built by `cargo xtask build-ebpf`, embedded at compile time (feature `ebpf`).
#[cfg(feature = "ebpf")]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT")));
#[cfg(not(feature = "ebpf"))]
static OBJECT: Option<&[u8]> = None;

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
pub struct OrigDstMap(crate::sys::bpf::TakeMap<ConnKey, mesh_common::OrigDst>);

impl OrigDstMap {
    /// Takes the original destination recorded for a client address (one syscall).
    pub fn take(&self, key: &ConnKey) -> std::io::Result<Option<mesh_common::OrigDst>> {
        self.0.take(key)
    }
}

/// The object this agent embeds (`None`: built without the `ebpf` feature).
pub fn object() -> Option<&'static [u8]> {
    OBJECT
}

/// Loads the object into the kernel, reusing the pinned maps of `layout` (a previous agent's
/// state stays: the caller adopts or sweeps it) and pinning maps and programs there, and sets
/// the global exclusions to `global`.
pub fn load(
    layout: &super::pins::Layout,
    global: &CaptureExclusions,
) -> Result<(Loaded, Arc<OrigDstMap>, Collector), Error> {
    let dir = &layout.abi_dir;
    let mut ebpf =
        open(OBJECT.ok_or(Error::NoObject)?, dir).map_err(|e| Error::Load(super::chain(&e)))?;
    for name in programs::ALL {
        load_program(&mut ebpf, name)?;
        let pin = dir.join(name);
        // A pin from a previous agent refers to its program (links keep theirs until adopted).
        let _ = std::fs::remove_file(&pin);
        let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        program.pin(&pin).map_err(|e| Error::Pin {
            path: pin.clone(),
            message: super::chain(&e),
        })?;
        debug!(program = name, pin = %pin.display(), "program loaded");
    }
    let (mut loaded, orig_dst, collector) = Loaded::new(ebpf)?;
    loaded.sync_exclusions(GLOBAL_SCOPE, global)?;
    info!(dir = %dir.display(), "eBPF programs loaded and pinned");
    Ok((loaded, orig_dst, collector))
}

/// Opens `object` as the agent does: its maps created, or opened where `dir` has them pinned
/// (by name; a new map is pinned there), and the load-time globals set. No program is loaded
/// yet ([`load_program`]). `mesh-agent check` opens the object the same way in a directory of
/// its own.
pub fn open(object: &[u8], dir: &Path) -> Result<Ebpf, aya::EbpfError> {
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .override_global(globals::OUTBOUND_PORT, &mesh_common::ports::OUTBOUND, true)
        .load(object)
}

/// Loads one program of an opened object into the kernel: the verifier runs here, and a
/// rejection is [`Error::Verifier`] with the verifier's last lines.
pub fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), Error> {
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
    })
}

impl Loaded {
    /// Takes the maps the control path writes out of an opened object, typed, with the map
    /// the data path reads and the counters' collector.
    pub fn new(mut ebpf: Ebpf) -> Result<(Loaded, Arc<OrigDstMap>, Collector), Error> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap(name));
        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| Error::Map {
                map: name,
                message: super::chain(&e),
            }
        };
        let pods = HashMap::try_from(take(maps::PODS)?).map_err(map_err(maps::PODS))?;
        let pod_addrs =
            HashMap::try_from(take(maps::POD_ADDRS)?).map_err(map_err(maps::POD_ADDRS))?;
        let ports = HashMap::try_from(take(maps::EXCLUDED_PORTS)?)
            .map_err(map_err(maps::EXCLUDED_PORTS))?;
        let cidrs = LpmTrie::try_from(take(maps::EXCLUDED_CIDRS)?)
            .map_err(map_err(maps::EXCLUDED_CIDRS))?;
        let listeners =
            SockHash::try_from(take(maps::LISTENERS)?).map_err(map_err(maps::LISTENERS))?;
        let orig_dst = match take(maps::ORIG_DST)? {
            aya::maps::Map::LruHashMap(data) => crate::sys::bpf::TakeMap::new(data.fd().as_fd())
                .map_err(|e| Error::Map {
                    map: maps::ORIG_DST,
                    message: e.to_string(),
                })?,
            _ => {
                return Err(Error::Map {
                    map: maps::ORIG_DST,
                    message: "not an LRU hash map".into(),
                })
            }
        };
        let counters: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(take(maps::COUNTERS)?).map_err(map_err(maps::COUNTERS))?;
        let loaded = Loaded {
            ebpf,
            pods,
            pod_addrs,
            ports,
            cidrs,
            listeners,
        };
        Ok((
            loaded,
            Arc::new(OrigDstMap(orig_dst)),
            Box::new(counter_collector(counters)),
        ))
    }
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

/// What the control maps hold, to reconcile with the pods an agent serves.
#[derive(Debug, Default)]
pub struct Inventory {
    /// `MESH_PODS`: netns cookie and scope of every captured pod.
    pub pods: Vec<(u64, PodConfig)>,
}

/// The entries that belong to the pods an agent serves; everything else is swept.
#[derive(Debug, Default)]
pub struct Live {
    pub cookies: std::collections::HashSet<u64>,
    pub scopes: std::collections::HashSet<u32>,
    /// Address words of live pods, with their pod's scope.
    pub addrs: std::collections::HashMap<[u32; 4], u32>,
}

/// Counts of entries [`Loaded::sweep`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub pods: usize,
    pub addrs: usize,
    pub exclusions: usize,
    pub listeners: usize,
}

impl Loaded {
    /// Reads the pod entries of the control maps (left by a previous agent, or this one's).
    pub fn inventory(&self) -> Inventory {
        Inventory {
            pods: self.pods.iter().filter_map(Result::ok).collect(),
        }
    }

    /// Removes every entry that belongs to no live pod (a pod released while no agent ran,
    /// or an agent that stopped between writing an entry and pinning the pod's links).
    pub fn sweep(&mut self, live: &Live) -> Result<Swept, Error> {
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| Error::Map {
                map,
                message: super::chain(&e),
            }
        };
        let mut swept = Swept::default();
        let keys: Vec<u64> = self.pods.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| !live.cookies.contains(k)) {
            self.pods.remove(&k).map_err(map_err(maps::PODS))?;
            swept.pods += 1;
        }
        let entries: Vec<(PodAddr, PodConfig)> =
            self.pod_addrs.iter().filter_map(Result::ok).collect();
        for (addr, config) in entries {
            if live.addrs.get(&addr.ip) != Some(&config.scope) {
                self.pod_addrs
                    .remove(&addr)
                    .map_err(map_err(maps::POD_ADDRS))?;
                swept.addrs += 1;
            }
        }
        let dead = |scope: u32| scope != GLOBAL_SCOPE && !live.scopes.contains(&scope);
        let keys: Vec<PortKey> = self.ports.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| dead(k.scope)) {
            self.ports
                .remove(&k)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
            swept.exclusions += 1;
        }
        let keys: Vec<Key<CidrKey>> = self.cidrs.keys().filter_map(Result::ok).collect();
        for k in keys
            .into_iter()
            .filter(|k| dead(u32::from_be(k.data().scope_be)))
        {
            self.cidrs
                .remove(&k)
                .map_err(map_err(maps::EXCLUDED_CIDRS))?;
            swept.exclusions += 1;
        }
        let keys: Vec<ListenerKey> = self.listeners.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| !live.addrs.contains_key(&k.ip)) {
            self.listeners
                .remove(&k)
                .map_err(map_err(maps::LISTENERS))?;
            swept.listeners += 1;
        }
        Ok(swept)
    }

    /// Makes the exclusions of one scope exactly `ex`: adds what is missing, removes what is no
    /// longer wanted (entries a previous agent wrote included). No entry that stays is touched,
    /// so no connection sees a moment without it.
    pub fn sync_exclusions(&mut self, scope: u32, ex: &CaptureExclusions) -> Result<(), Error> {
        let (want_ports, want_cidrs) = exclusion_keys(scope, ex);
        let have: Vec<PortKey> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.scope == scope)
            .collect();
        let port_err = |e: aya::maps::MapError| Error::Map {
            map: maps::EXCLUDED_PORTS,
            message: super::chain(&e),
        };
        for k in &want_ports {
            if !have.contains(k) {
                self.ports.insert(*k, 1, 0).map_err(port_err)?;
            }
        }
        for k in have.iter().filter(|k| !want_ports.contains(k)) {
            self.ports.remove(k).map_err(port_err)?;
        }
        let same = |a: &Key<CidrKey>, b: &Key<CidrKey>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        let have: Vec<Key<CidrKey>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| u32::from_be(k.data().scope_be) == scope)
            .collect();
        let cidr_err = |e: aya::maps::MapError| Error::Map {
            map: maps::EXCLUDED_CIDRS,
            message: super::chain(&e),
        };
        for k in &want_cidrs {
            if !have.iter().any(|h| same(h, k)) {
                self.cidrs.insert(k, 1, 0).map_err(cidr_err)?;
            }
        }
        for k in have
            .iter()
            .filter(|h| !want_cidrs.iter().any(|w| same(h, w)))
        {
            self.cidrs.remove(k).map_err(cidr_err)?;
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

/// The map keys of one scope's exclusions.
fn exclusion_keys(scope: u32, ex: &CaptureExclusions) -> (Vec<PortKey>, Vec<Key<CidrKey>>) {
    let ports = ex
        .exclude_outbound_ports
        .iter()
        .map(|p| (*p, direction::OUTBOUND))
        .chain(
            ex.exclude_inbound_ports
                .iter()
                .map(|p| (*p, direction::INBOUND)),
        )
        .map(|(port, direction)| PortKey {
            scope,
            port,
            direction,
            _pad: 0,
        })
        .collect();
    let cidrs = ex
        .exclude_outbound_cidrs
        .iter()
        .map(|net| {
            let (ip, len) = match net {
                ipnet::IpNet::V4(n) => (n.addr().to_ipv6_mapped(), 96 + u32::from(n.prefix_len())),
                ipnet::IpNet::V6(n) => (n.addr(), u32::from(n.prefix_len())),
            };
            Key::new(
                32 + len,
                CidrKey {
                    scope_be: scope.to_be(),
                    ip: super::words(ip),
                },
            )
        })
        .collect();
    (ports, cidrs)
}
