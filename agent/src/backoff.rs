//! Reconnect delays: exponential with full jitter, capped, so that thousands of agents whose
//! proxy restarted do not all dial back in the same instant. Pure: attempt and a random number in.

use std::time::Duration;

pub const BASE: Duration = Duration::from_millis(250);
/// Kept low enough that an agent is back within ~10 s of its proxy.
pub const CAP: Duration = Duration::from_secs(8);

/// Delay before reconnect attempt `attempt` (0-based), with `unit` uniform in [0, 1):
/// a value in [d/2, d) where d = min(CAP, BASE · 2^attempt).
pub fn delay(attempt: u32, unit: f64) -> Duration {
    let exp = BASE.saturating_mul(1u32 << attempt.min(16));
    let d = exp.min(CAP);
    let unit = unit.clamp(0.0, 1.0);
    d / 2 + d.mul_f64(unit / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        assert_eq!(delay(0, 0.0), Duration::from_millis(125));
        assert!(delay(0, 0.999) < Duration::from_millis(250));
        assert_eq!(delay(3, 0.0), Duration::from_secs(1));
        assert_eq!(delay(30, 0.0), CAP / 2);
        assert!(delay(30, 1.0) <= CAP);
        // Distinct randoms give distinct delays: agents spread out.
        assert_ne!(delay(5, 0.1), delay(5, 0.9));
    }
}
