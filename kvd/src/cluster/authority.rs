//! Slot authority: which slots this node serves, and the hand-offs in flight.
//!
//! The invariant the whole cluster rests on: **at any moment at most one node
//! executes commands on a slot** — the node holding its authority. Authority is
//! created once, when a node founds a cluster (it gets every slot), and after
//! that only moves by a hand-off between two nodes:
//!
//! 1. The importer records `Importing { from }` here (durably) first, so that a
//!    crash mid-move resumes the move instead of forgetting it.
//! 2. It asks the source to hand the slots off. The source, holding its
//!    database gate exclusively (no command of its own is running), records
//!    `HandedOff { to }` durably and from then on only forwards that slot's
//!    commands to the importer. It still keeps the slot's keys.
//! 3. The importer copies the keys, records `Owned`, and only then executes
//!    commands on the slot (commands that arrive meanwhile wait).
//! 4. It tells the source to drop its copy.
//!
//! Steps 2 and 3 never overlap in time for one slot, so two nodes never both
//! execute on it; and the source deletes nothing before the importer owns a
//! durable copy, so a crash at any step loses no key. Routing views (gossip,
//! placement) may lag or disagree; they only decide where a request is *sent*,
//! never whether a node may execute it — that is decided here.
//!
//! The state lives in `<dir>/cluster-slots`, rewritten whole (temp file, fsync,
//! rename, fsync of the directory) on every change: it is small (a few KiB of
//! ranges) and changes only when slots move, in batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::slot::{format_ranges, parse_ranges, ranges, SLOTS};

/// What this node may do with one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Not ours: requests go to whoever serves it.
    Absent,
    /// Ours: commands on it execute here.
    Owned,
    /// Being copied here from `from`; commands wait until it is `Owned`.
    Importing { from: String },
    /// Given to `to`, whose copy may not be complete yet: forward everything
    /// there. The keys stay here until `to` says it owns them.
    HandedOff { to: String },
}

/// The per-slot states and the file that keeps them.
pub struct Authority {
    path: PathBuf,
    slots: Vec<SlotState>,
}

impl Authority {
    /// Loads `<dir>/cluster-slots`; a node without one has no slots (or, when
    /// `found` is set, founds a cluster and owns them all).
    pub fn open(dir: &Path, found: bool) -> std::io::Result<Authority> {
        let path = dir.join("cluster-slots");
        let mut auth = Authority {
            path,
            slots: vec![SlotState::Absent; SLOTS],
        };
        match std::fs::read_to_string(&auth.path) {
            Ok(text) => auth.parse(&text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if found {
                    auth.slots = vec![SlotState::Owned; SLOTS];
                }
                auth.save()?;
            }
            Err(e) => return Err(e),
        }
        Ok(auth)
    }

    fn parse(&mut self, text: &str) -> std::io::Result<()> {
        let bad = |line: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: cannot read line {line:?}", self.path.display()),
            )
        };
        for line in text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (state, list) = match words.as_slice() {
                ["owned", list] => (SlotState::Owned, *list),
                ["importing", from, list] => (
                    SlotState::Importing {
                        from: from.to_string(),
                    },
                    *list,
                ),
                ["handed-off", to, list] => (SlotState::HandedOff { to: to.to_string() }, *list),
                _ => return Err(bad(line)),
            };
            for (a, b) in parse_ranges(list).ok_or_else(|| bad(line))? {
                for s in a..=b {
                    self.slots[s as usize] = state.clone();
                }
            }
        }
        Ok(())
    }

    /// Writes the whole state durably: a crash leaves the old file or the new.
    fn save(&self) -> std::io::Result<()> {
        let mut groups: BTreeMap<String, Vec<u16>> = BTreeMap::new();
        for (s, state) in self.slots.iter().enumerate() {
            let head = match state {
                SlotState::Absent => continue,
                SlotState::Owned => "owned".to_string(),
                SlotState::Importing { from } => format!("importing {from}"),
                SlotState::HandedOff { to } => format!("handed-off {to}"),
            };
            groups.entry(head).or_default().push(s as u16);
        }
        let mut text = String::from("# kvd slot authority: written by kvd, do not edit\n");
        for (head, slots) in groups {
            text.push_str(&format!("{head} {}\n", format_ranges(&ranges(slots))));
        }
        crate::durable::replace(&self.path, text.as_bytes())
    }

    pub fn state(&self, slot: u16) -> &SlotState {
        &self.slots[slot as usize]
    }

    /// Sets several slots at once and persists; on a write error nothing changes
    /// in memory either, so memory never claims what the disk does not.
    pub fn set(&mut self, slots: &[u16], state: SlotState) -> std::io::Result<()> {
        let old: Vec<SlotState> = slots.iter().map(|&s| self.slots[s as usize].clone()).collect();
        for &s in slots {
            self.slots[s as usize] = state.clone();
        }
        if let Err(e) = self.save() {
            for (&s, o) in slots.iter().zip(old) {
                self.slots[s as usize] = o;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Slots in a given state.
    pub fn slots_where(&self, pred: impl Fn(&SlotState) -> bool) -> Vec<u16> {
        (0..SLOTS as u16)
            .filter(|&s| pred(&self.slots[s as usize]))
            .collect()
    }

    pub fn owned_count(&self) -> usize {
        self.slots.iter().filter(|s| **s == SlotState::Owned).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopen_and_a_founder_owns_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Authority::open(dir.path(), true).unwrap();
        assert_eq!(a.owned_count(), SLOTS);
        a.set(&[1, 2, 3], SlotState::HandedOff { to: "b".repeat(40) })
            .unwrap();
        a.set(&[9], SlotState::Importing { from: "c".repeat(40) })
            .unwrap();
        a.set(&[10], SlotState::Absent).unwrap();
        // Reopening never founds again: the file is what counts.
        let b = Authority::open(dir.path(), true).unwrap();
        assert_eq!(b.state(2), &SlotState::HandedOff { to: "b".repeat(40) });
        assert_eq!(b.state(9), &SlotState::Importing { from: "c".repeat(40) });
        assert_eq!(b.state(10), &SlotState::Absent);
        assert_eq!(b.owned_count(), SLOTS - 5);
        // A joiner starts with nothing.
        let other = tempfile::tempdir().unwrap();
        assert_eq!(Authority::open(other.path(), false).unwrap().owned_count(), 0);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster-slots"), "owned 0-99999\n").unwrap();
        assert!(Authority::open(dir.path(), true).is_err());
    }
}
