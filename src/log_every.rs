//! Log lines for events that can repeat at the rate of requests (a full queue, an unreachable
//! tier, a shared value this server cannot open): at most one line per period, carrying the
//! running count, so the log says what happened and how often without drowning what matters.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often a repeating event is logged at most.
pub const PERIOD: Duration = Duration::from_secs(10);

/// When a repeating event was last logged.
#[derive(Debug, Default)]
pub struct LogEvery {
    last: Mutex<Option<Instant>>,
}

impl LogEvery {
    pub const fn new() -> LogEvery {
        LogEvery {
            last: Mutex::new(None),
        }
    }

    /// Whether to log this occurrence: the first one, then one per `PERIOD`.
    pub fn due(&self) -> bool {
        let mut last = self.last.lock();
        if last.is_some_and(|t| t.elapsed() <= PERIOD) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_occurrence_is_logged_then_none_within_the_period() {
        let every = LogEvery::new();
        assert!(every.due());
        assert!(!every.due());
        assert!(!every.due());
        *every.last.lock() = Instant::now().checked_sub(PERIOD + Duration::from_millis(1));
        assert!(every.due(), "once the period is over");
        assert!(!every.due());
    }
}
