//! Log records: the only thing written to a segment file.
//!
//! ```text
//! offset size field
//!      0    1 magic 0xD1 (lets recovery find the next record after damage)
//!      1    1 format version (1)
//!      2    1 kind: 1 put, 2 delete, 3 clear (FLUSHALL)
//!      3    4 CRC-32C (Castagnoli) of bytes 0..3 and 7.. (everything but itself)
//!      7    8 sequence number, little endian: the order writes happened in
//!     15    8 expiry, Unix milliseconds, 0 for none
//!     23    4 key length
//!     27    4 value length
//!     31    . key, then value
//! ```
//!
//! Invariants: a record is trusted only if its magic, version and CRC check and
//! it lies wholly inside the file; the newest record of a key is the one with the
//! highest sequence number, wherever it is stored (compaction copies records
//! into newer files, so file order is not write order).

pub const MAGIC: u8 = 0xD1;
pub const VERSION: u8 = 1;
pub const HEADER: usize = 31;
/// Longest key or value a record can describe (a sanity bound for recovery, far
/// above `proto-max-bulk-len`'s ceiling).
pub const MAX_FIELD: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Put = 1,
    Delete = 2,
    /// Everything with a lower sequence number is gone.
    Clear = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Put),
            2 => Some(Kind::Delete),
            3 => Some(Kind::Clear),
            _ => None,
        }
    }
}

/// A record's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub seq: u64,
    pub expires_at: Option<u64>,
    pub key_len: u32,
    pub value_len: u32,
}

impl Header {
    pub fn record_len(&self) -> u64 {
        HEADER as u64 + self.key_len as u64 + self.value_len as u64
    }
}

/// The header of a record (CRC included), to be followed by `key` and `value`.
pub fn header(kind: Kind, seq: u64, expires_at: Option<u64>, key: &[u8], value: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..3].copy_from_slice(&[MAGIC, VERSION, kind as u8]);
    h[7..15].copy_from_slice(&seq.to_le_bytes());
    h[15..23].copy_from_slice(&expires_at.unwrap_or(0).to_le_bytes());
    h[23..27].copy_from_slice(&(key.len() as u32).to_le_bytes());
    h[27..31].copy_from_slice(&(value.len() as u32).to_le_bytes());
    let crc = crc_of(&[&h[..3], &h[7..], key, value]);
    h[3..7].copy_from_slice(&crc.to_le_bytes());
    h
}

/// CRC-32C (Castagnoli) of the concatenation of `parts`: the SSE4.2 / ARMv8
/// instruction computes it, so checking every read costs little even for the
/// smallest records.
fn crc_of(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

/// Appends one encoded record to `out`.
pub fn encode(out: &mut Vec<u8>, kind: Kind, seq: u64, expires_at: Option<u64>, key: &[u8], value: &[u8]) {
    out.reserve(HEADER + key.len() + value.len());
    out.extend_from_slice(&header(kind, seq, expires_at, key, value));
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// The CRC of a whole encoded record, skipping the CRC field itself.
fn checksum(record: &[u8]) -> u32 {
    crc_of(&[&record[..3], &record[7..]])
}

/// Checks a record read in two parts: its header and key, and its value.
pub fn verify(header_and_key: &[u8], value: &[u8]) -> bool {
    if header_and_key.len() < HEADER {
        return false;
    }
    let stored = u32_at(header_and_key, 3);
    crc_of(&[&header_and_key[..3], &header_and_key[7..], value]) == stored
}

/// Why the bytes at an offset are not a trustworthy record.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Fewer bytes than the record needs: a torn write at the end of the log.
    Truncated,
    /// Bad magic, version, kind or checksum.
    Corrupt,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and verifies the header of the record at the start of `buf`.
pub fn parse_header(buf: &[u8]) -> Result<Header, Invalid> {
    if buf.len() < HEADER {
        return Err(
            if buf.iter().all(|&b| b == 0) || buf.first().is_some_and(|&b| b == MAGIC) {
                Invalid::Truncated
            } else {
                Invalid::Corrupt
            },
        );
    }
    if buf[0] != MAGIC || buf[1] != VERSION {
        return Err(Invalid::Corrupt);
    }
    let kind = Kind::from_u8(buf[2]).ok_or(Invalid::Corrupt)?;
    let expires = u64_at(buf, 15);
    Ok(Header {
        kind,
        seq: u64_at(buf, 7),
        expires_at: (expires != 0).then_some(expires),
        key_len: u32_at(buf, 23),
        value_len: u32_at(buf, 27),
    })
}

/// Parses and fully verifies (CRC) the record at the start of `buf`; returns its
/// header. The key is `buf[HEADER..HEADER + key_len]`, the value follows it.
pub fn parse(buf: &[u8]) -> Result<Header, Invalid> {
    let h = parse_header(buf)?;
    let len = h.record_len();
    if (buf.len() as u64) < len {
        return Err(Invalid::Truncated);
    }
    let crc = u32_at(buf, 3);
    if checksum(&buf[..len as usize]) != crc {
        return Err(Invalid::Corrupt);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Put, 42, Some(1000), b"key", b"value");
        encode(&mut buf, Kind::Delete, 43, None, b"key", b"");
        let h = parse(&buf).unwrap();
        assert_eq!(h.kind, Kind::Put);
        assert_eq!(h.seq, 42);
        assert_eq!(h.expires_at, Some(1000));
        assert_eq!(&buf[HEADER..HEADER + 3], b"key");
        let second = &buf[h.record_len() as usize..];
        assert_eq!(parse(second).unwrap().kind, Kind::Delete);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Put, 7, None, b"k", b"some value");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                // A flip in a length field may make the record look longer (then
                // truncated) rather than corrupt; either way it is not trusted.
                assert!(parse(&bad).is_err(), "flip at byte {byte} bit {bit} accepted");
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Put, 7, None, b"key", b"value");
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut]), Err(Invalid::Truncated), "cut at {cut}");
        }
    }
}
