//! Fail-stop: a panic on any engine or store thread stops the whole process.
//!
//! One executor's thread that died while the others keep serving is worse
//! than a crash: messages to it are lost, transactions with it hang and the
//! process still looks healthy. A crash is what the design is built for:
//! a supervisor restarts the process and recovery replays the log. So every
//! background thread is started with [`spawn`], which turns a panic into one
//! clear log line and [`EXIT_CODE`].
//!
//! **Test hook.** [`FAULT_ENV`] (`PEAKSTACK_FAULT_PANIC=apply-0`, say) makes
//! the thread of that name panic at its first [`fault_point`]: an apply
//! thread at its first batch with work, a log thread at its first group, a
//! checkpoint thread at its first checkpoint, the server's store threads
//! when they start. It is read once per process (when the engine opens or
//! a thread first reaches a fault point) and costs one atomic load per
//! batch when unset. For tests only.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// The exit status of a process stopped by a failed thread (`EX_SOFTWARE`).
pub const EXIT_CODE: i32 = 70;
/// The environment variable naming the thread that panics on purpose.
pub const FAULT_ENV: &str = "PEAKSTACK_FAULT_PANIC";

static FAULT_THREAD: OnceLock<Option<String>> = OnceLock::new();

/// Starts a thread named `name` whose panic stops the process.
pub fn spawn<T, F>(name: impl Into<String>, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        // Unwind safety does not matter: nothing runs after a panic but exit.
        match panic::catch_unwind(AssertUnwindSafe(body)) {
            Ok(value) => value,
            Err(payload) => stop(&format!("thread {name} panicked: {}", panic_message(payload.as_ref()))),
        }
    })
}

/// Stops the process now with [`EXIT_CODE`], after one log line saying why.
pub fn stop(reason: &str) -> ! {
    let line = format!("fatal: {reason}; the process stops (exit {EXIT_CODE}) so that it restarts and recovers");
    tracing::error!("{line}");
    if !tracing::dispatcher::has_been_set() {
        eprintln!("{line}");
    }
    std::process::exit(EXIT_CODE)
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

/// Reads [`FAULT_ENV`], once per process (a later change is not seen).
pub fn arm_from_env() {
    fault_thread();
}

fn fault_thread() -> Option<&'static str> {
    FAULT_THREAD.get_or_init(|| std::env::var(FAULT_ENV).ok().filter(|name| !name.is_empty())).as_deref()
}

/// Panics when [`FAULT_ENV`] names the calling thread: see the module docs.
pub fn fault_point() {
    if let Some(name) = fault_thread() {
        if std::thread::current().name() == Some(name) {
            panic!("fault injected by {FAULT_ENV}={name}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_ends_normally_hands_back_its_value() {
        assert_eq!(spawn("failstop-test", || 7).unwrap().join().unwrap(), 7);
    }

    #[test]
    fn the_panic_message_is_found_in_either_payload() {
        assert_eq!(panic_message(&"plain"), "plain");
        assert_eq!(panic_message(&String::from("formatted 1")), "formatted 1");
        assert_eq!(panic_message(&1u8), "(no message)");
    }
}
