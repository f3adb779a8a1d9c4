//! Buffers of `f32` kept for reuse: the loader's sample buffers, shared by every stream of a
//! server, and a client's batch buffers, handed back by its consumer. Reusing a buffer spares
//! the kernel zeroing fresh pages for it, which for multi-megabyte buffers costs about as much as
//! filling them (and the allocator returns blocks over 32 MiB to the system at once).

use std::sync::{Mutex, MutexGuard};

/// Sample buffers kept for reuse, bounded in count and bytes. One pool can serve every stream of
/// a server, so that idle buffers stay a bounded share of its memory however many streams run.
#[derive(Debug)]
pub struct BufferPool {
    buffers: Mutex<(Vec<Vec<f32>>, u64)>,
    max_buffers: usize,
    max_bytes: u64,
}

impl BufferPool {
    /// A pool that keeps at most `max_buffers` buffers of at most `max_bytes` in all.
    pub fn new(max_buffers: usize, max_bytes: u64) -> Self {
        Self {
            buffers: Mutex::new((Vec::new(), 0)),
            max_buffers,
            max_bytes,
        }
    }

    /// A pooled buffer (empty, with some capacity) or a new empty one.
    pub fn take(&self) -> Vec<f32> {
        // The shortest: the long ones are worth more to `take_len`.
        let mut buffer = self.pop(|buffers| (0..buffers.len()).min_by_key(|&i| buffers[i].len()));
        buffer.clear();
        buffer
    }

    /// A buffer of exactly `len` values whose contents are left from earlier use, for a caller
    /// that overwrites every value: filling 4 MB with zeros first cost as much as a copy.
    pub fn take_len(&self, len: usize) -> Vec<f32> {
        // The shortest already that long if there is one (nothing to fill or reallocate, and
        // longer ones stay for longer requests: a stream takes sources and small targets from
        // one pool), else the longest.
        let mut buffer = self.pop(|buffers| {
            (0..buffers.len())
                .filter(|&i| buffers[i].len() >= len)
                .min_by_key(|&i| buffers[i].len())
                .or_else(|| (0..buffers.len()).max_by_key(|&i| buffers[i].len()))
        });
        if buffer.capacity() == 0 {
            // A new buffer: zeroed pages straight from the allocator, faulted in by whoever
            // writes them first rather than all here, as huge pages where it is large enough.
            let buffer = vec![0.0; len];
            crate::huge_pages::advise(&buffer);
            return buffer;
        }
        buffer.truncate(len);
        buffer.resize(len, 0.0);
        buffer
    }

    /// An empty buffer with room for `capacity` values, for a caller that appends them: the
    /// smallest pooled one already that large if there is one, else the largest, grown.
    pub fn take_capacity(&self, capacity: usize) -> Vec<f32> {
        // The smallest already that large (larger ones stay for larger requests), else the
        // largest.
        let mut buffer = self.pop(|buffers| {
            (0..buffers.len())
                .filter(|&i| buffers[i].capacity() >= capacity)
                .min_by_key(|&i| buffers[i].capacity())
                .or_else(|| (0..buffers.len()).max_by_key(|&i| buffers[i].capacity()))
        });
        buffer.clear();
        if buffer.capacity() < capacity {
            buffer.reserve(capacity);
            crate::huge_pages::advise(&buffer);
        }
        buffer
    }

    fn pop(&self, choose: impl FnOnce(&[Vec<f32>]) -> Option<usize>) -> Vec<f32> {
        let mut guard = self.lock();
        let (buffers, bytes) = &mut *guard;
        match choose(buffers) {
            Some(i) => {
                let buffer = buffers.swap_remove(i);
                *bytes -= Self::size(&buffer);
                buffer
            }
            None => Vec::new(),
        }
    }

    /// Keeps `buffer` for reuse if the pool has room, frees it otherwise.
    pub fn give(&self, buffer: Vec<f32>) {
        let size = Self::size(&buffer);
        let mut guard = self.lock();
        let (buffers, bytes) = &mut *guard;
        if size > 0 && buffers.len() < self.max_buffers && *bytes + size <= self.max_bytes {
            *bytes += size;
            buffers.push(buffer);
        }
    }

    /// Bytes held by pooled buffers.
    pub fn held_bytes(&self) -> u64 {
        self.lock().1
    }

    fn size(buffer: &Vec<f32>) -> u64 {
        buffer.capacity() as u64 * 4
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<Vec<f32>>, u64)> {
        self.buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl crate::tensor::Recycle for BufferPool {
    fn recycle(&self, buffer: Vec<f32>) {
        self.give(buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    #[test]
    fn the_pool_hands_out_a_buffer_long_enough_and_keeps_long_ones_for_that() {
        let pool = BufferPool::new(8, u64::MAX);
        let long = vec![7.0f32; 1000];
        let long_ptr = long.as_ptr();
        pool.give(vec![1.0; 10]);
        pool.give(long);
        pool.give(vec![2.0; 20]);
        // An empty buffer for growing (a masking target) is the shortest one.
        let short = pool.take();
        assert!(short.is_empty() && short.capacity() == 10);
        // A buffer to overwrite whole is one already long enough: no fill, no reallocation.
        let taken = pool.take_len(500);
        assert_eq!(taken.as_ptr(), long_ptr);
        assert_eq!(taken.len(), 500);
        assert!(taken.iter().all(|&v| v == 7.0), "left as it was");
        // None long enough: the longest, grown.
        let grown = pool.take_len(50);
        assert_eq!(grown.len(), 50);
        assert_eq!(&grown[..20], &[2.0; 20]);
        assert_eq!(pool.held_bytes(), 0);
        assert!(pool.take_len(3).len() == 3, "an empty pool allocates");
    }

    #[test]
    fn an_empty_buffer_with_room_is_one_already_that_large() {
        let pool = BufferPool::new(8, u64::MAX);
        let mut big = Vec::with_capacity(1000);
        big.extend_from_slice(&[3.0f32; 10]);
        let big_ptr = big.as_ptr();
        pool.give(vec![1.0; 10]);
        pool.give(big);
        pool.give(vec![2.0; 20]);
        let taken = pool.take_capacity(500);
        assert_eq!(taken.as_ptr(), big_ptr, "the one with room");
        assert!(taken.is_empty() && taken.capacity() >= 500);
        // None large enough: the largest, grown to the room asked for.
        let grown = pool.take_capacity(100);
        assert!(grown.is_empty() && grown.capacity() >= 100);
        assert_eq!(pool.held_bytes(), 40, "the 10-value buffer stays");
        assert!(
            BufferPool::new(0, 0).take_capacity(7).capacity() >= 7,
            "no pool: a new one"
        );
    }
}
