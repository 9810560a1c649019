//! Panics in request handling: caught where they happen (while a handler's future or its
//! response body is polled), answered as an error in the request's own protocol, logged
//! exactly once, and the daemon keeps serving.
//!
//! Two guards use this: the REST stack answers envd's JSON 500, the RPC stack an `internal`
//! status, which the Connect and gRPC-Web layers translate like any other (see
//! [`guard::Answer`]). [`log_panics`] installs the hook that logs every panic: a panic
//! inside a guard is handed to the guard, which logs it once with the answer it gives; any
//! other panic (a spawned task's, a blocking thread's) is logged by the hook itself.

pub mod guard;

#[cfg(debug_assertions)]
pub mod fault;

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, PanicHookInfo};

thread_local! {
    /// How many guards are polling on this thread right now (they nest: the RPC guard runs
    /// inside the REST guard).
    static GUARDS: Cell<usize> = const { Cell::new(0) };
    /// The description of the last panic on this thread inside a guard, for that guard.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the panic hook: a panic inside a guard is described to the guard (which logs
/// it with its answer), any other panic is logged here. Either way, once, through
/// `tracing`, with the location and (when `RUST_BACKTRACE` asks for one) a backtrace.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let detail = describe(info);
        let guarded = GUARDS.try_with(Cell::get).unwrap_or(0) > 0;
        if guarded {
            let _ = CAUGHT.try_with(|caught| *caught.borrow_mut() = Some(detail));
        } else {
            tracing::error!(%detail, "panic outside request handling");
        }
    }));
}

fn describe(info: &PanicHookInfo<'_>) -> String {
    let message = payload_text(info.payload());
    let mut detail = match info.location() {
        Some(location) => format!("panicked at {location}: {message}"),
        None => format!("panicked: {message}"),
    };
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        detail.push_str(&format!("\n{backtrace}"));
    }
    detail
}

fn payload_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(a non-text panic payload)"
    }
}

/// Runs `f`, turning a panic into its description (from the hook when it is installed,
/// else from the payload).
///
/// # Errors
/// The panic's description.
pub fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    GUARDS.with(|guards| guards.set(guards.get() + 1));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    GUARDS.with(|guards| guards.set(guards.get().saturating_sub(1)));
    result.map_err(|payload| {
        CAUGHT
            .with(|caught| caught.borrow_mut().take())
            .unwrap_or_else(|| format!("panicked: {}", payload_text(payload.as_ref())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catching_returns_values_and_describes_panics() {
        assert_eq!(catching(|| 7), Ok(7));
        let err = catching(|| -> u8 { panic!("boom {}", 42) }).expect_err("panicked");
        assert!(err.contains("boom 42"), "{err}");
        // Nested: the inner guard takes the panic, the outer one sees a value.
        let outer = catching(|| catching(|| -> u8 { panic!("inner") }));
        assert!(
            matches!(outer, Ok(Err(ref inner)) if inner.contains("inner")),
            "{outer:?}"
        );
        assert_eq!(GUARDS.with(Cell::get), 0);
    }
}
