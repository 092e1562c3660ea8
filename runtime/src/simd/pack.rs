//! Tile packing: the copies that put a tile of cache rows or query rows into the layout the
//! micro-kernels stream. The same code serves every ISA.

use attngen_codegen::abi::PANEL;

/// See [`super::PackRows`].
///
/// # Safety
/// `src` holds `rows` rows of stride `src_row` with `width` readable floats each; `dst` holds
/// every element the layout names for them.
pub unsafe extern "C" fn pack_rows(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    dst: *mut f32,
    dst_row: usize,
    dst_panel: usize,
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

// The routines have exactly the signatures generated code is compiled against.
const _: super::PackRows = pack_rows;
const _: super::PackColumns = pack_columns;
