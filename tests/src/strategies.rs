//! proptest strategies for valid specs, call shapes and inputs.

use attngen::{
    AttentionSpec, GroupMap, Inputs, KvLayout, LatentCache, Mask, MlaForm, Shape, Tensor,
};
use proptest::prelude::*;

/// Size limits for generated specs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest `q_heads`.
    pub heads: usize,
    /// Largest `head_dim`, `v_head_dim`, `nope_dim` and `rope_dim`.
    pub dim: usize,
    /// Largest latent rank.
    pub rank: usize,
}

impl Limits {
    /// Small enough for the reference interpreter to run hundreds of cases quickly.
    pub const SMALL: Limits = Limits { heads: 8, dim: 24, rank: 32 };
    /// The whole valid range (for tests that never run a kernel).
    pub const FULL: Limits = Limits { heads: 1024, dim: 1024, rank: 8192 };
}

fn mask() -> impl Strategy<Value = Mask> {
    prop_oneof![Just(Mask::None), Just(Mask::Causal), (1usize..=40).prop_map(Mask::SlidingWindow),]
}

/// A positive finite f32 scale or softcap, mostly in a realistic range, sometimes anywhere.
fn positive() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => 0.01f32..4.0,
        1 => 1.0f32..100.0,
        1 => proptest::num::f32::POSITIVE.prop_filter("finite", |x| x.is_finite() && *x > 0.0),
    ]
}

/// A group map for `q_heads` over `kv_heads`: contiguous or interleaved where they divide,
/// otherwise (and sometimes anyway) an explicit map that uses every KV head, groups uneven.
fn grouped(limits: Limits) -> impl Strategy<Value = AttentionSpec> {
    (1..=limits.heads, 1..=limits.dim, 1..=limits.dim, any::<bool>())
        .prop_flat_map(|(h, d, dv, same_v)| {
            let dv = if same_v { d } else { dv };
            (Just((h, d, dv)), 1..=h, 0u8..3, any::<u64>())
        })
        .prop_map(|((h, d, dv), kv, map_kind, seed)| {
            let divides = h % kv == 0;
            let map = match map_kind {
                0 if divides => GroupMap::Contiguous,
                1 if divides => GroupMap::Interleaved,
                _ => explicit_map(h, kv, seed),
            };
            AttentionSpec::gqa(h, kv, d).v_head_dim(dv).group_map(map)
        })
}

/// An explicit map of `h` query heads onto all of `kv` KV heads, pseudo-randomly shuffled.
fn explicit_map(h: usize, kv: usize, seed: u64) -> GroupMap {
    let noise = crate::uniform(seed, 2 * h, 0.0, 1.0);
    let mut map: Vec<usize> =
        (0..h).map(|i| if i < kv { i } else { (noise[i] * kv as f32) as usize % kv }).collect();
    for i in (1..h).rev() {
        let j = (noise[h + i] * (i + 1) as f32) as usize % (i + 1);
        map.swap(i, j);
    }
    GroupMap::Explicit(map)
}

fn latent(limits: Limits) -> impl Strategy<Value = AttentionSpec> {
    (1..=limits.heads, 1..=limits.rank, 0..=limits.dim, 0..=limits.dim, 1..=limits.dim)
        .prop_filter("nope_dim + rope_dim in 1..=dim", move |(_, _, rope, nope, _)| {
            (1..=limits.dim).contains(&(rope + nope))
        })
        .prop_flat_map(|(h, rank, rope, nope, dv)| {
            // Either form forced, or the per-call choice: every form meets every shape; the
            // cache as two tensors or as one.
            let forms = [MlaForm::Auto, MlaForm::Absorbed, MlaForm::Expanded];
            let caches = [LatentCache::Separate, LatentCache::Combined];
            let choices = (
                proptest::sample::select(forms.to_vec()),
                proptest::sample::select(caches.to_vec()),
            );
            choices.prop_map(move |(form, cache)| {
                AttentionSpec::mla(h, rank, rope, nope, dv).mla_form(form).latent_cache(cache)
            })
        })
}

/// Any valid spec within `limits`: every variant, map, mask, and optional scale and softcap.
pub fn spec(limits: Limits) -> impl Strategy<Value = AttentionSpec> {
    (
        prop_oneof![3 => grouped(limits), 1 => latent(limits)],
        mask(),
        proptest::option::of(positive()),
        proptest::option::of(positive()),
        proptest::option::of("[a-zA-Z0-9 _\\-\"\\\\é]{0,16}"),
    )
        .prop_map(|(spec, mask, scale, softcap, name)| {
            let mut spec = spec.mask(mask);
            spec.scale = scale;
            spec.softcap = softcap;
            spec.name = name;
            spec
        })
}

/// Like [`spec`], for running kernels: an explicit scale stays within a factor 2 of the
/// default `1/sqrt(D)`, so scores of inputs in [−1, 1] stay in the range where semantics.md §4's
/// tolerance is a fair demand on f32 arithmetic (a scale of 100 makes scores of hundreds, whose
/// f32 rounding alone exceeds it, and a scale of 1e37 an lse beyond f32's range). Softcaps
/// keep their full range: they only shrink scores.
pub fn kernel_spec(limits: Limits) -> impl Strategy<Value = AttentionSpec> {
    (spec(limits), 0.5f32..2.0).prop_map(|(mut spec, factor)| {
        if spec.scale.is_some() {
            spec.scale = Some(factor / (spec.head_dim() as f32).sqrt());
        }
        spec
    })
}

/// A call shape: B 1..=3, Sq 1..=`max_q`, Sk 1..=`max_k` (Sq > Sk included) — the strategy
/// `attngen check` uses, without its long decode and long prefill cases (the split and run
/// tests cover those).
pub fn shape(max_q: usize, max_k: usize) -> impl Strategy<Value = Shape> {
    let limits = attngen::harness::CheckConfig {
        max_batch: 3,
        max_seq_q: max_q,
        max_seq_k: max_k,
        max_long_seq_k: 0,
        ..attngen::harness::CheckConfig::default()
    };
    attngen::harness::shapes(limits)
}

/// Owned input buffers for one call, filled from a seed.
#[derive(Clone, Debug)]
pub struct OwnedInputs {
    /// Each input tensor with its data, in [`Tensor::inputs`] order.
    pub tensors: Vec<(Tensor, Vec<f32>)>,
    /// Per-sequence key lengths, if the call passes them.
    pub kv_lens: Option<Vec<usize>>,
}

impl OwnedInputs {
    /// Values uniform in [−`magnitude`, `magnitude`] for every input of `spec` at `shape`, drawn
    /// as `attngen check` draws them.
    pub fn random(spec: &AttentionSpec, shape: Shape, seed: u64, magnitude: f32) -> Self {
        let tensors =
            attngen::harness::inputs(spec, shape, seed, magnitude).expect("test shapes are small");
        OwnedInputs { tensors, kv_lens: None }
    }

    /// The same call with per-sequence key lengths drawn from `seed` (`harness::kv_lens`),
    /// every cache row past them NaN, as `attngen check` draws its ragged cases.
    pub fn ragged(self, spec: &AttentionSpec, shape: Shape, seed: u64) -> Self {
        self.with_kv_lens(spec, shape, attngen::harness::kv_lens(shape, seed))
    }

    /// The same call with these per-sequence key lengths, every cache row past them NaN.
    pub fn with_kv_lens(mut self, spec: &AttentionSpec, shape: Shape, lens: Vec<usize>) -> Self {
        attngen::harness::poison_unused_rows(spec, shape, &lens, &mut self.tensors);
        OwnedInputs { kv_lens: Some(lens), ..self }
    }

    /// Latent rows scaled up key by key (key j by `1 + j / 16`), so that a query's scores rise
    /// from one key tile to the next by more than the online softmax's rescale threshold and
    /// its running output is rescaled after the first tile, not only from its initial max;
    /// returns the largest factor (the inputs' magnitude for the tolerance).
    pub fn rising_latent(&mut self, shape: Shape) -> f32 {
        let seq_k = shape.seq_k;
        let latent = self.get_mut(Tensor::CKv);
        let rank = latent.len() / (shape.batch * seq_k).max(1);
        for (row, values) in latent.chunks_mut(rank.max(1)).enumerate() {
            let factor = 1.0 + (row % seq_k) as f32 / 16.0;
            values.iter_mut().for_each(|x| *x *= factor);
        }
        1.0 + seq_k.saturating_sub(1) as f32 / 16.0
    }

    /// The buffer of one tensor (empty if the spec has none).
    pub fn get(&self, tensor: Tensor) -> &[f32] {
        self.tensors.iter().find(|(t, _)| *t == tensor).map_or(&[], |(_, d)| d)
    }

    /// Mutable buffer of one tensor.
    pub fn get_mut(&mut self, tensor: Tensor) -> &mut Vec<f32> {
        &mut self.tensors.iter_mut().find(|(t, _)| *t == tensor).expect("tensor present").1
    }

    /// Borrowed views for `Kernel::run`.
    pub fn inputs(&self) -> Inputs<'_> {
        let inputs = self.tensors_only();
        match &self.kv_lens {
            Some(lens) => inputs.with_kv_lens(lens),
            None => inputs,
        }
    }

    /// The tensors' views, without key lengths.
    fn tensors_only(&self) -> Inputs<'_> {
        if self.tensors.len() == 3 {
            Inputs::grouped(self.get(Tensor::Q), self.get(Tensor::K), self.get(Tensor::V))
        } else {
            Inputs::latent(
                self.get(Tensor::Q),
                self.get(Tensor::CKv),
                self.get(Tensor::KRope),
                self.get(Tensor::WUk),
                self.get(Tensor::WUv),
            )
        }
    }

    /// The same inputs with a combined latent cache (`c_kv` rows `[c_kv | k_rope]`) split into
    /// its two tensors, the layout [`crate::independent::attention`] reads; any other spec's
    /// inputs unchanged.
    pub fn separated(&self, spec: &AttentionSpec) -> OwnedInputs {
        let mut split = self.clone();
        let KvLayout::Latent(l) = &spec.kv else { return split };
        if l.cache != LatentCache::Combined {
            return split;
        }
        let row = l.rank + l.rope_dim;
        let combined = split.get(Tensor::CKv).to_vec();
        let part = |range: std::ops::Range<usize>| -> Vec<f32> {
            combined.chunks(row.max(1)).flat_map(|r| r[range.clone()].to_vec()).collect()
        };
        let (c_kv, k_rope) = (part(0..l.rank), part(l.rank..row));
        *split.get_mut(Tensor::CKv) = c_kv;
        split.tensors.insert(2, (Tensor::KRope, k_rope));
        split
    }

    /// Views for [`crate::independent::attention`] (with a combined latent cache, of
    /// [`OwnedInputs::separated`]'s copy).
    pub fn tensors(&self) -> crate::independent::Tensors<'_> {
        crate::independent::Tensors {
            q: self.get(Tensor::Q),
            k: self.get(Tensor::K),
            v: self.get(Tensor::V),
            c_kv: self.get(Tensor::CKv),
            k_rope: self.get(Tensor::KRope),
            w_uk: self.get(Tensor::WUk),
            w_uv: self.get(Tensor::WUv),
        }
    }
}
