//! Scalar micro-kernels: correct everywhere, the fallback when no SIMD ISA is available.

use attngen_codegen::abi::PrefetchRows;

/// See [`super::DotNt`].
///
/// # Safety
/// `a` holds `m` rows of stride `lda` with `k` readable floats each, `b` holds `n` rows of stride
/// `ldb` with `k` floats, `c` holds `m` rows of stride `ldc` with `n` writable floats, and
/// `prefetch` is null or valid.
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
    prefetch: *const PrefetchRows,
) {
    // SAFETY: the caller passes a null or valid descriptor.
    let mut prefetcher = unsafe { super::Prefetcher::new(prefetch, m) };
    for i in 0..m {
        if let Some(p) = &mut prefetcher {
            p.step();
        }
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
/// Every `A[i][p]`, `B[p][j]` and `C[i][j]` that [`super::DotNn`] names for `i < m`, `j < n`,
/// `p < k` is in bounds (C writable), the row tables are null or hold `m` entries each, and
/// `prefetch` is null or valid.
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
    accumulate: usize,
    row_lo: *const i32,
    row_hi: *const i32,
    prefetch: *const PrefetchRows,
) {
    // SAFETY: the caller passes a null or valid descriptor.
    let mut prefetcher = unsafe { super::Prefetcher::new(prefetch, m) };
    let mut chunk = vec![0.0f32; n];
    for i in 0..m {
        if let Some(p) = &mut prefetcher {
            p.step();
        }
        // SAFETY: the caller guarantees the row tables (if non-null) have m entries.
        let (lo, hi) = unsafe { super::row_keys(row_lo, row_hi, i, k) };
        // SAFETY: the caller guarantees row i of C has n writable floats.
        let c_row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
        if accumulate == 0 {
            c_row.fill(0.0);
        }
        // Chunked like the SIMD kernels, so both round alike.
        for start in (lo..hi).step_by(super::SUM_CHUNK) {
            chunk.fill(0.0);
            for p in start..hi.min(start + super::SUM_CHUNK) {
                // SAFETY: i < m and p < k, so A[i][p] exists.
                let weight = unsafe { *a.add(i * a_row + p * a_col) };
                for (j, dst) in chunk.iter_mut().enumerate() {
                    // SAFETY: p < k and j < n, so B[p][j] exists.
                    let x = unsafe {
                        *b.add(j / super::PANEL * b_panel + p * b_row + j % super::PANEL)
                    };
                    *dst += weight * x;
                }
            }
            for (dst, x) in c_row.iter_mut().zip(&chunk) {
                *dst += x;
            }
        }
    }
}

/// See [`super::Exp2Columns`].
///
/// # Safety
/// `s` holds `keys` rows of stride `ld` with `columns` writable floats each; `m` and `l` hold
/// `columns` floats (`l` writable).
pub unsafe extern "C" fn exp2_columns(
    keys: usize,
    columns: usize,
    s: *mut f32,
    ld: usize,
    m: *const f32,
    l: *mut f32,
) {
    for c in 0..columns {
        // SAFETY: c < columns, inside m and l.
        let (m, l) = unsafe { (*m.add(c), &mut *l.add(c)) };
        let mut sum = 0.0;
        for j in 0..keys {
            // SAFETY: j < keys and c < columns: inside s.
            let at = unsafe { &mut *s.add(j * ld + c) };
            *at = super::exp2(*at - m);
            sum += *at;
        }
        *l += sum;
    }
}
