//! The JIT against the reference interpreter: hand-picked edge cases, then property tests over
//! random specs, shapes and inputs (semantics.md §4 tolerance).

use attngen::harness;
use attngen::{
    AttentionSpec, Error, Form, GroupMap, Isa, Jit, JitOptions, Kernel, KvLayout, LatentCache,
    Mask, MlaForm, Shape, Tensor,
};
use attngen_tests::strategies::{self, Limits, OwnedInputs};
use attngen_tests::{
    assert_errors_leave_outputs_untouched, assert_weightless_rows, compare_at_every_line_offset,
    compare_non_finite_with_reference, compare_with_reference,
};
use proptest::prelude::*;

/// JIT vs reference on one case with inputs of magnitude `m`; describes the first mismatch.
fn compare(
    jit: &Jit,
    spec: &AttentionSpec,
    shape: Shape,
    inputs: &OwnedInputs,
    m: f32,
) -> Result<(), String> {
    let kernel = jit.compile(spec).map_err(|e| e.to_string())?;
    compare_with_reference(&kernel, shape, inputs, m)
}

fn jit() -> Jit {
    Jit::with_threads(2).unwrap()
}

/// A JIT calling `isa`'s routines, on two threads.
fn jit_for(isa: Isa) -> Jit {
    Jit::with_options(JitOptions::default().isa(isa).threads(2)).unwrap()
}

/// A JIT for every ISA this CPU has; the others are named as skipped, never passed.
fn jits() -> Vec<Jit> {
    harness::tested_isas().into_iter().map(jit_for).collect()
}

#[test]
fn the_widest_isa_is_detected_and_lower_ones_can_be_forced() {
    let available = Isa::available();
    assert_eq!(Isa::detect(), available[0]);
    assert_eq!(available.last(), Some(&Isa::Portable));
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        assert_eq!(Isa::Avx512.is_supported(), avx512 && avx2);
        assert_eq!(Isa::Avx2Fma.is_supported(), avx2);
        assert!(!Isa::Neon.is_supported());
    }
    #[cfg(target_arch = "aarch64")]
    {
        assert_eq!(Isa::Neon.is_supported(), std::arch::is_aarch64_feature_detected!("neon"));
        assert!(!Isa::Avx512.is_supported() && !Isa::Avx2Fma.is_supported());
    }
    for isa in Isa::ALL {
        let built = Jit::with_options(JitOptions::default().isa(isa));
        match isa.is_supported() {
            true => assert_eq!(built.unwrap().isa(), isa),
            false => {
                let error = built.err().unwrap();
                assert!(matches!(error, Error::Isa { .. }), "{error}");
                let text = error.to_string();
                assert!(text.contains(isa.name()) && text.contains("this CPU lacks it"), "{text}");
            }
        }
        assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
    }
    let error = "avx3".parse::<Isa>().unwrap_err().to_string();
    assert!(error.contains("avx3") && error.contains("avx512, avx2, neon or portable"), "{error}");
}

#[test]
fn every_variant_on_a_few_shapes() {
    let jits = jits();
    let specs = [
        AttentionSpec::mha(2, 8),
        AttentionSpec::mha(3, 5).mask(Mask::Causal),
        AttentionSpec::mqa(5, 17).mask(Mask::SlidingWindow(3)),
        AttentionSpec::gqa(6, 2, 16).group_map(GroupMap::Interleaved).mask(Mask::Causal),
        AttentionSpec::gqa(5, 3, 4)
            .group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2]))
            .v_head_dim(7),
        AttentionSpec::gqa(4, 2, 9).softcap(1.5).scale(0.7).mask(Mask::Causal),
        // A larger group after a smaller one: decode items walk both, each with its own rows.
        AttentionSpec::gqa(6, 2, 8).group_map(GroupMap::Explicit(vec![0, 0, 1, 1, 1, 1])),
        AttentionSpec::mla(3, 12, 4, 6, 5).mask(Mask::Causal),
        AttentionSpec::mla(2, 9, 0, 3, 4),
        AttentionSpec::mla(2, 5, 3, 0, 2).mask(Mask::SlidingWindow(2)),
    ];
    for (n, spec) in specs.iter().enumerate() {
        for shape in [
            Shape::new(1, 1, 1),
            Shape::new(2, 3, 7),
            Shape::new(1, 70, 130),
            // The call packs K/V; with one head per group its last query tile has 2 rows, whose
            // scores are dot products with the call's packed keys.
            Shape::new(1, 66, 130),
            Shape::new(2, 9, 4),
            Shape::new(1, 1, 300),
        ] {
            let inputs = OwnedInputs::random(spec, shape, n as u64, 1.0);
            for jit in &jits {
                if let Err(e) = compare(jit, spec, shape, &inputs, 1.0) {
                    panic!("{} {spec:?} at {shape:?}: {e}", jit.isa());
                }
            }
        }
    }
}

/// Decode shapes with keys enough to split across threads (the property tests stay below
/// 256 keys per split): each split's partial state is merged by log-sum-exp, per-thread split
/// buffers are reused across calls of different shapes, and the result matches the reference.
/// The last spec's cache rows are wide enough that its decode items take narrow key tiles
/// (`dot_k_tile`), including edge tiles at the window's start and the splits' ends.
#[test]
fn split_decode_merges_like_the_reference() {
    let jits = jits();
    let jit = &jits[0];
    let specs = [
        AttentionSpec::gqa(6, 2, 16).group_map(GroupMap::Explicit(vec![1, 0, 0, 0, 1, 1])),
        AttentionSpec::mha(3, 9).mask(Mask::Causal),
        AttentionSpec::mqa(4, 12).mask(Mask::SlidingWindow(700)).softcap(2.0),
        AttentionSpec::mla(4, 16, 8, 8, 6).mask(Mask::Causal),
        AttentionSpec::gqa(8, 4, 96).mask(Mask::SlidingWindow(301)),
    ];
    let narrow = jit.compile(&specs[4]).unwrap();
    assert!(narrow.plan().dot_k_tile < narrow.plan().k_tile, "{}", narrow.plan());
    for (n, spec) in specs.iter().enumerate() {
        let kernel = jit.compile(spec).unwrap();
        for shape in [Shape::new(1, 1, 1500), Shape::new(3, 2, 1030), Shape::new(2, 1, 777)] {
            let schedule = kernel.plan().schedule(shape.batch, shape.seq_q, shape.seq_k, 2);
            assert!(schedule.splits > 1, "{spec:?} at {shape:?} does not split: {schedule:?}");
            let inputs = OwnedInputs::random(spec, shape, 40 + n as u64, 1.0);
            for jit in &jits {
                if let Err(e) = compare(jit, spec, shape, &inputs, 1.0) {
                    panic!("{} {spec:?} at {shape:?}: {e}", jit.isa());
                }
            }
        }
    }
}

/// A prefill whose query tiles share packed keys — call-packed grouped K/V, an expanded MLA
/// task's up-projected buffer — takes a long key range in runs that stay in cache across its
/// tiles (`KernelPlan::shared_run_keys`; wide heads bring it to a few hundred keys), each
/// tile's state carried from run to run, and splits the range only when the (batch, head)
/// tasks are fewer than the threads (more threads than cores here, to make them so). Every
/// tile reads every run, the causal diagonal and a window's start fall inside runs, sequences
/// may end inside a run or before a split starts (`kv_lens`, rows past them NaN), and the
/// result matches the reference on every ISA.
#[test]
fn prefill_runs_over_shared_packed_keys_match_the_reference() {
    let wide = AttentionSpec::mla(4, 16, 64, 512, 512).mla_form(MlaForm::Expanded);
    let grouped = AttentionSpec::gqa(4, 2, 256);
    let window = wide.clone().mask(Mask::SlidingWindow(700)).softcap(8.0);
    let grouped_window = grouped.clone().mask(Mask::SlidingWindow(900)).softcap(6.0);
    // (spec, its cap, the shape, threads, its splits, keys per split and per run, key lengths
    // that end inside a run and before a split or run starts)
    let cases = [
        (wide.mask(Mask::Causal), 448, Shape::new(2, 70, 1000), 2, (1, 1152, 384), vec![1000, 200]),
        (window, 448, Shape::new(1, 70, 2000), 8, (2, 1344, 448), vec![1200]),
        (
            grouped.mask(Mask::Causal),
            1024,
            Shape::new(2, 40, 2500),
            2,
            (1, 2688, 896),
            vec![2500, 800],
        ),
        (grouped_window, 1024, Shape::new(1, 40, 5000), 4, (2, 3072, 1024), vec![3500]),
    ];
    for (n, (spec, cap, shape, threads, keys, lens)) in cases.into_iter().enumerate() {
        let inputs = OwnedInputs::random(&spec, shape, 90 + n as u64, 1.0);
        let ragged = inputs.clone().with_kv_lens(&spec, shape, lens);
        for isa in harness::tested_isas() {
            let jit = Jit::with_options(JitOptions::default().isa(isa).threads(threads)).unwrap();
            let plan = jit.compile(&spec).unwrap().plan().clone();
            let s = plan.schedule(shape.batch, shape.seq_q, shape.seq_k, threads);
            assert_eq!(plan.shared_run_keys, cap, "{plan}");
            assert_eq!((s.splits, s.keys_per_split, s.keys_per_run), keys, "{s:?}");
            for inputs in [&inputs, &ragged] {
                if let Err(e) = compare(&jit, &spec, shape, inputs, 1.0) {
                    panic!("{isa} {spec:?} at {shape:?}, {:?}: {e}", inputs.kv_lens);
                }
            }
        }
    }
}

/// Kernels read the tensors you pass where they lie: inputs starting at every float offset of
/// a 64-byte line match the reference on every ISA — decode's cache rows read in place (narrow
/// key tiles over wide rows, MLA's latent rows) and prefill's packed copies.
#[test]
fn inputs_at_any_offset_from_a_cache_line_match_the_reference() {
    let jits = jits();
    let specs = [
        AttentionSpec::gqa(8, 4, 96).mask(Mask::Causal),
        AttentionSpec::mla(4, 16, 8, 8, 6).mask(Mask::Causal),
    ];
    for (n, spec) in specs.iter().enumerate() {
        for shape in [Shape::new(2, 1, 300), Shape::new(1, 70, 130)] {
            let inputs = OwnedInputs::random(spec, shape, 60 + n as u64, 1.0);
            for jit in &jits {
                let kernel = jit.compile(spec).unwrap();
                if let Err(e) = compare_at_every_line_offset(&kernel, shape, &inputs, 1.0) {
                    panic!("{} {spec:?} at {shape:?}: {e}", jit.isa());
                }
            }
        }
    }
}

/// Absorbed MLA whose latent rows lie 512 bytes apart (rank 128), with more query rows than a
/// register block holds: the value product's first row block copies each column block's strip
/// of the latent and the later ones read the copy (`dot_nn`), on every ISA this CPU has.
#[test]
fn latent_rows_in_few_cache_sets_match_the_reference() {
    let jits = jits();
    let spec =
        AttentionSpec::mla(12, 128, 8, 16, 12).mla_form(MlaForm::Absorbed).mask(Mask::Causal);
    let shapes = [Shape::new(2, 1, 300), Shape::new(1, 3, 130), Shape::new(1, 1, 1500)];
    for (n, shape) in shapes.into_iter().enumerate() {
        let inputs = OwnedInputs::random(&spec, shape, 120 + n as u64, 1.0);
        for jit in &jits {
            if let Err(e) = compare(jit, &spec, shape, &inputs, 1.0) {
                panic!("{} at {shape:?}: {e}", jit.isa());
            }
        }
    }
}

/// Scores rising key tile by key tile: absorbed MLA's running output is rescaled mid-loop
/// (kept transposed on AVX2, row-major on the other ISAs), at decode and on edge tiles.
#[test]
fn rising_latent_scores_rescale_the_running_output() {
    let jits = jits();
    let spec = AttentionSpec::mla(16, 64, 8, 16, 12).mla_form(MlaForm::Absorbed).mask(Mask::Causal);
    for (n, shape) in [Shape::new(2, 1, 300), Shape::new(1, 5, 260)].into_iter().enumerate() {
        let mut inputs = OwnedInputs::random(&spec, shape, 40 + n as u64, 1.0);
        let magnitude = inputs.rising_latent(shape);
        for jit in &jits {
            if let Err(e) = compare(jit, &spec, shape, &inputs, magnitude) {
                panic!("{} at {shape:?}: {e}", jit.isa());
            }
        }
    }
}

#[test]
fn latent_kernels_choose_their_form_per_call_and_both_match_the_reference() {
    let jits = jits();
    let lite = AttentionSpec::mla(4, 64, 8, 16, 12).mask(Mask::Causal);
    let auto = jits[0].compile(&lite).unwrap();
    let forms: Vec<Form> = auto.plans().map(|plan| plan.form).collect();
    assert_eq!(forms, [Form::LatentAbsorbed, Form::LatentExpanded]);
    // Decode absorbs; a long prefill up-projects (each key then serves hundreds of queries).
    let (decode, prefill) = (Shape::new(1, 1, 1500), Shape::new(1, 400, 400));
    assert_eq!(auto.form_for(decode), Form::LatentAbsorbed);
    assert_eq!(auto.form_for(prefill), Form::LatentExpanded);
    for form in [MlaForm::Auto, MlaForm::Absorbed, MlaForm::Expanded] {
        let spec = lite.clone().mla_form(form);
        for (n, shape) in [decode, prefill, Shape::new(3, 70, 200)].into_iter().enumerate() {
            let inputs = OwnedInputs::random(&spec, shape, 90 + n as u64, 1.0);
            for jit in &jits {
                if let Err(e) = compare(jit, &spec, shape, &inputs, 1.0) {
                    panic!("{} {form} at {shape:?}: {e}", jit.isa());
                }
            }
        }
    }
    // A forced form compiles alone and runs whatever the shape, splits included.
    let expanded = jits[0].compile(&lite.clone().mla_form(MlaForm::Expanded)).unwrap();
    assert_eq!(expanded.plans().count(), 1);
    assert_eq!(expanded.form_for(decode), Form::LatentExpanded);
    let schedule = expanded.plan().schedule(decode.batch, decode.seq_q, decode.seq_k, 2);
    assert!(schedule.splits > 1, "{schedule:?}");
}

#[test]
fn compiling_an_equal_spec_hits_the_cache() {
    let jit = jit();
    let a = jit.compile(&AttentionSpec::gqa(8, 2, 64).mask(Mask::Causal)).unwrap();
    let b = jit.compile(&AttentionSpec::gqa(8, 2, 64).mask(Mask::Causal).named("same")).unwrap();
    let c = jit.compile(&AttentionSpec::gqa(8, 2, 64)).unwrap();
    assert!(a.same_code(&b));
    assert!(!a.same_code(&c));
    assert_eq!(a.compile_time(), b.compile_time());
    // A latent cache's layout is part of the spec: its rows lie elsewhere.
    let separate = AttentionSpec::mla(4, 32, 8, 16, 12);
    let combined = separate.clone().latent_cache(LatentCache::Combined);
    let (d, e) = (jit.compile(&separate).unwrap(), jit.compile(&combined).unwrap());
    assert!(!d.same_code(&e));
}

#[test]
fn hidden_nan_keys_do_not_leak_and_visible_ones_do() {
    let jit = jit();
    let spec = AttentionSpec::gqa(2, 1, 4).mask(Mask::Causal);
    let shape = Shape::new(1, 3, 3);
    let mut inputs = OwnedInputs::random(&spec, shape, 9, 1.0);
    // Key 2 (k and v) is NaN: only query 2 sees it.
    inputs.get_mut(Tensor::K)[8..12].fill(f32::NAN);
    inputs.get_mut(Tensor::V)[8..12].fill(f32::NAN);
    let kernel = jit.compile(&spec).unwrap();
    // Zeros, not NaN, before the call: the NaN rows must be ones the kernel wrote.
    let (mut out, mut lse) = (vec![0.0; 24], vec![0.0; 6]);
    kernel.run(shape, &inputs.inputs(), &mut out, Some(&mut lse)).unwrap();
    assert!(out[..16].iter().all(|x| x.is_finite()), "{out:?}");
    assert!(out[16..].iter().all(|x| x.is_nan()), "{out:?}");
    assert!(lse[..4].iter().all(|x| x.is_finite()) && lse[4..].iter().all(|x| x.is_nan()));
}

/// The same for absorbed MLA on every ISA: its running output is kept transposed on AVX2,
/// whose value product runs an edge tile's keys as one product only when their latent rows
/// are finite.
#[test]
fn hidden_nan_latent_rows_do_not_leak_and_visible_ones_do() {
    let spec = AttentionSpec::mla(2, 16, 4, 8, 4).mla_form(MlaForm::Absorbed).mask(Mask::Causal);
    let shape = Shape::new(1, 3, 3);
    let mut inputs = OwnedInputs::random(&spec, shape, 9, 1.0);
    // Key 2's latent row is NaN: only query 2 sees it.
    inputs.get_mut(Tensor::CKv)[32..48].fill(f32::NAN);
    for jit in jits() {
        let kernel = jit.compile(&spec).unwrap();
        let mut out = vec![0.0; 3 * 2 * 4];
        kernel.run(shape, &inputs.inputs(), &mut out, None).unwrap();
        assert!(out[..16].iter().all(|x| x.is_finite()), "{}: {out:?}", jit.isa());
        assert!(out[16..].iter().all(|x| x.is_nan()), "{}: {out:?}", jit.isa());
    }
}

#[test]
fn errors_leave_out_untouched() {
    let jit = jit();
    assert_errors_leave_outputs_untouched(&jit.compile(&AttentionSpec::gqa(4, 2, 3)).unwrap());
    assert_eq!(
        jit.compile(&AttentionSpec::gqa(30, 8, 128)).err().unwrap().to_string(),
        "invalid spec: q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\""
    );
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
}

/// Specs for the property test: every variant, head_dim up to 256 (odd sizes included),
/// latent rank up to 512.
const JIT_LIMITS: Limits = Limits { heads: 8, dim: 256, rank: 512 };

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Every ISA this CPU has, drawn per case (`jits` names the skipped ones).
    #[test]
    fn jit_matches_the_reference(
        spec in strategies::kernel_spec(JIT_LIMITS),
        shape in strategies::shape(70, 300),
        seed in any::<u64>(),
        large in proptest::bool::weighted(0.2),
        ragged in proptest::bool::weighted(0.25),
        isa in 0..Isa::available().len(),
    ) {
        thread_local!(static JITS: Vec<Jit> = jits());
        // Large magnitudes (scores in the hundreds: the online softmax must subtract its
        // running max) for grouped specs; latent scores are already large through W_UK.
        let magnitude = if large && matches!(spec.kv, KvLayout::Grouped { .. }) { 6.0 } else { 1.0 };
        let mut inputs = OwnedInputs::random(&spec, shape, seed, magnitude);
        if ragged {
            inputs = inputs.ragged(&spec, shape, seed);
        }
        let result = JITS.with(|jits| compare(&jits[isa], &spec, shape, &inputs, magnitude));
        prop_assert!(result.is_ok(), "{}: {}", Isa::available()[isa], result.unwrap_err());
    }
}

/// Wide-head specs, whose prefills take their keys in runs after a few hundred of them
/// (`KernelPlan::shared_run_keys`: 1024 keys for D = 256, 512 for MQA's D = 512, 448 for the
/// expanded MLA's 576-float keys), with every mask and an optional softcap.
fn wide_spec() -> impl Strategy<Value = AttentionSpec> {
    let variant = prop_oneof![
        Just(AttentionSpec::gqa(4, 2, 256)),
        Just(AttentionSpec::mqa(3, 512)),
        (2..=4usize)
            .prop_map(|h| { AttentionSpec::mla(h, 16, 64, 512, 512).mla_form(MlaForm::Expanded) }),
    ];
    let mask = prop_oneof![
        Just(Mask::None),
        Just(Mask::Causal),
        (50..2000usize).prop_map(Mask::SlidingWindow),
    ];
    (variant, mask, proptest::option::of(5.0f32..25.0)).prop_map(|(spec, mask, cap)| {
        let spec = spec.mask(mask);
        match cap {
            Some(cap) => spec.softcap(cap),
            None => spec,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases().div_ceil(16)))]

    /// Prefills over long shared keys — grouped K/V packed run by run, expanded MLA
    /// up-projected run by run, each query tile's state carried from run to run, the range
    /// split across 1 to 8 threads when the tasks are fewer — match the reference, ragged
    /// lengths included, on every ISA (drawn per case).
    #[test]
    fn long_shared_keys_match_the_reference(
        spec in wide_spec(),
        (batch, seq_q, more_keys) in (1..=3usize, 17..=150usize, 0..=4000usize),
        threads in proptest::sample::select(vec![1usize, 2, 3, 4, 8]),
        seed in any::<u64>(),
        ragged in proptest::bool::weighted(0.5),
        isa in 0..Isa::available().len(),
    ) {
        let shape = Shape::new(batch, seq_q, seq_q + more_keys);
        let mut inputs = OwnedInputs::random(&spec, shape, seed, 1.0);
        if ragged {
            inputs = inputs.ragged(&spec, shape, seed);
        }
        let isa = Isa::available()[isa];
        let jit = Jit::with_options(JitOptions::default().isa(isa).threads(threads)).unwrap();
        let result = compare(&jit, &spec, shape, &inputs, 1.0);
        prop_assert!(result.is_ok(), "{isa} on {threads} threads: {}", result.unwrap_err());
    }
}

/// Infinities, NaN and huge finite inputs give the reference's result element for element —
/// NaN where it has NaN, the same infinity, a finite value within tolerance — on every ISA, for
/// every grouped variant and expanded MLA (semantics.md §3 step 5; absorbed MLA reassociates the
/// products, so only its confinement to the rows that see a key is promised, tested above).
#[test]
fn non_finite_inputs_give_the_reference_result() {
    let specs = [
        AttentionSpec::gqa(4, 2, 8).mask(Mask::Causal),
        AttentionSpec::gqa(5, 3, 6)
            .group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2]))
            .softcap(5.0)
            .mask(Mask::SlidingWindow(9)),
        AttentionSpec::mqa(3, 17).v_head_dim(5),
        AttentionSpec::mla(4, 16, 4, 8, 8).mla_form(MlaForm::Expanded).mask(Mask::Causal),
        AttentionSpec::mla(2, 24, 0, 8, 4).mla_form(MlaForm::Expanded).softcap(5.0),
    ];
    for jit in jits() {
        for spec in &specs {
            let kernel = jit.compile(spec).unwrap();
            for shape in [Shape::new(1, 4, 37), Shape::new(2, 1, 70)] {
                let result = compare_non_finite_with_reference(&kernel, shape);
                assert_eq!(result, Ok(()), "{} {spec:?} {shape:?}", jit.isa());
            }
        }
        let one_key = AttentionSpec::mha(3, 1).mask(Mask::SlidingWindow(1));
        assert_weightless_rows(&jit.compile(&one_key).unwrap());
    }
}
