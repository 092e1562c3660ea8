//! NEON (AArch64's Advanced SIMD): 128-bit vectors, 32 registers, no lane masks.
//!
//! Compiled and property-tested (under emulation) on x86-64 hosts; its block sizes follow
//! the register count, not a timing, as no AArch64 CPU has timed them yet.

use std::arch::aarch64::*;

use super::Simd;

/// The NEON primitive set.
#[derive(Clone, Copy, Debug)]
pub struct Neon;

const L: usize = 4;

// 32 registers, as AVX-512 has, of a quarter of its width. A dot_nn block starts on a B panel
// and spans whole ones, so its narrowest is one 16-column panel, 4 vectors: 6 rows of them keep
// 24 accumulators, 4 vectors of B and a broadcast, and issue 10 loads per 24 FMAs. That is
// both the narrow and the wide shape (a wider one would not fit). dot_nt's 4 × 4 block holds
// 16 accumulators, 4 rows of A and 1 of B. Tall blocks would be one 4-column vector wide, which
// no product's C is, so there are none.
impl Simd for Neon {
    const LANES: usize = L;
    const NT_MR: usize = 4;
    const NT_NR: usize = 4;
    const NN_MR: usize = 6;
    const NN_NR: usize = 4;
    const NN_WIDE_MR: usize = 6;
    const NN_WIDE_NR: usize = 4;
    const NN_TALL: bool = false;
    const PREFETCHES_SHORT_OPERANDS: bool = true;
    type V = float32x4_t;
    /// The number of leading lanes selected: NEON has no masked loads or stores.
    type Mask = usize;

    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled; p names 4 floats.
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: the trait's contract: NEON is enabled; p names 4 writable floats.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn mask(len: usize) -> usize {
        len.min(L)
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, len: usize) -> float32x4_t {
        let mut lanes = [0.0f32; L];
        // SAFETY: the trait's contract: p names the first `len <= 4` floats, and `lanes` holds
        // 4; NEON is enabled.
        unsafe {
            std::ptr::copy_nonoverlapping(p, lanes.as_mut_ptr(), len);
            vld1q_f32(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, len: usize, v: float32x4_t) {
        let mut lanes = [0.0f32; L];
        // SAFETY: the trait's contract: p names the first `len <= 4` writable floats, and
        // `lanes` holds 4; NEON is enabled.
        unsafe {
            vst1q_f32(lanes.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), p, len);
        }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // `fmla`: c + a·b, rounded once.
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn mul_acc(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // Not `fmax`, which returns NaN for a NaN operand: `a > b` is false when either is NaN,
        // so the select gives b, as x86's `maxps` does.
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe { vbslq_f32(vcgtq_f32(a, b), a, b) }
    }
    #[inline(always)]
    unsafe fn pow2_of_rounded(t: float32x4_t) -> float32x4_t {
        // SAFETY: the trait's contract: NEON is enabled.
        unsafe {
            let biased = vaddq_u32(vreinterpretq_u32_f32(t), vdupq_n_u32(127));
            vreinterpretq_f32_u32(vshlq_n_u32::<23>(biased))
        }
    }
    #[inline(always)]
    unsafe fn hsum4(v: [float32x4_t; 4]) -> [f32; 4] {
        // Two rounds of pairwise adds: [a0+a1, a2+a3, b0+b1, b2+b3], then each vector's sum.
        // SAFETY: the trait's contract: NEON is enabled; `out` holds 4 floats.
        unsafe {
            let sums = vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
            let mut out = [0.0; L];
            vst1q_f32(out.as_mut_ptr(), sums);
            out
        }
    }
    #[inline(always)]
    unsafe fn store_transposed4(rows: [float32x4_t; 4], dst: *mut f32, stride: usize) {
        // SAFETY: the trait's contract: NEON is enabled; dst names 4 floats at every d·stride,
        // d < 4.
        unsafe {
            let [r0, r1, r2, r3] = rows;
            // Pairs of rows interleaved per depth (`trn1`: depths 0 and 2, `trn2`: 1 and 3),
            // then their 64-bit halves paired into one depth's four rows.
            let (even01, odd01) = (vtrn1q_f32(r0, r1), vtrn2q_f32(r0, r1));
            let (even23, odd23) = (vtrn1q_f32(r2, r3), vtrn2q_f32(r2, r3));
            let (even01, odd01) = (vreinterpretq_f64_f32(even01), vreinterpretq_f64_f32(odd01));
            let (even23, odd23) = (vreinterpretq_f64_f32(even23), vreinterpretq_f64_f32(odd23));
            let depths = [
                vtrn1q_f64(even01, even23), // depth 0 of rows 0..4
                vtrn1q_f64(odd01, odd23),   // 1
                vtrn2q_f64(even01, even23), // 2
                vtrn2q_f64(odd01, odd23),   // 3
            ];
            for (d, quad) in depths.into_iter().enumerate() {
                vst1q_f32(dst.add(d * stride), vreinterpretq_f32_f64(quad));
            }
        }
    }
}

super::stamp_routines!(Neon, "neon");
