//! A cursor over a request's arguments with Redis's parsing rules and error texts.

use bytes::Bytes;

use crate::protocol::parse_strict_i64_bytes;
use crate::reply::Reply;

pub const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const ERR_SYNTAX: &str = "ERR syntax error";

pub type ParseResult<T> = Result<T, Reply>;

pub struct Args<'a> {
    args: &'a [Bytes],
    pos: usize,
}

impl<'a> Args<'a> {
    /// Starts after the command name (and after the subcommand if `skip` is 2).
    pub fn new(args: &'a [Bytes], skip: usize) -> Self {
        Args { args, pos: skip }
    }

    pub fn remaining(&self) -> usize {
        self.args.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The next argument; arity was checked before parsing, so a missing one is a
    /// syntax error rather than a panic.
    pub fn bytes(&mut self) -> ParseResult<Bytes> {
        let arg = self.args.get(self.pos).cloned().ok_or_else(syntax)?;
        self.pos += 1;
        Ok(arg)
    }

    pub fn peek(&self) -> Option<&Bytes> {
        self.args.get(self.pos)
    }

    pub fn rest(&mut self) -> Vec<Bytes> {
        let rest = self.args[self.pos..].to_vec();
        self.pos = self.args.len();
        rest
    }

    /// The next argument as an uppercase option word.
    pub fn word(&mut self) -> ParseResult<String> {
        Ok(String::from_utf8_lossy(&self.bytes()?).to_ascii_uppercase())
    }

    pub fn i64(&mut self) -> ParseResult<i64> {
        parse_i64(&self.bytes()?).ok_or_else(|| Reply::error(ERR_NOT_INTEGER))
    }
}

pub fn syntax() -> Reply {
    Reply::error(ERR_SYNTAX)
}

pub fn parse_i64(b: &[u8]) -> Option<i64> {
    parse_strict_i64_bytes(b)
}

/// Redis's `string2ld`-style float parse: no spaces, no `nan`.
pub fn parse_f64(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
        return None;
    }
    let v: f64 = s.parse().ok()?;
    (!v.is_nan()).then_some(v)
}
