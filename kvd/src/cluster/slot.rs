//! Hash slots, computed exactly as Redis Cluster computes them, so that a
//! cluster-aware client's idea of where a key lives matches ours.

/// Number of hash slots (Redis Cluster's `CLUSTER_SLOTS`).
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots.
const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The slot of a key: CRC16 of the key, or of its hash tag, modulo 16384.
///
/// The hash tag is the part between the first `{` and the first `}` after it,
/// when that part is not empty; keys sharing a tag share a slot, which is how a
/// client keeps the keys of one transaction together.
pub fn key_slot(key: &[u8]) -> u16 {
    (CRC16.checksum(hash_tag(key)) as usize % SLOTS) as u16
}

fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = memchr::memchr(b'{', key) {
        if let Some(len) = memchr::memchr(b'}', &key[open + 1..]) {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// Slots as sorted, inclusive ranges: the form CLUSTER SLOTS and the gossiped
/// ownership use.
pub fn ranges(slots: impl IntoIterator<Item = u16>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    let mut sorted: Vec<u16> = slots.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    for s in sorted {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// `0-99,200,300-301`: ranges as text (gossip, logs).
pub fn format_ranges(ranges: &[(u16, u16)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect();
    parts.join(",")
}

/// The inverse of [`format_ranges`]; `None` for text that is not a range list
/// of valid slots.
pub fn parse_ranges(text: &str) -> Option<Vec<(u16, u16)>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
            (a <= b && (b as usize) < SLOTS).then_some((a, b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from Redis's documentation and `CLUSTER KEYSLOT` on redis-server.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b""), 0);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"{user1000}.followers"),
            key_slot(b"{user1000}.following")
        );
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(key_slot(b"foo{}{bar}"), CRC16.checksum(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn ranges_round_trip() {
        let r = ranges([5, 1, 2, 3, 9, 10, 16383]);
        assert_eq!(r, vec![(1, 3), (5, 5), (9, 10), (16383, 16383)]);
        let text = format_ranges(&r);
        assert_eq!(text, "1-3,5,9-10,16383");
        assert_eq!(parse_ranges(&text), Some(r));
        assert_eq!(parse_ranges(""), Some(vec![]));
        assert_eq!(parse_ranges("3-1"), None);
        assert_eq!(parse_ranges("16384"), None);
        assert_eq!(parse_ranges("x"), None);
    }
}
