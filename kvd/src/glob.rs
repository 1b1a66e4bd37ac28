//! Redis's glob-style pattern matching (`stringmatchlen`), used by KEYS, SCAN MATCH,
//! PSUBSCRIBE and CONFIG GET. Supports `*`, `?`, `[abc]`, `[^a-z]` and `\x` escapes.

/// Whether `string` matches `pattern`, optionally ignoring ASCII case.
pub fn matches(pattern: &[u8], string: &[u8], nocase: bool) -> bool {
    // Redis bounds recursion (`nesting`) so a pattern like `a*a*a*...b` cannot
    // explode; kvd's matcher is iterative with one backtrack point, which is
    // linear-times-pattern and equivalent for `*`.
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut p, mut s) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while s < string.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    while p + 1 < pattern.len() && pattern[p + 1] == b'*' {
                        p += 1;
                    }
                    star = Some((p, s));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    s += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(pattern, p, string[s], nocase) {
                        if matched {
                            p = next;
                            s += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if eq(pattern[p + 1], string[s]) {
                        p += 2;
                        s += 1;
                        continue;
                    }
                }
                c => {
                    if eq(c, string[s]) {
                        p += 1;
                        s += 1;
                        continue;
                    }
                }
            }
        }
        // Mismatch: retry from the last star, consuming one more byte with it.
        match star {
            Some((sp, ss)) => {
                p = sp + 1;
                s = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Matches one byte against the class starting at `pattern[p] == b'['`. Returns
/// whether it matched and the index after the class.
fn match_class(pattern: &[u8], mut p: usize, c: u8, nocase: bool) -> Option<(bool, usize)> {
    p += 1;
    let not = pattern.get(p) == Some(&b'^');
    if not {
        p += 1;
    }
    let lower = |x: u8| if nocase { x.to_ascii_lowercase() } else { x };
    let c = lower(c);
    let mut matched = false;
    loop {
        match pattern.get(p) {
            // An unterminated class matches what it has seen so far, as in Redis.
            None => {
                p -= 1;
                break;
            }
            Some(b']') => break,
            Some(b'\\') if p + 1 < pattern.len() => {
                p += 1;
                if lower(pattern[p]) == c {
                    matched = true;
                }
            }
            Some(&start) if pattern.get(p + 1) == Some(&b'-') && p + 2 < pattern.len() => {
                let end = pattern[p + 2];
                let (lo, hi) = if start <= end { (start, end) } else { (end, start) };
                let (lo, hi) = (lower(lo), lower(hi));
                if c >= lo && c <= hi {
                    matched = true;
                }
                p += 2;
            }
            Some(&x) => {
                if lower(x) == c {
                    matched = true;
                }
            }
        }
        p += 1;
    }
    Some((matched != not, p + 1))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn redis_examples() {
        let m = |p: &str, s: &str| matches(p.as_bytes(), s.as_bytes(), false);
        assert!(m("h?llo", "hello"));
        assert!(m("h*llo", "heeeello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("h\\*llo", "h*llo"));
        assert!(!m("h\\*llo", "hello"));
        assert!(matches(b"HELLO", b"hello", true));
    }
}
