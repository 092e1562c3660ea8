//! Tile packing: the copies that put a tile of cache rows or query rows into the layout the
//! micro-kernels stream.

use attngen_codegen::abi::PANEL;

use super::Simd;

/// See [`super::PackRows`]: a plain copy, the same on every ISA.
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
        // SAFETY: every access in the loop: row r, columns 0..width exist in src and, by the
        // layout, in dst; the two never overlap (cache tensors vs scratch).
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

/// See [`super::PackColumns`]: runs of four rows that start on a multiple of four columns are
/// scaled and transposed `4 × LANES` in registers; the rest is copied element by element.
/// Up to [`RUNS_TOGETHER`] runs walk the width together, so each line of a panel is written
/// whole within a few stores and that many source rows stream at once.
///
/// # Safety
/// `S`'s features are enabled; `src` holds `rows` rows of stride `src_row` with `width`
/// readable floats each; `dst` holds every element the layout names for columns
/// `first_column..first_column + rows`.
/// Runs of four rows [`pack_columns`] transposes in step: a panel's worth (16 columns), whose
/// lines each take one store from every run. Walking one run at a time over the whole width,
/// W6's weight transposition took 1.3–1.5× the time and its query packing 1.1× (one thread,
/// medians of 20 calls); in the kernels, 0.99× the time, within the noise.
const RUNS_TOGETHER: usize = PANEL / 4;

#[inline(always)]
pub(super) unsafe fn pack_columns<S: Simd>(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    factor: f32,
    dst: *mut f32,
    first_column: usize,
    dst_panel: usize,
    dst_row: usize,
) {
    // Rows before the first column on a multiple of 4, and after the last whole run of 4.
    let head = ((4 - first_column % 4) % 4).min(rows);
    let runs_end = head + (rows - head) / 4 * 4;
    let whole = width / S::LANES * S::LANES;
    // SAFETY: every access in the function: rows r < rows and columns c < width of src, and the
    // panel elements of columns first_column + r, depths c < width, of dst, as the caller
    // guarantees.
    unsafe {
        let scale = S::splat(factor);
        scalar_columns(head, width, src, src_row, factor, dst, first_column, (dst_panel, dst_row));
        // Run r's first column, and where it goes (four columns on a multiple of 4 never
        // straddle a panel).
        let run = |r: usize| {
            (
                src.add(r * src_row),
                dst.add((first_column + r) / PANEL * dst_panel + (first_column + r) % PANEL),
            )
        };
        for group in (head..runs_end).step_by(4 * RUNS_TOGETHER) {
            let group_end = (group + 4 * RUNS_TOGETHER).min(runs_end);
            for c in (0..whole).step_by(S::LANES) {
                for r in (group..group_end).step_by(4) {
                    let (from, to) = run(r);
                    let rows =
                        std::array::from_fn(|i| S::mul(scale, S::load(from.add(i * src_row + c))));
                    S::store_transposed4(rows, to.add(c * dst_row), dst_row);
                }
            }
            if whole < width {
                for r in (group..group_end).step_by(4) {
                    // Depths whole.. of these four columns: the same layout, shifted by
                    // `whole` rows of each panel.
                    let (from, to) = run(r);
                    let (src_rest, to_rest) = (from.add(whole), to.add(whole * dst_row));
                    scalar_columns(
                        4,
                        width - whole,
                        src_rest,
                        src_row,
                        factor,
                        to_rest,
                        0,
                        (dst_panel, dst_row),
                    );
                }
            }
        }
        let rest = rows - runs_end;
        let (src_rest, column_rest) = (src.add(runs_end * src_row), first_column + runs_end);
        scalar_columns(
            rest,
            width,
            src_rest,
            src_row,
            factor,
            dst,
            column_rest,
            (dst_panel, dst_row),
        );
    }
}

/// [`super::PackColumns`] element by element.
///
/// # Safety
/// As [`pack_columns`].
#[inline(always)]
unsafe fn scalar_columns(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    factor: f32,
    dst: *mut f32,
    first_column: usize,
    (dst_panel, dst_row): (usize, usize),
) {
    for r in 0..rows {
        let column = first_column + r;
        // SAFETY: as documented; row r of src has width floats.
        let row = unsafe { std::slice::from_raw_parts(src.add(r * src_row), width) };
        // SAFETY: column `column`'s panel holds width depths, dst_row floats apart.
        let to = unsafe { dst.add(column / PANEL * dst_panel + column % PANEL) };
        for (c, &x) in row.iter().enumerate() {
            // SAFETY: c < width, inside the column's panel.
            unsafe { *to.add(c * dst_row) = factor * x };
        }
    }
}

// The routine has exactly the signature generated code is compiled against.
const _: super::PackRows = pack_rows;

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
}
