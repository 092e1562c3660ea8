//! `C (+)= A · Bᵀ`, both row-major: register blocks of dot products, reduced four at a time.

use attngen_codegen::abi::PrefetchRows;

use super::{Prefetcher, Simd, prefetch_rows_to_l1};

/// See [`super::DotNt`].
///
/// # Safety
/// `S`'s features are enabled; `a` holds `m` rows of stride `lda` with `k` readable floats each,
/// `b` holds `n` rows of stride `ldb` with `k` floats, `c` holds `m` rows of stride `ldc` with
/// `n` writable floats, and `prefetch` is null or valid.
#[inline(always)]
pub(super) unsafe fn dot_nt<S: Simd>(
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
    prefetch: *const PrefetchRows,
) {
    // A short A (a decode item's K tile: its rows a token row apart) into L1 at once, on the
    // ISAs that ask (`Simd::PREFETCHES_SHORT_OPERANDS`).
    prefetch_rows_to_l1::<S>(a, m, lda, k);
    // A few rows of A against many of B (absorbed MLA's `o' · W_UV[h]ᵀ`: 4 rows against 128
    // weight rows from memory): compute Cᵀ = B·Aᵀ one row of B at a time, against all of A.
    // B is then read once, in address order; blocks of 3 rows of B interleave two streams in
    // every page, which the hardware prefetchers do not follow (9.5 -> 12 GB/s for W_UV[h]).
    let transpose = m <= S::NT_NR && n > m;
    let blocks = match transpose {
        true => n,
        false => m.div_ceil(S::NT_MR) * n.div_ceil(S::NT_NR),
    };
    // SAFETY: the caller passes a null or valid descriptor.
    let prefetcher = unsafe { Prefetcher::new(prefetch, blocks) };
    let accumulate = accumulate != 0;
    // SAFETY: forwarded caller contract; Cᵀ's element (j, i) is C's (i, j).
    unsafe {
        match transpose {
            true => blocks_nt::<S>(n, m, k, b, ldb, a, lda, c, (1, ldc), accumulate, prefetcher, 1),
            false => {
                let (strides, mr) = ((ldc, 1), S::NT_MR);
                blocks_nt::<S>(m, n, k, a, lda, b, ldb, c, strides, accumulate, prefetcher, mr)
            }
        }
    }
}

/// `dot_nt` in blocks of `rows_per_block` (at most `S::NT_MR`) rows of A by `S::NT_NR` of B;
/// C's element (i, j) is at `c[i·c_strides.0 + j·c_strides.1]`.
///
/// # Safety
/// As [`dot_nt`], for C addressed through `c_strides`.
#[inline(always)]
unsafe fn blocks_nt<S: Simd>(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    c_strides: (usize, usize),
    accumulate: bool,
    mut prefetcher: Option<Prefetcher>,
    rows_per_block: usize,
) {
    // SAFETY: the caller's contract (S's features are enabled).
    let tail = unsafe { S::mask(k % S::LANES) };
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(rows_per_block);
        let mut j = 0;
        while j < n {
            let nr = (n - j).min(S::NT_NR);
            if let Some(p) = &mut prefetcher {
                p.step();
            }
            // SAFETY: rows i..i+mr of A and C and rows j..j+nr of B are in bounds.
            unsafe {
                let c = c.add(i * c_strides.0 + j * c_strides.1);
                let block = NtBlock { k, a: a.add(i * lda), lda, b: b.add(j * ldb), ldb, c };
                macro_rules! block {
                    ($($mr:literal: $($nr:literal)*;)*) => {
                        match (mr, nr) {
                            $($(($mr, $nr) => block.run::<S, $mr, $nr>(c_strides, accumulate, tail),)*)*
                            _ => unreachable!("blocks are at most 4 x 4"),
                        }
                    };
                }
                block!(4: 4 3 2 1; 3: 4 3 2 1; 2: 4 3 2 1; 1: 4 3 2 1;);
            }
            j += nr;
        }
        i += mr;
    }
}

/// One block's operands, offset to the block.
#[derive(Clone, Copy)]
struct NtBlock {
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
}

impl NtBlock {
    /// MR·NR dot products of length k, `S::LANES` at a time (the tail masked), then reduced four
    /// at a time.
    ///
    /// # Safety
    /// MR rows of A and NR of B with k floats each, and C's block, are in bounds; `tail`
    /// selects `k % LANES` lanes.
    #[inline(always)]
    // Index loops: each step pairs every A row with every B row across two arrays.
    #[allow(clippy::needless_range_loop)]
    unsafe fn run<S: Simd, const MR: usize, const NR: usize>(
        self,
        c_strides: (usize, usize),
        accumulate: bool,
        tail: S::Mask,
    ) {
        let NtBlock { k, a, lda, b, ldb, c } = self;
        // SAFETY: every access in the body: p + LANES <= k in the loop and the tail is masked to
        // the valid lanes; C's block is in bounds.
        unsafe {
            let mut acc = [[S::zero(); NR]; MR];
            let mut p = 0;
            while p + S::LANES <= k {
                let av: [S::V; MR] = std::array::from_fn(|i| S::load(a.add(i * lda + p)));
                for j in 0..NR {
                    let bv = S::load(b.add(j * ldb + p));
                    for i in 0..MR {
                        acc[i][j] = S::mul_acc(av[i], bv, acc[i][j]);
                    }
                }
                p += S::LANES;
            }
            if p < k {
                let av: [S::V; MR] =
                    std::array::from_fn(|i| S::load_masked(a.add(i * lda + p), tail));
                for j in 0..NR {
                    let bv = S::load_masked(b.add(j * ldb + p), tail);
                    for i in 0..MR {
                        acc[i][j] = S::mul_acc(av[i], bv, acc[i][j]);
                    }
                }
            }
            // Reduce four accumulators at a time; the padding stays zero.
            let mut flat = [S::zero(); 16];
            for i in 0..MR {
                for j in 0..NR {
                    flat[i * NR + j] = acc[i][j];
                }
            }
            let mut sums = [0.0f32; 16];
            for q in (0..MR * NR).step_by(4) {
                let four = [flat[q], flat[q + 1], flat[q + 2], flat[q + 3]];
                sums[q..q + 4].copy_from_slice(&S::hsum4(four));
            }
            for i in 0..MR {
                for j in 0..NR {
                    let dst = c.add(i * c_strides.0 + j * c_strides.1);
                    let s = sums[i * NR + j];
                    *dst = if accumulate { *dst + s } else { s };
                }
            }
        }
    }
}
