//! What cluster-aware clients (`redis-cli -c`, redis-py's `RedisCluster`, the
//! `redis` crate's cluster client) see of a replicated cluster: `CLUSTER
//! SLOTS` lists each run of slots with its replica set — a live holder first
//! as the "master" clients send to, the other holders as its "replicas" — and
//! `CLUSTER NODES`, `INFO`, `MYID` and `KEYSLOT` answer as a Redis Cluster
//! node does. Any node serves every key (it runs the key's CASPaxos round
//! itself), so a client that routes by these lists lands on a holder and
//! saves the hop to one, and one that does not still works.
//!
//! A holder this node last found unreachable is listed after the live ones,
//! so a client that asks again after a node dies routes its slots to a live
//! node at once.

use std::collections::HashSet;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::layout::Layout;
use super::Replicas;
use crate::cluster::slot::{key_slot, SLOTS};
use crate::command::spec::Spec;
use crate::reply::Reply;

/// A node's 40-character id, as Redis Cluster shows ids: derived from its
/// address (a replicated node is named by its address).
pub fn node_id(addr: &str) -> String {
    hex::encode(&Sha256::digest(addr.as_bytes())[..20])
}

/// Runs of consecutive slots with the same replica set, live holders first:
/// (first slot, last slot, holders' addresses).
fn runs(layout: &Layout, suspects: &HashSet<String>) -> Vec<(u16, u16, Vec<String>)> {
    let mut out: Vec<(u16, u16, Vec<String>)> = Vec::new();
    for s in 0..SLOTS as u16 {
        // The placement's order: its owner first. Owners are spread evenly
        // over the nodes, so routing clients spread their load the same way
        // (sorted addresses put one node first for every slot).
        let mut holders: Vec<String> = layout
            .slot_holders(s)
            .into_iter()
            .map(|i| layout.nodes[i].clone())
            .collect();
        // Stable: live holders keep their order, then the suspect ones.
        holders.sort_by_key(|h| suspects.contains(h));
        match out.last_mut() {
            Some((_, end, last)) if *last == holders => *end = s,
            _ => out.push((s, s, holders)),
        }
    }
    out
}

/// A node in CLUSTER SLOTS: where the client reaches it (`shown`), and the
/// id of its address.
fn node_entry(addr: &str, shown: &str) -> Reply {
    let (host, port) = split_addr(shown);
    Reply::Array(vec![
        Reply::bulk_str(&host),
        Reply::Int(port),
        Reply::bulk_str(&node_id(addr)),
        Reply::Array(vec![]),
    ])
}

/// CLUSTER SHARDS, as Redis 7 answers it: one shard per replica set (its
/// slots, then its nodes: the first holder as `master`, the others as
/// `replica`). A shard here is the slots that share a holder list in
/// [`runs`]' order; a holder this node found unreachable is `failed`.
fn shards(layout: &Layout, suspects: &HashSet<String>, shown: &dyn Fn(&str) -> String) -> Reply {
    let mut shards: Vec<(Vec<String>, Vec<Reply>)> = Vec::new();
    for (a, b, holders) in runs(layout, suspects) {
        let slots = [Reply::Int(a as i64), Reply::Int(b as i64)];
        match shards.iter_mut().find(|(h, _)| *h == holders) {
            Some((_, ranges)) => ranges.extend(slots),
            None => shards.push((holders, slots.to_vec())),
        }
    }
    let text = |s: &str| Reply::bulk_str(s);
    Reply::Array(
        shards
            .into_iter()
            .map(|(holders, slots)| {
                let nodes = holders
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| {
                        let (host, port) = split_addr(&shown(addr));
                        let role = if i == 0 { "master" } else { "replica" };
                        let health = if suspects.contains(addr) {
                            "failed"
                        } else {
                            "online"
                        };
                        Reply::Map(vec![
                            (text("id"), text(&node_id(addr))),
                            (text("port"), Reply::Int(port)),
                            (text("ip"), text(&host)),
                            (text("endpoint"), text(&host)),
                            (text("role"), text(role)),
                            (text("replication-offset"), Reply::Int(0)),
                            (text("health"), text(health)),
                        ])
                    })
                    .collect();
                Reply::Map(vec![
                    (text("slots"), Reply::Array(slots)),
                    (text("nodes"), Reply::Array(nodes)),
                ])
            })
            .collect(),
    )
}

impl Replicas {
    /// CLUSTER subcommands of a replicated node; `None` for those answered
    /// elsewhere (FORGET, LEAVE, HELP). Nodes are shown at their ports for
    /// a client of the asking one's kind (`tls`: it came over TLS), as Redis
    /// Cluster shows them.
    pub fn cluster_command(&self, spec: &'static Spec, args: &[Bytes], tls: bool) -> Option<Reply> {
        let layout = self.layout();
        let suspects: HashSet<String> = self.suspect_members().into_iter().collect();
        let shown = |addr: &str| self.heartbeats.lock().client_addr(addr, tls);
        Some(match spec.name {
            "cluster|myid" => Reply::bulk_str(&node_id(&self.addr)),
            "cluster|keyslot" => Reply::Int(key_slot(&args[2]) as i64),
            "cluster|slots" => Reply::Array(
                runs(&layout, &suspects)
                    .into_iter()
                    .map(|(a, b, holders)| {
                        let mut entry = vec![Reply::Int(a as i64), Reply::Int(b as i64)];
                        entry.extend(holders.iter().map(|h| node_entry(h, &shown(h))));
                        Reply::Array(entry)
                    })
                    .collect(),
            ),
            "cluster|nodes" => {
                let runs = runs(&layout, &suspects);
                let mut out = String::new();
                for addr in &layout.nodes {
                    let mut flags = String::new();
                    if *addr == self.addr {
                        flags.push_str("myself,");
                    }
                    flags.push_str("master");
                    if suspects.contains(addr) {
                        flags.push_str(",fail?");
                    }
                    let ranges: Vec<(u16, u16)> = runs
                        .iter()
                        .filter(|r| r.2.first() == Some(addr))
                        .map(|r| (r.0, r.1))
                        .collect();
                    let connected = !suspects.contains(addr);
                    out.push_str(&node_line(
                        &node_id(addr),
                        &shown(addr),
                        &flags,
                        layout.version,
                        connected,
                        &ranges,
                    ));
                }
                Reply::Verbatim("txt", Bytes::from(out))
            }
            "cluster|info" => {
                let state = if layout.version == 0 { "fail" } else { "ok" };
                let (under, _) = self.under_replicated(&layout);
                Reply::Verbatim(
                    "txt",
                    Bytes::from(format!(
                        "cluster_state:{state}\r\ncluster_slots_assigned:{SLOTS}\r\n\
                         cluster_slots_ok:{}\r\ncluster_slots_pfail:{under}\r\ncluster_slots_fail:0\r\n\
                         cluster_known_nodes:{}\r\ncluster_size:{}\r\ncluster_current_epoch:{}\r\n\
                         cluster_my_epoch:{}\r\n{}",
                        SLOTS - under,
                        layout.nodes.len(),
                        layout.nodes.len(),
                        layout.version,
                        layout.version,
                        self.info()
                    )),
                )
            }
            "cluster|shards" => shards(&layout, &suspects, &shown),
            "cluster|countkeysinslot" | "cluster|getkeysinslot" => Reply::error(format!(
                "ERR '{}' is not supported by a replicated kvd yet (docs/PROTOCOL.md, \"Replication\")",
                spec.name.replace('|', " ")
            )),
            _ => return None,
        })
    }
}

/// `host:port` as its host and port (0 when there is none).
pub(crate) fn split_addr(addr: &str) -> (String, i64) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

/// One line of CLUSTER NODES, with its newline:
/// `<id> <host:port@busport> <flags> - 0 0 <epoch> <link state> <slot ranges>`.
pub(crate) fn node_line(
    id: &str,
    addr: &str,
    flags: &str,
    epoch: u64,
    connected: bool,
    ranges: &[(u16, u16)],
) -> String {
    let (host, port) = split_addr(addr);
    let slots = crate::cluster::slot::format_ranges(ranges).replace(',', " ");
    let link = if connected { "connected" } else { "disconnected" };
    let line = format!(
        "{id} {host}:{port}@{} {flags} - 0 0 {epoch} {link} {slots}",
        port + 10000
    );
    format!("{}\n", line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_every_slot_once_with_live_holders_first() {
        let nodes: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:7379")).collect();
        let layout = Layout::new(1, nodes.clone(), 3, &nodes[0]);
        let suspects: HashSet<String> = [nodes[1].clone()].into_iter().collect();
        let runs = runs(&layout, &suspects);
        let mut next = 0u32;
        for (a, b, holders) in &runs {
            assert_eq!(*a as u32, next);
            assert!(b >= a);
            next = *b as u32 + 1;
            assert_eq!(holders.len(), 3);
            if holders.contains(&nodes[1]) {
                assert_eq!(holders.last(), Some(&nodes[1]), "a suspect holder is listed last");
            }
            let mut want: Vec<&str> = layout.holder_addrs(*a);
            let mut got: Vec<&str> = holders.iter().map(String::as_str).collect();
            want.sort();
            got.sort();
            assert_eq!(got, want);
        }
        assert_eq!(next as usize, SLOTS);
        assert_eq!(node_id("10.0.0.1:7379").len(), 40);
    }

    /// Cluster-aware clients send a slot's commands to the first holder
    /// listed: with every node holding every slot (3 nodes, R = 3) each must
    /// come first for its share of the slots. (Listed in address order, one
    /// node came first for all 16,384 and took every routed command.)
    #[test]
    fn the_first_holders_are_spread_over_the_nodes() {
        let nodes: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:760{i}")).collect();
        let layout = Layout::new(1, nodes.clone(), 3, &nodes[0]);
        let mut first = std::collections::HashMap::<String, usize>::new();
        for (a, b, holders) in runs(&layout, &HashSet::new()) {
            *first.entry(holders[0].clone()).or_default() += (b - a) as usize + 1;
        }
        for n in &nodes {
            let share = first.get(n).copied().unwrap_or(0) as f64 / SLOTS as f64;
            assert!(
                (0.25..0.42).contains(&share),
                "{n} comes first for {share:.3} of the slots"
            );
        }
    }
}
