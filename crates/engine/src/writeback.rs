//! Starting the kernel's write-back of a file range without waiting for it.
//!
//! Files that are fsynced rarely (the account history before a checkpoint,
//! an archive merge's output) would otherwise pile up hundreds of megabytes
//! of dirty pages, and their one fsync then floods the disk for tens of
//! milliseconds, during which every log fsync waits behind it: measured
//! before this, a checkpoint's history fdatasync took 66-70 ms and the log
//! fdatasyncs beside it 33-60 ms (`perf trace -e fdatasync --duration 8`
//! on `peakstack bench`). Handing the pages to write-back a few megabytes
//! at a time spreads the same writes evenly.

use std::fs::File;

/// Bytes written between two write-back starts.
pub const WRITEBACK_EVERY_BYTES: u64 = 8 << 20;

/// Starts writing back `len` bytes of `file` from `offset`, without waiting.
/// Only a hint: a later fsync makes the range durable either way.
pub fn start(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: no pointers; the descriptor is open for the call (it
        // belongs to `file`). The result is ignored: only a hint.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
