//! CASPaxos (Rystsov, 2018): a replicated register changed only by
//! compare-and-swap, with no leader and no log — the algorithm every write to
//! a key runs, so that the file system's root swap (WATCH/MULTI/EXEC) stays
//! linearizable while any minority of a key's replicas is down.
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
//!
//! This module holds the vocabulary only. The rules as the nodes run them
//! are [`crate::replica::acceptor`] and [`crate::replica::proposer`], and the
//! simulation in `protocol-tests/tests/paxos_sim.rs` drives those very
//! modules (there is no second, model copy of the algorithm to drift apart
//! from them).

/// A ballot number: ordered by counter, then by proposer id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    pub counter: u64,
    pub proposer: u64,
}

/// The number of answers that make a majority of `n` acceptors.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}
