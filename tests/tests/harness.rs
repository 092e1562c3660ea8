//! The property harness behind `attngen check`: it passes correct kernels, and for a
//! deliberately broken one it shrinks to a minimal case that replays exactly.

use attngen::harness::{self, Case, CheckConfig, LongPrefill, Perturbed};
use attngen::{AttentionSpec, Jit, JitOptions, Mask, MlaForm, Reference, Shape};

#[test]
fn correct_kernels_pass() {
    let jit = Jit::with_threads(2).unwrap();
    for spec in
        [AttentionSpec::gqa(6, 2, 24).mask(Mask::Causal), AttentionSpec::mla(4, 48, 8, 16, 12)]
    {
        let kernel = jit.compile(&spec).unwrap();
        let report =
            harness::check(&kernel, &CheckConfig { cases: 24, seed: 7, ..CheckConfig::default() })
                .unwrap();
        assert_eq!(report.failure, None);
        assert_eq!(report.cases, 24);
        assert!(report.max_abs > 0.0 && report.max_abs < 1e-4, "{report:?}");
    }
}

/// Zero cases is an error, not a report that passes having run nothing.
#[test]
fn zero_cases_is_an_error() {
    let kernel = Reference::new(&AttentionSpec::mha(2, 4)).unwrap();
    let config = CheckConfig { cases: 0, ..CheckConfig::default() };
    let error = harness::check(&kernel, &config).unwrap_err();
    assert_eq!(error, attngen::Error::Check("zero cases would pass having checked nothing".into()));
}

#[test]
fn a_broken_kernel_shrinks_to_a_minimal_replayable_case() {
    let spec = AttentionSpec::mha(2, 4).mask(Mask::Causal);
    let broken = Perturbed(Box::new(Reference::new(&spec).unwrap()));
    let report =
        harness::check(&broken, &CheckConfig { cases: 64, seed: 1, ..CheckConfig::default() })
            .unwrap();
    let (case, mismatch) = report.failure.expect("the perturbation is found");
    // Shrinking reaches the smallest shape that still fails: one sequence, three queries, one key.
    assert_eq!(case.shape, Shape::new(1, 3, 1));
    assert_eq!(mismatch.tensor, "out");
    assert_eq!(mismatch.index, vec![0, 2, 0, 0]);
    assert!((mismatch.got - mismatch.expected - 0.5).abs() < 1e-6);
    // Replaying the reported case reproduces the same mismatch; the correct kernel passes it.
    let replay = harness::run_case(&broken, case).unwrap();
    assert_eq!(replay.mismatch, Some(mismatch));
    let reference = Reference::new(&spec).unwrap();
    assert_eq!(harness::run_case(&reference, Case { ..case }).unwrap().mismatch, None);
}

#[test]
fn the_same_seed_draws_the_same_cases() {
    let spec = AttentionSpec::mha(2, 4).mask(Mask::Causal);
    let broken = Perturbed(Box::new(Reference::new(&spec).unwrap()));
    let config = CheckConfig { cases: 64, seed: 99, ..CheckConfig::default() };
    let first = harness::check(&broken, &config).unwrap();
    let second = harness::check(&broken, &config).unwrap();
    assert_eq!(first, second);
}

#[test]
fn long_decode_cases_reach_the_split_path_where_the_budget_allows() {
    // Every long decode shape splits its keys, on one thread or several.
    let specs = [
        AttentionSpec::gqa(32, 8, 128),
        AttentionSpec::mha(16, 64).mask(Mask::Causal),
        AttentionSpec::mla(4, 48, 8, 16, 12),
    ];
    let jit = Jit::with_threads(2).unwrap();
    for spec in &specs {
        let kernel = jit.compile(spec).unwrap();
        let plan = kernel.plan();
        for (b, sq, threads) in [(1, 1, 1), (2, 2, 1), (2, 2, 2), (1, 2, 8)] {
            let s = plan.schedule(b, sq, harness::LONG_DECODE_KEYS, threads);
            assert!(s.splits > 1, "{spec:?} B={b} Sq={sq} on {threads} threads: {s:?}");
        }
    }
    // Grouped specs afford long cases; DeepSeek-V2's reference (128 heads materialised from
    // a 512-wide latent per key) does not.
    let llama = CheckConfig::sized_for(&specs[0], 64, 0);
    assert_eq!(llama.max_long_seq_k, CheckConfig::default().max_long_seq_k);
    // Budgets shrink the batch before the lengths: Llama keeps every length at B <= 2, and
    // DeepSeek-V2-Lite's check still spans several 64-key tiles.
    assert_eq!((llama.max_batch, llama.max_seq_q, llama.max_seq_k), (2, 70, 300));
    let lite = CheckConfig::sized_for(&AttentionSpec::mla(16, 512, 64, 128, 128), 64, 0);
    assert!(lite.max_batch == 1 && lite.max_seq_k > 128, "{lite:?}");
    let v2 = CheckConfig::sized_for(&AttentionSpec::mla(128, 512, 64, 128, 128), 64, 0);
    assert_eq!(v2.max_long_seq_k, 0);
    // A check of a small spec draws long cases: a kernel that is wrong only past 512 keys fails.
    let spec = AttentionSpec::gqa(4, 2, 8);
    let broken = BrokenWhen(Reference::new(&spec).unwrap(), |s: Shape| s.seq_k > 512);
    let report = harness::check(&broken, &CheckConfig { cases: 64, ..CheckConfig::default() });
    let (case, _) = report.unwrap().failure.expect("a long case is drawn and fails");
    assert_eq!(case.shape.seq_k, harness::LONG_DECODE_KEYS, "shrunk to the shortest long case");
}

#[test]
fn long_prefill_cases_read_their_keys_in_runs_where_the_budget_allows() {
    // Llama-3-8B, MHA 16 × 64, MQA 16 × 128 and Gemma-2's D = 256: on every ISA's plan and
    // any thread count, each corner of the drawn range reads a split's keys in several runs.
    let specs = [
        AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal),
        AttentionSpec::mha(16, 64),
        AttentionSpec::gqa(16, 1, 128).mask(Mask::Causal),
        AttentionSpec::gqa(16, 8, 256).mask(Mask::Causal),
    ];
    for spec in &specs {
        for threads in [1, 2, 8] {
            let long = LongPrefill::sized_for(spec, threads, |_, _| true).unwrap();
            for isa in harness::tested_isas() {
                let jit = Jit::with_options(JitOptions::default().isa(isa)).unwrap();
                let plan = jit.compile(spec).unwrap().plan().clone();
                assert_eq!(long.seq_q.0, plan.q_tile + 1, "{isa}");
                let corners = [long.seq_q.0, long.seq_q.1]
                    .into_iter()
                    .flat_map(|sq| [(sq, long.seq_k.0), (sq, long.seq_k.1)]);
                for (sq, sk) in corners {
                    let s = plan.schedule(1, sq, sk, threads);
                    let what = format!("{spec:?} on {threads} threads, {isa}: Sq {sq}, Sk {sk}");
                    assert!(s.packs_call && s.keys_per_run < s.keys_per_split, "{what}: {s:?}");
                }
            }
        }
    }
    // Grouped specs afford them. DeepSeek-V2-Lite does not: its first plan, absorbed, has no
    // runs, and forced to the expanded form its reference materialises every head's K and V
    // for each of 1500+ keys. A small latent spec forced to the expanded form draws them.
    assert!(CheckConfig::sized_for(&specs[0], 64, 0).long_prefill.is_some());
    let lite = AttentionSpec::mla(16, 512, 64, 128, 128);
    assert_eq!(CheckConfig::sized_for(&lite, 64, 0).long_prefill, None);
    let lite = lite.mla_form(MlaForm::Expanded);
    assert_eq!(CheckConfig::sized_for(&lite, 64, 0).long_prefill, None);
    let small = AttentionSpec::mla(4, 48, 8, 16, 12).mla_form(MlaForm::Expanded);
    assert!(CheckConfig::sized_for(&small, 64, 0).long_prefill.is_some());
    // A check draws them: a kernel wrong only when two query tiles share keys past one run
    // fails, shrunk to the smallest such case.
    let spec = AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal);
    let config = CheckConfig::sized_for(&spec, 64, 3);
    let long = config.long_prefill.unwrap();
    let in_runs = |s: Shape| s.seq_q >= long.seq_q.0 && s.seq_k >= long.seq_k.0;
    let broken = BrokenWhen(Reference::new(&spec).unwrap(), in_runs);
    let (case, _) = harness::check(&broken, &config).unwrap().failure.expect("drawn and failed");
    assert_eq!(case.shape, Shape::new(1, long.seq_q.0, long.seq_k.0), "shrunk to the corner");
}

/// The reference, but with `out` nudged on every call whose shape `.1` picks.
struct BrokenWhen<F: Fn(Shape) -> bool>(Reference, F);

impl<F: Fn(Shape) -> bool + Send + Sync> attngen::Kernel for BrokenWhen<F> {
    fn spec(&self) -> &AttentionSpec {
        self.0.spec()
    }

    fn run(
        &self,
        shape: Shape,
        inputs: &attngen::Inputs<'_>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), attngen::Error> {
        self.0.run(shape, inputs, out, lse)?;
        if (self.1)(shape) {
            out[0] += 1.0;
        }
        Ok(())
    }
}

/// `spec_tests!`'s assertion passes agreeing kernels and names the one that differs, with the
/// shrunk case (Sq = 3, the smallest the perturbation shows at).
#[test]
fn assert_matches_reference_names_the_kernel_that_differs() {
    let spec = AttentionSpec::gqa(4, 2, 8).mask(Mask::Causal);
    let jit = Jit::with_threads(2).unwrap().compile(&spec).unwrap();
    let broken = Perturbed(Box::new(Reference::new(&spec).unwrap()));
    harness::assert_matches_reference(&[("jit".to_owned(), jit.clone())], 16);
    let both: [(String, Box<dyn attngen::Kernel>); 2] =
        [("jit".to_owned(), Box::new(jit)), ("broken".to_owned(), Box::new(broken))];
    let check = std::panic::AssertUnwindSafe(|| harness::assert_matches_reference(&both, 64));
    let panic = std::panic::catch_unwind(check);
    let message = *panic.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("broken: ") && message.contains("seq_q: 3"), "{message}");
}

/// A shape whose tensors cannot be allocated is an error naming the tensor, not an abort: here
/// q's 2^62 floats fit a `usize` count but not an allocation (2^64 bytes).
#[test]
fn a_shape_too_large_for_memory_is_an_error_not_an_abort() {
    use attngen::{Error, Tensor};
    let spec = AttentionSpec::gqa(32, 8, 128);
    let shape = Shape::new(1 << 25, 1 << 25, 1);
    let q = vec![1 << 25, 1 << 25, 32, 128];
    let too_large = Err(Error::TooLarge { tensor: "q", shape: q });
    assert_eq!(harness::inputs(&spec, shape, 1, 1.0).map(|_| ()), too_large);
    let out = Err(Error::TooLarge { tensor: "out", shape: vec![1 << 25, 1 << 25, 32, 128] });
    assert_eq!(harness::zeros(&spec, shape, Tensor::Out).map(|_| ()), out);
    let replay = Case { shape, input_seed: 5, ragged: false };
    let kernel = Reference::new(&spec).unwrap();
    assert!(matches!(harness::run_case(&kernel, replay), Err(Error::TooLarge { tensor: "q", .. })));
    // Small shapes are unaffected: every element drawn, in [-1, 1).
    let small = harness::zeros(&spec, Shape::new(1, 2, 3), Tensor::Lse).unwrap();
    assert_eq!(small, vec![0.0; 64]);
    let drawn = harness::inputs(&spec, Shape::new(1, 2, 3), 1, 1.0).unwrap();
    assert_eq!(drawn[0].1.len(), 2 * 32 * 128);
    assert!(drawn.iter().all(|(_, v)| v.iter().all(|x| (-1.0..1.0).contains(x))));
}
