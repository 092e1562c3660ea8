//! [`Reference`]: the naive interpreter every backend is tested against.
//!
//! It follows semantics.md §3 literally and shares nothing with the planner or the IR: f64
//! accumulation, a fully materialised score matrix per (batch, head), and for latent specs the
//! un-absorbed form — per-head K_h and V_h are materialised from the latent first. (Batch
//! entries and heads are independent and run in parallel; each is computed the naive way.)

use attngen_codegen::{AttentionSpec, KvLayout, LatentCache, LatentKv, Mask, validate};

use rayon::prelude::*;

use crate::{Error, InputTensors, Inputs, Kernel, Shape, check_call};

/// The reference interpreter for one validated spec.
///
/// ```
/// use attngen::{AttentionSpec, Inputs, Kernel, Reference, Shape};
///
/// // One head, one query, two keys; q = 0 makes both keys equally likely.
/// let kernel = Reference::new(&AttentionSpec::mha(1, 2))?;
/// let (q, k, v) = ([0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]);
/// let mut out = [0.0; 2];
/// kernel.run(Shape::new(1, 1, 2), &Inputs::grouped(&q, &k, &v), &mut out, None)?;
/// assert_eq!(out, [20.0, 30.0]);
/// # Ok::<(), attngen::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Reference {
    spec: AttentionSpec,
}

impl Reference {
    /// Validates `spec` and returns its interpreter.
    ///
    /// # Errors
    /// [`Error::Spec`] with the first rule `spec` breaks.
    pub fn new(spec: &AttentionSpec) -> Result<Self, Error> {
        validate(spec)?;
        Ok(Reference { spec: spec.clone() })
    }
}

impl Kernel for Reference {
    fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    fn run(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        out: &mut [f32],
        mut lse: Option<&mut [f32]>,
    ) -> Result<(), Error> {
        check_call(&self.spec, shape, inputs, out.len(), lse.as_deref().map(<[f32]>::len))?;
        if shape.batch == 0 || shape.seq_q == 0 {
            // No output rows. Not even a list of (batch, head) pairs: B may be huge when
            // Sq = 0, since every tensor then still has 0 elements.
            return Ok(());
        }
        let spec = &self.spec;
        let (h_count, d, dv) = (spec.q_heads, spec.head_dim(), spec.v_head_dim);
        let q = inputs.q();
        let scale = spec.effective_scale();
        let softcap = spec.softcap.map(f64::from);
        // Each (batch, head) is independent: compute them in parallel, then write in order.
        let heads: Vec<(usize, usize)> =
            (0..shape.batch).flat_map(|b| (0..h_count).map(move |h| (b, h))).collect();
        let rows: Vec<Vec<(Vec<f64>, f64)>> = heads
            .par_iter()
            .map(|&(b, h)| {
                // Sequence b's keys: its first kv_lens[b] cache rows (all Sk without lengths).
                let len = inputs.keys(b, shape.seq_k);
                let (keys, values) = materialise_kv(spec, inputs, shape.seq_k, len, b, h);
                // Bottom-right alignment: query i sits at key position i + offset.
                let offset = len as i64 - shape.seq_q as i64;
                // The full Sq × len score matrix; None marks a key the mask hides.
                let scores: Vec<Vec<Option<f64>>> = (0..shape.seq_q)
                    .map(|i| {
                        let q_row = &q[((b * shape.seq_q + i) * h_count + h) * d..][..d];
                        (0..len)
                            .map(|j| {
                                visible(spec.mask, i as i64 + offset, j as i64).then(|| {
                                    let dot: f64 = q_row
                                        .iter()
                                        .zip(&keys[j])
                                        .map(|(&a, &k)| f64::from(a) * k)
                                        .sum();
                                    let s = scale * dot;
                                    softcap.map_or(s, |c| c * (s / c).tanh())
                                })
                            })
                            .collect()
                    })
                    .collect();
                scores.iter().map(|row| softmax_times_values(row, &values, dv)).collect()
            })
            .collect();
        for (&(b, h), head_rows) in heads.iter().zip(&rows) {
            for (i, (o, row_lse)) in head_rows.iter().enumerate() {
                let at = (b * shape.seq_q + i) * h_count + h;
                for (dst, src) in out[at * dv..][..dv].iter_mut().zip(o) {
                    *dst = *src as f32;
                }
                if let Some(lse) = lse.as_deref_mut() {
                    lse[at] = *row_lse as f32;
                }
            }
        }
        Ok(())
    }
}

/// Whether key `j` is visible from the query at key position `diag` (semantics.md §3 step 2).
fn visible(mask: Mask, diag: i64, j: i64) -> bool {
    match mask {
        Mask::None => true,
        Mask::Causal => j <= diag,
        Mask::SlidingWindow(w) => diag - (w as i64) < j && j <= diag,
    }
}

/// Softmax of the visible scores of one row, applied to the values; returns (out, lse).
/// A row of no weight — no visible key, or every visible score −∞ — gives lse = −∞ and
/// out = 0·Σ 0·V (0, or NaN where a visible value is not finite), semantics.md §3 step 4. NaN
/// scores make the row NaN.
fn softmax_times_values(row: &[Option<f64>], values: &[Vec<f64>], dv: usize) -> (Vec<f64>, f64) {
    let visible = || row.iter().enumerate().filter_map(|(j, s)| s.map(|s| (j, s)));
    // A NaN score makes the max NaN, and so the whole row, as IEEE arithmetic would; once the
    // max is NaN no comparison replaces it.
    let max =
        visible().fold(f64::NEG_INFINITY, |m, (_, s)| if s > m || s.is_nan() { s } else { m });
    let mut sum = 0.0;
    let mut acc = vec![0.0; dv];
    for (j, s) in visible() {
        // exp(−∞) = 0, also when every score is −∞ (where s − max would be NaN).
        let p = if s == f64::NEG_INFINITY { 0.0 } else { (s - max).exp() };
        sum += p;
        for (a, &v) in acc.iter_mut().zip(&values[j]) {
            *a += p * v;
        }
    }
    if sum == 0.0 {
        return (acc.iter().map(|a| a * 0.0).collect(), f64::NEG_INFINITY);
    }
    (acc.iter().map(|a| a / sum).collect(), max + sum.ln())
}

/// The first `len` per-key rows of K_h and V_h for batch `b` (whose cache rows start at row
/// `b · seq_k`), head `h`, in f64. For latent specs these are the explicit up-projections
/// K_h[t] = [W_UK[h]·c_kv[t], k_rope[t]] and V_h[t] = W_UV[h]·c_kv[t].
fn materialise_kv(
    spec: &AttentionSpec,
    inputs: &Inputs<'_>,
    seq_k: usize,
    len: usize,
    b: usize,
    h: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let (d, dv, sk) = (spec.head_dim(), spec.v_head_dim, seq_k);
    let widen = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    match (inputs.tensors, &spec.kv) {
        (InputTensors::Grouped { k, v, .. }, KvLayout::Grouped { kv_heads, .. }) => {
            let g = spec.kv_head_of(h);
            let row = |t: usize| (b * sk + t) * kv_heads + g;
            (
                (0..len).map(|t| widen(&k[row(t) * d..][..d])).collect(),
                (0..len).map(|t| widen(&v[row(t) * dv..][..dv])).collect(),
            )
        }
        (InputTensors::Latent { c_kv, k_rope, w_uk, w_uv, .. }, KvLayout::Latent(latent)) => {
            let LatentKv { rank, rope_dim, nope_dim, .. } = *latent;
            let project = |w: &[f32], rows: usize, c: &[f32]| -> Vec<f64> {
                (0..rows)
                    .map(|r| {
                        let w_row = &w[(h * rows + r) * rank..][..rank];
                        w_row.iter().zip(c).map(|(&w, &c)| f64::from(w) * f64::from(c)).sum()
                    })
                    .collect()
            };
            // Token t's latent and RoPE key: rows of two tensors, or the two parts of one
            // combined row `[c_kv | k_rope]` (spelled out here rather than taken from the
            // plan's strides, so that the reference does not share what it checks).
            let (latent_row, rope, rope_row, rope_at) = match latent.cache {
                LatentCache::Separate => (rank, k_rope, rope_dim, 0),
                LatentCache::Combined => (rank + rope_dim, c_kv, rank + rope_dim, rank),
            };
            let latent_of = |t: usize| &c_kv[(b * sk + t) * latent_row..][..rank];
            let rope_of = |t: usize| &rope[(b * sk + t) * rope_row + rope_at..][..rope_dim];
            let keys = (0..len)
                .map(|t| {
                    let mut key = project(w_uk, nope_dim, latent_of(t));
                    key.extend(widen(rope_of(t)));
                    key
                })
                .collect();
            let values = (0..len).map(|t| project(w_uv, dv, latent_of(t))).collect();
            (keys, values)
        }
        // check_call has matched the inputs' kind to the spec's.
        _ => unreachable!("inputs kind checked against the spec"),
    }
}
