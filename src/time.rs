//! Time as users read it and as specs write it: RFC 3339 to the second,
//! durations like `90s`, `5m`, `1h`.

use jiff::{SignedDuration, Timestamp};

/// Where the operator reads the time: the system's clock, or a fixed one
/// for tests of what reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    fixed: Option<Timestamp>,
}

impl Clock {
    pub fn system() -> Self {
        Clock { fixed: None }
    }

    pub fn fixed(at: Timestamp) -> Self {
        Clock { fixed: Some(at) }
    }

    pub fn now(&self) -> Timestamp {
        self.fixed.unwrap_or_else(Timestamp::now)
    }
}

/// `t` to the second, as conditions and Secret keys show times.
pub fn truncate_to_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// `t` in RFC 3339, to the second.
pub fn rfc3339(t: Timestamp) -> String {
    truncate_to_seconds(t).to_string()
}

/// A duration in the largest whole unit that states it: `1h`, `90m`, `45s`.
pub fn humanize(duration: SignedDuration) -> String {
    let secs = duration.as_secs();
    if secs != 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_clock_stands_still() {
        let at = Timestamp::from_second(1_000).unwrap();
        assert_eq!(Clock::fixed(at).now(), at);
        assert!(Clock::system().now() > at);
    }

    #[test]
    fn times_show_to_the_second() {
        let t = Timestamp::from_millisecond(1_700_000_000_999).unwrap();
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(humanize(SignedDuration::from_secs(7200)), "2h");
        assert_eq!(humanize(SignedDuration::from_secs(5400)), "90m");
        assert_eq!(humanize(SignedDuration::from_secs(45)), "45s");
    }
}
