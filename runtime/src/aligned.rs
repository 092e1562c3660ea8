//! [`AlignedBuffer`]: floats that start on a 64-byte cache line.

use std::ops::{Deref, DerefMut};

use attngen_codegen::abi::ALIGN_FLOATS;

/// `len` f32s whose first starts on a 64-byte cache line, as every buffer attngen owns does.
///
/// Kernels read the tensors you pass where they lie, and decode reads its cache in place. A cache
/// that starts off a line — a large `Vec<f32>` from glibc's `malloc` starts 16 bytes past one —
/// puts every other 32-byte load across two lines: on a Zen 3, grouped decode took 1.05–1.09×
/// the time it takes on the same cache on lines, MLA decode 1.03×. Allocate caches as this.
///
/// ```
/// use attngen::AlignedBuffer;
///
/// let mut k_cache = AlignedBuffer::zeroed(2 * 4096 * 8 * 128); // B = 2, Sk = 4096, 8 × 128
/// assert_eq!(k_cache.as_ptr() as usize % 64, 0);
/// k_cache[..128].fill(0.5); // a slice like any other
/// let copy = AlignedBuffer::from_slice(&k_cache[..128]);
/// assert_eq!((copy.len(), copy[127], copy.as_ptr() as usize % 64), (128, 0.5, 0));
/// ```
#[derive(Debug, Default)]
pub struct AlignedBuffer {
    /// The floats, with room to start on a line.
    storage: Vec<f32>,
    /// Floats of `storage` before its first line boundary.
    start: usize,
    /// Floats from there.
    len: usize,
}

impl AlignedBuffer {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> AlignedBuffer {
        // `vec!` of zeros asks the allocator for zeroed memory: no pass over a large cache.
        let storage = vec![0.0; len.saturating_add(ALIGN_FLOATS - 1)];
        let start = floats_to_line(&storage);
        AlignedBuffer { storage, start, len }
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[f32]) -> AlignedBuffer {
        let mut buffer = AlignedBuffer::zeroed(data.len());
        buffer.copy_from_slice(data);
        buffer
    }
}

/// Floats from the start of `floats` to its first 64-byte boundary ([`ALIGN_FLOATS`] floats).
pub(crate) fn floats_to_line(floats: &[f32]) -> usize {
    // The data pointer of an f32 slice is 4-byte aligned: the skip is a whole number of floats.
    let line = ALIGN_FLOATS * size_of::<f32>();
    (floats.as_ptr() as usize).wrapping_neg() % line / size_of::<f32>()
}

impl Clone for AlignedBuffer {
    /// A new allocation starts on a line of its own, not at the original's offset.
    fn clone(&self) -> AlignedBuffer {
        AlignedBuffer::from_slice(self)
    }
}

impl Deref for AlignedBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl AsRef<[f32]> for AlignedBuffer {
    fn as_ref(&self) -> &[f32] {
        self
    }
}

impl AsMut<[f32]> for AlignedBuffer {
    fn as_mut(&mut self) -> &mut [f32] {
        self
    }
}

impl From<&[f32]> for AlignedBuffer {
    fn from(data: &[f32]) -> AlignedBuffer {
        AlignedBuffer::from_slice(data)
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuffer;

    #[test]
    fn buffers_start_on_a_line_whatever_their_length() {
        for len in [0, 1, 15, 16, 17, 1000, 1 << 20] {
            let mut buffer = AlignedBuffer::zeroed(len);
            assert_eq!((buffer.len(), buffer.as_ptr() as usize % 64), (len, 0));
            assert!(buffer.iter().all(|&x| x == 0.0));
            buffer.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            let copy = buffer.clone();
            assert_eq!((&copy[..], copy.as_ptr() as usize % 64), (&buffer[..], 0));
        }
    }
}
