//! The machine's limits, measured in a few hundred milliseconds: f32 FMA throughput and
//! streaming read bandwidth, on a given number of threads.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use attngen::{AlignedBuffer, Isa};
use attngen_codegen::abi::PANEL;

/// GFLOP/s of independent f32 fused multiply-adds (2 FLOPs each) on `threads` threads, with
/// the vectors of `isa` (AVX-512: 16 lanes, AVX2: 8, NEON: 4; portable: scalar code): the best
/// of [`FMA_ROUNDS`] short rounds, each timing all threads together ([`fma_round`]). A peak is
/// what the machine can do, so the fastest round is the estimate: on a shared VM one long round
/// reads whatever its neighbours left (on a 2-core AVX-512 Xeon, five start-ups of one
/// 20M-iteration round read 286–337 GFLOP/s; eight of this probe 328–342). The ISA must be one
/// this CPU supports.
pub fn fma_gflops(threads: usize, isa: Isa) -> f64 {
    (0..FMA_ROUNDS).map(|_| fma_round(threads, isa, FMA_ROUND_ITERATIONS)).fold(0.0, f64::max)
}

/// GFLOP/s of one round of the FMA loop: `iterations` of it on each of `threads` threads, all
/// timed together. `bench` also times one short round per timing round of a prefill workload,
/// next to the kernels: what the machine gave in that moment, where [`fma_gflops`] is the best
/// it gave at start-up.
pub fn fma_round(threads: usize, isa: Isa, iterations: u64) -> f64 {
    gflops(on_threads(threads, |_| fma_loop(iterations, isa)))
}

/// GFLOP/s of what [`on_threads`] returned: each thread's FLOPs and the time they took.
fn gflops((flops, time): (Vec<u64>, Duration)) -> f64 {
    flops.iter().sum::<u64>() as f64 / time.as_secs_f64() / 1e9
}

/// Runs `work(part)` once on each of `threads` threads (`part` in `0..threads`, at least one)
/// and returns what each returned, and the time from the moment all of them run — they wait at
/// a barrier, yielding, until the last arrives — to the last one's end. Starting threads and
/// waking an idle core are no part of the machine's throughput, and in a round of a few
/// milliseconds on a busy VM they would be: a 2-thread tile product of 3 ms timed from its
/// spawn once read below the prefill kernels it bounds.
///
/// Thread `part` is pinned to the `part`-th CPU the process may use (round-robin past the
/// last), so it reaches the barrier only once it runs there and the threads run side by side.
/// Unpinned, the scheduler at times left two of a round's threads on one vCPU, one after the
/// other, while the second vCPU stayed idle: on a 2-vCPU Zen 5, the tile product after a W1
/// round read as little as half its rate in about one bench in two (`bench`'s "of same
/// rounds" then read 119–175% of that ceiling).
fn on_threads<T: Send>(threads: usize, work: impl Fn(usize) -> T + Sync) -> (Vec<T>, Duration) {
    let threads = threads.max(1);
    let cpus = attngen::cpus::allowed();
    let arrived = AtomicUsize::new(0);
    let (work, arrived, cpus) = (&work, &arrived, &cpus);
    let spans: Vec<(Instant, Instant, T)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|part| {
                scope.spawn(move || {
                    if !cpus.is_empty() {
                        attngen::cpus::pin_current_thread(cpus[part % cpus.len()]);
                    }
                    arrived.fetch_add(1, Ordering::AcqRel);
                    // Yielding rather than spinning lets a thread not yet started run where
                    // there are more threads than cores.
                    while arrived.load(Ordering::Acquire) < threads {
                        std::thread::yield_now();
                    }
                    let start = Instant::now();
                    let result = work(part);
                    (start, Instant::now(), result)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a probe does not panic")).collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("at least one thread");
    let end = spans.iter().map(|s| s.1).max().expect("at least one thread");
    (spans.into_iter().map(|s| s.2).collect(), end - start)
}

/// GFLOP/s of the ISA's tile product ([`DotNn`](attngen_codegen::abi::DotNn), the routine
/// behind every prefill tile's scores and value update) on operands that stay in L1: `C = A·B`
/// of 48 × 64 × 64 (A row-major, B in 16-column panels; 40 KiB with C), `reps` times on each of
/// `threads` threads, all timed together. C is as wide as a prefill tile's, so the product runs
/// the ISA's wide blocks (AVX-512: 6 rows × 4 vectors). Unlike the FMA loop it loads its
/// operands (there, four vectors and six broadcasts per 24 FMAs): the most a load-bearing kernel
/// reaches on this core at this moment (on a 2-vCPU Zen 5, 93–96% of the FMA loop's rate).
/// Panics if the product's C is not exactly what it should be.
pub fn product_round(threads: usize, isa: Isa, reps: u64) -> f64 {
    assert!(isa.is_supported(), "the bench probes only ISAs this CPU has");
    let (m, n, k) = PRODUCT_SHAPE;
    let dot_nn = isa.routines().dot_nn;
    // The operands exist before the clock starts: A and B shared, a C per thread.
    let filled = |len: usize, value: f32| {
        let mut buffer = AlignedBuffer::zeroed(len);
        buffer.fill(value);
        buffer
    };
    let (a, b) = (filled(m * k, 0.5), filled(k * n, 0.25));
    let cs: Vec<Mutex<AlignedBuffer>> =
        (0..threads.max(1)).map(|_| Mutex::new(AlignedBuffer::zeroed(m * n))).collect();
    let rate = gflops(on_threads(threads, |part| {
        let mut c = cs[part].lock().expect("each C has one user");
        for _ in 0..reps {
            // SAFETY: the CPU has the ISA (asserted above); A holds m rows of k floats
            // (a_row = k, a_col = 1), B n / PANEL panels of k rows of PANEL floats (b_row =
            // PANEL, b_panel = PANEL·k; n is a multiple of PANEL), C m rows of n floats
            // (ldc = n, c_col = 1); no range tables and no prefetch (null pointers).
            unsafe {
                dot_nn(
                    m,
                    n,
                    k,
                    a.as_ptr(),
                    k,
                    1,
                    b.as_ptr(),
                    PANEL,
                    PANEL * k,
                    c.as_mut_ptr(),
                    n,
                    1,
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
        }
        2 * (m * n * k) as u64 * reps
    }));
    // Every element of C is k · 0.5 · 0.25, exactly: a rate of a wrong product is no rate.
    let want = k as f32 * 0.125;
    for c in cs {
        let c = c.into_inner().expect("each C has one user");
        assert!(c.iter().all(|&x| x == want), "{isa} tile product");
    }
    rate
}

/// [`product_round`]'s (rows, columns, depth): a prefill tile's 64 columns, rows that are whole
/// blocks on every ISA (6 and 8 rows), and a depth that keeps A, B and C (40 KiB) within a
/// 48 KiB L1. On a 32 KiB L1 (Zen 3) a part comes from L2, at no measurable cost: alone on one
/// Zen 3 core, the best rounds of this shape ran at 96–97 GFLOP/s, of 24 × 64 × 64 (which fits)
/// at 93–95.
const PRODUCT_SHAPE: (usize, usize, usize) = (48, 64, 64);

/// Iterations of one [`fma_gflops`] round.
pub const FMA_ROUND_ITERATIONS: u64 = 5_000_000;

/// Rounds [`fma_gflops`] takes the best of: eight of about 12 ms each with AVX-512 on a 2.6 GHz
/// core.
const FMA_ROUNDS: usize = 8;

/// Runs the FMA loop of `isa`; returns the FLOPs it did.
fn fma_loop(iterations: u64, isa: Isa) -> u64 {
    assert!(isa.is_supported(), "the bench probes only ISAs this CPU has");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: the CPU supports AVX-512F (asserted above).
            std::hint::black_box(unsafe { fma_loop_avx512(iterations) });
            iterations * CHAINS as u64 * 16 * 2
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            // SAFETY: the CPU supports AVX2 and FMA (asserted above).
            std::hint::black_box(unsafe { fma_loop_avx2(iterations) });
            iterations * CHAINS as u64 * 8 * 2
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => {
            // SAFETY: the CPU supports NEON (asserted above).
            std::hint::black_box(unsafe { fma_loop_neon(iterations) });
            iterations * NEON_CHAINS as u64 * 4 * 2
        }
        _ => fma_loop_portable(iterations),
    }
}

/// The portable ISA's FMA loop, as its kernels multiply and add: fused where the target has an
/// FMA, else a multiply and an add (a fused `mul_add` would be a library call per element).
fn fma_loop_portable(iterations: u64) -> u64 {
    let mut acc = [1.0f32; CHAINS];
    let fused = cfg!(target_feature = "fma") || !cfg!(target_arch = "x86_64");
    for _ in 0..iterations {
        for a in &mut acc {
            *a = if fused { a.mul_add(0.999_999, 1e-7) } else { *a * 0.999_999 + 1e-7 };
        }
    }
    std::hint::black_box(acc);
    iterations * CHAINS as u64 * 2
}

/// Independent FMA chains per loop: enough to cover a 4-cycle FMA latency on two pipes.
const CHAINS: usize = 12;

/// [`CHAINS`] independent chains of 8-lane FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(iterations: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
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

/// [`CHAINS`] independent chains of 16-lane FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(iterations: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iterations {
        for x in &mut acc {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut total = _mm512_setzero_ps();
    for x in acc {
        total = _mm512_add_ps(total, x);
    }
    _mm512_reduce_add_ps(total)
}

/// Independent chains of NEON's FMA loop: a 4-cycle latency on four 128-bit pipes (Neoverse
/// V2's) needs 16; with the two operands, 18 of the 32 registers.
#[cfg(target_arch = "aarch64")]
const NEON_CHAINS: usize = 16;

/// [`NEON_CHAINS`] independent chains of 4-lane FMAs.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
fn fma_loop_neon(iterations: u64) -> f32 {
    use std::arch::aarch64::*;
    let mut acc = [vdupq_n_f32(1.0); NEON_CHAINS];
    let a = vdupq_n_f32(0.999_999);
    let b = vdupq_n_f32(1e-7);
    for _ in 0..iterations {
        for x in &mut acc {
            *x = vfmaq_f32(b, *x, a);
        }
    }
    let mut total = vdupq_n_f32(0.0);
    for x in acc {
        total = vaddq_f32(total, x);
    }
    vaddvq_f32(total)
}

/// GB/s of summing an f32 buffer of [`read_buffer_bytes`] split over `threads` threads; the
/// best of [`READ_PASSES`] passes.
///
/// The buffer is an [`AlignedBuffer`], as the kernels' inputs in `bench` are: it starts on a
/// 64-byte line, as PyTorch's and ONNX Runtime's allocators place tensors (a large `Vec<f32>`
/// from glibc's `malloc` starts 16 bytes past one, and then every second 32-byte load spans
/// two lines), and on Linux lies in transparent huge pages where the system grants them.
pub fn read_gbs(threads: usize) -> f64 {
    let mut data = AlignedBuffer::zeroed(read_buffer_bytes() / 4);
    data.fill(1.0);
    let mut best = f64::INFINITY;
    for _ in 0..READ_PASSES {
        let (total, time) = read_once(&[&data], threads);
        std::hint::black_box(total);
        best = best.min(time.as_secs_f64());
    }
    (data.len() * 4) as f64 / best / 1e9
}

/// Passes [`read_gbs`] takes the best of, as [`fma_gflops`] does of its rounds: on a shared VM a
/// pass reads whatever the neighbours leave (a 2-core Zen 3 read 23.5–31.2 GB/s in the best of
/// three passes over 256 MiB, minutes apart, where the best of nine read 30–35 each time).
const READ_PASSES: usize = 8;

/// Reads every float of `buffers` once, each buffer split evenly over `threads` threads (the
/// ceiling of a kernel that must read them); returns their sum, so nothing is skipped, and the
/// time the reading took, from the moment all threads run ([`on_threads`]).
pub fn read_once(buffers: &[&[f32]], threads: usize) -> (f32, Duration) {
    let threads = threads.max(1);
    let (totals, time) = on_threads(threads, |part| {
        let mut total = 0.0;
        for data in buffers {
            let chunk = data.len().div_ceil(threads);
            let lo = (part * chunk).min(data.len());
            total += sum(&data[lo..(lo + chunk).min(data.len())]);
        }
        total
    });
    (totals.into_iter().sum(), time)
}

/// Bytes the bandwidth probe reads: at least 256 MiB and twice the last-level cache (as the
/// system reports it), so the probe reads from memory, not from cache.
pub fn read_buffer_bytes() -> usize {
    (2 * attngen::last_level_cache_bytes().unwrap_or(0)).max(256 << 20)
}

/// The sum of `xs`, read with the widest vector loads this CPU has: a read probe with narrower
/// loads understates the machine (on a 2-core Zen 3, 16-byte loads read 23.5–28.3 GB/s where
/// 32-byte ones read 26.0–29.7, in alternating passes over 256 MiB).
fn sum(xs: &[f32]) -> f32 {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F (detected).
        Isa::Avx512 => unsafe { sum_avx512(xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (detected).
        Isa::Avx2Fma => unsafe { sum_avx2(xs) },
        _ => sum_lanes(xs),
    }
}

/// [`sum_lanes`] compiled with AVX-512F: four 16-lane accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(xs: &[f32]) -> f32 {
    sum_lanes(xs)
}

/// [`sum_lanes`] compiled with AVX2: eight 8-lane accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(xs: &[f32]) -> f32 {
    sum_lanes(xs)
}

/// A sum in 64 independent lanes, which the compiler turns into as many vector accumulators as
/// the target's width gives, so the loop is bound by loads, not by the adds' latency.
#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 64];
    let mut chunks = xs.chunks_exact(64);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ISA's probes run on this CPU and read a positive, finite rate.
    #[test]
    fn probes_run_on_every_isa() {
        for isa in Isa::available() {
            for threads in [1, 2] {
                let (fma, product) =
                    (fma_round(threads, isa, 1000), product_round(threads, isa, 3));
                assert!(fma.is_finite() && fma > 0.0, "{isa} FMA on {threads}: {fma}");
                assert!(product.is_finite() && product > 0.0, "{isa} tile on {threads}: {product}");
            }
        }
    }

    /// A round's threads run each on its own CPU, in the order of the process's affinity mask,
    /// while there are CPUs enough.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_rounds_threads_run_side_by_side() {
        let cpus = attngen::cpus::allowed();
        assert!(!cpus.is_empty(), "the affinity mask names this process's CPUs");
        let threads = cpus.len().min(4);
        // SAFETY: `sched_getcpu` takes nothing and only reads the calling thread's state.
        let (ran_on, _) = on_threads(threads, |_| unsafe { libc::sched_getcpu() });
        let ran_on: Vec<usize> = ran_on.into_iter().map(|cpu| cpu as usize).collect();
        assert_eq!(ran_on, cpus[..threads]);
    }

    /// Every float of every buffer is read exactly once, whatever the thread count.
    #[test]
    fn read_once_reads_every_float_once() {
        let (a, b) = (vec![1.0f32; 1000], vec![2.0f32; 37]);
        for threads in [0, 1, 2, 3, 7, 64] {
            assert_eq!(read_once(&[&a, &b], threads).0, 1074.0, "{threads} threads");
        }
        assert_eq!(read_once(&[], 2).0, 0.0);
    }
}
