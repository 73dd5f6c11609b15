//! Inspection: what the node agent tells an operator about itself, and `mesh-agent inspect`,
//! which asks it. The agent side ([`Node`]) answers the admin endpoint's `/config_dump`,
//! `/connections` and `/why` from the live state, the capture task and the kernel; the
//! command side (`cli`) reads those answers and prints tables, JSON, or a verdict.
//!
//! Everything here only reads: the answers never change capture, state, policy or a
//! service's round robin.

pub mod cli;
mod cli_check;
mod cli_tables;
mod dump;
pub mod why;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::{
    admin::{BoxFuture, Inspect, Readiness},
    config::Config,
    pods, proxy,
};

/// How long the admin endpoint waits for the capture task's answer (it answers between two
/// changes; frozen for a handover, it does not answer).
const CAPTURE_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

/// The node agent's answers to the admin endpoint.
#[derive(Debug)]
pub struct Node {
    /// The effective configuration, as JSON (it does not change while the agent runs).
    config: serde_json::Value,
    trust_domain: String,
    /// Where capture is pinned.
    bpf_dir: std::path::PathBuf,
    /// One inspection at a time: each asks the capture task and walks the maps.
    one_at_a_time: tokio::sync::Semaphore,
    /// The node-wide capture exclusions (`capture`).
    exclusions: crate::config::CaptureExclusions,
    inputs: Arc<proxy::Inputs>,
    commands: mpsc::Sender<pods::Command>,
    readiness: Arc<Readiness>,
}

impl Node {
    pub fn new(
        config: &Config,
        inputs: Arc<proxy::Inputs>,
        commands: mpsc::Sender<pods::Command>,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            config: serde_json::to_value(config)
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
            trust_domain: config.identity.trust_domain.clone(),
            exclusions: config.capture.clone(),
            bpf_dir: config.bpf_dir(),
            one_at_a_time: tokio::sync::Semaphore::new(1),
            inputs,
            commands,
            readiness,
        }
    }

    /// Waits for the other inspections (at most [`CAPTURE_ANSWER`]).
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, String> {
        match tokio::time::timeout(CAPTURE_ANSWER, self.one_at_a_time.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err("busy with another inspection: ask again".to_owned()),
        }
    }

    /// The maps and their fill, read by walking them off the runtime's threads.
    async fn maps(&self) -> Vec<crate::capture::inspect::MapView> {
        let layout = crate::capture::pins::Layout::new(&self.bpf_dir);
        tokio::task::spawn_blocking(move || crate::capture::inspect::maps(&layout))
            .await
            .unwrap_or_default()
    }

    /// The capture task's view, or why there is none.
    async fn capture(&self) -> Result<pods::inspect::CaptureView, String> {
        let (tx, rx) = oneshot::channel();
        let asked = async {
            self.commands
                .send(pods::Command::Inspect(tx))
                .await
                .map_err(|_| "the capture task has ended (the agent is stopping)".to_owned())?;
            rx.await.map_err(|_| {
                "capture is frozen: the agent is handing over to its successor; ask again"
                    .to_owned()
            })
        };
        tokio::time::timeout(CAPTURE_ANSWER, asked)
            .await
            .map_err(|_| {
                format!(
                    "the capture task did not answer within {CAPTURE_ANSWER:?} (it may still \
                     be waiting for the first full state)"
                )
            })?
    }
}

impl Inspect for Node {
    fn config_dump(&self) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let _turn = self.turn().await?;
            let capture = self.capture().await?;
            let maps = self.maps().await;
            Ok(dump::config_dump(self, &capture, &maps))
        })
    }

    fn connections(&self) -> serde_json::Value {
        serde_json::json!({
            "node": self.inputs.node,
            "connections": self.inputs.connections.list(),
        })
    }

    fn why(&self, src: &str, dst: &str) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        let (src, dst) = (src.to_owned(), dst.to_owned());
        Box::pin(async move {
            let _turn = self.turn().await?;
            let capture = self.capture().await?;
            let snap = self.inputs.store.load();
            let asked = why::Question::parse(&src, &dst)?;
            let here = why::Here {
                node: &self.inputs.node,
                trust_domain: &self.trust_domain,
                same_node_fast_path: self.inputs.same_node_fast_path,
                global: &self.exclusions,
                capture: &capture,
            };
            let answer = why::answer(&snap, &here, &asked)?;
            serde_json::to_value(answer).map_err(|e| e.to_string())
        })
    }
}
