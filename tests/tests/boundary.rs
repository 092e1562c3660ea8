//! `Kernel::run` at the boundary, for both backends: random and mostly wrong shapes, buffer
//! lengths and per-sequence key lengths. Every call either returns the reference's typed error and leaves `out` and `lse`
//! untouched, or succeeds and agrees with the reference; none panics.

use attngen::{AttentionSpec, Inputs, Jit, Kernel, KvLayout, Reference, Shape, Tensor};
use attngen_tests::first_mismatch;
use proptest::prelude::*;

#[attngen::kernel(q_heads = 4, kv_heads = 2, head_dim = 3, mask = "causal")]
struct Grouped;

#[attngen::kernel(q_heads = 2, v_head_dim = 5, latent = { rank = 6, rope_dim = 2, nope_dim = 3 })]
struct Latent;

/// The value the outputs hold before a call: one no kernel writes.
const SENTINEL: f32 = -7.25;

/// One call's shape, and how far each buffer's length is off its tensor's (0: right).
#[derive(Clone, Debug)]
struct Call {
    shape: Shape,
    /// Offsets of the inputs' lengths, in `Tensor::inputs` order, then `out`, then `lse`.
    offsets: Vec<i64>,
    /// Pass the other kind of inputs (grouped for latent, latent for grouped).
    wrong_kind: bool,
    /// Omit `lse`.
    no_lse: bool,
    /// Per-sequence key lengths, if any: how far their count is off B (at most 6 are
    /// passed), and draws that make lengths 0..=Sk + 1 (Sk + 1 is one row too many).
    kv_lens: Option<(i64, Vec<u8>)>,
}

impl Call {
    /// The `kv_lens` this call passes.
    fn kv_lens(&self) -> Option<Vec<usize>> {
        let (offset, draws) = self.kv_lens.as_ref()?;
        let count = (self.shape.batch.min(6) as i64 + offset).max(0) as usize;
        let most = self.shape.seq_k.min(8) + 1;
        Some(draws.iter().cycle().take(count).map(|&d| usize::from(d) % (most + 1)).collect())
    }
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..6, 1 => Just(usize::MAX), 1 => Just(usize::MAX / 3 + 1)]
}

fn offset() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(0i64), 2 => -3i64..4, 1 => Just(i64::MIN), 1 => Just(1 << 20)]
}

/// Every buffer right (a quarter of the calls), or some of them off.
fn offsets() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![1 => Just(vec![0; 7]), 3 => proptest::collection::vec(offset(), 7)]
}

fn kv_lens() -> impl Strategy<Value = Option<(i64, Vec<u8>)>> {
    let count = prop_oneof![4 => Just(0i64), 1 => -1i64..=1];
    let lens = (count, proptest::collection::vec(any::<u8>(), 1..=6));
    prop_oneof![3 => Just(None), 2 => lens.prop_map(Some)]
}

fn call() -> impl Strategy<Value = Call> {
    let flags = (proptest::bool::weighted(0.1), any::<bool>());
    (size(), size(), size(), offsets(), flags, kv_lens()).prop_map(
        |(b, q, k, offsets, (wrong_kind, no_lse), kv_lens)| Call {
            shape: Shape::new(b, q, k),
            offsets,
            wrong_kind,
            no_lse,
            kv_lens,
        },
    )
}

/// A buffer of `len` (its tensor's length, or 4 when that does not fit) moved by `offset`,
/// clamped to 0..=4096 so a wrong length never asks for a huge allocation.
fn buffer(spec: &AttentionSpec, tensor: Tensor, shape: Shape, offset: i64, seed: u64) -> Vec<f32> {
    let len = tensor.len(spec, shape).ok().filter(|&n| n <= 4096).unwrap_or(4) as i64;
    let len = len.saturating_add(offset).clamp(0, 4096) as usize;
    attngen_tests::uniform(seed, len, -1.0, 1.0)
}

fn check(kernel: &dyn Kernel, call: &Call) -> Result<(), TestCaseError> {
    let spec = kernel.spec();
    let latent = matches!(spec.kv, KvLayout::Latent(_));
    let tensors = if latent != call.wrong_kind {
        vec![Tensor::Q, Tensor::CKv, Tensor::KRope, Tensor::WUk, Tensor::WUv]
    } else {
        vec![Tensor::Q, Tensor::K, Tensor::V]
    };
    let owned: Vec<Vec<f32>> = tensors
        .iter()
        .enumerate()
        .map(|(i, &t)| buffer(spec, t, call.shape, call.offsets[i], i as u64))
        .collect();
    let mut inputs = match owned.len() {
        5 => Inputs::latent(&owned[0], &owned[1], &owned[2], &owned[3], &owned[4]),
        _ => Inputs::grouped(&owned[0], &owned[1], &owned[2]),
    };
    let kv_lens = call.kv_lens();
    if let Some(lens) = &kv_lens {
        inputs = inputs.with_kv_lens(lens);
    }
    let out_len = buffer(spec, Tensor::Out, call.shape, call.offsets[5], 0).len();
    let lse_len = buffer(spec, Tensor::Lse, call.shape, call.offsets[6], 0).len();
    let outputs = |lse| (vec![SENTINEL; out_len], (!call.no_lse).then(|| vec![lse; lse_len]));
    let (mut want_out, mut want_lse) = outputs(SENTINEL);
    let (mut out, mut lse) = outputs(SENTINEL);
    let want = Reference::new(spec).unwrap().run(
        call.shape,
        &inputs,
        &mut want_out,
        want_lse.as_deref_mut(),
    );
    let got = kernel.run(call.shape, &inputs, &mut out, lse.as_deref_mut());
    match (&want, &got) {
        (Err(_), _) | (_, Err(_)) => {
            prop_assert_eq!(&got, &want);
            let untouched = out.iter().chain(lse.iter().flatten()).all(|&x| x == SENTINEL);
            prop_assert!(untouched, "an error left `out` or `lse` written");
        }
        (Ok(()), Ok(())) => {
            let widen = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            prop_assert_eq!(first_mismatch(&out, &widen(&want_out)), None);
            if let (Some(lse), Some(want)) = (&lse, &want_lse) {
                prop_assert_eq!(first_mismatch(lse, &widen(want)), None);
            }
        }
    }
    Ok(())
}

fn kernels() -> Vec<Box<dyn Kernel>> {
    let jit = Jit::with_threads(2).unwrap();
    vec![
        Box::new(Grouped),
        Box::new(Latent),
        Box::new(jit.compile(Grouped.spec()).unwrap()),
        Box::new(jit.compile(Latent.spec()).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn wrong_shapes_are_typed_errors_that_write_nothing(which in 0..4usize, call in call()) {
        thread_local!(static KERNELS: Vec<Box<dyn Kernel>> = kernels());
        KERNELS.with(|kernels| check(kernels[which].as_ref(), &call))?;
    }
}

/// B may be anything when Sq = 0 (every tensor still has 0 elements): no kernel, nor the
/// reference, may size anything by B then (the reference once listed B × H pairs: 4 GB).
#[test]
fn a_huge_batch_of_empty_sequences_is_no_work() {
    let reference = Reference::new(Grouped.spec()).unwrap();
    let jit = Jit::with_threads(2).unwrap().compile(Grouped.spec()).unwrap();
    for kernel in [&reference as &dyn Kernel, &Grouped, &jit] {
        for shape in [Shape::new(usize::MAX / 3 + 1, 0, 0), Shape::new(usize::MAX, 0, 7)] {
            let k_len = Tensor::K.len(kernel.spec(), shape);
            let call = kernel.run(shape, &Inputs::grouped(&[], &[], &[]), &mut [], Some(&mut []));
            assert_eq!(call.is_ok(), k_len == Ok(0), "{shape:?}: {call:?}");
        }
    }
}

/// A pool of zero threads is refused by both backends with a typed error (rayon would read 0
/// as every core); one thread works.
#[test]
fn zero_threads_is_a_typed_error() {
    use attngen::{Error, Isa};
    let zero = |result: Result<(), Error>| match result {
        Err(Error::Threads { threads: 0, reason }) => assert!(reason.contains("at least one")),
        other => panic!("expected Error::Threads for 0 threads, got {other:?}"),
    };
    zero(Jit::with_threads(0).map(|_| ()));
    zero(Grouped::with_isa(Isa::Portable).threads(0).map(|_| ()));
    let one = Grouped::with_isa(Isa::Portable).threads(1).unwrap();
    let reference = Reference::new(Grouped.spec()).unwrap();
    let shape = Shape::new(1, 2, 3);
    let inputs = attngen::harness::inputs(Grouped.spec(), shape, 3, 1.0).unwrap();
    let inputs = attngen::harness::view(Grouped.spec(), &inputs);
    let (mut got, mut want) = (vec![0.0; 2 * 4 * 3], vec![0.0; 2 * 4 * 3]);
    one.run(shape, &inputs, &mut got, None).unwrap();
    reference.run(shape, &inputs, &mut want, None).unwrap();
    let want: Vec<f64> = want.iter().map(|&x| f64::from(x)).collect();
    assert_eq!(first_mismatch(&got, &want), None);
    assert!(Jit::with_threads(1).is_ok());
}
