//! The tile max of a score tile, down its columns.

use attngen_codegen::abi::MAX_PARTIALS;

use super::Simd;

/// See [`super::ColumnMax`]: per vector of columns (the last one masked to the columns that
/// exist), [`MAX_PARTIALS`] partial maxima down the keys, combined pairwise. `Simd::max(p, s)`
/// is `p > s ? p : s`, the ABI's step `s < p ? p : s`, and `Simd::max(a, b)` its pairwise
/// `b < a ? a : b`: every ISA gives the generated pass's result, NaN included.
///
/// # Safety
/// `S`'s features are enabled; `s` holds `keys` rows of stride `ld` with `columns` floats
/// each; `max` holds `columns` writable floats.
#[inline(always)]
pub(super) unsafe fn column_max<S: Simd>(
    keys: usize,
    columns: usize,
    s: *const f32,
    ld: usize,
    max: *mut f32,
) {
    // SAFETY: every access: the block at column c covers columns c..c + LANES, masked to the
    // `columns` that exist, of rows j < keys of s, and the same columns of max.
    unsafe {
        let whole = keys - keys % MAX_PARTIALS;
        let mut c = 0;
        while c < columns {
            let mask = S::mask(columns - c);
            let full = columns - c >= S::LANES;
            let column = s.add(c);
            let load = |j: usize| match full {
                true => S::load(column.add(j * ld)),
                false => S::load_masked(column.add(j * ld), mask),
            };
            let mut partial = [S::splat(f32::NEG_INFINITY); MAX_PARTIALS];
            let mut j = 0;
            while j < whole {
                for (copy, p) in partial.iter_mut().enumerate() {
                    *p = S::max(*p, load(j + copy));
                }
                j += MAX_PARTIALS;
            }
            for j in whole..keys {
                partial[0] = S::max(partial[0], load(j));
            }
            let mut width = MAX_PARTIALS;
            while width > 1 {
                width /= 2;
                for p in 0..width {
                    partial[p] = S::max(partial[2 * p], partial[2 * p + 1]);
                }
            }
            match full {
                true => S::store(max.add(c), partial[0]),
                false => S::store_masked(max.add(c), mask, partial[0]),
            }
            c += S::LANES;
        }
    }
}
