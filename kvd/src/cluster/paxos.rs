//! CASPaxos (Rystsov, 2018): a replicated register changed only by
//! compare-and-swap, with no leader and no log — the algorithm the
//! replication issue uses for every write to a key, so that the file system's
//! root swap (WATCH/MULTI/EXEC) stays linearizable while any minority of a
//! key's replicas is down. This module is the algorithm alone, with no I/O:
//! the acceptor's two handlers and the proposer's two decisions. The network
//! and durability live elsewhere; the tests here drive it through a simulated
//! network that loses and reorders messages, and check every history with the
//! linearizability checker of the test crate.
//!
//! A proposer changes the register with a pure function `f(state) -> state`:
//! 1. *prepare(b)* to all acceptors; an acceptor that has not promised a ballot
//!    ≥ b promises b (durably) and returns what it accepted last;
//! 2. with promises from a majority, the proposer takes the accepted value with
//!    the highest ballot (none: the register is empty), computes `f` of it, and
//!    sends *accept(b, new)*; an acceptor that has not promised a ballot > b
//!    accepts (durably);
//! 3. acks from a majority commit the change. Anything else (a conflict, a
//!    timeout) is retried with a higher ballot; the outcome of an attempt that
//!    timed out after sending accepts is unknown until a later round reads it.
//!
//! Reads are the same round with `f` = identity (or they would not be
//! linearizable). Ballots are (counter, proposer id), so two proposers never
//! share one.

/// A ballot number: ordered by counter, then by proposer id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    pub counter: u64,
    pub proposer: u64,
}

impl Ballot {
    /// The smallest ballot of `proposer` above `seen`.
    pub fn above(seen: Ballot, proposer: u64) -> Ballot {
        Ballot {
            counter: seen.counter + 1,
            proposer,
        }
    }
}

/// One acceptor's durable state for one register.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acceptor<V> {
    /// The highest ballot promised.
    pub promised: Ballot,
    /// The ballot of the value accepted last, and the value (`None`: empty).
    pub accepted: Ballot,
    pub value: Option<V>,
}

/// An acceptor's answer to prepare: its last accepted (ballot, value).
pub type Promise<V> = (Ballot, Option<V>);

impl<V: Clone> Acceptor<V> {
    /// Phase 1. `Err` carries the ballot that beat `b`, for the proposer's next try.
    /// The caller persists the new state before answering.
    pub fn prepare(&mut self, b: Ballot) -> Result<Promise<V>, Ballot> {
        if b <= self.promised {
            return Err(self.promised);
        }
        self.promised = b;
        Ok((self.accepted, self.value.clone()))
    }

    /// Phase 2. The caller persists the new state before acknowledging.
    pub fn accept(&mut self, b: Ballot, value: Option<V>) -> Result<(), Ballot> {
        if b < self.promised {
            return Err(self.promised);
        }
        self.promised = b;
        self.accepted = b;
        self.value = value;
        Ok(())
    }
}

/// The number of answers that make a majority of `n` acceptors.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The current state as a majority of promises shows it: the value accepted
/// with the highest ballot.
pub fn current<V: Clone>(promises: &[Promise<V>]) -> Option<V> {
    promises
        .iter()
        .max_by_key(|(b, _)| *b)
        .and_then(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acceptor_promises_only_upward_and_accepts_what_it_promised() {
        let mut a: Acceptor<i64> = Acceptor::default();
        let b1 = Ballot {
            counter: 1,
            proposer: 1,
        };
        let b2 = Ballot {
            counter: 1,
            proposer: 2,
        };
        assert_eq!(a.prepare(b1), Ok((Ballot::default(), None)));
        assert_eq!(a.prepare(b1), Err(b1), "the same ballot twice");
        assert_eq!(a.prepare(b2), Ok((Ballot::default(), None)));
        assert_eq!(a.accept(b1, Some(5)), Err(b2), "b1 was overtaken");
        assert_eq!(a.accept(b2, Some(7)), Ok(()));
        assert_eq!(a.prepare(Ballot::above(b2, 1)), Ok((b2, Some(7))));
        assert_eq!(
            current(&[(b1, Some(5)), (b2, Some(7)), (Ballot::default(), None)]),
            Some(7)
        );
        assert_eq!(majority(3), 2);
        assert_eq!(majority(5), 3);
    }
}
