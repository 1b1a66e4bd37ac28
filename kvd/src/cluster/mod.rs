//! What a kvd cluster is built from, below the replication engine that runs
//! it ([`crate::replica`]): every slot on R nodes, each key's changes agreed
//! by a CASPaxos round on its replicas.
//!
//! - [`slot`]: Redis Cluster's 16,384 hash slots (CRC16, `{hash tags}`).
//! - [`ring`]: placement, the slot → nodes map every node computes alike from
//!   the membership (consistent hashing with bounded loads).
//! - [`peer`]: authenticated, pooled, pipelined links to other nodes.
//! - [`paxos`]: CASPaxos's ballots and quorum rule.

pub mod paxos;
pub mod peer;
pub mod ring;
pub mod slot;

/// A connection's cluster state.
#[derive(Default)]
pub struct SessionState {
    /// The challenge sent to a connecting peer, awaiting its proof.
    pub challenge: Option<String>,
    /// Set once the connection proved it is a peer node (its id).
    pub peer: Option<String>,
    /// Each watched key and its accepted ballot at WATCH.
    pub watched: Vec<(bytes::Bytes, paxos::Ballot)>,
    /// The slot the open MULTI's commands are bound to (Redis Cluster's rule:
    /// one slot per transaction).
    pub txn_slot: Option<u16>,
}
