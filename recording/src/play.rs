//! Playback timing: speed, idle skipping and seeking, as a pure function of the events.

use crate::event::{Event, Timed};

/// The longest pause `--skip-idle` keeps.
pub const IDLE_CAP_MS: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlayOptions {
    /// 1.0 is real time; 2.0 twice as fast.
    pub speed: f64,
    /// Cap every pause at [`IDLE_CAP_MS`].
    pub skip_idle: bool,
    /// Start here: everything before is printed at once (the screen as it was), then timing.
    pub from_ms: u64,
}

impl Default for PlayOptions {
    fn default() -> Self {
        Self {
            speed: 1.0,
            skip_idle: false,
            from_ms: 0,
        }
    }
}

/// What to do for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<'a> {
    /// Wait this long, then print.
    Print { wait_ms: u64, bytes: &'a [u8] },
    /// The terminal was resized (a player may say so or resize its own view).
    Resize { wait_ms: u64, cols: u32, rows: u32 },
    /// Someone joined the session to watch.
    Joined { wait_ms: u64, user: &'a str },
}

/// The player's clock: feed it events in order, it says how long to wait before each.
#[derive(Debug, Clone)]
pub struct Player {
    opts: PlayOptions,
    prev_at: Option<u64>,
}

impl Player {
    pub fn new(opts: PlayOptions) -> Self {
        let speed = if opts.speed.is_finite() && opts.speed > 0.0 {
            opts.speed
        } else {
            1.0
        };
        Self {
            opts: PlayOptions { speed, ..opts },
            prev_at: None,
        }
    }

    fn wait(&mut self, at: u64) -> u64 {
        let from = self.opts.from_ms;
        let prev = self.prev_at.replace(at).unwrap_or(0).max(from);
        if at <= from {
            return 0;
        }
        let mut gap = at.saturating_sub(prev);
        if self.opts.skip_idle {
            gap = gap.min(IDLE_CAP_MS);
        }
        (gap as f64 / self.opts.speed) as u64
    }

    /// The step for the next event (`None` for events that print nothing).
    pub fn step<'a>(&mut self, t: &'a Timed) -> Option<Step<'a>> {
        match &t.event {
            Event::Output(b) | Event::Stdout(b) | Event::Stderr(b) => Some(Step::Print {
                wait_ms: self.wait(t.at_ms),
                bytes: b,
            }),
            Event::Resize { cols, rows } => Some(Step::Resize {
                wait_ms: self.wait(t.at_ms),
                cols: *cols,
                rows: *rows,
            }),
            Event::Joined { user } => Some(Step::Joined {
                wait_ms: self.wait(t.at_ms),
                user,
            }),
            Event::Start(_) | Event::End(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(at_ms: u64) -> Timed {
        Timed {
            at_ms,
            event: Event::Output(b"x".to_vec()),
        }
    }

    fn waits(opts: PlayOptions, times: &[u64]) -> Vec<u64> {
        let mut p = Player::new(opts);
        let events: Vec<Timed> = times.iter().map(|t| out(*t)).collect();
        events
            .iter()
            .filter_map(|t| match p.step(t) {
                Some(Step::Print { wait_ms, .. }) => Some(wait_ms),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn real_time_speed_idle_and_seek() {
        let t = [0, 100, 60_100, 60_300];
        assert_eq!(waits(PlayOptions::default(), &t), [0, 100, 60_000, 200]);
        let fast = PlayOptions {
            speed: 2.0,
            ..Default::default()
        };
        assert_eq!(waits(fast, &t), [0, 50, 30_000, 100]);
        let idle = PlayOptions {
            skip_idle: true,
            ..Default::default()
        };
        assert_eq!(waits(idle, &t), [0, 100, 500, 200]);
        let seek = PlayOptions {
            from_ms: 60_000,
            ..Default::default()
        };
        assert_eq!(waits(seek, &t), [0, 0, 100, 200]);
        let bad = PlayOptions {
            speed: f64::NAN,
            ..Default::default()
        };
        assert_eq!(waits(bad, &t), [0, 100, 60_000, 200]);
    }
}
