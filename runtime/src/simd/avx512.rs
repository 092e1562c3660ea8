//! AVX-512F: 512-bit vectors, 32 registers, mask registers for partial vectors.

use std::arch::x86_64::*;

use super::Simd;

/// The AVX-512F primitive set.
#[derive(Clone, Copy, Debug)]
pub struct Avx512;

// 32 zmm registers: dot_nn's 6 × 4 block (C at least 64 columns wide: a prefill tile's scores
// and value update) keeps 24 accumulators, 4 vectors of B and a broadcast, and issues 10 loads
// per 24 FMAs, where the 8 × 2 block issues 10 per 16 (W1–W3 0.87–0.94× and W6 0.83–0.91× the
// time in alternating runs at 1 and 2 threads); narrower C (absorbed MLA's one-panel latent
// scores, decode's few rows) keeps 8 × 2, whose 8 rows suit a one-panel C, and a one-vector C
// against rows a constant stride apart gets 16 × 1 tall blocks (`dot_nn::TALL_MR`). dot_nt's
// 4 × 4 block holds 16 accumulators, 4 rows of A and 1 of B.
impl Simd for Avx512 {
    const LANES: usize = 16;
    const NT_MR: usize = 4;
    const NT_NR: usize = 4;
    const NN_MR: usize = 8;
    const NN_NR: usize = 2;
    const NN_WIDE_MR: usize = 6;
    const NN_WIDE_NR: usize = 4;
    const NN_TALL: bool = true;
    const PREFETCHES_SHORT_OPERANDS: bool = true;
    type V = __m512;
    type Mask = __mmask16;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn mask(len: usize) -> __mmask16 {
        ((1u32 << len.min(16)) - 1) as __mmask16
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, mask: __mmask16, v: __m512) {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_mask_storeu_ps(p, mask, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul_acc(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn pow2_of_rounded(t: __m512) -> __m512 {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe {
            let biased = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
        }
    }
    #[inline(always)]
    unsafe fn hsum4(v: [__m512; 4]) -> [f32; 4] {
        // Fold each vector to 256 bits, then AVX2's two rounds of hadd and a fold to 128. (No
        // closures here: a closure is compiled without the caller's target features, so the
        // intrinsics it calls would not be inlined.)
        // SAFETY: the trait's contract: AVX-512F is enabled.
        unsafe {
            macro_rules! half {
                ($x:expr) => {{
                    let x = $x;
                    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
                    _mm256_add_ps(_mm512_castps512_ps256(x), high)
                }};
            }
            let (a, b, c, d) = (half!(v[0]), half!(v[1]), half!(v[2]), half!(v[3]));
            let h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
            let folded = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut sums = [0.0; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), folded);
            sums
        }
    }
    #[inline(always)]
    unsafe fn store_transposed4(rows: [__m512; 4], dst: *mut f32, stride: usize) {
        // SAFETY: the trait's contract: AVX-512F is enabled; the pointers name the floats used.
        unsafe {
            let [r0, r1, r2, r3] = rows;
            // Per 128-bit quarter: pairs, then quads, of one depth each.
            let (lo01, hi01) = (_mm512_unpacklo_ps(r0, r1), _mm512_unpackhi_ps(r0, r1));
            let (lo23, hi23) = (_mm512_unpacklo_ps(r2, r3), _mm512_unpackhi_ps(r2, r3));
            let depths = [
                _mm512_shuffle_ps::<0x44>(lo01, lo23), // depths 0, 4, 8, 12
                _mm512_shuffle_ps::<0xEE>(lo01, lo23), // 1, 5, 9, 13
                _mm512_shuffle_ps::<0x44>(hi01, hi23), // 2, 6, 10, 14
                _mm512_shuffle_ps::<0xEE>(hi01, hi23), // 3, 7, 11, 15
            ];
            for (d, quads) in depths.into_iter().enumerate() {
                _mm_storeu_ps(dst.add(d * stride), _mm512_extractf32x4_ps::<0>(quads));
                _mm_storeu_ps(dst.add((d + 4) * stride), _mm512_extractf32x4_ps::<1>(quads));
                _mm_storeu_ps(dst.add((d + 8) * stride), _mm512_extractf32x4_ps::<2>(quads));
                _mm_storeu_ps(dst.add((d + 12) * stride), _mm512_extractf32x4_ps::<3>(quads));
            }
        }
    }
}

super::stamp_routines!(Avx512, "avx512f,avx2,fma");
