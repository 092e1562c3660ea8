//! The machine's limits, measured in a few hundred milliseconds: f32 FMA throughput and
//! streaming read bandwidth, on a given number of threads.

use std::time::Instant;

/// GFLOP/s of independent f32 fused multiply-adds (2 FLOPs each) on `threads` threads, using the
/// widest vectors this build can use on this CPU (AVX2: 8 lanes; else scalar code).
pub fn fma_gflops(threads: usize) -> f64 {
    const ITERATIONS: u64 = 20_000_000;
    let start = Instant::now();
    let flops_per_thread = std::thread::scope(|scope| {
        let workers: Vec<_> =
            (0..threads.max(1)).map(|_| scope.spawn(|| fma_loop(ITERATIONS))).collect();
        workers.into_iter().map(|w| w.join().expect("FMA loop does not panic")).max().unwrap_or(0)
    });
    (flops_per_thread * threads.max(1) as u64) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Runs the FMA loop; returns the FLOPs it did.
fn fma_loop(iterations: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        let sink = unsafe { fma_loop_avx2(iterations) };
        std::hint::black_box(sink);
        return iterations * 12 * 8 * 2;
    }
    let mut acc = [1.0f32; 12];
    for _ in 0..iterations {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iterations * 12 * 2
}

/// Twelve independent chains of 8-lane FMAs: enough to cover the FMA latency on two pipes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(iterations: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); 12];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iterations {
        for x in &mut acc {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut total = _mm256_setzero_ps();
    for x in acc {
        total = _mm256_add_ps(total, x);
    }
    _mm256_cvtss_f32(total)
}

/// GB/s of summing a 256 MiB f32 buffer (far larger than the caches) split over `threads`
/// threads; the best of three passes.
pub fn read_gbs(threads: usize) -> f64 {
    let data = vec![1.0f32; 64 << 20];
    let chunk = data.len().div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for part in data.chunks(chunk) {
                scope.spawn(move || std::hint::black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best / 1e9
}

/// A sum with eight independent accumulators, so the loop is bound by loads, not add latency.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}
