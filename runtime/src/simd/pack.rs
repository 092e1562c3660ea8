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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_land_where_the_layout_says() {
        // 3 rows of 20 floats, 25 apart, into panels 3 deep: columns 16..20 in the second panel.
        let src: Vec<f32> = (0..75).map(|x| x as f32).collect();
        let (rows, width, src_row) = (3, 20, 25);
        let mut panels = vec![-1.0f32; 2 * PANEL * rows];
        let mut row_major = vec![-1.0f32; rows * width];
        // SAFETY: src holds 3 rows of 25 floats; panels holds 2 panels of 3 x 16, row_major 3 x 20.
        unsafe {
            pack_rows(rows, width, src.as_ptr(), src_row, panels.as_mut_ptr(), PANEL, PANEL * rows);
            pack_rows(rows, width, src.as_ptr(), src_row, row_major.as_mut_ptr(), width, PANEL);
        }
        for r in 0..rows {
            for c in 0..width {
                let want = src[r * src_row + c];
                assert_eq!(panels[c / PANEL * PANEL * rows + r * PANEL + c % PANEL], want);
                assert_eq!(row_major[r * width + c], want);
            }
        }
    }

    #[test]
    fn columns_are_transposed_and_scaled() {
        // 2 rows of 3 floats into columns 15 and 16 of a tile 3 deep: they straddle two panels.
        let src = [1.0f32, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0];
        let mut tile = vec![0.0f32; 2 * PANEL * 3];
        // SAFETY: src holds 2 rows of 3 floats, 4 apart; the tile holds two panels 3 deep.
        unsafe { pack_columns(2, 3, src.as_ptr(), 4, 0.5, tile.as_mut_ptr(), 15, PANEL * 3) };
        for (column, row) in [(15, [0.5, 1.0, 1.5]), (16, [2.0, 2.5, 3.0])] {
            for (c, want) in row.into_iter().enumerate() {
                assert_eq!(tile[column / PANEL * PANEL * 3 + c * PANEL + column % PANEL], want);
            }
        }
    }
}
