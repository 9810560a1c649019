//! Keeping the sandbox clock in step with the host's (reference §3.3, `/init` `timestamp`).
//! A sandbox resumed from a snapshot wakes up with the time it was paused at; the host's
//! time arrives in `/init` and the clock is set to it when it is off by more than a small
//! margin. Setting the clock needs root (CAP_SYS_TIME); without it the clock is left alone
//! and a warning is logged: the `/init` call never fails because of the clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A sandbox clock behind the host by more than this is set forward (requests are timed
/// against the host's clock, so even a small lag shows).
pub const MAX_BEHIND: Duration = Duration::from_millis(50);
/// A sandbox clock ahead of the host by more than this is set back. Larger than
/// [`MAX_BEHIND`]: the host's timestamp is already old by the request's travel time.
pub const MAX_AHEAD: Duration = Duration::from_secs(5);

/// What [`sync`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockSync {
    /// The clock was close enough; nothing was changed.
    InStep,
    /// The clock was set to the host's time.
    Set,
    /// The clock was off but setting it was not allowed (the config says so).
    Disabled,
    /// The clock was off and setting it failed (usually: not root). Logged, not fatal.
    Failed(String),
}

/// True when a clock reading `local` (Unix nanoseconds) must be set to `host`.
pub fn needs_setting(host: i64, local: i64) -> bool {
    let behind = i128::from(host) - i128::from(local);
    behind > MAX_BEHIND.as_nanos() as i128 || -behind > MAX_AHEAD.as_nanos() as i128
}

/// Sets `CLOCK_REALTIME` to `host` (Unix nanoseconds) when it is off by more than the
/// margins, and `allowed` says the daemon may. Never fails: a refusal is logged.
pub fn sync(host: i64, allowed: bool) -> ClockSync {
    let local = now_nanos();
    if !needs_setting(host, local) {
        return ClockSync::InStep;
    }
    let off_ms = (i128::from(host) - i128::from(local)) / 1_000_000;
    if !allowed {
        tracing::info!(
            off_ms,
            "clock differs from the host's; setting it is disabled"
        );
        return ClockSync::Disabled;
    }
    match set_realtime(host) {
        Ok(()) => {
            tracing::info!(off_ms, "clock set to the host's time");
            ClockSync::Set
        }
        Err(err) => {
            let reason = if err == nix::errno::Errno::EPERM {
                format!("{err} (setting the clock needs root or CAP_SYS_TIME)")
            } else {
                err.to_string()
            };
            tracing::warn!(off_ms, %reason, "could not set the clock to the host's time");
            ClockSync::Failed(reason)
        }
    }
}

fn now_nanos() -> i64 {
    let now = SystemTime::now();
    match now.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

fn set_realtime(nanos: i64) -> nix::Result<()> {
    use nix::sys::time::TimeSpec;
    use nix::time::{ClockId, clock_settime};
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    let spec = TimeSpec::new(secs, sub);
    clock_settime(ClockId::CLOCK_REALTIME, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        const MS: i64 = 1_000_000;
        let local = 1_700_000_000_000 * MS;
        // (host minus local, must set)
        for (offset, want) in [
            (0, false),
            (50 * MS, false),
            (50 * MS + 1, true),
            (3_600_000 * MS, true),
            (-5_000 * MS, false),
            (-5_000 * MS - 1, true),
            (-3_600_000 * MS, true),
        ] {
            assert_eq!(needs_setting(local + offset, local), want, "{offset}");
        }
        assert!(needs_setting(i64::MAX, i64::MIN));
        assert!(needs_setting(i64::MIN, i64::MAX));
    }

    #[test]
    fn a_clock_in_step_is_left_alone() {
        assert_eq!(sync(now_nanos(), true), ClockSync::InStep);
        assert_eq!(sync(0, false), ClockSync::Disabled);
    }
}
