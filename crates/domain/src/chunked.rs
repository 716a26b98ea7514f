//! A vector kept in shared chunks, so that a snapshot of it costs a few
//! pointer copies instead of a copy of every element.
//!
//! [`ChunkedVec::share`] hands out a second handle on the same chunks (an
//! `Arc` each). A write afterwards copies only the chunk it touches, and
//! only while a snapshot still holds that chunk; once the snapshot is gone,
//! writes go in place again. The apply thread of an executor keeps its
//! transfer records in one: a checkpoint shares them with the log thread,
//! which sorts and encodes them while the apply thread goes on. Records
//! that arrive together sit together (freed slots are reused in order), so
//! the batches that run while a checkpoint is encoded copy a few chunks
//! each, not the whole table at once.

use std::sync::Arc;

/// Elements per chunk: a power of two, small enough that copying one chunk
/// is a few microseconds, large enough that the chunk table stays in cache.
const CHUNK_BITS: u32 = 8;
const CHUNK: usize = 1 << CHUNK_BITS;

pub struct ChunkedVec<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for ChunkedVec<T> {
    fn default() -> Self {
        ChunkedVec { chunks: Vec::new(), len: 0 }
    }
}

impl<T: Clone> ChunkedVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        Some(&self.chunks[index >> CHUNK_BITS][index & (CHUNK - 1)])
    }

    /// The element at `index`, for writing: its chunk is copied first if a
    /// snapshot shares it.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        if index >= self.len {
            return None;
        }
        Some(&mut Arc::make_mut(&mut self.chunks[index >> CHUNK_BITS])[index & (CHUNK - 1)])
    }

    pub fn push(&mut self, value: T) {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Arc::new(Vec::with_capacity(CHUNK)));
        }
        let last = self.chunks.last_mut().expect("a chunk has room");
        Arc::make_mut(last).push(value);
        self.len += 1;
    }

    /// Makes room for `additional` more chunks' worth of pointers (the chunks
    /// themselves are allocated as they fill).
    pub fn reserve(&mut self, additional: usize) {
        self.chunks.reserve(additional.div_ceil(CHUNK));
    }

    /// A second handle on the same elements: what they are now, whatever
    /// this vector does later.
    pub fn share(&self) -> ChunkedVec<T> {
        ChunkedVec { chunks: self.chunks.clone(), len: self.len }
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }
}

impl<T: Clone> std::ops::Index<usize> for ChunkedVec<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        match self.get(index) {
            Some(value) => value,
            None => panic!("index {index} out of bounds (len {})", self.len),
        }
    }
}

impl<T: Clone> std::ops::IndexMut<usize> for ChunkedVec<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        let len = self.len;
        match self.get_mut(index) {
            Some(value) => value,
            None => panic!("index {index} out of bounds (len {len})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_handle_keeps_what_it_saw_while_the_original_changes() {
        let mut live: ChunkedVec<u64> = ChunkedVec::default();
        for n in 0..(3 * CHUNK as u64 + 5) {
            live.push(n);
        }
        let frozen = live.share();
        live[1] = 1000;
        live[2 * CHUNK] = 2000;
        live.push(7);
        assert_eq!(frozen.len(), 3 * CHUNK + 5);
        assert_eq!((frozen[1], frozen[2 * CHUNK]), (1, 2 * CHUNK as u64));
        assert_eq!(frozen.iter().copied().collect::<Vec<_>>(), (0..(3 * CHUNK as u64 + 5)).collect::<Vec<_>>());
        assert_eq!((live[1], live[2 * CHUNK], live.len()), (1000, 2000, 3 * CHUNK + 6));
        assert_eq!(live.get(3 * CHUNK + 6), None);
        // Untouched chunks are still the same memory; touched ones were copied.
        assert!(Arc::ptr_eq(&live.chunks[1], &frozen.chunks[1]));
        assert!(!Arc::ptr_eq(&live.chunks[0], &frozen.chunks[0]));
        // Without a snapshot, writes go in place.
        drop(frozen);
        let before = Arc::as_ptr(&live.chunks[1]);
        live[CHUNK] = 5;
        assert_eq!(Arc::as_ptr(&live.chunks[1]), before);
    }
}
