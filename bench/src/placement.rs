//! `bench placement`: the replicated placement, simulated (no processes), at
//! 3, 100, 1,000 and 10,000 nodes with R = 3: the share of replicas a join
//! moves (ideal: 1/(n+1)) and a node's loss moves, and how widely the copying
//! could be spread — how many nodes hold a surviving copy to send from, and
//! the most any one node sends or receives.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

#[derive(Serialize)]
pub struct Row {
    nodes: usize,
    replicas: usize,
    ideal_fraction: f64,
    join_moved_fraction: f64,
    join_senders: usize,
    join_max_sender_share: f64,
    join_receivers: usize,
    loss_moved_fraction: f64,
    loss_senders: usize,
    loss_max_sender_share: f64,
    loss_receivers: usize,
    loss_max_receiver_share: f64,
    seconds_to_compute: f64,
}

#[derive(Serialize)]
pub struct Report {
    rows: Vec<Row>,
    note: String,
}

pub fn run() -> Result<Report> {
    let mut rows = Vec::new();
    for n in [3usize, 100, 1000, 10_000] {
        let t = Instant::now();
        let ids: Vec<String> = (0..=n)
            .map(|i| format!("10.{}.{}.{}:7379", i / 65536, (i / 256) % 256, i % 256))
            .collect();
        let join = kvd::replica::layout::simulate_change(&ids[..n], &ids, 3);
        let rest: Vec<String> = ids.iter().filter(|a| **a != ids[n / 2]).cloned().collect();
        let loss = kvd::replica::layout::simulate_change(&ids, &rest, 3);
        let row = Row {
            nodes: n,
            replicas: 3,
            ideal_fraction: 1.0 / (n + 1) as f64,
            join_moved_fraction: join.moved_fraction,
            join_senders: join.senders,
            join_max_sender_share: join.max_sender_share,
            join_receivers: join.receivers,
            loss_moved_fraction: loss.moved_fraction,
            loss_senders: loss.senders,
            loss_max_sender_share: loss.max_sender_share,
            loss_receivers: loss.receivers,
            loss_max_receiver_share: loss.max_receiver_share,
            seconds_to_compute: t.elapsed().as_secs_f64(),
        };
        println!(
            "{n:>6} nodes: a join moves {:.4} of the replicas (ideal {:.4}); a loss {:.4}, from {} nodes (most from one: {:.3}) to {} (most to one: {:.3})",
            row.join_moved_fraction,
            row.ideal_fraction,
            row.loss_moved_fraction,
            row.loss_senders,
            row.loss_max_sender_share,
            row.loss_receivers,
            row.loss_max_receiver_share
        );
        rows.push(row);
    }
    Ok(Report {
        rows,
        note: "The placement's spread: each new replica copied from its slot's surviving holders in turn. \
               kvd's reconfiguration today reads every moving slot's records into the coordinator of the \
               change and installs them from there, so one node relays all of it (docs/PROTOCOL.md)."
            .into(),
    })
}
