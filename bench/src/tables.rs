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

/// `bench kvd`'s table (docs/PROTOCOL.md).
pub fn kvd() -> Result<String> {
    let rows = results("kvd")?;
    let mut out = String::from(
        "| test | pipeline | keys | kvd req/s | redis req/s | kvd ÷ redis (median of rounds) | per round |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows.as_array().context("kvd.json is a list")? {
        out += &format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {} |\n",
            r["test"].as_str().unwrap_or("?"),
            r["pipeline"],
            r["keyspace"],
            f(r, "ours"),
            f(r, "peer"),
            f(r, "ratio"),
            spread(r)
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
            "| {} | {value} | {} | {} | {:.0} | {:.0} | {:.2} | {} |\n",
            r["test"].as_str().unwrap_or("?"),
            r["pipeline"],
            r["keyspace"],
            f(r, "ours"),
            f(r, "peer"),
            f(r, "ratio"),
            spread(r)
        );
    }
    Ok(out)
}

/// Every table, each under the results file it comes from.
pub fn all() -> Result<String> {
    Ok(format!(
        "bench/results/kvd.json (docs/PROTOCOL.md):\n\n{}\nbench/results/storage.json (docs/STORAGE.md):\n\n{}",
        kvd()?,
        storage()?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each doc contains, verbatim, the table its results file gives.
    #[test]
    fn docs_quote_the_results_files() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
        for (doc, table) in [
            ("PROTOCOL.md", kvd().unwrap()),
            ("STORAGE.md", storage().unwrap()),
        ] {
            let text = std::fs::read_to_string(docs.join(doc)).unwrap();
            assert!(
                text.contains(&table),
                "docs/{doc} does not quote its results file; `cargo run -p bench -- tables` prints:\n{table}"
            );
        }
    }
}
