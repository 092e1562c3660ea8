//! A call whose own buffers cannot be had returns [`Error::TooLarge`] naming the buffer, with
//! `out` untouched, instead of aborting the process: absorbed MLA's `q'`/`o'` (B·Sq·H·rank
//! floats each) and an unsplit prefill's call-packed K/V (the size of K and V). The kernel
//! then serves the next call.
//!
//! The test caps its process's address space (`RLIMIT_AS`) just above what the process holds,
//! so it lives alone in this file's binary, where no other test runs beside it.
#![cfg(target_os = "linux")]

use attngen::{AttentionSpec, Error, Inputs, Jit, JitKernel, Kernel, MlaForm, Shape};

/// Bytes the process may map beyond what it holds when the cap is set: room for the call's
/// small allocations, far below the buffers refused (134 MB and up).
const HEADROOM: u64 = 64 << 20;

/// The process's mapped bytes, from `/proc/self/status`.
fn mapped_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let line = status.lines().find(|l| l.starts_with("VmSize:")).expect("a VmSize line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("kB");
    kib * 1024
}

/// Sets the soft cap on the address space (`RLIM_INFINITY` lifts it).
fn cap_address_space(bytes: libc::rlim_t) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write only the rlimit struct passed by pointer,
    // which lives on this stack frame for both calls.
    let status = unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_AS, &limit)
    };
    assert_eq!(status, 0, "setrlimit");
}

/// Runs `kernel` on `inputs` at `shape` with the address space capped `HEADROOM` above what the
/// process maps, and returns what it said; `out` is checked untouched when it failed.
fn run_capped(kernel: &JitKernel, shape: Shape, inputs: &Inputs<'_>, out_len: usize) -> Error {
    let mut out = vec![7.0_f32; out_len];
    cap_address_space(mapped_bytes() + HEADROOM);
    let result = kernel.run(shape, inputs, &mut out, None);
    cap_address_space(libc::RLIM_INFINITY);
    let error = result.expect_err("the call's buffers exceed the cap");
    assert!(out.iter().all(|&x| x == 7.0), "out was written before the error");
    error
}

/// A small call of the same kernel, which must still succeed.
fn small_call(kernel: &JitKernel, inputs: impl Fn(Shape) -> (Vec<Vec<f32>>, usize)) {
    let shape = Shape::new(1, 3, 5);
    let (tensors, out_len) = inputs(shape);
    let refs: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
    let inputs = match refs[..] {
        [q, k, v] => Inputs::grouped(q, k, v),
        [q, c_kv, k_rope, w_uk, w_uv] => Inputs::latent(q, c_kv, k_rope, w_uk, w_uv),
        _ => unreachable!(),
    };
    let mut out = vec![0.0; out_len];
    kernel.run(shape, &inputs, &mut out, None).expect("a small call");
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn call_buffers_beyond_memory_are_a_typed_error_and_the_kernel_goes_on() {
    let jit = Jit::new().unwrap();

    // Absorbed MLA: q' and o' of 16 384 query rows × 16 heads × rank 512, 1.07 GB together.
    let spec = AttentionSpec::mla(16, 512, 64, 128, 128).mla_form(MlaForm::Absorbed);
    let mla = jit.compile(&spec).unwrap();
    let latent = |shape: Shape| {
        let (b, sq, sk) = (shape.batch, shape.seq_q, shape.seq_k);
        let tensors = vec![
            vec![0.01; b * sq * 16 * 192],
            vec![0.02; b * sk * 512],
            vec![0.03; b * sk * 64],
            vec![0.04; 16 * 128 * 512],
            vec![0.05; 16 * 128 * 512],
        ];
        (tensors, b * sq * 16 * 128)
    };
    // Start the pool's threads and grow their buffers before the cap.
    small_call(&mla, latent);
    let shape = Shape::new(1, 16_384, 1);
    let (tensors, out_len) = latent(shape);
    let inputs = Inputs::latent(&tensors[0], &tensors[1], &tensors[2], &tensors[3], &tensors[4]);
    match run_capped(&mla, shape, &inputs, out_len) {
        Error::TooLarge { tensor, shape } => {
            assert_eq!(tensor, "q' and o' (absorbed MLA)");
            assert_eq!(shape, [2, 1, 16_384, 16, 512]);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    small_call(&mla, latent);

    // MQA prefill whose call packs K and V once, unsplit (4096 query tiles' states outweigh
    // all the keys): 131 072 keys × 256 floats, 134 MB.
    let mqa = jit.compile(&AttentionSpec::mqa(16, 128)).unwrap();
    let grouped = |shape: Shape| {
        let (b, sq, sk) = (shape.batch, shape.seq_q, shape.seq_k);
        let tensors =
            vec![vec![0.01; b * sq * 2048], vec![0.02; b * sk * 128], vec![0.03; b * sk * 128]];
        (tensors, b * sq * 2048)
    };
    small_call(&mqa, grouped);
    let shape = Shape::new(1, 16_384, 131_072);
    let schedule = mqa.plan().schedule(shape.batch, shape.seq_q, shape.seq_k, 2);
    assert!(schedule.packs_call && !schedule.divides_keys(), "{schedule:?}");
    let (tensors, out_len) = grouped(shape);
    let inputs = Inputs::grouped(&tensors[0], &tensors[1], &tensors[2]);
    match run_capped(&mqa, shape, &inputs, out_len) {
        Error::TooLarge { tensor, .. } => assert_eq!(tensor, "packed K and V"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    small_call(&mqa, grouped);
}
