//! The property harness behind `attngen check`: it passes correct kernels, and for a
//! deliberately broken one it shrinks to a minimal case that replays exactly.

use attngen::harness::{self, Case, CheckConfig, Perturbed};
use attngen::{AttentionSpec, Jit, Mask, Reference, Shape};

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
