//! Large request and answer buffers, kept for the next request.
//!
//! A batch request's body and answer are hundreds of KiB each. Fresh
//! buffers that size come from pages the allocator has given back to the
//! kernel, so every batch paid page faults and page clearing (about a sixth
//! of the HTTP workers' time under `loadtest --batch 1000`). Buffers of at
//! least [`MIN_POOLED_BYTES`] go back to a bounded pool when the last
//! reference to them is dropped, and the next large body or answer reuses
//! them.

use bytes::Bytes;
use parking_lot::Mutex;

/// Buffers smaller than this are left to the allocator (its small-object
/// pages stay mapped).
pub const MIN_POOLED_BYTES: usize = 64 * 1024;
/// Buffers larger than this are not kept (a 4 MiB batch is rare).
pub const MAX_POOLED_BYTES: usize = 1024 * 1024;
/// Most buffers kept: a request and an answer for each of 128 concurrent
/// batches (64 were too few for `loadtest --batch 1000` at its default 64
/// connections, and every miss paid the page faults again).
pub const MAX_POOLED_BUFFERS: usize = 256;
/// Most bytes the kept buffers may hold together.
pub const MAX_POOLED_TOTAL_BYTES: usize = 96 << 20;

struct Pool {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { buffers: Vec::new(), bytes: 0 });

/// An empty buffer of at least `capacity` bytes: a kept one if there is one
/// (for capacities the pool keeps), else a fresh one.
pub fn take(capacity: usize) -> Vec<u8> {
    if (MIN_POOLED_BYTES..=MAX_POOLED_BYTES).contains(&capacity) {
        let mut pool = POOL.lock();
        if let Some(at) = pool.buffers.iter().position(|buffer| buffer.capacity() >= capacity) {
            let buffer = pool.buffers.swap_remove(at);
            pool.bytes -= buffer.capacity();
            return buffer;
        }
    }
    Vec::with_capacity(capacity)
}

/// Gives a buffer back (emptied); dropped if the pool does not keep its size
/// or is full.
pub fn give_back(mut buffer: Vec<u8>) {
    if !(MIN_POOLED_BYTES..=MAX_POOLED_BYTES).contains(&buffer.capacity()) {
        return;
    }
    buffer.clear();
    let mut pool = POOL.lock();
    if pool.buffers.len() < MAX_POOLED_BUFFERS && pool.bytes + buffer.capacity() <= MAX_POOLED_TOTAL_BYTES {
        pool.bytes += buffer.capacity();
        pool.buffers.push(buffer);
    }
}

/// Owns a buffer behind [`Bytes`] and gives it back when they are dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

/// `buffer` as [`Bytes`] that give it back to the pool once dropped.
pub fn into_bytes(buffer: Vec<u8>) -> Bytes {
    if buffer.capacity() < MIN_POOLED_BYTES {
        return Bytes::from(buffer);
    }
    Bytes::from_owner(Pooled(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_and_the_pool_is_bounded() {
        let mut buffer = take(MIN_POOLED_BYTES);
        buffer.extend_from_slice(b"answer");
        let pointer = buffer.as_ptr();
        let bytes = into_bytes(buffer);
        assert_eq!(&bytes[..], b"answer");
        let clone = bytes.clone();
        drop(bytes);
        drop(clone);
        // Other tests may share the pool: look for this buffer among those kept.
        let mut taken: Vec<Vec<u8>> = (0..MAX_POOLED_BUFFERS).map(|_| take(MIN_POOLED_BYTES)).collect();
        assert!(taken.iter().any(|b| b.as_ptr() == pointer && b.is_empty()));
        // Small and huge buffers are never kept; the pool keeps at most its bound.
        give_back(Vec::with_capacity(16));
        give_back(Vec::with_capacity(MAX_POOLED_BYTES + 1));
        taken.extend((0..8).map(|_| Vec::with_capacity(MIN_POOLED_BYTES)));
        taken.into_iter().for_each(give_back);
        let pool = POOL.lock();
        assert!(pool.buffers.len() <= MAX_POOLED_BUFFERS);
        assert!(pool.buffers.iter().all(|b| (MIN_POOLED_BYTES..=MAX_POOLED_BYTES).contains(&b.capacity())));
        assert_eq!(pool.bytes, pool.buffers.iter().map(Vec::capacity).sum::<usize>());
        assert!(pool.bytes <= MAX_POOLED_TOTAL_BYTES);
    }
}
