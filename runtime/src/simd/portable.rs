//! Portable: eight-lane arrays the compiler may auto-vectorise; runs on any CPU.

use super::Simd;

/// The portable primitive set: plain Rust over `[f32; 8]`.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

const L: usize = 8;

/// `f(a[i], b[i])` per lane.
#[inline(always)]
fn zip(a: [f32; L], b: [f32; L], f: impl Fn(f32, f32) -> f32) -> [f32; L] {
    std::array::from_fn(|i| f(a[i], b[i]))
}

// Blocked like AVX2, whose lane count it shares.
impl Simd for Portable {
    const LANES: usize = L;
    const NT_MR: usize = 3;
    const NT_NR: usize = 4;
    const NN_MR: usize = 6;
    const NN_NR: usize = 2;
    const NN_WIDE_MR: usize = Self::NN_MR;
    const NN_WIDE_NR: usize = Self::NN_NR;
    const NN_TALL: bool = false;
    const PREFETCHES_SHORT_OPERANDS: bool = true;
    type V = [f32; L];
    type Mask = usize;

    #[inline(always)]
    unsafe fn zero() -> [f32; L] {
        [0.0; L]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; L] {
        [x; L]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; L] {
        // SAFETY: the trait's contract: p names L floats.
        unsafe { p.cast::<[f32; L]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; L]) {
        // SAFETY: the trait's contract: p names L writable floats.
        unsafe { p.cast::<[f32; L]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn mask(len: usize) -> usize {
        len.min(L)
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, len: usize) -> [f32; L] {
        // SAFETY: the trait's contract: p names the first `len` floats.
        std::array::from_fn(|i| if i < len { unsafe { *p.add(i) } } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, len: usize, v: [f32; L]) {
        for (i, x) in v.into_iter().enumerate().take(len) {
            // SAFETY: the trait's contract: p names the first `len` writable floats.
            unsafe { *p.add(i) = x };
        }
    }
    #[inline(always)]
    unsafe fn add(a: [f32; L], b: [f32; L]) -> [f32; L] {
        zip(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: [f32; L], b: [f32; L]) -> [f32; L] {
        zip(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; L], b: [f32; L]) -> [f32; L] {
        zip(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn mul_add(a: [f32; L], b: [f32; L], c: [f32; L]) -> [f32; L] {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    #[inline(always)]
    unsafe fn mul_acc(a: [f32; L], b: [f32; L], c: [f32; L]) -> [f32; L] {
        // Without a hardware FMA, `mul_add` is a library call per element.
        if cfg!(target_feature = "fma") || !cfg!(target_arch = "x86_64") {
            std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
        } else {
            std::array::from_fn(|i| a[i] * b[i] + c[i])
        }
    }
    #[inline(always)]
    unsafe fn max(a: [f32; L], b: [f32; L]) -> [f32; L] {
        zip(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn pow2_of_rounded(t: [f32; L]) -> [f32; L] {
        t.map(|t| f32::from_bits(t.to_bits().wrapping_add(127) << 23))
    }
    #[inline(always)]
    unsafe fn hsum4(v: [[f32; L]; 4]) -> [f32; 4] {
        v.map(|x| x.iter().sum())
    }
    #[inline(always)]
    unsafe fn store_transposed4(rows: [[f32; L]; 4], dst: *mut f32, stride: usize) {
        for d in 0..L {
            for (r, row) in rows.iter().enumerate() {
                // SAFETY: the trait's contract: dst names four floats at every d·stride.
                unsafe { *dst.add(d * stride + r) = row[d] };
            }
        }
    }
}

super::stamp_routines!(Portable);
