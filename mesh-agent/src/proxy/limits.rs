//! Bounds on what HBONE clients can make the agent hold (`hbone.server` in the configuration):
//! connections at once per peer address and in total (a connection past them is closed at
//! once, counted), TLS handshakes in flight per peer and in total, and connects to
//! applications in flight (both waited for, within their timeouts). Counted for the agent as a
//! whole, over every captured pod's port 15008: one client cannot take what the node's other
//! clients need.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::{config::HboneServerConfig, metrics::Metrics};

/// Why a new HBONE connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `hbone.server.max_connections` are open.
    Connections,
    /// `hbone.server.max_connections_per_peer` are open from this address.
    ConnectionsPerPeer,
}

impl Refused {
    /// The `reason` label, which is also the setting that was reached.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Connections => "max_connections",
            Refused::ConnectionsPerPeer => "max_connections_per_peer",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// The agent's HBONE server limits, shared by every pod's listener.
#[derive(Debug)]
pub struct Limits {
    config: HboneServerConfig,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    connects: Arc<Semaphore>,
    /// Per peer address: open connections, and its handshake slots. An entry lives while the
    /// peer has a connection open.
    peers: Mutex<HashMap<IpAddr, Peer>>,
    refused: Family<RefusedLabels, Counter>,
    open: Gauge,
}

#[derive(Debug)]
struct Peer {
    connections: usize,
    handshakes: Arc<Semaphore>,
}

impl Limits {
    /// Limits as configured; registers `mesh_hbone_server_refused` and
    /// `mesh_hbone_server_connections`.
    pub fn new(config: &HboneServerConfig, metrics: &Metrics) -> Arc<Self> {
        let limits = Self {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            connects: Arc::new(Semaphore::new(config.max_connects_in_flight)),
            config: config.clone(),
            peers: Mutex::default(),
            refused: Family::default(),
            open: Gauge::default(),
        };
        metrics.register(
            "mesh_hbone_server_refused",
            "Inbound HBONE connections closed at once, by the limit they reached (hbone.server)",
            limits.refused.clone(),
        );
        metrics.register(
            "mesh_hbone_server_connections",
            "Inbound HBONE connections open (handshaking or established)",
            limits.open.clone(),
        );
        Arc::new(limits)
    }

    /// Takes a connection slot for a new connection from `peer`; `Err` (counted) when a limit
    /// is reached, and the connection must be closed.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        let refuse = |why: Refused| {
            self.refused
                .get_or_create(&RefusedLabels {
                    reason: why.as_str(),
                })
                .inc();
            why
        };
        let Ok(total) = self.connections.clone().try_acquire_owned() else {
            return Err(refuse(Refused::Connections));
        };
        let peer = peer.to_canonical();
        let handshakes = {
            let mut peers = self.lock();
            let entry = peers.entry(peer).or_insert_with(|| Peer {
                connections: 0,
                handshakes: Arc::new(Semaphore::new(self.config.max_handshakes_per_peer)),
            });
            if entry.connections >= self.config.max_connections_per_peer {
                return Err(refuse(Refused::ConnectionsPerPeer));
            }
            entry.connections += 1;
            entry.handshakes.clone()
        };
        self.open.inc();
        Ok(Admitted {
            limits: self.clone(),
            peer,
            handshakes,
            _slot: total,
        })
    }

    /// A slot to connect to an application (held until the connect is done), waited for at
    /// most `wait`; `None` when none came. The usual case, a free slot, costs no timer.
    pub async fn connect_slot(&self, wait: std::time::Duration) -> Option<SemaphorePermit<'_>> {
        if let Ok(slot) = self.connects.try_acquire() {
            return Some(slot);
        }
        tokio::time::timeout(wait, self.connects.acquire())
            .await
            .ok()?
            .ok()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Peer>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Peers with a connection open (for tests).
    #[cfg(test)]
    fn peers(&self) -> usize {
        self.lock().len()
    }
}

/// A handshake slot (the peer's and the agent's), given back when dropped.
pub type HandshakeSlot = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// An admitted HBONE connection's slot: given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<Limits>,
    peer: IpAddr,
    handshakes: Arc<Semaphore>,
    _slot: OwnedSemaphorePermit,
}

impl Admitted {
    /// Waits for a handshake slot, the peer's and then the agent's; hold it for the handshake.
    pub async fn handshake_slot(&self) -> Option<HandshakeSlot> {
        let own = self.handshakes.clone().acquire_owned().await.ok()?;
        let total = self.limits.handshakes.clone().acquire_owned().await.ok()?;
        Some((own, total))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limits.open.dec();
        let mut peers = self.limits.lock();
        if let Some(entry) = peers.get_mut(&self.peer) {
            entry.connections -= 1;
            if entry.connections == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, per_peer: usize, handshakes_per_peer: usize) -> Arc<Limits> {
        let config = HboneServerConfig {
            max_connections: connections,
            max_connections_per_peer: per_peer,
            max_handshakes: 4,
            max_handshakes_per_peer: handshakes_per_peer,
            ..HboneServerConfig::default()
        };
        Limits::new(&config, &Metrics::new())
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn connections_are_bounded_per_peer_and_in_total_and_given_back() {
        let l = limits(3, 2, 1);
        let a1 = l.admit(A).expect("first of A");
        let _a2 = l.admit(A).expect("second of A");
        assert_eq!(l.admit(A).err(), Some(Refused::ConnectionsPerPeer));
        // The same peer as a v4-mapped address is the same peer.
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(l.admit(mapped).err(), Some(Refused::ConnectionsPerPeer));
        let _b1 = l.admit(B).expect("B has its own share");
        assert_eq!(l.admit(B).err(), Some(Refused::Connections));
        drop(a1);
        let _b2 = l.admit(B).expect("a slot was given back");
        let refused = |reason| l.refused.get_or_create(&RefusedLabels { reason }).get();
        assert_eq!(refused("max_connections_per_peer"), 2);
        assert_eq!(refused("max_connections"), 1);
        assert_eq!(l.open.get(), 3);
    }

    #[test]
    fn a_peer_is_forgotten_with_its_last_connection() {
        let l = limits(8, 8, 1);
        let conns: Vec<_> = (0..3).map(|_| l.admit(A).expect("admit")).collect();
        assert_eq!(l.peers(), 1);
        drop(conns);
        assert_eq!(l.peers(), 0);
        assert_eq!(l.open.get(), 0);
    }

    #[tokio::test]
    async fn a_peer_waits_for_its_own_handshake_slots_not_for_others() {
        let l = limits(8, 8, 1);
        let a1 = l.admit(A).expect("admit");
        let a2 = l.admit(A).expect("admit");
        let b = l.admit(B).expect("admit");
        let held = a1.handshake_slot().await.expect("slot");
        let waiting = a2.handshake_slot();
        tokio::pin!(waiting);
        assert!(
            futures_poll_once(waiting.as_mut()).await.is_none(),
            "a second handshake of A waits while A's one slot is taken"
        );
        // B is not held up by A.
        let _b_slot = b.handshake_slot().await.expect("B's slot");
        drop(held);
        let _slots = waiting.await.expect("A's slot once free");
    }

    /// Polls a future once: `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
