//! When rounds may open: always, or inside a daily window in the franchise's
//! time zone (restaurants train at night, when the till is quiet).
//!
//! A round that is running when the window closes finishes; no new one opens.

use std::fmt;
use std::str::FromStr;

use jiff::civil::Time;
use jiff::tz::TimeZone;

/// A daily window `start-end` in local time; `end` before `start` spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: Time,
    end: Time,
}

impl Window {
    /// Whether local time `t` is inside the window (start inclusive, end exclusive).
    pub fn contains(&self, t: Time) -> bool {
        if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (start, end) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a window like \"22:00-06:00\""))?;
        let parse = |part: &str| {
            Time::strptime("%H:%M", part.trim())
                .map_err(|_| format!("{part:?} is not a time of day like \"22:00\""))
        };
        let window = Window {
            start: parse(start)?,
            end: parse(end)?,
        };
        if window.start == window.end {
            return Err(format!(
                "{s:?} is empty; leave schedule.window out to train at any time"
            ));
        }
        Ok(window)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            self.start.strftime("%H:%M"),
            self.end.strftime("%H:%M")
        )
    }
}

/// When rounds may open.
#[derive(Debug, Clone)]
pub struct Schedule {
    window: Option<Window>,
    zone: TimeZone,
}

impl Schedule {
    /// Rounds at any time.
    pub fn always() -> Self {
        Self {
            window: None,
            zone: TimeZone::UTC,
        }
    }

    /// A window in the named IANA time zone (e.g. `Europe/Paris`).
    pub fn new(window: Option<&str>, time_zone: &str) -> Result<Self, String> {
        let zone = TimeZone::get(time_zone).map_err(|e| {
            format!("schedule.time_zone: {time_zone:?} is not a known time zone ({e})")
        })?;
        let window = window
            .map(|w| w.parse().map_err(|e| format!("schedule.window: {e}")))
            .transpose()?;
        Ok(Self { window, zone })
    }

    /// Whether rounds may open at `now`.
    pub fn open_at(&self, now: jiff::Timestamp) -> bool {
        self.window
            .is_none_or(|w| w.contains(now.to_zoned(self.zone.clone()).time()))
    }

    /// The window, for status and logs.
    pub fn window(&self) -> Option<Window> {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_night_window_spans_midnight_in_local_time() {
        let s = Schedule::new(Some("22:00-06:00"), "Europe/Paris").unwrap();
        // Paris is UTC+1 in January.
        assert!(s.open_at(at("2026-01-10T21:00:00Z")), "22:00 local");
        assert!(s.open_at(at("2026-01-11T04:59:00Z")), "05:59 local");
        assert!(!s.open_at(at("2026-01-11T05:00:00Z")), "06:00 local");
        assert!(!s.open_at(at("2026-01-10T20:59:00Z")), "21:59 local");
        // And UTC+2 in July.
        assert!(!s.open_at(at("2026-07-10T19:30:00Z")), "21:30 local");
        assert!(s.open_at(at("2026-07-10T20:30:00Z")), "22:30 local");
    }

    #[test]
    fn a_day_window_and_no_window() {
        let s = Schedule::new(Some("01:00-05:00"), "UTC").unwrap();
        assert!(s.open_at(at("2026-01-10T01:00:00Z")));
        assert!(!s.open_at(at("2026-01-10T05:00:00Z")));
        assert!(!s.open_at(at("2026-01-10T12:00:00Z")));
        assert!(Schedule::always().open_at(at("2026-01-10T12:00:00Z")));
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (window, zone, field) in [
            (Some("22:00"), "UTC", "schedule.window"),
            (Some("25:00-06:00"), "UTC", "schedule.window"),
            (Some("06:00-06:00"), "UTC", "schedule.window"),
            (None, "Mars/Olympus", "schedule.time_zone"),
        ] {
            let err = Schedule::new(window, zone).unwrap_err();
            assert!(err.contains(field), "{err}");
        }
    }
}
