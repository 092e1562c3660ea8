//! The binary interface between generated kernels and the runtime that calls them.
//!
//! A generated kernel has two functions, `extern "C"` with pointer-sized integer arguments:
//! - `item(args, b, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride)` — see
//!   [`crate::ir`]: groups `g0..g0 + groups`, group i's state at `state + i·state_stride`;
//! - `finish(args, b, g, q0, n_states, states, split_stride, scratch)`: split s's state at
//!   `states + s·split_stride`;
//!
//! and, for absorbed MLA, two more that run once per query head over the whole call:
//! `prologue(args, h)` before the items and `epilogue(args, h)` after the finishes
//! ([`HeadFn`]).
//!
//! `args` points to one [`CallArgs`]; `scratch` to `plan.scratch.len(groups)` floats; every
//! state slot holds `plan.state_len` floats. Strides are in floats. The runtime's scratch,
//! state and packed buffers start on [`ALIGN_FLOATS`] boundaries, and the plan keeps every
//! region and slot in them a whole number of [`ALIGN_FLOATS`] long.

use std::mem::offset_of;

/// Everything a call's work items share, laid out for generated code to load by offset.
/// Pointers to tensors a spec does not use are dangling-but-unread; `lse` is null when the
/// caller did not ask for it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CallArgs {
    /// `q`.
    pub q: *const f32,
    /// `k` (grouped).
    pub k: *const f32,
    /// `v` (grouped).
    pub v: *const f32,
    /// `c_kv` (latent).
    pub c_kv: *const f32,
    /// `k_rope` (latent); with a combined latent cache, `c_kv + rank` (each `c_kv` row is
    /// `[c_kv | k_rope]`).
    pub k_rope: *const f32,
    /// `w_uk` (latent).
    pub w_uk: *const f32,
    /// `w_uv` (latent).
    pub w_uv: *const f32,
    /// `out`.
    pub out: *mut f32,
    /// `lse`, or null.
    pub lse: *mut f32,
    /// The task's packed K (`plan::CallPacking`: a grouped prefill's copy of one (batch, KV
    /// head)'s keys, an expanded MLA task's up-projection), or null: grouped items then pack
    /// their tiles or read in place.
    pub k_packed: *const f32,
    /// The task's packed V, per key tile (`plan::CallPacking`); null with `k_packed`.
    pub v_packed: *const f32,
    /// The first key at `k_packed` and `v_packed` (a multiple of `k_tile`); 0 without them.
    pub packed_first_key: usize,
    /// Expanded MLA: per head, `W_UK[h]ᵀ` then `W_UV[h]ᵀ` (`rank` rows each) in `PANEL`-column
    /// panels (`KernelPlan::transposed_weights`), written by the prologue, read by `expand`;
    /// null otherwise.
    pub weights_t: *mut f32,
    /// Absorbed MLA: `q' = q_nope·W_UK[h]` of every (batch, query, head), `[B, Sq, H, rank]`,
    /// written by the prologue and read by the items; null for grouped specs.
    pub latent_q: *mut f32,
    /// Absorbed MLA: the normalised latent output `o' = O / l`, `[B, Sq, H, rank]`, written by
    /// the finishes and projected to `out` by the epilogue; null for grouped specs.
    pub latent_out: *mut f32,
    /// B.
    pub batch: usize,
    /// Sq.
    pub seq_q: usize,
    /// Sk: the rows each sequence's cache tensors hold (`k`, `v`, `c_kv`, `k_rope` are
    /// `[B, Sk, ..]`), which address row j of sequence b at `b·Sk + j`.
    pub seq_k: usize,
    /// The keys of each sequence, `[B]`, each at most Sk: sequence b attends to its cache rows
    /// `0..kv_lens[b]` and never reads the rest; null when every sequence has Sk keys.
    pub kv_lens: *const usize,
}

/// Byte offsets of [`CallArgs`] fields, for the emitters.
pub mod offsets {
    use super::*;

    /// `q`.
    pub const Q: i32 = offset_of!(CallArgs, q) as i32;
    /// `k`.
    pub const K: i32 = offset_of!(CallArgs, k) as i32;
    /// `v`.
    pub const V: i32 = offset_of!(CallArgs, v) as i32;
    /// `c_kv`.
    pub const C_KV: i32 = offset_of!(CallArgs, c_kv) as i32;
    /// `k_rope`.
    pub const K_ROPE: i32 = offset_of!(CallArgs, k_rope) as i32;
    /// `w_uk`.
    pub const W_UK: i32 = offset_of!(CallArgs, w_uk) as i32;
    /// `w_uv`.
    pub const W_UV: i32 = offset_of!(CallArgs, w_uv) as i32;
    /// `out`.
    pub const OUT: i32 = offset_of!(CallArgs, out) as i32;
    /// `lse`.
    pub const LSE: i32 = offset_of!(CallArgs, lse) as i32;
    /// `k_packed`.
    pub const K_PACKED: i32 = offset_of!(CallArgs, k_packed) as i32;
    /// `v_packed`.
    pub const V_PACKED: i32 = offset_of!(CallArgs, v_packed) as i32;
    /// `packed_first_key`.
    pub const PACKED_FIRST_KEY: i32 = offset_of!(CallArgs, packed_first_key) as i32;
    /// `weights_t`.
    pub const WEIGHTS_T: i32 = offset_of!(CallArgs, weights_t) as i32;
    /// `latent_q`.
    pub const LATENT_Q: i32 = offset_of!(CallArgs, latent_q) as i32;
    /// `latent_out`.
    pub const LATENT_OUT: i32 = offset_of!(CallArgs, latent_out) as i32;
    /// `batch`.
    pub const BATCH: i32 = offset_of!(CallArgs, batch) as i32;
    /// `seq_q`.
    pub const SEQ_Q: i32 = offset_of!(CallArgs, seq_q) as i32;
    /// `seq_k`.
    pub const SEQ_K: i32 = offset_of!(CallArgs, seq_k) as i32;
    /// `kv_lens`.
    pub const KV_LENS: i32 = offset_of!(CallArgs, kv_lens) as i32;
}

/// Cache lines for a tile product (`DotNt`, `DotNn`) to prefetch while it computes: share
/// `part` of `parts` equal shares of `rows` rows of `width` floats, `stride` floats apart, from
/// `base`, its lines taken in row-major order. An item walking a narrow key tile group by
/// group asks each group's products for one share of the next tile, so the next tile's lines
/// are requested in address order, one tile ahead; with wider tiles it names the next group's
/// rows as one share. The kernel spreads its share over its blocks, so the prefetches overlap
/// the arithmetic instead of stalling in a burst.
/// `base` may point past the tensor (the last tile's successor): prefetches never fault.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PrefetchRows {
    /// First row.
    pub base: *const f32,
    /// Rows.
    pub rows: usize,
    /// Floats from one row to the next.
    pub stride: usize,
    /// Floats per row.
    pub width: usize,
    /// The share to prefetch, `< parts`.
    pub part: usize,
    /// Shares the lines are cut into, at least 1.
    pub parts: usize,
}

/// Byte offsets of [`PrefetchRows`] fields, for the emitters.
pub mod prefetch_offsets {
    use super::*;

    /// `base`.
    pub const BASE: i32 = offset_of!(PrefetchRows, base) as i32;
    /// `rows`.
    pub const ROWS: i32 = offset_of!(PrefetchRows, rows) as i32;
    /// `stride`.
    pub const STRIDE: i32 = offset_of!(PrefetchRows, stride) as i32;
    /// `width`.
    pub const WIDTH: i32 = offset_of!(PrefetchRows, width) as i32;
    /// `part`.
    pub const PART: i32 = offset_of!(PrefetchRows, part) as i32;
    /// `parts`.
    pub const PARTS: i32 = offset_of!(PrefetchRows, parts) as i32;
}

/// Floats per 64-byte cache line: the alignment of the runtime's buffers and of the regions
/// the plan lays out in them, so that a 16-lane vector at the start of a row, panel or state
/// slot never straddles two lines. With AVX-512 a straddling load costs a second access: tile
/// products whose operands sat 16 bytes off a line ran 5–12% slower in isolation (`A·Bᵀ`
/// dot products 1.5×).
pub const ALIGN_FLOATS: usize = 16;

/// Columns per panel of `DotNn`'s B operand: element `B[p][j]` lives at
/// `b + (j / PANEL)·b_panel + p·b_row + j % PANEL`. A plain row-major B has `b_panel = PANEL`;
/// a packed tile stores each 16-column panel contiguously (`b_row = PANEL`), so the panel a
/// micro-kernel block streams is one run of memory instead of rows that alias in L1.
pub const PANEL: usize = 16;

/// `item(args, b, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride, resume)`: with
/// `resume` 0 the item starts each group's state afresh; otherwise the state slots hold the
/// states an item of the same rows left over the keys before `k_lo` (a run of a split,
/// `Schedule::keys_per_run`), and the item carries them on. Only a state the key loop left
/// row-major resumes: never absorbed MLA's on AVX2 (`StateLayout::transposed`).
pub type ItemFn = unsafe extern "C" fn(
    args: *const CallArgs,
    b: usize,
    g0: usize,
    groups: usize,
    q0: usize,
    k_lo: usize,
    k_hi: usize,
    scratch: *mut f32,
    state: *mut f32,
    state_stride: usize,
    resume: usize,
);

/// `finish(args, b, g, q0, n_states, states, split_stride, scratch)`.
pub type FinishFn = unsafe extern "C" fn(
    args: *const CallArgs,
    b: usize,
    g: usize,
    q0: usize,
    n_states: usize,
    states: *mut f32,
    split_stride: usize,
    scratch: *mut f32,
);

/// `prologue(args, h)` / `epilogue(args, h)`: one query head's call-level work.
pub type HeadFn = unsafe extern "C" fn(args: *const CallArgs, head: usize);

/// `expand(args, b, head, j0, n, keys, values)`: expanded MLA's up-projection of keys
/// `j0..j0 + n` of sequence `b` for query head `head`: `keys[r·D ..]` = `[c_kv[b, j0 + r] ·
/// W_UK[h]ᵀ, k_rope[b, j0 + r]]` and `values[r·Dv ..]` = `c_kv[b, j0 + r] · W_UV[h]ᵀ`, both
/// row-major, for `r < n`.
pub type ExpandFn = unsafe extern "C" fn(
    args: *const CallArgs,
    b: usize,
    head: usize,
    j0: usize,
    n: usize,
    keys: *mut f32,
    values: *mut f32,
);

/// `ln(x)` of one f32 (once per output row, for `lse`).
pub type LnFn = unsafe extern "C" fn(x: f32) -> f32;

/// `C[i·ldc + j] (+)= Σ_{p<k} A[i·lda + p] · B[j·ldb + p]` for `i < m`, `j < n`.
/// `accumulate != 0` adds to C, otherwise overwrites it; `prefetch` as for [`DotNn`].
pub type DotNt = unsafe extern "C" fn(
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
);

/// `C[i·ldc + j·c_col] (+)= Σ_{p ∈ P_i} A[i][p] · B[p][j]` for `i < m`, `j < n`, where
/// - C is row-major (`c_col = 1`), or column-major (`ldc = 1`) such as absorbed MLA's running
///   output kept transposed (`Oᵀ`, one column per query row);
/// - `A[i][p] = a[i·a_row + p·a_col]`: row-major (`a_col = 1`), or column-major (`a_row = 1`)
///   such as a transposed probability tile;
/// - `B[p][j] = b[(j / PANEL)·b_panel + p·b_row + j % PANEL]` ([`PANEL`] columns per panel): a
///   row-major B has `b_panel = PANEL`, a packed one `b_row = PANEL`;
/// - `P_i = 0..k`, or `row_lo[i]..row_hi[i]` (clamped to `0..k`) when the tables are non-null:
///   a row never reads B outside its range, so a hidden key's value row cannot reach it, not
///   even as `0 · NaN`. With a column-major C, `A[i][p]` must also be 0 for the keys outside
///   `P_i` that another row sees (a probability tile's hidden entries are): the keys of all
///   rows then run as one product wherever their value rows are finite.
///
/// `col_lo` and `col_hi`, when non-null, hold for each column `j < n` the rows of C it needs,
/// `col_lo[j]..col_hi[j]` (clamped to `0..m`): `C[i][j]` for other `i` may be left as it was, a
/// register block's [`PANEL`] at a time, when no column of the panel needs its rows — an edge
/// tile's scores (`Sᵀ`, a row per key, a column per query row), whose hidden entries the online
/// softmax masks anyway, skip the keys past the diagonal. A call passes the row tables or the
/// column tables, not both.
///
/// `accumulate != 0` adds to C, otherwise overwrites it. `prefetch`, when non-null, names cache
/// rows to prefetch while computing (the rows the item reads next), spread over the blocks.
pub type DotNn = unsafe extern "C" fn(
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
);

/// `P[j][c] = 2^(S[j][c] − m[c])` in place, where `S[j][c] = s[j·ld + c]`, for `j < keys`,
/// `c < columns`, and `l[c] += Σ_j P[j][c]` (summed in order of j) — the exponentials of one
/// online-softmax tile, whose columns are the query rows of Sᵀ. `2^x` is evaluated exactly as
/// [`exp2`] specifies (so `s = −∞` gives 0), for arguments `<= 64`.
pub type Exp2Columns = unsafe extern "C" fn(
    keys: usize,
    columns: usize,
    s: *mut f32,
    ld: usize,
    m: *const f32,
    l: *mut f32,
);

/// Partial maxima a tile max keeps, key `j` feeding partial `j mod MAX_PARTIALS` (the keys
/// after the last whole group of them, partial 0), combined pairwise: `(p0 max p1) max (p2 max
/// p3)`, where `a max b` is `b < a ? a : b` and each key's step is `p = s < p ? p : s`. Four
/// independent chains cover `maxps`'s latency of 4 cycles (with one, W2's generated item took
/// 5.6% of its time on one thread; with four, 4.3%). The max of finite scores does not depend
/// on the order; a NaN score reaches its row through `2^(s − m)` whatever m is.
pub const MAX_PARTIALS: usize = 4;

/// `max[c] = max_j S[j][c]`, where `S[j][c] = s[j·ld + c]`, for `j < keys`, `c < columns`, in
/// [`MAX_PARTIALS`] partial maxima — the tile max of an online-softmax tile whose scores take
/// no cap and no mask; −∞ with no keys.
pub type ColumnMax =
    unsafe extern "C" fn(keys: usize, columns: usize, s: *const f32, ld: usize, max: *mut f32);

/// Copies `rows` rows of `width` floats, `src[r·src_row + c]`, to
/// `dst[(c / PANEL)·dst_panel + r·dst_row + c % PANEL]` (row-major: `dst_row = width`,
/// `dst_panel = PANEL`; panels: `dst_row = PANEL`).
pub type PackRows = unsafe extern "C" fn(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    dst: *mut f32,
    dst_row: usize,
    dst_panel: usize,
);

/// Writes `factor · src[r·src_row + c]` (`r < rows`, `c < width`) transposed into column
/// `first_column + r` of a panel-packed tile: to `dst[(col / PANEL)·dst_panel + c·dst_row +
/// col % PANEL]` — the query side of the score product, scaled on the way (`dst_row =
/// PANEL`), or a transposed running output made row-major again (`dst_panel = PANEL`,
/// `dst_row` its row length).
pub type PackColumns = unsafe extern "C" fn(
    rows: usize,
    width: usize,
    src: *const f32,
    src_row: usize,
    factor: f32,
    dst: *mut f32,
    first_column: usize,
    dst_panel: usize,
    dst_row: usize,
);

/// The scalar kinds the ABI passes: a pointer-sized integer (pointers and sizes) or an f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `usize` or a pointer.
    Word,
    /// `f32`.
    F32,
}

/// A Rust type the ABI passes, with its [`Param`] kind.
pub trait AbiType {
    /// Its kind.
    const PARAM: Param;
}

macro_rules! abi_types {
    ($($param:ident: $($ty:ty),*;)*) => {
        $($(impl AbiType for $ty {
            const PARAM: Param = Param::$param;
        })*)*
    };
}
abi_types! {
    Word: usize, *const f32, *mut f32, *const i32, *const CallArgs, *const PrefetchRows;
    F32: f32;
}

/// An `extern "C"` function type of the ABI: its parameters' and result's kinds, read off the
/// Rust type itself, so the emitters' signatures (`clif::signature`) and the Rust types the
/// runtime implements are one definition.
pub trait AbiFn {
    /// Kinds of the parameters, in order.
    const PARAMS: &'static [Param];
    /// Kind of the result, if any.
    const RETURNS: Option<Param>;
}

macro_rules! abi_fns {
    ($($arg:ident)*) => {
        impl<$($arg: AbiType),*> AbiFn for unsafe extern "C" fn($($arg),*) {
            const PARAMS: &'static [Param] = &[$($arg::PARAM),*];
            const RETURNS: Option<Param> = None;
        }
        impl<Ret: AbiType, $($arg: AbiType),*> AbiFn for unsafe extern "C" fn($($arg),*) -> Ret {
            const PARAMS: &'static [Param] = &[$($arg::PARAM),*];
            const RETURNS: Option<Param> = Some(Ret::PARAM);
        }
    };
}
abi_fns!(A);
abi_fns!(A B);
abi_fns!(A B C D E);
abi_fns!(A B C D E F);
abi_fns!(A B C D E F G);
abi_fns!(A B C D E F G H);
abi_fns!(A B C D E F G H I);
abi_fns!(A B C D E F G H I J);
abi_fns!(A B C D E F G H I J K);
abi_fns!(A B C D E F G H I J K L M N O P Q R);

/// The pre-compiled routines generated code calls, in the order of [`Callee::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Callee {
    /// Tile `C (+)= A·Bᵀ` ([`DotNt`]).
    DotNt,
    /// Tile `C (+)= A·B` with optional per-row key ranges and per-column row ranges ([`DotNn`]).
    DotNn,
    /// Natural log of one f32 (once per output row, for `lse`; [`LnFn`]).
    Ln,
    /// Copy a K/V tile into scratch, as rows or column panels ([`PackRows`]).
    PackRows,
    /// Copy query rows transposed and scaled into the query tile's panels ([`PackColumns`]).
    PackColumns,
    /// A score tile's exponentials `P = 2^(s − m)` in place, with their column sums added to l
    /// ([`Exp2Columns`]).
    Exp2Columns,
    /// A score tile's max down its columns ([`ColumnMax`]).
    ColumnMax,
}

impl Callee {
    /// Every callee.
    pub const ALL: [Callee; 7] = [
        Callee::DotNt,
        Callee::DotNn,
        Callee::Ln,
        Callee::PackRows,
        Callee::PackColumns,
        Callee::Exp2Columns,
        Callee::ColumnMax,
    ];

    /// The symbol name the JIT registers the routine under.
    pub fn symbol(self) -> &'static str {
        match self {
            Callee::DotNt => "attngen_dot_nt",
            Callee::DotNn => "attngen_dot_nn",
            Callee::Ln => "attngen_ln",
            Callee::PackRows => "attngen_pack_rows",
            Callee::PackColumns => "attngen_pack_columns",
            Callee::Exp2Columns => "attngen_exp2_columns",
            Callee::ColumnMax => "attngen_column_max",
        }
    }

    /// The kinds of the routine's parameters and result, from its Rust function type.
    pub fn signature(self) -> (&'static [Param], Option<Param>) {
        fn of<F: AbiFn>() -> (&'static [Param], Option<Param>) {
            (F::PARAMS, F::RETURNS)
        }
        match self {
            Callee::DotNt => of::<DotNt>(),
            Callee::DotNn => of::<DotNn>(),
            Callee::Ln => of::<LnFn>(),
            Callee::PackRows => of::<PackRows>(),
            Callee::PackColumns => of::<PackColumns>(),
            Callee::Exp2Columns => of::<Exp2Columns>(),
            Callee::ColumnMax => of::<ColumnMax>(),
        }
    }

    /// What the routine does, in a few words, for listings.
    pub fn purpose(self) -> &'static str {
        match self {
            Callee::DotNt => "tile C (+)= A·Bᵀ, dot products of rows",
            Callee::DotNn => "tile C (+)= A·B, broadcast FMA, optional per-row key ranges",
            Callee::Ln => "ln of one f32",
            Callee::PackRows => "copy a K/V tile, as rows or column panels",
            Callee::PackColumns => "copy query rows transposed and scaled into panels",
            Callee::Exp2Columns => "P = 2^(s - m) over a score tile, column sums into l",
            Callee::ColumnMax => "a score tile's max down its columns",
        }
    }
}

pub mod softcap {
    //! The `c·tanh(s/c)` every kernel evaluates for a softcap c, so all emitters round alike,
    //! with `x = s/c`:
    //! - for `|x| <` [`SMALL`]: `s · (tanh x / x)` with `tanh x / x = 1 + x²·(c₁ + x²·(c₂ +
    //!   x²·c₃))` ([`RATIO_POLY`], the Taylor series to x⁶): no cancellation, and an enormous cap
    //!   leaves s exactly unchanged instead of losing it to underflow in `s/c`;
    //! - else `c · sign(x) · (1 − 2 / (2^(2·log2 e·|x|) + 1))`, the exponent capped at
    //!   [`EXP_LIMIT`] (where tanh is 1 in f32) so [`super::exp2`] stays in range.

    /// `|x|` below which the ratio polynomial is used.
    pub const SMALL: f32 = 0.125;
    /// Coefficients of x², x⁴, x⁶ of `tanh x / x`, highest first as Horner's rule uses them.
    pub const RATIO_POLY: [f32; 3] = [-17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0];
    /// Largest argument passed to `exp2`.
    pub const EXP_LIMIT: f32 = 64.0;

    /// `log2 e · c·tanh(s/c)` of one score, in these steps: the softcap in the base-2 units
    /// the softmax works in. Written without branches, so a loop of it vectorises.
    #[inline(always)]
    pub fn log2_capped(s: f32, cap: f32) -> f32 {
        let x = s * (1.0 / f64::from(cap)) as f32;
        let ax = x.abs();
        let arg = ax * (2.0 * std::f32::consts::LOG2_E);
        // Not `f32::min`: a NaN score stays NaN.
        let arg = if EXP_LIMIT < arg { EXP_LIMIT } else { arg };
        let t = 1.0 - 2.0 / (super::exp2::eval(arg) + 1.0);
        let large = f32::from_bits(t.to_bits() | (x.to_bits() & 0x8000_0000)) * cap;
        let x2 = x * x;
        let poly = RATIO_POLY[0].mul_add(x2, RATIO_POLY[1]).mul_add(x2, RATIO_POLY[2]);
        let small = s * poly.mul_add(x2, 1.0);
        let capped = if ax < SMALL { small } else { large };
        capped * std::f32::consts::LOG2_E
    }
}

pub mod exp2 {
    //! The `2^x` every kernel evaluates, generated or pre-compiled, so all of them round alike:
    //! - x is first raised to [`FLOOR`], where the built exponent field is 0: masked scores
    //!   and −∞ give exactly 0, and NaN stays NaN;
    //! - `x = n + f` with `n = round(x)` and `|f| <= 1/2`: adding [`ROUNDER`] leaves n in the
    //!   low mantissa bits of `t = x + ROUNDER`, and subtracting it again gives n as a float;
    //! - `2^f = 1 + f·(c₀ + f·(c₁ + …))` with [`POLY`], a relative-error minimax fit (7.9e-8 ≈
    //!   1.3 ulp with fused steps, exactly 1 at f = 0);
    //! - `2^n` is built as the bits `(bits(t) + 127) << 23`.
    //!
    //! Valid for `x <= 64`.

    /// The lowest argument: `2^x` is 0 at and below it.
    pub const FLOOR: f32 = -127.0;
    /// `1.5 · 2^23`: adding it rounds to an integer held in the low mantissa bits.
    pub const ROUNDER: f32 = 12_582_912.0;
    /// Coefficients of f, f², …, f⁶.
    pub const POLY: [f32; 6] = [
        std::f32::consts::LN_2,
        0.240_226_48,
        0.055_503_324,
        0.009_618_437,
        0.001_339_887_5,
        0.000_153_533_62,
    ];

    /// `2^x` of one f32 in these steps (`x <= 64`), for code that works a float at a time.
    #[inline(always)]
    pub fn eval(x: f32) -> f32 {
        // NaN is not below FLOOR: it stays NaN.
        let x = if FLOOR > x { FLOOR } else { x };
        let t = x + ROUNDER;
        let f = x - (t - ROUNDER);
        let mut poly = POLY[5];
        for c in POLY[..5].iter().rev() {
            poly = poly.mul_add(f, *c);
        }
        let poly = poly.mul_add(f, 1.0);
        poly * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signatures come from the Rust types: their arity and the position of every f32.
    #[test]
    fn signatures_are_read_off_the_function_types() {
        let words = |n| vec![Param::Word; n];
        assert_eq!(Callee::DotNt.signature(), (&words(11)[..], None));
        assert_eq!(Callee::DotNn.signature(), (&words(18)[..], None));
        assert_eq!(Callee::Exp2Columns.signature(), (&words(6)[..], None));
        assert_eq!(Callee::ColumnMax.signature(), (&words(5)[..], None));
        assert_eq!(Callee::PackRows.signature(), (&words(7)[..], None));
        let mut pack_columns = words(9);
        pack_columns[4] = Param::F32; // the scale factor
        assert_eq!(Callee::PackColumns.signature(), (&pack_columns[..], None));
        assert_eq!(Callee::Ln.signature(), (&[Param::F32][..], Some(Param::F32)));
        assert_eq!(
            (ItemFn::PARAMS.len(), FinishFn::PARAMS.len(), HeadFn::PARAMS.len()),
            (11, 8, 2)
        );
    }
}
