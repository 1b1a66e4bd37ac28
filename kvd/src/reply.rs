//! Replies, and their encoding in RESP2 and RESP3.
//!
//! Commands build a [`Reply`] that says what they mean (a map, a null, a
//! verbatim string); [`Reply::encode`] decides how that looks on the wire for
//! the connection's protocol version, following the downgrade rules Redis uses
//! for RESP2 clients (maps flatten to arrays, booleans become integers, a
//! null becomes `$-1` or `*-1` depending on what the command would have
//! returned).
//!
//! Encoding is written out by hand rather than going through
//! `redis_protocol`'s frame types: its RESP3 map type is a hash map, which
//! loses the field order Redis replies with (HELLO, CLIENT INFO), and
//! building an intermediate frame tree per reply costs an allocation on the
//! hottest path of the server. The protocol tests decode every reply kvd
//! sends with `redis_protocol`'s decoder, so the two stay honest.

use bytes::{BufMut, Bytes, BytesMut};

/// Protocol version negotiated with `HELLO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Resp2,
    Resp3,
}

/// What a command answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `+OK`
    Simple(&'static str),
    /// A simple string built at run time (`+PONG` from a subscribed client, TYPE).
    Status(String),
    /// `-ERR ...`: the text without the leading `-`.
    Error(String),
    Int(i64),
    Bulk(Bytes),
    /// A null bulk string: `$-1` in RESP2, `_` in RESP3.
    Nil,
    /// A null array: `*-1` in RESP2, `_` in RESP3 (EXEC aborted by WATCH).
    NilArray,
    Array(Vec<Reply>),
    /// Key/value pairs in the order given. RESP2: a flat array.
    Map(Vec<(Reply, Reply)>),
    /// RESP2: an array.
    Set(Vec<Reply>),
    /// RESP2: `:1` / `:0`.
    Bool(bool),
    /// RESP2: a bulk string in Redis's `%.17g` style.
    Double(f64),
    /// RESP3 verbatim string with a three-letter format (`txt`); RESP2: bulk.
    Verbatim(&'static str, Bytes),
    /// An out-of-band message (pub/sub). RESP2: an array.
    Push(Vec<Reply>),
    /// Several replies to one request, sent one after another (SUBSCRIBE to
    /// several channels answers once per channel).
    Many(Vec<Reply>),
    /// A reply already encoded for the connection's protocol: one forwarded
    /// from the node that executed the command, passed through untouched.
    Raw(Bytes),
}

impl Reply {
    pub const OK: Reply = Reply::Simple("OK");
    pub const QUEUED: Reply = Reply::Simple("QUEUED");

    pub fn error(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    /// An error whose text quotes a client's bytes as sent (Redis echoes an
    /// unknown command's name byte for byte, valid UTF-8 or not), with Redis's
    /// sanitising: trailing CR/LF trimmed, any other CR or LF made a space.
    pub fn error_bytes(text: &[u8]) -> Reply {
        let mut frame = Vec::with_capacity(text.len() + 3);
        frame.push(b'-');
        frame.extend(sanitize_bytes(text));
        frame.extend_from_slice(b"\r\n");
        Reply::Raw(Bytes::from(frame))
    }

    pub fn bulk(data: impl Into<Bytes>) -> Reply {
        Reply::Bulk(data.into())
    }

    pub fn bulk_str(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    pub fn from_opt(value: Option<Bytes>) -> Reply {
        value.map_or(Reply::Nil, Reply::Bulk)
    }

    pub fn is_error(&self) -> bool {
        match self {
            Reply::Error(_) => true,
            Reply::Raw(frame) => frame.first() == Some(&b'-'),
            _ => false,
        }
    }

    /// Appends the wire form of this reply to `out`.
    pub fn encode(&self, proto: Protocol, out: &mut BytesMut) {
        match self {
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            Reply::Status(s) => line(out, b'+', s.as_bytes()),
            Reply::Error(e) => {
                out.put_u8(b'-');
                out.extend(sanitize_bytes(e.as_bytes()));
                out.put_slice(b"\r\n");
            }
            Reply::Int(n) => int_line(out, b':', *n),
            Reply::Bulk(b) => bulk(out, b),
            Reply::Nil => match proto {
                Protocol::Resp2 => out.put_slice(b"$-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Reply::NilArray => match proto {
                Protocol::Resp2 => out.put_slice(b"*-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Reply::Array(items) => {
                int_line(out, b'*', items.len() as i64);
                for item in items {
                    item.encode(proto, out);
                }
            }
            Reply::Set(items) => {
                let tag = if proto == Protocol::Resp3 { b'~' } else { b'*' };
                int_line(out, tag, items.len() as i64);
                for item in items {
                    item.encode(proto, out);
                }
            }
            Reply::Push(items) => {
                let tag = if proto == Protocol::Resp3 { b'>' } else { b'*' };
                int_line(out, tag, items.len() as i64);
                for item in items {
                    item.encode(proto, out);
                }
            }
            Reply::Map(pairs) => {
                match proto {
                    Protocol::Resp3 => int_line(out, b'%', pairs.len() as i64),
                    Protocol::Resp2 => int_line(out, b'*', 2 * pairs.len() as i64),
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
            Reply::Bool(b) => match proto {
                Protocol::Resp3 => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
                Protocol::Resp2 => int_line(out, b':', *b as i64),
            },
            Reply::Double(d) => {
                let text = format_double(*d);
                match proto {
                    Protocol::Resp3 => line(out, b',', text.as_bytes()),
                    Protocol::Resp2 => bulk(out, text.as_bytes()),
                }
            }
            Reply::Raw(frame) => out.extend_from_slice(frame),
            Reply::Many(replies) => {
                for r in replies {
                    r.encode(proto, out);
                }
            }
            Reply::Verbatim(format, data) => match proto {
                Protocol::Resp3 => {
                    int_line(out, b'=', data.len() as i64 + 4);
                    out.put_slice(format.as_bytes());
                    out.put_u8(b':');
                    out.put_slice(data);
                    out.put_slice(b"\r\n");
                }
                Protocol::Resp2 => bulk(out, data),
            },
        }
    }
}

fn line(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.reserve(body.len() + 3);
    out.put_u8(tag);
    out.put_slice(body);
    out.put_slice(b"\r\n");
}

fn int_line(out: &mut BytesMut, tag: u8, n: i64) {
    let mut buf = itoa::Buffer::new();
    line(out, tag, buf.format(n).as_bytes());
}

fn bulk(out: &mut BytesMut, data: &[u8]) {
    int_line(out, b'$', data.len() as i64);
    out.reserve(data.len() + 2);
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Error and status lines cannot contain CR or LF; Redis replaces them with
/// spaces (addReplyErrorLength does the same).
/// Redis's `addReplyErrorLength` rules, so an error can never break the line:
/// trailing CR/LF are trimmed, any other CR or LF becomes a space.
fn sanitize_bytes(s: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let end = s
        .iter()
        .rposition(|&b| b != b'\r' && b != b'\n')
        .map_or(0, |i| i + 1);
    s[..end]
        .iter()
        .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
}

/// Formats a double the way Redis 7.0 does (`%.17g`, with `inf`/`-inf`/`nan`).
pub fn format_double(d: f64) -> String {
    if d.is_infinite() {
        return if d > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if d.is_nan() {
        return "nan".into();
    }
    if d == d.trunc() && d.abs() < 1e17 {
        return format!("{}", d as i64);
    }
    // Shortest representation that round-trips; equals %.17g for the values
    // kvd produces and avoids printing noise digits.
    trim_fraction(format!("{d}"))
}

/// Formats an INCRBYFLOAT result as Redis's `ld2string(..., LD_STR_HUMAN)`
/// does: fixed notation (never an exponent) with at most 17 decimals,
/// trailing zeros after the point removed, `-0` as `0`. Redis computes in
/// 80-bit long doubles; kvd starts from the shortest text that reads back as
/// the same 64-bit double, which agrees with Redis wherever both represent
/// the value exactly (see docs/PROTOCOL.md for where they do not).
pub fn format_human(d: f64) -> String {
    let shortest = format!("{d}");
    let decimals = shortest.split_once('.').map_or(0, |(_, f)| f.len());
    let text = if decimals > 17 {
        format!("{d:.17}")
    } else {
        shortest
    };
    let text = trim_fraction(text);
    if text == "-0" {
        "0".into()
    } else {
        text
    }
}

/// Removes trailing zeros after a decimal point, and the point if nothing
/// follows it; a number without a point is left alone (`100` stays `100`:
/// trimming it had made INCRBYFLOAT print 1e20 as `1`).
fn trim_fraction(text: String) -> String {
    if !text.contains('.') {
        return text;
    }
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: &Reply, p: Protocol) -> Vec<u8> {
        let mut out = BytesMut::new();
        r.encode(p, &mut out);
        out.to_vec()
    }

    #[test]
    fn maps_flatten_in_resp2_and_keep_order_in_resp3() {
        let m = Reply::Map(vec![
            (Reply::bulk_str("b"), Reply::Int(1)),
            (Reply::bulk_str("a"), Reply::Int(2)),
        ]);
        assert_eq!(
            enc(&m, Protocol::Resp2),
            b"*4\r\n$1\r\nb\r\n:1\r\n$1\r\na\r\n:2\r\n"
        );
        assert_eq!(
            enc(&m, Protocol::Resp3),
            b"%2\r\n$1\r\nb\r\n:1\r\n$1\r\na\r\n:2\r\n"
        );
    }

    #[test]
    fn nulls_follow_the_protocol() {
        assert_eq!(enc(&Reply::Nil, Protocol::Resp2), b"$-1\r\n");
        assert_eq!(enc(&Reply::NilArray, Protocol::Resp2), b"*-1\r\n");
        assert_eq!(enc(&Reply::Nil, Protocol::Resp3), b"_\r\n");
    }

    #[test]
    fn incrbyfloat_results_print_as_redis_prints_them() {
        for (d, text) in [
            (1e20, "100000000000000000000"),
            (-1e20, "-100000000000000000000"),
            (5010.5, "5010.5"),
            (10.6, "10.6"),
            (0.0, "0"),
            (-0.0, "0"),
            (1e-20, "0"),
            (-1e-20, "0"),
            (1.5e-10, "0.00000000015"),
            (1234.0, "1234"),
        ] {
            assert_eq!(format_human(d), text, "{d:e}");
        }
    }

    #[test]
    fn errors_never_break_the_line() {
        assert_eq!(
            enc(&Reply::error("ERR a\r\nb\r\n"), Protocol::Resp2),
            b"-ERR a  b\r\n"
        );
        assert_eq!(
            enc(&Reply::error_bytes(b"ERR \xff\r"), Protocol::Resp3),
            b"-ERR \xff\r\n"
        );
    }

    #[test]
    fn verbatim_counts_its_format_prefix() {
        let v = Reply::Verbatim("txt", Bytes::from_static(b"hi"));
        assert_eq!(enc(&v, Protocol::Resp3), b"=6\r\ntxt:hi\r\n");
        assert_eq!(enc(&v, Protocol::Resp2), b"$2\r\nhi\r\n");
    }
}
