//! Hooks for tests only: ways to make the engine slow for real, so that
//! what a caller sees when the engine cannot decide in time can be tested
//! end to end. Nothing in the engine uses them on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The longest a closed gate holds an executor: a test that forgets to
/// open it gets a slow engine, not a hung one.
pub const TEST_GATE_MAX_HOLD: Duration = Duration::from_secs(30);

/// Test only: a gate in front of one executor's batches. While it is
/// closed the executor's apply thread takes no further batch (client
/// requests, peer messages and queries wait in its queues), as if that
/// executor were stalled; opening it lets everything through in order.
#[derive(Default)]
pub struct TestBatchGate {
    /// The one field the apply loop reads per batch while the gate is open.
    closed: AtomicBool,
    lock: Mutex<()>,
    opened: Condvar,
}

impl TestBatchGate {
    pub fn close(&self) {
        let _lock = self.lock.lock();
        self.closed.store(true, Ordering::Release);
    }

    pub fn open(&self) {
        let _lock = self.lock.lock();
        self.closed.store(false, Ordering::Release);
        self.opened.notify_all();
    }

    /// Waits while the gate is closed (at most [`TEST_GATE_MAX_HOLD`]).
    pub(crate) fn pass(&self) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let until = Instant::now() + TEST_GATE_MAX_HOLD;
        let mut lock = self.lock.lock();
        while self.closed.load(Ordering::Acquire) {
            if self.opened.wait_until(&mut lock, until).timed_out() {
                tracing::warn!("a test batch gate was left closed; letting the batch through");
                return;
            }
        }
    }
}
