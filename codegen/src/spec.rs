//! [`AttentionSpec`]: the declarative description of one attention layer's kernel.
//!
//! A spec is plain data. Builders and setters never fail; every rule of the contract is checked
//! in one place, [`crate::validate()`], which every consumer (TOML, the proc macro, the JIT, the
//! reference interpreter) calls before it trusts a spec.

use std::fmt;
use std::str::FromStr;

use crate::validate::SpecError;

/// One attention layer: head counts, how query heads share keys and values, mask, scale, softcap.
///
/// ```
/// use attngen_codegen::{AttentionSpec, GroupMap, Mask};
///
/// // Llama-3-8B: 32 query heads share 8 KV heads of dimension 128, causal.
/// let llama = AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal).named("llama3-8b");
/// assert_eq!(llama.head_dim(), 128);
/// assert_eq!(llama.kv_head_of(5), 1); // contiguous groups of 4
///
/// let interleaved = AttentionSpec::gqa(32, 8, 128).group_map(GroupMap::Interleaved);
/// assert_eq!(interleaved.kv_head_of(5), 5);
/// assert!(attngen_codegen::validate(&llama).is_ok());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    /// Informational name, e.g. `"llama3-8b"`.
    pub name: Option<String>,
    /// Number of query heads, H.
    pub q_heads: usize,
    /// How keys and values are stored and shared between query heads.
    pub kv: KvLayout,
    /// Value (and output) dimension per head, Dv.
    pub v_head_dim: usize,
    /// Which keys each query sees.
    pub mask: Mask,
    /// Score scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Optional logit cap c: `s = c * tanh(s / c)`.
    pub softcap: Option<f32>,
    /// Element type of every tensor.
    pub dtype: Dtype,
}

/// How keys and values are stored and which of them each query head reads.
#[derive(Clone, Debug, PartialEq)]
pub enum KvLayout {
    /// Per-head keys and values, each shared by a group of query heads (MHA, MQA, GQA).
    Grouped {
        /// Number of key/value heads.
        kv_heads: usize,
        /// Query/key dimension per head, D.
        head_dim: usize,
        /// Which KV head each query head reads.
        group_map: GroupMap,
    },
    /// DeepSeek-V2 multi-head latent attention: keys and values are up-projections of a
    /// per-token latent vector.
    Latent(LatentKv),
}

/// The dimensions of a multi-head latent attention (MLA) KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentKv {
    /// Length of the latent vector `c_kv` cached per token.
    pub rank: usize,
    /// Length of the shared, already-rotated RoPE key cached per token (may be 0).
    pub rope_dim: usize,
    /// Per-head key dimension produced by `w_uk` from the latent.
    pub nope_dim: usize,
    /// Which form the kernel computes: chosen per call by the cost model (`Auto`, the
    /// default), or forced.
    pub form: MlaForm,
    /// How the cache holds `c_kv` and `k_rope`: as two tensors (the default) or as one.
    pub cache: LatentCache,
}

impl LatentKv {
    /// Floats from one token's row of the latent (`width` = `rank`) or RoPE key (`width` =
    /// `rope_dim`) cache to the next: the row itself in separate tensors, the whole
    /// `[c_kv | k_rope]` row in a combined one.
    pub fn row_stride(&self, width: usize) -> usize {
        match self.cache {
            LatentCache::Separate => width,
            LatentCache::Combined => self.rank.saturating_add(self.rope_dim),
        }
    }
}

/// How a latent spec's cache holds each token's latent `c_kv` and RoPE key `k_rope`.
///
/// DeepSeek's `kv_a_proj_with_mqa` produces `[c_kv | k_rope]` per token, and inference engines
/// keep that row whole in their cache (FlashMLA's layout). With `Combined`, a kernel reads both
/// from that one `[B, Sk, rank + rope_dim]` tensor, passed as `c_kv`, in place: no copy into
/// two tensors per call.
///
/// ```
/// use attngen_codegen::{AttentionSpec, LatentCache};
/// let spec = AttentionSpec::mla(16, 512, 64, 128, 128).latent_cache(LatentCache::Combined);
/// assert_eq!(spec.cache_layout(), Some(LatentCache::Combined));
/// assert_eq!("separate".parse(), Ok(LatentCache::Separate));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentCache {
    /// `c_kv` is `[B, Sk, rank]` and `k_rope` `[B, Sk, rope_dim]`, two tensors.
    #[default]
    Separate,
    /// `c_kv` is `[B, Sk, rank + rope_dim]`, each row `[c_kv | k_rope]`; `k_rope` is passed
    /// empty.
    Combined,
}

impl LatentCache {
    /// The name spec files and the macro use: `"separate"` or `"combined"`.
    pub fn name(self) -> &'static str {
        match self {
            LatentCache::Separate => "separate",
            LatentCache::Combined => "combined",
        }
    }
}

impl FromStr for LatentCache {
    type Err = String;

    fn from_str(name: &str) -> Result<LatentCache, String> {
        [LatentCache::Separate, LatentCache::Combined]
            .into_iter()
            .find(|cache| cache.name() == name)
            .ok_or_else(|| format!("unknown latent cache {name:?} (expected separate or combined)"))
    }
}

impl fmt::Display for LatentCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The two ways to compute multi-head latent attention. Both give the same output (semantics
/// §1); they differ in work. Per (query, key) pair and head the absorbed form attends over
/// `rank + rope_dim` and accumulates `rank`-wide values, against `nope_dim + rope_dim` and
/// `Dv` for the expanded one, which in turn up-projects every visible key once per head.
/// Decode (few queries per key) favours absorbed, prefill expanded.
///
/// ```
/// use attngen_codegen::{AttentionSpec, MlaForm};
/// let prefill = AttentionSpec::mla(16, 512, 64, 128, 128).mla_form(MlaForm::Expanded);
/// assert_eq!(prefill.requested_form(), Some(MlaForm::Expanded));
/// assert_eq!("absorbed".parse(), Ok(MlaForm::Absorbed));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlaForm {
    /// Each call takes the form the cost model ([`crate::cost::form_costs`]) finds cheaper at
    /// its shape.
    #[default]
    Auto,
    /// Weight absorption: `q' = q_nope·W_UK[h]`, attention over `[c_kv, k_rope]` as one KV
    /// head shared by every query head, then `out = o'·W_UV[h]ᵀ`.
    Absorbed,
    /// Per head, `K_h = [c_kv·W_UK[h]ᵀ, k_rope]` and `V_h = c_kv·W_UV[h]ᵀ` are computed tile by
    /// tile inside the kernel, then flash attention over them.
    Expanded,
}

impl MlaForm {
    /// The name spec files and the macro use: `"auto"`, `"absorbed"` or `"expanded"`.
    pub fn name(self) -> &'static str {
        match self {
            MlaForm::Auto => "auto",
            MlaForm::Absorbed => "absorbed",
            MlaForm::Expanded => "expanded",
        }
    }
}

impl FromStr for MlaForm {
    type Err = String;

    fn from_str(name: &str) -> Result<MlaForm, String> {
        [MlaForm::Auto, MlaForm::Absorbed, MlaForm::Expanded]
            .into_iter()
            .find(|form| form.name() == name)
            .ok_or_else(|| {
                format!("unknown MLA form {name:?} (expected auto, absorbed or expanded)")
            })
    }
}

impl fmt::Display for MlaForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which KV head g(h) query head h reads, for grouped KV.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum GroupMap {
    /// g(h) = h / (H / kv_heads): consecutive query heads share a KV head (Llama, Hugging Face).
    #[default]
    Contiguous,
    /// g(h) = h % kv_heads.
    Interleaved,
    /// g(h) = `map[h]`; groups may have unequal sizes.
    Explicit(Vec<usize>),
}

/// Which keys a query may attend to. Queries are the *last* `seq_q` positions of the `seq_k`
/// keys (bottom-right alignment), so key j is visible from query i relative to
/// `offset = seq_k - seq_q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mask {
    /// Every key is visible.
    #[default]
    None,
    /// Key j is visible iff `j <= i + offset`.
    Causal,
    /// Causal, limited to the last W keys including the diagonal:
    /// `i + offset - W < j <= i + offset`.
    SlidingWindow(usize),
}

/// Element type of the tensors a kernel reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Dtype {
    /// 32-bit IEEE float storage and math.
    #[default]
    F32,
}

/// The attention variant a spec describes, for reports and tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Multi-head: every query head has its own KV head.
    Mha,
    /// Multi-query: all query heads share one KV head.
    Mqa,
    /// Grouped-query: groups of query heads share a KV head.
    Gqa,
    /// Multi-head latent attention.
    Mla,
}

impl AttentionSpec {
    fn grouped(q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttentionSpec {
            name: None,
            q_heads,
            kv: KvLayout::Grouped { kv_heads, head_dim, group_map: GroupMap::Contiguous },
            v_head_dim: head_dim,
            mask: Mask::None,
            scale: None,
            softcap: None,
            dtype: Dtype::F32,
        }
    }

    /// Multi-head attention: `q_heads` query heads, each with its own KV head of dimension
    /// `head_dim`.
    pub fn mha(q_heads: usize, head_dim: usize) -> Self {
        Self::grouped(q_heads, q_heads, head_dim)
    }

    /// Multi-query attention: `q_heads` query heads sharing one KV head.
    pub fn mqa(q_heads: usize, head_dim: usize) -> Self {
        Self::grouped(q_heads, 1, head_dim)
    }

    /// Grouped-query attention with the contiguous group map.
    pub fn gqa(q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self::grouped(q_heads, kv_heads, head_dim)
    }

    /// Multi-head latent attention (DeepSeek-V2): a latent of length `rank` and a shared RoPE
    /// key of length `rope_dim` per token; per-head keys of `nope_dim + rope_dim` and values of
    /// `v_head_dim`.
    ///
    /// ```
    /// let lite = attngen_codegen::AttentionSpec::mla(16, 512, 64, 128, 128);
    /// assert_eq!(lite.head_dim(), 192);
    /// ```
    pub fn mla(
        q_heads: usize,
        rank: usize,
        rope_dim: usize,
        nope_dim: usize,
        v_head_dim: usize,
    ) -> Self {
        AttentionSpec {
            name: None,
            q_heads,
            kv: KvLayout::Latent(LatentKv {
                rank,
                rope_dim,
                nope_dim,
                form: MlaForm::Auto,
                cache: LatentCache::Separate,
            }),
            v_head_dim,
            mask: Mask::None,
            scale: None,
            softcap: None,
            dtype: Dtype::F32,
        }
    }

    /// Sets the informational name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the mask.
    pub fn mask(mut self, mask: Mask) -> Self {
        self.mask = mask;
        self
    }

    /// Sets the score scale (default `1/sqrt(head_dim)`).
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the logit softcap.
    pub fn softcap(mut self, softcap: f32) -> Self {
        self.softcap = Some(softcap);
        self
    }

    /// Sets the value/output head dimension.
    pub fn v_head_dim(mut self, v_head_dim: usize) -> Self {
        self.v_head_dim = v_head_dim;
        self
    }

    /// Forces the form of a latent spec's kernel (default [`MlaForm::Auto`]: chosen per call).
    /// A grouped spec has one form, so there this has no effect.
    pub fn mla_form(mut self, form: MlaForm) -> Self {
        if let KvLayout::Latent(latent) = &mut self.kv {
            latent.form = form;
        }
        self
    }

    /// Sets how a latent spec's cache holds `c_kv` and `k_rope` (default
    /// [`LatentCache::Separate`]). A grouped spec has no latent cache, so there this has no
    /// effect.
    pub fn latent_cache(mut self, cache: LatentCache) -> Self {
        if let KvLayout::Latent(latent) = &mut self.kv {
            latent.cache = cache;
        }
        self
    }

    /// Sets the group map of a grouped spec. A latent spec has one shared latent KV head and no
    /// group map, so there this has no effect.
    pub fn group_map(mut self, map: GroupMap) -> Self {
        if let KvLayout::Grouped { group_map, .. } = &mut self.kv {
            *group_map = map;
        }
        self
    }

    /// The MLA form a latent spec asks for; `None` for grouped specs.
    pub fn requested_form(&self) -> Option<MlaForm> {
        match &self.kv {
            KvLayout::Latent(l) => Some(l.form),
            KvLayout::Grouped { .. } => None,
        }
    }

    /// How a latent spec's cache holds `c_kv` and `k_rope`; `None` for grouped specs.
    pub fn cache_layout(&self) -> Option<LatentCache> {
        match &self.kv {
            KvLayout::Latent(l) => Some(l.cache),
            KvLayout::Grouped { .. } => None,
        }
    }

    /// Query/key dimension per head, D (`nope_dim + rope_dim` for latent specs).
    pub fn head_dim(&self) -> usize {
        match &self.kv {
            KvLayout::Grouped { head_dim, .. } => *head_dim,
            KvLayout::Latent(l) => l.nope_dim.saturating_add(l.rope_dim),
        }
    }

    /// The scale applied to `q · k`: the explicit one, or `1/sqrt(head_dim)`.
    pub fn effective_scale(&self) -> f64 {
        match self.scale {
            Some(s) => f64::from(s),
            None => 1.0 / (self.head_dim() as f64).sqrt(),
        }
    }

    /// The KV head that query head `h` reads (always 0 for latent specs, whose latent is shared).
    /// Meaningful for a validated spec and `h < q_heads`; never panics on other input.
    pub fn kv_head_of(&self, h: usize) -> usize {
        match &self.kv {
            KvLayout::Grouped { kv_heads, group_map, .. } => match group_map {
                GroupMap::Contiguous => h / (self.q_heads / (*kv_heads).max(1)).max(1),
                GroupMap::Interleaved => h % (*kv_heads).max(1),
                GroupMap::Explicit(map) => map.get(h).copied().unwrap_or(0),
            },
            KvLayout::Latent(_) => 0,
        }
    }

    /// Number of KV heads stored in the cache (1 for latent specs).
    pub fn kv_heads(&self) -> usize {
        match &self.kv {
            KvLayout::Grouped { kv_heads, .. } => *kv_heads,
            KvLayout::Latent(_) => 1,
        }
    }

    /// The variant this spec describes.
    pub fn variant(&self) -> Variant {
        match &self.kv {
            KvLayout::Latent(_) => Variant::Mla,
            KvLayout::Grouped { kv_heads, .. } if *kv_heads == self.q_heads => Variant::Mha,
            KvLayout::Grouped { kv_heads: 1, .. } => Variant::Mqa,
            KvLayout::Grouped { .. } => Variant::Gqa,
        }
    }

    /// Number of query heads reading each KV head, indexed by KV head.
    pub fn group_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.kv_heads()];
        for h in 0..self.q_heads {
            if let Some(size) = sizes.get_mut(self.kv_head_of(h)) {
                *size += 1;
            }
        }
        sizes
    }
}

impl GroupMap {
    /// The name used in spec files and messages: `contiguous`, `interleaved` or `explicit`.
    pub fn name(&self) -> &'static str {
        match self {
            GroupMap::Contiguous => "contiguous",
            GroupMap::Interleaved => "interleaved",
            GroupMap::Explicit(_) => "explicit",
        }
    }
}

impl FromStr for GroupMap {
    type Err = SpecError;

    /// Parses the named maps; an explicit map is a list, not a string.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "contiguous" => Ok(GroupMap::Contiguous),
            "interleaved" => Ok(GroupMap::Interleaved),
            _ => Err(SpecError::UnknownValue {
                field: "group_map",
                value: s.to_owned(),
                expected: "\"contiguous\", \"interleaved\" or a list of KV head indices",
            }),
        }
    }
}

impl FromStr for Mask {
    type Err = SpecError;

    /// Parses `none` and `causal`; a sliding window is written `{ sliding_window = W }`.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "none" => Ok(Mask::None),
            "causal" => Ok(Mask::Causal),
            _ => Err(SpecError::UnknownValue {
                field: "mask",
                value: s.to_owned(),
                expected: "\"none\", \"causal\" or { sliding_window = W }",
            }),
        }
    }
}

impl FromStr for Dtype {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "f32" => Ok(Dtype::F32),
            "bf16" => Err(SpecError::Unsupported {
                field: "dtype",
                value: s.to_owned(),
                why: "bf16 storage is planned; use \"f32\" for now",
            }),
            _ => Err(SpecError::UnknownValue {
                field: "dtype",
                value: s.to_owned(),
                expected: "\"f32\"",
            }),
        }
    }
}

impl Dtype {
    /// The name used in spec files.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
        }
    }
}

impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mask::None => f.write_str("none"),
            Mask::Causal => f.write_str("causal"),
            Mask::SlidingWindow(w) => write!(f, "sliding_window = {w}"),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::Mha => "MHA",
            Variant::Mqa => "MQA",
            Variant::Gqa => "GQA",
            Variant::Mla => "MLA",
        })
    }
}

impl AttentionSpec {
    /// A one-line description of the variant and its head sharing, e.g. `GQA 32→8 (4 per KV
    /// head)`, `GQA 5→3 (2,1,2 per KV head)` or `MLA 16 heads, latent 512 + rope 64`.
    pub fn summary(&self) -> String {
        let h = self.q_heads;
        match (&self.kv, self.variant()) {
            (KvLayout::Latent(l), _) => {
                let one_tensor = match l.cache {
                    LatentCache::Separate => "",
                    LatentCache::Combined => " (one cache tensor)",
                };
                format!("MLA {h} heads, latent {} + rope {}{one_tensor}", l.rank, l.rope_dim)
            }
            (_, Variant::Mha) => format!("MHA {h} heads"),
            (_, variant) => {
                let sizes = self.group_sizes();
                let per_head = if sizes.windows(2).all(|w| w[0] == w[1]) {
                    sizes.first().copied().unwrap_or(0).to_string()
                } else {
                    sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
                };
                format!("{variant} {h}→{} ({per_head} per KV head)", sizes.len())
            }
        }
    }
}
