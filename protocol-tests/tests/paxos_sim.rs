//! kvd's CASPaxos core (`kvd::cluster::paxos`) driven through a simulated
//! network that delays, reorders and loses messages, with proposers that time
//! out and acceptors that go down and come back: every history of reads and
//! increments must be linearizable. A deliberately broken proposer (one that
//! trusts any promise instead of the highest-ballot one) must be caught, which
//! shows the simulation and the checker can fail.

use std::time::{Duration, Instant};

use kvd::cluster::paxos::{current, majority, Acceptor, Ballot, Promise};
use protocol_tests::linearizability::{check, Event, Op};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
enum Msg {
    Prepare {
        p: usize,
        a: usize,
        attempt: u64,
        b: Ballot,
    },
    Promised {
        p: usize,
        attempt: u64,
        r: Result<Promise<i64>, Ballot>,
    },
    Accept {
        p: usize,
        a: usize,
        attempt: u64,
        b: Ballot,
        v: Option<i64>,
    },
    Accepted {
        p: usize,
        attempt: u64,
        r: Result<(), Ballot>,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Increment,
}

enum Phase {
    Idle,
    Preparing {
        promises: Vec<Promise<i64>>,
    },
    Accepting {
        acks: usize,
        cur: Option<i64>,
        new: Option<i64>,
    },
}

struct Proposer {
    id: u64,
    seen: Ballot,
    attempt: u64,
    ballot: Ballot,
    kind: Kind,
    invoked: Instant,
    phase: Phase,
}

/// Runs one simulated history; returns it (with the initial state `None`).
fn simulate(
    seed: u64,
    acceptors: usize,
    proposers: usize,
    steps: usize,
    trust_any_promise: bool,
) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let at = |step: usize| start + Duration::from_micros(step as u64);
    let mut acc: Vec<Acceptor<i64>> = vec![Acceptor::default(); acceptors];
    let mut down = vec![false; acceptors];
    let mut ps: Vec<Proposer> = (0..proposers)
        .map(|i| Proposer {
            id: i as u64 + 1,
            seen: Ballot::default(),
            attempt: 0,
            ballot: Ballot::default(),
            kind: Kind::Read,
            invoked: start,
            phase: Phase::Idle,
        })
        .collect();
    let mut net: Vec<Msg> = Vec::new();
    let mut history = Vec::new();
    let need = majority(acceptors);
    // Ends an attempt without an answer: if accepts may have gone out, its effect is unknown.
    let give_up = |p: &mut Proposer, history: &mut Vec<Event>| {
        if let Phase::Accepting { cur, new, .. } = p.phase {
            if p.kind == Kind::Increment {
                history.push(Event {
                    op: Op::Cas {
                        expected: cur,
                        new: new.unwrap_or(0),
                    },
                    invoked: p.invoked,
                    completed: None,
                });
            }
        }
        p.phase = Phase::Idle;
    };
    for step in 0..steps {
        let roll = rng.gen_range(0..100);
        if roll < 60 && !net.is_empty() {
            let msg = net.swap_remove(rng.gen_range(0..net.len()));
            if rng.gen_range(0..100) < 5 {
                continue; // lost
            }
            match msg {
                Msg::Prepare { p, a, attempt, b } => {
                    if !down[a] {
                        net.push(Msg::Promised {
                            p,
                            attempt,
                            r: acc[a].prepare(b),
                        });
                    }
                }
                Msg::Accept { p, a, attempt, b, v } => {
                    if !down[a] {
                        net.push(Msg::Accepted {
                            p,
                            attempt,
                            r: acc[a].accept(b, v),
                        });
                    }
                }
                Msg::Promised { p, attempt, r } => {
                    let pr = &mut ps[p];
                    if attempt != pr.attempt {
                        continue;
                    }
                    match r {
                        Err(b) => {
                            pr.seen = pr.seen.max(b);
                            give_up(pr, &mut history);
                        }
                        Ok(promise) => {
                            let Phase::Preparing { promises } = &mut pr.phase else {
                                continue;
                            };
                            promises.push(promise);
                            if promises.len() == need {
                                let cur = if trust_any_promise {
                                    promises[0].1
                                } else {
                                    current(promises)
                                };
                                let new = match pr.kind {
                                    Kind::Read => cur,
                                    Kind::Increment => Some(cur.unwrap_or(0) + 1),
                                };
                                pr.phase = Phase::Accepting { acks: 0, cur, new };
                                for a in 0..acceptors {
                                    net.push(Msg::Accept {
                                        p,
                                        a,
                                        attempt,
                                        b: pr.ballot,
                                        v: new,
                                    });
                                }
                            }
                        }
                    }
                }
                Msg::Accepted { p, attempt, r } => {
                    let pr = &mut ps[p];
                    if attempt != pr.attempt {
                        continue;
                    }
                    match r {
                        Err(b) => {
                            pr.seen = pr.seen.max(b);
                            give_up(pr, &mut history);
                        }
                        Ok(()) => {
                            let Phase::Accepting { acks, cur, new } = &mut pr.phase else {
                                continue;
                            };
                            *acks += 1;
                            if *acks == need {
                                let op = match pr.kind {
                                    Kind::Read => Op::Read(*cur),
                                    Kind::Increment => Op::Cas {
                                        expected: *cur,
                                        new: new.unwrap_or(0),
                                    },
                                };
                                history.push(Event {
                                    op,
                                    invoked: pr.invoked,
                                    completed: Some(at(step)),
                                });
                                pr.phase = Phase::Idle;
                            }
                        }
                    }
                }
            }
        } else if roll < 62 {
            // A proposer waiting too long gives up on its attempt.
            let p = rng.gen_range(0..proposers);
            if !matches!(ps[p].phase, Phase::Idle) {
                give_up(&mut ps[p], &mut history);
            }
        } else if roll < 66 {
            // An acceptor goes down or comes back (its state is durable); a
            // majority always stays up.
            let a = rng.gen_range(0..acceptors);
            let downs = down.iter().filter(|d| **d).count();
            if down[a] || downs + 1 < acceptors - need + 1 {
                down[a] = !down[a];
            }
        } else {
            let p = rng.gen_range(0..proposers);
            let pr = &mut ps[p];
            if matches!(pr.phase, Phase::Idle) {
                pr.attempt += 1;
                pr.ballot = Ballot::above(pr.seen.max(pr.ballot), pr.id);
                pr.kind = if rng.gen_bool(0.5) {
                    Kind::Read
                } else {
                    Kind::Increment
                };
                pr.invoked = at(step);
                pr.phase = Phase::Preparing { promises: Vec::new() };
                for a in 0..acceptors {
                    net.push(Msg::Prepare {
                        p,
                        a,
                        attempt: pr.attempt,
                        b: pr.ballot,
                    });
                }
            }
        }
    }
    for p in &mut ps {
        give_up(p, &mut history);
    }
    history
}

#[test]
fn caspaxos_histories_are_linearizable_under_loss_reordering_and_failures() {
    let mut ops = 0;
    for seed in 0..300 {
        for (acceptors, proposers) in [(3, 3), (5, 4)] {
            let h = simulate(seed, acceptors, proposers, 1500, false);
            ops += h.len();
            assert!(
                check(&h, None),
                "seed {seed}, {acceptors} acceptors: not linearizable: {h:#?}"
            );
        }
    }
    eprintln!("{ops} operations in 600 simulated histories, all linearizable");
    assert!(ops > 10_000);
}

#[test]
fn a_proposer_that_trusts_any_promise_is_caught() {
    let caught = (0..300)
        .filter(|&seed| !check(&simulate(seed, 3, 3, 1500, true), None))
        .count();
    eprintln!("the broken proposer was caught in {caught} of 300 histories");
    assert!(caught > 0);
}
