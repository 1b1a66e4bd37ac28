//! Liveness by gossip: heartbeats passed from member to member, so that no
//! node calls every other each second (n² calls) and a member that one node
//! cannot reach, but others can, is not taken for gone.
//!
//! Every node has a heartbeat, (generation, count): the generation is the
//! time it started (or, if the clock went back across a restart, one more
//! than the last generation it recorded: [`generation`]), so a restarted
//! node's beats outrank its old ones, and
//! the count goes up once a period. Each period a node sends the heartbeats
//! it knows — its own, and every member's as last heard — to [`FANOUT`]
//! members picked at random (`KVD.GOSSIP`), and takes theirs from the reply;
//! for each member the higher heartbeat wins, and the local time it last went
//! up is kept ([`Heartbeats`]). A member whose heartbeat has stood still for
//! [`Heartbeats::suspect_after`] is suspect; for `--down-after`, down
//! ([`super::health`]). A heartbeat reaches every member through O(log n)
//! others, so n nodes send n × [`FANOUT`] messages a period.
//!
//! The messages carry the sender's address and membership version, so a node
//! behind learns the newer membership from whoever gossips with it (it asks
//! for it with `KVD.CONFIG`). They travel on the peer links, which are
//! authenticated with the cluster secret ([`crate::cluster::peer`]); a
//! captured message replayed later carries old counts, which change nothing.
//!
//! Each heartbeat also carries its node's client ports, plain and TLS
//! ([`ClientPorts`]): a node's address is the port its peers use (the TLS
//! port when the links between nodes are TLS, `tls-replication`), and
//! CLUSTER SLOTS answers each client with the port of its own kind, as Redis
//! Cluster does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::seq::SliceRandom;

use super::Replicas;
use crate::reply::Reply;

/// Members a node gossips with each period (all of them in a cluster of
/// four or fewer).
pub const FANOUT: usize = 3;
/// How long one exchange may take.
const GOSSIP_TIMEOUT: Duration = Duration::from_secs(1);

/// A node's heartbeat: ordered by generation (its start), then count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Beat {
    pub generation: u64,
    pub count: u64,
}

/// A node's ports for clients: plain and TLS (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientPorts {
    pub plain: u16,
    pub tls: u16,
}

/// The heartbeats one node knows: a pure table, no I/O.
pub struct Heartbeats {
    me: String,
    mine: Beat,
    /// Each node's client ports as last heard (this node's own included).
    ports: HashMap<String, ClientPorts>,
    /// Each other member's highest heartbeat heard, and when it last went up
    /// here (or when the member was first known, if never heard).
    heard: HashMap<String, (Beat, Instant)>,
    /// Members at the last [`Heartbeats::retain`]: how far gossip has to
    /// travel, hence how long a live member's heartbeat may stand still.
    members: usize,
}

/// This start's heartbeat generation: the time now in milliseconds, or one
/// more than the generation recorded in `<dir>/gossip-generation` if that
/// is not lower (a clock set back across a restart would otherwise give
/// beats that lose to the old ones until the clock caught up: the node
/// would look silent, then down). Recorded (and synced) before use.
pub fn generation(dir: &std::path::Path) -> std::io::Result<u64> {
    let path = dir.join("gossip-generation");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let generation = last.map_or(now, |last| now.max(last + 1));
    let tmp = dir.join("gossip-generation.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{generation}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(generation)
}

impl Heartbeats {
    /// The table of node `me`, whose heartbeats are of `generation`, with
    /// clients served on `ports`.
    pub fn new(me: &str, generation: u64, ports: ClientPorts) -> Heartbeats {
        Heartbeats {
            me: me.to_string(),
            mine: Beat { generation, count: 0 },
            ports: HashMap::from([(me.to_string(), ports)]),
            heard: HashMap::new(),
            members: 1,
        }
    }

    /// One period: this node's heartbeat goes up.
    pub fn tick(&mut self) {
        self.mine.count += 1;
    }

    /// Keeps the members of `nodes` only; a member not heard yet counts as
    /// heard now (its silence counts from when this node first knew of it).
    pub fn retain(&mut self, nodes: &[String], now: Instant) {
        self.heard.retain(|addr, _| nodes.contains(addr));
        self.ports
            .retain(|addr, _| nodes.contains(addr) || *addr == self.me);
        for n in nodes.iter().filter(|n| **n != self.me) {
            self.heard.entry(n.clone()).or_insert((Beat::default(), now));
        }
        self.members = nodes.len();
    }

    /// The message: `version sender` on the first line, then one line per
    /// heartbeat known, `addr generation count plain-port tls-port` (nodes
    /// before the ports were gossiped send and read the first three words).
    pub fn encode(&self, version: u64) -> Bytes {
        let mut text = format!("{version} {}\n", self.me);
        let beats =
            std::iter::once((&self.me, &self.mine)).chain(self.heard.iter().map(|(a, (b, _))| (a, b)));
        for (addr, beat) in beats.filter(|(_, b)| **b != Beat::default()) {
            let ports = self.ports.get(addr).copied().unwrap_or_default();
            text.push_str(&format!(
                "{addr} {} {} {} {}\n",
                beat.generation, beat.count, ports.plain, ports.tls
            ));
        }
        Bytes::from(text)
    }

    /// Where a client reaches member `addr` over plain TCP (`tls`: over TLS),
    /// as `host:port`: the member's port of that kind if it gossiped one, else
    /// its address.
    pub fn client_addr(&self, addr: &str, tls: bool) -> String {
        let port = self
            .ports
            .get(addr)
            .map(|p| if tls { p.tls } else { p.plain })
            .filter(|&p| p != 0);
        match (port, addr.rsplit_once(':')) {
            (Some(port), Some((host, _))) => format!("{host}:{port}"),
            _ => addr.to_string(),
        }
    }

    /// Takes a message's heartbeats of known members (each kept where it is
    /// higher); answers the sender and its membership version, `None` for a
    /// message that is not one.
    pub fn merge(&mut self, message: &[u8], now: Instant) -> Option<(String, u64)> {
        let text = std::str::from_utf8(message).ok()?;
        let mut lines = text.lines();
        let mut head = lines.next()?.split(' ');
        let version = head.next()?.parse().ok()?;
        let sender = head.next()?.to_string();
        for line in lines {
            let mut words = line.split(' ');
            let (Some(addr), Some(generation), Some(count)) = (words.next(), words.next(), words.next())
            else {
                return None;
            };
            let beat = Beat {
                generation: generation.parse().ok()?,
                count: count.parse().ok()?,
            };
            let ports = match (words.next(), words.next()) {
                (Some(plain), Some(tls)) => Some(ClientPorts {
                    plain: plain.parse().ok()?,
                    tls: tls.parse().ok()?,
                }),
                _ => None,
            };
            if let Some((known, rose)) = self.heard.get_mut(addr) {
                if beat > *known {
                    *known = beat;
                    *rose = now;
                    // The ports of the newest beat: a restart may change them.
                    if let Some(ports) = ports {
                        self.ports.insert(addr.to_string(), ports);
                    }
                }
            }
        }
        Some((sender, version))
    }

    /// How long `addr`'s heartbeat has stood still here (`None`: this node,
    /// or not a member).
    pub fn silent_for(&self, addr: &str, now: Instant) -> Option<Duration> {
        self.heard
            .get(addr)
            .map(|(_, rose)| now.saturating_duration_since(*rose))
    }

    /// How long a live member's heartbeat may stand still here: a few
    /// periods, and one more for each hop gossip takes to cross the cluster
    /// (log base [`FANOUT`] of its size).
    pub fn suspect_after(&self, period: Duration) -> Duration {
        let mut hops = 1;
        let mut reach = FANOUT;
        while reach < self.members {
            reach *= FANOUT;
            hops += 1;
        }
        period * (3 + hops as u32)
    }
}

impl Replicas {
    /// One period of gossip: this node's heartbeat goes up and goes, with
    /// every heartbeat it knows, to [`FANOUT`] members picked at random, and
    /// to one it last failed to reach (so a member back from an absence is
    /// noticed at once however large the cluster).
    pub(super) async fn gossip(self: &Arc<Self>) {
        let layout = self.layout();
        let now = Instant::now();
        let message = {
            let mut beats = self.heartbeats.lock();
            beats.retain(&layout.nodes, now);
            beats.tick();
            beats.encode(layout.version)
        };
        let others: Vec<&String> = layout.nodes.iter().filter(|n| **n != self.addr).collect();
        let targets: Vec<String> = {
            let mut rng = rand::thread_rng();
            let mut picked: Vec<String> = others
                .choose_multiple(&mut rng, FANOUT)
                .map(|a| a.to_string())
                .collect();
            let failed: Vec<&&String> = others
                .iter()
                .filter(|a| !picked.contains(a) && self.failed_last_call(a))
                .collect();
            if let Some(a) = failed.choose(&mut rng) {
                picked.push(a.to_string());
            }
            picked
        };
        let calls = targets.into_iter().map(|addr| {
            let (rep, message) = (self.clone(), message.clone());
            async move {
                if rep.is_cut_off(&addr) {
                    rep.reached(&addr, false);
                    return;
                }
                let request = [Bytes::from_static(b"KVD.GOSSIP"), message];
                let answer = tokio::time::timeout(GOSSIP_TIMEOUT, rep.peers.call(&addr, &request)).await;
                let Ok(Ok(Reply::Bulk(text))) = answer else {
                    rep.reached(&addr, false);
                    return;
                };
                rep.reached(&addr, true);
                rep.take_gossip(&text).await;
            }
        });
        futures::future::join_all(calls).await;
    }

    /// `KVD.GOSSIP message`: takes the sender's heartbeats and answers this
    /// node's.
    pub fn answer_gossip(self: &Arc<Self>, message: &[u8]) -> Reply {
        let layout = self.layout();
        let (known, reply) = {
            let mut beats = self.heartbeats.lock();
            (beats.merge(message, Instant::now()), beats.encode(layout.version))
        };
        match known {
            Some((sender, version)) => {
                if version > layout.version {
                    let rep = self.clone();
                    tokio::spawn(async move { rep.learn_membership_from(&sender).await });
                }
                Reply::Bulk(reply)
            }
            None => Reply::error("ERR malformed gossip"),
        }
    }

    /// Takes a gossip reply's heartbeats, and the sender's membership if it
    /// is newer.
    async fn take_gossip(&self, text: &[u8]) {
        let known = self.heartbeats.lock().merge(text, Instant::now());
        if let Some((sender, version)) = known {
            if version > self.layout().version {
                self.learn_membership_from(&sender).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7000")).collect()
    }

    #[test]
    fn a_heartbeat_travels_through_a_third_node_and_a_restart_outranks_the_old_one() {
        let all = nodes(3);
        let t0 = Instant::now();
        let (mut a, mut b, mut c) = (
            Heartbeats::new(&all[0], 1, ClientPorts::default()),
            Heartbeats::new(&all[1], 1, ClientPorts::default()),
            Heartbeats::new(&all[2], 1, ClientPorts::default()),
        );
        for h in [&mut a, &mut b, &mut c] {
            h.retain(&all, t0);
        }
        // a and c never talk; b talks to both.
        let t1 = t0 + Duration::from_secs(5);
        a.tick();
        assert_eq!(b.merge(&a.encode(7), t1), Some((all[0].clone(), 7)));
        c.merge(&b.encode(7), t1);
        assert_eq!(
            c.silent_for(&all[0], t1),
            Some(Duration::ZERO),
            "a's beat came through b"
        );
        assert_eq!(
            c.silent_for(&all[1], t1),
            Some(Duration::ZERO),
            "b's first beat is news"
        );
        // The same message again later (a replay) changes nothing.
        let t2 = t1 + Duration::from_secs(5);
        c.merge(&b.encode(7), t2);
        assert_eq!(c.silent_for(&all[0], t2), Some(Duration::from_secs(5)));
        // a restarts: a new generation with a lower count still counts.
        let mut a2 = Heartbeats::new(&all[0], a.mine.generation + 1, ClientPorts::default());
        a2.retain(&all, t2);
        a2.tick();
        c.merge(&a2.encode(8), t2);
        assert_eq!(c.silent_for(&all[0], t2), Some(Duration::ZERO));
        assert_eq!(c.silent_for(&all[2], t2), None, "no entry for oneself");
        assert_eq!(c.merge(b"not gossip", t2), None);
    }

    /// Each node's client ports travel with its heartbeat, through other
    /// nodes too; a client is shown the port of its kind, or the address
    /// where none is known (a line of a node from before ports were
    /// gossiped has three words, and still counts as a beat).
    #[test]
    fn client_ports_travel_with_the_heartbeats() {
        let all = nodes(3);
        let t0 = Instant::now();
        let ports = ClientPorts {
            plain: 6379,
            tls: 6380,
        };
        let mut a = Heartbeats::new(&all[0], 1, ports);
        let mut b = Heartbeats::new(&all[1], 1, ClientPorts::default());
        let mut c = Heartbeats::new(&all[2], 1, ClientPorts::default());
        for h in [&mut a, &mut b, &mut c] {
            h.retain(&all, t0);
        }
        assert_eq!(c.client_addr(&all[0], false), all[0], "nothing heard yet");
        a.tick();
        b.merge(&a.encode(1), t0);
        c.merge(&b.encode(1), t0);
        assert_eq!(c.client_addr(&all[0], false), "10.0.0.0:6379");
        assert_eq!(c.client_addr(&all[0], true), "10.0.0.0:6380");
        // b serves no client port of either kind: its address is shown.
        b.tick();
        c.merge(&b.encode(1), t0);
        assert_eq!(c.client_addr(&all[1], true), all[1]);
        // An old node's line: a beat, no ports.
        let t1 = t0 + Duration::from_secs(1);
        let old = format!("1 {}\n{} 1 5\n", all[1], all[1]);
        assert!(c.merge(old.as_bytes(), t1).is_some());
        assert_eq!(c.silent_for(&all[1], t1), Some(Duration::ZERO));
    }

    /// A restart's generation outranks the last one recorded, even when the
    /// clock went back meanwhile (the recorded one is in the future).
    #[test]
    fn a_restart_outranks_the_last_generation_even_if_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = generation(dir.path()).unwrap();
        assert!(generation(dir.path()).unwrap() > first);
        let ahead = first + 3_600_000;
        std::fs::write(dir.path().join("gossip-generation"), format!("{ahead}\n")).unwrap();
        assert_eq!(generation(dir.path()).unwrap(), ahead + 1);
        assert_eq!(generation(dir.path()).unwrap(), ahead + 2);
    }

    #[test]
    fn the_suspicion_threshold_grows_with_the_hops_gossip_takes() {
        let period = Duration::from_secs(1);
        let mut h = Heartbeats::new("me", 1, ClientPorts::default());
        h.retain(&nodes(3), Instant::now());
        assert_eq!(h.suspect_after(period), Duration::from_secs(4));
        h.retain(&nodes(1000), Instant::now());
        // 3^7 = 2187 >= 1000: seven hops.
        assert_eq!(h.suspect_after(period), Duration::from_secs(10));
    }
}
