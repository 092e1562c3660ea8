//! [`AlignedBuffer`]: floats that start on a 64-byte cache line.

use std::ops::{Deref, DerefMut};

use attngen_codegen::abi::ALIGN_FLOATS;

/// `len` f32s whose first starts on a 64-byte cache line, as every buffer attngen owns does;
/// on Linux, a buffer of 2 MiB or more also starts on a 2 MiB boundary in memory of its own,
/// offered to the kernel for transparent huge pages.
///
/// Kernels read the tensors you pass where they lie, and decode reads its cache in place. A cache
/// that starts off a line — a large `Vec<f32>` from glibc's `malloc` starts 16 bytes past one —
/// puts every other 32-byte load across two lines: on a Zen 3, grouped decode took 1.05–1.09×
/// the time it takes on the same cache on lines, MLA decode 1.03×. Allocate caches as this.
///
/// **Huge pages.** A large buffer is mapped on its own (`mmap`, so its zeros cost no pass over
/// it) and advised `MADV_HUGEPAGE`, which Linux honours when
/// `/sys/kernel/mm/transparent_hugepage/enabled` says `always` or `madvise` (one of the two is
/// the default on most distributions); its pages are then 2 MiB where the kernel has them, as
/// numpy's large arrays' are. Decode from a cache in memory takes fewer page walks and its
/// prefetches cross fewer page boundaries: on a Zen 5 (2 threads, caches from DRAM, against
/// the same cache in 4 KiB pages) the same kernel took 0.85–0.96× the time on Llama-3-8B's
/// 32768-token cache (W7), 0.85–0.98× on four 4096-token ones (W4) and 0.93–0.97× on
/// DeepSeek-V2-Lite's latent (W8); the slower the host's memory, the more the pages saved.
/// Elsewhere, or if the mapping fails, the buffer comes from the global allocator as any small
/// one does.
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
    storage: Storage,
    /// Floats of `storage` before its first line boundary.
    start: usize,
    /// Floats from there.
    len: usize,
}

/// Where an [`AlignedBuffer`]'s floats live.
#[derive(Debug)]
enum Storage {
    /// From the global allocator.
    Heap(Vec<f32>),
    /// A mapping of its own (large buffers on Linux).
    #[cfg(target_os = "linux")]
    Mapped(huge::Mapping),
}

impl Default for Storage {
    fn default() -> Storage {
        Storage::Heap(Vec::new())
    }
}

impl Storage {
    /// Every float of the storage.
    fn floats(&self) -> &[f32] {
        match self {
            Storage::Heap(floats) => floats,
            #[cfg(target_os = "linux")]
            Storage::Mapped(mapping) => mapping.floats(),
        }
    }

    /// Every float of the storage, writable.
    fn floats_mut(&mut self) -> &mut [f32] {
        match self {
            Storage::Heap(floats) => floats,
            #[cfg(target_os = "linux")]
            Storage::Mapped(mapping) => mapping.floats_mut(),
        }
    }
}

impl AlignedBuffer {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> AlignedBuffer {
        #[cfg(target_os = "linux")]
        if let Some(mapping) = huge::Mapping::zeroed(len) {
            // The mapping starts on a 2 MiB boundary: on a line already.
            return AlignedBuffer { storage: Storage::Mapped(mapping), start: 0, len };
        }
        // `vec!` of zeros asks the allocator for zeroed memory: no pass over a large cache.
        let floats = vec![0.0; len.saturating_add(ALIGN_FLOATS - 1)];
        let start = floats_to_line(&floats);
        AlignedBuffer { storage: Storage::Heap(floats), start, len }
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[f32]) -> AlignedBuffer {
        let mut buffer = AlignedBuffer::zeroed(data.len());
        buffer.copy_from_slice(data);
        buffer
    }
}

/// The system's transparent-huge-page setting as Linux reports it in
/// `/sys/kernel/mm/transparent_hugepage/enabled`: `always`, `madvise` or `never`; `None` where
/// the system does not say. With `always` or `madvise`, a large [`AlignedBuffer`] lies in huge
/// pages where the kernel has them.
///
/// ```
/// let setting = attngen::transparent_huge_pages();
/// assert!(setting.is_none_or(|s| ["always", "madvise", "never"].contains(&s.as_str())));
/// ```
pub fn transparent_huge_pages() -> Option<String> {
    let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    chosen_word(&setting).map(str::to_owned)
}

/// The bracketed word of a sysfs choice: `madvise` in `always [madvise] never`.
fn chosen_word(choice: &str) -> Option<&str> {
    let (_, chosen) = choice.split_once('[')?;
    Some(chosen.split_once(']')?.0)
}

/// Floats from the start of `floats` to its first 64-byte boundary ([`ALIGN_FLOATS`] floats).
pub(crate) fn floats_to_line(floats: &[f32]) -> usize {
    // The data pointer of an f32 slice is 4-byte aligned: the skip is a whole number of floats.
    let line = ALIGN_FLOATS * size_of::<f32>();
    (floats.as_ptr() as usize).wrapping_neg() % line / size_of::<f32>()
}

/// Large buffers in anonymous mappings advised for transparent huge pages.
#[cfg(target_os = "linux")]
mod huge {
    use std::ptr::NonNull;

    /// Bytes of a transparent huge page on x86-64 and most aarch64 kernels: buffers at least
    /// this large are mapped, starting on a multiple of it.
    const HUGE_PAGE: usize = 2 << 20;

    /// An anonymous private mapping of `mapped` bytes at `base`, holding `len` floats from
    /// `start`, the first multiple of [`HUGE_PAGE`] in it; unmapped when dropped.
    #[derive(Debug)]
    pub(super) struct Mapping {
        base: NonNull<libc::c_void>,
        mapped: usize,
        start: NonNull<f32>,
        len: usize,
    }

    // SAFETY: a Mapping owns its pages as a Vec owns its buffer: nothing else holds the address,
    // `&self` gives only shared reads and `&mut self` the only writes.
    unsafe impl Send for Mapping {}
    // SAFETY: as for Send; shared references only read.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        /// `len` zeros from a 2 MiB boundary, their whole huge pages advised
        /// `MADV_HUGEPAGE`; `None` below [`HUGE_PAGE`] bytes, or when the system refuses the
        /// mapping.
        pub(super) fn zeroed(len: usize) -> Option<Mapping> {
            let bytes = len.checked_mul(size_of::<f32>())?;
            if bytes < HUGE_PAGE {
                return None;
            }
            // Room to slide the start to the next 2 MiB boundary. Only the buffer's whole huge
            // pages are advised: a partial one at its end stays in small pages, so a buffer
            // occupies no more memory than its floats' pages.
            let mapped = bytes.checked_add(HUGE_PAGE)?;
            let advised = bytes / HUGE_PAGE * HUGE_PAGE;
            let (protection, flags) =
                (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
            // SAFETY: an anonymous mapping at an address of the kernel's choosing touches no
            // existing memory; the result is checked before use.
            let base =
                unsafe { libc::mmap(std::ptr::null_mut(), mapped, protection, flags, -1, 0) };
            if base == libc::MAP_FAILED {
                return None;
            }
            let base = NonNull::new(base)?;
            let skip = (base.as_ptr() as usize).wrapping_neg() % HUGE_PAGE;
            // SAFETY: `skip < HUGE_PAGE` and `advised <= bytes`, so the `bytes` from the start,
            // and the advised range among them, lie inside the mapping (`skip + bytes <
            // mapped`), whose pages are readable, writable and zero until written. The advice
            // only changes how the kernel backs the range; if it fails (huge pages disabled,
            // say) the pages stay small, which is as correct.
            let start = unsafe {
                let start = base.cast::<u8>().add(skip);
                libc::madvise(start.as_ptr().cast(), advised, libc::MADV_HUGEPAGE);
                start.cast::<f32>()
            };
            Some(Mapping { base, mapped, start, len })
        }

        /// The floats.
        pub(super) fn floats(&self) -> &[f32] {
            // SAFETY: `len` floats from `start` lie in the live mapping (`zeroed`), and `&self`
            // excludes writers.
            unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
        }

        /// The floats, writable.
        pub(super) fn floats_mut(&mut self) -> &mut [f32] {
            // SAFETY: as in `floats`; `&mut self` makes this the only reference.
            unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: `base` and `mapped` are the mapping `zeroed` made, unmapped once, here; no
            // slice of it outlives `self`.
            unsafe { libc::munmap(self.base.as_ptr(), self.mapped) };
        }
    }
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
        &self.storage.floats()[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.storage.floats_mut()[self.start..self.start + self.len]
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
    use super::{AlignedBuffer, chosen_word, transparent_huge_pages};

    /// Floats in a 2 MiB huge page.
    const HUGE_FLOATS: usize = (2 << 20) / 4;

    #[test]
    fn buffers_start_on_a_line_whatever_their_length() {
        let lengths = [0, 1, 15, 16, 17, 1000, 1 << 18, HUGE_FLOATS - 1, HUGE_FLOATS];
        for len in lengths.into_iter().chain([HUGE_FLOATS + 5, 3 * HUGE_FLOATS + 17]) {
            let mut buffer = AlignedBuffer::zeroed(len);
            assert_eq!((buffer.len(), buffer.as_ptr() as usize % 64), (len, 0));
            assert!(buffer.iter().all(|&x| x == 0.0));
            buffer.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            let copy = buffer.clone();
            assert_eq!((&copy[..], copy.as_ptr() as usize % 64), (&buffer[..], 0));
            // Large buffers start on a huge page (Linux).
            if cfg!(target_os = "linux") && len >= HUGE_FLOATS {
                assert_eq!(buffer.as_ptr() as usize % (2 << 20), 0, "{len} floats");
            }
            // The last float is in the allocation (a fault otherwise).
            if let Some(last) = buffer.last_mut() {
                *last = -1.0;
            }
        }
    }

    #[test]
    fn the_chosen_setting_is_the_bracketed_word() {
        assert_eq!(chosen_word("always [madvise] never\n"), Some("madvise"));
        assert_eq!(chosen_word("[always] madvise never"), Some("always"));
        assert_eq!(chosen_word("always madvise [never]"), Some("never"));
        assert_eq!(chosen_word("always madvise never"), None);
    }

    /// The mapping holding `at` in `/proc/self/smaps`: its address range, and its
    /// `THPeligible` line (`1` when huge pages may back it).
    #[cfg(target_os = "linux")]
    fn mapping_at(at: usize) -> Option<(std::ops::Range<usize>, String)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut holding = None;
        for line in smaps.lines() {
            // A mapping's header, `lo-hi perms offset ...`, then its `Field: value` lines.
            let first = line.split_whitespace().next().unwrap_or_default();
            let bounds = first.split_once('-').filter(|_| !first.ends_with(':'));
            let parse = |hex: &str| usize::from_str_radix(hex, 16).ok();
            if let Some((lo, hi)) = bounds.and_then(|(lo, hi)| Some((parse(lo)?, parse(hi)?))) {
                holding = Some(lo..hi).filter(|range| range.contains(&at));
            } else if let Some(range) = &holding
                && let Some(value) = line.strip_prefix("THPeligible:")
            {
                return Some((range.clone(), value.trim().to_owned()));
            }
        }
        None
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn large_buffers_are_offered_huge_pages_and_unmapped_when_dropped() {
        let setting = transparent_huge_pages();
        if !matches!(setting.as_deref(), Some("always" | "madvise")) {
            println!("skipped: transparent huge pages are off here (setting: {setting:?})");
            return;
        }
        let mut buffer = AlignedBuffer::zeroed(4 * HUGE_FLOATS);
        buffer.fill(1.0);
        let at = buffer.as_ptr() as usize;
        // The advice splits off the buffer's four huge pages as a mapping of their own.
        let advised = at..at + 4 * HUGE_FLOATS * 4;
        assert_eq!(mapping_at(at), Some((advised.clone(), "1".to_owned())), "at {at:#x}");
        drop(buffer);
        let after = mapping_at(at).map(|(range, _)| range);
        assert_ne!(after, Some(advised), "the buffer's pages outlived it");
    }
}
