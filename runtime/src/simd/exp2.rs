//! The exponentials of a score tile: `P = 2^(s − m)` in place, with their column sums.

use attngen_codegen::abi::exp2::{FLOOR, POLY, ROUNDER};

use super::Simd;

/// `2^x` per lane, exactly as `attngen_codegen::abi::exp2` specifies.
///
/// # Safety
/// `S`'s features are enabled.
#[inline(always)]
unsafe fn exp2<S: Simd>(x: S::V) -> S::V {
    // SAFETY: the caller's contract.
    unsafe {
        // `max` returns its second operand when either is NaN: a NaN x stays NaN.
        let x = S::max(S::splat(FLOOR), x);
        let rounder = S::splat(ROUNDER);
        let t = S::add(x, rounder);
        let f = S::sub(x, S::sub(t, rounder));
        // Horner's rule, written out: the compiler keeps a loop over a chained iterator.
        let step = |poly, c| S::mul_add(poly, f, S::splat(c));
        let poly = step(S::splat(POLY[5]), POLY[4]);
        let poly = step(step(step(poly, POLY[3]), POLY[2]), POLY[1]);
        let poly = step(step(poly, POLY[0]), 1.0);
        S::mul(poly, S::pow2_of_rounded(t))
    }
}

/// See [`super::Exp2Columns`]: blocks of two vectors (two independent polynomial chains per
/// key), then one, then a masked one for the last columns.
///
/// # Safety
/// `S`'s features are enabled; `s` holds `keys` rows of stride `ld` with `columns` writable
/// floats each; `m` and `l` hold `columns` floats (`l` writable).
#[inline(always)]
pub(super) unsafe fn exp2_columns<S: Simd>(
    keys: usize,
    columns: usize,
    s: *mut f32,
    ld: usize,
    m: *const f32,
    l: *mut f32,
) {
    let lanes = S::LANES;
    // SAFETY: every access in the function: each block covers columns c..c + width <= columns of
    // the rows j < keys of s, and of m and l, which the caller guarantees; the last block is masked
    // to the columns that exist.
    unsafe {
        let all = S::mask(lanes);
        let mut c = 0;
        while c + 2 * lanes <= columns {
            column_block::<S, 2>(keys, s.add(c), ld, m.add(c), l.add(c), all);
            c += 2 * lanes;
        }
        if c + lanes <= columns {
            column_block::<S, 1>(keys, s.add(c), ld, m.add(c), l.add(c), all);
            c += lanes;
        }
        if c < columns {
            let tail = S::mask(columns - c);
            column_block::<S, 1>(keys, s.add(c), ld, m.add(c), l.add(c), tail);
        }
    }
}

/// [`exp2_columns`] over `V` vectors of columns, each with its own running sum; the last
/// vector holds the lanes `last` selects.
///
/// # Safety
/// `s` holds `keys` rows of stride `ld` with the block's floats each; `m` and `l` hold them.
#[inline(always)]
unsafe fn column_block<S: Simd, const V: usize>(
    keys: usize,
    s: *mut f32,
    ld: usize,
    m: *const f32,
    l: *mut f32,
    last: S::Mask,
) {
    // SAFETY: v < V and j < keys stay inside the block the caller vouches for, the last
    // vector masked.
    unsafe {
        let load = |p: *const f32, v: usize| {
            if v == V - 1 { S::load_masked(p, last) } else { S::load(p) }
        };
        let store = |p: *mut f32, v: usize, x: S::V| {
            if v == V - 1 { S::store_masked(p, last, x) } else { S::store(p, x) }
        };
        let m: [S::V; V] = std::array::from_fn(|v| load(m.add(v * S::LANES), v));
        let mut sums = [S::zero(); V];
        for j in 0..keys {
            let row = s.add(j * ld);
            for v in 0..V {
                let p = exp2::<S>(S::sub(load(row.add(v * S::LANES), v), m[v]));
                store(row.add(v * S::LANES), v, p);
                sums[v] = S::add(sums[v], p);
            }
        }
        for (v, sum) in sums.into_iter().enumerate() {
            let at = l.add(v * S::LANES);
            store(at, v, S::add(load(at, v), sum));
        }
    }
}
