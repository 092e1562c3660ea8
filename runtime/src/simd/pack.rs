//! Tile packing: the copies that put a tile of cache rows or query rows into the layout the
//! micro-kernels stream, and the software prefetch of the next key tile.
//!
//! Cache rows of one KV head lie `kv_heads · D` floats apart — a page apart for common shapes —
//! and hardware prefetchers stop at page boundaries, so without help every row of a tile is a
//! demand miss. [`pack_rows`] therefore prefetches the rows of the following tile while the
//! current one is computed. The same code serves every ISA: `prefetcht0` is baseline x86-64.

use attngen_codegen::abi::PANEL;

/// Bytes per cache line, the prefetch granularity.
const LINE: usize = 64;

/// See [`super::PackRows`].
///
/// # Safety
/// `src` holds `rows` rows of stride `src_row` with `width` readable floats each; `dst` holds
/// every element the layout names for them. `next` may point anywhere: it is only prefetched.
pub unsafe extern "C" fn pack_rows(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    dst: *mut f32,
    dst_row: usize,
    dst_panel: usize,
    next: *const f32,
    next_rows: usize,
) {
    for r in 0..rows {
        // SAFETY (whole loop): row r, columns 0..width exist in src and, by the layout, in
        // dst; the two never overlap (cache tensors vs scratch).
        unsafe {
            let from = src.add(r * src_row);
            if dst_panel == PANEL {
                // Row-major: one contiguous row.
                std::ptr::copy_nonoverlapping(from, dst.add(r * dst_row), width);
                continue;
            }
            let whole = width / PANEL * PANEL;
            for first in (0..whole).step_by(PANEL) {
                let chunk = from.add(first).cast::<[f32; PANEL]>().read_unaligned();
                let to = dst.add(first / PANEL * dst_panel + r * dst_row);
                to.cast::<[f32; PANEL]>().write_unaligned(chunk);
            }
            if whole < width {
                let to = dst.add(whole / PANEL * dst_panel + r * dst_row);
                std::ptr::copy_nonoverlapping(from.add(whole), to, width - whole);
            }
        }
    }
    for r in 0..next_rows {
        let row = next.wrapping_add(r * src_row).cast::<u8>();
        for byte in (0..width * 4).step_by(LINE) {
            prefetch(row.wrapping_add(byte));
        }
    }
}

/// See [`super::PackColumns`].
///
/// # Safety
/// `src` holds `rows` rows of stride `src_row` with `width` readable floats each; `dst` holds
/// every element the layout names for columns `first_column..first_column + rows`.
pub unsafe extern "C" fn pack_columns(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    factor: f32,
    dst: *mut f32,
    first_column: usize,
    dst_panel: usize,
) {
    for r in 0..rows {
        let column = first_column + r;
        // SAFETY: as documented; row r of src has width floats.
        let row = unsafe { std::slice::from_raw_parts(src.add(r * src_row), width) };
        // SAFETY: column `column`'s panel holds width rows of PANEL floats.
        let to = unsafe { dst.add(column / PANEL * dst_panel + column % PANEL) };
        for (c, &x) in row.iter().enumerate() {
            // SAFETY: c < width, inside the column's panel.
            unsafe { *to.add(c * PANEL) = factor * x };
        }
    }
}

/// Asks for the cache line at `at`; never faults, whatever the address.
#[inline(always)]
fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint with no architectural effect; any address is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

// The routines have exactly the signatures generated code is compiled against.
const _: super::PackRows = pack_rows;
const _: super::PackColumns = pack_columns;
