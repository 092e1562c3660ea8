//! FLOP and byte counts of a spec: KV-cache footprint, decode cost, and the work of one call.
//!
//! The `attngen plan` table, the benchmark's GFLOP/s and GB/s, and the planner's cost model all
//! count with these functions, so every report agrees on what a FLOP and a byte are.

use crate::spec::{AttentionSpec, KvLayout, Mask, MlaForm};

/// Elements one token adds to the KV cache of one layer: `kv_heads · (D + Dv)` for grouped KV,
/// `rank + rope_dim` for latent KV.
///
/// ```
/// use attngen_codegen::{cost, AttentionSpec};
/// assert_eq!(cost::cache_elems_per_token(&AttentionSpec::gqa(32, 8, 128)), 2048);
/// assert_eq!(cost::cache_elems_per_token(&AttentionSpec::mla(16, 512, 64, 128, 128)), 576);
/// ```
pub fn cache_elems_per_token(spec: &AttentionSpec) -> u64 {
    match &spec.kv {
        KvLayout::Grouped { kv_heads, head_dim, .. } => {
            *kv_heads as u64 * (*head_dim as u64 + spec.v_head_dim as u64)
        }
        KvLayout::Latent(l) => l.rank as u64 + l.rope_dim as u64,
    }
}

/// Elements per token per layer that MHA with the same query/key and value dims would cache.
pub fn mha_cache_elems_per_token(spec: &AttentionSpec) -> u64 {
    spec.q_heads as u64 * (spec.head_dim() as u64 + spec.v_head_dim as u64)
}

/// Bytes one token adds to the KV cache of one layer.
pub fn cache_bytes_per_token(spec: &AttentionSpec) -> u64 {
    cache_elems_per_token(spec) * spec.dtype.size_bytes() as u64
}

/// FLOPs (multiply and add counted separately) to decode one token against `context` keys, in
/// the form attngen runs: for latent KV the absorbed form — `q' = W_UKᵀ q_nope`, attention over
/// the latent and RoPE key, then `out = W_UV · o'`.
pub fn decode_flops_per_token(spec: &AttentionSpec, context: u64) -> u64 {
    let h = spec.q_heads as u64;
    let dv = spec.v_head_dim as u64;
    match &spec.kv {
        KvLayout::Grouped { head_dim, .. } => 2 * h * context * (*head_dim as u64 + dv),
        KvLayout::Latent(l) => {
            let (rank, rope, nope) = (l.rank as u64, l.rope_dim as u64, l.nope_dim as u64);
            let absorb_q = 2 * h * nope * rank;
            let attend = 2 * h * context * (rank + rope + rank);
            let project_out = 2 * h * dv * rank;
            absorb_q + attend + project_out
        }
    }
}

/// Number of (query, key) pairs the mask lets through for `seq_q` queries over `seq_k` keys,
/// with queries aligned to the last keys.
///
/// ```
/// use attngen_codegen::{cost::visible_pairs, Mask};
/// assert_eq!(visible_pairs(Mask::Causal, 4, 4), 10);
/// assert_eq!(visible_pairs(Mask::Causal, 2, 4), 7); // rows see 3 and 4 keys
/// assert_eq!(visible_pairs(Mask::SlidingWindow(2), 4, 4), 7);
/// ```
pub fn visible_pairs(mask: Mask, seq_q: u64, seq_k: u64) -> u64 {
    // Row i (at key position p = i + Sk − Sq) sees keys up to min(p, Sk − 1), from 0 or, under
    // a window W, from p − W + 1: clamp(p + 1, 0, Sk) − clamp(p + 1 − W, 0, Sk) keys. In
    // closed form, so a call's cost is O(1) whatever its shape.
    let (n, k) = (i128::from(seq_q), i128::from(seq_k));
    let first_end = k - n + 1; // p + 1 of row 0
    let pairs = match mask {
        Mask::None => n.saturating_mul(k),
        Mask::Causal => sum_clamped(first_end, n, k),
        Mask::SlidingWindow(w) => {
            sum_clamped(first_end, n, k).saturating_sub(sum_clamped(first_end - w as i128, n, k))
        }
    };
    u64::try_from(pairs).unwrap_or(u64::MAX)
}

/// `Σ_{i < n} clamp(start + i, 0, hi)`.
fn sum_clamped(start: i128, n: i128, hi: i128) -> i128 {
    let rising = (-start).clamp(0, n); // first i with start + i >= 0
    let capped = (hi - start + 1).clamp(rising, n); // first i with start + i > hi
    let (a, b) = (start + rising, start + capped - 1); // the unclamped run, a..=b
    // Saturating: only an absurd shape (near 2^64 queries and keys) reaches i128's range.
    ((capped - rising).saturating_mul(a + b) / 2).saturating_add((n - capped).saturating_mul(hi))
}

/// `Π factors`, saturating at `u64::MAX` rather than overflowing: the cost of an absurd but
/// valid shape (a huge batch of empty sequences) stays a number.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

/// FLOPs of one attention call as design.md 4 counts them: `2 · B · H · pairs · (D + Dv)`.
/// For latent specs this is the attention over materialised per-head K and V; the fused
/// up-projection is extra work it does not count, as the peers do not.
pub fn attention_flops(spec: &AttentionSpec, batch: u64, seq_q: u64, seq_k: u64) -> u64 {
    let pairs = visible_pairs(spec.mask, seq_q, seq_k);
    let width = spec.head_dim() as u64 + spec.v_head_dim as u64;
    product(&[2, batch, spec.q_heads as u64, pairs, width])
}

/// FLOPs of one call in the form attngen runs it: [`attention_flops`] for grouped specs; for
/// latent specs the absorbed form — per (batch, query, head) row `q' = q_nope·W_UK[h]` and
/// `out = o'·W_UV[h]ᵀ`, and per visible pair a `rank + rope_dim` score and a `rank`-wide value
/// update — as [`decode_flops_per_token`] counts a decoded token.
///
/// ```
/// use attngen_codegen::{AttentionSpec, cost::kernel_flops};
/// let lite = AttentionSpec::mla(16, 512, 64, 128, 128);
/// // One decoded token over 4096 keys: 16 heads · (absorb + attend + project).
/// let per_head = 2 * 128 * 512 + 2 * 4096 * (512 + 64 + 512) + 2 * 128 * 512;
/// assert_eq!(kernel_flops(&lite, 1, 1, 4096), 16 * per_head);
/// ```
pub fn kernel_flops(spec: &AttentionSpec, batch: u64, seq_q: u64, seq_k: u64) -> u64 {
    match &spec.kv {
        KvLayout::Grouped { .. } => attention_flops(spec, batch, seq_q, seq_k),
        KvLayout::Latent(l) => {
            let (rank, rope, nope) = (l.rank as u64, l.rope_dim as u64, l.nope_dim as u64);
            let h = spec.q_heads as u64;
            let pairs = visible_pairs(spec.mask, seq_q, seq_k);
            let rows = product(&[batch, seq_q, h, 2, rank, nope + spec.v_head_dim as u64]);
            rows.saturating_add(product(&[batch, h, pairs, 2, 2 * rank + rope]))
        }
    }
}

/// Bytes of K and V (or latent and RoPE key) one call reads once: the decode traffic.
pub fn kv_bytes(spec: &AttentionSpec, batch: u64, seq_k: u64) -> u64 {
    product(&[batch, seq_k, cache_bytes_per_token(spec)])
}

/// A machine's throughput, as the cost model ([`form_costs`]) weighs work: FLOP/s of its FMA
/// units and bytes/s of its streaming reads, over the threads a call runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    /// FMA throughput, FLOP/s (an FMA counts 2).
    pub flops: f64,
    /// Streaming read bandwidth, bytes/s.
    pub bytes: f64,
}

impl Machine {
    /// An estimate without measuring: `threads` cores of two FMA units of `lanes` f32 lanes at
    /// 3 GHz, reading 20 GB/s. Only the ratio of the two forms' times decides, and both are
    /// bound by FMAs wherever the choice is close, so the estimate rarely matters (`attngen
    /// bench` measures the real figures; `attngen dump --plan --shape` prints the estimate's
    /// costs, which are what the kernel decides by).
    pub fn estimate(lanes: usize, threads: usize) -> Machine {
        Machine { flops: (threads.max(1) * lanes * 2 * 2) as f64 * 3e9, bytes: 20e9 }
    }
}

/// The work of one call in one MLA form, and its time at a machine's throughput.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FormCost {
    /// FLOPs the form's kernel does.
    pub flops: u64,
    /// Bytes it reads from memory at least once: the latent cache, the weights, the queries and
    /// the outputs.
    pub bytes: u64,
    /// Estimated seconds: the larger of `flops` at the form's share of the FMA peak
    /// ([`ABSORBED_EFFICIENCY`], [`EXPANDED_EFFICIENCY`]) and `bytes` at the read bandwidth.
    pub seconds: f64,
}

/// Both MLA forms' costs for one call, and the cost model's choice between them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FormCosts {
    /// Weight absorption.
    pub absorbed: FormCost,
    /// Per-head up-projection of the visible keys.
    pub expanded: FormCost,
}

impl FormCosts {
    /// The form with the smaller estimated time (absorbed on a tie).
    pub fn choice(&self) -> MlaForm {
        match self.expanded.seconds < self.absorbed.seconds {
            true => MlaForm::Expanded,
            false => MlaForm::Absorbed,
        }
    }
}

/// The share of the FMA peak absorbed MLA's kernels reach: attention over one 576-wide latent
/// head shared by every query head (measured on W5 and W6, both ISAs).
pub const ABSORBED_EFFICIENCY: f64 = 0.7;
/// The share of the FMA peak expanded MLA's kernels reach, up-projection and attention
/// together (measured on W6 and the `bench --forms` grid, both ISAs).
pub const EXPANDED_EFFICIENCY: f64 = 0.65;

/// FLOPs of one call in MLA's expanded form: per (batch, head) `2 · rank · (nope_dim + Dv)`
/// for each key some query sees (the up-projection), plus [`attention_flops`]; 0 for grouped
/// specs.
pub fn expanded_flops(spec: &AttentionSpec, batch: u64, seq_q: u64, seq_k: u64) -> u64 {
    let KvLayout::Latent(l) = &spec.kv else { return 0 };
    let visible = match spec.mask {
        Mask::SlidingWindow(w) => seq_k.min(seq_q.saturating_add(w as u64).saturating_sub(1)),
        Mask::None | Mask::Causal => seq_k,
    };
    let per_key = 2 * l.rank as u64 * (l.nope_dim as u64 + spec.v_head_dim as u64);
    let up_projection = product(&[batch, spec.q_heads as u64, visible, per_key]);
    up_projection.saturating_add(attention_flops(spec, batch, seq_q, seq_k))
}

/// The cost of one call of `batch` sequences of `seq_q` queries over `seq_k` keys in each MLA
/// form, on `machine`; `None` for grouped specs.
///
/// Absorbed: [`kernel_flops`]. Expanded: each (batch, head) up-projects the keys some query
/// sees (`2 · rank · (nope_dim + Dv)` FLOPs a key), then attends over them
/// ([`attention_flops`]). Both read the latent cache and the weights once.
///
/// ```
/// use attngen_codegen::{AttentionSpec, Mask, MlaForm, cost::{Machine, form_costs}};
/// let lite = AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal);
/// let machine = Machine::estimate(16, 2);
/// // Decode: one query per key cannot repay up-projecting every key.
/// assert_eq!(form_costs(&lite, 4, 1, 4096, machine).unwrap().choice(), MlaForm::Absorbed);
/// // Prefill: 1024 queries share each up-projected key.
/// assert_eq!(form_costs(&lite, 1, 1024, 1024, machine).unwrap().choice(), MlaForm::Expanded);
/// ```
pub fn form_costs(
    spec: &AttentionSpec,
    batch: u64,
    seq_q: u64,
    seq_k: u64,
    machine: Machine,
) -> Option<FormCosts> {
    let KvLayout::Latent(l) = &spec.kv else { return None };
    let (rank, nope, dv, h) =
        (l.rank as u64, l.nope_dim as u64, spec.v_head_dim as u64, spec.q_heads as u64);
    let weights = product(&[4, h, rank, nope + dv]);
    let rows = product(&[batch, seq_q, h]);
    let cache = kv_bytes(spec, batch, seq_k);
    let cost = |flops: u64, bytes: u64, efficiency: f64| FormCost {
        flops,
        bytes,
        seconds: (flops as f64 / (machine.flops * efficiency)).max(bytes as f64 / machine.bytes),
    };
    let io = |width| cache.saturating_add(weights).saturating_add(product(&[4, rows, width]));
    let absorbed_bytes = io(spec.head_dim() as u64 + dv + 2 * rank);
    let expanded_flops = expanded_flops(spec, batch, seq_q, seq_k);
    let expanded_bytes = io(spec.head_dim() as u64 + dv);
    Some(FormCosts {
        absorbed: cost(
            kernel_flops(spec, batch, seq_q, seq_k),
            absorbed_bytes,
            ABSORBED_EFFICIENCY,
        ),
        expanded: cost(expanded_flops, expanded_bytes, EXPANDED_EFFICIENCY),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{AttentionSpec, Mask};

    #[test]
    fn cache_sizes_of_the_four_variants() {
        assert_eq!(cache_elems_per_token(&AttentionSpec::mha(16, 64)), 16 * 128);
        assert_eq!(cache_elems_per_token(&AttentionSpec::mqa(16, 128)), 256);
        assert_eq!(cache_bytes_per_token(&AttentionSpec::gqa(32, 8, 128)), 8192);
        let v2 = AttentionSpec::mla(128, 512, 64, 128, 128);
        assert_eq!(cache_bytes_per_token(&v2), 576 * 4);
        assert_eq!(mha_cache_elems_per_token(&v2), 128 * (192 + 128));
    }

    #[test]
    fn decode_flops() {
        assert_eq!(decode_flops_per_token(&AttentionSpec::gqa(32, 8, 128), 10), 2 * 32 * 10 * 256);
        let lite = AttentionSpec::mla(16, 512, 64, 128, 128);
        let expected = 2 * 16 * 128 * 512 + 2 * 16 * 10 * (512 + 64 + 512) + 2 * 16 * 128 * 512;
        assert_eq!(decode_flops_per_token(&lite, 10), expected);
    }

    #[test]
    fn visible_pairs_by_brute_force() {
        for mask in [Mask::None, Mask::Causal, Mask::SlidingWindow(1), Mask::SlidingWindow(3)] {
            for sq in 0..7i64 {
                for sk in 0..7i64 {
                    let mut count = 0;
                    for i in 0..sq {
                        for j in 0..sk {
                            let diag = i + sk - sq;
                            count += u64::from(match mask {
                                Mask::None => true,
                                Mask::Causal => j <= diag,
                                Mask::SlidingWindow(w) => diag - (w as i64) < j && j <= diag,
                            });
                        }
                    }
                    assert_eq!(
                        visible_pairs(mask, sq as u64, sk as u64),
                        count,
                        "{mask} {sq} {sk}"
                    );
                }
            }
        }
    }

    #[test]
    fn form_costs_count_each_form_s_work() {
        let lite = AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal);
        let machine = Machine { flops: 1e11, bytes: 1e10 };
        let costs = form_costs(&lite, 1, 1024, 1024, machine).unwrap();
        let pairs = 1024 * 1025 / 2;
        // Up-projection of every key per head, then attention over 192-wide keys and
        // 128-wide values.
        let expanded = 2 * 16 * 1024 * 512 * 256 + 2 * 16 * pairs * 320;
        assert_eq!(costs.expanded.flops, expanded);
        assert_eq!(costs.absorbed.flops, kernel_flops(&lite, 1, 1024, 1024));
        let seconds = expanded as f64 / (1e11 * EXPANDED_EFFICIENCY);
        assert!((costs.expanded.seconds - seconds).abs() < 1e-12 * seconds);
        assert_eq!(costs.choice(), MlaForm::Expanded);
        // A sliding window up-projects only the keys some query sees.
        let window = lite.clone().mask(Mask::SlidingWindow(64));
        let costs = form_costs(&window, 1, 16, 4096, machine).unwrap();
        let attend = 2 * 16 * visible_pairs(window.mask, 16, 4096) * 320;
        assert_eq!(costs.expanded.flops, 2 * 16 * 79 * 512 * 256 + attend);
        assert!(form_costs(&AttentionSpec::gqa(8, 2, 64), 1, 1, 1, machine).is_none());
    }

    #[test]
    fn attention_flops_of_w1() {
        let w1 = AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal);
        assert_eq!(attention_flops(&w1, 1, 1024, 1024), 2 * 32 * (1024 * 1025 / 2) * 256);
    }
}
