//! Support shared by attngen's integration tests and CLI tests: proptest strategies for specs,
//! shapes and inputs, an independent float64 formulation of semantics.md §3, and the
//! tolerance check of semantics.md §4.

pub mod independent;
pub mod strategies;

/// Design.md 1.4: `|x − ref| ≤ 1e-4 + 1e-4·|ref|`. NaN matches NaN and an infinity matches the
/// same infinity. Returns the first offending index with both values.
pub fn first_mismatch(got: &[f32], want: &[f64]) -> Option<(usize, f32, f64)> {
    first_mismatch_within(got, want, 0.0)
}

/// [`first_mismatch`] with `extra` added to the absolute tolerance, for inputs outside [−1, 1]
/// where f32 scores carry a proportionally larger rounding error (see
/// [`f32_score_slack`]).
pub fn first_mismatch_within(got: &[f32], want: &[f64], extra: f64) -> Option<(usize, f32, f64)> {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter().zip(want).enumerate().find_map(|(i, (&g, &w))| {
        let g64 = f64::from(g);
        let ok = if w.is_nan() || w.is_infinite() {
            g64.is_nan() && w.is_nan() || g64 == w
        } else {
            (g64 - w).abs() <= 1e-4 + extra + 1e-4 * w.abs()
        };
        (!ok).then_some((i, g, w))
    })
}

/// Extra absolute tolerance for grouped specs run on inputs of magnitude `m > 1`: f32 scores
/// `scale·q·k` over `dim` products then carry a rounding error up to about
/// `Δs = 4·u·scale·dim·m²` (u = 2⁻²⁴), which the softmax turns into at most `2·m·Δs` in an
/// output and `Δs` in an lse. Returns (output slack, lse slack); both 0 for `m <= 1`, where
/// semantics.md §4's bound applies as written.
pub fn f32_score_slack(dim: usize, scale: f64, m: f64) -> (f64, f64) {
    if m <= 1.0 {
        return (0.0, 0.0);
    }
    let u = f64::from(f32::EPSILON) / 2.0;
    let ds = 4.0 * u * scale * dim as f64 * m * m;
    (2.0 * m * ds, ds)
}

pub use attngen::harness::uniform;

/// Runs `kernel` (built for `AttentionSpec::gqa(4, 2, 3)`) with every kind of wrong buffer and
/// asserts each call fails and leaves `out` and `lse` exactly as they were.
pub fn assert_errors_leave_outputs_untouched(kernel: &dyn attngen::Kernel) {
    use attngen::{Inputs, Shape};
    assert_eq!(kernel.spec(), &attngen::AttentionSpec::gqa(4, 2, 3));
    let (q, k, v) = (vec![0.5; 24], vec![0.5; 30], vec![0.5; 30]);
    let shape = Shape::new(1, 2, 5);
    let mut out = [-7.0; 24];
    let mut lse = [-7.0; 8];
    for (inputs, out_len, lse_len) in [
        (Inputs::grouped(&q[1..], &k, &v), 24, 8),
        (Inputs::grouped(&q, &k[1..], &v), 24, 8),
        (Inputs::grouped(&q, &k, &v[..29]), 24, 8),
        (Inputs::grouped(&q, &k, &v), 24, 7),
        (Inputs::grouped(&q, &k, &v), 23, 8),
        (Inputs::latent(&q, &k, &v, &[], &[]), 24, 8),
    ] {
        let result = kernel.run(shape, &inputs, &mut out[..out_len], Some(&mut lse[..lse_len]));
        assert!(result.is_err());
        assert!(out.iter().chain(&lse).all(|&x| x == -7.0));
    }
    let huge = Shape::new(usize::MAX, 2, 2);
    assert!(kernel.run(huge, &Inputs::grouped(&q, &k, &v), &mut out, None).is_err());
    assert!(out.iter().all(|&x| x == -7.0));
}

/// Runs `kernel` on inputs holding ±∞, NaN and huge finite values, one kind at a time in each
/// input tensor, and compares every element with the reference exactly where the reference is
/// not finite (NaN for NaN, the same infinity) and within semantics.md §4 elsewhere. This holds
/// for every kernel that computes the definition's products in its order: grouped kernels and
/// expanded MLA (semantics.md §3 step 5); absorbed MLA reassociates them, so it is not a kernel for
/// this check. Describes the first mismatch.
pub fn compare_non_finite_with_reference(
    kernel: &dyn attngen::Kernel,
    shape: attngen::Shape,
) -> Result<(), String> {
    use attngen::Tensor;
    let spec = kernel.spec();
    let reference = attngen::Reference::new(spec).unwrap();
    let values = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e30, -1e30];
    for (n, &tensor) in Tensor::inputs(spec).iter().enumerate() {
        for (v, &value) in values.iter().enumerate() {
            let mut inputs = strategies::OwnedInputs::random(spec, shape, 31 + n as u64, 1.0);
            let data = inputs.get_mut(tensor);
            if data.is_empty() {
                continue;
            }
            // Two elements: one early (the first key or query row), one a third of the way in.
            let (first, third) = ((7 * v) % data.len(), data.len() / 3);
            data[first] = value;
            data[third] = value;
            let want = run_kernel(&reference, shape, &inputs.inputs());
            let got = run_kernel(kernel, shape, &inputs.inputs());
            for (name, got, want) in [("out", &got.0, &want.0), ("lse", &got.1, &want.1)] {
                let want: Vec<f64> = want.iter().map(|&x| f64::from(x)).collect();
                if let Some((i, g, w)) = first_mismatch(got, &want) {
                    return Err(format!(
                        "{value} in {} [{first}] and [{third}]: {name}[{i}] = {g}, reference {w}",
                        tensor.name()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Rows of no weight (semantics.md §3 step 4), computed by hand, for
/// `AttentionSpec::mha(h, 1).mask(Mask::SlidingWindow(1))` (any h): each of five queries sees
/// one key, its own, with score s = q·k (scale 1/√1), the same in every head.
///
/// | query | q | k | v | s | out | lse |
/// |---|---|---|---|---|---|---|
/// | 0 | −∞ | 1 | 3 | −∞ | 0 | −∞ |
/// | 1 | −∞ | 1 | ∞ | −∞ | NaN (0·∞) | −∞ |
/// | 2 | ∞ | 1 | 3 | ∞ | NaN (∞ − ∞) | NaN |
/// | 3 | 1 | 2 | 5 | 2 | 5 | 2 |
/// | 4 | −∞ | 0 | 7 | NaN | NaN | NaN |
pub struct WeightlessRows {
    /// B = 1, Sq = Sk = 5.
    pub shape: attngen::Shape,
    /// `q`, `k`, `v`: the table's columns, repeated for every head.
    pub q: Vec<f32>,
    /// See `q`.
    pub k: Vec<f32>,
    /// See `q`.
    pub v: Vec<f32>,
    /// The expected `out` and `lse`.
    pub out: Vec<f64>,
    /// See `out`.
    pub lse: Vec<f64>,
}

impl WeightlessRows {
    /// The table for `heads` heads.
    pub fn new(heads: usize) -> Self {
        let inf = f64::INFINITY;
        let per_head = |column: [f64; 5]| -> Vec<f64> {
            column.iter().flat_map(|&x| std::iter::repeat_n(x, heads)).collect()
        };
        let narrow = |column| per_head(column).into_iter().map(|x| x as f32).collect();
        WeightlessRows {
            shape: attngen::Shape::new(1, 5, 5),
            q: narrow([-inf, -inf, inf, 1.0, -inf]),
            k: narrow([1.0, 1.0, 1.0, 2.0, 0.0]),
            v: narrow([3.0, inf, 3.0, 5.0, 7.0]),
            out: per_head([0.0, f64::NAN, f64::NAN, 5.0, f64::NAN]),
            lse: per_head([-inf, -inf, f64::NAN, 2.0, f64::NAN]),
        }
    }
}

/// `kernel`, built for `AttentionSpec::mha(h, 1).mask(Mask::SlidingWindow(1))`, gives
/// [`WeightlessRows`]'s table exactly (NaN for NaN, the same infinity).
pub fn assert_weightless_rows(kernel: &dyn attngen::Kernel) {
    use attngen::Mask;
    let h = kernel.spec().q_heads;
    assert_eq!(kernel.spec(), &attngen::AttentionSpec::mha(h, 1).mask(Mask::SlidingWindow(1)));
    let rows = WeightlessRows::new(h);
    let inputs = attngen::Inputs::grouped(&rows.q, &rows.k, &rows.v);
    let (out, lse) = run_kernel(kernel, rows.shape, &inputs);
    assert_eq!(first_mismatch(&out, &rows.out), None, "out {out:?}");
    assert_eq!(first_mismatch(&lse, &rows.lse), None, "lse {lse:?}");
}

/// `out` and `lse` of one valid call of `kernel` (both start as NaN, so an element the kernel
/// never writes cannot pass).
pub fn run_kernel(
    kernel: &dyn attngen::Kernel,
    shape: attngen::Shape,
    inputs: &attngen::Inputs<'_>,
) -> (Vec<f32>, Vec<f32>) {
    use attngen::Tensor;
    let spec = kernel.spec();
    let out_len = Tensor::Out.len(spec, shape).unwrap();
    let lse_len = Tensor::Lse.len(spec, shape).unwrap();
    let (mut out, mut lse) = (vec![f32::NAN; out_len], vec![f32::NAN; lse_len]);
    kernel.run(shape, inputs, &mut out, Some(&mut lse)).expect("valid call");
    (out, lse)
}

/// `kernel` against the reference on one case whose inputs have magnitude `m`, within
/// semantics.md §4 plus [`f32_score_slack`]; describes the first mismatch.
pub fn compare_with_reference(
    kernel: &dyn attngen::Kernel,
    shape: attngen::Shape,
    inputs: &strategies::OwnedInputs,
    m: f32,
) -> Result<(), String> {
    let reference = attngen::Reference::new(kernel.spec()).unwrap();
    let want = run_kernel(&reference, shape, &inputs.inputs());
    let got = run_kernel(kernel, shape, &inputs.inputs());
    within_reference(kernel.spec(), got, want, m)
}

/// `kernel` against the reference with its inputs copied to start at every float offset of a
/// 64-byte line: kernels read the tensors you pass where they lie, so none may depend on where
/// that is. Describes the first mismatch and its offset.
pub fn compare_at_every_line_offset(
    kernel: &dyn attngen::Kernel,
    shape: attngen::Shape,
    inputs: &strategies::OwnedInputs,
    m: f32,
) -> Result<(), String> {
    use attngen::harness::{self, Placed};
    let spec = kernel.spec();
    let reference = attngen::Reference::new(spec).unwrap();
    let want = run_kernel(&reference, shape, &inputs.inputs());
    for offset in 0..16 {
        let placed: Vec<_> = inputs
            .tensors
            .iter()
            .map(|(tensor, data)| (*tensor, Placed::new(data, offset)))
            .collect();
        let view = harness::view(spec, &placed);
        let view = match &inputs.kv_lens {
            Some(lens) => view.with_kv_lens(lens),
            None => view,
        };
        assert_eq!(
            view.q().as_ptr() as usize % 64,
            4 * offset,
            "placed {offset} floats past a line"
        );
        let got = run_kernel(kernel, shape, &view);
        within_reference(spec, got, want.clone(), m)
            .map_err(|e| format!("inputs {offset} floats past a line: {e}"))?;
    }
    Ok(())
}

/// A kernel's `out` and `lse` (`got`) against the reference's (`want`) for `spec` on inputs of
/// magnitude `m`, within semantics.md §4 plus [`f32_score_slack`]; describes the first mismatch.
pub fn within_reference(
    spec: &attngen::AttentionSpec,
    (out, lse): (Vec<f32>, Vec<f32>),
    (want_out, want_lse): (Vec<f32>, Vec<f32>),
    m: f32,
) -> Result<(), String> {
    let (out_slack, lse_slack) =
        f32_score_slack(spec.head_dim(), spec.effective_scale(), f64::from(m));
    let widen = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    if let Some((i, got, want)) = first_mismatch_within(&out, &widen(&want_out), out_slack) {
        return Err(format!("out[{i}]: kernel {got}, reference {want}"));
    }
    if let Some((i, got, want)) = first_mismatch_within(&lse, &widen(&want_lse), lse_slack) {
        return Err(format!("lse[{i}]: kernel {got}, reference {want}"));
    }
    Ok(())
}
