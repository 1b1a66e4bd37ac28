//! Which commits of a volume's history keep their files: the retention policy.
//!
//! Modelled on `restic forget`: every commit younger than `within` (so 0
//! keeps none by age), plus the
//! newest commit of each of the last `hourly` hours and `daily` days that have
//! commits. The head is always kept. A commit that is not kept keeps its commit
//! blob (a hundred-odd bytes, so `log` and the parent chain stay whole) but its
//! files and directories are collected unless something else needs them.

use std::time::Duration;

use crate::object::Time;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub within: Duration,
    pub hourly: u32,
    pub daily: u32,
}

impl Default for Policy {
    /// Every commit of the last hour, hourly for a day, daily for a week.
    fn default() -> Self {
        Policy {
            within: Duration::from_secs(3600),
            hourly: 24,
            daily: 7,
        }
    }
}

impl Policy {
    /// Decides commit by commit, newest first.
    pub fn keeper(&self, now: Time) -> Keeper {
        Keeper {
            policy: *self,
            now,
            first: true,
            last_hour: None,
            hours: 0,
            last_day: None,
            days: 0,
        }
    }
}

/// Walks a history newest first and says which commits to keep.
pub struct Keeper {
    policy: Policy,
    now: Time,
    first: bool,
    last_hour: Option<i64>,
    hours: u32,
    last_day: Option<i64>,
    days: u32,
}

impl Keeper {
    /// Whether the next (older) commit, made at `time`, is kept.
    pub fn keep(&mut self, time: Time) -> bool {
        let mut keep = std::mem::take(&mut self.first);
        let nanos = |t: Time| t.secs as i128 * 1_000_000_000 + t.nanos as i128;
        if nanos(self.now) - nanos(time) < self.policy.within.as_nanos() as i128 {
            keep = true;
        }
        let hour = time.secs.div_euclid(3600);
        if self.hours < self.policy.hourly && self.last_hour != Some(hour) {
            self.last_hour = Some(hour);
            self.hours += 1;
            keep = true;
        }
        let day = time.secs.div_euclid(86_400);
        if self.days < self.policy.daily && self.last_day != Some(day) {
            self.last_day = Some(day);
            self.days += 1;
            keep = true;
        }
        keep
    }
}

/// `90s`, `15m`, `2h`, `7d`, `0` (seconds without a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 90s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("'{s}': the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time { secs, nanos: 0 }
    }

    /// Commit times, newest first, and the ones kept.
    fn kept(policy: Policy, now: i64, times: &[i64]) -> Vec<i64> {
        let mut k = policy.keeper(t(now));
        times.iter().copied().filter(|&s| k.keep(t(s))).collect()
    }

    #[test]
    fn head_is_always_kept() {
        let none = Policy {
            within: Duration::ZERO,
            hourly: 0,
            daily: 0,
        };
        assert_eq!(kept(none, 1_000_000, &[10, 5, 1]), vec![10]);
    }

    #[test]
    fn everything_within_the_window_then_one_per_hour_and_day() {
        let p = Policy {
            within: Duration::from_secs(600),
            hourly: 2,
            daily: 2,
        };
        let now = 10 * 86_400;
        let times = [
            now - 10,          // within; also the newest of its hour and day
            now - 500,         // within
            now - 700,         // same hour, too old: dropped
            now - 3600 - 100,  // the next hour: kept (2nd hour)
            now - 7200 - 100,  // no hourly left, same day: dropped
            now - 86_400 - 5,  // the day before: kept (2nd day)
            now - 86_400 - 99, // same day: dropped
            now - 3 * 86_400,  // no daily left: dropped
        ];
        assert_eq!(
            kept(p, now, &times),
            vec![now - 10, now - 500, now - 3600 - 100, now - 86_400 - 5]
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
