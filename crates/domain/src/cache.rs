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

/// [`prefetch`] for every cache line `value` spans (a value larger than a
/// line, or one that straddles two).
#[inline(always)]
pub fn prefetch_all<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = (value as *const T).cast::<i8>();
        let offset = start as usize % 64;
        let mut at = 0;
        while at < offset + std::mem::size_of::<T>() {
            // SAFETY: as in `prefetch`; the address is computed, never
            // dereferenced, and lies within the lines of `value`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_sub(offset).wrapping_add(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
