//! The reference interpreter against hand-computed values and identities (never against itself),
//! and against the independent float64 formulation over random specs.

use attngen::{
    AttentionSpec, GroupMap, Inputs, Kernel, LatentCache, Mask, Reference, Shape, Tensor,
};
use attngen_tests::strategies::{self, Limits, OwnedInputs};
use attngen_tests::{
    WeightlessRows, assert_errors_leave_outputs_untouched, assert_weightless_rows, first_mismatch,
    independent, uniform,
};
use proptest::prelude::*;

/// Runs the reference; returns (out, lse).
fn run(spec: &AttentionSpec, shape: Shape, inputs: &Inputs<'_>) -> (Vec<f32>, Vec<f32>) {
    let kernel = Reference::new(spec).expect("valid spec");
    let out_len = Tensor::Out.len(spec, shape).unwrap();
    let (mut out, mut lse) = (vec![f32::NAN; out_len], vec![f32::NAN; out_len / spec.v_head_dim]);
    kernel.run(shape, inputs, &mut out, Some(&mut lse)).expect("valid call");
    (out, lse)
}

fn assert_close(got: &[f32], want: &[f64]) {
    if let Some((i, g, w)) = first_mismatch(got, want) {
        panic!("element {i}: got {g}, expected {w}\n got: {got:?}\nwant: {want:?}");
    }
}

#[test]
fn zero_query_gives_the_mean_of_visible_values() {
    // 1 head, D = 2, Dv = 1, Sq = Sk = 3, causal: row i averages v[0..=i].
    let spec = AttentionSpec::mha(1, 2).v_head_dim(1).mask(Mask::Causal);
    let q = [0.0; 6];
    let k = [0.3, -0.7, 0.9, 0.1, -0.4, 0.8];
    let v = [3.0, 6.0, 12.0];
    let (out, lse) = run(&spec, Shape::new(1, 3, 3), &Inputs::grouped(&q, &k, &v));
    assert_close(&out, &[3.0, 4.5, 7.0]);
    // All scores are 0, so lse = ln(visible count).
    assert_close(&lse, &[0.0, 2f64.ln(), 3f64.ln()]);
}

#[test]
fn one_dominant_key_gives_its_value() {
    let spec = AttentionSpec::mha(1, 2).scale(1.0);
    let q = [1.0, 0.0];
    let k = [0.0, 0.0, 60.0, 0.0, 0.0, 1.0]; // key 1 scores 60, the others 0
    let v = [1.0, 2.0, -5.0, 7.0, 3.0, 3.0];
    let (out, _) = run(&spec, Shape::new(1, 1, 3), &Inputs::grouped(&q, &k, &v));
    assert_close(&out, &[-5.0, 7.0]);
}

#[test]
fn scale_and_softcap_on_one_key() {
    // One query, one key: out = v and lse = s exactly, so lse shows the score formula.
    let (q, k, v) = ([0.5, 1.5], [2.0, -1.0], [4.0, -4.0]);
    let call = |spec: AttentionSpec| run(&spec, Shape::new(1, 1, 1), &Inputs::grouped(&q, &k, &v));
    let dot = 0.5 * 2.0 - 1.5; // -0.5
    let (out, lse) = call(AttentionSpec::mha(1, 2));
    assert_close(&out, &[4.0, -4.0]);
    assert_close(&lse, &[dot / 2f64.sqrt()]);
    let (_, lse) = call(AttentionSpec::mha(1, 2).scale(3.0));
    assert_close(&lse, &[3.0 * dot]);
    let (_, lse) = call(AttentionSpec::mha(1, 2).scale(3.0).softcap(1.0));
    assert_close(&lse, &[(3.0 * dot).tanh()]);
    let (_, lse) = call(AttentionSpec::mha(1, 2).scale(30.0).softcap(5.0));
    assert_close(&lse, &[5.0 * (30.0 * dot / 5.0f64).tanh()]);
}

#[test]
fn two_keys_by_hand() {
    // s = scale · q·k = [0.5, -0.25]; p = softmax(s).
    let spec = AttentionSpec::mha(1, 1).scale(0.5);
    let (q, k, v) = ([1.0], [1.0, -0.5], [2.0, 10.0]);
    let (out, lse) = run(&spec, Shape::new(1, 1, 2), &Inputs::grouped(&q, &k, &v));
    let (e0, e1) = (0.5f64.exp(), (-0.25f64).exp());
    assert_close(&out, &[(2.0 * e0 + 10.0 * e1) / (e0 + e1)]);
    assert_close(&lse, &[(e0 + e1).ln()]);
}

/// Means of v over key ranges, one value per key (Dv = 1), for the mask tests below.
fn row_means(spec: AttentionSpec, sq: usize, sk: usize) -> (Vec<f32>, Vec<f32>) {
    let spec = spec.v_head_dim(1);
    let q = vec![0.0; sq];
    let k = uniform(1, sk, -1.0, 1.0);
    let v: Vec<f32> = (0..sk).map(|j| (1 << j) as f32).collect();
    run(&spec, Shape::new(1, sq, sk), &Inputs::grouped(&q, &k, &v))
}

#[test]
fn causal_offset_when_queries_are_fewer_than_keys() {
    // Sq = 2, Sk = 4: queries sit at key positions 2 and 3.
    let (out, lse) = row_means(AttentionSpec::mha(1, 1).mask(Mask::Causal), 2, 4);
    assert_close(&out, &[(1.0 + 2.0 + 4.0) / 3.0, 15.0 / 4.0]);
    assert_close(&lse, &[3f64.ln(), 4f64.ln()]);
}

#[test]
fn causal_offset_when_queries_outnumber_keys() {
    // Sq = 4, Sk = 2: queries sit at positions -2, -1, 0, 1; the first two see nothing.
    let (out, lse) = row_means(AttentionSpec::mha(1, 1).mask(Mask::Causal), 4, 2);
    assert_close(&out, &[0.0, 0.0, 1.0, 1.5]);
    assert_close(&lse, &[f64::NEG_INFINITY, f64::NEG_INFINITY, 0.0, 2f64.ln()]);
}

#[test]
fn sliding_window_sees_the_last_w_keys() {
    // W = 2, Sq = Sk = 4: row i sees keys i-1 and i.
    let (out, _) = row_means(AttentionSpec::mha(1, 1).mask(Mask::SlidingWindow(2)), 4, 4);
    assert_close(&out, &[1.0, 1.5, 3.0, 6.0]);
    // W = 1: only the diagonal. With Sq = 2 < Sk = 5 the rows sit at 3 and 4.
    let (out, _) = row_means(AttentionSpec::mha(1, 1).mask(Mask::SlidingWindow(1)), 2, 5);
    assert_close(&out, &[8.0, 16.0]);
}

#[test]
fn no_mask_sees_every_key() {
    let (out, _) = row_means(AttentionSpec::mha(1, 1), 3, 2);
    assert_close(&out, &[1.5, 1.5, 1.5]);
}

#[test]
fn hidden_keys_never_leak_nan_but_visible_ones_do() {
    let spec = AttentionSpec::mha(1, 2).mask(Mask::Causal);
    let q = uniform(2, 4, -1.0, 1.0);
    let mut k = uniform(3, 4, -1.0, 1.0);
    let mut v = uniform(4, 4, -1.0, 1.0);
    k[2] = f32::NAN; // key 1: hidden from row 0, visible to row 1
    v[3] = f32::NAN;
    let (out, lse) = run(&spec, Shape::new(1, 2, 2), &Inputs::grouped(&q, &k, &v));
    assert!(out[..2].iter().all(|o| o.is_finite()) && lse[0].is_finite(), "{out:?}");
    assert!(out[2..].iter().all(|o| o.is_nan()) && lse[1].is_nan(), "{out:?}");
}

/// A row whose visible keys all score −∞ has no weight: out = 0 and lse = −∞, as with no
/// visible key, though a visible value that is not finite still makes out NaN (0·∞); +∞ and
/// NaN scores make the row NaN. The table is `WeightlessRows`'; the independent formulation
/// gives it too.
#[test]
fn rows_of_no_weight_by_hand() {
    for heads in [1, 3] {
        let spec = AttentionSpec::mha(heads, 1).mask(Mask::SlidingWindow(1));
        assert_weightless_rows(&Reference::new(&spec).unwrap());
        let rows = WeightlessRows::new(heads);
        let tensors =
            independent::Tensors { q: &rows.q, k: &rows.k, v: &rows.v, ..Default::default() };
        let (out, lse) = independent::attention(&spec, rows.shape, &tensors);
        let narrow = |x: Vec<f64>| x.into_iter().map(|x| x as f32).collect::<Vec<_>>();
        assert_close(&narrow(out), &rows.out);
        assert_close(&narrow(lse), &rows.lse);
    }
}

#[test]
fn mqa_equals_mha_with_the_kv_head_repeated() {
    let (h, d, shape) = (3, 5, Shape::new(2, 4, 6));
    let mqa = AttentionSpec::mqa(h, d).mask(Mask::Causal);
    let mha = AttentionSpec::mha(h, d).mask(Mask::Causal);
    let q = uniform(5, 2 * 4 * h * d, -1.0, 1.0);
    let (k, v) = (uniform(6, 2 * 6 * d, -1.0, 1.0), uniform(7, 2 * 6 * d, -1.0, 1.0));
    let repeat = |x: &[f32]| -> Vec<f32> { x.chunks(d).flat_map(|row| row.repeat(h)).collect() };
    let (out_mqa, lse_mqa) = run(&mqa, shape, &Inputs::grouped(&q, &k, &v));
    let (out_mha, lse_mha) = run(&mha, shape, &Inputs::grouped(&q, &repeat(&k), &repeat(&v)));
    assert_eq!(out_mqa, out_mha);
    assert_eq!(lse_mqa, lse_mha);
}

#[test]
fn named_maps_equal_their_explicit_lists() {
    let (h, kv, d, shape) = (6, 3, 4, Shape::new(1, 3, 5));
    let q = uniform(8, 3 * h * d, -1.0, 1.0);
    let (k, v) = (uniform(9, 5 * kv * d, -1.0, 1.0), uniform(10, 5 * kv * d, -1.0, 1.0));
    let inputs = Inputs::grouped(&q, &k, &v);
    for (named, list) in [
        (GroupMap::Contiguous, vec![0, 0, 1, 1, 2, 2]),
        (GroupMap::Interleaved, vec![0, 1, 2, 0, 1, 2]),
    ] {
        let named = run(&AttentionSpec::gqa(h, kv, d).group_map(named), shape, &inputs);
        let listed =
            run(&AttentionSpec::gqa(h, kv, d).group_map(GroupMap::Explicit(list)), shape, &inputs);
        assert_eq!(named, listed);
    }
}

#[test]
fn uneven_map_reads_the_right_kv_head() {
    // Head h reads KV head map[h]; with q = 0, its output is the mean of that head's values.
    let map = vec![1, 0, 1, 1];
    let spec = AttentionSpec::gqa(4, 2, 1).group_map(GroupMap::Explicit(map.clone()));
    let q = [0.0; 4];
    let k = [0.5, -0.5, 0.25, 0.75]; // [Sk = 2, kv = 2, D = 1]
    let v = [1.0, 10.0, 3.0, 30.0];
    let (out, _) = run(&spec, Shape::new(1, 1, 2), &Inputs::grouped(&q, &k, &v));
    let expected: Vec<f64> = map.iter().map(|&g| [2.0, 20.0][g]).collect();
    assert_close(&out, &expected);
}

#[test]
fn latent_equals_mha_on_materialised_keys_and_values() {
    let (h, rank, rope, nope, dv) = (3, 6, 2, 4, 5);
    let spec = AttentionSpec::mla(h, rank, rope, nope, dv).mask(Mask::Causal).softcap(2.0);
    let shape = Shape::new(2, 3, 4);
    let inputs = OwnedInputs::random(&spec, shape, 11, 1.0);
    let (c_kv, k_rope) = (inputs.get(Tensor::CKv), inputs.get(Tensor::KRope));
    let (w_uk, w_uv) = (inputs.get(Tensor::WUk), inputs.get(Tensor::WUv));
    // Materialise K = [W_UK c, k_rope] and V = W_UV c per (b, t, h), in f64, stored as f32.
    let project = |w: &[f32], rows: usize, hh: usize, c: &[f32]| -> Vec<f32> {
        (0..rows)
            .map(|r| {
                (0..rank)
                    .map(|x| f64::from(w[(hh * rows + r) * rank + x]) * f64::from(c[x]))
                    .sum::<f64>() as f32
            })
            .collect()
    };
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for bt in 0..2 * 4 {
        let c = &c_kv[bt * rank..][..rank];
        for hh in 0..h {
            k.extend(project(w_uk, nope, hh, c));
            k.extend_from_slice(&k_rope[bt * rope..][..rope]);
            v.extend(project(w_uv, dv, hh, c));
        }
    }
    let mha = AttentionSpec::mha(h, nope + rope).v_head_dim(dv).mask(Mask::Causal).softcap(2.0);
    let (out_mla, lse_mla) = run(&spec, shape, &inputs.inputs());
    let (out_mha, lse_mha) = run(&mha, shape, &Inputs::grouped(inputs.get(Tensor::Q), &k, &v));
    let widen = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    assert_close(&out_mla, &widen(&out_mha));
    assert_close(&lse_mla, &widen(&lse_mha));
}

#[test]
fn combined_latent_cache_by_hand() {
    // 1 head, rank 1, rope 1, nope 1, Dv 1, scale 1; each cache row is [c | r]. q = [0, 1]
    // scores each key by its RoPE part alone: s = r = [0, ln 3], so p = [1/4, 3/4]; the values
    // are W_UV·c = 2·c = [2, 10].
    let spec = AttentionSpec::mla(1, 1, 1, 1, 1).scale(1.0).latent_cache(LatentCache::Combined);
    let kv_cache = [1.0, 0.0, 5.0, 3f32.ln()];
    let (q, w_uk, w_uv) = ([0.0, 1.0], [7.0], [2.0]);
    let (out, lse) =
        run(&spec, Shape::new(1, 1, 2), &Inputs::latent_combined(&q, &kv_cache, &w_uk, &w_uv));
    assert_close(&out, &[0.25 * 2.0 + 0.75 * 10.0]);
    assert_close(&lse, &[4f64.ln()]);
    // The same call on the two tensors a separate cache holds.
    let separate = AttentionSpec::mla(1, 1, 1, 1, 1).scale(1.0);
    let (c_kv, k_rope) = ([1.0, 5.0], [0.0, 3f32.ln()]);
    let inputs = Inputs::latent(&q, &c_kv, &k_rope, &w_uk, &w_uv);
    assert_eq!(run(&separate, Shape::new(1, 1, 2), &inputs), (out, lse));
}

#[test]
fn a_combined_latent_cache_takes_no_k_rope() {
    let spec = AttentionSpec::mla(2, 4, 2, 3, 2).latent_cache(LatentCache::Combined);
    let kernel = Reference::new(&spec).unwrap();
    let (q, w_uk, w_uv) = (vec![0.0; 2 * 5], vec![0.0; 2 * 3 * 4], vec![0.0; 2 * 2 * 4]);
    let (combined, separate) = (vec![0.0; 3 * 6], vec![0.0; 3 * 4]);
    let mut out = [0.0; 4];
    let mut call = |inputs: Inputs<'_>| {
        kernel.run(Shape::new(1, 1, 3), &inputs, &mut out, None).map_err(|e| e.to_string())
    };
    assert_eq!(call(Inputs::latent_combined(&q, &combined, &w_uk, &w_uv)), Ok(()));
    assert_eq!(
        call(Inputs::latent_combined(&q, &separate, &w_uk, &w_uv)),
        Err("tensor `c_kv`: expected shape [1, 3, 6] = 18 elements, got 12 elements".into())
    );
    assert_eq!(
        call(Inputs::latent(&q, &combined, &[0.0; 6], &w_uk, &w_uv)),
        Err("tensor `k_rope` must be empty, got 6 elements: the spec's latent cache is combined, \
             so k_rope is read from c_kv's rows ([c_kv | k_rope] per token): build the inputs \
             with Inputs::latent_combined"
            .into())
    );
}

#[test]
fn errors_leave_out_untouched() {
    assert_errors_leave_outputs_untouched(&Reference::new(&AttentionSpec::gqa(4, 2, 3)).unwrap());
}

#[test]
fn invalid_specs_are_rejected() {
    let err = Reference::new(&AttentionSpec::gqa(30, 8, 128)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid spec: q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\""
    );
}

#[test]
fn per_sequence_key_lengths_by_hand() {
    // Two sequences, a cache of 3 rows each, causal, Sq = 2: sequence 0 holds 2 keys, so its
    // queries sit at positions 0 and 1; sequence 1 holds 3, positions 1 and 2. q = 0 makes each
    // row the mean of its visible values; the unused row is NaN and must not matter.
    let spec = AttentionSpec::mha(1, 1).mask(Mask::Causal);
    let (q, k) = ([0.0; 4], [0.0; 6]);
    let v = [1.0, 3.0, f32::NAN, 10.0, 20.0, 60.0];
    let inputs = Inputs::grouped(&q, &k, &v).with_kv_lens(&[2, 3]);
    let (out, lse) = run(&spec, Shape::new(2, 2, 3), &inputs);
    assert_close(&out, &[1.0, 2.0, 15.0, 30.0]);
    assert_close(&lse, &[0.0, 2f64.ln(), 2f64.ln(), 3f64.ln()]);
    // A sequence with no keys sees nothing.
    let (out, lse) =
        run(&spec, Shape::new(2, 2, 3), &Inputs::grouped(&q, &k, &v).with_kv_lens(&[0, 3]));
    assert_close(&out, &[0.0, 0.0, 15.0, 30.0]);
    assert_close(&lse, &[f64::NEG_INFINITY, f64::NEG_INFINITY, 2f64.ln(), 3f64.ln()]);
}

#[test]
fn key_lengths_are_checked() {
    let kernel = Reference::new(&AttentionSpec::mha(1, 1)).unwrap();
    let (q, kv) = ([0.0; 2], [0.0; 6]);
    let mut out = [0.0; 2];
    let mut call = |lens: &[usize]| {
        let inputs = Inputs::grouped(&q, &kv, &kv).with_kv_lens(lens);
        kernel.run(Shape::new(2, 1, 3), &inputs, &mut out, None).map_err(|e| e.to_string())
    };
    assert_eq!(
        call(&[3]),
        Err("tensor `kv_lens`: expected shape [2] = 2 elements, got 1 elements".into())
    );
    assert_eq!(
        call(&[3, 4]),
        Err("kv_lens[1] is 4, more than the 3 rows per sequence (Sk) of the cache".into())
    );
    assert_eq!(call(&[3, 0]), Ok(()));
}

/// The inputs of sequence `b` alone, its cache cut to its first `len` rows.
fn one_sequence(
    spec: &AttentionSpec,
    shape: Shape,
    inputs: &OwnedInputs,
    b: usize,
    len: usize,
) -> OwnedInputs {
    let tensors = inputs
        .tensors
        .iter()
        .map(|(tensor, data)| {
            let dims = tensor.dims(spec, shape);
            let row: usize = dims[2..].iter().product();
            let part = match tensor {
                Tensor::Q => &data[b * shape.seq_q * row..][..shape.seq_q * row],
                Tensor::K | Tensor::V | Tensor::CKv | Tensor::KRope => {
                    &data[b * shape.seq_k * row..][..len * row]
                }
                _ => &data[..],
            };
            (*tensor, part.to_vec())
        })
        .collect();
    OwnedInputs { tensors, kv_lens: None }
}

/// 96 cases, or `PROPTEST_CASES`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// The reference (full score matrix, un-absorbed MLA) and the independent formulation
    /// (online softmax, absorbed MLA) agree on random specs, shapes and inputs.
    #[test]
    fn reference_agrees_with_the_independent_formulation(
        spec in strategies::kernel_spec(Limits::SMALL),
        shape in strategies::shape(12, 24),
        seed in any::<u64>(),
        magnitude in prop_oneof![3 => Just(1.0f32), 1 => Just(8.0f32)],
    ) {
        let inputs = OwnedInputs::random(&spec, shape, seed, magnitude);
        let (out, lse) = run(&spec, shape, &inputs.inputs());
        let separate = inputs.separated(&spec);
        let (want_out, want_lse) = independent::attention(&spec, shape, &separate.tensors());
        prop_assert_eq!(first_mismatch(&out, &want_out), None);
        prop_assert_eq!(first_mismatch(&lse, &want_lse), None);
    }

    /// A call with per-sequence key lengths equals one call per sequence on just its keys
    /// (the rows past them NaN), output for output.
    #[test]
    fn ragged_calls_equal_one_call_per_sequence(
        spec in strategies::kernel_spec(Limits::SMALL),
        shape in strategies::shape(6, 12),
        seed in any::<u64>(),
    ) {
        let mut inputs = OwnedInputs::random(&spec, shape, seed, 1.0);
        let lens = attngen::harness::kv_lens(shape, seed);
        attngen::harness::poison_unused_rows(&spec, shape, &lens, &mut inputs.tensors);
        let (out, lse) = run(&spec, shape, &inputs.inputs().with_kv_lens(&lens));
        let rows = shape.seq_q * spec.q_heads;
        for (b, &len) in lens.iter().enumerate() {
            let alone = Shape::new(1, shape.seq_q, len);
            let (want_out, want_lse) = run(&spec, alone, &one_sequence(&spec, shape, &inputs, b, len).inputs());
            prop_assert_eq!(&out[b * rows * spec.v_head_dim..][..rows * spec.v_head_dim], &want_out[..]);
            prop_assert_eq!(&lse[b * rows..][..rows], &want_lse[..]);
        }
    }
}
