//! `C (+)= A · B` with B in column panels: register blocks of broadcast FMAs, optional per-row
//! key ranges.

use std::mem::MaybeUninit;

use attngen_codegen::abi::{PANEL, PrefetchRows};

use super::{Prefetcher, SUM_CHUNK, Simd, prefetch, prefetch_rows_to_l1, row_keys};

/// The parts of `dot_nn` each ISA compiles once, out of line, with its target features
/// ([`super::primitives::stamp_routines!`] implements it): the edge-block dispatch over every
/// block size would otherwise be inlined at each of its call sites.
pub(super) trait OutOfLine: Simd {
    /// [`run_block`] for this ISA.
    ///
    /// # Safety
    /// As [`run_block`].
    unsafe fn run_block(
        nn: &NnArgs,
        i: usize,
        mr: usize,
        j: usize,
        cols: usize,
        lo: usize,
        hi: usize,
        accumulate: bool,
    );

    /// [`copied_column`] for this ISA: out of line, so only calls that copy a strip have its
    /// 16 KiB in their stack frame.
    ///
    /// # Safety
    /// As [`copied_column`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn copied_column(
        nn: &NnArgs,
        m: usize,
        j: usize,
        k: usize,
        wide: bool,
        accumulate: bool,
        prefetcher: &mut Option<Prefetcher>,
    );
}

/// Keys per unrolled step of a row-major A's one-vector blocks (see [`NnBlock::run`]): 16
/// measured no better.
const KEY_GROUP: usize = 8;

/// Rows of a tall block ([`Simd::NN_TALL`]): a one-vector C (absorbed MLA's latent scores,
/// `Sᵀ = keys · Qᵀ` for 16 heads) against a row-major A whose row stride is one of
/// [`CONST_STRIDES`]; C's rows after the last whole tall block run in narrow blocks. With the
/// stride a constant, every row's element is a fixed offset from one pointer, so the rows cost
/// no registers and 16 accumulators fit where 8 row pointers capped the block at 8 rows; each
/// broadcast still feeds one FMA, but the block loads B once per 16 of them instead of 8, and
/// its 16 independent sums hide the FMA latency. On a Zen 5 the score product alone (one core)
/// ran at 213–240 GFLOP/s with the latent in cache and 205–206 streaming it from DRAM, against
/// 204–222 and 158–184 in 8 × 1 blocks; in the kernel, switched in one process, absorbed MLA
/// decode took 0.95–0.98× the time at 4 × 1 × 4096 (W5), 0.93–1.01× at 4 × 1 × 32768 (W8),
/// 0.94–0.96× on a combined cache, and MQA 16 × 64 decode 0.92–0.94×.
pub(super) const TALL_MR: usize = 16;

/// Invokes `$then!` with the row strides (floats) of a row-major A that `dot_nn` compiles as
/// constants, in tall blocks ([`tall_block`]) and in the ISA's full blocks
/// ([`const_stride_block`]), ascending: 64 (the rope keys', the K rows of one KV head of 64,
/// and a prefill's packed K tiles of D = 64), 128 (packed K tiles of D = 128; latent rows of
/// rank 128), 256 (latent rows of rank 256: 128 and 256 are ranks `attngen compress` writes,
/// and a 16-head rank-128 spec's decode took 0.92–0.96× the time with tall blocks, rank 256
/// 0.92–1.01×), 512 (DeepSeek's latent rows) and 576 (DeepSeek's combined `[c_kv | k_rope]`
/// rows). The one list [`CONST_STRIDES`] and both dispatches are made from. Expanded MLA's
/// 192-float K rows gained nothing measurable (W6 0.99–1.01× the time on a Zen 3).
macro_rules! with_const_strides {
    ($then:ident) => {
        $then!(64, 128, 256, 512, 576)
    };
}

/// The strides of [`with_const_strides`], as an array.
macro_rules! stride_array {
    ($($stride:literal),*) => {
        [$($stride),*]
    };
}

/// The row strides (floats) `dot_nn` compiles its tall and full blocks for as constants
/// ([`with_const_strides`]).
pub(super) const CONST_STRIDES: [usize; 5] = with_const_strides!(stride_array);

/// Whether C (`m` rows by `n` columns) runs in tall blocks on this ISA: one vector wide, at
/// least one tall block of rows, A row-major (not `a_trans`) at a stride tall blocks are
/// compiled for, and no per-row key ranges (`ranged`).
fn takes_tall<S: Simd>(m: usize, n: usize, a_stride: usize, a_trans: bool, ranged: bool) -> bool {
    S::NN_TALL
        && !ranged
        && !a_trans
        && n <= S::LANES
        && m >= TALL_MR
        && CONST_STRIDES.contains(&a_stride)
}

/// Floats of the stack strip a strided B's column block is copied into (see [`row_blocks`]):
/// 64 keys of AVX-512's 64-column wide block, 256 of AVX2's 16 columns.
const STRIP_FLOATS: usize = 4096;

/// B's row strides (in floats) that put a column block's rows in at most 8 of L1's 64 sets:
/// multiples of 512 bytes.
const FEW_SETS_ROW: usize = 8 * PANEL;

/// Rows of C from which a few-sets B's strip of a column block wider than
/// [`CHEAP_COPY_COLUMNS`] (AVX-512's 64 columns) is copied (see [`copied_column`]): the copying
/// row block runs 1.25–1.35× as long as a plain one, and below this many rows it costs more
/// than the L2 re-reads it saves. A Zen 5's AVX-512 value product (B's rows 2 KiB apart, in
/// L2) ran at 211 GFLOP/s with the copy against 240 without at 12 rows, 218 against 223 at 16,
/// 239 against 240 at 48, and 247 against 236 at 64.
const COPY_MIN_ROWS: usize = 64;

/// Column blocks at most this wide (AVX2's 16 columns, AVX-512's narrow 32) copy a few-sets
/// B's strip for any C of more than one row block: on a Zen 5 held to AVX2 (one thread), MQA
/// decode (16 rows of C) took 1.09–1.16× the time without the copy and 1.02× at 3 queries (48
/// rows), and on a Zen 3 the copy made absorbed MLA's 16-row value product 1.03–1.05× faster.
const CHEAP_COPY_COLUMNS: usize = 32;

/// Whether `dot_nn` has a copying ([`NnBlock::run_copying`]) and a constant-stride
/// ([`const_stride_block`]) block of `mr` rows by `nr` vectors: every ISA's narrow and wide
/// shapes must be among them.
pub(super) const fn full_shape(mr: usize, nr: usize) -> bool {
    matches!((mr, nr), (8, 2) | (6, 2) | (6, 4))
}

/// [`STRIP_FLOATS`] on a cache line.
#[repr(C, align(64))]
struct Strip([f32; STRIP_FLOATS]);

/// Keys per chunk when C is one row block (see [`one_row_block`]).
const ONE_BLOCK_KC: usize = 8;

/// Bytes of B one column block may read over all its keys and still be run whole (see
/// [`key_chunk`]): this much of a 32–48 KiB L1 stays resident across the row blocks.
const B_STRIP_BYTES: usize = 32 * 1024;

/// The keys [`row_blocks`] runs per pass over C: all `k` when one column block's strip of B
/// (`k` rows of `cols` floats) fits [`B_STRIP_BYTES`], else the most whole [`SUM_CHUNK`]s
/// whose strip fills half of it, so that the strip stays in L1 across the row blocks of a
/// pass. Expanded MLA's up-projection (latent rows against 512 × 128 transposed weights, a
/// 64 KiB strip per block on AVX-512) is what this is for: with 128-key passes W6 took 0.96×
/// the time in alternating runs, with 64- or 256-key passes more. Chunks start at multiples
/// of `SUM_CHUNK`, so C adds the same partial sums in the same order: results are
/// bit-identical to one pass.
fn key_chunk(k: usize, cols: usize) -> usize {
    let row_bytes = cols.max(1) * size_of::<f32>();
    if k.saturating_mul(row_bytes) <= B_STRIP_BYTES {
        return k.max(1);
    }
    (B_STRIP_BYTES / 2 / row_bytes / SUM_CHUNK).max(1) * SUM_CHUNK
}

/// See [`super::DotNn`].
///
/// # Safety
/// `S`'s features are enabled; every `A[i][p]`, `B[p][j]` and `C[i][j]` that [`super::DotNn`]
/// names for `i < m`, `j < n`, `p < k` is in bounds (C writable), the row tables are null or
/// hold `m` entries each, the column tables null or `n` each (not both pairs: an unneeded row
/// skipped by the columns would still get its ragged keys added), and `prefetch` null or
/// valid.
#[inline(always)]
pub(super) unsafe fn dot_nn<S: OutOfLine>(
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
    c_col: usize,
    accumulate: usize,
    row_lo: *const i32,
    row_hi: *const i32,
    col_lo: *const i32,
    col_hi: *const i32,
    prefetch: *const PrefetchRows,
) {
    debug_assert!(row_lo.is_null() || col_lo.is_null(), "row and column tables together");
    let (dims, a, b) = ((m, n, k), (a, a_row, a_col), (b, b_row, b_panel));
    let tables = RangeTables { row_lo, row_hi, col_lo, col_hi };
    // SAFETY: forwarded caller contract.
    unsafe {
        match c_col {
            1 => row_major_c::<S>(dims, a, b, (c, ldc), accumulate, tables, prefetch),
            _ => column_major_c::<S>(dims, a, b, (c, ldc, c_col), accumulate, tables, prefetch),
        }
    }
}

/// A's pointer and strides: `A[i][p]` at `a[i·a_row + p·a_col]`.
type AOperand = (*const f32, usize, usize);
/// B's pointer, row and panel strides: `B[p][j]` at `b[(j / PANEL)·b_panel + p·b_row + j % PANEL]`.
type BOperand = (*const f32, usize, usize);

/// [`dot_nn`] with C row-major (`C[i][j]` at `c[i·ldc + j]`); `(m, n, k)` are its sizes.
///
/// # Safety
/// As [`dot_nn`].
#[inline(always)]
unsafe fn row_major_c<S: OutOfLine>(
    (m, n, k): (usize, usize, usize),
    (a, a_row, a_col): AOperand,
    (b, b_row, b_panel): BOperand,
    (c, ldc): (*mut f32, usize),
    accumulate: usize,
    tables: RangeTables,
    prefetch: *const PrefetchRows,
) {
    let row_lo = tables.row_lo;
    if a_col != 1 && a_row != 1 {
        // SAFETY: forwarded caller contract; no generated kernel passes such strides. It
        // computes every entry, which the column tables allow.
        return unsafe {
            let (a, b) = ((a, a_row, a_col), (b, b_row, b_panel));
            strided((m, n, k), a, b, (c, ldc, 1), accumulate, tables)
        };
    }
    let nn = NnArgs {
        a,
        a_stride: if a_col == 1 { a_row } else { a_col },
        a_trans: a_col != 1,
        prefetch_a: a_col == 1 && n <= PANEL && m > S::NN_MR,
        b,
        b_row,
        b_panel,
        c,
        ldc,
    };
    // One row block computes all of C: the column tables only allow skipping.
    let one_block = row_lo.is_null() && (1..=S::NN_MR).contains(&m);
    let wide = !one_block && n >= S::NN_WIDE_NR * S::LANES;
    let tall = takes_tall::<S>(m, n, nn.a_stride, nn.a_trans, !row_lo.is_null());
    let (block_rows, block_width) = match tall {
        true => (TALL_MR, S::LANES),
        false => block_shape::<S>(wide),
    };
    // Per-row key ranges are relative to all of 0..k: those calls run in one pass.
    let key_chunk = if row_lo.is_null() { key_chunk(k, n.min(block_width)) } else { k.max(1) };
    let blocks = match one_block {
        true => n.div_ceil(block_width) * k.div_ceil(ONE_BLOCK_KC),
        false => n.div_ceil(block_width) * m.div_ceil(block_rows) * k.div_ceil(key_chunk).max(1),
    };
    // SAFETY: the caller passes a null or valid descriptor.
    let prefetcher = unsafe { Prefetcher::new(prefetch, blocks) };
    let accumulate = accumulate != 0;
    // SAFETY: forwarded caller contract; `one_block` as one_row_block requires.
    unsafe {
        match one_block {
            true => one_row_block::<S>(m, n, k, &nn, accumulate, prefetcher),
            false => {
                let (keys, shape) = ((k, key_chunk), (wide, tall));
                row_blocks::<S>(m, n, keys, shape, &nn, accumulate, tables, prefetcher)
            }
        }
    }
}

/// The rows and columns of a `dot_nn` block: the ISA's wide shape (C at least that wide) or
/// its narrow one.
#[inline(always)]
fn block_shape<S: Simd>(wide: bool) -> (usize, usize) {
    match wide {
        true => (S::NN_WIDE_MR, S::NN_WIDE_NR * S::LANES),
        false => (S::NN_MR, S::NN_NR * S::LANES),
    }
}

/// `dot_nn`'s operands with A's unit stride resolved: A is row-major (`A[i][p]` at
/// `a[i·a_stride + p]`) or, with `a_trans`, column-major (`a[p·a_stride + i]`).
#[derive(Clone, Copy)]
pub(super) struct NnArgs {
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

impl NnArgs {
    /// The operands of the block at row `i`, column `j` (a multiple of PANEL), keys `lo..hi`.
    ///
    /// # Safety
    /// Row `i` of A and C and column `j` of B and C are in bounds.
    #[inline(always)]
    unsafe fn block(&self, i: usize, j: usize, lo: usize, hi: usize) -> NnBlock {
        // SAFETY: the caller's contract.
        unsafe {
            let a = if self.a_trans { self.a.add(i) } else { self.a.add(i * self.a_stride) };
            // Wrapping: a copied strip's arguments point `j` floats before it (see
            // `row_blocks`), so only the sum is inside the strip.
            let b = self.b.wrapping_add(j / PANEL * self.b_panel);
            let c = self.c.add(i * self.ldc + j);
            let (a_stride, prefetch_a) = (self.a_stride, self.prefetch_a);
            let (b_row, b_panel, ldc) = (self.b_row, self.b_panel, self.ldc);
            NnBlock { lo, hi, a, a_stride, prefetch_a, b, b_row, b_panel, c, ldc }
        }
    }
}

/// [`dot_nn`]'s optional range tables: per row of C its keys, per column of C its rows (each
/// pair null, or `m` and `n` entries).
#[derive(Clone, Copy)]
struct RangeTables {
    row_lo: *const i32,
    row_hi: *const i32,
    col_lo: *const i32,
    col_hi: *const i32,
}

impl RangeTables {
    /// No tables: every row sees every key, every column needs every row.
    const NONE: RangeTables = RangeTables {
        row_lo: std::ptr::null(),
        row_hi: std::ptr::null(),
        col_lo: std::ptr::null(),
        col_hi: std::ptr::null(),
    };

    /// The rows of C (of `m`) that the columns of each [`PANEL`] of the column block
    /// `j..j + cols` need (all of `0..m` without column tables).
    ///
    /// # Safety
    /// The column tables are null or hold entries for columns `j..j + cols`; the block is at
    /// most [`BLOCK_PANELS`] panels wide.
    #[inline(always)]
    unsafe fn rows_needed(&self, j: usize, cols: usize, m: usize) -> NeededRows {
        let panels = cols.div_ceil(PANEL);
        debug_assert!(panels <= BLOCK_PANELS, "a block of {cols} columns");
        let mut rows = [(0, m); BLOCK_PANELS];
        if !self.col_lo.is_null() {
            for (p, rows) in rows.iter_mut().enumerate().take(panels) {
                let columns = j + p * PANEL..j + cols.min((p + 1) * PANEL);
                // SAFETY: the caller's contract; `row_keys` clamps each column's rows to 0..m.
                let needed = |c: usize| unsafe { row_keys(self.col_lo, self.col_hi, c, m) };
                *rows = columns
                    .map(needed)
                    .filter(|(lo, hi)| lo < hi)
                    .fold((m, 0), |(lo, hi), (l, h)| (lo.min(l), hi.max(h)));
            }
        }
        NeededRows { rows, cols }
    }
}

/// The most [`PANEL`]s a `dot_nn` block spans: AVX-512's wide 64 columns.
pub(super) const BLOCK_PANELS: usize = 4;

/// The rows of C each panel of one column block needs ([`RangeTables::rows_needed`]).
#[derive(Clone, Copy)]
struct NeededRows {
    /// Per panel, the range of rows some column of it needs (empty when none is needed).
    rows: [(usize, usize); BLOCK_PANELS],
    /// The block's columns.
    cols: usize,
}

impl NeededRows {
    /// The columns (relative to the block's first) that the row block `i..i + mr` must be
    /// computed for: from the first panel that needs any of its rows to the end of the last,
    /// or `None` when no panel does. So a causal diagonal tile's scores skip, at each block
    /// of keys, the panels of query rows before the diagonal: with AVX-512's 64-column blocks
    /// (4 panels), 35% of a 64 × 64 tile's score product, as AVX2's one-panel blocks already
    /// did.
    #[inline(always)]
    fn columns(&self, i: usize, mr: usize) -> Option<(usize, usize)> {
        let needs = |&(lo, hi): &(usize, usize)| lo < hi && lo < i + mr && i < hi;
        let panels = &self.rows[..self.cols.div_ceil(PANEL)];
        let first = panels.iter().position(needs)?;
        let last = panels.iter().rposition(needs)?;
        Some((first * PANEL, self.cols.min((last + 1) * PANEL)))
    }
}

/// Every block of C, in blocks of the ISA's wide or narrow shape ([`block_shape`]), or with
/// `tall` in [`TALL_MR`]-row blocks while C has that many rows left (then narrow ones), in
/// passes of `key_chunk` keys (see [`key_chunk`]); `keys` is `(k, key_chunk)`, `shape` is
/// `(wide, tall)`. Blocks no column needs are skipped in every pass.
///
/// # Safety
/// As [`dot_nn`] with unit-stride A; `key_chunk >= k` with row ranges; with `wide`, C is at
/// least a wide block across; with `tall`, C is one vector wide and A row-major, without row
/// ranges, its rows one of [`CONST_STRIDES`] apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_blocks<S: OutOfLine>(
    m: usize,
    n: usize,
    (k, key_chunk): (usize, usize),
    (wide, tall): (bool, bool),
    nn: &NnArgs,
    accumulate: bool,
    tables: RangeTables,
    mut prefetcher: Option<Prefetcher>,
) {
    let RangeTables { row_lo, row_hi, col_lo, .. } = tables;
    let (block_rows, block_width) = block_shape::<S>(wide);
    // SAFETY: the caller's contract (S's features are enabled).
    let all = unsafe { S::mask(S::LANES) };
    // A row-major B whose rows fall in few L1 sets is copied to a strip per column block
    // (see `copied_column`) when C is tall enough to pay for it: one pass, without range
    // tables.
    let copies = !tall
        && row_lo.is_null()
        && col_lo.is_null()
        && m > block_rows
        && (m >= COPY_MIN_ROWS || block_width <= CHEAP_COPY_COLUMNS)
        && key_chunk >= k
        && nn.b_panel == PANEL
        && nn.b_row.is_multiple_of(FEW_SETS_ROW)
        && k * block_width <= STRIP_FLOATS;
    let mut lo = 0;
    // At least one pass: an empty product still clears C when not accumulating.
    loop {
        let hi = k.min(lo + key_chunk);
        let accumulate = accumulate || lo > 0;
        // Column-outer, row-block-inner: a block's B panels stay in L1 across the row blocks.
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(block_width);
            // SAFETY: columns j..j + cols <= n, whose entries the column tables (if any) hold;
            // a block is at most BLOCK_PANELS wide (asserted where the routines are stamped).
            let needed = unsafe { tables.rows_needed(j, cols, m) };
            if copies && cols == block_width {
                // SAFETY: as for the blocks below; one pass (lo = 0, hi = k), no tables.
                unsafe { S::copied_column(nn, m, j, k, wide, accumulate, &mut prefetcher) };
                j += cols;
                continue;
            }
            let mut i = 0;
            while i < m {
                let whole_tall = tall && m - i >= TALL_MR;
                let mr = if whole_tall { TALL_MR } else { (m - i).min(block_rows) };
                if let Some(p) = &mut prefetcher {
                    p.step();
                }
                // SAFETY: rows i..i+mr < m, columns j..j+cols <= n, keys lo..hi <= k, and the
                // row ranges (if any, then lo..hi = 0..k) have m entries each.
                unsafe {
                    match needed.columns(i, mr) {
                        // Left as it was: no panel of the block needs these rows.
                        None => {}
                        Some(_) if whole_tall => {
                            tall_block::<S>(nn, i, (j, cols), (lo, hi), accumulate);
                        }
                        Some(_) if !row_lo.is_null() => {
                            common_keys::<S>(nn, i, mr, j, cols, k, accumulate, row_lo, row_hi);
                        }
                        Some((from, to)) => {
                            let columns = (j + from, to - from);
                            plain_block::<S>(nn, (i, mr), columns, (lo, hi), accumulate, wide, all);
                        }
                    }
                }
                i += mr;
            }
            j += cols;
        }
        lo = hi;
        if lo >= k {
            break;
        }
    }
    if !row_lo.is_null() {
        // SAFETY: as above; with row ranges the pass above covered keys 0..k.
        unsafe { ragged_keys::<S>(m, n, k, block_rows, nn, row_lo, row_hi) };
    }
}

/// One block of C at rows `i..i + mr`, columns `j..j + cols`, keys `lo..hi`: the ISA's full
/// block inline (its sizes constants, so the dispatch folds), any other out of line.
///
/// # Safety
/// The block lies inside the operands `nn` describes; `all` is the all-lanes mask.
#[inline(always)]
unsafe fn plain_block<S: OutOfLine>(
    nn: &NnArgs,
    (i, mr): (usize, usize),
    (j, cols): (usize, usize),
    (lo, hi): (usize, usize),
    accumulate: bool,
    wide: bool,
    all: S::Mask,
) {
    let (block_rows, block_width) = block_shape::<S>(wide);
    // SAFETY: the caller's contract.
    unsafe {
        if mr == block_rows && cols == block_width {
            let block = nn.block(i, j, lo, hi);
            if !nn.a_trans && CONST_STRIDES.contains(&nn.a_stride) {
                let shape = (block_rows, block_width / S::LANES);
                return const_stride_block::<S>(block, shape, accumulate, all);
            }
            match wide {
                true => block.dispatch::<S>(
                    S::NN_WIDE_MR,
                    S::NN_WIDE_NR,
                    false,
                    nn.a_trans,
                    accumulate,
                    all,
                ),
                false => {
                    block.dispatch::<S>(S::NN_MR, S::NN_NR, false, nn.a_trans, accumulate, all)
                }
            }
        } else {
            S::run_block(nn, i, mr, j, cols, lo, hi, accumulate);
        }
    }
}

/// A full block of the ISA's shape (`mr` rows by `nr` vectors, one [`full_shape`] names) with
/// A row-major at one of [`CONST_STRIDES`], the stride a constant: each row's element of A is a
/// fixed offset from one pointer, folded into its broadcast, so the loop forms no row
/// addresses and reloads no stride (a prefill's packed K rows, 64 or 128 floats apart, in the
/// transposed score product; absorbed MLA's latent rows in its scores). On a Zen 3 (AVX2's 6 ×
/// 16 blocks), switched in one process in alternating calls (medians of the pairs' ratios),
/// absorbed MLA decode took 0.97–1.00× the time at 4 × 1 × 4096 (W5) and 0.93–1.00× at 4 × 1 ×
/// 32768 (W8), prefill W1–W3 0.96–1.00×, the larger gains with the host contended; results
/// are the same to the bit.
///
/// # Safety
/// As [`NnBlock::run`]; A is row-major and `block.a_stride` is one of [`CONST_STRIDES`].
#[inline(always)]
unsafe fn const_stride_block<S: Simd>(
    block: NnBlock,
    (mr, nr): (usize, usize),
    accumulate: bool,
    all: S::Mask,
) {
    let copy = std::ptr::null_mut();
    // SAFETY: the caller's contract; the match names the block's own stride.
    unsafe {
        macro_rules! blocks {
            ($($stride:literal),*) => {
                match (mr, nr, block.a_stride) {
                    $(
                        (8, 2, $stride) => block
                            .run_with::<S, 8, 2, false, false, false, $stride>(accumulate, all, copy),
                        (6, 2, $stride) => block
                            .run_with::<S, 6, 2, false, false, false, $stride>(accumulate, all, copy),
                        (6, 4, $stride) => block
                            .run_with::<S, 6, 4, false, false, false, $stride>(accumulate, all, copy),
                    )*
                    _ => unreachable!("full blocks are of the shapes full_shape names"),
                }
            };
        }
        with_const_strides!(blocks)
    }
}

/// A [`TALL_MR`]-row block at rows `i..`, columns `j..j + cols` (one vector at most), keys
/// `lo..hi`, with A's row stride made a constant.
///
/// # Safety
/// The block lies inside the operands `nn` describes, whose A is row-major with a stride
/// among [`CONST_STRIDES`]; `cols <= S::LANES`; the ISA has [`Simd::NN_TALL`].
#[inline(always)]
unsafe fn tall_block<S: Simd>(
    nn: &NnArgs,
    i: usize,
    (j, cols): (usize, usize),
    (lo, hi): (usize, usize),
    accumulate: bool,
) {
    // SAFETY: the caller's contract; the tail mask selects the columns that exist.
    unsafe {
        let tail = S::mask(cols);
        let block = nn.block(i, j, lo, hi);
        let copy = std::ptr::null_mut();
        macro_rules! strides {
            ($($stride:literal),*) => {
                match (nn.a_stride, cols < S::LANES) {
                    $(
                        ($stride, false) => block
                            .run_with::<S, TALL_MR, 1, false, false, false, $stride>(accumulate, tail, copy),
                        ($stride, true) => block
                            .run_with::<S, TALL_MR, 1, true, false, false, $stride>(accumulate, tail, copy),
                    )*
                    _ => unreachable!("tall blocks are for the strides with_const_strides names"),
                }
            };
        }
        with_const_strides!(strides)
    }
}

/// Every row block of the whole column block at `j` over all `k` keys, B's strip copied: a
/// row-major B whose rows fall in few L1 sets (absorbed MLA's value product: latent rows 2 KiB
/// apart, so a column block's 64 keys share 2 of the 64 sets) would be re-read from L2 by
/// every row block, so the first stores each key's vectors of B to a stack strip as it loads
/// them and the others read that contiguous copy. Results are the same, only B's address
/// changes. With AVX-512's 64-column blocks only a C of [`COPY_MIN_ROWS`] rows or more pays
/// for it: DeepSeek-V2's 128 heads, not DeepSeek-V2-Lite's 16.
///
/// # Safety
/// As [`row_blocks`] without tables, in one pass; the column block is `block_shape(wide)`'s
/// width, `m` is more than its rows, and `k` keys of it fit [`STRIP_FLOATS`].
#[inline(always)]
pub(super) unsafe fn copied_column<S: OutOfLine>(
    nn: &NnArgs,
    m: usize,
    j: usize,
    k: usize,
    wide: bool,
    accumulate: bool,
    prefetcher: &mut Option<Prefetcher>,
) {
    let (block_rows, block_width) = block_shape::<S>(wide);
    let mut strip = MaybeUninit::<Strip>::uninit();
    let strip = strip.as_mut_ptr().cast::<f32>();
    // SAFETY: the caller's contract (S's features are enabled).
    let all = unsafe { S::mask(S::LANES) };
    // The operands of the row blocks after the first: the strip, once the first copied it.
    let mut from = *nn;
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(block_rows);
        if let Some(p) = prefetcher {
            p.step();
        }
        // SAFETY: rows i..i + mr < m, columns j.. of the block and keys 0..k are inside the
        // operands; the strip holds k · block_width floats; the first block is the ISA's full
        // shape, which `full_shape` names (asserted where the routines are stamped).
        unsafe {
            if i == 0 {
                let block = nn.block(0, j, 0, k);
                let shape = (block_rows, block_width / S::LANES);
                block.run_copying::<S>(shape, nn.a_trans, accumulate, all, strip);
                // Key p's columns j.. at strip[p · block_width]: `block` adds j.
                let b = strip.cast_const().wrapping_sub(j);
                from = NnArgs { b, b_row: block_width, b_panel: PANEL, ..*nn };
            } else {
                plain_block::<S>(&from, (i, mr), (j, block_width), (0, k), accumulate, wide, all);
            }
        }
        i += mr;
    }
}

/// All of C when it is one row block without per-row key ranges (a decode item's few query
/// rows against a short key tile, absorbed MLA's per-head products): one dispatch, then the
/// whole blocks in one loop, so each costs only its keys and its C update.
///
/// Long products run in chunks of [`ONE_BLOCK_KC`] keys, every block per chunk: B is then read
/// a few rows at a time, in address order, instead of one strip of every row per block, which
/// the hardware prefetchers lose across pages (MLA's `q_nope · W_UK[h]`, 4 rows against
/// 128 × 512 weights from memory).
///
/// # Safety
/// As [`row_blocks`] without row ranges, with `1 <= m <= S::NN_MR`.
#[inline(always)]
unsafe fn one_row_block<S: OutOfLine>(
    m: usize,
    n: usize,
    k: usize,
    nn: &NnArgs,
    accumulate: bool,
    mut prefetcher: Option<Prefetcher>,
) {
    if nn.b_panel == PANEL {
        // B row-major: k rows of n floats, b_row apart (a decode item's value tile), into L1 on
        // the ISAs that ask.
        prefetch_rows_to_l1::<S>(nn.b, k, nn.b_row, n);
    }
    let block_width = S::NN_NR * S::LANES;
    let whole = n / block_width * block_width;
    let mut lo = 0;
    // At least one chunk: an empty product still clears C when not accumulating.
    loop {
        let hi = k.min(lo + ONE_BLOCK_KC);
        let accumulate = accumulate || lo > 0;
        // SAFETY: rows 0..m and columns 0..n are C's, keys lo..hi <= k are A's and B's.
        unsafe {
            macro_rules! blocks {
                ($($mr:literal),*) => {
                    match (m, nn.a_trans) {
                        $(
                            ($mr, false) => whole_blocks::<S, $mr, false>(nn, whole, lo, hi, accumulate, &mut prefetcher),
                            ($mr, true) => whole_blocks::<S, $mr, true>(nn, whole, lo, hi, accumulate, &mut prefetcher),
                        )*
                        _ => unreachable!("one row block has at most 8 rows"),
                    }
                };
            }
            blocks!(8, 7, 6, 5, 4, 3, 2, 1);
            if whole < n {
                if let Some(p) = &mut prefetcher {
                    p.step();
                }
                S::run_block(nn, 0, m, whole, n - whole, lo, hi, accumulate);
            }
        }
        lo = hi;
        if lo >= k {
            break;
        }
    }
}

/// Rows `0..MR`, the whole blocks of columns `0..whole`, keys `lo..hi`.
///
/// # Safety
/// As [`one_row_block`], with `MR = m`, `whole <= n` a multiple of the block width and
/// `hi <= k`.
#[inline(always)]
unsafe fn whole_blocks<S: OutOfLine, const MR: usize, const A_TRANS: bool>(
    nn: &NnArgs,
    whole: usize,
    lo: usize,
    hi: usize,
    accumulate: bool,
    prefetcher: &mut Option<Prefetcher>,
) {
    // SAFETY: the caller's contract (S's features are enabled).
    let all = unsafe { S::mask(S::LANES) };
    for j in (0..whole).step_by(S::NN_NR * S::LANES) {
        if let Some(p) = prefetcher {
            p.step();
        }
        // SAFETY: columns j..j + block width <= whole of C and B, rows 0..MR of A and C, keys
        // lo..hi of A and B.
        unsafe {
            nn.block(0, j, lo, hi).dispatch::<S>(MR, S::NN_NR, false, A_TRANS, accumulate, all)
        };
    }
}

/// Rows `i..i + mr` with per-row key ranges, first part: the keys every row of the block sees,
/// as one block (C cleared first unless accumulating). [`ragged_keys`] adds each row's other
/// keys once every block of C has run, so no row ever touches a key outside its range.
///
/// # Safety
/// As [`run_block`]; `row_lo` and `row_hi` hold an entry for every row of the block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn common_keys<S: OutOfLine>(
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
        if !accumulate {
            for r in i..i + mr {
                std::ptr::write_bytes(nn.c.add(r * nn.ldc + j), 0, cols);
            }
        }
        let (lo, hi) = common_range(i, mr, k, row_lo, row_hi);
        if lo < hi {
            S::run_block(nn, i, mr, j, cols, lo, hi, true);
        }
    }
}

/// The keys every row of `i..i + mr` sees (empty when they share none).
///
/// # Safety
/// `row_lo` and `row_hi` hold an entry for every row of the block.
#[inline(always)]
unsafe fn common_range(
    i: usize,
    mr: usize,
    k: usize,
    row_lo: *const i32,
    row_hi: *const i32,
) -> (usize, usize) {
    // SAFETY: the caller's contract.
    let range = |r: usize| unsafe { row_keys(row_lo, row_hi, r, k) };
    (i..i + mr).map(range).fold((0, k), |(lo, hi), (l, h)| (lo.max(l), hi.min(h)))
}

/// Rows with per-row key ranges, second part: each row's keys outside its block's common
/// range ([`common_keys`]) — at the low end, then the high end, or its whole range when the
/// block shares none — across all `n` columns of C in one inlined loop. On causal edge tiles
/// these are a few keys per row; run as 1-row blocks, two out-of-line calls per row and
/// column block, they took about 1% more of W1's and W3's time (alternating runs). Each part
/// sums from zero and is then added to C, as a 1-row block does: the results are the same to
/// the bit.
///
/// # Safety
/// As [`row_blocks`] with row ranges (one pass over keys `0..k`), `block_rows` the row
/// blocks that pass used.
#[inline(always)]
unsafe fn ragged_keys<S: Simd>(
    m: usize,
    n: usize,
    k: usize,
    block_rows: usize,
    nn: &NnArgs,
    row_lo: *const i32,
    row_hi: *const i32,
) {
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(block_rows);
        // SAFETY: rows i..i + mr < m have table entries; the parts lie in 0..k.
        unsafe {
            let (c_lo, c_hi) = common_range(i, mr, k, row_lo, row_hi);
            for r in i..i + mr {
                let (lo, hi) = row_keys(row_lo, row_hi, r, k);
                if c_lo < c_hi {
                    row_keys_product::<S>(nn, r, n, lo, c_lo);
                    row_keys_product::<S>(nn, r, n, c_hi, hi);
                } else {
                    row_keys_product::<S>(nn, r, n, lo, hi);
                }
            }
        }
        i += mr;
    }
}

/// `C[r][0..n] += Σ A[r][p]·B[p][..]` over keys `lo..hi`, a vector of columns at a time, the
/// sums in chunks of [`SUM_CHUNK`] keys from zero as [`NnBlock::run`] forms them.
///
/// # Safety
/// Row `r` of A and C, columns `0..n` of B and C and keys `lo..hi` are in bounds.
#[inline(always)]
unsafe fn row_keys_product<S: Simd>(nn: &NnArgs, r: usize, n: usize, lo: usize, hi: usize) {
    // SAFETY: every pointer access below: the caller's contract; the last vector is masked to the
    // columns that exist.
    unsafe {
        let a_at = |p: usize| match nn.a_trans {
            true => *nn.a.add(p * nn.a_stride + r),
            false => *nn.a.add(r * nn.a_stride + p),
        };
        let c_row = nn.c.add(r * nn.ldc);
        let mut start = lo;
        while start < hi {
            let end = hi.min(start + SUM_CHUNK);
            let mut column = 0;
            while column < n {
                let lanes = (n - column).min(S::LANES);
                let mask = S::mask(lanes);
                let load = |p: *const f32| match lanes == S::LANES {
                    true => S::load(p),
                    false => S::load_masked(p, mask),
                };
                let b = nn.b.add(column / PANEL * nn.b_panel + column % PANEL);
                let mut sum = S::zero();
                for p in start..end {
                    sum = S::mul_acc(S::splat(a_at(p)), load(b.add(p * nn.b_row)), sum);
                }
                let at = c_row.add(column);
                let sum = S::add(load(at), sum);
                match lanes == S::LANES {
                    true => S::store(at, sum),
                    false => S::store_masked(at, mask, sum),
                }
                column += S::LANES;
            }
            start = end;
        }
    }
}

/// One block: rows `i..i + mr` (mr <= NN_MR), columns `j..j + cols` (cols <= the block width,
/// j a multiple of PANEL), keys `lo..hi`. An empty key range still clears C when not
/// accumulating.
///
/// # Safety
/// The block lies inside the operands described by `nn`; `hi <= k` of the call.
#[inline(always)]
pub(super) unsafe fn run_block<S: Simd>(
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
    let nr = cols.div_ceil(S::LANES);
    let masked = !cols.is_multiple_of(S::LANES);
    // SAFETY: the block's rows of A, its panels of B and its part of C are in bounds, and
    // the tail mask selects the columns of the last vector that exist.
    unsafe {
        let tail = S::mask(cols - S::LANES * (nr - 1));
        // `min` lets the compiler drop the arms of blocks larger than this ISA's.
        let mr = mr.min(S::NN_MR.max(S::NN_WIDE_MR));
        let nr = nr.min(S::NN_NR.max(S::NN_WIDE_NR));
        nn.block(i, j, lo, hi).dispatch::<S>(mr, nr, masked, nn.a_trans, accumulate, tail);
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
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
}

impl NnBlock {
    /// A full, unmasked block of the ISA's shape (`mr` rows by `nr` vectors) that also stores
    /// each key's `nr` vectors of B, in key order, from `copy` on.
    ///
    /// # Safety
    /// As [`NnBlock::run`]; `(mr, nr)` is a shape [`full_shape`] names (every ISA's are,
    /// asserted where the routines are stamped); `copy` holds `hi · nr · LANES` writable floats,
    /// keys starting at 0 (`lo` is 0).
    #[inline(always)]
    unsafe fn run_copying<S: Simd>(
        self,
        (mr, nr): (usize, usize),
        a_trans: bool,
        accumulate: bool,
        all: S::Mask,
        copy: *mut f32,
    ) {
        // One copying block per shape `full_shape` names and A layout.
        macro_rules! copying {
            ($mr:literal, $nr:literal) => {
                match a_trans {
                    false => {
                        self.run_with::<S, $mr, $nr, false, false, true, 0>(accumulate, all, copy)
                    }
                    true => {
                        self.run_with::<S, $mr, $nr, false, true, true, 0>(accumulate, all, copy)
                    }
                }
            };
        }
        // SAFETY: the caller's contract.
        unsafe {
            match (mr, nr) {
                (8, 2) => copying!(8, 2),
                (6, 2) => copying!(6, 2),
                (6, 4) => copying!(6, 4),
                _ => unreachable!("every ISA's block shapes copy (asserted when stamped)"),
            }
        }
    }

    /// [`NnBlock::run`] with its sizes given at run time (constants fold the match away).
    ///
    /// # Safety
    /// As [`NnBlock::run`], with `mr <= 8` and `nr <= 2`, or `mr <= 6` and `nr <= 4`.
    #[inline(always)]
    unsafe fn dispatch<S: Simd>(
        self,
        mr: usize,
        nr: usize,
        masked: bool,
        a_trans: bool,
        accumulate: bool,
        tail: S::Mask,
    ) {
        macro_rules! dispatch {
            ($($mr:literal),*; $($wide_mr:literal),*) => {
                match (mr, nr, masked, a_trans) {
                    $(
                        ($wide_mr, 4, false, false) => self.run::<S, $wide_mr, 4, false, false>(accumulate, tail),
                        ($wide_mr, 4, true, false) => self.run::<S, $wide_mr, 4, true, false>(accumulate, tail),
                        ($wide_mr, 3, false, false) => self.run::<S, $wide_mr, 3, false, false>(accumulate, tail),
                        ($wide_mr, 3, true, false) => self.run::<S, $wide_mr, 3, true, false>(accumulate, tail),
                        ($wide_mr, 4, false, true) => self.run::<S, $wide_mr, 4, false, true>(accumulate, tail),
                        ($wide_mr, 4, true, true) => self.run::<S, $wide_mr, 4, true, true>(accumulate, tail),
                        ($wide_mr, 3, false, true) => self.run::<S, $wide_mr, 3, false, true>(accumulate, tail),
                        ($wide_mr, 3, true, true) => self.run::<S, $wide_mr, 3, true, true>(accumulate, tail),
                    )*
                    $(
                        ($mr, 2, false, false) => self.run::<S, $mr, 2, false, false>(accumulate, tail),
                        ($mr, 2, true, false) => self.run::<S, $mr, 2, true, false>(accumulate, tail),
                        ($mr, 1, false, false) => self.run::<S, $mr, 1, false, false>(accumulate, tail),
                        ($mr, 1, true, false) => self.run::<S, $mr, 1, true, false>(accumulate, tail),
                        ($mr, 2, false, true) => self.run::<S, $mr, 2, false, true>(accumulate, tail),
                        ($mr, 2, true, true) => self.run::<S, $mr, 2, true, true>(accumulate, tail),
                        ($mr, 1, false, true) => self.run::<S, $mr, 1, false, true>(accumulate, tail),
                        ($mr, 1, true, true) => self.run::<S, $mr, 1, true, true>(accumulate, tail),
                    )*
                    _ => unreachable!("blocks are at most 8 rows by 2 vectors or 6 by 4"),
                }
            };
        }
        // SAFETY: the caller's contract.
        unsafe { dispatch!(8, 7, 6, 5, 4, 3, 2, 1; 6, 5, 4, 3, 2, 1) }
    }

    /// MR rows × NR vectors of C over keys `lo..hi`: per key, NR loads of B, MR broadcasts of
    /// A, MR·NR FMAs. With MASKED the last vector holds only the lanes `tail` selects; with
    /// A_TRANS, A is column-major. Vector v covers columns `v·LANES..` of the block: in panel
    /// `v·LANES / PANEL` after the block's first.
    ///
    /// Keys are summed in chunks of [`SUM_CHUNK`] in fresh registers, each chunk then added to
    /// C: a long product (MLA's 512-wide latent scores) rounds like `KC + k/KC` additions
    /// rather than `k` in one chain.
    ///
    /// # Safety
    /// The block is in bounds, and the last vector of a MASKED block names only the lanes of
    /// columns that exist.
    #[inline(always)]
    unsafe fn run<
        S: Simd,
        const MR: usize,
        const NR: usize,
        const MASKED: bool,
        const A_TRANS: bool,
    >(
        self,
        accumulate: bool,
        tail: S::Mask,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            self.run_with::<S, MR, NR, MASKED, A_TRANS, false, 0>(
                accumulate,
                tail,
                std::ptr::null_mut(),
            )
        }
    }

    /// [`NnBlock::run`]; with COPY, each key's NR vectors of B are also stored, in key order,
    /// from `copy` on (`p · NR · LANES` for key p). A STRIDE other than 0 is A's stride, as a
    /// constant (see [`TALL_MR`] and [`const_stride_block`]).
    ///
    /// # Safety
    /// As [`NnBlock::run`]; with COPY, the block is not MASKED and `copy` holds `hi · NR ·
    /// LANES` writable floats; a STRIDE other than 0 is the block's `a_stride`.
    #[inline(always)]
    unsafe fn run_with<
        S: Simd,
        const MR: usize,
        const NR: usize,
        const MASKED: bool,
        const A_TRANS: bool,
        const COPY: bool,
        const STRIDE: usize,
    >(
        self,
        accumulate: bool,
        tail: S::Mask,
        copy: *mut f32,
    ) {
        let NnBlock { lo, hi, a, a_stride, prefetch_a, b, b_row, b_panel, c, ldc } = self;
        debug_assert!(STRIDE == 0 || STRIDE == a_stride);
        let a_stride = if STRIDE == 0 { a_stride } else { STRIDE };
        // SAFETY: every pointer access below: the caller passes an in-bounds block, and the last
        // vector of a MASKED block touches only the lanes of columns that exist.
        unsafe {
            let b_vector: [*const f32; NR] = std::array::from_fn(|v| {
                let column = v * S::LANES;
                b.add(column / PANEL * b_panel + column % PANEL)
            });
            let load = |ptr: *const f32, v: usize| {
                if MASKED && v == NR - 1 { S::load_masked(ptr, tail) } else { S::load(ptr) }
            };
            let store = |ptr: *mut f32, v: usize, x: S::V| {
                if MASKED && v == NR - 1 { S::store_masked(ptr, tail, x) } else { S::store(ptr, x) }
            };
            let mut first = !accumulate;
            let mut start = lo;
            loop {
                let end = hi.min(start + SUM_CHUNK);
                let mut acc = [[S::zero(); NR]; MR];
                // One key: NR loads of B, then each row's element of A (at `$a_at(i)`) broadcast
                // against them. (A macro: every address expression is inlined into the loop.)
                macro_rules! key {
                    ($p:expr, $a_at:expr) => {{
                        let p = $p;
                        let bv: [S::V; NR] =
                            std::array::from_fn(|v| load(b_vector[v].add(p * b_row), v));
                        if COPY {
                            for (v, x) in bv.iter().enumerate() {
                                S::store(copy.add((p * NR + v) * S::LANES), *x);
                            }
                        }
                        for (i, row) in acc.iter_mut().enumerate() {
                            let weight = S::splat(*$a_at(i));
                            for (v, x) in row.iter_mut().enumerate() {
                                *x = S::mul_acc(weight, bv[v], *x);
                            }
                        }
                    }};
                }
                let mut p = start;
                if !A_TRANS && NR == 1 {
                    // Row-major A against one vector of B (absorbed MLA's latent scores, 16
                    // rows): MR rows a stride apart. Each row's address is formed once per
                    // KEY_GROUP keys and the keys within a group are constant offsets from it
                    // (with a constant STRIDE, from one pointer for all rows), so each
                    // broadcast folds into its FMA and the loop issues little but loads and
                    // FMAs (W5 3–7% faster in alternating runs). With two vectors
                    // the broadcast has two uses: LLVM then hoists the group's broadcasts and
                    // spills them, and the key-at-a-time loop below is faster.
                    while p + KEY_GROUP <= end {
                        let rows: [*const f32; MR] =
                            std::array::from_fn(|i| a.add(i * a_stride + p));
                        if prefetch_a {
                            // The one multiple of 16 in the group, if any: a line per row.
                            let at = (p + KEY_GROUP - 1) & !15;
                            if at >= p {
                                for i in MR..2 * MR {
                                    prefetch(a.wrapping_add(i * a_stride + at).cast());
                                }
                            }
                        }
                        for u in 0..KEY_GROUP {
                            key!(p + u, |i: usize| rows[i].add(u));
                        }
                        p += KEY_GROUP;
                    }
                }
                for p in p..end {
                    if !A_TRANS && prefetch_a && p % 16 == 0 {
                        for i in MR..2 * MR {
                            prefetch(a.wrapping_add(i * a_stride + p).cast());
                        }
                    }
                    match A_TRANS {
                        true => key!(p, |i| a.add(p * a_stride + i)),
                        false => key!(p, |i| a.add(i * a_stride + p)),
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    for (v, x) in row.iter().enumerate() {
                        let ptr = c.add(i * ldc + v * S::LANES);
                        let sum = if first { *x } else { S::add(load(ptr, v), *x) };
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

/// [`dot_nn`] with C column-major (`C[i][j]` at `c[i·c_row + j·c_col]`, `c_col != 1`): absorbed
/// MLA's running output kept transposed, `Oᵀ`, one column per query row. With A column-major,
/// B row-major and C's rows contiguous (`c_row = 1`) it computes `Cᵀ = Bᵀ·Aᵀ` in the ISA's
/// register blocks — Cᵀ's rows are B's columns, so a 16-row C is one block wide and each
/// broadcast of B serves two vectors. With row tables, the keys of the rows' union range run
/// as one product when `A[i][p]` is 0 outside row i's range (a probability tile's hidden
/// entries are: [`super::DotNn`]'s contract) and every value row outside the common range is
/// finite; a non-finite one (`0 · NaN`) sends those keys to an exact per-row sum
/// ([`ragged_columns`]). Any other layout runs element by element.
///
/// # Safety
/// As [`dot_nn`], for C addressed through its two strides.
#[inline(always)]
unsafe fn column_major_c<S: OutOfLine>(
    (m, n, k): (usize, usize, usize),
    (a, a_row, a_col): AOperand,
    (b, b_row, b_panel): BOperand,
    (c, c_row, c_col): (*mut f32, usize, usize),
    accumulate: usize,
    tables: RangeTables,
    prefetch: *const PrefetchRows,
) {
    let RangeTables { row_lo, row_hi, .. } = tables;
    if a_row != 1 || b_panel != PANEL || c_row != 1 {
        // SAFETY: forwarded caller contract; the column tables only allow skipping.
        return unsafe {
            let (a, b) = ((a, a_row, a_col), (b, b_row, b_panel));
            strided((m, n, k), a, b, (c, c_row, c_col), accumulate, tables)
        };
    }
    let swapped = Swapped { m, n, a, a_col, b, b_row, c, c_col, prefetch };
    if row_lo.is_null() {
        // SAFETY: keys 0..k of A and B are in bounds.
        return unsafe { swapped.keys::<S>(0, k, accumulate) };
    }
    // SAFETY: the row tables hold m entries.
    let (common, union) =
        unsafe { (common_range(0, m, k, row_lo, row_hi), union_range(m, k, row_lo, row_hi)) };
    let (lo, hi) = (common.0, common.1.max(common.0));
    let outside = [union.0.min(lo)..lo, hi.max(union.0)..union.1.max(hi)];
    let mut finite = true;
    for p in outside.iter().flat_map(Clone::clone) {
        // SAFETY: key p < k names a row of B with n floats.
        finite &= (0..n).all(|j| unsafe { *b.add(p * b_row + j) }.is_finite());
    }
    // SAFETY: the keys named lie in 0..k; the row tables hold m entries.
    unsafe {
        if finite {
            let (first, last) = (outside[0].start, outside[1].end);
            return swapped.keys::<S>(first, last.max(first), accumulate);
        }
        swapped.keys::<S>(lo, hi, accumulate);
        ragged_columns(m, n, (lo, hi), k, a, a_col, b, b_row, (c, c_col), row_lo, row_hi);
    }
}

/// [`column_major_c`]'s operands: `Cᵀ` (n × m, rows `c_col` apart) is C; `Bᵀ`'s element
/// (j, p) is B's (p, j), at `b[p·b_row + j]` (B row-major), and `Aᵀ`'s (p, i) is A's (i, p), at
/// `a[p·a_col + i]` (A column-major).
#[derive(Clone, Copy)]
struct Swapped {
    m: usize,
    n: usize,
    a: *const f32,
    a_col: usize,
    b: *const f32,
    b_row: usize,
    c: *mut f32,
    c_col: usize,
    prefetch: *const PrefetchRows,
}

impl Swapped {
    /// `Cᵀ (+)= Bᵀ·Aᵀ` over keys `lo..hi` in the ISA's register blocks; an empty range still
    /// clears C when not accumulating.
    ///
    /// # Safety
    /// Keys `lo..hi` of A and B and C's `n × m` elements are in bounds.
    #[inline(always)]
    unsafe fn keys<S: OutOfLine>(&self, lo: usize, hi: usize, accumulate: usize) {
        let Swapped { m, n, a, a_col, b, b_row, c, c_col, prefetch } = *self;
        // SAFETY: the caller's contract; Bᵀ is the product's A (column-major), Aᵀ its B
        // (row-major: `b_panel = PANEL`).
        unsafe {
            let (b_t, a_t) = ((b.add(lo * b_row), 1, b_row), (a.add(lo * a_col), a_col, PANEL));
            let tables = RangeTables::NONE;
            row_major_c::<S>((n, m, hi - lo), b_t, a_t, (c, c_col), accumulate, tables, prefetch)
        }
    }
}

/// The keys some row of `0..m` sees: from the smallest start to the largest end of the rows'
/// non-empty ranges (empty when every row's is).
///
/// # Safety
/// `row_lo` and `row_hi` hold m entries.
unsafe fn union_range(
    m: usize,
    k: usize,
    row_lo: *const i32,
    row_hi: *const i32,
) -> (usize, usize) {
    // SAFETY: the caller's contract.
    let range = |r: usize| unsafe { row_keys(row_lo, row_hi, r, k) };
    let visible = (0..m).map(range).filter(|(lo, hi)| lo < hi);
    visible.fold((k, 0), |(lo, hi), (l, h)| (lo.min(l), hi.max(h)))
}

/// The keys of each row of a column-major C outside `common` ([`column_major_c`]), summed
/// element by element from zero and added to C: the exact path, for value rows that are not
/// all finite.
///
/// # Safety
/// As [`column_major_c`]'s product; the row tables hold m entries.
#[allow(clippy::too_many_arguments)]
unsafe fn ragged_columns(
    m: usize,
    n: usize,
    (lo, hi): (usize, usize),
    k: usize,
    a: *const f32,
    a_col: usize,
    b: *const f32,
    b_row: usize,
    (c, c_col): (*mut f32, usize),
    row_lo: *const i32,
    row_hi: *const i32,
) {
    for i in 0..m {
        // SAFETY: row i has table entries.
        let (first, last) = unsafe { row_keys(row_lo, row_hi, i, k) };
        let parts = match lo < hi {
            true => [first..last.min(lo), first.max(hi)..last],
            false => [first..last, 0..0],
        };
        for j in 0..n {
            let mut sum = 0.0f32;
            for p in parts.iter().flat_map(Clone::clone) {
                // SAFETY: p < k and j < n name elements of A (column-major) and B (row-major).
                sum = unsafe { (*a.add(p * a_col + i)).mul_add(*b.add(p * b_row + j), sum) };
            }
            // SAFETY: C[i][j] is writable.
            unsafe { *c.add(i + j * c_col) += sum };
        }
    }
}

/// `dot_nn` for an A with neither stride 1, element by element (no generated kernel passes
/// one; the contract allows it).
///
/// # Safety
/// As [`dot_nn`].
unsafe fn strided(
    (m, n, k): (usize, usize, usize),
    (a, a_row, a_col): AOperand,
    (b, b_row, b_panel): BOperand,
    (c, c_row, c_col): (*mut f32, usize, usize),
    accumulate: usize,
    RangeTables { row_lo, row_hi, .. }: RangeTables,
) {
    for i in 0..m {
        // SAFETY: the caller guarantees the row tables (if non-null) have m entries.
        let (lo, hi) = unsafe { row_keys(row_lo, row_hi, i, k) };
        for j in 0..n {
            let mut sum = 0.0f32;
            for p in lo..hi {
                // SAFETY: i < m, p < k and j < n name elements of A and B.
                unsafe {
                    let b = *b.add(j / PANEL * b_panel + p * b_row + j % PANEL);
                    sum = (*a.add(i * a_row + p * a_col)).mul_add(b, sum);
                }
            }
            // SAFETY: C[i][j] is writable.
            unsafe {
                let dst = c.add(i * c_row + j * c_col);
                *dst = if accumulate != 0 { *dst + sum } else { sum };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{B_STRIP_BYTES, SUM_CHUNK, key_chunk, takes_tall};

    /// Absorbed MLA's decode score products take tall blocks with AVX-512 — DeepSeek's latent,
    /// combined and rope rows against 16 heads, and the ranks `attngen compress` writes — and
    /// nothing else does: not a wider C, a C shorter than one tall block, A transposed or at
    /// another stride, row ranges, or an ISA without the registers.
    #[test]
    fn tall_blocks_take_the_latent_scores_and_nothing_else() {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::simd::{avx2::Avx2, avx512::Avx512};
            for stride in [64, 128, 256, 512, 576] {
                assert!(takes_tall::<Avx512>(64, 16, stride, false, false), "{stride}");
                assert!(takes_tall::<Avx512>(37, 12, stride, false, false), "{stride}");
                assert!(!takes_tall::<Avx2>(64, 16, stride, false, false), "{stride}");
            }
            // DeepSeek-V2's 128 heads, a one-query edge tile, P transposed, other strides,
            // causal edge tiles' row ranges.
            assert!(!takes_tall::<Avx512>(64, 128, 512, false, false));
            assert!(!takes_tall::<Avx512>(15, 16, 512, false, false));
            assert!(!takes_tall::<Avx512>(64, 16, 512, true, false));
            assert!(!takes_tall::<Avx512>(64, 16, 1024, false, false));
            assert!(!takes_tall::<Avx512>(64, 16, 513, false, false));
            assert!(!takes_tall::<Avx512>(64, 16, 512, false, true));
        }
        assert!(!takes_tall::<crate::simd::portable::Portable>(64, 8, 512, false, false));
    }

    /// Whole products while the strip fits; else passes of whole partial sums (so results do
    /// not change) whose strip is half the budget.
    #[test]
    fn key_chunks_keep_the_strip_in_l1_and_the_sums_whole() {
        // AVX-512's 32-column blocks: 256 keys fit, 512 (MLA's rank) run in 128s.
        assert_eq!(key_chunk(256, 32), 256);
        assert_eq!(key_chunk(512, 32), 128);
        // AVX2's 16 columns: 512 keys fit exactly; 600 run in 256s.
        assert_eq!(key_chunk(512, 16), 512);
        assert_eq!(key_chunk(600, 16), 256);
        // An empty product is one pass.
        assert_eq!(key_chunk(0, 32), 1);
        for k in [1, 63, 64, 300, 512, 1000, 4096] {
            for cols in [1, 8, 16, 32, 64] {
                let chunk = key_chunk(k, cols);
                if chunk < k {
                    assert_eq!(chunk % SUM_CHUNK, 0, "k {k} cols {cols}");
                    assert!(k * cols * 4 > B_STRIP_BYTES);
                    assert!(chunk * cols * 4 <= B_STRIP_BYTES.max(SUM_CHUNK * cols * 4));
                }
            }
        }
    }
}
