//! The vector primitives every micro-kernel is written against, and the macro that stamps the
//! kernels out for one ISA.
//!
//! An ISA is a type implementing [`Simd`]: a vector of `LANES` f32s, a lane mask, a dozen
//! element-wise operations, the integer step of `exp2`, a four-way horizontal sum and a 4-row
//! transpose — plus the block sizes its register file affords and whether a short product
//! pulls its operand into L1 (a choice measured on each ISA's CPUs). The kernels (`dot_nt`,
//! `dot_nn`, `exp2_columns`, `column_max`, `pack_columns`) are generic over it and
//! `#[inline(always)]` all the way down; [`stamp_routines!`] wraps them in `extern "C"` entry
//! points compiled with the ISA's target features, so LLVM inlines every primitive into code
//! built for that ISA.
//!
//! A new ISA is one module of code (`neon.rs` is the model: 4 lanes, no lane masks, its
//! architecture's intrinsics): an implementation of `Simd` and one `stamp_routines!` line, whose
//! compile-time checks hold the block sizes to what the kernels dispatch. It is then
//! registered, a line or an arm each, where ISAs are listed:
//! [`super::Isa`] (its name, detection and routines), the plan's `Target` (its lanes),
//! `attngen_codegen::rust::ISA_VERSIONS` (the attribute kernels' version and target features;
//! a test holds it to `Isa::ALL`), `crate::__private` (the routines those versions call) and
//! the command's FMA peak probe.

/// One ISA's vector primitives. Every function is `unsafe`: it may be called only from code
/// compiled with the ISA's target features (an entry point [`stamp_routines!`] made) on a CPU
/// that has them, and pointers must name `LANES` valid floats (or the lanes a mask selects).
pub trait Simd: Copy + 'static {
    /// f32 lanes per vector; divides [`attngen_codegen::abi::PANEL`].
    const LANES: usize;
    /// Rows of A per `dot_nt` block.
    const NT_MR: usize;
    /// Rows of B per `dot_nt` block.
    const NT_NR: usize;
    /// Rows of A per `dot_nn` block: at most 8 with `NN_NR <= 2`, at most 6 with `NN_NR <= 4`.
    const NN_MR: usize;
    /// Vectors of C's columns per `dot_nn` block: whole [`attngen_codegen::abi::PANEL`]s, as
    /// every block starts on one of B's panels.
    const NN_NR: usize;
    /// Rows of A per `dot_nn` block when C is at least `NN_WIDE_NR` vectors wide: a wider block
    /// of fewer rows loads fewer operands per FMA (`NN_WIDE_NR + NN_WIDE_MR` loads for
    /// `NN_WIDE_MR · NN_WIDE_NR` FMAs). ISAs without the registers for it repeat `NN_MR`.
    const NN_WIDE_MR: usize;
    /// Vectors of C's columns per wide `dot_nn` block (ISAs without it: `NN_NR`).
    const NN_WIDE_NR: usize;
    /// Whether `dot_nn` has tall blocks here: [`super::dot_nn::TALL_MR`] rows by one vector,
    /// for row-major A rows a constant stride apart. Each needs a register per row of C beside
    /// B's vector: 17 of AVX-512's 32, more than AVX2 has.
    const NN_TALL: bool;
    /// Whether a short product's operand — a decode item's K or V tile, its rows a token row
    /// apart — is asked into L1 when the product starts ([`super::prefetch_rows_to_l1`]), on
    /// top of the tile-ahead prefetch into L2. It paid on a Zen 5 (AVX-512: W7 0.90–0.99× the
    /// time, W4 0.92–0.98×) and cost on an AVX2-only Zen 3, where in one process, the JIT's
    /// calls alternating with and without it, W4 took 0.95× the time without it on 2 threads
    /// and 0.97× on one, W7 0.97× (medians of 56 pairs; quartiles 0.87–1.03). AVX2 therefore
    /// leaves the tile to the demand loads; NEON and the portable ISA, unmeasured, ask as
    /// AVX-512 does.
    const PREFETCHES_SHORT_OPERANDS: bool;

    /// A vector of `LANES` f32s.
    type V: Copy;
    /// A selection of the first few lanes, for partial loads and stores.
    type Mask: Copy;

    /// All lanes 0.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// `LANES` floats from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` floats to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `len` lanes, `len <= LANES`.
    unsafe fn mask(len: usize) -> Self::Mask;
    /// The masked lanes from `p`, the others 0; never touches memory of unselected lanes.
    unsafe fn load_masked(p: *const f32, mask: Self::Mask) -> Self::V;
    /// The masked lanes to `p`; never touches memory of unselected lanes.
    unsafe fn store_masked(p: *mut f32, mask: Self::Mask, v: Self::V);
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a − b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c`, rounded once (exp2's polynomial, which every ISA rounds alike).
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a · b + c`, rounded once where the ISA has a fused multiply-add and twice where it
    /// would have to emulate one (the products' accumulate step).
    unsafe fn mul_acc(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a > b ? a : b` per lane (x86's `maxps`): a NaN in either operand gives `b`.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `2^n` for a vector `t = n + 1.5·2²³` holding the integer n in its low mantissa bits: the
    /// bits `(bits(t) + 127) << 23` (`attngen_codegen::abi::exp2`'s last step).
    unsafe fn pow2_of_rounded(t: Self::V) -> Self::V;
    /// The sum of the lanes of each of four vectors.
    unsafe fn hsum4(v: [Self::V; 4]) -> [f32; 4];
    /// Writes four rows transposed: lane d of `rows[r]` to `dst[d·stride + r]`, for every lane
    /// d (four consecutive floats per lane).
    unsafe fn store_transposed4(rows: [Self::V; 4], dst: *mut f32, stride: usize);
}

/// Defines the ISA's `extern "C"` routines — `dot_nt`, `dot_nn`, `exp2_columns`, `column_max`
/// and `pack_columns`, with the signatures of [`super::DotNt`] and friends — as the generic
/// kernels over `$simd`, compiled with `$features` (none for the portable ISA).
macro_rules! stamp_routines {
    ($simd:ty $(, $features:literal)?) => {
        /// See [`super::DotNt`].
        ///
        /// # Safety
        /// The CPU has this ISA's features; buffers as [`super::DotNt`] describes.
        $(#[target_feature(enable = $features)])?
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
            prefetch: *const attngen_codegen::abi::PrefetchRows,
        ) {
            // SAFETY: the caller's contract, which is the kernel's.
            unsafe {
                super::dot_nt::dot_nt::<$simd>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, prefetch)
            }
        }

        /// See [`super::DotNn`].
        ///
        /// # Safety
        /// The CPU has this ISA's features; buffers as [`super::DotNn`] describes.
        $(#[target_feature(enable = $features)])?
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
            c_col: usize,
            accumulate: usize,
            row_lo: *const i32,
            row_hi: *const i32,
            col_lo: *const i32,
            col_hi: *const i32,
            prefetch: *const attngen_codegen::abi::PrefetchRows,
        ) {
            // SAFETY: the caller's contract, which is the kernel's.
            unsafe {
                super::dot_nn::dot_nn::<$simd>(
                    m, n, k, a, a_row, a_col, b, b_row, b_panel, c, ldc, c_col, accumulate,
                    row_lo, row_hi, col_lo, col_hi, prefetch,
                )
            }
        }

        /// See [`super::Exp2Columns`].
        ///
        /// # Safety
        /// The CPU has this ISA's features; buffers as [`super::Exp2Columns`] describes.
        $(#[target_feature(enable = $features)])?
        pub unsafe extern "C" fn exp2_columns(
            keys: usize,
            columns: usize,
            s: *mut f32,
            ld: usize,
            m: *const f32,
            l: *mut f32,
        ) {
            // SAFETY: the caller's contract, which is the kernel's.
            unsafe { super::exp2::exp2_columns::<$simd>(keys, columns, s, ld, m, l) }
        }

        /// See [`super::ColumnMax`].
        ///
        /// # Safety
        /// The CPU has this ISA's features; buffers as [`super::ColumnMax`] describes.
        $(#[target_feature(enable = $features)])?
        pub unsafe extern "C" fn column_max(
            keys: usize,
            columns: usize,
            s: *const f32,
            ld: usize,
            max: *mut f32,
        ) {
            // SAFETY: the caller's contract, which is the kernel's.
            unsafe { super::column_max::column_max::<$simd>(keys, columns, s, ld, max) }
        }

        /// See [`super::PackColumns`].
        ///
        /// # Safety
        /// The CPU has this ISA's features; buffers as [`super::PackColumns`] describes.
        $(#[target_feature(enable = $features)])?
        pub unsafe extern "C" fn pack_columns(
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
            // SAFETY: the caller's contract, which is the kernel's.
            unsafe {
                super::pack::pack_columns::<$simd>(
                    rows, width, src, src_row, factor, dst, first_column, dst_panel, dst_row,
                )
            }
        }

        impl super::dot_nn::OutOfLine for $simd {
            $(#[target_feature(enable = $features)])?
            unsafe fn run_block(
                nn: &super::dot_nn::NnArgs,
                i: usize,
                mr: usize,
                j: usize,
                cols: usize,
                lo: usize,
                hi: usize,
                accumulate: bool,
            ) {
                // SAFETY: the caller's contract, which is the kernel's.
                unsafe { super::dot_nn::run_block::<$simd>(nn, i, mr, j, cols, lo, hi, accumulate) }
            }

            $(#[target_feature(enable = $features)])?
            unsafe fn copied_column(
                nn: &super::dot_nn::NnArgs,
                m: usize,
                j: usize,
                k: usize,
                wide: bool,
                accumulate: bool,
                prefetcher: &mut Option<super::Prefetcher>,
            ) {
                // SAFETY: the caller's contract, which is the kernel's.
                unsafe {
                    super::dot_nn::copied_column::<$simd>(nn, m, j, k, wide, accumulate, prefetcher)
                }
            }
        }

        /// This ISA's routines.
        pub const ROUTINES: super::Routines = super::Routines {
            dot_nt,
            dot_nn,
            exp2_columns,
            column_max,
            pack_columns,
        };

        const _: () = assert!(
            attngen_codegen::abi::PANEL % <$simd as super::Simd>::LANES == 0,
            "a vector never straddles a B panel"
        );
        const _: () = assert!(
            <$simd as super::Simd>::NT_MR <= 4 && <$simd as super::Simd>::NT_NR <= 4,
            "dot_nt dispatches blocks of at most 4 x 4"
        );
        const _: () = assert!(
            super::dot_nn::full_shape(
                <$simd as super::Simd>::NN_MR,
                <$simd as super::Simd>::NN_NR
            ) && super::dot_nn::full_shape(
                <$simd as super::Simd>::NN_WIDE_MR,
                <$simd as super::Simd>::NN_WIDE_NR
            ),
            "dot_nn's strip copy and constant strides have a block of each of the ISA's shapes"
        );
        const _: () = assert!(
            (<$simd as super::Simd>::NN_MR <= 8 && <$simd as super::Simd>::NN_NR <= 2)
                || (<$simd as super::Simd>::NN_MR <= 6 && <$simd as super::Simd>::NN_NR <= 4),
            "dot_nn dispatches blocks of at most 8 rows by 2 vectors or 6 rows by 4"
        );
        const _: () = assert!(
            <$simd as super::Simd>::NN_WIDE_MR <= 6 && <$simd as super::Simd>::NN_WIDE_NR <= 4,
            "dot_nn dispatches wide blocks of at most 6 rows by 4 vectors"
        );
        const _: () = assert!(
            <$simd as super::Simd>::NN_WIDE_NR * <$simd as super::Simd>::LANES
                <= super::dot_nn::BLOCK_PANELS * attngen_codegen::abi::PANEL
                && <$simd as super::Simd>::NN_NR * <$simd as super::Simd>::LANES
                    <= super::dot_nn::BLOCK_PANELS * attngen_codegen::abi::PANEL,
            "dot_nn's blocks span at most BLOCK_PANELS panels"
        );
        const _: () = assert!(
            (<$simd as super::Simd>::NN_WIDE_NR * <$simd as super::Simd>::LANES)
                % attngen_codegen::abi::PANEL
                == 0
                && (<$simd as super::Simd>::NN_NR * <$simd as super::Simd>::LANES)
                    % attngen_codegen::abi::PANEL
                    == 0,
            "dot_nn's blocks are whole panels wide, so each starts on a B panel"
        );
    };
}

pub(super) use stamp_routines;
