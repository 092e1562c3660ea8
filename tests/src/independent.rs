//! A second float64 formulation of semantics.md §3, deliberately unlike the reference
//! interpreter's: one streaming pass per row with an online (running max) softmax, keys walked
//! by an explicit visible range, and latent specs in the *absorbed* form
//! (q' = W_UKᵀ q_nope; scores against the latent; out = W_UV · o'). Agreement between the two is
//! evidence for both; they share no code.

use attngen::{AttentionSpec, KvLayout, Mask, Shape};

/// Input tensors by name, as flat row-major buffers (empty where the spec reads none); a latent
/// spec's `c_kv` and `k_rope` always as two tensors, whatever its cache layout.
#[derive(Default)]
pub struct Tensors<'a> {
    /// `q`.
    pub q: &'a [f32],
    /// `k` (grouped) — empty for latent.
    pub k: &'a [f32],
    /// `v` (grouped) — empty for latent.
    pub v: &'a [f32],
    /// `c_kv` (latent).
    pub c_kv: &'a [f32],
    /// `k_rope` (latent).
    pub k_rope: &'a [f32],
    /// `w_uk` (latent).
    pub w_uk: &'a [f32],
    /// `w_uv` (latent).
    pub w_uv: &'a [f32],
}

/// Returns `(out, lse)` in f64 for a validated spec.
pub fn attention(spec: &AttentionSpec, shape: Shape, t: &Tensors<'_>) -> (Vec<f64>, Vec<f64>) {
    let (hn, d, dv) = (spec.q_heads, spec.head_dim(), spec.v_head_dim);
    let Shape { batch, seq_q, seq_k } = shape;
    let scale = match spec.scale {
        Some(s) => s as f64,
        None => (d as f64).sqrt().recip(),
    };
    let mut out = vec![0.0; batch * seq_q * hn * dv];
    let mut lse = vec![f64::NEG_INFINITY; batch * seq_q * hn];
    for b in 0..batch {
        for i in 0..seq_q {
            let diag = (i + seq_k) as i64 - seq_q as i64; // this query's key position
            let hi = (diag + 1).clamp(0, seq_k as i64) as usize;
            let lo = match spec.mask {
                Mask::None => 0,
                Mask::Causal => 0,
                Mask::SlidingWindow(w) => (diag + 1 - w as i64).clamp(0, seq_k as i64) as usize,
            };
            let keys = if spec.mask == Mask::None { 0..seq_k } else { lo..hi.max(lo) };
            for h in 0..hn {
                let row = (b * seq_q + i) * hn + h;
                let q = &t.q[row * d..(row + 1) * d];
                let (o, l) = match &spec.kv {
                    KvLayout::Grouped { kv_heads, .. } => {
                        let g = spec.kv_head_of(h);
                        let at = |j: usize| (b * seq_k + j) * kv_heads + g;
                        online(
                            keys.clone(),
                            dv,
                            |j| {
                                let k = &t.k[at(j) * d..(at(j) + 1) * d];
                                let s = q
                                    .iter()
                                    .zip(k)
                                    .map(|(&x, &y)| x as f64 * y as f64)
                                    .sum::<f64>();
                                (
                                    s,
                                    t.v[at(j) * dv..(at(j) + 1) * dv]
                                        .iter()
                                        .map(|&x| x as f64)
                                        .collect(),
                                )
                            },
                            scale,
                            spec.softcap,
                        )
                    }
                    KvLayout::Latent(lat) => {
                        let (r, rope, nope) = (lat.rank, lat.rope_dim, lat.nope_dim);
                        // q'[c] = Σ_n W_UK[h][n][c] q_nope[n]
                        let q_abs: Vec<f64> = (0..r)
                            .map(|c| {
                                (0..nope)
                                    .map(|n| t.w_uk[(h * nope + n) * r + c] as f64 * q[n] as f64)
                                    .sum()
                            })
                            .collect();
                        let (o_latent, l) = online(
                            keys.clone(),
                            r,
                            |j| {
                                let c = &t.c_kv[(b * seq_k + j) * r..(b * seq_k + j + 1) * r];
                                let kr =
                                    &t.k_rope[(b * seq_k + j) * rope..(b * seq_k + j + 1) * rope];
                                let s =
                                    q_abs.iter().zip(c).map(|(&x, &y)| x * y as f64).sum::<f64>()
                                        + q[nope..]
                                            .iter()
                                            .zip(kr)
                                            .map(|(&x, &y)| x as f64 * y as f64)
                                            .sum::<f64>();
                                (s, c.iter().map(|&x| x as f64).collect())
                            },
                            scale,
                            spec.softcap,
                        );
                        let o = (0..dv)
                            .map(|e| {
                                (0..r)
                                    .map(|c| t.w_uv[(h * dv + e) * r + c] as f64 * o_latent[c])
                                    .sum()
                            })
                            .collect();
                        (o, l)
                    }
                };
                out[row * dv..(row + 1) * dv].copy_from_slice(&o);
                lse[row] = l;
            }
        }
    }
    (out, lse)
}

/// One row by online softmax: `key(j)` gives the raw dot product and the value row of key j.
fn online(
    keys: std::ops::Range<usize>,
    width: usize,
    key: impl Fn(usize) -> (f64, Vec<f64>),
    scale: f64,
    softcap: Option<f32>,
) -> (Vec<f64>, f64) {
    let mut m = f64::NEG_INFINITY;
    let mut l = 0.0f64;
    let mut acc = vec![0.0f64; width];
    if keys.is_empty() {
        return (acc, f64::NEG_INFINITY);
    }
    for j in keys {
        let (dot, value) = key(j);
        let mut s = dot * scale;
        if let Some(c) = softcap {
            let c = c as f64;
            s = c * (s / c).tanh();
        }
        let m_new = if s.is_nan() || m.is_nan() { f64::NAN } else { m.max(s) };
        let alpha = if m == f64::NEG_INFINITY && m_new == f64::NEG_INFINITY {
            1.0
        } else {
            (m - m_new).exp()
        };
        // A −∞ score weighs nothing, even while every score so far is −∞ (where s − m is NaN).
        let p = if s == f64::NEG_INFINITY { 0.0 } else { (s - m_new).exp() };
        l = l * alpha + p;
        for (a, v) in acc.iter_mut().zip(value) {
            *a = *a * alpha + p * v;
        }
        m = m_new;
    }
    if l == 0.0 {
        // Every visible score was −∞: no weight, as with no visible key (but 0·V kept).
        return (acc.into_iter().map(|a| a * 0.0).collect(), f64::NEG_INFINITY);
    }
    (acc.into_iter().map(|a| a / l).collect(), m + l.ln())
}
