//! Pre-compiled tile routines that generated code calls, chosen per CPU.
//!
//! Two tile products:
//! - [`DotNn`]: `C (+)= A · B` with A row- or column-major and B in column panels — both
//!   products of a flash tile (`Sᵀ = K·Qᵀ` and `O += P·V`) and MLA's query absorption
//!   `q' = q_nope·W_UK`; optional per-row key ranges restrict edge tiles so a hidden key's
//!   value never meets a row that cannot see it (not even as `0 · NaN`);
//! - [`DotNt`]: `C (+)= A · Bᵀ` with A and B both row-major — scores `Sᵀ = K·Qᵀ` as dot
//!   products when an item has only a few rows (decode: a broadcast per key element would
//!   waste most of each vector), and MLA's output projection `out = o'·W_UVᵀ`.
//!
//! Two passes over a score tile, at the full vector width (the JIT's generated code is limited
//! to 128-bit vectors): its max down the columns, [`ColumnMax`] (on whole tiles of an uncapped
//! spec), and its exponentials, [`Exp2Columns`]: `P = 2^(s − m)` in place with its column
//! sums.
//!
//! Two tile copies: [`PackRows`] (a K/V tile into scratch; a plain copy, the same on every ISA)
//! and [`PackColumns`] (query rows, transposed and scaled in registers).
//!
//! The routines are written once, generic over a small set of vector primitives
//! ([`primitives::Simd`]), and stamped out per ISA: [`Isa::Avx512`] (`avx512`),
//! [`Isa::Avx2Fma`] (`avx2`), [`Isa::Neon`] (`neon`) and [`Isa::Portable`] (`portable`), each
//! module an implementation of the primitives and their register-block sizes.
//!
//! Cache rows of one KV head lie `kv_heads · D` floats apart — a page apart for common shapes —
//! and hardware prefetchers stop at page boundaries, so without help every row of a tile is a
//! demand miss. The products therefore prefetch the rows the item reads next ([`PrefetchRows`]:
//! their group's share of the next key tile, or with wide tiles the next group's rows) a few
//! lines per block while they compute.
//! Contiguous rows (one KV head, MLA's latent) are left to the hardware prefetchers.
//!
//! Everything else — loop nest, group mapping, masks, the online softmax's cap, edge tiles'
//! max and the rescale, splits and merges — is generated per spec.

// The kernels take BLAS-style (sizes, pointer, leading dimension) argument lists.
#![allow(clippy::too_many_arguments)]

use attngen_codegen::Target;
use attngen_codegen::abi::PrefetchRows;

use crate::Error;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
mod column_max;
mod dot_nn;
mod dot_nt;
mod exp2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
mod pack;
pub(crate) mod portable;
mod primitives;

pub use pack::pack_rows;
use primitives::{Simd, stamp_routines};

pub use attngen_codegen::abi::{ColumnMax, DotNn, DotNt, Exp2Columns, PackColumns, PackRows};

/// Terms [`DotNn`] sums in one chain before adding the partial sum to C: a long product
/// (MLA's 512-wide latent scores) then rounds like `64 + k/64` additions, not `k`.
const SUM_CHUNK: usize = 64;

/// The key range `lo..hi` of row `i` for [`DotNn`]: all of `0..k` without range tables, else
/// the tables' entries clamped to `0..k` (empty when `hi <= lo`).
///
/// # Safety
/// `row_lo` is null, or `row_lo` and `row_hi` point to at least `i + 1` i32s.
unsafe fn row_keys(row_lo: *const i32, row_hi: *const i32, i: usize, k: usize) -> (usize, usize) {
    if row_lo.is_null() {
        return (0, k);
    }
    // SAFETY: the caller guarantees both tables reach entry i.
    let (lo, hi) = unsafe { (*row_lo.add(i), *row_hi.add(i)) };
    let clamp = |x: i32| (x.max(0) as usize).min(k);
    (clamp(lo), clamp(hi).max(clamp(lo)))
}

/// Issues the prefetches a [`PrefetchRows`] names (its share of the rows' lines), spread
/// evenly over `steps` calls of [`Prefetcher::step`].
struct Prefetcher {
    base: *const u8,
    stride: usize,
    lines_per_row: usize,
    per_step: usize,
    row: usize,
    line: usize,
    /// Lines of the share not yet prefetched.
    left: usize,
}

/// Bytes per cache line, the prefetch granularity.
const LINE: usize = 64;

impl Prefetcher {
    /// A prefetcher for `desc` (none for null) over `steps` steps.
    ///
    /// # Safety
    /// `desc` is null or points to a valid [`PrefetchRows`].
    unsafe fn new(desc: *const PrefetchRows, steps: usize) -> Option<Prefetcher> {
        // SAFETY: the caller's contract.
        let desc = unsafe { desc.as_ref() }?;
        let lines_per_row = (desc.width * 4).div_ceil(LINE).max(1);
        let lines = desc.rows.saturating_mul(lines_per_row);
        let share = lines.div_ceil(desc.parts.max(1));
        let first = desc.part.saturating_mul(share).min(lines);
        let left = share.min(lines - first);
        Some(Prefetcher {
            base: desc.base.cast(),
            stride: desc.stride * 4,
            lines_per_row,
            per_step: left.div_ceil(steps.max(1)),
            row: first / lines_per_row,
            line: first % lines_per_row,
            left,
        })
    }

    /// Prefetches the next `per_step` lines of the share.
    fn step(&mut self) {
        for _ in 0..self.per_step {
            let Some(offset) = self.next_line() else { return };
            prefetch(self.base.wrapping_add(offset));
        }
    }

    /// The byte offset from `base` of the share's next line, if any is left.
    fn next_line(&mut self) -> Option<usize> {
        self.left = self.left.checked_sub(1)?;
        let offset = self.row * self.stride + self.line * LINE;
        self.line += 1;
        if self.line == self.lines_per_row {
            (self.row, self.line) = (self.row + 1, 0);
        }
        Some(offset)
    }
}

/// Asks for the cache line at `at` into L2 (T1); never faults, whatever the address.
///
/// Into L2 rather than L1: a decode item prefetches a whole tile ahead, 64 KiB and more, which
/// is more than L1's fill buffers hold in flight; an L1 prefetch stalls behind them, and the
/// lines it brings are evicted before use. Measured in alternating runs on an AVX-512 Xeon:
/// long-context GQA decode (W7) went from 90% to 96–106% of the time of reading its cache
/// once, W4 from 87–89% to 93–94%, W8 from 49% to 57–64% of the read bandwidth.
#[inline(always)]
fn prefetch(at: *const u8) {
    prefetch_into::<INTO_L2>(at);
}

/// x86's `_MM_HINT_T0` (into L1 and the levels below; aarch64's `prfm pldl1keep`), named
/// where every target can use it.
const INTO_L1: i32 = 3;
/// x86's `_MM_HINT_T1` (into L2 and below; aarch64's `prfm pldl2keep`).
const INTO_L2: i32 = 2;

/// Asks for the cache line at `at` into the level `HINT` names ([`INTO_L1`] or [`INTO_L2`]);
/// never faults, whatever the address; nothing on architectures other than x86-64 and aarch64.
#[inline(always)]
fn prefetch_into<const HINT: i32>(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint with no architectural effect; any address is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<HINT>(at.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint: it never faults, whatever the address, reads no memory the
    // program sees and writes no register or flag.
    unsafe {
        use std::arch::asm;
        match HINT {
            INTO_L1 => {
                asm!("prfm pldl1keep, [{0}]", in(reg) at, options(nostack, readonly, preserves_flags))
            }
            _ => {
                asm!("prfm pldl2keep, [{0}]", in(reg) at, options(nostack, readonly, preserves_flags))
            }
        }
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = at;
}

/// Floats of a short product's operand that [`prefetch_rows_to_l1`] pulls into L1 when the
/// product starts (8 KiB, a sixth of a 48 KiB L1): a decode item's K or V tile, 8 keys of one KV
/// head, is 8 rows of 512 bytes a whole token row (4 KiB and more) apart. The item prefetched
/// them into L2 a tile ahead, but page-strided rows are not what the L1's prefetchers follow,
/// so each row's lines would otherwise arrive one demand miss at a time; asked for at once,
/// they arrive together. On a Zen 5, in ten alternating runs each with the cache in DRAM,
/// long-context GQA decode (W7) took 0.90–0.99× the time and W4 0.92–0.98× (one run 1.035),
/// mostly from the value product's tile (AVX2 forced: 0.98×); absorbed MLA and prefill, whose
/// products are larger, read 0.99–1.01×. Only ISAs with [`Simd::PREFETCHES_SHORT_OPERANDS`] ask.
const L1_OPERAND_FLOATS: usize = 2048;

/// Asks for the lines of `rows` rows of `width` floats, `stride` floats apart from `base`, into
/// L1 (T0), when they hold at most [`L1_OPERAND_FLOATS`] floats and the ISA
/// [`Simd::PREFETCHES_SHORT_OPERANDS`]; never faults, whatever the addresses.
#[inline(always)]
fn prefetch_rows_to_l1<S: Simd>(base: *const f32, rows: usize, stride: usize, width: usize) {
    if !S::PREFETCHES_SHORT_OPERANDS {
        return;
    }
    short_operand_lines(rows, stride, width, |offset| {
        prefetch_into::<INTO_L1>(base.cast::<u8>().wrapping_add(offset));
    });
}

/// Calls `f` with the byte offset of every cache line that `rows` rows of `width` floats,
/// `stride` floats apart, touch (a row starting on a line, as every tile row does), row by
/// row — when they hold at most [`L1_OPERAND_FLOATS`] floats, else never. A plain walk rather
/// than a [`Prefetcher`], whose shares spread over steps (and whose per-line bookkeeping paces
/// a tile-ahead stream from DRAM) an operand about to be read does not need.
#[inline(always)]
fn short_operand_lines(rows: usize, stride: usize, width: usize, mut f: impl FnMut(usize)) {
    if rows.saturating_mul(width) > L1_OPERAND_FLOATS {
        return;
    }
    let (stride, lines) = (stride * size_of::<f32>(), (width * size_of::<f32>()).div_ceil(LINE));
    for row in 0..rows {
        for line in 0..lines {
            f(row * stride + line * LINE);
        }
    }
}

/// An instruction set the micro-kernels are compiled for.
///
/// [`Isa::detect`] picks the first of [`Isa::ALL`] this CPU has (the widest vectors of its
/// architecture); `ATTNGEN_ISA=avx512|avx2|neon|portable` ([`Isa::from_env`]) or
/// [`crate::JitOptions::isa`] forces another it has, for comparison and tests. More ISAs may
/// come, so a `match` outside attngen needs a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// x86-64 with AVX-512F: 512-bit vectors, 32 registers.
    Avx512,
    /// x86-64 with AVX2 and FMA: 256-bit vectors.
    Avx2Fma,
    /// AArch64 with NEON (Advanced SIMD, which every AArch64 Linux CPU has): 128-bit vectors,
    /// 32 registers.
    Neon,
    /// Plain Rust over 8-lane arrays that the compiler may auto-vectorise; runs anywhere.
    Portable,
}

impl Isa {
    /// Every ISA, in the order [`Isa::detect`] prefers them: x86-64's widest first, then
    /// AArch64's, then the portable code that runs anywhere.
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2Fma, Isa::Neon, Isa::Portable];

    /// The first ISA of [`Isa::ALL`] this CPU supports: its widest vectors.
    pub fn detect() -> Isa {
        Isa::ALL.into_iter().find(|isa| isa.is_supported()).unwrap_or(Isa::Portable)
    }

    /// The ISAs this CPU supports, in [`Isa::ALL`]'s order (always ends with `Portable`).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
    }

    /// Whether this CPU (and this build's target) can run the ISA's routines.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f") && Isa::Avx2Fma.is_supported()
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            Isa::Portable => true,
            // The ISAs of other architectures.
            _ => false,
        }
    }

    /// The ISA `ATTNGEN_ISA` asks for, if set to anything but blanks (`ATTNGEN_ISA=` clears it,
    /// as for most variables); the name's case does not matter.
    ///
    /// # Errors
    /// [`Error::Isa`] when the value is not an ISA's name or this CPU lacks that ISA.
    pub fn from_env() -> Result<Option<Isa>, Error> {
        match std::env::var("ATTNGEN_ISA") {
            Ok(value) if value.trim().is_empty() => Ok(None),
            Ok(value) => value.parse::<Isa>().and_then(Isa::checked).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(value)) => Err(Error::Isa {
                requested: value.to_string_lossy().into_owned(),
                reason: "not an ISA name".to_owned(),
            }),
        }
    }

    /// `self` if this CPU supports it.
    ///
    /// # Errors
    /// [`Error::Isa`], listing the ISAs this CPU does support.
    pub fn checked(self) -> Result<Isa, Error> {
        if self.is_supported() {
            return Ok(self);
        }
        let have: Vec<&str> = Isa::available().into_iter().map(Isa::name).collect();
        Err(Error::Isa {
            requested: self.name().to_owned(),
            reason: format!("this CPU lacks it (it has: {})", have.join(", ")),
        })
    }

    /// The short name `ATTNGEN_ISA` and reports use: `avx512`, `avx2`, `neon` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    /// f32 lanes per vector of the micro-kernels.
    pub fn lanes(self) -> usize {
        self.target().lanes
    }

    /// What a kernel's plan takes from this ISA (`KernelPlan::all`).
    pub fn target(self) -> Target {
        match self {
            Isa::Avx512 => Target::AVX512,
            Isa::Avx2Fma => Target::AVX2,
            Isa::Neon => Target::NEON,
            Isa::Portable => Target::PORTABLE,
        }
    }

    /// The routines for this ISA: only for an ISA [`Isa::is_supported`] accepts (the others
    /// would execute instructions this CPU lacks; [`Isa::checked`] verifies).
    pub fn routines(self) -> Routines {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::ROUTINES,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => avx2::ROUTINES,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => neon::ROUTINES,
            _ => portable::ROUTINES,
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = Error;

    /// An ISA's name, `avx512`, `avx2`, `neon` or `portable`, in any case.
    fn from_str(name: &str) -> Result<Isa, Error> {
        let wanted = |isa: &Isa| isa.name().eq_ignore_ascii_case(name.trim());
        Isa::ALL.into_iter().find(wanted).ok_or_else(|| Error::Isa {
            requested: name.to_owned(),
            reason: "not an ISA name (avx512, avx2, neon or portable)".to_owned(),
        })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The ISA-specific routines generated code calls (the row copy is the same everywhere).
#[derive(Clone, Copy, Debug)]
pub struct Routines {
    /// See [`DotNt`].
    pub dot_nt: DotNt,
    /// See [`DotNn`].
    pub dot_nn: DotNn,
    /// See [`Exp2Columns`].
    pub exp2_columns: Exp2Columns,
    /// See [`ColumnMax`].
    pub column_max: ColumnMax,
    /// See [`PackColumns`].
    pub pack_columns: PackColumns,
}

#[cfg(test)]
mod tests {
    use super::*;
    use attngen_codegen::abi::PANEL;

    /// ISA names read in any case and with blanks around; anything else is an error naming it.
    #[test]
    fn isa_names_parse_in_any_case() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
            assert_eq!(format!(" {} ", isa.name().to_uppercase()).parse::<Isa>(), Ok(isa));
        }
        for bad in ["", "sve", "avx"] {
            let error = bad.parse::<Isa>().unwrap_err();
            assert!(error.to_string().contains("not an ISA name"), "{error}");
        }
    }

    /// The attribute kernels are stamped for exactly these ISAs, in [`Isa::ALL`]'s order, each
    /// under its name, variant and plan target: an ISA added here and not there (or there and
    /// not here) fails.
    #[test]
    fn attribute_kernels_are_stamped_for_every_isa() {
        let versions = attngen_codegen::rust::ISA_VERSIONS;
        assert_eq!(versions.len(), Isa::ALL.len());
        for (version, isa) in versions.into_iter().zip(Isa::ALL) {
            assert_eq!((version.module, version.target), (isa.name(), isa.target()));
            assert_eq!(version.variant, format!("{isa:?}"));
        }
    }

    /// The shares of a [`PrefetchRows`] cut its lines, in row-major order, into consecutive
    /// runs that together name every line once; `steps` steps issue the whole share.
    #[test]
    fn prefetch_shares_partition_the_lines() {
        let (rows, stride, width) = (5, 100, 40); // 160 bytes: 3 lines per row
        let all: Vec<usize> =
            (0..rows).flat_map(|r| (0..3).map(move |l| r * stride * 4 + l * LINE)).collect();
        for parts in 1..=17 {
            let mut seen = Vec::new();
            for part in 0..parts {
                let desc =
                    PrefetchRows { base: std::ptr::null(), rows, stride, width, part, parts };
                for steps in [1, 2, 7] {
                    // SAFETY: desc is a valid descriptor.
                    let mut p = unsafe { Prefetcher::new(&desc, steps) }.unwrap();
                    let share = p.left;
                    (0..steps).for_each(|_| p.step());
                    assert_eq!(p.left, 0, "{steps} steps issue share {part} of {parts}");
                    assert!(share <= all.len().div_ceil(parts));
                }
                // SAFETY: as above.
                let mut p = unsafe { Prefetcher::new(&desc, 1) }.unwrap();
                seen.extend(std::iter::from_fn(|| p.next_line()));
            }
            assert_eq!(seen, all, "{parts} shares");
        }
    }

    /// The L1 prefetch of a short product's operand names every line its rows touch, once,
    /// and nothing between the rows; an operand over [`L1_OPERAND_FLOATS`] gets none; wild
    /// addresses are only hints, never faults.
    #[test]
    fn l1_prefetch_names_each_line_of_short_operands_once() {
        let lines = |rows, stride, width| {
            let mut seen = Vec::new();
            short_operand_lines(rows, stride, width, |offset| seen.push(offset));
            seen
        };
        // 3 rows of 40 floats (160 bytes: 3 lines), 1024 floats apart.
        assert_eq!(lines(3, 1024, 40), [0, 64, 128, 4096, 4160, 4224, 8192, 8256, 8320]);
        // A decode item's 8 × 128 tile, rows a Llama-3-8B token row apart: 8 lines a row.
        let tile = lines(8, 1024, 128);
        assert_eq!(tile.len(), 64);
        assert_eq!((tile[7], tile[8], tile[63]), (448, 4096, 7 * 4096 + 448));
        // At the limit every line; one float more, none.
        assert_eq!(lines(16, 128, 128).len(), L1_OPERAND_FLOATS / 16);
        assert!(lines(1, 0, L1_OPERAND_FLOATS + 1).is_empty());
        assert!(lines(usize::MAX, 1, 2).is_empty());
        prefetch_rows_to_l1::<portable::Portable>(std::ptr::null(), 8, 1 << 40, 128);
    }

    /// The named hints are x86's.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn prefetch_hints_are_x86s() {
        assert_eq!(INTO_L1, std::arch::x86_64::_MM_HINT_T0);
        assert_eq!(INTO_L2, std::arch::x86_64::_MM_HINT_T1);
    }

    /// The ISAs this CPU runs, each tested; the others are named as skipped, never passed.
    fn tested_isas() -> Vec<Isa> {
        for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
            println!("skipped: the {isa} routines (this CPU lacks {isa})");
        }
        Isa::available()
    }

    /// Each ISA maps to its own routines (a fallback to another ISA's would pass every
    /// correctness test).
    #[test]
    fn each_isa_has_routines_of_its_own() {
        let isas = tested_isas();
        for (i, a) in isas.iter().enumerate() {
            for b in &isas[i + 1..] {
                let (ra, rb) = (a.routines(), b.routines());
                assert_ne!(ra.dot_nn as usize, rb.dot_nn as usize, "{a} and {b}");
                assert_ne!(ra.dot_nt as usize, rb.dot_nt as usize, "{a} and {b}");
                assert_ne!(ra.exp2_columns as usize, rb.exp2_columns as usize, "{a} and {b}");
                assert_ne!(ra.column_max as usize, rb.column_max as usize, "{a} and {b}");
                assert_ne!(ra.pack_columns as usize, rb.pack_columns as usize, "{a} and {b}");
            }
        }
    }

    /// The bit patterns of `v`, for comparisons that tell NaNs and signed zeros apart.
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
            .map(|x| x as f32 / 500.0 - 1.0)
            .collect()
    }

    /// What `C[i][j]`, at `before[at]`, holds before the product is added: its old value when
    /// accumulating or past column n (never written), else 0.
    fn initial(before: &[f32], at: usize, j: usize, n: usize, accumulate: usize) -> f64 {
        if accumulate == 1 || j >= n { before[at] as f64 } else { 0.0 }
    }

    /// `C = A·B` by `isa`'s `dot_nn`, A `m × k` row-major, B `k` rows of panel-packed columns
    /// (at least `n`), C `m × n`, with optional column tables.
    fn packed_product(
        isa: Isa,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        columns: Option<(&[i32], &[i32])>,
    ) {
        assert!(a.len() >= m * k && b.len() >= k * n.next_multiple_of(PANEL) && c.len() >= m * n);
        let null = std::ptr::null();
        let (col_lo, col_hi) = match columns {
            Some((lo, hi)) => {
                assert!(lo.len() >= n && hi.len() >= n);
                (lo.as_ptr(), hi.as_ptr())
            }
            None => (null, null),
        };
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        // SAFETY: the lengths asserted above hold every element the strides name; the column
        // tables, if any, hold n entries.
        unsafe {
            (isa.routines().dot_nn)(
                m,
                n,
                k,
                a,
                k,
                1,
                b,
                PANEL,
                PANEL * k,
                c,
                n,
                1,
                0,
                null,
                null,
                col_lo,
                col_hi,
                std::ptr::null(),
            )
        };
    }

    /// `C[i][j]` of [`packed_product`]'s `A·B` (A row-major, B panel-packed, `k` keys), in
    /// float64.
    fn packed_entry((a, b): (&[f32], &[f32]), k: usize, (i, j): (usize, usize)) -> f64 {
        let b_at = |p: usize| b[j / PANEL * PANEL * k + p * PANEL + j % PANEL] as f64;
        (0..k).map(|p| a[i * k + p] as f64 * b_at(p)).sum()
    }

    /// A product long enough to run in key passes (a wide C) rounds exactly like one pass (a
    /// C narrow enough to run whole): each element adds the same partial sums in the same
    /// order, so its columns match bit for bit.
    #[test]
    fn dot_nn_passes_round_like_one_pass() {
        let (m, k, wide, narrow) = (19usize, 600usize, 40usize, 8usize);
        let a = data(m * k, 7);
        let b = data(k * wide.next_multiple_of(PANEL), 8);
        for isa in tested_isas() {
            let run = |n: usize| {
                let mut c = vec![0.0f32; m * n];
                packed_product(isa, (m, n, k), &a, &b, &mut c, None);
                c
            };
            let (passes, whole) = (run(wide), run(narrow));
            for i in 0..m {
                for j in 0..narrow {
                    assert_eq!(
                        passes[i * wide + j].to_bits(),
                        whole[i * narrow + j].to_bits(),
                        "{isa:?} [{i},{j}]"
                    );
                }
            }
        }
    }

    /// `dot_nt` over every shape remainder, on every ISA this CPU has, against f64 loops.
    #[test]
    fn dot_nt_matches_naive_loops() {
        for isa in tested_isas() {
            let dot_nt = isa.routines().dot_nt;
            // (3, 50, 64) and (4, 9, 21): few rows of A, computed as Cᵀ = B·Aᵀ.
            let shapes = [
                (1, 1, 1),
                (4, 3, 8),
                (5, 7, 13),
                (9, 25, 17),
                (3, 50, 64),
                (7, 2, 3),
                (4, 9, 21),
                (13, 10, 40),
            ];
            for (m, n, k) in shapes {
                let (lda, ldb, ldc) = (k + 3, k + 1, n + 2);
                let a = data(m * lda, 1);
                let b = data(n * ldb, 2);
                for accumulate in [0, 1] {
                    let mut c = data(m * ldc, 3);
                    let before = c.clone();
                    // SAFETY: every buffer holds the rows × leading dims the call reads/writes.
                    unsafe {
                        dot_nt(
                            m,
                            n,
                            k,
                            a.as_ptr(),
                            lda,
                            b.as_ptr(),
                            ldb,
                            c.as_mut_ptr(),
                            ldc,
                            accumulate,
                            std::ptr::null(),
                        )
                    };
                    for i in 0..m {
                        for j in 0..ldc {
                            let mut want = initial(&before, i * ldc + j, j, n, accumulate);
                            if j < n {
                                want += (0..k)
                                    .map(|p| a[i * lda + p] as f64 * b[j * ldb + p] as f64)
                                    .sum::<f64>();
                            }
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{isa:?} nt {m}x{n}x{k} [{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `dot_nn` over every block remainder, both A layouts, plain (also with rows in few L1
    /// sets, copied to a strip) and panel-packed B, with and without row ranges, on every ISA
    /// this CPU has, against f64 loops.
    #[test]
    fn dot_nn_matches_naive_loops() {
        for isa in tested_isas() {
            let dot_nn = isa.routines().dot_nn;
            for (m, n, k) in [
                (1usize, 1usize, 1usize),
                (4, 3, 8),
                (5, 7, 13),
                (9, 25, 17),
                (13, 50, 64),
                (7, 2, 3),
                // One row block over whole panels and a ragged one (decode's value product),
                // and over several key chunks (MLA's absorption).
                (4, 40, 8),
                (6, 32, 5),
                (3, 48, 29),
                // Two-panel blocks (16 lanes) with row and column remainders.
                (17, 33, 70),
                (8, 64, 9),
                // One-panel C over several row blocks (absorbed MLA's latent scores): keys in
                // unrolled groups and a remainder, with A's next rows prefetched. With A's rows
                // a tall stride apart (below), AVX-512's tall blocks: one, or several and a
                // narrow remainder (of up to 8 rows, or more, split), C's vector whole or
                // masked, the latent's 512 + 64 keys in passes.
                (20, 16, 45),
                (16, 16, 64),
                (37, 16, 45),
                (29, 12, 70),
                (33, 16, 200),
                (21, 16, 300),
                (48, 16, 576),
                (40, 9, 520),
                // A strip of B past L1 on every ISA: passes of key_chunk keys, the last ragged
                // (expanded MLA's up-projection).
                (19, 40, 600),
                // C at least 64 columns wide (AVX-512's 6 × 4 blocks): whole wide blocks with a
                // row remainder; a masked 3-vector edge block; two wide column blocks, a masked
                // one-vector edge and a 2-row remainder; wide blocks in several key passes.
                (17, 64, 20),
                (13, 100, 33),
                (26, 130, 70),
                (14, 80, 300),
                // A C tall enough for B's strip copy (with rows in few L1 sets): whole column
                // blocks copied, a ragged edge column block read in place.
                (70, 72, 24),
            ] {
                let ldc = n + 1;
                // The smallest row stride blocks take as a constant that holds k floats.
                let const_row = dot_nn::CONST_STRIDES.into_iter().find(|&row| row >= k);
                let a = data(m * const_row.unwrap_or(k).max(k + 3) + 3 * (m + k), 4);
                // Prefetching (here: A itself, and rows past its end) never changes a result.
                let prefetch = PrefetchRows {
                    base: a.as_ptr(),
                    rows: k + 9,
                    stride: m,
                    width: 40,
                    part: 1,
                    parts: 3,
                };
                // Rows 512 bytes apart: in a tall C, the first row block copies each column
                // block's strip and the others read the copy.
                let few_sets_row = (n + 5).next_multiple_of(8 * PANEL);
                let b = data(k * few_sets_row + 5 * k, 5);
                let lo: Vec<i32> = (0..m as i32).map(|i| i % 3 - 1).collect();
                let hi: Vec<i32> = (0..m as i32).map(|i| k as i32 - i + 1).collect();
                // The rows each column needs: a staircase, clamped at both ends.
                let col_lo: Vec<i32> = (0..n as i32).map(|j| j % 5 - 2).collect();
                let col_hi: Vec<i32> = (0..n as i32).map(|j| m as i32 + 1 - 3 * (j % 7)).collect();
                let needs = |i: usize, j: usize| {
                    let (l, h) = (col_lo[j].clamp(0, m as i32), col_hi[j].clamp(0, m as i32));
                    (l as usize..h as usize).contains(&i)
                };
                // (a_row, a_col) and (b_row, b_panel).
                let const_layout = const_row.map(|row| (row, 1));
                let a_layouts = [(k + 2, 1), (1, m + 3)].into_iter().chain(const_layout);
                let b_layouts = [(n + 5, PANEL), (PANEL, PANEL * k), (few_sets_row, PANEL)];
                for (a_row, a_col) in a_layouts {
                    for (b_row, b_panel) in b_layouts {
                        let cases = [
                            (0, false, false),
                            (1, false, false),
                            (1, true, false),
                            (0, true, false),
                            (0, false, true),
                            (1, false, true),
                        ];
                        // C row-major, or column-major (absorbed MLA's transposed O).
                        let c_layouts = [(ldc, 1, m * ldc), (1, m + 2, (n + 1) * (m + 2))];
                        let all = cases.iter().flat_map(|case| c_layouts.map(|c| (*case, c)));
                        for ((accumulate, ranged, columns), (c_row, c_col, c_len)) in all {
                            let at = |i: usize, j: usize| i * c_row + j * c_col;
                            let mut c = data(c_len, 6);
                            // A column-major C's rows read A as 0 outside their ranges
                            // (`DotNn`): a probability tile's hidden entries.
                            let mut a = a.clone();
                            if ranged && c_col != 1 {
                                for i in 0..m {
                                    let (l, h) =
                                        (lo[i].clamp(0, k as i32), hi[i].clamp(0, k as i32));
                                    for p in (0..k).filter(|&p| p < l as usize || p >= h as usize) {
                                        a[i * a_row + p * a_col] = 0.0;
                                    }
                                }
                            }
                            let before = c.clone();
                            let (row_lo, row_hi) = if ranged {
                                (lo.as_ptr(), hi.as_ptr())
                            } else {
                                (std::ptr::null(), std::ptr::null())
                            };
                            let (c_lo, c_hi) = if columns {
                                (col_lo.as_ptr(), col_hi.as_ptr())
                            } else {
                                (std::ptr::null(), std::ptr::null())
                            };
                            // SAFETY: A, B and C hold every element their strides name for
                            // i < m, p < k, j < n; the range tables hold m entries.
                            unsafe {
                                dot_nn(
                                    m,
                                    n,
                                    k,
                                    a.as_ptr(),
                                    a_row,
                                    a_col,
                                    b.as_ptr(),
                                    b_row,
                                    b_panel,
                                    c.as_mut_ptr(),
                                    c_row,
                                    c_col,
                                    accumulate,
                                    row_lo,
                                    row_hi,
                                    c_lo,
                                    c_hi,
                                    &prefetch,
                                )
                            };
                            for i in 0..m {
                                let (l, h) = if ranged {
                                    (
                                        lo[i].clamp(0, k as i32) as usize,
                                        hi[i].clamp(0, k as i32) as usize,
                                    )
                                } else {
                                    (0, k)
                                };
                                for j in 0..=n {
                                    let mut want = initial(&before, at(i, j), j, n, accumulate);
                                    if j < n {
                                        want += (l..h.max(l))
                                            .map(|p| {
                                                let x = a[i * a_row + p * a_col] as f64;
                                                let y = b
                                                    [j / PANEL * b_panel + p * b_row + j % PANEL]
                                                    as f64;
                                                x * y
                                            })
                                            .sum::<f64>();
                                    }
                                    let got = c[at(i, j)] as f64;
                                    // f32 rounding grows with the partial sums added.
                                    let tolerance = 1e-4 * (k as f64 / 64.0).max(1.0);
                                    // An entry no column table asks for may be left as it was.
                                    let kept = got == before[at(i, j)] as f64;
                                    let optional = columns && j < n && !needs(i, j);
                                    assert!(
                                        (got - want).abs() < tolerance || (optional && kept),
                                        "{isa:?} nn {m}x{n}x{k} a ({a_row},{a_col}) b ({b_row},{b_panel}) \
                                         c ({c_row},{c_col}) acc {accumulate} ranged {ranged} \
                                         columns {columns} [{i},{j}] {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `exp2_columns` against f64 `exp2` on every ISA, over every column remainder, with
    /// masked (−∞), underflowing, NaN and maximal arguments; all ISAs agree to the bit.
    #[test]
    fn exp2_columns_match_f64_and_each_other() {
        let (keys, ld) = (7, 67);
        for columns in [1, 3, 4, 5, 8, 12, 16, 20, 37, 44, 64] {
            let mut s = data(keys * ld, 7);
            s[3 * ld] = f32::NEG_INFINITY;
            s[ld + columns / 2] = -200.0;
            s[2 * ld + columns - 1] = f32::NAN;
            let m: Vec<f32> = data(columns, 8).iter().map(|x| x * 40.0).collect();
            s[4 * ld] = m[0] + 64.0;
            let l0 = data(columns, 9);
            let results: Vec<_> = tested_isas()
                .into_iter()
                .map(|isa| {
                    let (mut p, mut l) = (s.clone(), l0.clone());
                    // SAFETY: p holds keys rows of ld >= columns floats; m and l hold columns.
                    unsafe {
                        (isa.routines().exp2_columns)(
                            keys,
                            columns,
                            p.as_mut_ptr(),
                            ld,
                            m.as_ptr(),
                            l.as_mut_ptr(),
                        )
                    };
                    (p, l)
                })
                .collect();
            let (p, l) = &results[0];
            for c in 0..columns {
                let mut sum = 0.0f64;
                for j in 0..keys {
                    let (x, got) = (s[j * ld + c] - m[c], p[j * ld + c]);
                    if x.is_nan() {
                        assert!(got.is_nan(), "[{j},{c}] NaN -> {got}");
                        continue;
                    }
                    let want = if x <= -127.0 { 0.0 } else { f64::from(x).exp2() };
                    assert!(
                        (f64::from(got) - want).abs() <= 2e-7 * want,
                        "2^{x} = {got}, not {want}"
                    );
                    sum += want;
                }
                if !sum.is_nan() && !l[c].is_nan() {
                    let want = f64::from(l0[c]) + sum;
                    assert!((f64::from(l[c]) - want).abs() <= 1e-6 * want.abs().max(1.0));
                }
            }
            // Nothing past the columns is touched.
            for j in 0..keys {
                assert_eq!(p[j * ld + columns..(j + 1) * ld], s[j * ld + columns..(j + 1) * ld]);
            }
            for other in &results[1..] {
                assert_eq!(bits(&results[0].0), bits(&other.0), "{columns} columns: P differs");
                assert_eq!(bits(&results[0].1), bits(&other.1), "{columns} columns: l differs");
            }
        }
    }

    /// `column_max` on every ISA against a plain max of the f64 values, over every column
    /// remainder and key counts on and off multiples of the partial maxima (none: −∞), with
    /// −∞ and a maximal float in the tile; a column holding NaN against the ABI's steps run
    /// literally; all ISAs agree to the bit, and nothing past the columns is written.
    #[test]
    fn column_max_matches_f64_and_each_other() {
        use attngen_codegen::abi::MAX_PARTIALS;
        // The ABI's steps: partial `j mod MAX_PARTIALS` (the remainder keys partial 0) takes
        // `s < p ? p : s`; the partials combine pairwise as `b < a ? a : b`.
        let literal = |column: &[f32]| {
            let mut partial = [f32::NEG_INFINITY; MAX_PARTIALS];
            let whole = column.len() - column.len() % MAX_PARTIALS;
            for (j, &s) in column.iter().enumerate() {
                let p = if j < whole { j % MAX_PARTIALS } else { 0 };
                partial[p] = if s < partial[p] { partial[p] } else { s };
            }
            let mut level = partial.to_vec();
            while level.len() > 1 {
                level =
                    level.chunks(2).map(|ab| if ab[1] < ab[0] { ab[0] } else { ab[1] }).collect();
            }
            level[0]
        };
        let ld = 67;
        for keys in [0, 1, 3, 4, 5, 8, 64, 66] {
            for columns in [1, 3, 4, 5, 8, 12, 16, 20, 37, 44, 64] {
                let mut s = data(keys.max(1) * ld, 11);
                if keys > 3 {
                    s[3 * ld] = f32::NEG_INFINITY;
                    s[2 * ld + columns / 2] = f32::MAX;
                    s[(keys - 1) * ld + columns - 1] = f32::NAN;
                }
                let results: Vec<Vec<f32>> = tested_isas()
                    .into_iter()
                    .map(|isa| {
                        let mut max = vec![7.0; columns + 3];
                        // SAFETY: s holds keys rows of ld >= columns floats; max holds more
                        // than `columns`.
                        unsafe {
                            (isa.routines().column_max)(
                                keys,
                                columns,
                                s.as_ptr(),
                                ld,
                                max.as_mut_ptr(),
                            )
                        };
                        max
                    })
                    .collect();
                let max = &results[0];
                for c in 0..columns {
                    let column: Vec<f32> = (0..keys).map(|j| s[j * ld + c]).collect();
                    let want = literal(&column);
                    // A NaN score may leave the max NaN or drop a partial (its row is NaN
                    // through `2^(s − m)` either way): only the steps say which.
                    match column.iter().any(|x| x.is_nan()) {
                        true => assert_eq!(max[c].to_bits(), want.to_bits(), "{keys} x {columns}"),
                        false => {
                            let plain =
                                column.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x.into()));
                            assert_eq!(f64::from(max[c]), plain, "{keys} x {columns}: column {c}");
                            assert_eq!(max[c], want);
                        }
                    }
                }
                assert_eq!(max[columns..], [7.0; 3], "nothing past the columns");
                for other in &results[1..] {
                    assert_eq!(bits(max), bits(other), "{keys} x {columns}: ISAs differ");
                }
            }
        }
    }

    /// `pack_columns` on every ISA: runs of rows on and off multiples of four columns, panel
    /// straddles, width remainders; columns outside the call's stay untouched.
    #[test]
    fn pack_columns_transposes_into_panels() {
        for isa in tested_isas() {
            let pack = isa.routines().pack_columns;
            for (rows, width, first_column) in [
                (1, 1, 0),
                (2, 3, 15),
                (13, 21, 3),
                (16, 128, 0),
                (4, 8, 12),
                (7, 17, 6),
                (64, 64, 0),
                (9, 40, 4),
                // Several groups of runs, the last partial, between a head and a tail.
                (43, 37, 2),
            ] {
                let src_row = width + 5;
                let src = data(rows * src_row, 10);
                let columns = (first_column + rows).next_multiple_of(PANEL);
                // Panels `width` deep (a query tile), or one row-major matrix of `columns`
                // floats per depth (a transposed running output made row-major again).
                for (dst_panel, dst_row) in [(PANEL * width, PANEL), (PANEL, columns)] {
                    let mut tile = vec![-7.0f32; columns * width];
                    // SAFETY: src holds rows rows of src_row >= width floats; the tile holds
                    // every element of columns 0..columns, depths 0..width, in either layout.
                    unsafe {
                        pack(
                            rows,
                            width,
                            src.as_ptr(),
                            src_row,
                            0.5,
                            tile.as_mut_ptr(),
                            first_column,
                            dst_panel,
                            dst_row,
                        )
                    };
                    for column in 0..columns {
                        for depth in 0..width {
                            let at = column / PANEL * dst_panel + depth * dst_row + column % PANEL;
                            let want = match column.checked_sub(first_column) {
                                Some(r) if r < rows => 0.5 * src[r * src_row + depth],
                                _ => -7.0,
                            };
                            assert_eq!(
                                tile[at], want,
                                "{isa:?} {rows}x{width} from {first_column}, rows {dst_row} apart: \
                                 [{column}, {depth}]"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Blocks of C that no column needs are skipped on every ISA (a block is at most 8 rows):
    /// the rows past them keep their values, the needed rows are computed.
    #[test]
    fn unneeded_blocks_are_left_alone() {
        let (m, n, k) = (24usize, 40usize, 5usize);
        let a = data(m * k, 9);
        let b = data(k * n.next_multiple_of(PANEL), 10);
        let (col_lo, col_hi) = (vec![0i32; n], vec![2i32; n]);
        for isa in tested_isas() {
            let mut c = vec![7.5f32; m * n];
            packed_product(isa, (m, n, k), &a, &b, &mut c, Some((&col_lo, &col_hi)));
            for j in 0..n {
                for i in 0..2 {
                    let want = packed_entry((a.as_slice(), b.as_slice()), k, (i, j));
                    assert!((c[i * n + j] as f64 - want).abs() < 1e-5, "{isa:?} [{i},{j}]");
                }
                for i in 8..m {
                    assert_eq!(c[i * n + j], 7.5, "{isa:?} [{i},{j}] was written");
                }
            }
        }
    }

    /// A causal diagonal tile's scores (`Sᵀ`, a row per key, a column per query, which needs
    /// keys 0..=its own): each row block skips the panels of queries before it, also inside
    /// AVX-512's 64-column blocks, and computes every entry a query needs. A panel is left
    /// alone wherever the row is 8 or more past its last column (a block is at most 8 rows).
    #[test]
    fn a_diagonal_tile_skips_the_panels_before_it() {
        let (m, n, k) = (64usize, 64usize, 7usize);
        let a = data(m * k, 11);
        let b = data(k * n, 12);
        let col_lo = vec![0i32; n];
        let col_hi: Vec<i32> = (1..=n as i32).collect();
        for isa in tested_isas() {
            let mut c = vec![7.5f32; m * n];
            packed_product(isa, (m, n, k), &a, &b, &mut c, Some((&col_lo, &col_hi)));
            for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
                if i <= j {
                    let want = packed_entry((a.as_slice(), b.as_slice()), k, (i, j));
                    assert!((c[i * n + j] as f64 - want).abs() < 1e-5, "{isa:?} [{i},{j}]");
                } else if i >= (j / PANEL + 1) * PANEL + 7 {
                    assert_eq!(c[i * n + j], 7.5, "{isa:?} [{i},{j}] was written");
                }
            }
        }
    }

    /// Row 0 sees key 0, row 1 keys 0 and 1, whose value row is NaN (or finite): the NaN
    /// reaches row 1 only, with C row-major and column-major (a transposed O, whose rows' keys
    /// run as one product only when their value rows are finite; A[0][1] is 0, as a
    /// probability tile's hidden entries are).
    #[test]
    fn masked_rows_never_touch_hidden_values() {
        for isa in tested_isas() {
            let dot_nn = isa.routines().dot_nn;
            // (ldc, c_col): C[i][j] at c[i·ldc + j·c_col].
            for ((ldc, c_col), hidden) in
                [(2, 1), (1, 2)].into_iter().flat_map(|c| [f32::NAN, 5.0].map(|hidden| (c, hidden)))
            {
                // A column-major (2 rows, 2 keys): A[i][p] at a[p·2 + i].
                let a = [1.0f32, 2.0, 0.0, 1.0];
                let b = [2.0f32, 3.0, hidden, hidden];
                let (lo, hi) = ([0i32, 0], [1i32, 2]);
                let mut c = [0.0f32; 4];
                // SAFETY: 2 × 2 output, k = 2 keys of 2 values, two row ranges.
                unsafe {
                    dot_nn(
                        2,
                        2,
                        2,
                        a.as_ptr(),
                        1,
                        2,
                        b.as_ptr(),
                        2,
                        PANEL,
                        c.as_mut_ptr(),
                        ldc,
                        c_col,
                        0,
                        lo.as_ptr(),
                        hi.as_ptr(),
                        std::ptr::null(),
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                };
                let row = |i: usize| [c[i * ldc], c[i * ldc + c_col]];
                assert_eq!(row(0), [2.0, 3.0], "{isa:?} c ({ldc},{c_col})");
                match hidden.is_nan() {
                    true => assert!(row(1).iter().all(|x| x.is_nan()), "{isa:?} c ({ldc},{c_col})"),
                    false => assert_eq!(row(1), [9.0, 11.0], "{isa:?} c ({ldc},{c_col})"),
                }
            }
        }
    }
}
