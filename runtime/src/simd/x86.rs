//! AVX2 + FMA micro-kernels: register-blocked over 256-bit vectors, any m, n, k (remainders by
//! smaller blocks and masked loads and stores).

use std::arch::x86_64::*;

use attngen_codegen::abi::{PANEL, PrefetchRows};

// Block sizes keep every accumulator in a register: 16 ymm registers hold the MR·NR
// accumulators plus the operands of one step (dot_nt: 3·4 + 3 rows of A + 1 of B = 16;
// dot_nn: 6·2 + 2 of B + 1 broadcast = 15). One more and LLVM spills in the hot loop.
/// Rows of A per `dot_nt` block.
const NT_MR: usize = 3;
/// Rows of B per `dot_nt` block.
const NT_NR: usize = 4;
/// Rows of A per `dot_nn` block.
const NN_MR: usize = 6;
/// 8-float vectors of C's columns per `dot_nn` block.
const NN_NR: usize = 2;
/// Keys `dot_nn` sums in registers before adding the partial sums to C.
const NN_KC: usize = super::SUM_CHUNK;
/// Keys per chunk when C is one row block (see [`nn_one_row_block`]).
const ONE_BLOCK_KC: usize = 8;

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
    prefetch: *const PrefetchRows,
) {
    // A few rows of A against many of B (absorbed MLA's `o' · W_UV[h]ᵀ`: 4 rows against 128
    // weight rows from memory): compute Cᵀ = B·Aᵀ one row of B at a time, against all of A.
    // B is then read once, in address order; blocks of 3 rows of B interleave two streams in
    // every page, which the hardware prefetchers do not follow (9.5 -> 12 GB/s for W_UV[h]).
    let transpose = m <= NT_NR && n > m;
    let blocks = match transpose {
        true => n,
        false => m.div_ceil(NT_MR) * n.div_ceil(NT_NR),
    };
    // SAFETY: the caller passes a null or valid descriptor.
    let prefetcher = unsafe { super::Prefetcher::new(prefetch, blocks) };
    let accumulate = accumulate != 0;
    // SAFETY: forwarded caller contract; Cᵀ's element (j, i) is C's (i, j).
    unsafe {
        match transpose {
            true => dot_nt_avx2(n, m, k, b, ldb, a, lda, c, (1, ldc), accumulate, prefetcher, 1),
            false => {
                dot_nt_avx2(m, n, k, a, lda, b, ldb, c, (ldc, 1), accumulate, prefetcher, NT_MR)
            }
        }
    }
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
    c_strides: (usize, usize),
    accumulate: bool,
    mut prefetcher: Option<super::Prefetcher>,
    rows_per_block: usize,
) {
    let tail = lanes(k % 8);
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(rows_per_block);
        let mut j = 0;
        while j < n {
            let nr = (n - j).min(NT_NR);
            if let Some(p) = &mut prefetcher {
                p.step();
            }
            // SAFETY: rows i..i+mr of A and C and rows j..j+nr of B are in bounds.
            unsafe {
                let c = c.add(i * c_strides.0 + j * c_strides.1);
                let (a, b) = (a.add(i * lda), b.add(j * ldb));
                macro_rules! block {
                    ($($mr:literal, $nr:literal);*) => {
                        match (mr, nr) {
                            $(($mr, $nr) => nt_block::<$mr, $nr>(k, a, lda, b, ldb, c, c_strides, accumulate, tail),)*
                            _ => unreachable!("block sizes are at most {NT_MR} x {NT_NR}"),
                        }
                    };
                }
                block!(3, 4; 3, 3; 3, 2; 3, 1; 2, 4; 2, 3; 2, 2; 2, 1; 1, 4; 1, 3; 1, 2; 1, 1);
            }
            j += nr;
        }
        i += mr;
    }
}

/// One MR × NR block of `dot_nt`: MR·NR dot products of length k, 8 lanes at a time, then
/// reduced four at a time with horizontal adds. C's element (i, j) is at
/// `c[i·c_strides.0 + j·c_strides.1]`.
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
    c_strides: (usize, usize),
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
        // MR·NR <= 12 here; the rest stay zero so every group of four is complete.
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
                let dst = c.add(i * c_strides.0 + j * c_strides.1);
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
    a_row: usize,
    a_col: usize,
    b: *const f32,
    b_row: usize,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: usize,
    row_lo: *const i32,
    row_hi: *const i32,
    prefetch: *const PrefetchRows,
) {
    let unit_stride = a_col == 1 || a_row == 1;
    if !unit_stride {
        // SAFETY: forwarded caller contract; no generated kernel passes such strides.
        return unsafe {
            super::portable::dot_nn(
                m, n, k, a, a_row, a_col, b, b_row, b_panel, c, ldc, accumulate, row_lo, row_hi,
                prefetch,
            )
        };
    }
    let nn = NnArgs {
        a,
        a_stride: if a_col == 1 { a_row } else { a_col },
        a_trans: a_col != 1,
        prefetch_a: a_col == 1 && n <= PANEL && m > NN_MR,
        b,
        b_row,
        b_panel,
        c,
        ldc,
    };
    let one_block = row_lo.is_null() && (1..=NN_MR).contains(&m);
    let blocks = match one_block {
        true => n.div_ceil(PANEL) * k.div_ceil(ONE_BLOCK_KC),
        false => n.div_ceil(PANEL) * m.div_ceil(NN_MR),
    };
    // SAFETY: the caller passes a null or valid descriptor.
    let prefetcher = unsafe { super::Prefetcher::new(prefetch, blocks) };
    let accumulate = accumulate != 0;
    // SAFETY: forwarded caller contract; `one_block` as nn_one_row_block requires.
    unsafe {
        match one_block {
            true => nn_one_row_block(m, n, k, &nn, accumulate, prefetcher),
            false => dot_nn_avx2(m, n, k, &nn, accumulate, row_lo, row_hi, prefetcher),
        }
    }
}

/// `dot_nn`'s operands with A's unit stride resolved: A is row-major (`A[i][p]` at
/// `a[i·a_stride + p]`) or, with `a_trans`, column-major (`a[p·a_stride + i]`).
struct NnArgs {
    a: *const f32,
    a_stride: usize,
    a_trans: bool,
    /// See [`NnBlock::prefetch_a`]: A is row-major and C one panel wide, so each row of A is
    /// read once, streamed (MLA decode's latent scores), and C has more than one row block, so
    /// there is a next block to prefetch for.
    prefetch_a: bool,
    b: *const f32,
    b_row: usize,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
}

const _: () = assert!(8 * NN_NR == PANEL, "a dot_nn block is one B panel wide");

impl NnArgs {
    /// The operands of the block at row `i`, column `j` (a multiple of PANEL), keys `lo..hi`.
    ///
    /// # Safety
    /// Row `i` of A and C and column `j` of B and C are in bounds.
    unsafe fn block(&self, i: usize, j: usize, lo: usize, hi: usize) -> NnBlock {
        // SAFETY: the caller's contract.
        unsafe {
            let a = if self.a_trans { self.a.add(i) } else { self.a.add(i * self.a_stride) };
            let b = self.b.add(j / PANEL * self.b_panel);
            let c = self.c.add(i * self.ldc + j);
            let (a_stride, prefetch_a) = (self.a_stride, self.prefetch_a);
            let (b_row, ldc) = (self.b_row, self.ldc);
            NnBlock { lo, hi, a, a_stride, prefetch_a, b, b_row, c, ldc }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_nn_avx2(
    m: usize,
    n: usize,
    k: usize,
    nn: &NnArgs,
    accumulate: bool,
    row_lo: *const i32,
    row_hi: *const i32,
    mut prefetcher: Option<super::Prefetcher>,
) {
    // Panel-outer, row-block-inner: a block's B panel stays in L1 across the row blocks.
    let mut j = 0;
    while j < n {
        let cols = (n - j).min(PANEL);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(NN_MR);
            if let Some(p) = &mut prefetcher {
                p.step();
            }
            // SAFETY: rows i..i+mr < m, columns j..j+cols <= n, and the row ranges (if any)
            // have m entries each.
            unsafe {
                if !row_lo.is_null() {
                    nn_ranged(nn, i, mr, j, cols, k, accumulate, row_lo, row_hi);
                } else if mr == NN_MR && cols == PANEL {
                    // The common full block, without nn_run's dispatch.
                    let block = nn.block(i, j, 0, k);
                    if nn.a_trans {
                        block.run::<NN_MR, NN_NR, false, true>(accumulate, lanes(8));
                    } else {
                        block.run::<NN_MR, NN_NR, false, false>(accumulate, lanes(8));
                    }
                } else {
                    nn_run(nn, i, mr, j, cols, 0, k, accumulate);
                }
            }
            i += mr;
        }
        j += cols;
    }
}

/// All of C when it is one row block without per-row key ranges (a decode item's few query
/// rows against a short key tile, absorbed MLA's per-head products): one dispatch, then the
/// whole panels in one loop, so each costs only its keys and its C update.
///
/// Long products run in chunks of [`ONE_BLOCK_KC`] keys, every panel per chunk: B is then read
/// a few rows at a time, in address order, instead of one 64-byte strip of every row per
/// panel, which the hardware prefetchers lose across pages (MLA's `q_nope · W_UK[h]`, 4 rows
/// against 128 × 512 weights from memory).
///
/// # Safety
/// As [`dot_nn_avx2`] without row ranges, with `1 <= m <= NN_MR`.
#[target_feature(enable = "avx2,fma")]
unsafe fn nn_one_row_block(
    m: usize,
    n: usize,
    k: usize,
    nn: &NnArgs,
    accumulate: bool,
    mut prefetcher: Option<super::Prefetcher>,
) {
    let whole = n / PANEL * PANEL;
    let mut lo = 0;
    // At least one chunk: an empty product still clears C when not accumulating.
    loop {
        let hi = k.min(lo + ONE_BLOCK_KC);
        let accumulate = accumulate || lo > 0;
        // SAFETY: rows 0..m and columns 0..n are C's, keys lo..hi <= k are A's and B's.
        unsafe {
            macro_rules! panels {
                ($($mr:literal),*) => {
                    match (m, nn.a_trans) {
                        $(
                            ($mr, false) => nn_panels::<$mr, false>(nn, whole, lo, hi, accumulate, &mut prefetcher),
                            ($mr, true) => nn_panels::<$mr, true>(nn, whole, lo, hi, accumulate, &mut prefetcher),
                        )*
                        _ => unreachable!("one row block has at most {NN_MR} rows"),
                    }
                };
            }
            panels!(6, 5, 4, 3, 2, 1);
            if whole < n {
                if let Some(p) = &mut prefetcher {
                    p.step();
                }
                nn_run(nn, 0, m, whole, n - whole, lo, hi, accumulate);
            }
        }
        lo = hi;
        if lo >= k {
            break;
        }
    }
}

/// Rows `0..MR`, the whole panels of columns `0..whole`, keys `lo..hi`.
///
/// # Safety
/// As [`nn_one_row_block`], with `MR = m`, `whole <= n` a multiple of PANEL and `hi <= k`.
#[target_feature(enable = "avx2,fma")]
unsafe fn nn_panels<const MR: usize, const A_TRANS: bool>(
    nn: &NnArgs,
    whole: usize,
    lo: usize,
    hi: usize,
    accumulate: bool,
    prefetcher: &mut Option<super::Prefetcher>,
) {
    let all = lanes(8);
    for j in (0..whole).step_by(PANEL) {
        if let Some(p) = prefetcher {
            p.step();
        }
        // SAFETY: columns j..j + PANEL <= whole of C and B, rows 0..MR of A and C, keys
        // lo..hi of A and B.
        unsafe { nn.block(0, j, lo, hi).run::<MR, NN_NR, false, A_TRANS>(accumulate, all) };
    }
}

/// Rows `i..i + mr` with per-row key ranges: the keys every row sees run as one block, the
/// ragged ends row by row, so no row ever touches a key outside its range.
///
/// # Safety
/// As [`nn_run`]; `row_lo` and `row_hi` hold an entry for every row of the block.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn nn_ranged(
    nn: &NnArgs,
    i: usize,
    mr: usize,
    j: usize,
    cols: usize,
    k: usize,
    accumulate: bool,
    row_lo: *const i32,
    row_hi: *const i32,
) {
    // SAFETY: the caller's contract covers rows i..i+mr of the tables, A, and C.
    unsafe {
        let range = |r: usize| super::row_keys(row_lo, row_hi, r, k);
        if !accumulate {
            for r in i..i + mr {
                std::ptr::write_bytes(nn.c.add(r * nn.ldc + j), 0, cols);
            }
        }
        let common = (i..i + mr).map(range).fold((0, k), |(lo, hi), (l, h)| (lo.max(l), hi.min(h)));
        if common.0 < common.1 {
            nn_run(nn, i, mr, j, cols, common.0, common.1, true);
        }
        for r in i..i + mr {
            let (lo, hi) = range(r);
            if common.0 < common.1 {
                nn_run(nn, r, 1, j, cols, lo, common.0, true);
                nn_run(nn, r, 1, j, cols, common.1, hi, true);
            } else {
                nn_run(nn, r, 1, j, cols, lo, hi, true);
            }
        }
    }
}

/// One block: rows `i..i + mr` (mr <= NN_MR), columns `j..j + cols` (cols <= PANEL, j a
/// multiple of PANEL), keys `lo..hi`. An empty key range still clears C when not accumulating.
///
/// # Safety
/// The block lies inside the operands described by `nn`; `hi <= k` of the call.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn nn_run(
    nn: &NnArgs,
    i: usize,
    mr: usize,
    j: usize,
    cols: usize,
    lo: usize,
    hi: usize,
    accumulate: bool,
) {
    if lo >= hi && accumulate {
        return;
    }
    let nr = cols.div_ceil(8);
    let masked = !cols.is_multiple_of(8);
    let tail = lanes(cols - 8 * (nr - 1));
    // SAFETY: the block's rows of A, its panel of B and its part of C are in bounds.
    unsafe {
        let block = nn.block(i, j, lo, hi);
        macro_rules! dispatch {
            ($($mr:literal),*) => {
                match (mr, nr, masked, nn.a_trans) {
                    $(
                        ($mr, 2, false, false) => block.run::<$mr, 2, false, false>(accumulate, tail),
                        ($mr, 2, true, false) => block.run::<$mr, 2, true, false>(accumulate, tail),
                        ($mr, 1, false, false) => block.run::<$mr, 1, false, false>(accumulate, tail),
                        ($mr, 1, true, false) => block.run::<$mr, 1, true, false>(accumulate, tail),
                        ($mr, 2, false, true) => block.run::<$mr, 2, false, true>(accumulate, tail),
                        ($mr, 2, true, true) => block.run::<$mr, 2, true, true>(accumulate, tail),
                        ($mr, 1, false, true) => block.run::<$mr, 1, false, true>(accumulate, tail),
                        ($mr, 1, true, true) => block.run::<$mr, 1, true, true>(accumulate, tail),
                    )*
                    _ => unreachable!("block sizes are at most {NN_MR} x {NN_NR}"),
                }
            };
        }
        dispatch!(6, 5, 4, 3, 2, 1);
    }
}

/// The operands of one `dot_nn` block, already offset to the block.
#[derive(Clone, Copy)]
struct NnBlock {
    lo: usize,
    hi: usize,
    a: *const f32,
    a_stride: usize,
    /// Row-major A read once (C one panel wide): every 16 keys, prefetch one line of each of
    /// the next block's rows of A (the MR rows after this block's), so they arrive one block
    /// ahead. A block reads MR rows in parallel a few bytes per step, which
    /// the hardware prefetchers follow too late when the rows come from memory (MLA decode's
    /// latent scores: 1.28× faster in isolation, W5 1.07×). With several panels A is re-read
    /// from cache, and prefetching there measured no gain (W1, W3) or a slight loss (W6).
    prefetch_a: bool,
    b: *const f32,
    b_row: usize,
    c: *mut f32,
    ldc: usize,
}

impl NnBlock {
    /// MR rows × NR vectors of C over keys `lo..hi`: per key, NR loads of B, MR broadcasts of
    /// A, MR·NR FMAs. With MASKED the last vector holds only the lanes `tail` selects; with
    /// A_TRANS, A is column-major.
    ///
    /// Keys are summed in chunks of [`NN_KC`] in fresh registers, each chunk then added to C:
    /// a long product (MLA's 512-wide latent scores) rounds like `KC + k/KC` additions rather
    /// than `k` in one chain.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const MR: usize, const NR: usize, const MASKED: bool, const A_TRANS: bool>(
        &self,
        accumulate: bool,
        tail: __m256i,
    ) {
        let NnBlock { lo, hi, a, a_stride, prefetch_a, b, b_row, c, ldc } = *self;
        // SAFETY (all pointer access): the caller passes an in-bounds block, and the last vector
        // of a MASKED block touches only the lanes of columns that exist.
        unsafe {
            let load = |ptr: *const f32, v: usize| {
                if MASKED && v == NR - 1 {
                    _mm256_maskload_ps(ptr, tail)
                } else {
                    _mm256_loadu_ps(ptr)
                }
            };
            let store = |ptr: *mut f32, v: usize, x: __m256| {
                if MASKED && v == NR - 1 {
                    _mm256_maskstore_ps(ptr, tail, x);
                } else {
                    _mm256_storeu_ps(ptr, x);
                }
            };
            let mut first = !accumulate;
            let mut start = lo;
            loop {
                let end = hi.min(start + NN_KC);
                let mut acc = [[_mm256_setzero_ps(); NR]; MR];
                for p in start..end {
                    if !A_TRANS && prefetch_a && p % 16 == 0 {
                        for i in MR..2 * MR {
                            super::prefetch(a.wrapping_add(i * a_stride + p).cast());
                        }
                    }
                    let mut bv = [_mm256_setzero_ps(); NR];
                    for (v, x) in bv.iter_mut().enumerate() {
                        *x = load(b.add(p * b_row + 8 * v), v);
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let at = if A_TRANS { p * a_stride + i } else { i * a_stride + p };
                        let weight = _mm256_broadcast_ss(&*a.add(at));
                        for (v, x) in row.iter_mut().enumerate() {
                            *x = _mm256_fmadd_ps(weight, bv[v], *x);
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    for (v, x) in row.iter().enumerate() {
                        let ptr = c.add(i * ldc + 8 * v);
                        let sum = if first { *x } else { _mm256_add_ps(load(ptr, v), *x) };
                        store(ptr, v, sum);
                    }
                }
                first = false;
                start = end;
                if start >= hi {
                    break;
                }
            }
        }
    }
}

/// `2^x` per lane, exactly as `attngen_codegen::abi::exp2` specifies.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp2_ps(x: __m256) -> __m256 {
    use attngen_codegen::abi::exp2::{FLOOR, POLY, ROUNDER};
    // maxps returns its second operand when either is NaN: a NaN x stays NaN.
    let x = _mm256_max_ps(_mm256_set1_ps(FLOOR), x);
    let rounder = _mm256_set1_ps(ROUNDER);
    let t = _mm256_add_ps(x, rounder);
    let f = _mm256_sub_ps(x, _mm256_sub_ps(t, rounder));
    // Horner's rule, written out: the compiler keeps a loop over a chained iterator.
    let step = |poly, c| _mm256_fmadd_ps(poly, f, _mm256_set1_ps(c));
    let poly = step(_mm256_set1_ps(POLY[5]), POLY[4]);
    let poly = step(step(step(poly, POLY[3]), POLY[2]), POLY[1]);
    let poly = step(step(poly, POLY[0]), 1.0);
    let biased = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
    _mm256_mul_ps(poly, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
}

/// See [`super::Exp2Columns`].
///
/// # Safety
/// The CPU supports AVX2 and FMA; buffers as for [`super::portable::exp2_columns`].
#[target_feature(enable = "avx2,fma")]
pub unsafe extern "C" fn exp2_columns(
    keys: usize,
    columns: usize,
    s: *mut f32,
    ld: usize,
    m: *const f32,
    l: *mut f32,
) {
    // SAFETY (whole function): each call covers columns c..c + width <= columns of the rows
    // j < keys of s, and of m and l, which the caller guarantees.
    unsafe {
        let mut c = 0;
        // Two vectors per key where the columns allow: two independent polynomial chains.
        while c + 16 <= columns {
            exp2_column_block::<2>(keys, s.add(c), ld, m.add(c), l.add(c));
            c += 16;
        }
        if c + 8 <= columns {
            exp2_column_block::<1>(keys, s.add(c), ld, m.add(c), l.add(c));
            c += 8;
        }
        // Four columns (the generated code passes multiples of 4) in the low half.
        if c + 4 <= columns {
            let m0 = _mm256_zextps128_ps256(_mm_loadu_ps(m.add(c)));
            let mut sum = _mm_setzero_ps();
            for j in 0..keys {
                let at = s.add(j * ld + c);
                let x = _mm256_zextps128_ps256(_mm_loadu_ps(at));
                let p = _mm256_castps256_ps128(exp2_ps(_mm256_sub_ps(x, m0)));
                _mm_storeu_ps(at, p);
                sum = _mm_add_ps(sum, p);
            }
            _mm_storeu_ps(l.add(c), _mm_add_ps(_mm_loadu_ps(l.add(c)), sum));
            c += 4;
        }
        if c < columns {
            super::portable::exp2_columns(keys, columns - c, s.add(c), ld, m.add(c), l.add(c));
        }
    }
}

/// [`exp2_columns`] over `8·V` columns: V vectors per key, each with its own running sum.
///
/// # Safety
/// `s` holds `keys` rows of stride `ld` with `8·V` writable floats each; `m` and `l` hold `8·V`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp2_column_block<const V: usize>(
    keys: usize,
    s: *mut f32,
    ld: usize,
    m: *const f32,
    l: *mut f32,
) {
    // SAFETY: v < V and j < keys stay inside the block the caller vouches for.
    unsafe {
        let m: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(m.add(8 * v)));
        let mut sums = [_mm256_setzero_ps(); V];
        for j in 0..keys {
            let row = s.add(j * ld);
            for v in 0..V {
                let p = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(row.add(8 * v)), m[v]));
                _mm256_storeu_ps(row.add(8 * v), p);
                sums[v] = _mm256_add_ps(sums[v], p);
            }
        }
        for (v, sum) in sums.into_iter().enumerate() {
            _mm256_storeu_ps(l.add(8 * v), _mm256_add_ps(_mm256_loadu_ps(l.add(8 * v)), sum));
        }
    }
}

/// See [`super::PackColumns`]: runs of four rows that start on a multiple of four columns are
/// scaled and transposed 4 × 8 in registers; the rest goes through the portable copy.
///
/// # Safety
/// The CPU supports AVX2 and FMA; buffers as for [`super::pack::pack_columns`].
#[target_feature(enable = "avx2,fma")]
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
    let portable = super::pack::pack_columns;
    // Rows before the first column on a multiple of 4, and after the last whole run of 4.
    let head = ((4 - first_column % 4) % 4).min(rows);
    let runs_end = head + (rows - head) / 4 * 4;
    let whole = width / 8 * 8;
    let scale = _mm256_set1_ps(factor);
    // SAFETY (whole function): rows r < rows and columns c < width of src, and the panel
    // elements of columns first_column + r, depths c < width, of dst, as the caller guarantees.
    unsafe {
        portable(head, width, src, src_row, factor, dst, first_column, dst_panel);
        for r in (head..runs_end).step_by(4) {
            let column = first_column + r;
            // Four columns on a multiple of 4 never straddle a panel.
            let to = dst.add(column / PANEL * dst_panel + column % PANEL);
            let from = src.add(r * src_row);
            for c in (0..whole).step_by(8) {
                let row =
                    |i: usize| _mm256_mul_ps(scale, _mm256_loadu_ps(from.add(i * src_row + c)));
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                // Per 128-bit half: pairs, then quads, of one depth each.
                let (lo01, hi01) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
                let (lo23, hi23) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
                let depths = [
                    _mm256_shuffle_ps::<0x44>(lo01, lo23), // depths c, c + 4
                    _mm256_shuffle_ps::<0xEE>(lo01, lo23), // c + 1, c + 5
                    _mm256_shuffle_ps::<0x44>(hi01, hi23), // c + 2, c + 6
                    _mm256_shuffle_ps::<0xEE>(hi01, hi23), // c + 3, c + 7
                ];
                for (d, quad) in depths.into_iter().enumerate() {
                    _mm_storeu_ps(to.add((c + d) * PANEL), _mm256_castps256_ps128(quad));
                    _mm_storeu_ps(to.add((c + d + 4) * PANEL), _mm256_extractf128_ps::<1>(quad));
                }
            }
            if whole < width {
                let (src_rest, to_rest) = (from.add(whole), to.add(whole * PANEL));
                // Depths whole.. of these four columns: the same layout, shifted by `whole`
                // rows of each panel.
                portable(4, width - whole, src_rest, src_row, factor, to_rest, 0, dst_panel);
            }
        }
        let rest = rows - runs_end;
        portable(
            rest,
            width,
            src.add(runs_end * src_row),
            src_row,
            factor,
            dst,
            first_column + runs_end,
            dst_panel,
        );
    }
}
