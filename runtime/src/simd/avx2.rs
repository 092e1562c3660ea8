//! AVX2 + FMA: 256-bit vectors, 16 registers.

use std::arch::x86_64::*;

use super::Simd;

/// AVX2's lane mask: the first `len` lanes, as the sign bits `vmaskmovps` loads with, and as
/// the count [`Simd::store_masked`] writes with plain stores. A masked `vmaskmovps` store
/// issues once every 12 cycles or so on a Zen 3: the narrow score tile's exponentials of a
/// decode item (a masked store per key) took 30–35 ns with plain stores against 52–59, and in
/// one process, the JIT's calls alternating (56 pairs, medians), W4 took 0.96–0.97× the time
/// and W7 0.97× on one and two threads; W1, W3, W5 and W8 1.00×.
#[derive(Clone, Copy, Debug)]
pub struct Avx2Mask {
    lanes: __m256i,
    len: usize,
}

/// The AVX2 + FMA primitive set.
#[derive(Clone, Copy, Debug)]
pub struct Avx2;

// Block sizes keep every accumulator in a register: 16 ymm registers hold the MR·NR
// accumulators plus the operands of one step (dot_nt: 3·4 + 3 rows of A + 1 of B = 16;
// dot_nn: 6·2 + 2 of B + 1 broadcast = 15). One more and LLVM spills in the hot loop. So dot_nn
// has no wider block here: a block spans whole 16-column panels, and the next width, 4 vectors,
// takes 3·4 + 4 + 1 = 17 registers even at 3 rows.
impl Simd for Avx2 {
    const LANES: usize = 8;
    const NT_MR: usize = 3;
    const NT_NR: usize = 4;
    const NN_MR: usize = 6;
    const NN_NR: usize = 2;
    const NN_WIDE_MR: usize = Self::NN_MR;
    const NN_WIDE_NR: usize = Self::NN_NR;
    const NN_TALL: bool = false;
    const PREFETCHES_SHORT_OPERANDS: bool = false;
    type V = __m256;
    type Mask = Avx2Mask;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn mask(len: usize) -> Avx2Mask {
        const TABLE: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        let len = len.min(8);
        // 8 - len is in 0..=8, so the 8 loaded i32s lie inside TABLE.
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        let lanes = unsafe { _mm256_loadu_si256(TABLE.as_ptr().add(8 - len).cast()) };
        Avx2Mask { lanes, len }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, mask: Avx2Mask) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_maskload_ps(p, mask.lanes) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, mask: Avx2Mask, v: __m256) {
        // SAFETY: the trait's contract: AVX2 is enabled, and `p` names the first `mask.len`
        // floats, the only ones written: 4, 2 and 1 of them as `len`'s bits say, each piece
        // from the lanes after the ones before it.
        unsafe {
            if mask.len == 8 {
                return _mm256_storeu_ps(p, v);
            }
            let (mut at, mut rest) = (p, mask.len);
            let mut x = _mm256_castps256_ps128(v);
            if rest >= 4 {
                _mm_storeu_ps(at, x);
                (at, rest, x) = (at.add(4), rest - 4, _mm256_extractf128_ps::<1>(v));
            }
            if rest >= 2 {
                _mm_storel_epi64(at.cast(), _mm_castps_si128(x));
                (at, rest, x) = (at.add(2), rest - 2, _mm_movehl_ps(x, x));
            }
            if rest == 1 {
                _mm_store_ss(at, x);
            }
        }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul_acc(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn pow2_of_rounded(t: __m256) -> __m256 {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe {
            let biased = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
        }
    }
    #[inline(always)]
    unsafe fn hsum4(v: [__m256; 4]) -> [f32; 4] {
        // Two rounds of hadd, then fold the 128-bit halves.
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe {
            let h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
            let folded = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut sums = [0.0; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), folded);
            sums
        }
    }
    #[inline(always)]
    unsafe fn store_transposed4(rows: [__m256; 4], dst: *mut f32, stride: usize) {
        // SAFETY: the trait's contract: AVX2 and FMA are enabled; the pointers name the floats used.
        unsafe {
            let [r0, r1, r2, r3] = rows;
            // Per 128-bit half: pairs, then quads, of one depth each.
            let (lo01, hi01) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
            let (lo23, hi23) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
            let depths = [
                _mm256_shuffle_ps::<0x44>(lo01, lo23), // depths 0, 4
                _mm256_shuffle_ps::<0xEE>(lo01, lo23), // 1, 5
                _mm256_shuffle_ps::<0x44>(hi01, hi23), // 2, 6
                _mm256_shuffle_ps::<0xEE>(hi01, hi23), // 3, 7
            ];
            for (d, quad) in depths.into_iter().enumerate() {
                _mm_storeu_ps(dst.add(d * stride), _mm256_castps256_ps128(quad));
                _mm_storeu_ps(dst.add((d + 4) * stride), _mm256_extractf128_ps::<1>(quad));
            }
        }
    }
}

super::stamp_routines!(Avx2, "avx2,fma");

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `v` under a mask of `len` lanes into `dst` from float 4 on.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_with_mask(dst: &mut [f32; 16], len: usize, v: &[f32; 8]) {
        // SAFETY: AVX2 is enabled (the caller checked the CPU); floats 4..12 of `dst` hold
        // the 8 lanes, `v` holds 8 floats.
        unsafe {
            Avx2::store_masked(dst.as_mut_ptr().add(4), Avx2::mask(len), Avx2::load(v.as_ptr()))
        }
    }

    /// A masked store writes the first `len` lanes, in place, and no float around them.
    #[test]
    fn masked_stores_write_exactly_their_lanes() {
        if !crate::Isa::Avx2Fma.is_supported() {
            println!("skipped: the avx2 masked stores (this CPU lacks avx2)");
            return;
        }
        let v: [f32; 8] = std::array::from_fn(|i| i as f32 + 1.0);
        for len in 0..=8 {
            let mut dst = [-1.0f32; 16];
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { store_with_mask(&mut dst, len, &v) };
            let expected: [f32; 16] =
                std::array::from_fn(|i| if (4..4 + len).contains(&i) { v[i - 4] } else { -1.0 });
            assert_eq!(dst, expected, "{len} lanes");
        }
    }
}
