//! Differential command scripts: the same lines sent to kvd and to redis-server,
//! replies compared byte for byte.
//!
//! A script is a text file, one case per line:
//!
//! ```text
//! # a comment
//! SET k v EX 100            reply bytes must be identical
//! ~ CLIENT ID               same reply type only (the value legitimately differs)
//! sorted KEYS *             array compared as a multiset (order is unspecified)
//! scan MATCH k* COUNT 2     a whole SCAN iteration; the key sets must match
//! 2> SUBSCRIBE a b          the command produces two replies; both compared
//! sleep 1100                wait (for expiry cases)
//! ```
//!
//! Arguments are split on spaces; `"..."` quotes with `\n`, `\r`, `\t`, `\\`,
//! `\"` and `\xHH` escapes allow any byte.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{Conn, Value};

/// What one line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Case {
    Exact { replies: usize, args: Vec<Vec<u8>> },
    SameType(Vec<Vec<u8>>),
    Sorted(Vec<Vec<u8>>),
    Scan(Vec<Vec<u8>>),
    Sleep(u64),
}

/// A case with where it came from.
#[derive(Debug, Clone)]
pub struct Line {
    pub number: usize,
    pub text: String,
    pub case: Case,
}

/// Splits a line into arguments (see the module docs for quoting).
pub fn split(line: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut chars = line.bytes().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(out);
        };
        let mut arg = Vec::new();
        if first == b'"' {
            chars.next();
            loop {
                match chars.next() {
                    None => bail!("unterminated quote"),
                    Some(b'"') => break,
                    Some(b'\\') => match chars.next() {
                        Some(b'n') => arg.push(b'\n'),
                        Some(b'r') => arg.push(b'\r'),
                        Some(b't') => arg.push(b'\t'),
                        Some(b'x') => {
                            let hex: String = [chars.next(), chars.next()]
                                .into_iter()
                                .map(|c| c.map(|c| c as char).unwrap_or('0'))
                                .collect();
                            arg.push(u8::from_str_radix(&hex, 16).context("bad \\x escape")?);
                        }
                        Some(c) => arg.push(c),
                        None => bail!("dangling backslash"),
                    },
                    Some(c) => arg.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_ascii_whitespace() {
                    break;
                }
                arg.push(c);
                chars.next();
            }
        }
        out.push(arg);
    }
}

/// Parses a whole script.
pub fn parse(text: &str) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let case = if let Some(rest) = t.strip_prefix("~ ") {
            Case::SameType(split(rest)?)
        } else if let Some(rest) = t.strip_prefix("sorted ") {
            Case::Sorted(split(rest)?)
        } else if let Some(rest) = t.strip_prefix("scan") {
            Case::Scan(split(rest)?)
        } else if let Some(rest) = t.strip_prefix("sleep ") {
            Case::Sleep(rest.trim().parse()?)
        } else if t.len() > 2 && t.as_bytes()[1] == b'>' && t.as_bytes()[0].is_ascii_digit() {
            Case::Exact {
                replies: (t.as_bytes()[0] - b'0') as usize,
                args: split(&t[2..])?,
            }
        } else {
            Case::Exact {
                replies: 1,
                args: split(t)?,
            }
        };
        lines.push(Line {
            number: i + 1,
            text: t.to_string(),
            case,
        });
    }
    Ok(lines)
}

fn escape(b: &[u8]) -> String {
    b.iter()
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect()
}

fn call_raw(conn: &mut Conn, args: &[Vec<u8>], n: usize) -> Result<Vec<Vec<u8>>> {
    conn.call_raw(args, n)
}

fn full_scan(conn: &mut Conn, opts: &[Vec<u8>]) -> Result<BTreeSet<Vec<u8>>> {
    let mut cursor = b"0".to_vec();
    let mut keys = BTreeSet::new();
    for _ in 0..100_000 {
        let mut args = vec![b"SCAN".to_vec(), cursor.clone()];
        args.extend_from_slice(opts);
        let raw = call_raw(conn, &args, 1)?.remove(0);
        let Value::Array(parts) = Value::parse(&raw, conn.resp3)? else {
            bail!("SCAN replied {}", escape(&raw));
        };
        let [Value::Bulk(next), Value::Array(batch)] = parts.as_slice() else {
            bail!("SCAN replied {}", escape(&raw));
        };
        for k in batch {
            if let Value::Bulk(k) = k {
                keys.insert(k.clone());
            }
        }
        if next == b"0" {
            return Ok(keys);
        }
        cursor = next.clone();
    }
    bail!("SCAN did not finish")
}

/// Runs `lines` against both connections; returns a description of every
/// mismatch (empty when kvd and Redis agree on all of them).
pub fn run(lines: &[Line], kvd: &mut Conn, redis: &mut Conn) -> Result<Vec<String>> {
    let mut mismatches = Vec::new();
    for line in lines {
        let ctx = || format!("line {}: {}", line.number, line.text);
        match &line.case {
            Case::Sleep(ms) => std::thread::sleep(Duration::from_millis(*ms)),
            Case::Exact { replies, args } => {
                let a = call_raw(kvd, args, *replies).with_context(|| format!("kvd, {}", ctx()))?;
                let b = call_raw(redis, args, *replies).with_context(|| format!("redis, {}", ctx()))?;
                if a != b {
                    mismatches.push(format!(
                        "{}\n    kvd:   {}\n    redis: {}",
                        ctx(),
                        escape(&a.concat()),
                        escape(&b.concat())
                    ));
                }
            }
            Case::SameType(args) => {
                let a = call_raw(kvd, args, 1).with_context(|| format!("kvd, {}", ctx()))?;
                let b = call_raw(redis, args, 1).with_context(|| format!("redis, {}", ctx()))?;
                if a[0].first() != b[0].first() {
                    mismatches.push(format!(
                        "{} (reply types differ)\n    kvd:   {}\n    redis: {}",
                        ctx(),
                        escape(&a[0]),
                        escape(&b[0])
                    ));
                }
            }
            Case::Sorted(args) => {
                let sorted = |conn: &mut Conn| -> Result<Vec<Value>> {
                    let raw = call_raw(conn, args, 1)?.remove(0);
                    match Value::parse(&raw, conn.resp3)? {
                        Value::Array(mut items) => {
                            items.sort_by_key(|v| format!("{v:?}"));
                            Ok(items)
                        }
                        other => Ok(vec![other]),
                    }
                };
                let a = sorted(kvd).with_context(|| format!("kvd, {}", ctx()))?;
                let b = sorted(redis).with_context(|| format!("redis, {}", ctx()))?;
                if a != b {
                    mismatches.push(format!("{}\n    kvd:   {a:?}\n    redis: {b:?}", ctx()));
                }
            }
            Case::Scan(opts) => {
                let a = full_scan(kvd, opts).with_context(|| format!("kvd, {}", ctx()))?;
                let b = full_scan(redis, opts).with_context(|| format!("redis, {}", ctx()))?;
                if a != b {
                    mismatches.push(format!("{}\n    kvd:   {a:?}\n    redis: {b:?}", ctx()));
                }
            }
        }
    }
    Ok(mismatches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_quotes_and_escapes() {
        assert_eq!(
            split(r#"SET "a b" "\x00\n" plain"#).unwrap(),
            vec![
                b"SET".to_vec(),
                b"a b".to_vec(),
                vec![0, b'\n'],
                b"plain".to_vec()
            ]
        );
    }

    #[test]
    fn parse_recognises_every_form() {
        let lines =
            parse("# c\nGET a\n~ CLIENT ID\nsorted KEYS *\nscan COUNT 2\n2> SUBSCRIBE a b\nsleep 5\n")
                .unwrap();
        assert_eq!(lines.len(), 6);
        assert!(matches!(lines[4].case, Case::Exact { replies: 2, .. }));
        assert_eq!(lines[5].case, Case::Sleep(5));
    }
}
