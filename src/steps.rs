//! Where the time of one operation goes: an acquire, a network's creation, a TAP's
//! attachment. Each is split into named steps, and the durations are logged as one debug
//! line under the target [`TARGET`] when the operation ends:
//!
//! ```text
//! DEBUG vmnet_broker::steps: acquire: admit=4us lock=1us attach=212us book=9us network="shared"
//! ```
//!
//! Off by default (a clock read per step is all it costs then); on with
//! `serve --log-level info,vmnet_broker::steps=debug`. The benchmark reads these lines to
//! say which step a latency target is missed in (docs/benchmarks.md), and an operator
//! can read them to find a slow acquire's cause. Nothing here knows the operating system.

use std::fmt;
use std::time::{Duration, Instant};

/// The tracing target of the step lines.
pub const TARGET: &str = "vmnet_broker::steps";

/// The steps of one operation so far: each [`Steps::lap`] ends one, named, at now.
pub struct Steps {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Steps {
    /// Starts timing; the first lap measures from here.
    pub fn start() -> Steps {
        Steps {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends step `name` now: it took the time since the previous lap (or the start).
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }

    /// Starts the next step now without recording the time since the last lap (time
    /// spent in another operation's own step line, say).
    pub fn skip(&mut self) {
        self.last = Instant::now();
    }

    /// The sum of the steps recorded.
    pub fn total(&self) -> Duration {
        self.laps.iter().map(|(_, d)| *d).sum()
    }
}

/// `name=12us` per step, in microseconds, space-separated, in the order they ran.
impl fmt::Display for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, d)) in self.laps.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={}us", d.as_micros())?;
        }
        Ok(())
    }
}

/// Logs `steps` of operation `what` (on `network`) if step lines are on.
#[macro_export]
macro_rules! log_steps {
    ($what:expr, $network:expr, $steps:expr) => {
        tracing::debug!(
            target: $crate::steps::TARGET,
            network = %$network,
            "{}: {}",
            $what,
            $steps
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_print_in_order_in_microseconds_and_sum_up() {
        let mut s = Steps::start();
        s.laps.push(("admit", Duration::from_micros(4)));
        s.laps.push(("attach", Duration::from_micros(1_250)));
        assert_eq!(s.to_string(), "admit=4us attach=1250us");
        assert_eq!(s.total(), Duration::from_micros(1_254));
    }

    #[test]
    fn a_lap_measures_from_the_previous_one_and_skip_restarts_the_clock() {
        let mut s = Steps::start();
        std::thread::sleep(Duration::from_millis(300));
        s.skip();
        s.lap("quick");
        std::thread::sleep(Duration::from_millis(5));
        s.lap("slow");
        assert!(s.laps[0].1 < Duration::from_millis(300), "{s}");
        assert!(s.laps[1].1 >= Duration::from_millis(5), "{s}");
    }
}
