//! Each thread's reused buffers — work-item scratch and states, run- and call-packed K/V,
//! absorbed MLA's latent buffers — every one handed out from a 64-byte line, grown as calls
//! need and kept between calls up to a limit.

use std::cell::RefCell;

use attngen_codegen::abi::ALIGN_FLOATS;

thread_local! {
    /// Each thread's work-item buffers, reused across items and calls: allocating them per item
    /// cost page faults, and with glibc's mmap threshold an unmap (a TLB shootdown on every
    /// core) per item. Generated code writes every scratch and state element before reading it,
    /// so the buffer is never cleared.
    static WORKSPACE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's workspace, grown to at least `len` floats. `f` must not re-enter
/// (it runs generated code, which never calls back into the runtime).
///
/// Work items run inside the pool, where a failure could no longer leave `out` untouched: like
/// `Vec`, this aborts when memory runs out. Their buffers are tile-sized, except an expanded
/// MLA task's up-projected keys: a run's (`plan::SHARED_RUN_BYTES`), or a range read whole (its
/// keys × (D + Dv) floats, the size of one head's K and V).
pub(super) fn with_workspace<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    WORKSPACE.with(|workspace| {
        f(aligned(&mut workspace.borrow_mut(), len).unwrap_or_else(|| out_of_memory(len)))
    })
}

/// `len` floats of `buffer` from its first 64-byte boundary ([`ALIGN_FLOATS`] floats), growing
/// it as needed: the plan lays out the scratch, state and packed buffers in whole cache lines
/// from their start, which the allocator aligns only to 16 bytes. `None` when the memory
/// cannot be had; `buffer` is unchanged then.
fn aligned(buffer: &mut Vec<f32>, len: usize) -> Option<&mut [f32]> {
    let needed = len.checked_add(ALIGN_FLOATS - 1)?;
    if let Some(more) = needed.checked_sub(buffer.len()).filter(|&more| more > 0) {
        buffer.try_reserve_exact(more).ok()?;
        buffer.resize(needed, 0.0);
    }
    let skip = crate::aligned::floats_to_line(buffer);
    Some(&mut buffer[skip..skip + len])
}

thread_local! {
    /// The call-level packed K/V of the calls made from this thread, reused across calls.
    pub(super) static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Absorbed MLA's `latent_q` and `latent_out` of the calls made from this thread.
    pub(super) static LATENT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The states of the tasks this thread runs whose keys are divided — a decode task's
    /// splits, a long prefill's query tiles across runs — reused across tasks and calls: a
    /// fresh zeroed buffer per task (megabytes for long contexts) cost page faults and an unmap
    /// per task. Every state element is written (InitState, by the first run) before it is
    /// read.
    pub(super) static SPLIT_STATES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Floats a thread keeps in each of its reused call buffers between calls (128 MB); larger
/// calls allocate their own buffer and free it when they return, so a single long prefill does
/// not pin its copy.
const KEPT_FLOATS: usize = 1 << 25;

/// Runs `f` on this thread's `buffer`, grown to at least `len` floats; a nested use on the
/// same thread (rayon may run another task here while this one waits) or one larger than
/// [`KEPT_FLOATS`] gets a fresh buffer. `None`, without running `f`, when the memory cannot be
/// had.
pub(super) fn with_kept<R>(
    buffer: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> Option<R> {
    if len > KEPT_FLOATS {
        return aligned(&mut Vec::new(), len).map(f);
    }
    buffer.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => aligned(&mut kept, len).map(f),
        Err(_) => aligned(&mut Vec::new(), len).map(f),
    })
}

/// [`with_kept`] inside the pool, where a failure aborts ([`with_workspace`]).
pub(super) fn with_kept_in_pool<R>(
    buffer: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    with_kept(buffer, len, f).unwrap_or_else(|| out_of_memory(len))
}

/// The allocator's out-of-memory abort, as `Vec` would raise it, for a buffer of `len` floats.
fn out_of_memory(len: usize) -> ! {
    let bytes = len.saturating_add(ALIGN_FLOATS - 1).saturating_mul(size_of::<f32>());
    let bytes = bytes.min(isize::MAX as usize / size_of::<f32>() * size_of::<f32>());
    let layout = std::alloc::Layout::from_size_align(bytes, align_of::<f32>());
    std::alloc::handle_alloc_error(layout.unwrap_or(std::alloc::Layout::new::<f32>()))
}

#[cfg(test)]
mod tests {
    use super::{ALIGN_FLOATS, PACKED, WORKSPACE, aligned, with_kept, with_workspace};

    fn starts_a_line(slice: &[f32]) -> bool {
        (slice.as_ptr() as usize).is_multiple_of(ALIGN_FLOATS * size_of::<f32>())
    }

    /// Whatever the allocator returned, and as the buffer grows, the slice handed out starts
    /// on a cache line and holds exactly the floats asked for.
    #[test]
    fn buffers_start_on_a_cache_line() {
        let mut buffer = Vec::new();
        for len in [0, 1, 17, 1000, 5, 70_000, 3] {
            let slice = aligned(&mut buffer, len).expect("a small buffer");
            assert_eq!(slice.len(), len);
            assert!(starts_a_line(slice), "len {len}");
        }
        // Fresh small buffers land anywhere on the allocator's 16-byte grid.
        for len in 1..64 {
            let mut fresh = Vec::new();
            let slice = aligned(&mut fresh, len).expect("a small buffer");
            assert!(starts_a_line(slice) && slice.len() == len);
        }
        for len in [1, 33, 4097] {
            with_workspace(len, |work| assert!(starts_a_line(work) && work.len() == len));
            let kept = with_kept(&PACKED, len, |kept| starts_a_line(kept) && kept.len() == len);
            assert_eq!(kept, Some(true));
        }
        // Nested: the inner use gets a fresh buffer, aligned too.
        let nested = with_kept(&PACKED, 8, |_| {
            with_kept(&PACKED, 9, |inner| starts_a_line(inner) && inner.len() == 9)
        });
        assert_eq!(nested, Some(Some(true)));
        WORKSPACE.with(|w| assert!(w.borrow().len() >= 4097));
    }

    /// A call buffer no allocator can give (its bytes overflow `isize`, or its floats `usize`)
    /// is refused, leaving the kept buffer as it was, and the call never runs: `Kernel::run`
    /// turns that into `Error::TooLarge` before writing anything.
    #[test]
    fn buffers_beyond_memory_are_refused() {
        for len in [usize::MAX / 8, usize::MAX - 3, usize::MAX] {
            let mut buffer = vec![1.0; 40];
            assert!(aligned(&mut buffer, len).is_none(), "len {len}");
            assert_eq!(buffer, [1.0; 40]);
            assert_eq!(with_kept(&PACKED, len, |_| unreachable!("never runs")), None::<()>);
        }
        // The kept buffer still serves the next call.
        assert_eq!(with_kept(&PACKED, 100, |kept| kept.len()), Some(100));
    }
}
