//! What `#[attngen::kernel]`'s generated code uses: not part of the public API.
//!
//! Each ISA module holds the same pre-compiled tile routines the JIT calls; the row helpers
//! are inlined into the generated functions, so they run at the ISA's width there.

pub use crate::exec::EntryPoints;
pub use attngen_codegen::abi;

/// `pack_rows` is one plain copy on every ISA.
pub use crate::simd::pack_rows;

/// The AVX-512F tile routines.
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    pub use crate::simd::avx512::{column_max, dot_nn, dot_nt, exp2_columns, pack_columns};
}

/// The AVX2+FMA tile routines.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    pub use crate::simd::avx2::{column_max, dot_nn, dot_nt, exp2_columns, pack_columns};
}

/// The NEON tile routines.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    pub use crate::simd::neon::{column_max, dot_nn, dot_nt, exp2_columns, pack_columns};
}

/// The portable tile routines.
pub mod portable {
    pub use crate::simd::portable::{column_max, dot_nn, dot_nt, exp2_columns, pack_columns};
}

/// `dst[..len] = 0`.
///
/// # Safety
/// `dst` names `len` writable floats.
#[inline(always)]
pub unsafe fn zero(dst: *mut f32, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::write_bytes(dst, 0, len) }
}

/// `dst[..len] = src[..len] · factor`; `src` may equal `dst`.
///
/// # Safety
/// `src` names `len` readable floats and `dst` `len` writable ones.
#[inline(always)]
pub unsafe fn scale_row(dst: *mut f32, src: *const f32, len: usize, factor: f32) {
    for c in 0..len {
        // SAFETY: the caller's contract; c < len.
        unsafe { *dst.add(c) = *src.add(c) * factor }
    }
}

/// `dst[..len] += src[..len] · factor`, each step one fused multiply-add.
///
/// # Safety
/// As for [`scale_row`]; `dst` is also read.
#[inline(always)]
pub unsafe fn axpy_row(dst: *mut f32, src: *const f32, len: usize, factor: f32) {
    for c in 0..len {
        // SAFETY: the caller's contract; c < len.
        unsafe { *dst.add(c) = (*src.add(c)).mul_add(factor, *dst.add(c)) }
    }
}
