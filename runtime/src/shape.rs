//! [`Shape`], [`Inputs`] and the one checker every `Kernel::run` calls before touching memory.

use attngen_codegen::{AttentionSpec, KvLayout, LatentCache};

use crate::Error;

/// The sizes of one call: batch B, query length Sq and key length Sk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size, B.
    pub batch: usize,
    /// Number of queries per sequence, Sq (the last Sq of the Sk positions).
    pub seq_q: usize,
    /// Number of keys per sequence, Sk.
    pub seq_k: usize,
}

impl Shape {
    /// A shape of `batch` sequences with `seq_q` queries over `seq_k` keys.
    pub fn new(batch: usize, seq_q: usize, seq_k: usize) -> Self {
        Shape { batch, seq_q, seq_k }
    }
}

/// A call's inputs: borrowed views of its tensors (dense row-major f32, semantics.md §2) and,
/// optionally, the number of keys of each sequence.
///
/// ```
/// use attngen::{AttentionSpec, Inputs, Kernel, Reference, Shape};
///
/// // Two sequences in a cache of 3 rows each (Sk = 3): the first holds 2 keys, the second 3.
/// let kernel = Reference::new(&AttentionSpec::mha(1, 1))?;
/// let (q, k) = ([0.0, 0.0], [0.0; 6]);
/// let v = [1.0, 2.0, f32::NAN, 10.0, 20.0, 30.0]; // sequence 0's row 2 is never read
/// let inputs = Inputs::grouped(&q, &k, &v).with_kv_lens(&[2, 3]);
/// let mut out = [0.0; 2];
/// kernel.run(Shape::new(2, 1, 3), &inputs, &mut out, None)?;
/// assert_eq!(out, [1.5, 20.0]);
/// # Ok::<(), attngen::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The input tensors.
    pub tensors: InputTensors<'a>,
    /// `kv_lens`: `[B]`, the keys of each sequence, each at most Sk: sequence b attends to rows
    /// `0..kv_lens[b]` of its cache tensors, which keep Sk rows per sequence (a KV cache's
    /// capacity), and never reads the rest. `None`: every sequence has Sk keys.
    pub kv_lens: Option<&'a [usize]>,
}

/// Borrowed, named views of a call's input tensors.
#[derive(Clone, Copy, Debug)]
pub enum InputTensors<'a> {
    /// Inputs of a grouped (MHA/MQA/GQA) spec.
    Grouped {
        /// `q`: [B, Sq, H, D].
        q: &'a [f32],
        /// `k`: [B, Sk, kv_heads, D].
        k: &'a [f32],
        /// `v`: [B, Sk, kv_heads, Dv].
        v: &'a [f32],
    },
    /// Inputs of a latent (MLA) spec.
    Latent {
        /// `q`: [B, Sq, H, nope_dim + rope_dim], nope part first.
        q: &'a [f32],
        /// `c_kv`: [B, Sk, rank]; with a combined latent cache ([`LatentCache::Combined`]),
        /// [B, Sk, rank + rope_dim], each row `[c_kv | k_rope]`.
        c_kv: &'a [f32],
        /// `k_rope`: [B, Sk, rope_dim]; empty with a combined latent cache.
        k_rope: &'a [f32],
        /// `w_uk`: [H, nope_dim, rank].
        w_uk: &'a [f32],
        /// `w_uv`: [H, Dv, rank].
        w_uv: &'a [f32],
    },
}

impl<'a> Inputs<'a> {
    /// Inputs for a grouped spec, every sequence with Sk keys.
    pub fn grouped(q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Self {
        Inputs { tensors: InputTensors::Grouped { q, k, v }, kv_lens: None }
    }

    /// Inputs for a latent spec, every sequence with Sk keys.
    pub fn latent(
        q: &'a [f32],
        c_kv: &'a [f32],
        k_rope: &'a [f32],
        w_uk: &'a [f32],
        w_uv: &'a [f32],
    ) -> Self {
        Inputs { tensors: InputTensors::Latent { q, c_kv, k_rope, w_uk, w_uv }, kv_lens: None }
    }

    /// Inputs for a latent spec whose cache is combined ([`LatentCache::Combined`]):
    /// `kv_cache` is [B, Sk, rank + rope_dim], each token's row `[c_kv | k_rope]` (DeepSeek's
    /// `kv_a_proj_with_mqa` output, as inference engines cache it), read in place. Every
    /// sequence has Sk keys.
    ///
    /// ```
    /// use attngen::{AttentionSpec, Inputs, Kernel, LatentCache, Reference, Shape};
    ///
    /// // 1 head, rank 2, rope 1, nope 1, Dv 1; one sequence of two tokens.
    /// let spec = AttentionSpec::mla(1, 2, 1, 1, 1).latent_cache(LatentCache::Combined);
    /// let kv_cache = [1.0, 0.0, 0.5, /* token 1: */ 0.0, 1.0, -0.5]; // [c_kv | k_rope] per row
    /// let (q, w_uk, w_uv) = ([0.0, 0.0], [1.0, 1.0], [1.0, 3.0]);
    /// let mut out = [0.0];
    /// let inputs = Inputs::latent_combined(&q, &kv_cache, &w_uk, &w_uv);
    /// Reference::new(&spec)?.run(Shape::new(1, 1, 2), &inputs, &mut out, None)?;
    /// assert_eq!(out, [2.0]); // zero scores: the mean of the values W_UV·c_kv, 1 and 3
    /// # Ok::<(), attngen::Error>(())
    /// ```
    pub fn latent_combined(
        q: &'a [f32],
        kv_cache: &'a [f32],
        w_uk: &'a [f32],
        w_uv: &'a [f32],
    ) -> Self {
        Inputs::latent(q, kv_cache, &[], w_uk, w_uv)
    }

    /// The same tensors with per-sequence key lengths ([`Inputs::kv_lens`]).
    pub fn with_kv_lens(self, kv_lens: &'a [usize]) -> Self {
        Inputs { kv_lens: Some(kv_lens), ..self }
    }

    /// `grouped` or `latent`.
    pub fn kind(&self) -> &'static str {
        match self.tensors {
            InputTensors::Grouped { .. } => "grouped",
            InputTensors::Latent { .. } => "latent",
        }
    }

    /// `q`.
    pub fn q(&self) -> &'a [f32] {
        match self.tensors {
            InputTensors::Grouped { q, .. } | InputTensors::Latent { q, .. } => q,
        }
    }

    /// The keys of sequence `b`: `kv_lens[b]`, or `seq_k` without per-sequence lengths. For
    /// a call [`check_call`] accepted, `b < B`.
    pub fn keys(&self, b: usize, seq_k: usize) -> usize {
        self.kv_lens.map_or(seq_k, |lens| lens[b])
    }

    /// The tensors by name, in the order of [`Tensor::inputs`].
    pub fn named(&self) -> Vec<(Tensor, &'a [f32])> {
        match self.tensors {
            InputTensors::Grouped { q, k, v } => {
                vec![(Tensor::Q, q), (Tensor::K, k), (Tensor::V, v)]
            }
            InputTensors::Latent { q, c_kv, k_rope, w_uk, w_uv } => vec![
                (Tensor::Q, q),
                (Tensor::CKv, c_kv),
                (Tensor::KRope, k_rope),
                (Tensor::WUk, w_uk),
                (Tensor::WUv, w_uv),
            ],
        }
    }
}

/// A tensor of semantics.md §2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tensor {
    /// Queries.
    Q,
    /// Keys (grouped).
    K,
    /// Values (grouped).
    V,
    /// Latent per token (latent).
    CKv,
    /// Shared RoPE key per token (latent).
    KRope,
    /// Key up-projection (latent).
    WUk,
    /// Value up-projection (latent).
    WUv,
    /// The attention output.
    Out,
    /// The log-sum-exp of each row.
    Lse,
}

impl Tensor {
    /// The input tensors of a spec, in a fixed order (a combined latent cache has no `k_rope`:
    /// it is part of `c_kv`).
    pub fn inputs(spec: &AttentionSpec) -> &'static [Tensor] {
        match spec.kv {
            KvLayout::Grouped { .. } => &[Tensor::Q, Tensor::K, Tensor::V],
            KvLayout::Latent(l) => match l.cache {
                LatentCache::Separate => {
                    &[Tensor::Q, Tensor::CKv, Tensor::KRope, Tensor::WUk, Tensor::WUv]
                }
                LatentCache::Combined => &[Tensor::Q, Tensor::CKv, Tensor::WUk, Tensor::WUv],
            },
        }
    }

    /// The tensor's name in files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Tensor::Q => "q",
            Tensor::K => "k",
            Tensor::V => "v",
            Tensor::CKv => "c_kv",
            Tensor::KRope => "k_rope",
            Tensor::WUk => "w_uk",
            Tensor::WUv => "w_uv",
            Tensor::Out => "out",
            Tensor::Lse => "lse",
        }
    }

    /// The tensor's shape for a spec and call shape (empty for a tensor the spec does not take,
    /// such as `k_rope` with a combined latent cache, whose `c_kv` rows hold it).
    pub fn dims(self, spec: &AttentionSpec, shape: Shape) -> Vec<usize> {
        let Shape { batch: b, seq_q: sq, seq_k: sk } = shape;
        let (h, d, dv) = (spec.q_heads, spec.head_dim(), spec.v_head_dim);
        match (&spec.kv, self) {
            (_, Tensor::Q) => vec![b, sq, h, d],
            (_, Tensor::Out) => vec![b, sq, h, dv],
            (_, Tensor::Lse) => vec![b, sq, h],
            (KvLayout::Grouped { kv_heads, .. }, Tensor::K) => vec![b, sk, *kv_heads, d],
            (KvLayout::Grouped { kv_heads, .. }, Tensor::V) => vec![b, sk, *kv_heads, dv],
            (KvLayout::Latent(l), Tensor::CKv) => vec![b, sk, l.row_stride(l.rank)],
            (KvLayout::Latent(l), Tensor::KRope) if l.cache == LatentCache::Separate => {
                vec![b, sk, l.rope_dim]
            }
            (KvLayout::Latent(l), Tensor::WUk) => vec![h, l.nope_dim, l.rank],
            (KvLayout::Latent(l), Tensor::WUv) => vec![h, dv, l.rank],
            _ => Vec::new(),
        }
    }

    /// The element count of [`Tensor::dims`].
    ///
    /// # Errors
    /// [`Error::TooLarge`] if the count overflows `usize`.
    pub fn len(self, spec: &AttentionSpec, shape: Shape) -> Result<usize, Error> {
        let dims = self.dims(spec, shape);
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or(Error::TooLarge { tensor: self.name(), shape: dims })
    }

    fn check(self, spec: &AttentionSpec, shape: Shape, got: usize) -> Result<(), Error> {
        let expected = self.len(spec, shape)?;
        if expected == got {
            Ok(())
        } else {
            Err(Error::Length { tensor: self.name(), shape: self.dims(spec, shape), expected, got })
        }
    }
}

/// Checks a call before any kernel touches memory: the inputs' kind matches the spec, every
/// buffer (inputs, `out`, `lse`) has exactly its tensor's element count, computed with checked
/// arithmetic (a tensor the spec does not take, `k_rope` with a combined latent cache, is
/// empty), and `kv_lens`, if given, has one length per sequence, none above Sk. Every
/// [`crate::Kernel::run`] calls this first, so on error nothing was written. The spec itself
/// must already be validated (kernels validate when they are built).
///
/// # Errors
/// As [`crate::Kernel::run`]: [`Error::InputsKind`], [`Error::Length`], [`Error::NotTaken`],
/// [`Error::TooLarge`] or [`Error::KvLen`], naming the tensor or field.
pub fn check_call(
    spec: &AttentionSpec,
    shape: Shape,
    inputs: &Inputs<'_>,
    out_len: usize,
    lse_len: Option<usize>,
) -> Result<(), Error> {
    let expected = match spec.kv {
        KvLayout::Grouped { .. } => "grouped",
        KvLayout::Latent(_) => "latent",
    };
    if inputs.kind() != expected {
        return Err(Error::InputsKind { expected, got: inputs.kind() });
    }
    for (tensor, data) in inputs.named() {
        if Tensor::inputs(spec).contains(&tensor) {
            tensor.check(spec, shape, data.len())?;
        } else if !data.is_empty() {
            // The one named input a spec can leave out: a combined latent cache's k_rope.
            let why = "the spec's latent cache is combined, so k_rope is read from c_kv's rows \
                       ([c_kv | k_rope] per token): build the inputs with Inputs::latent_combined";
            return Err(Error::NotTaken { tensor: tensor.name(), why, got: data.len() });
        }
    }
    if let Some(lens) = inputs.kv_lens {
        if lens.len() != shape.batch {
            let (expected, got) = (shape.batch, lens.len());
            return Err(Error::Length { tensor: "kv_lens", shape: vec![expected], expected, got });
        }
        if let Some((sequence, &len)) = lens.iter().enumerate().find(|&(_, &n)| n > shape.seq_k) {
            return Err(Error::KvLen { sequence, len, seq_k: shape.seq_k });
        }
    }
    Tensor::Out.check(spec, shape, out_len)?;
    if let Some(len) = lse_len {
        Tensor::Lse.check(spec, shape, len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use attngen_codegen::AttentionSpec;

    #[test]
    fn lengths_are_checked_per_tensor() {
        let spec = AttentionSpec::gqa(4, 2, 3);
        let shape = Shape::new(1, 2, 5);
        let (q, k, v) = (vec![0.0; 24], vec![0.0; 30], vec![0.0; 30]);
        assert_eq!(check_call(&spec, shape, &Inputs::grouped(&q, &k, &v), 24, Some(8)), Ok(()));
        let short_k = &k[..29];
        assert_eq!(
            check_call(&spec, shape, &Inputs::grouped(&q, short_k, &v), 24, None)
                .unwrap_err()
                .to_string(),
            "tensor `k`: expected shape [1, 5, 2, 3] = 30 elements, got 29 elements"
        );
        assert_eq!(
            check_call(&spec, shape, &Inputs::grouped(&q, &k, &v), 24, Some(7)).unwrap_err(),
            Error::Length { tensor: "lse", shape: vec![1, 2, 4], expected: 8, got: 7 }
        );
    }

    #[test]
    fn overflowing_shapes_are_errors() {
        let spec = AttentionSpec::mha(4, 4);
        let shape = Shape::new(usize::MAX / 2, 3, 1);
        assert_eq!(
            check_call(&spec, shape, &Inputs::grouped(&[], &[], &[]), 0, None).unwrap_err(),
            Error::TooLarge { tensor: "q", shape: vec![usize::MAX / 2, 3, 4, 4] }
        );
    }

    #[test]
    fn input_kind_must_match() {
        let spec = AttentionSpec::mla(2, 4, 0, 2, 2);
        assert_eq!(
            check_call(&spec, Shape::new(1, 1, 1), &Inputs::grouped(&[], &[], &[]), 0, None)
                .unwrap_err()
                .to_string(),
            "the spec has latent KV but the inputs are grouped: build them with Inputs::latent(..)"
        );
    }
}
