//! `CLUSTER ...` in Redis Cluster's formats, and the internal `KVD.*`
//! commands peers use to authenticate and to move slots.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::authority::SlotState;
use super::membership::Member;
use super::peer;
use super::slot::{format_ranges, key_slot, parse_ranges, ranges, SLOTS};
use super::Cluster;
use crate::command::spec::Spec;
use crate::reply::Reply;
use crate::session::Session;
use crate::shared::Shared;

/// Keys a SLOTDUMP reply carries at most (it also stops at `DUMP_BYTES`).
const DUMP_KEYS: usize = 256;
const DUMP_BYTES: usize = 8 << 20;

fn text(args: &[Bytes], i: usize) -> String {
    String::from_utf8_lossy(&args[i]).into_owned()
}

/// Who serves each slot, as clients should see it: this node's own authority
/// where it knows (its slots, and where it handed slots), gossip for the rest,
/// and placement where gossip has not caught up yet.
fn servers(cluster: &Cluster) -> (Arc<super::View>, Vec<Option<Member>>) {
    let view = cluster.view();
    let auth = cluster.authority();
    let me = view.member(&cluster.id).cloned();
    let others = |m: &&Member| m.id != cluster.id;
    let map = (0..SLOTS as u16)
        .map(|s| match auth.state(s) {
            SlotState::Owned | SlotState::Importing { .. } => me.clone(),
            SlotState::HandedOff { to } => view.member(to).cloned(),
            SlotState::Absent => view
                .server(s)
                .filter(others)
                .or_else(|| view.owner(s).filter(others))
                .cloned(),
        })
        .collect();
    (view.clone(), map)
}

/// Contiguous runs of slots served by one node: (start, end, node).
fn runs(map: &[Option<Member>]) -> Vec<(u16, u16, Member)> {
    let mut out: Vec<(u16, u16, Member)> = Vec::new();
    for (s, m) in map.iter().enumerate() {
        let Some(m) = m else { continue };
        match out.last_mut() {
            Some((_, end, last)) if *end as usize + 1 == s && last.id == m.id => *end = s as u16,
            _ => out.push((s as u16, s as u16, m.clone())),
        }
    }
    out
}

pub(crate) fn split_addr(addr: &str) -> (String, i64) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

/// CLUSTER subcommands.
pub async fn cluster(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    session: &mut Session,
    spec: &'static Spec,
    args: &[Bytes],
) -> Reply {
    match spec.name {
        "cluster|myid" => Reply::bulk_str(&cluster.id),
        "cluster|keyslot" => Reply::Int(key_slot(&args[2]) as i64),
        "cluster|info" => Reply::Verbatim("txt", Bytes::from(info_text(cluster, true))),
        "cluster|slots" => {
            session.cluster.aware = true;
            let (_, map) = servers(cluster);
            Reply::Array(
                runs(&map)
                    .into_iter()
                    .map(|(a, b, m)| {
                        let (host, port) = split_addr(&m.addr);
                        Reply::Array(vec![
                            Reply::Int(a as i64),
                            Reply::Int(b as i64),
                            Reply::Array(vec![
                                Reply::bulk_str(&host),
                                Reply::Int(port),
                                Reply::bulk_str(&m.id),
                                Reply::Array(vec![]),
                            ]),
                        ])
                    })
                    .collect(),
            )
        }
        "cluster|shards" => {
            session.cluster.aware = true;
            let (view, map) = servers(cluster);
            let runs = runs(&map);
            Reply::Array(
                view.members
                    .iter()
                    .filter(|m| m.status != super::membership::Status::Left)
                    .map(|m| {
                        let slots: Vec<Reply> = runs
                            .iter()
                            .filter(|r| r.2.id == m.id)
                            .flat_map(|r| [Reply::Int(r.0 as i64), Reply::Int(r.1 as i64)])
                            .collect();
                        let (host, port) = split_addr(&m.addr);
                        let node = Reply::Map(vec![
                            (Reply::bulk_str("id"), Reply::bulk_str(&m.id)),
                            (Reply::bulk_str("port"), Reply::Int(port)),
                            (Reply::bulk_str("ip"), Reply::bulk_str(&host)),
                            (Reply::bulk_str("endpoint"), Reply::bulk_str(&host)),
                            (Reply::bulk_str("role"), Reply::bulk_str("master")),
                            (Reply::bulk_str("replication-offset"), Reply::Int(0)),
                            (
                                Reply::bulk_str("health"),
                                Reply::bulk_str(if m.live { "online" } else { "failed" }),
                            ),
                        ]);
                        Reply::Map(vec![
                            (Reply::bulk_str("slots"), Reply::Array(slots)),
                            (Reply::bulk_str("nodes"), Reply::Array(vec![node])),
                        ])
                    })
                    .collect(),
            )
        }
        "cluster|nodes" => {
            session.cluster.aware = true;
            Reply::Verbatim("txt", Bytes::from(nodes_text(cluster)))
        }
        "cluster|countkeysinslot" | "cluster|getkeysinslot" => {
            let slot = text(args, 2)
                .parse::<u16>()
                .ok()
                .filter(|&s| (s as usize) < SLOTS);
            let count = match spec.name {
                "cluster|getkeysinslot" => match text(args, 3).parse::<i64>() {
                    Ok(n) if n >= 0 => Some(n as usize),
                    _ => None,
                },
                _ => Some(usize::MAX),
            };
            let (Some(slot), Some(count)) = (slot, count) else {
                return Reply::error(if spec.name == "cluster|getkeysinslot" {
                    "ERR Invalid slot or number of keys"
                } else {
                    "ERR Invalid slot"
                });
            };
            let keys = keys_in_slots(shared, &HashSet::from([slot]), count);
            if spec.name == "cluster|countkeysinslot" {
                Reply::Int(keys.len() as i64)
            } else {
                Reply::Array(keys.into_iter().map(Reply::Bulk).collect())
            }
        }
        "cluster|leave" => {
            cluster.leave().await;
            Reply::OK
        }
        "cluster|help" => Reply::Array(
            [
                "CLUSTER <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "COUNTKEYSINSLOT <slot>",
                "    Return the number of keys in <slot>.",
                "GETKEYSINSLOT <slot> <count>",
                "    Return key names stored by current node in a slot.",
                "INFO",
                "    Return information about the cluster.",
                "KEYSLOT <key>",
                "    Return the hash slot for <key>.",
                "LEAVE",
                "    (kvd) Hand this node's slots to the other nodes, then leave the cluster.",
                "MYID",
                "    Return the node id.",
                "NODES",
                "    Return cluster configuration seen by node. Output format:",
                "    <id> <ip:port@cport> <flags> <master> <pings> <pongs> <epoch> <link> <slot> ...",
                "SHARDS",
                "    Return information about slot range mappings and the nodes associated with them.",
                "SLOTS",
                "    Return information about slots range mappings. Each range is made of:",
                "    start, end, master and replicas IP addresses, ports and ids",
                "HELP",
                "    Print this help.",
            ]
            .iter()
            .map(|l| Reply::Status(l.to_string()))
            .collect(),
        ),
        _ => Reply::error("ERR unknown CLUSTER subcommand"),
    }
}

fn nodes_text(cluster: &Cluster) -> String {
    let (view, map) = servers(cluster);
    let runs = runs(&map);
    let mut out = String::new();
    for m in &view.members {
        if m.status == super::membership::Status::Left {
            continue;
        }
        let mut flags = String::new();
        if m.id == cluster.id {
            flags.push_str("myself,");
        }
        flags.push_str("master");
        if !m.live {
            flags.push_str(",fail");
        }
        let ranges: Vec<(u16, u16)> = runs
            .iter()
            .filter(|r| r.2.id == m.id)
            .map(|r| (r.0, r.1))
            .collect();
        out.push_str(&node_line(&m.id, &m.addr, &flags, view.epoch, m.live, &ranges));
    }
    out
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

/// CLUSTER INFO's text (`with_redis_fields`) or the kvd lines for INFO cluster.
pub fn info_text(cluster: &Cluster, with_redis_fields: bool) -> String {
    let (view, map) = servers(cluster);
    let assigned = map.iter().filter(|m| m.is_some()).count();
    let failing = map.iter().filter(|m| m.as_ref().is_some_and(|m| !m.live)).count();
    let serving: HashSet<&str> = map.iter().flatten().map(|m| m.id.as_str()).collect();
    let (owned, importing, handed) = {
        let auth = cluster.authority();
        (
            auth.owned_count(),
            auth.slots_where(|s| matches!(s, SlotState::Importing { .. }))
                .len(),
            auth.slots_where(|s| matches!(s, SlotState::HandedOff { .. }))
                .len(),
        )
    };
    // Slots placement gives this node that it does not serve yet: 0 once
    // rebalancing has caught up with the membership.
    let to_import = {
        let auth = cluster.authority();
        (0..SLOTS as u16)
            .filter(|&s| {
                view.owner(s).is_some_and(|m| m.id == cluster.id) && *auth.state(s) != SlotState::Owned
            })
            .count()
    };
    let st = &cluster.stats;
    let mut out = String::new();
    if with_redis_fields {
        let ok = assigned == SLOTS && failing == 0;
        out.push_str(&format!(
            "cluster_state:{}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{}\r\n\
             cluster_slots_pfail:0\r\ncluster_slots_fail:{failing}\r\ncluster_known_nodes:{}\r\n\
             cluster_size:{}\r\ncluster_current_epoch:{}\r\ncluster_my_epoch:{}\r\n\
             cluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\n\
             total_cluster_links_buffer_limit_exceeded:0\r\n",
            if ok { "ok" } else { "fail" },
            assigned - failing,
            view.members.len(),
            serving.len(),
            view.epoch,
            view.epoch,
        ));
    } else {
        out.push_str("cluster_enabled:1\r\n");
    }
    out.push_str(&format!(
        "kvd_cluster_node_id:{}\r\nkvd_cluster_status:{}\r\nkvd_cluster_nodes:{}\r\nkvd_cluster_nodes_live:{}\r\n\
         kvd_cluster_placement_epoch:{}\r\nkvd_cluster_slots_owned:{owned}\r\nkvd_cluster_slots_importing:{importing}\r\n\
         kvd_cluster_slots_handed_off:{handed}\r\nkvd_cluster_slots_to_import:{to_import}\r\nkvd_cluster_slots_moved_in:{}\r\nkvd_cluster_keys_moved_in:{}\r\n\
         kvd_cluster_keys_dropped_after_handoff:{}\r\nkvd_cluster_forwarded_commands:{}\r\n\
         kvd_cluster_forwards_per_sec:{}\r\nkvd_cluster_moved_replies:{}\r\n",
        cluster.id,
        cluster.status().as_str(),
        view.members.len(),
        view.members.iter().filter(|m| m.live).count(),
        view.epoch,
        st.slots_moved_in.load(Ordering::Relaxed),
        st.keys_moved_in.load(Ordering::Relaxed),
        st.keys_dropped.load(Ordering::Relaxed),
        st.forwarded.load(Ordering::Relaxed),
        st.forwards_per_sec.load(Ordering::Relaxed),
        st.moved_replies.load(Ordering::Relaxed),
    ));
    out
}

/// Up to `limit` keys of this node in the given slots (a full scan: kvd keeps
/// no per-slot index, so this is for moving slots and for debugging).
pub fn keys_in_slots(shared: &Shared, slots: &HashSet<u16>, limit: usize) -> Vec<Bytes> {
    let mut keys = Vec::new();
    let mut cursor = 0;
    let mut batch = Vec::new();
    loop {
        batch.clear();
        cursor = shared.dbs.zero().store().scan(cursor, 512, &mut batch);
        for (k, _) in batch.drain(..) {
            if keys.len() < limit && slots.contains(&key_slot(&k)) {
                keys.push(k);
            }
        }
        if cursor == 0 || keys.len() >= limit {
            return keys;
        }
    }
}

/// Sends a PUBLISH to every other live node, as Redis Cluster does, without
/// waiting: subscribers anywhere in the cluster get the message.
pub fn broadcast_publish(cluster: &Arc<Cluster>, channel: &Bytes, message: &Bytes) {
    let view = cluster.view();
    for m in view.members.iter().filter(|m| m.live && m.id != cluster.id) {
        let (cluster, addr) = (cluster.clone(), m.addr.clone());
        let args = vec![
            Bytes::from_static(b"KVD.PUBLISH"),
            channel.clone(),
            message.clone(),
        ];
        tokio::spawn(async move {
            let _ = cluster.peers.call(&addr, &args).await;
        });
    }
}

/// The internal `KVD.*` commands.
pub async fn internal(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    session: &mut Session,
    args: &[Bytes],
) -> Reply {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    if let Some(reply) = peer::handshake(&cluster.secret, session, args) {
        return reply;
    }
    let Some(peer_id) = session.cluster.peer.clone() else {
        return Reply::error("NOPERM KVD.* commands are for cluster peers");
    };
    let bad = || Reply::error(format!("ERR wrong arguments for '{name}'"));
    match (name.as_str(), args.len()) {
        // KVD.HANDOFF <ranges>: give the caller every listed slot we own
        // (or already gave it), persisted before the reply.
        ("kvd.handoff", 2) => {
            let Some(wanted) = parse_ranges(&text(args, 1)) else {
                return bad();
            };
            let wanted: Vec<u16> = wanted.iter().flat_map(|&(a, b)| a..=b).collect();
            let result = cluster.with_authority(|auth| {
                let accepted: Vec<u16> = wanted
                    .iter()
                    .copied()
                    .filter(|&s| match auth.state(s) {
                        SlotState::Owned => true,
                        SlotState::HandedOff { to } => *to == peer_id,
                        _ => false,
                    })
                    .collect();
                auth.set(&accepted, SlotState::HandedOff { to: peer_id.clone() })
                    .map(|()| accepted)
            });
            match result {
                Ok(accepted) => {
                    let set: HashSet<u16> = accepted.iter().copied().collect();
                    shared
                        .dbs
                        .zero()
                        .touch_watched_where(|k| set.contains(&key_slot(k)));
                    if !accepted.is_empty() {
                        tracing::info!("handed {} slots to node {peer_id}", accepted.len());
                    }
                    Reply::bulk_str(&format_ranges(&ranges(accepted)))
                }
                Err(e) => Reply::error(format!("ERR cannot record the hand-off: {e}")),
            }
        }
        // KVD.SLOTDUMP <ranges> <cursor>: [next cursor, [key, value, expires-at-ms | 0, ...]]
        // for slots handed to the caller.
        ("kvd.slotdump", 3) => {
            let Some(list) = parse_ranges(&text(args, 1)) else {
                return bad();
            };
            let Ok(mut cursor) = text(args, 2).parse::<u64>() else {
                return bad();
            };
            let slots: HashSet<u16> = {
                let auth = cluster.authority();
                list.iter()
                    .flat_map(|&(a, b)| a..=b)
                    .filter(|&s| matches!(auth.state(s), SlotState::HandedOff { to } if *to == peer_id))
                    .collect()
            };
            let now = crate::db::now_ms();
            let mut out = Vec::new();
            let (mut keys, mut bytes) = (0, 0);
            let mut batch = Vec::new();
            loop {
                batch.clear();
                cursor = shared.dbs.zero().store().scan(cursor, 64, &mut batch);
                for (k, e) in batch.drain(..) {
                    if !slots.contains(&key_slot(&k)) || e.expires_at.is_some_and(|t| t <= now) {
                        continue;
                    }
                    // The scan may leave a value unread; read it (checksummed) now.
                    let entry = match shared.dbs.zero().store().get(&k) {
                        Ok(Some(entry)) => entry,
                        Ok(None) => continue,
                        Err(err) => return Reply::error(err.to_string()),
                    };
                    keys += 1;
                    bytes += k.len() + entry.value.len();
                    out.push(Reply::Bulk(k));
                    out.push(Reply::Bulk(entry.value));
                    out.push(Reply::Int(entry.expires_at.unwrap_or(0) as i64));
                }
                if cursor == 0 || keys >= DUMP_KEYS || bytes >= DUMP_BYTES {
                    break;
                }
            }
            Reply::Array(vec![Reply::bulk_str(&cursor.to_string()), Reply::Array(out)])
        }
        ("kvd.publish", 3) => Reply::Int(shared.pubsub.publish(&args[1], &args[2]) as i64),
        _ => Reply::error(format!("ERR unknown kvd peer command '{name}'")),
    }
}
