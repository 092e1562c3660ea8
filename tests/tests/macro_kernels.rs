//! Kernels compiled by `#[attngen::kernel]` against the reference interpreter: every kind of
//! spec, on every ISA this CPU has, over random shapes and inputs (semantics.md §4 tolerance).

use attngen::{Form, Isa, Kernel, KvLayout, MacroKernel, Shape};
use attngen_tests::strategies::{self, OwnedInputs};
use attngen_tests::{
    assert_weightless_rows, compare_at_every_line_offset, compare_non_finite_with_reference,
    compare_with_reference,
};
use proptest::prelude::*;

#[attngen::kernel(q_heads = 8, kv_heads = 2, head_dim = 16, mask = "causal")]
struct GqaCausal;

#[attngen::kernel(q_heads = 4, head_dim = 24)]
struct Mha;

#[attngen::kernel(q_heads = 6, kv_heads = 1, head_dim = 33, mask = { sliding_window = 7 })]
struct MqaWindow;

#[attngen::kernel(
    q_heads = 5,
    kv_heads = 3,
    head_dim = 20,
    v_head_dim = 12,
    group_map = [2, 0, 0, 1, 2],
    softcap = 30.0,
    mask = "causal"
)]
struct UnevenSoftcap;

#[attngen::kernel(q_heads = 8, kv_heads = 2, head_dim = 8, group_map = "interleaved", scale = 0.3)]
struct Interleaved;

#[attngen::kernel(q_heads = 3, kv_heads = 3, head_dim = 1, mask = { sliding_window = 1 })]
struct OneWide;

#[attngen::kernel(
    q_heads = 4,
    v_head_dim = 12,
    mask = "causal",
    latent = { rank = 32, rope_dim = 8, nope_dim = 16 }
)]
struct MlaRope;

#[attngen::kernel(
    q_heads = 3,
    v_head_dim = 20,
    softcap = 5.0,
    latent = { rank = 24, rope_dim = 0, nope_dim = 16 }
)]
struct MlaNoRope;

#[attngen::kernel(
    q_heads = 3,
    v_head_dim = 20,
    mask = "causal",
    latent = { rank = 24, rope_dim = 8, nope_dim = 12, form = "expanded" }
)]
struct MlaExpanded;

#[attngen::kernel(
    q_heads = 2,
    v_head_dim = 16,
    mask = { sliding_window = 37 },
    softcap = 20.0,
    latent = { rank = 32, rope_dim = 0, nope_dim = 16, form = "expanded" }
)]
struct MlaExpandedWindow;

#[attngen::kernel(
    q_heads = 5,
    v_head_dim = 12,
    mask = "causal",
    latent = { rank = 40, rope_dim = 8, nope_dim = 16, form = "absorbed", cache = "combined" }
)]
struct MlaCombined;

#[attngen::kernel(
    q_heads = 3,
    v_head_dim = 20,
    mask = { sliding_window = 29 },
    latent = { rank = 24, rope_dim = 8, nope_dim = 12, form = "expanded", cache = "combined" }
)]
struct MlaCombinedExpanded;

#[attngen::kernel(spec = "../specs/llama3-8b.toml")]
struct Llama3FromFile;

#[attngen::kernel(
    q_heads = 4,
    kv_heads = 2,
    head_dim = 256,
    softcap = 6.0,
    mask = { sliding_window = 900 }
)]
struct WideWindow;

#[attngen::kernel(
    q_heads = 4,
    v_head_dim = 512,
    mask = "causal",
    latent = { rank = 16, rope_dim = 64, nope_dim = 512, form = "expanded" }
)]
struct WideExpanded;

/// How many kernels [`kernels`] lists: the property test draws from all of them.
const KERNELS: usize = 12;

/// Every kernel above, for `isa`.
fn kernels(isa: Isa) -> Vec<MacroKernel> {
    vec![
        GqaCausal::with_isa(isa),
        Mha::with_isa(isa),
        MqaWindow::with_isa(isa),
        UnevenSoftcap::with_isa(isa),
        Interleaved::with_isa(isa),
        OneWide::with_isa(isa),
        MlaRope::with_isa(isa),
        MlaNoRope::with_isa(isa),
        MlaExpanded::with_isa(isa),
        MlaExpandedWindow::with_isa(isa),
        MlaCombined::with_isa(isa),
        MlaCombinedExpanded::with_isa(isa),
    ]
}

/// The ISAs this CPU runs; the others are named as skipped, never passed.
fn isas() -> Vec<Isa> {
    attngen::harness::tested_isas()
}

/// The kernel against the reference on one case with inputs of magnitude `m`, `ragged` with
/// per-sequence key lengths.
fn compare(
    kernel: &MacroKernel,
    shape: Shape,
    seed: u64,
    m: f32,
    ragged: bool,
) -> Result<(), String> {
    let mut inputs = OwnedInputs::random(kernel.spec(), shape, seed, m);
    if ragged {
        inputs = inputs.ragged(kernel.spec(), shape, seed);
    }
    compare_with_reference(kernel, shape, &inputs, m)
        .map_err(|e| format!("{} on {}: {e}", kernel.spec().summary(), kernel.isa()))
}

#[test]
fn the_widest_isa_is_chosen_and_a_missing_one_is_an_error() {
    assert_eq!(GqaCausal::compiled().isa(), Isa::from_env().unwrap().unwrap_or_else(Isa::detect));
    for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
        let kernel = GqaCausal::with_isa(isa);
        let inputs = OwnedInputs::random(kernel.spec(), Shape::new(1, 1, 1), 1, 1.0);
        let mut out = vec![0.0; 8 * 16];
        let err = kernel.run(Shape::new(1, 1, 1), &inputs.inputs(), &mut out, None).unwrap_err();
        assert!(err.to_string().contains(isa.name()), "{err}");
    }
}

#[test]
fn a_spec_file_kernel_is_the_file_s_spec() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../specs/llama3-8b.toml"));
    let spec = attngen::AttentionSpec::from_toml(&text.unwrap()).unwrap();
    assert_eq!(Llama3FromFile.spec(), &spec);
    for isa in isas() {
        // One short decode and one prefill step of the real shape.
        for shape in [Shape::new(1, 1, 300), Shape::new(1, 9, 9)] {
            let kernel = Llama3FromFile::with_isa(isa);
            compare(&kernel, shape, 7, 1.0, false).unwrap();
        }
    }
}

/// Infinities, NaN and huge finite inputs give the reference's result element for element, on
/// every ISA, for each kernel that computes the definition's products in its order: every
/// grouped one and the expanded MLA ones (semantics.md §3 step 5).
#[test]
fn non_finite_inputs_give_the_reference_result() {
    for isa in isas() {
        for kernel in kernels(isa) {
            let absorbs = |shape| kernel.form_for(shape) == Form::LatentAbsorbed;
            for shape in [Shape::new(1, 4, 37), Shape::new(2, 1, 70)] {
                if absorbs(shape) {
                    continue;
                }
                let result = compare_non_finite_with_reference(&kernel, shape);
                assert_eq!(result, Ok(()), "{} on {isa}, {shape:?}", kernel.spec().summary());
            }
        }
        assert_weightless_rows(&OneWide::with_isa(isa));
    }
}

#[test]
fn every_kernel_on_edge_shapes() {
    let shapes = [(1, 1, 1), (2, 1, 70), (1, 5, 3), (1, 3, 130), (2, 66, 66), (1, 17, 600)];
    for isa in isas() {
        for kernel in kernels(isa) {
            for ((b, q, k), ragged) in shapes.into_iter().flat_map(|s| [(s, false), (s, true)]) {
                compare(&kernel, Shape::new(b, q, k), 3, 1.0, ragged).unwrap();
            }
        }
    }
}

/// Prefills whose query tiles share packed keys take long key ranges in runs that stay in
/// cache (`KernelPlan::shared_run_keys`: wide heads bring it to a few hundred keys), each
/// packing (or up-projecting) its own and carrying every tile's state on to the next, split
/// only when the tasks are fewer than the threads (more threads than cores here, to make them
/// so); they match the reference with a window's start inside a run and sequences that end
/// inside a run or before a split or run starts (`kv_lens`).
#[test]
fn prefill_runs_over_shared_packed_keys_match_the_reference() {
    for isa in isas() {
        // (kernel, shape, threads, splits, keys per split and per run, key lengths)
        let cases = [
            (
                WideWindow::with_isa(isa),
                Shape::new(3, 40, 2100),
                2,
                (1, 2112, 704),
                vec![2100, 1000, 300],
            ),
            (WideWindow::with_isa(isa), Shape::new(1, 40, 5000), 4, (2, 3072, 1024), vec![3500]),
            (
                WideExpanded::with_isa(isa),
                Shape::new(2, 70, 1000),
                2,
                (1, 1152, 384),
                vec![1000, 200],
            ),
            (WideExpanded::with_isa(isa), Shape::new(1, 70, 2000), 8, (2, 1344, 448), vec![1200]),
        ];
        for (kernel, shape, threads, keys, lens) in cases {
            let kernel = kernel.threads(threads).unwrap();
            let s = kernel.plan().schedule(shape.batch, shape.seq_q, shape.seq_k, threads);
            assert_eq!((s.splits, s.keys_per_split, s.keys_per_run), keys, "{s:?}");
            let inputs = OwnedInputs::random(kernel.spec(), shape, 11, 1.0);
            let ragged = inputs.clone().with_kv_lens(kernel.spec(), shape, lens);
            for inputs in [inputs, ragged] {
                let lens = &inputs.kv_lens;
                compare_with_reference(&kernel, shape, &inputs, 1.0).unwrap_or_else(|e| {
                    panic!("{} on {isa}, {lens:?}: {e}", kernel.spec().summary())
                });
            }
        }
    }
}

/// Kernels read the tensors you pass where they lie: inputs starting at every float offset of
/// a 64-byte line match the reference, decode (cache rows read in place) and prefill alike.
#[test]
fn inputs_at_any_offset_from_a_cache_line_match_the_reference() {
    for isa in isas() {
        for kernel in [GqaCausal::with_isa(isa), MlaRope::with_isa(isa), MlaExpanded::with_isa(isa)]
        {
            for shape in [Shape::new(2, 1, 300), Shape::new(1, 70, 130)] {
                let inputs = OwnedInputs::random(kernel.spec(), shape, 61, 1.0);
                if let Err(e) = compare_at_every_line_offset(&kernel, shape, &inputs, 1.0) {
                    panic!("{} on {isa} at {shape:?}: {e}", kernel.spec().summary());
                }
            }
        }
    }
}

/// The property test draws every kernel; an auto MLA kernel absorbs for decode and expands for
/// a long prefill, and both of its forms match the reference.
#[test]
fn every_kernel_is_drawn_and_auto_mla_kernels_run_both_forms() {
    assert_eq!(kernels(Isa::Portable).len(), KERNELS);
    let (decode, prefill) = (Shape::new(1, 1, 600), Shape::new(1, 400, 400));
    for isa in isas() {
        let kernel = MlaRope::with_isa(isa);
        assert_eq!(kernel.form_for(decode), Form::LatentAbsorbed);
        assert_eq!(kernel.form_for(prefill), Form::LatentExpanded);
        for shape in [decode, prefill] {
            compare(&kernel, shape, 5, 1.0, false).unwrap();
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Every kernel and ISA, drawn per case.
    #[test]
    fn macro_kernels_match_the_reference(
        which in 0..KERNELS,
        shape in strategies::shape(70, 300),
        seed in any::<u64>(),
        large in proptest::bool::weighted(0.2),
        ragged in proptest::bool::weighted(0.25),
        isa in 0..Isa::available().len(),
    ) {
        thread_local!(static KERNELS: Vec<Vec<MacroKernel>> =
            isas().into_iter().map(kernels).collect());
        KERNELS.with(|kernels| {
            let kernel = &kernels[isa][which];
            let grouped = matches!(kernel.spec().kv, KvLayout::Grouped { .. });
            let magnitude = if large && grouped { 6.0 } else { 1.0 };
            let result = compare(kernel, shape, seed, magnitude, ragged);
            prop_assert!(result.is_ok(), "{}", result.unwrap_err());
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases().div_ceil(16)))]

    /// The wide kernels' prefills over long shared keys (in runs, split across 1 to 8 threads
    /// when the tasks are fewer) match the reference, ragged lengths included, on every ISA.
    #[test]
    fn long_shared_keys_match_the_reference(
        expanded in any::<bool>(),
        (batch, seq_q, more_keys) in (1..=3usize, 17..=150usize, 0..=3000usize),
        threads in proptest::sample::select(vec![1usize, 2, 3, 4, 8]),
        seed in any::<u64>(),
        ragged in proptest::bool::weighted(0.5),
        isa in 0..Isa::available().len(),
    ) {
        let isa = Isa::available()[isa];
        let kernel = match expanded {
            true => WideExpanded::with_isa(isa),
            false => WideWindow::with_isa(isa),
        };
        let kernel = kernel.threads(threads).unwrap();
        let result = compare(&kernel, Shape::new(batch, seq_q, seq_q + more_keys), seed, 1.0, ragged);
        prop_assert!(result.is_ok(), "{isa} on {threads} threads: {}", result.unwrap_err());
    }
}

/// A NaN key behind the causal mask reaches only the query that sees it, on every ISA.
#[test]
fn hidden_nan_keys_do_not_leak_and_visible_ones_do() {
    let shape = Shape::new(1, 3, 3);
    for isa in isas() {
        let kernel = GqaCausal::with_isa(isa);
        let mut inputs = OwnedInputs::random(kernel.spec(), shape, 9, 1.0);
        // Key 2 of both KV heads (k and v): only query 2 sees it.
        inputs.get_mut(attngen::Tensor::K)[64..96].fill(f32::NAN);
        inputs.get_mut(attngen::Tensor::V)[64..96].fill(f32::NAN);
        // Zeros before the call, so the NaN rows are ones the kernel wrote.
        let (mut out, mut lse) = (vec![0.0; 3 * 8 * 16], vec![0.0; 3 * 8]);
        kernel.run(shape, &inputs.inputs(), &mut out, Some(&mut lse)).unwrap();
        let (seen, hidden) = out.split_at(2 * 8 * 16);
        assert!(seen.iter().all(|x| x.is_finite()) && hidden.iter().all(|x| x.is_nan()), "{isa}");
        assert!(lse[..16].iter().all(|x| x.is_finite()) && lse[16..].iter().all(|x| x.is_nan()));
    }
}

/// Scores rising key tile by key tile: absorbed MLA's running output is rescaled mid-loop
/// (kept transposed on AVX2, row-major on the other ISAs), at decode and on edge tiles.
#[test]
fn rising_latent_scores_rescale_the_running_output() {
    for isa in isas() {
        let kernel = MlaRope::with_isa(isa);
        for (n, shape) in [Shape::new(2, 1, 300), Shape::new(1, 5, 260)].into_iter().enumerate() {
            assert_eq!(kernel.form_for(shape), Form::LatentAbsorbed);
            let mut inputs = OwnedInputs::random(kernel.spec(), shape, 40 + n as u64, 1.0);
            let magnitude = inputs.rising_latent(shape);
            if let Err(e) = compare_with_reference(&kernel, shape, &inputs, magnitude) {
                panic!("{isa} at {shape:?}: {e}");
            }
        }
    }
}

/// Generated functions bake in their plan's sizes: a kernel whose recorded plan is not the
/// one this attngen makes for its spec refuses to run, and writes nothing.
#[test]
fn functions_from_another_plan_never_run() {
    let spec = GqaCausal.spec().clone();
    let another: &[&str] = &["KernelPlan { .. another version .. }"];
    let plans = [("avx512", another), ("avx2", another), ("neon", another), ("portable", another)];
    let kernel = MacroKernel::new(spec, &plans, Vec::new(), None);
    let shape = Shape::new(1, 1, 1);
    let inputs = OwnedInputs::random(kernel.spec(), shape, 1, 1.0);
    let mut out = vec![-7.0; 8 * 16];
    let err = kernel.run(shape, &inputs.inputs(), &mut out, None).unwrap_err();
    assert!(matches!(err, attngen::Error::Compile(_)), "{err}");
    assert!(out.iter().all(|&x| x == -7.0));
}
