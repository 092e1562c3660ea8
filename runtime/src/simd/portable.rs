//! Scalar micro-kernels: correct everywhere, the fallback when no SIMD ISA is available.

/// See [`super::DotNt`].
///
/// # Safety
/// `a` holds `m` rows of stride `lda` with `k` readable floats each, `b` holds `n` rows of stride
/// `ldb` with `k` floats, `c` holds `m` rows of stride `ldc` with `n` writable floats.
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
) {
    for i in 0..m {
        for j in 0..n {
            // SAFETY: the caller guarantees these rows and columns exist.
            unsafe {
                let a_row = std::slice::from_raw_parts(a.add(i * lda), k);
                let b_row = std::slice::from_raw_parts(b.add(j * ldb), k);
                let dot: f32 = a_row.iter().zip(b_row).map(|(x, y)| x * y).sum();
                let dst = c.add(i * ldc + j);
                *dst = if accumulate != 0 { *dst + dot } else { dot };
            }
        }
    }
}

/// See [`super::DotNn`].
///
/// # Safety
/// `a` holds `m` rows of stride `lda` with `k` floats, `b` holds `k` rows of stride `ldb` with
/// `n` floats, `c` holds `m` rows of stride `ldc` with `n` writable floats, and `row_range` is
/// null or points to `2·m` i32s.
pub unsafe extern "C" fn dot_nn(
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
    row_range: *const i32,
) {
    for i in 0..m {
        // SAFETY: the caller guarantees `row_range` (if non-null) has 2·m entries.
        let (lo, hi) = unsafe { super::row_keys(row_range, m, i, k) };
        // SAFETY: the caller guarantees row i of C has n writable floats.
        let c_row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
        if accumulate == 0 {
            c_row.fill(0.0);
        }
        for p in lo..hi {
            // SAFETY: p < k, so A[i][p] and row p of B exist.
            let (weight, b_row) =
                unsafe { (*a.add(i * lda + p), std::slice::from_raw_parts(b.add(p * ldb), n)) };
            for (dst, &x) in c_row.iter_mut().zip(b_row) {
                *dst += weight * x;
            }
        }
    }
}
