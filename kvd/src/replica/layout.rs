//! The membership of a replicated cluster, versioned, and how it changes.
//!
//! A [`Layout`] is one version of the node list: from it every node computes
//! alike which nodes hold each slot (the first R distinct nodes of the slot's
//! consistent-hash preference list, [`crate::cluster::ring`]). Version 1 is the
//! `--peers` list a cluster starts with; `KVD.RECONFIGURE` makes the next one
//! ([`super::reconfigure`]).
//!
//! The version is in every CASPaxos message: it is the *epoch* in the high bits
//! of each ballot's counter (a query names it outright), and an acceptor answers
//! a message of another version with `KVDCONFIG <its version>` instead of
//! acting on it. The proposer then brings whichever side is behind up to date
//! and runs the command again. So after a change no old-version proposer gets a
//! majority of a slot's new holders to act, and since every ballot of version
//! v+1 is above every ballot of version v, a value a reconfiguration copies to
//! the new holders (at ballot `epoch v+1, counter 0`) outranks anything an
//! old-version proposer left on some replica.
//!
//! A node's layout and its *frozen* slots (slots a reconfiguration in progress
//! is moving, on which this acceptor takes nothing) live in
//! `<dir>/replica-config`, rewritten whole and durably on every change.

use std::path::{Path, PathBuf};

use crate::cluster::paxos::Ballot;
use crate::cluster::ring::Placement;
use crate::cluster::slot::{self, format_ranges, parse_ranges, ranges, SLOTS};

/// Ballot counters are `version << EPOCH_SHIFT | n`: 2^40 ballots per version.
pub const EPOCH_SHIFT: u32 = 40;

/// The version a ballot was made under.
pub fn epoch(b: Ballot) -> u64 {
    b.counter >> EPOCH_SHIFT
}

/// The ballot at which a reconfiguration to `version` installs the values it
/// copies: above every ballot of earlier versions, below every ballot a
/// proposer makes at `version`.
pub fn install_ballot(version: u64) -> Ballot {
    Ballot {
        counter: version << EPOCH_SHIFT,
        proposer: 0,
    }
}

/// Moving slots one reconfiguration step freezes and copies at most: a
/// change that moves more goes through transitional layouts, each moving
/// about this many more, so a client waits for one step's copy at most, and
/// only for keys of the slots that step moves ([`Layout::next_step`]).
pub const STEP_SLOTS: usize = 2048;

/// One version of the node list, and the placement that follows from it.
///
/// A layout may be *transitional*: on its way from an old node list to a new
/// one, slots below `moved_below` are placed by the new list and the others
/// still by the old. Each step of a large change is a membership version of
/// its own, decided, frozen, copied and activated like any other.
#[derive(Clone)]
pub struct Layout {
    /// 0: this node has not been given a membership yet (a node started to be
    /// added to a cluster); it serves no key until a member adds it.
    pub version: u64,
    /// Every member: the (target) node list, then, during a transition, the
    /// old list's nodes not in it (they still hold the slots not yet moved).
    pub nodes: Vec<String>,
    pub replicas: usize,
    /// This node's index in `nodes`, if it is a member.
    pub me: Option<usize>,
    /// Placement over the target list (`nodes[..target_len]`).
    placement: Placement,
    target_len: usize,
    transition: Option<Transition>,
}

/// Where a transitional layout comes from.
#[derive(Clone)]
struct Transition {
    /// The old node list, in its own order.
    from: Vec<String>,
    /// Placement over `from`; `from_index` maps its indexes into `nodes`.
    placement: Placement,
    from_index: Vec<usize>,
    /// Slots below this are placed by the target list.
    moved_below: u16,
}

impl Layout {
    pub fn new(version: u64, nodes: Vec<String>, replicas: usize, me: &str) -> Layout {
        let ids: Vec<&str> = nodes.iter().map(String::as_str).collect();
        // The target R is kept as given (a cluster smaller than R keeps it for
        // when it grows); placement uses at most as many holders as nodes.
        let replicas = replicas.max(1);
        Layout {
            version,
            placement: Placement::compute(&ids, replicas),
            me: nodes.iter().position(|n| n == me),
            target_len: nodes.len(),
            nodes,
            replicas,
            transition: None,
        }
    }

    /// A layout on its way from `from` to `to`: slots below `moved_below` are
    /// placed by `to`, the rest by `from`.
    pub fn transitional(
        version: u64,
        from: Vec<String>,
        to: Vec<String>,
        replicas: usize,
        moved_below: u16,
        me: &str,
    ) -> Layout {
        let mut layout = Layout::new(version, to, replicas, me);
        for n in &from {
            if !layout.nodes.contains(n) {
                layout.nodes.push(n.clone());
            }
        }
        layout.me = layout.nodes.iter().position(|n| n == me);
        let ids: Vec<&str> = from.iter().map(String::as_str).collect();
        let from_index = from
            .iter()
            .map(|n| {
                layout
                    .nodes
                    .iter()
                    .position(|m| m == n)
                    .expect("every old node is listed")
            })
            .collect();
        layout.transition = Some(Transition {
            placement: Placement::compute(&ids, layout.replicas),
            from,
            from_index,
            moved_below,
        });
        layout
    }

    /// The node list this layout is heading to (all of `nodes` unless it is
    /// transitional): what a change of membership starts from.
    pub fn target(&self) -> &[String] {
        &self.nodes[..self.target_len]
    }

    /// Slots a transitional layout has still to move (their old and new
    /// replica sets differ, and they are past the boundary); 0 otherwise.
    pub fn slots_left_to_move(&self) -> usize {
        self.slots_to_move().len()
    }

    /// The slots a change under way has still to move.
    pub fn slots_to_move(&self) -> Vec<u16> {
        let Some(t) = &self.transition else {
            return Vec::new();
        };
        (t.moved_below..SLOTS as u16)
            .filter(|&s| self.holder_addrs(s) != self.target_addrs(s))
            .collect()
    }

    /// Whether this layout is a step of a change still under way.
    pub fn in_transition(&self) -> bool {
        self.transition.is_some()
    }

    /// The nodes (indexes into `nodes`) that hold `slot`.
    pub fn slot_holders(&self, slot: u16) -> Vec<usize> {
        match &self.transition {
            Some(t) if slot >= t.moved_below => t
                .placement
                .holders(slot)
                .iter()
                .map(|&i| t.from_index[i as usize])
                .collect(),
            _ => self.placement.holders(slot).iter().map(|&i| i as usize).collect(),
        }
    }

    /// Those of `slots` that node `i` holds.
    pub fn held_by(&self, i: usize, slots: &[u16]) -> Vec<u16> {
        slots
            .iter()
            .copied()
            .filter(|&s| self.slot_holders(s).contains(&i))
            .collect()
    }

    /// The nodes that hold `key`.
    pub fn holders(&self, key: &[u8]) -> Vec<usize> {
        self.slot_holders(slot::key_slot(key))
    }

    /// The addresses holding `slot`, sorted: equal lists mean the same replicas.
    pub fn holder_addrs(&self, slot: u16) -> Vec<&str> {
        self.sorted_addrs(self.slot_holders(slot).into_iter())
    }

    /// The addresses that hold `slot` once a change under way is done.
    fn target_addrs(&self, slot: u16) -> Vec<&str> {
        self.sorted_addrs(self.placement.holders(slot).iter().map(|&i| i as usize))
    }

    fn sorted_addrs(&self, holders: impl Iterator<Item = usize>) -> Vec<&str> {
        let mut addrs: Vec<&str> = holders.map(|i| self.nodes[i].as_str()).collect();
        addrs.sort_unstable();
        addrs
    }

    /// The ballot counter every proposer's ballots at this version start above.
    pub fn first_counter(&self) -> u64 {
        self.version << EPOCH_SHIFT
    }

    /// The next layout on the way to the node list `wanted`, seen from `me`,
    /// or `None` when this layout is there. A transition under way is finished
    /// first, whatever `wanted` says. Each step moves at most [`STEP_SLOTS`]
    /// slots (a change that moves fewer is one step to the plain layout).
    /// Every node computes the same step from the same layout, so two nodes
    /// driving one change propose the same next version.
    pub fn next_step(&self, wanted: &[String], me: &str) -> Option<Layout> {
        let (from, to, start) = match &self.transition {
            Some(t) => (t.from.clone(), self.target().to_vec(), t.moved_below),
            None if same_nodes(&self.nodes, wanted) => return None,
            None => (self.nodes.clone(), wanted.to_vec(), 0),
        };
        let version = self.version + 1;
        let plain = Layout::new(version, to.clone(), self.replicas, me);
        let old = Layout::new(version, from.clone(), self.replicas, me);
        let mut moving = 0;
        for s in start..SLOTS as u16 {
            if old.holder_addrs(s) != plain.holder_addrs(s) {
                moving += 1;
                if moving == STEP_SLOTS && (s as usize) + 1 < SLOTS {
                    let more = (s + 1..SLOTS as u16).any(|r| old.holder_addrs(r) != plain.holder_addrs(r));
                    if more {
                        return Some(Layout::transitional(version, from, to, self.replicas, s + 1, me));
                    }
                    break;
                }
            }
        }
        Some(plain)
    }

    /// `version replicas node,node,...`, and for a transitional layout
    /// ` from node,node,... moved_below`: how a layout travels between nodes.
    pub fn encode(&self) -> String {
        let mut text = format!("{} {} {}", self.version, self.replicas, self.target().join(","));
        if let Some(t) = &self.transition {
            text.push_str(&format!(" from {} {}", t.from.join(","), t.moved_below));
        }
        text
    }

    /// The inverse of [`Layout::encode`], seen from the node at `me`.
    pub fn decode(text: &str, me: &str) -> Option<Layout> {
        let mut parts = text.split(' ');
        let version = parts.next()?.parse().ok()?;
        let replicas = parts.next()?.parse().ok()?;
        let nodes = parse_nodes(parts.next()?).ok()?;
        if version == 0 {
            return None;
        }
        match parts.next() {
            None => Some(Layout::new(version, nodes, replicas, me)),
            Some("from") => {
                let from = parse_nodes(parts.next()?).ok()?;
                let moved_below: u16 = parts.next()?.parse().ok()?;
                (parts.next().is_none() && (moved_below as usize) < SLOTS)
                    .then(|| Layout::transitional(version, from, nodes, replicas, moved_below, me))
            }
            Some(_) => None,
        }
    }
}

/// What one membership change does to a replicated placement: how much
/// moves, and how widely the copying could be spread (`bench placement`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaChange {
    /// Replicas that change node, over all replicas (R per slot).
    pub moved_fraction: f64,
    /// Nodes that hold a surviving copy of some moved replica (possible
    /// senders), and the most any one of them sends when each new replica
    /// is copied from its slot's surviving holders in turn, as a share of
    /// all replicas sent.
    pub senders: usize,
    pub max_sender_share: f64,
    /// Nodes that receive a replica, and the most any one receives.
    pub receivers: usize,
    pub max_receiver_share: f64,
}

/// [`ReplicaChange`] from the node list `before` to `after`, R = `replicas`.
/// A node in `before` and not in `after` is gone: it sends nothing.
pub fn simulate_change(before: &[String], after: &[String], replicas: usize) -> ReplicaChange {
    let (old, new) = (
        Layout::new(1, before.to_vec(), replicas, ""),
        Layout::new(2, after.to_vec(), replicas, ""),
    );
    let mut sent: std::collections::HashMap<&str, usize> = Default::default();
    let mut received: std::collections::HashMap<&str, usize> = Default::default();
    let (mut moved, mut total) = (0usize, 0usize);
    for s in 0..SLOTS as u16 {
        let (was, is) = (old.holder_addrs(s), new.holder_addrs(s));
        total += is.len();
        let sources: Vec<&str> = was
            .iter()
            .copied()
            .filter(|a| after.iter().any(|n| n == a))
            .collect();
        for (k, &to) in is.iter().filter(|a| !was.contains(a)).enumerate() {
            moved += 1;
            *received.entry(to).or_default() += 1;
            if !sources.is_empty() {
                *sent.entry(sources[(s as usize + k) % sources.len()]).or_default() += 1;
            }
        }
    }
    let share = |m: &std::collections::HashMap<&str, usize>| {
        m.values().copied().max().unwrap_or(0) as f64 / moved.max(1) as f64
    };
    ReplicaChange {
        moved_fraction: moved as f64 / total.max(1) as f64,
        senders: sent.len(),
        max_sender_share: share(&sent),
        receivers: received.len(),
        max_receiver_share: share(&received),
    }
}

/// Whether two node lists name the same nodes, in any order.
pub fn same_nodes(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// A node list as given on the command line or to `KVD.RECONFIGURE`:
/// `host:port` entries, none twice.
pub fn parse_nodes(text: &str) -> Result<Vec<String>, String> {
    let nodes: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    check_nodes(&nodes)?;
    Ok(nodes)
}

pub fn check_nodes(nodes: &[String]) -> Result<(), String> {
    if nodes.is_empty() {
        return Err("the node list is empty".into());
    }
    for n in nodes {
        if !n.contains(':') || n.contains(' ') || n.contains(',') {
            return Err(format!("'{n}' is not a host:port address"));
        }
    }
    let mut sorted = nodes.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != nodes.len() {
        return Err("the node list names a node twice".into());
    }
    Ok(())
}

/// What `<dir>/replica-config` holds: the layout and the frozen slots.
pub struct Membership {
    path: PathBuf,
    pub layout: std::sync::Arc<Layout>,
    /// Slots this node's acceptor refuses at `layout.version`: a
    /// reconfiguration is copying them to their next holders.
    frozen: Vec<bool>,
    pub frozen_count: usize,
    /// The vote on the next membership (single-decree Paxos among the current
    /// members, so two reconfigurations started at once cannot both win): the
    /// highest ballot promised, and the ballot and layout accepted.
    pub promised: Ballot,
    pub voted: Option<(Ballot, String)>,
}

/// What a node with no recorded membership does on its first start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstStart {
    /// Founds a new cluster of these nodes (`--peers`, the same list on each).
    Peers(Vec<String>),
    /// Founds a new cluster of itself alone (`--cluster` with no `--seed`).
    Alone,
    /// Waits to be added: it asks its `--seed`s, or a member runs
    /// `KVD.RECONFIGURE`.
    Join,
}

impl Membership {
    /// The membership recorded in `dir`; if there is none, what `first` says:
    /// a new cluster (version 1) of the `--peers` list or of this node alone,
    /// recorded, or no membership yet (the node waits to be added).
    pub fn open(dir: &Path, me: &str, first: &FirstStart, replicas: usize) -> anyhow::Result<Membership> {
        let path = dir.join("replica-config");
        let mut m = Membership {
            path,
            layout: std::sync::Arc::new(Layout::new(0, Vec::new(), 1, me)),
            frozen: vec![false; SLOTS],
            frozen_count: 0,
            promised: Ballot::default(),
            voted: None,
        };
        match std::fs::read_to_string(&m.path) {
            Ok(text) => {
                m.parse(&text, me).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} is damaged; it records this node's membership",
                        m.path.display()
                    )
                })?;
                if let FirstStart::Peers(nodes) = first {
                    if *nodes != m.layout.nodes {
                        tracing::warn!(
                            version = m.layout.version,
                            "--peers differs from the membership recorded in {}; using the recorded one \
                             (--peers is read only on a node's first start; KVD.RECONFIGURE changes it)",
                            m.path.display()
                        );
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let founders = match first {
                    FirstStart::Peers(nodes) => Some(nodes.clone()),
                    FirstStart::Alone => Some(vec![me.to_string()]),
                    FirstStart::Join => None,
                };
                if let Some(nodes) = founders {
                    check_nodes(&nodes).map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
                    m.layout = std::sync::Arc::new(Layout::new(1, nodes, replicas, me));
                    m.save()?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(m)
    }

    fn parse(&mut self, text: &str, me: &str) -> Option<()> {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
            match head {
                "layout" => self.layout = std::sync::Arc::new(Layout::decode(rest, me)?),
                "promised" => self.promised = parse_ballot(rest)?,
                "voted" => {
                    let mut words = rest.splitn(3, ' ');
                    let b = parse_ballot(&format!("{} {}", words.next()?, words.next()?))?;
                    let target = words.next()?.to_string();
                    Layout::decode(&target, me)?;
                    self.voted = Some((b, target));
                }
                "frozen" => {
                    for (a, b) in parse_ranges(rest)? {
                        for s in a..=b {
                            self.frozen[s as usize] = true;
                        }
                    }
                }
                _ => return None,
            }
        }
        self.frozen_count = self.frozen.iter().filter(|f| **f).count();
        Some(())
    }

    fn save(&self) -> std::io::Result<()> {
        let frozen = ranges((0..SLOTS as u16).filter(|&s| self.frozen[s as usize]));
        let mut text = format!(
            "# kvd replicated-cluster membership: written by kvd, do not edit\nlayout {}\nfrozen {}\npromised {} {}\n",
            self.layout.encode(),
            format_ranges(&frozen),
            self.promised.counter,
            self.promised.proposer,
        );
        if let Some((b, target)) = &self.voted {
            text.push_str(&format!("voted {} {} {target}\n", b.counter, b.proposer));
        }
        crate::durable::replace(&self.path, text.as_bytes())
    }

    pub fn is_frozen(&self, slot: u16) -> bool {
        self.frozen[slot as usize]
    }

    /// Phase 1 of the vote on the next membership: promises `b` unless a
    /// ballot ≥ `b` was promised (`Err` names it); answers the vote accepted.
    pub fn promise(&mut self, b: Ballot) -> std::io::Result<Result<Option<(Ballot, String)>, Ballot>> {
        if b <= self.promised {
            return Ok(Err(self.promised));
        }
        let before = self.promised;
        self.promised = b;
        if let Err(e) = self.save() {
            self.promised = before;
            return Err(e);
        }
        Ok(Ok(self.voted.clone()))
    }

    /// Phase 2 of the vote, and the freeze it carries: accepts `target` at `b`
    /// unless a higher ballot was promised, and freezes `slots`, durably, before
    /// the caller answers.
    pub fn freeze(
        &mut self,
        b: Ballot,
        target: &str,
        slots: &[(u16, u16)],
    ) -> std::io::Result<Result<(), Ballot>> {
        if b < self.promised {
            return Ok(Err(self.promised));
        }
        let before = (self.frozen.clone(), self.promised, self.voted.clone());
        for &(a, b) in slots {
            for s in a..=b {
                self.frozen[s as usize] = true;
            }
        }
        self.promised = b;
        self.voted = Some((b, target.to_string()));
        if let Err(e) = self.save() {
            (self.frozen, self.promised, self.voted) = before;
            return Err(e);
        }
        self.frozen_count = self.frozen.iter().filter(|f| **f).count();
        Ok(Ok(()))
    }

    /// Adopts a newer layout (durably); the frozen slots belonged to the old one.
    pub fn adopt(&mut self, layout: Layout) -> std::io::Result<bool> {
        if layout.version <= self.layout.version {
            return Ok(false);
        }
        let old = std::mem::replace(&mut self.layout, std::sync::Arc::new(layout));
        let frozen = std::mem::replace(&mut self.frozen, vec![false; SLOTS]);
        let vote = (std::mem::take(&mut self.promised), self.voted.take());
        if let Err(e) = self.save() {
            self.layout = old;
            self.frozen = frozen;
            (self.promised, self.voted) = vote;
            return Err(e);
        }
        self.frozen_count = 0;
        Ok(true)
    }
}

fn parse_ballot(text: &str) -> Option<Ballot> {
    let (c, p) = text.split_once(' ')?;
    Some(Ballot {
        counter: c.parse().ok()?,
        proposer: p.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &str) -> Vec<String> {
        parse_nodes(list).unwrap()
    }

    #[test]
    fn layouts_round_trip_and_bad_lists_are_refused() {
        let l = Layout::new(3, nodes("a:1,b:2,c:3"), 3, "b:2");
        assert_eq!(l.me, Some(1));
        let back = Layout::decode(&l.encode(), "c:3").unwrap();
        assert_eq!(
            (back.version, back.nodes.clone(), back.me),
            (3, l.nodes.clone(), Some(2))
        );
        assert!(parse_nodes("a:1,a:1").is_err());
        assert!(parse_nodes("").is_err());
        assert!(parse_nodes("nohost").is_err());
        assert!(Layout::decode("0 3 a:1", "a:1").is_none());
    }

    /// Slots whose holders differ between two layouts.
    fn moving(a: &Layout, b: &Layout) -> usize {
        (0..SLOTS as u16)
            .filter(|&s| a.holder_addrs(s) != b.holder_addrs(s))
            .count()
    }

    #[test]
    fn a_large_change_goes_in_steps_that_each_move_a_bounded_share() {
        for (from, to) in [
            ("a:1,b:2,c:3", "a:1,b:2,c:3,d:4"),
            ("a:1,b:2,c:3,d:4,e:5", "a:1,c:3,d:4,e:5"),
            ("a:1,b:2,c:3", "d:4,e:5,f:6"),
        ] {
            let start = Layout::new(7, nodes(from), 3, "a:1");
            let end = Layout::new(0, nodes(to), 3, "a:1");
            let total = moving(&start, &end);
            let mut at = start;
            let mut steps = 0;
            let mut moved = 0;
            while let Some(next) = at.next_step(&nodes(to), "a:1") {
                assert_eq!(next.version, at.version + 1);
                let m = moving(&at, &next);
                // What is left is what the later steps will move.
                assert_eq!(next.slots_left_to_move(), moving(&next, &end), "{from} -> {to}");
                assert!(m <= STEP_SLOTS, "{from} -> {to}: a step moved {m} slots");
                // Every slot is held by its old or its new holders, never a mix.
                for s in 0..SLOTS as u16 {
                    let h = next.holder_addrs(s);
                    assert!(h == at.holder_addrs(s) || h == end.holder_addrs(s));
                }
                // The layout travels intact (a transitional one too).
                let back = Layout::decode(&next.encode(), "d:4").unwrap();
                assert_eq!(back.encode(), next.encode());
                assert!((0..SLOTS as u16).all(|s| back.holder_addrs(s) == next.holder_addrs(s)));
                moved += m;
                steps += 1;
                at = next;
            }
            assert!(!at.in_transition());
            assert_eq!(at.target(), &nodes(to)[..]);
            assert_eq!(moved, total, "{from} -> {to}: each moving slot moved once");
            assert_eq!(steps, total.div_ceil(STEP_SLOTS), "{from} -> {to}: {total} slots");
        }
    }

    #[test]
    fn a_transition_lists_its_leaving_nodes_and_is_finished_before_a_new_change() {
        let from = nodes("a:1,b:2,c:3,x:9");
        let start = Layout::new(3, from.clone(), 3, "x:9");
        let step = start.next_step(&nodes("a:1,b:2,c:3"), "x:9").unwrap();
        assert!(step.in_transition());
        assert_eq!(step.target(), &nodes("a:1,b:2,c:3")[..]);
        assert_eq!(step.nodes, from, "the leaving node is a member until the end");
        assert_eq!(step.me, Some(3));
        // Another list asked for meanwhile: the transition goes on first.
        let next = step.next_step(&nodes("a:1,b:2"), "x:9").unwrap();
        assert_eq!(next.target(), &nodes("a:1,b:2,c:3")[..]);
        // A small change is one step, as before.
        let ten: Vec<String> = (0..10).map(|i| format!("n:{i}")).collect();
        let eleven: Vec<String> = (0..11).map(|i| format!("n:{i}")).collect();
        let small = Layout::new(3, ten, 1, "n:0").next_step(&eleven, "n:0").unwrap();
        assert!(
            !small.in_transition(),
            "one copy, 10 -> 11 nodes: about 1,500 slots move"
        );
        assert!(Layout::decode("3 3 a:1 from b:2 16384", "a:1").is_none());
        assert!(Layout::decode("3 3 a:1 over b:2 5", "a:1").is_none());
    }

    #[test]
    fn a_join_moves_about_its_share_and_a_loss_is_copied_from_many_nodes() {
        for n in [10usize, 100] {
            let ids: Vec<String> = (0..=n)
                .map(|i| format!("10.0.{}.{}:7379", i / 250, i % 250))
                .collect();
            let ideal = 1.0 / (n + 1) as f64;
            let join = simulate_change(&ids[..n], &ids, 3);
            assert!(join.moved_fraction >= ideal * 0.9, "n={n}: {join:?}");
            assert!(join.moved_fraction < 2.5 * ideal, "n={n}: {join:?} ideal {ideal}");
            assert_eq!(join.receivers, 1, "only the new node receives: {join:?}");
            let rest: Vec<String> = ids.iter().filter(|a| **a != ids[n / 2]).cloned().collect();
            let loss = simulate_change(&ids, &rest, 3);
            assert!(loss.moved_fraction < 2.5 * ideal, "n={n}: {loss:?}");
            // The lost node's replicas come from, and go to, many nodes.
            assert!(loss.senders > n / 4 && loss.receivers > n / 4, "n={n}: {loss:?}");
            assert!(loss.max_sender_share < 0.25, "n={n}: {loss:?}");
        }
    }

    #[test]
    fn a_cluster_smaller_than_r_keeps_r_for_when_it_grows() {
        let one = Layout::new(1, nodes("a:1"), 3, "a:1");
        assert_eq!((one.replicas, one.slot_holders(7).len()), (3, 1));
        let three = Layout::new(2, nodes("a:1,b:2,c:3"), one.replicas, "a:1");
        assert_eq!(three.slot_holders(7).len(), 3);
    }

    #[test]
    fn ballots_of_a_later_version_outrank_every_earlier_one() {
        let l = Layout::new(2, nodes("a:1"), 1, "a:1");
        let late_old = Ballot {
            counter: l.first_counter() - 1,
            proposer: u64::MAX,
        };
        assert!(install_ballot(2) > late_old);
        assert_eq!(epoch(late_old), 1);
        assert_eq!(epoch(install_ballot(2)), 2);
        let first_new = Ballot {
            counter: l.first_counter() + 1,
            proposer: 1,
        };
        assert!(first_new > install_ballot(2));
    }

    #[test]
    fn membership_survives_a_restart_and_frozen_slots_end_with_their_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Membership::open(dir.path(), "a:1", &FirstStart::Peers(nodes("a:1,b:2")), 3).unwrap();
        assert_eq!(m.layout.version, 1);
        let b = |counter| Ballot { counter, proposer: 1 };
        assert_eq!(m.promise(b(5)).unwrap(), Ok(None));
        assert_eq!(m.promise(b(4)).unwrap(), Err(b(5)));
        let target = Layout::new(2, nodes("a:1,b:2,c:3"), 3, "a:1").encode();
        assert_eq!(
            m.freeze(b(4), &target, &[(1, 1)]).unwrap(),
            Err(b(5)),
            "below the promise"
        );
        m.freeze(b(5), &target, &[(10, 20), (100, 100)]).unwrap().unwrap();
        let again = Membership::open(dir.path(), "a:1", &FirstStart::Peers(nodes("x:9")), 3).unwrap();
        assert_eq!(
            again.layout.nodes,
            nodes("a:1,b:2"),
            "the recorded membership wins over --peers"
        );
        assert!(again.is_frozen(15) && again.is_frozen(100) && !again.is_frozen(21));
        assert_eq!(again.frozen_count, 12);
        assert_eq!(again.voted, Some((b(5), target.clone())));
        m.adopt(Layout::new(2, nodes("a:1,b:2,c:3"), 3, "a:1")).unwrap();
        assert!(
            !m.adopt(Layout::new(2, nodes("a:1"), 3, "a:1")).unwrap(),
            "same version: kept"
        );
        let after = Membership::open(dir.path(), "a:1", &FirstStart::Alone, 3).unwrap();
        assert_eq!((after.layout.version, after.frozen_count), (2, 0));
        assert_eq!(
            (after.promised, after.voted),
            (Ballot::default(), None),
            "a new version, a new vote"
        );
        assert_eq!(
            after.layout.nodes,
            nodes("a:1,b:2,c:3"),
            "recorded, not founded again"
        );
        // A node told to join, with nothing recorded, waits to be added; one
        // told nothing founds a cluster of itself.
        let fresh = tempfile::tempdir().unwrap();
        let open = |first: FirstStart| Membership::open(fresh.path(), "d:4", &first, 3).unwrap().layout;
        assert_eq!(open(FirstStart::Join).version, 0);
        let alone = open(FirstStart::Alone);
        assert_eq!((alone.version, alone.nodes.clone()), (1, nodes("d:4")));
    }
}
