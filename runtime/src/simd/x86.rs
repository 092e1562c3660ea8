//! AVX2 + FMA micro-kernels: register-blocked over 256-bit vectors, any m, n, k (remainders by
//! smaller blocks and masked loads and stores).

use std::arch::x86_64::*;

// Block sizes keep every accumulator in a register: 16 ymm registers hold the MR·NR
// accumulators plus the operands of one step (dot_nt: 3·3 + 3 rows of A + 1 of B = 13;
// dot_nn: 6·2 + 2 of B + 1 broadcast = 15). One more and LLVM spills in the hot loop.
/// Rows of A per `dot_nt` block.
const NT_MR: usize = 3;
/// Rows of B per `dot_nt` block.
const NT_NR: usize = 3;
/// Rows of A per `dot_nn` block.
const NN_MR: usize = 6;
/// 8-float vectors of C's columns per `dot_nn` block.
const NN_NR: usize = 2;

/// A mask selecting the first `len` (0..=8) lanes, for `maskload`/`maskstore`.
#[inline(always)]
fn lanes(len: usize) -> __m256i {
    const TABLE: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: 8 - len is in 0..=8, so the 8 loaded i32s lie inside TABLE.
    unsafe { _mm256_loadu_si256(TABLE.as_ptr().add(8 - len.min(8)).cast()) }
}

/// See [`super::DotNt`].
///
/// # Safety
/// The CPU supports AVX2 and FMA; buffers as for [`super::portable::dot_nt`].
pub unsafe extern "C" fn dot_nt(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: usize,
) {
    // SAFETY: forwarded caller contract.
    unsafe { dot_nt_avx2(m, n, k, a, lda, b, ldb, c, ldc, accumulate != 0) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_nt_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let tail = lanes(k % 8);
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(NT_MR);
        let mut j = 0;
        while j < n {
            let nr = (n - j).min(NT_NR);
            // SAFETY: rows i..i+mr of A and C and rows j..j+nr of B are in bounds.
            unsafe {
                let (a, b, c) = (a.add(i * lda), b.add(j * ldb), c.add(i * ldc + j));
                macro_rules! block {
                    ($($mr:literal, $nr:literal);*) => {
                        match (mr, nr) {
                            $(($mr, $nr) => nt_block::<$mr, $nr>(k, a, lda, b, ldb, c, ldc, accumulate, tail),)*
                            _ => unreachable!("block sizes are at most {NT_MR} x {NT_NR}"),
                        }
                    };
                }
                block!(3, 3; 3, 2; 3, 1; 2, 3; 2, 2; 2, 1; 1, 3; 1, 2; 1, 1);
            }
            j += nr;
        }
        i += mr;
    }
}

/// One MR × NR block of `dot_nt`: MR·NR dot products of length k, 8 lanes at a time, then
/// reduced four at a time with horizontal adds.
#[target_feature(enable = "avx2,fma")]
// Index loops: each step pairs every A row with every B row across two arrays.
#[allow(clippy::needless_range_loop)]
unsafe fn nt_block<const MR: usize, const NR: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tail: __m256i,
) {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut p = 0;
    // SAFETY (loads): p + 8 <= k in the loop, and the tail is masked to the k % 8 valid lanes.
    unsafe {
        while p + 8 <= k {
            let mut av = [_mm256_setzero_ps(); MR];
            for (i, v) in av.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(a.add(i * lda + p));
            }
            for j in 0..NR {
                let bv = _mm256_loadu_ps(b.add(j * ldb + p));
                for i in 0..MR {
                    acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
                }
            }
            p += 8;
        }
        if p < k {
            let mut av = [_mm256_setzero_ps(); MR];
            for (i, v) in av.iter_mut().enumerate() {
                *v = _mm256_maskload_ps(a.add(i * lda + p), tail);
            }
            for j in 0..NR {
                let bv = _mm256_maskload_ps(b.add(j * ldb + p), tail);
                for i in 0..MR {
                    acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
                }
            }
        }
    }
    // Reduce four accumulators to four sums at once: two rounds of hadd, then fold the halves.
    let mut sums = [0.0f32; 12];
    let flat: [__m256; 12] = {
        // MR·NR <= 9 here; the rest stay zero so every group of four is complete.
        let mut flat = [_mm256_setzero_ps(); 12];
        for i in 0..MR {
            for j in 0..NR {
                flat[i * NR + j] = acc[i][j];
            }
        }
        flat
    };
    for q in (0..MR * NR).step_by(4) {
        let h01 = _mm256_hadd_ps(flat[q], flat[q + 1]);
        let h23 = _mm256_hadd_ps(flat[q + 2], flat[q + 3]);
        let h = _mm256_hadd_ps(h01, h23);
        let folded = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        // SAFETY: q + 4 <= 12.
        unsafe { _mm_storeu_ps(sums.as_mut_ptr().add(q), folded) };
    }
    for i in 0..MR {
        for j in 0..NR {
            // SAFETY: C's block is in bounds (the caller's contract).
            unsafe {
                let dst = c.add(i * ldc + j);
                let s = sums[i * NR + j];
                *dst = if accumulate { *dst + s } else { s };
            }
        }
    }
}

/// See [`super::DotNn`].
///
/// # Safety
/// The CPU supports AVX2 and FMA; buffers as for [`super::portable::dot_nn`].
pub unsafe extern "C" fn dot_nn(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: usize,
    row_range: *const i32,
) {
    // SAFETY: forwarded caller contract.
    unsafe { dot_nn_avx2(m, n, k, a, lda, b, ldb, c, ldc, accumulate != 0, row_range) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_nn_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    row_range: *const i32,
) {
    let mut i = 0;
    while i < m {
        // With per-row key ranges each row is its own block.
        let (mr, lo, hi) = if row_range.is_null() {
            ((m - i).min(NN_MR), 0, k)
        } else {
            // SAFETY: the table has 2·m entries and i < m.
            let (lo, hi) = unsafe { super::row_keys(row_range, m, i, k) };
            (1, lo, hi)
        };
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(8 * NN_NR);
            let nr = cols.div_ceil(8);
            let masked = !cols.is_multiple_of(8);
            let tail = lanes(cols - 8 * (nr - 1));
            // SAFETY: rows i..i+mr of A and C, columns j..j+cols of B and C, keys lo..hi < k.
            unsafe {
                let (a, b, c) = (a.add(i * lda), b.add(j), c.add(i * ldc + j));
                macro_rules! block {
                    ($($mr:literal, $nr:literal);*) => {
                        match (mr, nr, masked) {
                            $(
                                ($mr, $nr, false) => nn_block::<$mr, $nr, false>(lo, hi, a, lda, b, ldb, c, ldc, accumulate, tail),
                                ($mr, $nr, true) => nn_block::<$mr, $nr, true>(lo, hi, a, lda, b, ldb, c, ldc, accumulate, tail),
                            )*
                            _ => unreachable!("block sizes are at most {NN_MR} x {NN_NR}"),
                        }
                    };
                }
                block!(6, 2; 6, 1; 5, 2; 5, 1; 4, 2; 4, 1; 3, 2; 3, 1; 2, 2; 2, 1; 1, 2; 1, 1);
            }
            j += cols;
        }
        i += mr;
    }
}

/// One MR-row × NR-vector block of `dot_nn` over keys `lo..hi`; with MASKED the last vector
/// holds only the lanes `tail` selects.
#[target_feature(enable = "avx2,fma")]
unsafe fn nn_block<const MR: usize, const NR: usize, const MASKED: bool>(
    lo: usize,
    hi: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tail: __m256i,
) {
    // SAFETY (all pointer access): the caller passes in-bounds blocks, and the last vector of a
    // MASKED block touches only the lanes of columns that exist.
    unsafe {
        let load = |ptr: *const f32, v: usize| {
            if MASKED && v == NR - 1 { _mm256_maskload_ps(ptr, tail) } else { _mm256_loadu_ps(ptr) }
        };
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = load(c.add(i * ldc + 8 * v), v);
                }
            }
        }
        for p in lo..hi {
            let mut bv = [_mm256_setzero_ps(); NR];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = load(b.add(p * ldb + 8 * v), v);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let weight = _mm256_broadcast_ss(&*a.add(i * lda + p));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(weight, bv[v], *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let ptr = c.add(i * ldc + 8 * v);
                if MASKED && v == NR - 1 {
                    _mm256_maskstore_ps(ptr, tail, *x);
                } else {
                    _mm256_storeu_ps(ptr, *x);
                }
            }
        }
    }
}
