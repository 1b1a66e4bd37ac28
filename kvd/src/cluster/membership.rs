//! Who is in the cluster, learned by gossip.
//!
//! Membership uses `chitchat` (Quickwit's scuttlebutt gossip with a phi-accrual
//! failure detector) over UDP. Every node publishes a few keys about itself:
//!
//! - `addr`: the host:port clients and peers use to reach it;
//! - `status`: `member` (holds slots by placement), `leaving` (handing its
//!   slots off before it goes) or `left`;
//! - `slots`: the ranges it serves now (its `Owned` slots), so any node knows
//!   where to send a request even while slots are moving.
//!
//! Gossip is only ever a routing hint: whether a node may execute a command is
//! decided by its own slot authority (see [`super::authority`]).
//!
//! A node that stops answering stays a member (marked failed) until it has been
//! silent for a day: its slots' keys live only there, so moving its slots
//! elsewhere would serve empty data. Leaving is explicit (`CLUSTER LEAVE`).
//!
//! Gossip messages carry a cluster id derived from the cluster secret; chitchat
//! drops messages with another id, so a node without the secret is not heard.
//! (The id is not a MAC: someone who can capture gossip traffic could replay
//! it. Data links use a challenge-response with the secret; see [`super::peer`].)

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use sha2::{Digest, Sha256};

use super::slot::parse_ranges;

/// How often a node gossips with a few others.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(200);

/// A member's role in placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Member,
    Leaving,
    Left,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Member => "member",
            Status::Leaving => "leaving",
            Status::Left => "left",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "leaving" => Status::Leaving,
            "left" => Status::Left,
            _ => Status::Member,
        }
    }
}

/// One node as gossip describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub addr: String,
    pub status: Status,
    /// Answering gossip now (the failure detector's verdict; always true for us).
    pub live: bool,
    /// Slot ranges it serves.
    pub serves: Vec<(u16, u16)>,
}

/// The gossip side of a node.
pub struct Membership {
    handle: ChitchatHandle,
}

/// The chitchat cluster id for a secret: nodes with other secrets do not hear us.
fn cluster_id(secret: &str) -> String {
    let digest = Sha256::digest(format!("kvd-cluster-id:{secret}").as_bytes());
    format!("kvd-{}", hex::encode(&digest[..12]))
}

impl Membership {
    /// Starts gossiping on `gossip_addr`, introducing ourselves to `seeds`
    /// (their gossip addresses).
    pub async fn start(
        id: &str,
        addr: &str,
        gossip_addr: SocketAddr,
        seeds: Vec<String>,
        secret: &str,
        serves: String,
        status: Status,
    ) -> anyhow::Result<Membership> {
        // A new generation per start: peers then know the node restarted.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(id.to_string(), generation, gossip_addr),
            cluster_id: cluster_id(secret),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: gossip_addr,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig {
                initial_interval: GOSSIP_INTERVAL * 2,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(24 * 3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let kvs = vec![
            ("addr".to_string(), addr.to_string()),
            ("status".to_string(), status.as_str().to_string()),
            ("slots".to_string(), serves),
        ];
        let handle = spawn_chitchat(config, kvs, &UdpTransport)
            .await
            .map_err(|e| anyhow::anyhow!("cannot start gossip on {gossip_addr}: {e}"))?;
        Ok(Membership { handle })
    }

    /// Publishes one of our keys.
    pub async fn publish(&self, key: &str, value: String) {
        let cc = self.handle.chitchat();
        let mut cc = cc.lock().await;
        cc.self_node_state().set(key, value);
    }

    /// Every node gossip knows of, newest incarnation per node id, sorted by id.
    pub async fn members(&self) -> Vec<Member> {
        let cc = self.handle.chitchat();
        let cc = cc.lock().await;
        let live: std::collections::HashSet<ChitchatId> = cc.live_nodes().cloned().collect();
        let mut newest: std::collections::BTreeMap<String, (u64, Member)> = Default::default();
        for (cid, state) in cc.node_states() {
            let Some(addr) = state.get("addr") else { continue };
            let member = Member {
                id: cid.node_id.to_string(),
                addr: addr.to_string(),
                status: Status::parse(state.get("status").unwrap_or("member")),
                live: live.contains(cid),
                serves: state.get("slots").and_then(parse_ranges).unwrap_or_default(),
            };
            match newest.get(&member.id) {
                Some((g, _)) if *g >= cid.generation_id => {}
                _ => {
                    newest.insert(member.id.clone(), (cid.generation_id, member));
                }
            }
        }
        newest.into_values().map(|(_, m)| m).collect()
    }

    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}
