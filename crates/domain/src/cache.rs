//! A hint to the CPU cache, for loops that know ahead which memory they
//! will read: asking for many lines first lets their misses overlap,
//! instead of paying for them one after another.

/// Starts bringing the cache line holding `value` in, without waiting for
/// it. Only a hint: it changes no state and never faults.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86_64 baseline, so the instruction
        // exists; a prefetch reads nothing and cannot fault, and the
        // address is that of a live reference anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
