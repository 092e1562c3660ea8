//! FLOP and byte counts of a spec: KV-cache footprint, decode cost, and the work of one call.
//!
//! The `attngen plan` table, the benchmark's GFLOP/s and GB/s, and the planner's cost model all
//! count with these functions, so every report agrees on what a FLOP and a byte are.

use crate::spec::{AttentionSpec, KvLayout, Mask};

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
    let offset = seq_k as i128 - seq_q as i128;
    (0..seq_q as i128)
        .map(|i| {
            let last = (i + offset).min(seq_k as i128 - 1); // last visible key, inclusive
            let first = match mask {
                Mask::None => return seq_k,
                Mask::Causal => 0,
                Mask::SlidingWindow(w) => (i + offset - w as i128 + 1).max(0),
            };
            (last - first + 1).max(0) as u64
        })
        .sum()
}

/// FLOPs of one attention call as design.md 4 counts them: `2 · B · H · pairs · (D + Dv)`.
/// For latent specs this is the attention over materialised per-head K and V; the fused
/// up-projection is extra work it does not count, as the peers do not.
pub fn attention_flops(spec: &AttentionSpec, batch: u64, seq_q: u64, seq_k: u64) -> u64 {
    let pairs = visible_pairs(spec.mask, seq_q, seq_k);
    2 * batch * spec.q_heads as u64 * pairs * (spec.head_dim() as u64 + spec.v_head_dim as u64)
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
            let rows = batch * seq_q * spec.q_heads as u64;
            let pairs = batch * spec.q_heads as u64 * visible_pairs(spec.mask, seq_q, seq_k);
            rows * 2 * rank * (nope + spec.v_head_dim as u64) + pairs * 2 * (2 * rank + rope)
        }
    }
}

/// Bytes of K and V (or latent and RoPE key) one call reads once: the decode traffic.
pub fn kv_bytes(spec: &AttentionSpec, batch: u64, seq_k: u64) -> u64 {
    batch * seq_k * cache_bytes_per_token(spec)
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
    fn attention_flops_of_w1() {
        let w1 = AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal);
        assert_eq!(attention_flops(&w1, 1, 1024, 1024), 2 * 32 * (1024 * 1025 / 2) * 256);
    }
}
