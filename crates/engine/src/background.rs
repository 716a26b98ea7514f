//! Threads whose work can wait (archive merges, checkpoint encoding) run
//! at a lower priority than those every caller waits for (apply, log): on
//! two cores they would otherwise take turns with them.

/// The nice value of background threads.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`]. On Linux
/// `setpriority` with a thread id changes that thread alone.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls, no pointers.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE);
    }
}
