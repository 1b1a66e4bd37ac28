//! A linearizability checker for histories of one register with read, write
//! and compare-and-swap: the Wing & Gong search with Lowe's memoisation (the
//! algorithm of Knossos and Porcupine).
//!
//! A history is a set of operations, each with the time it was invoked, the
//! time its reply arrived, and what it returned. It is linearizable if the
//! operations can be put in one order that respects real time (an operation
//! that finished before another began comes first) and in which every
//! operation's result is what a single register would have given. The search
//! tries operations that may come next (those invoked before the earliest
//! pending reply), backtracks on a wrong result, and never revisits a
//! (set of operations done, register value) pair.

use std::collections::HashSet;
use std::time::Instant;

/// What one operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read that returned this value (`None`: the key did not exist).
    Read(Option<i64>),
    /// A write of this value.
    Write(i64),
    /// A compare-and-swap from `expected` to `new` that succeeded.
    Cas { expected: Option<i64>, new: i64 },
}

/// One operation with its real-time interval.
#[derive(Clone, Debug)]
pub struct Event {
    pub op: Op,
    pub invoked: Instant,
    /// When its reply arrived; `None` when none did (a timeout): the operation
    /// may have taken effect at any time after its invocation, or never.
    pub completed: Option<Instant>,
}

fn step(state: Option<i64>, op: &Op) -> Option<Option<i64>> {
    match op {
        Op::Read(v) => (*v == state).then_some(state),
        Op::Write(v) => Some(Some(*v)),
        Op::Cas { expected, new } => (*expected == state).then_some(Some(*new)),
    }
}

/// Whether `history`, starting from `initial`, is linearizable. Histories of a
/// few thousand operations of a busy register check in well under a second.
pub fn check(history: &[Event], initial: Option<i64>) -> bool {
    // Events in time order: each operation's call, then its return.
    #[derive(Clone, Copy)]
    struct Node {
        op: usize,
        is_call: bool,
        prev: usize,
        next: usize,
        /// For a call, the node of its return.
        ret: usize,
    }
    let n = history.len();
    let never = history
        .iter()
        .flat_map(|e| [Some(e.invoked), e.completed])
        .flatten()
        .max()
        .map(|t| t + std::time::Duration::from_secs(3600));
    let mut times: Vec<(Instant, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in history.iter().enumerate() {
        times.push((e.invoked, true, i));
        times.push((e.completed.or(never).unwrap_or(e.invoked), false, i));
    }
    // Operations that must be in the order; those without a reply may be left out.
    let mut must = history.iter().filter(|e| e.completed.is_some()).count();
    // At equal times a return sorts before a call: the operations did not overlap.
    times.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    // Node 0 is the head sentinel; events are 1..=2n.
    let mut nodes = vec![
        Node {
            op: usize::MAX,
            is_call: false,
            prev: 0,
            next: 0,
            ret: 0
        };
        2 * n + 1
    ];
    let mut ret_of = vec![0usize; n];
    for (k, &(_, is_call, op)) in times.iter().enumerate() {
        let idx = k + 1;
        nodes[idx] = Node {
            op,
            is_call,
            prev: idx - 1,
            next: if idx == 2 * n { 0 } else { idx + 1 },
            ret: 0,
        };
        if !is_call {
            ret_of[op] = idx;
        }
    }
    nodes[0].next = if n == 0 { 0 } else { 1 };
    nodes[0].prev = 2 * n;
    for idx in 1..=2 * n {
        if nodes[idx].is_call {
            nodes[idx].ret = ret_of[nodes[idx].op];
        }
    }
    let unlink = |nodes: &mut Vec<Node>, i: usize| {
        let (p, x) = (nodes[i].prev, nodes[i].next);
        nodes[p].next = x;
        nodes[x].prev = p;
    };
    let relink = |nodes: &mut Vec<Node>, i: usize| {
        let (p, x) = (nodes[i].prev, nodes[i].next);
        nodes[p].next = i;
        nodes[x].prev = i;
    };
    let mut done = vec![0u64; n.div_ceil(64).max(1)];
    let mut seen: HashSet<(Vec<u64>, Option<i64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<i64>)> = Vec::new();
    let mut state = initial;
    let mut entry = nodes[0].next;
    while must > 0 {
        if entry == 0 {
            // Walked past the end without finding a return: cannot happen in a
            // well-formed list (every call is followed by its return).
            return false;
        }
        let node = nodes[entry];
        if node.is_call {
            if let Some(next_state) = step(state, &history[node.op].op) {
                done[node.op / 64] |= 1 << (node.op % 64);
                if seen.insert((done.clone(), next_state)) {
                    if history[node.op].completed.is_some() {
                        must -= 1;
                    }
                    stack.push((entry, state));
                    state = next_state;
                    unlink(&mut nodes, entry);
                    unlink(&mut nodes, node.ret);
                    entry = nodes[0].next;
                    continue;
                }
                done[node.op / 64] &= !(1 << (node.op % 64));
            }
            entry = node.next;
        } else {
            // The earliest pending return: its operation must already be in the
            // order. Undo the last choice and try the next candidate.
            let Some((call, previous)) = stack.pop() else {
                return false;
            };
            let op = nodes[call].op;
            if history[op].completed.is_some() {
                must += 1;
            }
            done[op / 64] &= !(1 << (op % 64));
            state = previous;
            let ret = nodes[call].ret;
            relink(&mut nodes, ret);
            relink(&mut nodes, call);
            entry = nodes[call].next;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An event from integer times (milliseconds from a common start).
    fn ev(start: Instant, op: Op, a: u64, b: u64) -> Event {
        Event {
            op,
            invoked: start + Duration::from_millis(a),
            completed: Some(start + Duration::from_millis(b)),
        }
    }

    #[test]
    fn an_operation_without_a_reply_may_or_may_not_have_happened() {
        let t = Instant::now();
        let lost = |a: u64| Event {
            op: Op::Write(9),
            invoked: t + Duration::from_millis(a),
            completed: None,
        };
        // Seen by a later read: it happened.
        assert!(check(&[lost(0), ev(t, Op::Read(Some(9)), 10, 20)], None));
        // Not seen: it did not (yet).
        assert!(check(&[lost(0), ev(t, Op::Read(None), 10, 20)], None));
        // But it cannot have happened before it was invoked.
        assert!(!check(&[ev(t, Op::Read(Some(9)), 0, 5), lost(10)], None));
    }

    #[test]
    fn accepts_concurrent_histories_that_have_an_order() {
        let t = Instant::now();
        let h = vec![
            ev(t, Op::Write(1), 0, 10),
            ev(t, Op::Read(Some(1)), 5, 20),
            ev(t, Op::Read(None), 1, 3), // before the write took effect
            ev(
                t,
                Op::Cas {
                    expected: Some(1),
                    new: 2,
                },
                15,
                30,
            ),
            ev(t, Op::Read(Some(2)), 25, 40),
            ev(t, Op::Read(Some(1)), 16, 26), // overlaps the CAS: may precede it
        ];
        assert!(check(&h, None));
        assert!(check(&[], None));
    }

    #[test]
    fn rejects_a_stale_read() {
        let t = Instant::now();
        let h = vec![
            ev(t, Op::Write(1), 0, 10),
            ev(t, Op::Write(2), 11, 20),
            ev(t, Op::Read(Some(1)), 21, 30),
        ];
        assert!(!check(&h, None));
    }

    #[test]
    fn rejects_two_successful_cas_from_one_value() {
        let t = Instant::now();
        let h = vec![
            ev(
                t,
                Op::Cas {
                    expected: Some(0),
                    new: 1,
                },
                0,
                10,
            ),
            ev(
                t,
                Op::Cas {
                    expected: Some(0),
                    new: 1,
                },
                5,
                15,
            ),
        ];
        assert!(!check(&h, Some(0)));
        // Either alone is fine.
        assert!(check(&h[..1], Some(0)));
    }

    #[test]
    fn rejects_a_lost_update_and_time_travel() {
        let t = Instant::now();
        // An increment acknowledged, then a read that does not see it.
        let h = vec![
            ev(
                t,
                Op::Cas {
                    expected: Some(0),
                    new: 1,
                },
                0,
                10,
            ),
            ev(
                t,
                Op::Cas {
                    expected: Some(1),
                    new: 2,
                },
                20,
                30,
            ),
            ev(t, Op::Read(Some(1)), 40, 50),
        ];
        assert!(!check(&h, Some(0)));
        // A read that sees a value before it was written.
        let h = vec![ev(t, Op::Read(Some(5)), 0, 10), ev(t, Op::Write(5), 20, 30)];
        assert!(!check(&h, None));
    }
}
