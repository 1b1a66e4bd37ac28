//! `fsclient status`: one screen for a person — the store's nodes and their
//! state, data short of its copies, the volume's size and last commits, a
//! running mount's uploads — and, for anything wrong, what to do about it.
//!
//! Everything is read the way any client could: INFO and CLUSTER NODES from
//! the store, the volume's commits and tree, and a mount's metrics endpoint.

use std::fmt::Write;

use crate::dict::RespDict;
use crate::volume::Volume;

/// A store node and what the store says of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub addr: String,
    /// `up`, `suspect` (not answering: may be asleep), `down` (gone long
    /// enough to be replaced), or `failed` (a Redis Cluster's verdict).
    pub state: &'static str,
}

/// What kind of store the volume lives in, with its nodes.
#[derive(Debug, PartialEq, Eq)]
pub enum Topology {
    /// One server (redis-server, or kvd alone): one copy of everything.
    Single { server: String },
    /// kvd `--replicas R`: every key on `replicas` of the nodes.
    Replicated {
        replicas: usize,
        nodes: Vec<Node>,
        under_replicated_slots: u64,
        down_after_secs: u64,
        /// Slots a membership change under way has still to move (a join
        /// or a take-out goes in steps).
        slots_left_to_move: u64,
        /// Bytes the node asked holds of the slots still to move.
        bytes_to_copy: u64,
    },
    /// kvd `--cluster` or a Redis Cluster: slots sharded over the nodes.
    Sharded { nodes: Vec<Node> },
}

/// `field:value` of an INFO text.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(':'))
        .find(|(k, _)| *k == field)
        .map(|(_, v)| v)
}

fn list(v: Option<&str>) -> Vec<String> {
    v.unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Reads the store's topology from INFO (and CLUSTER NODES for a cluster).
pub fn topology(dict: &RespDict, url: &str) -> Result<Topology, String> {
    let info = dict.server_info("all").map_err(|e| format!("INFO: {e}"))?;
    let members = list(info_field(&info, "kvd_replica_members"));
    if !members.is_empty() {
        let suspect = list(info_field(&info, "kvd_replica_suspect_nodes"));
        let down = list(info_field(&info, "kvd_replica_down_nodes"));
        // During a change, a member not in the list it heads to is leaving.
        let target = list(info_field(&info, "kvd_replica_target_members"));
        let nodes = members
            .into_iter()
            .map(|addr| {
                let state = if down.contains(&addr) {
                    "down"
                } else if suspect.contains(&addr) {
                    "suspect"
                } else if !target.is_empty() && !target.contains(&addr) {
                    "leaving"
                } else {
                    "up"
                };
                Node { addr, state }
            })
            .collect();
        let num = |f: &str| info_field(&info, f).and_then(|v| v.parse().ok()).unwrap_or(0);
        return Ok(Topology::Replicated {
            replicas: num("kvd_replicas") as usize,
            nodes,
            under_replicated_slots: num("kvd_under_replicated_slots"),
            down_after_secs: num("kvd_down_after_seconds"),
            slots_left_to_move: num("kvd_replica_slots_left_to_move"),
            bytes_to_copy: num("kvd_replica_bytes_to_copy"),
        });
    }
    if info_field(&info, "cluster_enabled") == Some("1") {
        let text = dict.cluster_nodes().map_err(|e| format!("CLUSTER NODES: {e}"))?;
        let nodes = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let addr = f.get(1)?.split('@').next()?.to_string();
                let flags = f.get(2)?;
                let state = if flags.contains("fail?") {
                    "suspect"
                } else if flags.contains("fail") {
                    "failed"
                } else {
                    "up"
                };
                Some(Node { addr, state })
            })
            .collect();
        return Ok(Topology::Sharded { nodes });
    }
    Ok(Topology::Single {
        server: url.to_string(),
    })
}

/// What a running mount's metrics endpoint says (`--mount-metrics`).
#[derive(Debug, Default, PartialEq)]
pub struct MountFigures {
    pub uploads_pending_bytes: f64,
    pub uploads_failing: bool,
    pub commits: f64,
    pub commits_failed: f64,
}

/// Reads a mount's figures from its metrics text (the Prometheus format).
pub fn mount_figures(text: &str) -> MountFigures {
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    MountFigures {
        uploads_pending_bytes: value("fsclient_uploads_pending_bytes"),
        uploads_failing: value("fsclient_uploads_failing") > 0.0,
        commits: value("fsclient_commits_total"),
        commits_failed: value("fsclient_commits_failed_total"),
    }
}

/// `GET /metrics` from a mount's `--metrics-addr`.
pub fn fetch_metrics(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write as _};
    let fail = |e: std::io::Error| format!("cannot read the mount's metrics at {addr}: {e}");
    let mut s = std::net::TcpStream::connect(addr).map_err(fail)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(fail)?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(fail)?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(fail)?;
    raw.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or_else(|| format!("{addr} did not answer like a metrics endpoint"))
}

fn ago(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// The screen: topology, volume, mount, then what to do about each problem.
pub fn render(
    topology: &Topology,
    volume: &Volume,
    sizes: Option<&crate::history::Stats>,
    mount: Option<&MountFigures>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut problems: Vec<String> = Vec::new();
    match topology {
        Topology::Single { server } => {
            let _ = writeln!(out, "store:    {server}, one server: one copy of everything");
            problems.push(
                "one copy of everything: if this server's disk is lost, so is the volume. A kvd cluster (kvd --cluster) keeps three (docs/OPERATIONS.md)".into(),
            );
        }
        Topology::Replicated {
            replicas,
            nodes,
            under_replicated_slots,
            down_after_secs,
            slots_left_to_move,
            bytes_to_copy,
        } => {
            let _ = writeln!(
                out,
                "store:    kvd, {replicas} copies of every key over {} nodes",
                nodes.len()
            );
            let answering = nodes
                .iter()
                .filter(|n| matches!(n.state, "up" | "leaving"))
                .count();
            for n in nodes {
                let _ = writeln!(out, "  {:<24} {}", n.addr, n.state);
                let then = if answering >= *replicas {
                    format!(
                        "if it does not come back within {} min of going silent, the others make its copies elsewhere by themselves; to retire it now: redis-cli -h <any node> CLUSTER FORGET {}",
                        down_after_secs / 60,
                        n.addr
                    )
                } else {
                    format!(
                        "the {answering} nodes left cannot hold {replicas} copies without it: start it again, or add a node (kvd --cluster --seed <any node>) to take its place"
                    )
                };
                match n.state {
                    "suspect" => problems.push(format!(
                        "{} does not answer. Nothing is lost while a majority of each key's copies answers; {then}",
                        n.addr
                    )),
                    "down" => problems.push(format!(
                        "{} is down for good: its copies are being made on the other nodes (watch under-replicated slots fall to 0)",
                        n.addr
                    )),
                    _ => {}
                }
            }
            let _ = writeln!(out, "  under-replicated slots: {under_replicated_slots}");
            if *slots_left_to_move > 0 {
                // Not a problem: a join or a take-out going in steps; every
                // slot is served meanwhile.
                let _ = writeln!(
                    out,
                    "  membership change under way: {slots_left_to_move} slots left to move, {:.1} MB of them on this node (each step freezes at most 2,048 slots while it copies them)",
                    *bytes_to_copy as f64 / 1e6
                );
            }
            if *under_replicated_slots > 0 {
                problems.push(format!(
                    "{under_replicated_slots} slots have fewer than {replicas} copies answering: start the missing node again, or wait for the re-homing"
                ));
            }
        }
        Topology::Sharded { nodes } => {
            let _ = writeln!(
                out,
                "store:    a cluster of {} nodes (one copy of each slot)",
                nodes.len()
            );
            for n in nodes {
                let _ = writeln!(out, "  {:<24} {}", n.addr, n.state);
                if n.state != "up" {
                    problems.push(format!(
                        "{} is {}: the keys of its slots cannot be read until it is back (a sharded cluster keeps one copy)",
                        n.addr, n.state
                    ));
                }
            }
        }
    }
    let log = volume
        .log(3)
        .map_err(|e| format!("cannot read the volume's history: {e}"))?;
    let now = crate::object::Time::now().secs;
    let _ = writeln!(out, "volume:   {}", volume.name);
    if let Some(s) = sizes {
        let ratio = s.logical_bytes as f64 / s.chunk_bytes.max(1) as f64;
        let _ = writeln!(
            out,
            "  files {}, directories {}, bytes of files {}, bytes stored {}, dedup {ratio:.2}",
            s.files, s.dirs, s.logical_bytes, s.stored_bytes
        );
    }
    for (h, c) in &log {
        let _ = writeln!(
            out,
            "  commit {} {:<12} {} \"{}\"",
            &h.hex()[..12],
            ago(now - c.time.secs),
            c.writer,
            c.message
        );
    }
    if let Some(m) = mount {
        let _ = writeln!(
            out,
            "mount:    {} commits ({} failed), {:.0} bytes waiting to be uploaded{}",
            m.commits,
            m.commits_failed,
            m.uploads_pending_bytes,
            if m.uploads_failing {
                ", the store refuses uploads"
            } else {
                ""
            }
        );
        if m.uploads_failing {
            problems.push(
                "the store refuses the mount's uploads (full, or a node away): writes wait and then fail with ENOSPC or EIO; nothing written is dropped. Free space on the store's disk, or bring the node back".into(),
            );
        }
    }
    if problems.is_empty() {
        out.push_str("all is well\n");
    } else {
        for p in problems {
            let _ = writeln!(out, "to do:    {p}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_under_way_shows_its_leaving_node_and_what_is_left_to_move() {
        let topology = Topology::Replicated {
            replicas: 3,
            nodes: vec![
                Node {
                    addr: "10.0.0.1:7379".into(),
                    state: "up",
                },
                Node {
                    addr: "10.0.0.2:7379".into(),
                    state: "up",
                },
                Node {
                    addr: "10.0.0.3:7379".into(),
                    state: "up",
                },
                Node {
                    addr: "10.0.0.4:7379".into(),
                    state: "leaving",
                },
            ],
            under_replicated_slots: 0,
            down_after_secs: 600,
            slots_left_to_move: 6144,
            bytes_to_copy: 25_000_000,
        };
        let dict = std::sync::Arc::new(crate::dict::MemoryDict::new());
        let volume = Volume::new(crate::store::BlobStore::new(dict, "t:", 16 << 20), "main");
        volume.create().unwrap();
        let shown = render(&topology, &volume, None, None).unwrap();
        assert!(shown.contains("10.0.0.4:7379            leaving"), "{shown}");
        assert!(
            shown.contains("6144 slots left to move, 25.0 MB of them on this node"),
            "{shown}"
        );
        assert!(shown.contains("all is well"), "{shown}");
    }

    #[test]
    fn a_mounts_figures_are_read_from_its_metrics_text() {
        let text = "# HELP x\n# TYPE fsclient_commits_total counter\nfsclient_commits_total 12\nfsclient_commits_failed_total 2\nfsclient_uploads_pending_bytes 4096\nfsclient_uploads_failing 1\n";
        assert_eq!(
            mount_figures(text),
            MountFigures {
                uploads_pending_bytes: 4096.0,
                uploads_failing: true,
                commits: 12.0,
                commits_failed: 2.0,
            }
        );
    }
}
