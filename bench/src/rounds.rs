//! Rounds: how every comparison in `bench` is run and reported.
//!
//! A row compares our side with a peer. Each round runs every side back to
//! back, the first side alternating from round to round (on this VM memory
//! touched for the first time is slow, and a passing load favours whoever runs
//! in a quiet moment). The row's figure is the **median of the per-round
//! ratios** (each round's ours ÷ peer, measured minutes apart at most): that
//! is what filters the machine's drift between rounds, which a ratio of
//! medians does not. Every round's figures are kept in the results file, so
//! a reader can check the spread behind a median.

use anyhow::Result;
use serde::Serialize;

/// One round of a compared row.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub ours: f64,
    pub peer: f64,
    pub ratio: f64,
    /// Whether our side ran first in this round.
    pub ours_first: bool,
}

/// A row compared over rounds (higher is better for both figures).
#[derive(Clone, Debug, Serialize)]
pub struct Compared {
    /// Median of our side's figures.
    pub ours: f64,
    /// Median of the peer's figures.
    pub peer: f64,
    /// Median of the per-round ratios: the figure the docs quote.
    pub ratio: f64,
    pub rounds: Vec<Round>,
}

impl Compared {
    /// The smallest and largest per-round ratio.
    pub fn spread(&self) -> (f64, f64) {
        let lo = self.rounds.iter().map(|r| r.ratio).fold(f64::INFINITY, f64::min);
        let hi = self.rounds.iter().map(|r| r.ratio).fold(0.0, f64::max);
        (lo, hi)
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every side's measurements, `[side][round]`, each a list of named figures
/// (redis-benchmark gives one per test of a run).
pub struct Runs {
    runs: Vec<Vec<Vec<(String, f64)>>>,
    /// `[round]`: the side that went first.
    first: Vec<usize>,
}

/// Runs `rounds` rounds of `sides` sides; round `r` starts with side
/// `r % sides` and goes round in order.
pub fn run(
    sides: usize,
    rounds: usize,
    mut measure: impl FnMut(usize) -> Result<Vec<(String, f64)>>,
) -> Result<Runs> {
    let mut runs = vec![Vec::new(); sides];
    let mut first = Vec::new();
    for round in 0..rounds {
        first.push(round % sides);
        for k in 0..sides {
            let side = (round + k) % sides;
            runs[side].push(measure(side)?);
        }
    }
    Ok(Runs { runs, first })
}

impl Runs {
    /// The names of the figures each run gave (those of side 0's first run).
    pub fn tests(&self) -> Vec<String> {
        self.runs[0][0].iter().map(|(t, _)| t.clone()).collect()
    }

    fn figure(&self, side: usize, round: usize, test: &str) -> f64 {
        self.runs[side][round]
            .iter()
            .find(|(t, _)| t == test)
            .map_or(f64::NAN, |(_, v)| *v)
    }

    /// The median over the rounds of one side's figure `test`.
    pub fn median_of(&self, side: usize, test: &str) -> f64 {
        median(
            (0..self.first.len())
                .map(|r| self.figure(side, r, test))
                .collect(),
        )
    }

    /// Side `ours` against side `peer` on figure `test`.
    pub fn compare(&self, test: &str, ours: usize, peer: usize) -> Compared {
        let rounds: Vec<Round> = (0..self.first.len())
            .map(|r| {
                let (o, p) = (self.figure(ours, r, test), self.figure(peer, r, test));
                // Who of the two ran first this round.
                let order = |s: usize| (s + self.runs.len() - self.first[r]) % self.runs.len();
                Round {
                    ours: o,
                    peer: p,
                    ratio: o / p,
                    ours_first: order(ours) < order(peer),
                }
            })
            .collect();
        Compared {
            ours: median(rounds.iter().map(|r| r.ours).collect()),
            peer: median(rounds.iter().map(|r| r.peer).collect()),
            ratio: median(rounds.iter().map(|r| r.ratio).collect()),
            rounds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_the_median_of_round_ratios_and_the_order_alternates() {
        // Side 0 is always twice side 1 within a round, while the machine's
        // speed drifts tenfold between rounds.
        let speed = [1.0, 10.0, 3.0];
        let mut calls = Vec::new();
        let runs = run(2, 3, |side| {
            calls.push(side);
            let round = (calls.len() - 1) / 2;
            let v = speed[round] * if side == 0 { 2.0 } else { 1.0 };
            Ok(vec![("SET".into(), v)])
        })
        .unwrap();
        assert_eq!(calls, [0, 1, 1, 0, 0, 1]);
        let c = runs.compare("SET", 0, 1);
        assert_eq!(c.ratio, 2.0);
        assert_eq!(c.rounds.len(), 3);
        assert_eq!(
            c.rounds.iter().map(|r| r.ours_first).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(median(vec![1.0, 3.0, 2.0, 10.0]), 2.5);
    }
}
