//! `bench tables`: the tables docs/*.md quote, printed from bench/results/*.json.
//! `docs_quote_the_results_files` (below) fails when a doc's table differs from
//! what its results file says, so a figure in the docs is always one a run
//! produced and kept.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

fn results(name: &str) -> Result<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// The spread of a row's per-round ratios, as `lo–hi`.
fn spread(row: &Value) -> String {
    let ratios: Vec<f64> = row["rounds"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["ratio"].as_f64()).collect())
        .unwrap_or_default();
    if ratios.is_empty() {
        return "–".into();
    }
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(0.0, f64::max);
    format!("{lo:.2}–{hi:.2} ({} rounds)", ratios.len())
}

/// A compared row's last four cells: ours, the peer's, the ratio, the spread.
fn compared_cells(r: &Value) -> String {
    format!(
        "{:.0} | {:.0} | {:.2} | {}",
        f(r, "ours"),
        f(r, "peer"),
        f(r, "ratio"),
        spread(r)
    )
}

/// `bench kvd`'s table (docs/PROTOCOL.md).
pub fn kvd() -> Result<String> {
    get_set("kvd")
}

/// `bench tls`'s table (docs/OPERATIONS.md): `bench kvd`'s over TLS.
pub fn tls() -> Result<String> {
    get_set("tls")
}

fn get_set(name: &str) -> Result<String> {
    let rows = results(name)?;
    let mut out = String::from(
        "| test | pipeline | keys | kvd req/s | redis req/s | kvd ÷ redis (median of rounds) | per round |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows.as_array().context("a list of rows")? {
        out += &format!(
            "| {} | {} | {} | {} |\n",
            r["test"].as_str().unwrap_or("?"),
            r["pipeline"],
            r["keyspace"],
            compared_cells(r)
        );
    }
    Ok(out)
}

/// `bench storage`'s throughput table (docs/STORAGE.md).
pub fn storage() -> Result<String> {
    let report = results("storage")?;
    let mut out = String::from(
        "| test | value | pipeline | keys | kvd req/s | redis req/s | kvd ÷ redis (median of rounds) | per round |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in report["rows"].as_array().context("storage.json has rows")? {
        let bytes = r["value_bytes"].as_u64().unwrap_or(0);
        let value = if bytes >= 1 << 20 {
            format!("{} MiB", bytes >> 20)
        } else {
            format!("{bytes} B")
        };
        out += &format!(
            "| {} | {value} | {} | {} | {} |\n",
            r["test"].as_str().unwrap_or("?"),
            r["pipeline"],
            r["keyspace"],
            compared_cells(r)
        );
    }
    Ok(out)
}

/// `bench fs`'s table (README.md).
pub fn fs() -> Result<String> {
    let report = results("fs")?;
    let mut out = String::from(
        "| fsclient, figure | through kvd | through redis-server | kvd ÷ redis (median of rounds) | per round |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in report["rows"].as_array().context("fs.json has rows")? {
        out += &format!(
            "| {} | {} |\n",
            r["figure"].as_str().unwrap_or("?"),
            compared_cells(r)
        );
    }
    // Runs before the encrypted rows were measured have none.
    if let Some(rows) = report["encrypted"].as_array() {
        out += "\n| an encrypted volume, figure | encrypted | plain | encrypted ÷ plain (median of rounds) | per round |\n| --- | --- | --- | --- | --- |\n";
        for r in rows {
            out += &format!(
                "| {} | {} |\n",
                r["figure"].as_str().unwrap_or("?"),
                compared_cells(r)
            );
        }
    }
    let d = &report["dedup"];
    out += &format!(
        "\nDedup: a {} MiB file, then a copy with 1 KiB inserted in the middle: the store grew {} bytes ({} new chunk); restic's repository grew {} bytes for the same two files.\n",
        d["file_mib"], d["store_growth_bytes"], d["new_chunks"], d["restic_second_backup_bytes"]
    );
    Ok(out)
}

/// `bench mount`'s figures and ratios (docs/MOUNT.md).
pub fn mount() -> Result<String> {
    let report = results("mount")?;
    let mut out = format!(
        "Medians of {} rounds; a {} MiB file; {} files in one directory; a source tree of {} files.\n\n\
         | target | seq write MB/s | cold seq read MB/s | 4 KiB random read, first pass / steady IOPS | create /s | stat after remount /s | delete /s | unpack + sync s | git clone s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        report["rounds"], report["file_mib"], report["files"], report["tree_files"]
    );
    for r in report["rows"].as_array().context("mount.json has rows")? {
        out += &format!(
            "| {} | {:.0} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n",
            r["target"].as_str().unwrap_or("?"),
            f(r, "seq_write_mb_s"),
            f(r, "seq_read_mb_s"),
            f(r, "rand_read_4k_first_iops"),
            f(r, "rand_read_4k_iops"),
            f(r, "creates_s"),
            f(r, "cold_stats_s"),
            f(r, "deletes_s"),
            f(r, "unpack_s"),
            f(r, "clone_s"),
        );
    }
    let measures: Vec<&str> = report["measures"]
        .as_array()
        .context("mount.json has measures")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ratios = report["ratios"].as_array().context("mount.json has ratios")?;
    out += "\nRatios of rates (above 1: dictfs faster; for unpack and clone, the peer's time ÷ dictfs's), median of the per-round ratios, lowest–highest round in brackets:\n\n| measure |";
    for r in ratios {
        out += &format!(
            " {} ÷ {} |",
            r["target"].as_str().unwrap_or("?"),
            r["peer"].as_str().unwrap_or("?")
        );
    }
    out += "\n| --- |";
    out += &" --- |".repeat(ratios.len());
    for (i, m) in measures.iter().enumerate() {
        out += &format!("\n| {m} |");
        for r in ratios {
            let rounds: Vec<f64> = r["per_round"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x[i].as_f64()).collect())
                .unwrap_or_default();
            let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rounds.iter().copied().fold(0.0, f64::max);
            out += &format!(
                " {:.2} ({lo:.2}–{hi:.2}) |",
                r["median"][i].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    out += "\n";
    for s in report["skipped"].as_array().into_iter().flatten() {
        out += &format!("\nNot measured: {}\n", s.as_str().unwrap_or("?"));
    }
    Ok(out)
}

/// `bench replication`'s table (docs/PROTOCOL.md, "Replication").
pub fn replication() -> Result<String> {
    let report = results("replication")?;
    let mut out = String::from(
        "| | SET/s | SET p50 / p99 ms | CAS/s | CAS p50 / p99 ms |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in report["rows"].as_array().context("replication.json has rows")? {
        out += &format!(
            "| R = {} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} |\n",
            r["replicas"],
            f(r, "set_rps"),
            f(r, "set_p50_ms"),
            f(r, "set_p99_ms"),
            f(r, "cas_per_s"),
            f(r, "cas_p50_ms"),
            f(r, "cas_p99_ms"),
        );
    }
    let (set, cas) = (&report["set_r3_over_r1"], &report["cas_r3_over_r1"]);
    out += &format!(
        "| R=3 ÷ R=1 (median of rounds) | {:.2} ({}) | | {:.2} ({}) | |\n",
        f(set, "ratio"),
        spread(set),
        f(cas, "ratio"),
        spread(cas)
    );
    let fo = &report["failover"];
    out += &format!(
        "\nLongest pause between acknowledged writes of 8 clients while a node was killed with SIGKILL: {:.1} ms ({} writes acknowledged).\n",
        f(fo, "longest_pause_ms"),
        fo["acknowledged_writes"]
    );
    let rc = &report["reconfigure"];
    out += &format!(
        "
Adding a fourth node to three holding {} keys of {} bytes: {} slots changed replicas in {} steps, \
         {} keys copied in {:.2} s ({:.0} MB/s); 8 writers meanwhile: {} writes acknowledged, longest pause {:.0} ms.\n",
        rc["keys"],
        rc["value_bytes"],
        rc["slots_moved"],
        rc["steps"],
        rc["keys_copied"],
        f(rc, "seconds"),
        f(rc, "copied_mb_per_s"),
        rc["writes_acknowledged"],
        f(rc, "longest_write_pause_ms"),
    );
    let cu = &report["catch_up"];
    out += &format!(
        "\nA node back after {} keys of {} bytes were written without it (it held {} more, on which the \
         replicas agree): it stored them all {:.1} s after its restart ({:.0} keys/s, {:.1} MB/s).\n",
        cu["keys_written_while_away"],
        cu["value_bytes"],
        cu["keys_held_before"],
        f(cu, "seconds"),
        f(cu, "keys_per_s"),
        f(cu, "mb_per_s"),
    );
    // Runs made before the re-homing was measured have no such part.
    let rh = &report["rehome"];
    if !rh.is_null() {
        let list = |v: &serde_json::Value, digits: usize| -> String {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| format!("{:.*}", digits, x.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        out += &format!(
            "\nOne of four nodes (R = 3, {} keys of {} bytes, {:.0} MB on the lost node) killed for good with \
             `--down-after 2s`: taken out {:.1} s after the kill, every slot at three copies again {:.1} s after it; \
             keys copied by each surviving node: {} ({} MB/s each while copying).\n",
            rh["keys"],
            rh["value_bytes"],
            f(rh, "lost_node_mb"),
            f(rh, "seconds_to_down"),
            f(rh, "seconds_to_three_copies"),
            list(&rh["keys_copied_per_node"], 0),
            list(&rh["mb_per_s_per_node"], 1),
        );
    }
    Ok(out)
}

/// `bench routed`'s table (docs/PROTOCOL.md, "Replication").
pub fn routed() -> Result<String> {
    let report = results("routed")?;
    let mut out = String::from(
        "| routed, redis-benchmark --cluster | kvd, R = 3 (req/s) | Redis Cluster, 3 masters + 3 replicas (req/s) | kvd ÷ Redis Cluster (median of rounds) |\n\
         | --- | --- | --- | --- |\n",
    );
    for r in report["rows"].as_array().context("routed.json has rows")? {
        let c = &r["kvd_vs_redis_cluster"];
        out += &format!(
            "| {} P{} | {:.0} | {:.0} | {:.2} ({}) |\n",
            r["test"].as_str().unwrap_or("?"),
            r["pipeline"],
            f(c, "ours"),
            f(c, "peer"),
            f(c, "ratio"),
            spread(c)
        );
    }
    Ok(out)
}

/// `bench placement`'s table (docs/PROTOCOL.md, "Replication").
pub fn placement() -> Result<String> {
    let report = results("placement")?;
    let mut out = String::from(
        "| nodes | ideal share | join moves | loss moves | loss: nodes sending | most from one | nodes receiving | most to one |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in report["rows"].as_array().context("placement.json has rows")? {
        out += &format!(
            "| {} | {:.4} | {:.4} | {:.4} | {} | {:.3} | {} | {:.3} |\n",
            r["nodes"],
            f(r, "ideal_fraction"),
            f(r, "join_moved_fraction"),
            f(r, "loss_moved_fraction"),
            r["loss_senders"],
            f(r, "loss_max_sender_share"),
            r["loss_receivers"],
            f(r, "loss_max_receiver_share"),
        );
    }
    Ok(out)
}

/// Every table, each under the results file it comes from.
pub fn all() -> Result<String> {
    Ok(format!(
        "bench/results/kvd.json (docs/PROTOCOL.md):\n\n{}\nbench/results/storage.json (docs/STORAGE.md):\n\n{}\n\
         bench/results/fs.json (README.md):\n\n{}\nbench/results/mount.json (docs/MOUNT.md):\n\n{}\n\
         bench/results/replication.json (docs/PROTOCOL.md):\n\n{}\nbench/results/placement.json (docs/PROTOCOL.md):\n\n{}\nbench/results/routed.json (docs/PROTOCOL.md):\n\n{}\n\
         bench/results/tls.json (docs/OPERATIONS.md):\n\n{}",
        kvd()?,
        storage()?,
        fs()?,
        mount()?,
        replication()?,
        placement()?,
        routed()?,
        tls()?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each doc contains, verbatim, the table its results file gives.
    #[test]
    fn docs_quote_the_results_files() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        for (doc, table) in [
            ("docs/PROTOCOL.md", kvd().unwrap()),
            ("docs/STORAGE.md", storage().unwrap()),
            ("README.md", fs().unwrap()),
            ("docs/MOUNT.md", mount().unwrap()),
            ("docs/PROTOCOL.md", replication().unwrap()),
            ("docs/PROTOCOL.md", placement().unwrap()),
            ("docs/PROTOCOL.md", routed().unwrap()),
            ("docs/OPERATIONS.md", tls().unwrap()),
        ] {
            let text = std::fs::read_to_string(root.join(doc)).unwrap();
            assert!(
                text.contains(&table),
                "{doc} does not quote its results file; `cargo run -p bench -- tables` prints:\n{table}"
            );
        }
    }
}
