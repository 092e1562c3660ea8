//! One kernel called from many threads at once, as a server handling several requests does:
//! `Kernel` is `Send + Sync`, and the calls share the kernel's pool and each thread's reused
//! call buffers. Every call must still give the reference's result, for each form of work —
//! prefill, decode split across the pool's threads, absorbed and expanded MLA.

use attngen::{AttentionSpec, Jit, Kernel, Mask, MlaForm, Reference, Shape};
use attngen_tests::strategies::OwnedInputs;
use attngen_tests::{first_mismatch, run_kernel};

#[attngen::kernel(q_heads = 8, kv_heads = 2, head_dim = 32, mask = "causal")]
struct Grouped;

/// Calls: (shape, inputs, reference out, reference lse), of several shapes.
type Calls = Vec<(Shape, OwnedInputs, Vec<f64>, Vec<f64>)>;

fn calls(spec: &AttentionSpec) -> Calls {
    let reference = Reference::new(spec).unwrap();
    // A prefill step, a decode long enough to be split across threads, a small batch.
    let shapes = [Shape::new(1, 40, 40), Shape::new(1, 1, 1500), Shape::new(3, 2, 90)];
    let widen = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<_>>();
    (shapes.iter().enumerate())
        .map(|(n, &shape)| {
            let inputs = OwnedInputs::random(spec, shape, 70 + n as u64, 1.0);
            let (out, lse) = run_kernel(&reference, shape, &inputs.inputs());
            (shape, inputs, widen(out), widen(lse))
        })
        .collect()
}

/// `kernel` from four threads at once, each running every call several times in its own
/// order; each result is checked.
fn hammer(kernel: &dyn Kernel) {
    let calls = calls(kernel.spec());
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let calls = &calls;
            scope.spawn(move || {
                for round in 0..24 {
                    let (shape, inputs, out, lse) = &calls[(thread + round) % calls.len()];
                    let (got_out, got_lse) = run_kernel(kernel, *shape, &inputs.inputs());
                    let what = format!("{} thread {thread}, {shape:?}", kernel.spec().summary());
                    assert_eq!(first_mismatch(&got_out, out), None, "out, {what}");
                    assert_eq!(first_mismatch(&got_lse, lse), None, "lse, {what}");
                }
            });
        }
    });
}

#[test]
fn jit_kernels_give_the_reference_result_when_called_from_many_threads() {
    let mla = AttentionSpec::mla(4, 64, 16, 32, 32).mask(Mask::Causal);
    let specs = [
        AttentionSpec::gqa(8, 2, 32).mask(Mask::Causal),
        AttentionSpec::mqa(4, 24).softcap(20.0).mask(Mask::SlidingWindow(33)),
        mla.clone().mla_form(MlaForm::Absorbed),
        mla.mla_form(MlaForm::Expanded),
    ];
    // The global pool (shared with the calling threads' other work) and a pool of its own.
    for jit in [Jit::new().unwrap(), Jit::with_threads(2).unwrap()] {
        for spec in &specs {
            hammer(&jit.compile(spec).unwrap());
        }
    }
}

/// One JIT compiling from four threads at once: each spec compiles to one kernel (the cache
/// hands every thread the same code) that runs right.
#[test]
fn one_jit_compiles_from_many_threads_at_once() {
    let jit = Jit::with_threads(2).unwrap();
    let specs: Vec<AttentionSpec> =
        (1..=6).map(|d| AttentionSpec::gqa(4, 2, 8 * d).mask(Mask::Causal)).collect();
    let kernels: Vec<Vec<_>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let (jit, specs) = (&jit, &specs);
                scope.spawn(move || {
                    // Each thread starts at another spec, so first compiles race.
                    (0..specs.len())
                        .map(|n| jit.compile(&specs[(n + thread) % specs.len()]).unwrap())
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (thread, compiled) in kernels.iter().enumerate() {
        for (n, kernel) in compiled.iter().enumerate() {
            let first = &kernels[0][(n + thread) % specs.len()];
            assert!(kernel.same_code(first), "thread {thread}, spec {n}");
        }
    }
    for kernel in &kernels[0] {
        hammer(kernel);
    }
}

#[test]
fn macro_kernels_give_the_reference_result_when_called_from_many_threads() {
    hammer(&Grouped);
    for isa in attngen::harness::tested_isas() {
        hammer(&Grouped::with_isa(isa).threads(2).unwrap());
    }
}
