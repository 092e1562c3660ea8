//! [`KernelPlan`]: how a validated spec becomes a kernel — which form, which tiles, how query
//! heads are packed, how scratch is laid out — and [`Schedule`]: how one call is split into
//! work items.
//!
//! A plan depends only on the spec and the target ISA ([`Target`]); a schedule also on the
//! call's shape and thread count.

use std::fmt;

use crate::abi::{ALIGN_FLOATS, PANEL};
use crate::cost;
use crate::spec::{AttentionSpec, GroupMap, KvLayout, Mask, MlaForm};

/// Which form of attention the kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Per-KV-head keys and values read straight from the cache; the query heads of one KV head
    /// are packed together so each K/V tile is loaded once per group.
    Grouped,
    /// MLA in the absorbed form: `q' = q_nope·W_UK[h]`, attention over `[c_kv, k_rope]` as one
    /// KV head shared by all query heads, then `out = o'·W_UV[h]ᵀ`.
    LatentAbsorbed,
    /// MLA in the expanded (un-absorbed) form: each (batch, head) task up-projects its visible
    /// keys tile by tile, `K_h = [c_kv·W_UK[h]ᵀ, k_rope]` and `V_h = c_kv·W_UV[h]ᵀ`, into a
    /// buffer of its own ([`CallPacking::up_projected`]) that every query tile of the task then
    /// reads: flash attention with one head per group, `nope_dim + rope_dim` wide scores and
    /// `Dv`-wide values.
    LatentExpanded,
}

impl Form {
    /// The forms a kernel for `spec` compiles: the grouped form, or for latent specs the
    /// forced MLA form, or both when each call chooses ([`MlaForm::Auto`]; absorbed first).
    pub fn compiled(spec: &AttentionSpec) -> Vec<Form> {
        match spec.requested_form() {
            None => vec![Form::Grouped],
            Some(MlaForm::Auto) => vec![Form::LatentAbsorbed, Form::LatentExpanded],
            Some(MlaForm::Absorbed) => vec![Form::LatentAbsorbed],
            Some(MlaForm::Expanded) => vec![Form::LatentExpanded],
        }
    }

    /// A short name: `grouped`, `absorbed` or `expanded`.
    pub fn name(self) -> &'static str {
        match self {
            Form::Grouped => "grouped",
            Form::LatentAbsorbed => "absorbed",
            Form::LatentExpanded => "expanded",
        }
    }
}

/// How generated code finds the query heads of a group: the spec's group map, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadMap {
    /// Group g holds heads `g·size .. (g + 1)·size` (contiguous maps; latent: one group of
    /// every head).
    Contiguous {
        /// Heads per group.
        size: usize,
    },
    /// Group g holds heads `g, g + groups, g + 2·groups, …` (interleaved maps).
    Interleaved {
        /// Groups (KV heads).
        groups: usize,
    },
    /// Groups of any sizes and members (explicit maps): generated code reads a table of
    /// [`KernelPlan::groups`].
    Table,
}

/// A cache tensor whose rows a work item reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheTensor {
    /// Grouped keys `k` [B, Sk, kv_heads, D].
    K,
    /// Grouped values `v` [B, Sk, kv_heads, Dv].
    V,
    /// MLA's latent `c_kv` [B, Sk, rank].
    CKv,
    /// MLA's RoPE keys `k_rope` [B, Sk, rope_dim].
    KRope,
}

/// Where a work item's rows of a cache tensor lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheRow {
    /// Floats of one row an item reads: one KV head's key or value, a latent, a RoPE key.
    pub width: usize,
    /// Floats from one token's row to the next: all KV heads of a token for grouped K and V;
    /// for MLA's latent and RoPE keys the row itself, or `rank + rope_dim` in a combined
    /// cache (`LatentCache::Combined`, where `CallArgs::k_rope` points `rank` floats into
    /// `c_kv`).
    pub stride: usize,
}

/// The packed copy of one task's keys (`CallArgs::k_packed` and `v_packed`): a prefill's
/// (batch, KV head) keys, copied by the executor, or an expanded MLA (batch, head)'s
/// up-projected ones, written by its `expand` program; in both, from key
/// `CallArgs::packed_first_key` (a multiple of `k_tile`) on, and only while the task's query
/// tiles read them, so each key tile is copied once rather than by every query tile. The one
/// description of its layout, which the executor fills and both emitters address.
/// - K: rows of D floats, row-major: key j at float `(j − first)·D`.
/// - V: per key tile, key j's at float `(j − first) / k_tile · value_tile()`: the tile's
///   `k_tile × Dv` values in [`PANEL`]-column panels `k_tile` rows deep (grouped), or
///   row-major, [`CallPacking::value_row`] floats apart (up-projected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallPacking {
    /// Keys per tile.
    pub k_tile: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// D, floats of a packed key row.
    pub key_width: usize,
    /// Dv, floats of a value row.
    pub value_width: usize,
    /// The copy is expanded MLA's up-projection, the only form its K and V take: items have
    /// no cache rows to read instead, and its values are row-major.
    pub up_projected: bool,
}

impl CallPacking {
    /// Floats of one packed value tile: `k_tile × Dv` in panels, or (up-projected) `k_tile`
    /// rows of [`CallPacking::value_row`] floats.
    pub fn value_tile(&self) -> usize {
        match self.up_projected {
            true => self.k_tile * self.value_row(),
            false => ScratchLayout::panels(self.k_tile, self.value_width),
        }
    }

    /// Floats from one row of a packed value tile to the next: a panel's row, or
    /// (up-projected) Dv rounded up to an odd number of [`PANEL`]s, one cache line each.
    pub fn value_row(&self) -> usize {
        if !self.up_projected {
            return PANEL;
        }
        // An odd number of lines, so a panel's rows spread over all of L1's sets: 128-float
        // rows put a 16-column panel's 64 lines in 8 of them, and the value product of W6's
        // tiles ran 1.08× faster on 144-float rows (one thread, operands in cache).
        let lines = self.value_width.div_ceil(PANEL);
        (lines | 1) * PANEL
    }

    /// Floats from one panel of a packed value tile to the next (`DotNn`'s `b_panel`).
    pub fn value_panel(&self) -> usize {
        if self.up_projected { PANEL } else { PANEL * self.k_tile }
    }

    /// Floats of the packed K and V per key.
    pub fn key_floats(&self) -> usize {
        self.key_width + self.value_tile() / self.k_tile
    }

    /// Floats of the packed K and of the packed V holding keys `first..end` (`first` a
    /// multiple of `k_tile`): whole key tiles.
    pub fn lens(&self, first: usize, end: usize) -> (usize, usize) {
        let tiles = end.saturating_sub(first).div_ceil(self.k_tile);
        (tiles * self.k_tile * self.key_width, tiles * self.value_tile())
    }
}

/// What a plan takes from the ISA whose micro-kernels the kernel calls: the facts that change a
/// layout the generated code addresses. Each ISA's register blocks stay inside its routines;
/// a kernel is planned, lowered and emitted once per target (the JIT for its ISA, the attribute
/// macro for each ISA it stamps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The ISA's name, as `ATTNGEN_ISA` spells it.
    pub name: &'static str,
    /// f32 lanes per vector.
    pub lanes: usize,
    /// Absorbed MLA keeps its running output transposed ([`StateLayout::transposed`]). The
    /// value product is then `Oᵀ (+)= c_kvᵀ·Pᵀ`: with 8 lanes a decode item's 16 rows
    /// (DeepSeek-V2-Lite's heads) are one 6 × 16 register block wide and the latent rows are
    /// broadcast, which ran W5 0.94–0.96× and W8 0.93–0.94× the time on a Zen 3 (AVX2). With 16
    /// lanes 16 rows are one vector, so every FMA would need a broadcast of its own: AVX-512
    /// keeps O row-major, in 6 × 64 blocks (on a Zen 5 the transposed layout ran W5 and W8
    /// 0.99–1.005× the time: no gain). The portable ISA, not tuned, keeps the row-major layout
    /// too, so that every CPU runs both.
    pub transposed_latent_output: bool,
}

impl Target {
    /// AVX-512F: 16 lanes.
    pub const AVX512: Target =
        Target { name: "avx512", lanes: 16, transposed_latent_output: false };
    /// AVX2 with FMA: 8 lanes.
    pub const AVX2: Target = Target { name: "avx2", lanes: 8, transposed_latent_output: true };
    /// NEON: 4 lanes. Absorbed MLA keeps the row-major O, as the portable ISA does: no AArch64
    /// CPU has timed either layout yet.
    pub const NEON: Target = Target { name: "neon", lanes: 4, transposed_latent_output: false };
    /// Plain Rust over 8-lane arrays.
    pub const PORTABLE: Target =
        Target { name: "portable", lanes: 8, transposed_latent_output: false };
}

/// The planned kernel for one spec. A work item packs the query heads of its group as extra
/// rows: with `nq` valid queries, row `slot · nq + qi` of every tile buffer holds query
/// `q0 + qi` of the `slot`-th head of the group, so each tile product is one call over all rows.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelPlan {
    /// The spec, validated.
    pub spec: AttentionSpec,
    /// The ISA the plan is made for.
    pub target: Target,
    /// The form computed.
    pub form: Form,
    /// Query heads reading each KV head (for latent, one group holding every head).
    pub groups: Vec<Vec<usize>>,
    /// How generated code maps a group's slots to query heads.
    pub head_map: HeadMap,
    /// Query heads H: the head count of `q`, `out` and `lse` rows.
    pub q_heads: usize,
    /// Floats of one head's query row in `q`: D (latent: `nope_dim + rope_dim`).
    pub q_width: usize,
    /// Queries per work item, Bq.
    pub q_tile: usize,
    /// Keys per inner tile, Bk (a multiple of 4, the generated vector width).
    pub k_tile: usize,
    /// Keys per tile for items that compute scores as dot products and read the cache rows in
    /// place (decode): at most `k_tile`, and small enough that one tile's rows of K and V
    /// together span at most [`DOT_TILE_PAGES`] pages. Such an item walks each tile group by
    /// group, so all of the tile's pages stay in the L1 TLB until its last group; with 4 KiB
    /// cache rows (Llama-3-8B) that is 8 keys, which measured 1.15–1.2× faster than 64 on W4.
    pub dot_k_tile: usize,
    /// Rows of the tile buffers: `q_tile · (largest group)`.
    pub rows: usize,
    /// `rows` rounded up to [`KernelPlan::row_multiple`]: the row count of the transposed
    /// score tile and of the m and l state, which the softmax walks four rows at a time.
    pub padded_rows: usize,
    /// The multiple every work item's rows are padded to (the generated code's vector
    /// width, 4): its softmax loads m, l and a score row's columns four at a time, and the
    /// padding rows see no key.
    pub row_multiple: usize,
    /// Width of the running output O: Dv (grouped) or the latent rank (absorbed MLA).
    pub acc_dim: usize,
    /// The spec's score scale.
    pub scale: f32,
    /// Factor folded into the packed queries: `scale · log2 e`, so the score tile comes out in
    /// base-2 units and the softmax uses `exp2`; with a softcap just `scale` (the softmax
    /// applies `cap · tanh(s / cap)` and then `log2 e`).
    pub query_factor: f32,
    /// Lazy rescaling: the running max m (base-2 units) moves only when a tile's max exceeds it
    /// by more than this, so O is rescaled rarely; probabilities stay below `2^threshold`.
    pub rescale_threshold: f32,
    /// Partial maxima the softmax keeps while it takes a tile's max, one per key of an unrolled
    /// step (a power of two), so the max instructions form that many independent chains instead
    /// of one that waits on each instruction's latency; combined pairwise at the end
    /// ([`crate::abi::MAX_PARTIALS`], which the pre-compiled [`crate::abi::ColumnMax`] keeps).
    pub max_partials: usize,
    /// Whole tiles take their max from the pre-compiled [`crate::abi::ColumnMax`], at the
    /// ISA's width, rather than a generated pass (the JIT's has 128-bit vectors): unless a
    /// softcap must be applied to the scores first (`ir::Op::OnlineSoftmax` has the rule).
    pub routine_tile_max: bool,
    /// Fewest keys a decode split gets, so splitting never costs more than it saves.
    pub min_keys_per_split: usize,
    /// Most keys per run of a task whose query tiles all read the same packed keys — a
    /// grouped prefill's packed K/V, an expanded MLA task's up-projected buffer — so that a
    /// run's packed keys stay in cache across its query tiles ([`SHARED_RUN_BYTES`]; see
    /// [`Schedule::keys_per_run`]). `usize::MAX` for absorbed MLA, whose items read the latent
    /// in place.
    pub shared_run_keys: usize,
    /// The layout of a task's packed K/V: a grouped prefill's copy, an expanded MLA task's
    /// up-projection (`None` for absorbed MLA, whose rows are read in place).
    pub call_packing: Option<CallPacking>,
    /// Items pack their own tiles when the call did not: only for several KV heads, whose
    /// cache rows lie `kv_heads · D` floats apart (a multiple of 4 KiB for common shapes, so a
    /// tile's rows collide in the same L1 sets). One KV head's rows are contiguous already.
    pub pack_per_item: bool,
    /// Fewest rows (heads × queries) a work item needs before packing K/V tiles repays the
    /// copy; decode items read the cache in place.
    pub pack_min_rows: usize,
    /// Most rows a work item may have to compute scores as dot products (K rows against
    /// row-major queries) rather than with a broadcast of each key element against `Qᵀ`,
    /// which would fill only `rows / 8` of each vector; 0 for latent specs: on a Zen 5 (AVX-512)
    /// their 16-row decode items with dot-product scores took 0.96× the time with the latent
    /// in L2 but 1.28–1.46× reading it from DRAM, as a decode does, although the product alone
    /// ran 1.15–1.2× faster.
    pub dot_max_rows: usize,
    /// Where each tile buffer lives in a work item's scratch.
    pub scratch: ScratchLayout,
    /// Where O, m and l lie in one split's state slot.
    pub state: StateLayout,
    /// Floats of one split's state slot ([`StateLayout`]), a multiple of [`ALIGN_FLOATS`] so
    /// that every slot's O starts on a cache line.
    pub state_len: usize,
}

/// Offsets (floats) in a state slot: O (`padded_rows × acc_dim`) at 0; then m and l,
/// `padded_rows` each, so the softmax loads four (or more) rows' m and l as one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLayout {
    /// Floats of one row of O (`acc_dim`): row r's O starts at `r · o_row` (row-major).
    pub o_row: usize,
    /// O is stored transposed: `acc_dim` rows of one float per row of the group, padded to a
    /// multiple of 4 (`rows4`, known per item), row r's element d at `d · rows4 + r`
    /// ([`Target::transposed_latent_output`]; absorbed MLA only).
    pub transposed: bool,
    /// Where m of row 0 lies.
    pub m: usize,
    /// Where l of row 0 lies.
    pub l: usize,
}

/// Offsets (in floats) of the buffers in a work item's scratch: a part every group of the item
/// shares (tiles used and rewritten per key tile), then one block per group of the item
/// (its packed queries, kept for the whole key loop).
///
/// Query and score tiles are stored transposed — one column per row of the work item — so the
/// score product is `Sᵀ = K·Qᵀ` with a broadcast of each key element, and the softmax runs
/// down the columns, four rows per vector, with no horizontal reductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchLayout {
    /// Transposed score/probability tile Sᵀ: `k_tile × padded_rows`.
    pub scores: usize,
    /// In a group's block: packed queries Qᵀ in [`PANEL`]-column panels, `query_width × PANEL`
    /// floats per panel (grouped: q; absorbed MLA: q'), already multiplied by `query_factor`.
    pub queries: usize,
    /// Length of a query (rows of Qᵀ).
    pub query_width: usize,
    /// In a group's block: packed RoPE queries of absorbed MLA, as `queries`.
    pub rope_queries: usize,
    /// In a group's block: the queries row-major, `padded_rows × query_width`, scaled like
    /// `queries`, for items that compute scores as dot products (grouped specs only).
    pub query_rows: usize,
    /// Packed key tile: `k_tile × D`, row-major (when `pack_per_item`).
    pub keys: usize,
    /// Packed value tile in [`PANEL`]-column panels: `k_tile × PANEL` per panel (when
    /// `pack_per_item`).
    pub values: usize,
    /// Per-row visible key range of an edge tile: `padded_rows` i32 lows, then as many highs.
    pub ranges: usize,
    /// The tile max of a whole tile, `padded_rows` floats, when [`crate::abi::ColumnMax`]
    /// takes it (`Op::OnlineSoftmax`'s `column_max`).
    pub tile_max: usize,
    /// Where the first group's block starts: the floats of the shared part (a multiple of
    /// [`ALIGN_FLOATS`], as every offset here is).
    pub shared_len: usize,
    /// Floats of one group's block (a multiple of [`ALIGN_FLOATS`]).
    pub group_len: usize,
}

impl ScratchLayout {
    /// Floats of the scratch of a work item covering `groups` groups.
    pub fn len(&self, groups: usize) -> usize {
        self.shared_len + groups * self.group_len
    }

    /// Floats of one panel-packed tile: `depth` rows by `width` columns in panels.
    pub fn panels(depth: usize, width: usize) -> usize {
        width.div_ceil(PANEL) * PANEL * depth
    }
}

/// Rows of the tile buffers a plan aims for: enough queries to reuse each K/V tile well while
/// the score tile stays in L1.
const TARGET_ROWS: usize = 64;
/// Keys per tile.
const K_TILE: usize = 64;
/// Rows of a work item are padded to a multiple of this (see [`KernelPlan::row_multiple`]).
const ROW_MULTIPLE: usize = 4;
/// Most rows of a work item that computes scores as dot products (see
/// [`KernelPlan::dot_max_rows`]).
const DOT_MAX_ROWS: usize = 4;
/// Most pages a dot-product item's key tile may span, K and V together (see
/// [`KernelPlan::dot_k_tile`]): a quarter of Zen 3's 64-entry L1 data TLB, leaving room for
/// the queries, scratch and state. (On a Zen 5, 32 and 64 pages ran W7 0.99–1.005× the time.)
pub const DOT_TILE_PAGES: usize = 16;
/// Bytes per page, the unit of the TLB's reach.
const PAGE: usize = 4096;
/// Bytes of packed keys and values a run of keys whose query tiles share them holds at most
/// (see [`KernelPlan::shared_run_keys`]): 2048 keys of Llama-3-8B's heads, 1536 of
/// DeepSeek-V2-Lite's up-projected ones. Every query tile of the task re-reads them, and a
/// whole long key range falls out of cache: at Sq = 1024, Sk = 32768 on a Zen 5 (macro
/// kernels, 2 threads), taking it in 2 MiB pieces took 0.67–0.69× the time for expanded MLA;
/// with each piece packed by itself (no call-sized copy), 0.70–0.76× for Llama-3-8B and
/// 0.62–0.66× for MHA 16 × 64. 4 and 6 MiB measured the same as 2. (Those pieces were
/// splits, each with its own states merged at the end; runs, which carry the states on,
/// measured the same: 0.95–1.01× their time.)
pub const SHARED_RUN_BYTES: usize = 2 << 20;
/// Fewest keys per dot-product tile: below 8, per-tile overheads outweigh the TLB reach
/// (4 keys measured 1.16× slower than 8 on W4).
const DOT_MIN_K_TILE: usize = 8;
/// How far (base-2 units) a tile's max may exceed the running max before O is rescaled: 8, as
/// in FlashAttention-4, keeps every probability below 256.
const RESCALE_THRESHOLD: f32 = 8.0;

impl KernelPlan {
    /// Plans a kernel for a spec that [`crate::validate()`] accepted, for `target`, in the
    /// first form it compiles ([`Form::compiled`]: absorbed for a latent spec that leaves the
    /// choice to each call).
    pub fn new(spec: &AttentionSpec, target: Target) -> KernelPlan {
        KernelPlan::with_form(spec, Form::compiled(spec)[0], target)
    }

    /// Every plan a kernel for `spec` compiles for `target`, one per [`Form::compiled`].
    pub fn all(spec: &AttentionSpec, target: Target) -> Vec<KernelPlan> {
        let forms = Form::compiled(spec).into_iter();
        forms.map(|form| KernelPlan::with_form(spec, form, target)).collect()
    }

    /// Plans a kernel for a validated spec in `form`, one of [`Form::compiled`]'s for it, for
    /// `target`.
    pub fn with_form(spec: &AttentionSpec, form: Form, target: Target) -> KernelPlan {
        let (groups, acc_dim) = match (&spec.kv, form) {
            (KvLayout::Grouped { kv_heads, .. }, _) => {
                let mut groups = vec![Vec::new(); *kv_heads];
                for h in 0..spec.q_heads {
                    groups[spec.kv_head_of(h)].push(h);
                }
                (groups, spec.v_head_dim)
            }
            (KvLayout::Latent(l), Form::LatentAbsorbed) => {
                (vec![(0..spec.q_heads).collect()], l.rank)
            }
            (KvLayout::Latent(_), _) => {
                ((0..spec.q_heads).map(|h| vec![h]).collect(), spec.v_head_dim)
            }
        };
        let expanded = form == Form::LatentExpanded;
        let head_map = match &spec.kv {
            KvLayout::Grouped { group_map: GroupMap::Explicit(_), .. } => HeadMap::Table,
            KvLayout::Grouped { kv_heads, group_map: GroupMap::Interleaved, .. } => {
                HeadMap::Interleaved { groups: *kv_heads }
            }
            _ => HeadMap::Contiguous { size: groups[0].len() },
        };
        let largest_group = groups.iter().map(Vec::len).max().unwrap_or(1);
        let q_tile = (TARGET_ROWS / largest_group).max(1);
        let rows = q_tile * largest_group;
        let padded_rows = rows.next_multiple_of(ROW_MULTIPLE);
        let k_tile = K_TILE;
        // Latent keys and values are read in place: c_kv rows are contiguous (packing them
        // into panels measured 14% slower on W5).
        let pack_per_item = matches!(spec.kv, KvLayout::Grouped { kv_heads, .. } if kv_heads > 1);
        let (query_width, rope, key_width, value_width) = match &spec.kv {
            KvLayout::Latent(_) if expanded => (spec.head_dim(), 0, 0, 0),
            KvLayout::Latent(l) => (l.rank, l.rope_dim, 0, 0),
            KvLayout::Grouped { head_dim, .. } if pack_per_item => {
                (*head_dim, 0, *head_dim, spec.v_head_dim)
            }
            KvLayout::Grouped { head_dim, .. } => (*head_dim, 0, 0, 0),
        };
        let scores = 0;
        let keys = scores + k_tile * padded_rows;
        let values = keys + k_tile * key_width;
        let ranges = values + ScratchLayout::panels(k_tile, value_width);
        let queries = 0;
        let rope_queries = queries + ScratchLayout::panels(query_width, padded_rows);
        let query_rows = rope_queries + ScratchLayout::panels(rope, padded_rows);
        let dot_max_rows = if form == Form::Grouped { DOT_MAX_ROWS } else { 0 };
        let dot_k_tile = dot_tile(spec, k_tile);
        let row_major = if dot_max_rows > 0 { padded_rows * query_width } else { 0 };
        let scratch = ScratchLayout {
            scores,
            queries,
            query_width,
            rope_queries,
            keys,
            values,
            ranges,
            tile_max: ranges + 2 * padded_rows,
            shared_len: (ranges + 3 * padded_rows).next_multiple_of(ALIGN_FLOATS),
            query_rows,
            group_len: (query_rows + row_major).next_multiple_of(ALIGN_FLOATS),
        };
        let call_packing = match &spec.kv {
            KvLayout::Grouped { kv_heads, head_dim, .. } => Some(CallPacking {
                k_tile,
                kv_heads: *kv_heads,
                key_width: *head_dim,
                value_width: spec.v_head_dim,
                up_projected: false,
            }),
            KvLayout::Latent(_) if expanded => Some(CallPacking {
                k_tile,
                kv_heads: spec.q_heads,
                key_width: spec.head_dim(),
                value_width: spec.v_head_dim,
                up_projected: true,
            }),
            KvLayout::Latent(_) => None,
        };
        let scale = spec.effective_scale();
        let log2e = std::f64::consts::LOG2_E;
        let query_factor = if spec.softcap.is_some() { scale } else { scale * log2e };
        KernelPlan {
            spec: spec.clone(),
            target,
            form,
            groups,
            head_map,
            q_heads: spec.q_heads,
            q_width: spec.head_dim(),
            q_tile,
            k_tile,
            dot_k_tile,
            rows,
            padded_rows,
            row_multiple: ROW_MULTIPLE,
            acc_dim,
            scale: scale as f32,
            query_factor: query_factor as f32,
            rescale_threshold: RESCALE_THRESHOLD,
            max_partials: crate::abi::MAX_PARTIALS,
            routine_tile_max: spec.softcap.is_none(),
            call_packing,
            shared_run_keys: match call_packing {
                Some(packing) => {
                    let key_bytes = packing.key_floats() * size_of::<f32>();
                    (SHARED_RUN_BYTES / key_bytes / k_tile).max(1) * k_tile
                }
                None => usize::MAX,
            },
            pack_per_item,
            pack_min_rows: 16,
            dot_max_rows,
            min_keys_per_split: 256,
            scratch,
            state: StateLayout {
                o_row: acc_dim,
                transposed: form == Form::LatentAbsorbed && target.transposed_latent_output,
                m: padded_rows * acc_dim,
                l: padded_rows * (acc_dim + 1),
            },
            state_len: (padded_rows * (acc_dim + 2)).next_multiple_of(ALIGN_FLOATS),
        }
    }

    /// Splits a call of `seq_q` queries and `seq_k` keys per sequence into work items for
    /// `threads` threads: every (batch, block of groups, query tile) is a task; when there are
    /// too few tasks to keep the threads busy (decode), each task's keys are split and the
    /// partial results merged by log-sum-exp.
    ///
    /// A task covers one group, unless its items would have too few rows to pack K/V tiles
    /// (decode): then it covers every group, so an item walks whole cache rows — all KV heads
    /// of a token, a page — instead of one head's slice of a page per token, which costs a
    /// page walk per key and defeats the hardware prefetchers.
    pub fn schedule(&self, batch: usize, seq_q: usize, seq_k: usize, threads: usize) -> Schedule {
        let q_tiles = seq_q.div_ceil(self.q_tile);
        let largest_group = self.groups.iter().map(Vec::len).max().unwrap_or(1);
        let rows = seq_q.min(self.q_tile) * largest_group;
        // An expanded MLA task up-projects one head's keys: its items cover that head alone.
        let few_rows = rows < self.pack_min_rows && self.form != Form::LatentExpanded;
        let groups_per_item = if few_rows { self.groups.len() } else { 1 };
        let tasks = batch * (self.groups.len() / groups_per_item) * q_tiles;
        let threads = threads.max(1);
        let wanted = (4 * threads).div_ceil(tasks.max(1));
        // As many work units on every thread: 3 tasks on 2 threads split 4 ways, not 3 (9
        // units would leave one thread a unit of work alone at the end).
        let balanced = (wanted..wanted + threads).find(|s| (tasks * s).is_multiple_of(threads));
        let affordable = (seq_k / self.min_keys_per_split).max(1);
        let splits = balanced.unwrap_or(wanted).min(affordable).max(1);
        let keys_per_split = seq_k.div_ceil(splits).max(1);
        // Every query tile of a prefill item would copy the same K/V tiles: pack them once.
        let packs_call = self.form == Form::Grouped && groups_per_item == 1 && q_tiles > 1;
        let plain = Schedule {
            q_tiles,
            groups_per_item,
            splits,
            keys_per_split,
            keys_per_run: keys_per_split,
            packs_call,
        };
        let shared = self.call_packing.filter(|_| packs_call || self.form == Form::LatentExpanded);
        match shared {
            Some(packing) if keys_per_split > self.shared_run_keys => {
                let heads = batch * self.groups.len();
                self.shared_runs(plain, packing, heads, seq_k, threads)
            }
            // Shared keys split into whole tiles, so no two splits pack the same tile.
            Some(_) if splits > 1 => {
                let keys_per_split = keys_per_split.next_multiple_of(self.k_tile);
                let splits = seq_k.div_ceil(keys_per_split);
                Schedule { splits, keys_per_split, keys_per_run: keys_per_split, ..plain }
            }
            _ => plain,
        }
    }

    /// The schedule of a task whose query tiles re-read the same packed keys, over a range
    /// longer than [`KernelPlan::shared_run_keys`]: its keys go in runs of at most that many,
    /// each packed once and kept in cache while every query tile reads it, and the query tiles'
    /// states carry from one run to the next (`ItemFn`'s `resume`). The range splits only so
    /// that the `heads` tasks keep the threads busy, and only while the splits' states (a slot
    /// per query tile each) weigh no more than the packed range: otherwise `plain` stands, a
    /// copy of the whole range re-read by every tile.
    fn shared_runs(
        &self,
        plain: Schedule,
        packing: CallPacking,
        heads: usize,
        seq_k: usize,
        threads: usize,
    ) -> Schedule {
        let runs = seq_k.div_ceil(self.shared_run_keys);
        let keys_per_run = seq_k.div_ceil(runs).next_multiple_of(self.k_tile);
        let runs = seq_k.div_ceil(keys_per_run);
        // Splits whose states together weigh no more than the range's packed keys and values.
        let states_floats = plain.q_tiles.saturating_mul(self.state_len);
        let fewest_keys = states_floats.div_ceil(packing.key_floats()).max(1);
        let most = (seq_k / fewest_keys).min(runs);
        if most == 0 {
            return plain;
        }
        // Enough tasks for every thread, as many on each when that fits.
        let wanted = threads.div_ceil(heads.max(1));
        let even = |s: &usize| (heads * s).is_multiple_of(threads);
        let splits = match (wanted..=most).find(even) {
            Some(splits) => splits,
            None => (1..=most.min(wanted)).rev().find(even).unwrap_or(most.min(wanted)),
        };
        let keys_per_split = runs.div_ceil(splits) * keys_per_run;
        Schedule { splits: seq_k.div_ceil(keys_per_split), keys_per_split, keys_per_run, ..plain }
    }

    /// Whether a work item walking tiles of `keys` keys prefetches the next tile whole, in
    /// address order, a share per group — a tile's K and V cache rows, every KV head, span at
    /// most [`DOT_TILE_PAGES`] pages — rather than the rows the next group reads (see
    /// `abi::PrefetchRows`). A larger whole tile would be a second tile in flight beside the
    /// current one, past L1 and the TLB. (Items of one group read the same rows either way.)
    pub fn prefetches_whole_tiles(&self, keys: usize) -> bool {
        keys.saturating_mul(grouped_row_bytes(&self.spec)) <= DOT_TILE_PAGES * PAGE
    }

    /// Expanded MLA's transposed weights (`CallArgs::weights_t`): per head, `W_UK[h]ᵀ` then
    /// `W_UV[h]ᵀ`, each `rank` rows deep in [`PANEL`]-column panels — the B operand of the
    /// up-projection's broadcast product. `(floats per head, offset of W_UV[h]ᵀ)`; `None` for
    /// other forms.
    pub fn transposed_weights(&self) -> Option<(usize, usize)> {
        match &self.spec.kv {
            KvLayout::Latent(l) if self.form == Form::LatentExpanded => {
                let keys = ScratchLayout::panels(l.rank, l.nope_dim);
                Some((keys + ScratchLayout::panels(l.rank, self.spec.v_head_dim), keys))
            }
            _ => None,
        }
    }

    /// Floats of each of absorbed MLA's call buffers `latent_q` and `latent_out`
    /// ([`crate::abi::CallArgs`]), `B × Sq × H × rank`: 0 for grouped specs, `None` when the
    /// count overflows `usize`.
    pub fn latent_len(&self, batch: usize, seq_q: usize) -> Option<usize> {
        match &self.spec.kv {
            KvLayout::Latent(l) if self.form == Form::LatentAbsorbed => {
                [seq_q, self.spec.q_heads, l.rank].into_iter().try_fold(batch, usize::checked_mul)
            }
            _ => Some(0),
        }
    }

    /// Where a work item's rows of `tensor` lie in the cache. Only the tensors of the spec's
    /// kind have rows: `None` for the others.
    pub fn cache_row(&self, tensor: CacheTensor) -> Option<CacheRow> {
        let spec = &self.spec;
        let (width, stride) = match (&spec.kv, tensor) {
            (KvLayout::Grouped { head_dim, kv_heads, .. }, CacheTensor::K) => {
                (*head_dim, kv_heads * head_dim)
            }
            (KvLayout::Grouped { kv_heads, .. }, CacheTensor::V) => {
                (spec.v_head_dim, kv_heads * spec.v_head_dim)
            }
            (KvLayout::Latent(l), CacheTensor::CKv) => (l.rank, l.row_stride(l.rank)),
            (KvLayout::Latent(l), CacheTensor::KRope) => (l.rope_dim, l.row_stride(l.rope_dim)),
            _ => return None,
        };
        Some(CacheRow { width, stride })
    }

    /// FLOPs per (query, key) pair per head the kernel actually does (absorbed MLA attends over
    /// `rank + rope_dim` and accumulates `rank`-wide values).
    pub fn flops_per_pair(&self) -> u64 {
        match &self.spec.kv {
            KvLayout::Latent(l) if self.form == Form::LatentAbsorbed => {
                2 * (2 * l.rank + l.rope_dim) as u64
            }
            _ => 2 * (self.spec.head_dim() + self.spec.v_head_dim) as u64,
        }
    }

    /// The keys of a sequence of `keys` keys that some query of the call sees, as a range of
    /// whole `k_tile` tiles' keys (ending at `keys`): what an expanded MLA task up-projects.
    /// Queries are bottom-right aligned (semantics §3): the last sees keys up to `keys`, and
    /// under a sliding window the first sees none before `keys − seq_q − W + 1`.
    pub fn visible_keys(&self, seq_q: usize, keys: usize) -> std::ops::Range<usize> {
        let first = match self.spec.mask {
            Mask::SlidingWindow(w) => (keys + 1).saturating_sub(seq_q.saturating_add(w)),
            Mask::None | Mask::Causal => 0,
        };
        let first = first / self.k_tile * self.k_tile;
        first.min(keys)..keys
    }

    /// The keys a run (or split) over `k_lo..k_hi` packs for its items, from the start of a key
    /// tile: those the call's `seq_q` queries see ([`KernelPlan::visible_keys`] of a sequence
    /// of `keys` keys) within the range, or an empty range at a tile start within the sequence
    /// when they see none there (a run past a shorter sequence's end).
    pub fn packed_keys(
        &self,
        seq_q: usize,
        keys: usize,
        k_lo: usize,
        k_hi: usize,
    ) -> std::ops::Range<usize> {
        let visible = self.visible_keys(seq_q, keys);
        let (start, end) = (k_lo.max(visible.start), k_hi.min(visible.end));
        let first = start.min(end) / self.k_tile * self.k_tile;
        first..if start < end { end } else { first }
    }
}

/// How one call is divided into work items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Query tiles per sequence.
    pub q_tiles: usize,
    /// Groups each work item covers: 1, or all of them (decode).
    pub groups_per_item: usize,
    /// Key splits per task (1: no split).
    pub splits: usize,
    /// Keys per split (the last may have fewer).
    pub keys_per_split: usize,
    /// Keys per run of a split whose query tiles share packed keys: each run is packed once and
    /// every query tile's item runs over it, resuming its state, before the next
    /// ([`KernelPlan::schedule`]). Otherwise `keys_per_split`: one run per split.
    pub keys_per_run: usize,
    /// Pack grouped K/V once for all the query tiles that read it ([`KernelPlan::call_packing`]):
    /// each KV head's keys for the call, or, when the keys are divided, each run's, instead of
    /// per item.
    pub packs_call: bool,
}

impl Schedule {
    /// Whether a task's keys are divided — into several splits, or a split into several runs —
    /// rather than read whole by each of its items.
    pub fn divides_keys(&self) -> bool {
        self.splits > 1 || self.keys_per_run < self.keys_per_split
    }

    /// The keys `k_lo..k_hi` of split `split` of a call whose longest sequence has `longest`.
    pub fn split(&self, split: usize, longest: usize) -> (usize, usize) {
        let k_lo = split * self.keys_per_split;
        (k_lo, (k_lo + self.keys_per_split).min(longest))
    }

    /// The runs of the keys `k_lo..k_hi` of a split, `keys_per_run` each (the last may have
    /// fewer): at least one, so every state of the split is started even when it sees no key.
    pub fn runs(&self, k_lo: usize, k_hi: usize) -> impl Iterator<Item = (usize, usize)> {
        let per_run = self.keys_per_run;
        let count = k_hi.saturating_sub(k_lo).div_ceil(per_run).max(1);
        (0..count).map(move |run| {
            let lo = k_lo + run * per_run;
            (lo, (lo + per_run).min(k_hi))
        })
    }
}

impl fmt::Display for KernelPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = &self.spec;
        writeln!(f, "plan for {}", spec.name.as_deref().unwrap_or("(unnamed spec)"))?;
        writeln!(f, "  variant      {}", spec.summary())?;
        match self.form {
            Form::Grouped => writeln!(
                f,
                "  form         grouped: K/V read in place; the query heads of a KV head share each K/V tile"
            )?,
            Form::LatentAbsorbed => writeln!(
                f,
                "  form         absorbed MLA: q' = q_nope·W_UK[h]; one latent KV head of dim {} + {} \
                 shared by all {} heads; out = o'·W_UV[h]ᵀ (both per head over the whole call, so \
                 each head's weights are read once per call)",
                self.acc_dim,
                spec.head_dim() - spec_nope(spec),
                spec.q_heads
            )?,
            Form::LatentExpanded => writeln!(
                f,
                "  form         expanded MLA: per (batch, head) task, its visible keys up-projected {} at a time, K_h = [c_kv·W_UK[h]ᵀ, k_rope] ({} wide) and V_h = c_kv·W_UV[h]ᵀ ({} wide), into the task's own buffer, which all its query tiles read",
                self.k_tile,
                spec.head_dim(),
                spec.v_head_dim
            )?,
        }
        let sizes: Vec<String> = self.groups.iter().map(|g| g.len().to_string()).collect();
        writeln!(
            f,
            "  groups       {} (query heads per group: {})",
            self.groups.len(),
            sizes.join(",")
        )?;
        writeln!(
            f,
            "  tiles        {} queries x {} keys; up to {} rows per tile (the group's heads x queries, packed)",
            self.q_tile, self.k_tile, self.rows
        )?;
        if self.form == Form::Grouped {
            let items = if self.pack_per_item {
                format!(
                    "else by each work item with >= {} rows (cache rows are {} floats apart)",
                    self.pack_min_rows,
                    spec.kv_heads() * spec.head_dim()
                )
            } else {
                "else read in place (contiguous rows)".to_owned()
            };
            writeln!(
                f,
                "  kv tiles     packed (values into {PANEL}-column panels) once per call when it has several query tiles, {items}"
            )?;
        }
        let mask = match spec.mask {
            Mask::None => "none: every tile full".to_owned(),
            Mask::Causal => "causal: tiles right of the last query's diagonal skipped, diagonal tiles masked by index".to_owned(),
            Mask::SlidingWindow(w) => format!(
                "sliding window {w}: tiles outside the band skipped, edge tiles masked by index"
            ),
        };
        writeln!(f, "  mask         {mask}")?;
        write!(f, "  score        s = {} * (q.k)", self.scale)?;
        if let Some(c) = spec.softcap {
            write!(f, ", then s = {c} * tanh(s / {c})")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  softmax      base 2: queries packed transposed and pre-multiplied by {}{}; O rescaled only when a tile's max exceeds m by {}; the tile max in {} partial maxima{}",
            self.query_factor,
            match spec.softcap {
                Some(c) => format!(" (= scale); s = log2 e * {c} * tanh(S / {c})"),
                None => " (= scale * log2 e)".to_owned(),
            },
            self.rescale_threshold,
            self.max_partials,
            match self.routine_tile_max {
                true => {
                    ", on whole tiles (not few-row items' narrow ones) by a pre-compiled routine at the ISA's width"
                }
                false => ", generated (the cap comes first)",
            }
        )?;
        writeln!(
            f,
            "  decode       items with < {} rows cover every group (whole cache rows); keys split across threads when tasks are few (at least {} keys per split), merged by log-sum-exp",
            self.pack_min_rows, self.min_keys_per_split
        )?;
        if self.shared_run_keys != usize::MAX {
            writeln!(
                f,
                "  long keys    query tiles sharing packed K/V read them in runs of at most {} keys ({} MiB), each packed once by its task's thread and kept in cache while every tile reads it, each tile's state carried from run to run; split across threads only when the tasks are fewer, merged by log-sum-exp",
                self.shared_run_keys,
                SHARED_RUN_BYTES >> 20
            )?;
        }
        if self.dot_max_rows > 0 {
            writeln!(
                f,
                "  few rows     items with <= {} rows compute scores as dot products of key rows with query rows; reading the cache in place, they take {} keys per tile (K and V rows of a tile within {DOT_TILE_PAGES} pages, the L1 TLB's reach)",
                self.dot_max_rows, self.dot_k_tile
            )?;
        }
        if matches!(spec.kv, KvLayout::Grouped { kv_heads, .. } if kv_heads > 1) {
            let ahead = |keys| match self.prefetches_whole_tiles(keys) {
                true => "a share of the next tile",
                false => "the rows the next group reads",
            };
            let mut tiles = vec![self.k_tile];
            tiles.extend((self.dot_k_tile < self.k_tile).then_some(self.dot_k_tile));
            let tiles: Vec<String> =
                tiles.into_iter().map(|t| format!("{t}-key tiles: {}", ahead(t))).collect();
            writeln!(
                f,
                "  prefetch     a KV head's cache rows are strided (a whole token row apart); each group's tile products prefetch, on {}",
                tiles.join("; ")
            )?;
        }
        writeln!(
            f,
            "  scratch      {} floats per work item (+ {} per extra group); state {} floats per group and split",
            self.scratch.len(1),
            self.scratch.group_len,
            self.state_len
        )?;
        let output = match self.state.transposed {
            true => {
                "O kept transposed in the key loop (Oᵀ += c_kvᵀ·Pᵀ: the latent broadcast, the heads' rows as the vectors), row-major again for the finish"
            }
            false => "O row-major",
        };
        writeln!(
            f,
            "  target       {} ({} f32 lanes): {output}",
            self.target.name, self.target.lanes
        )?;
        write!(
            f,
            "  cost         {} FLOP per (query, key, head); cache {} B per token",
            self.flops_per_pair(),
            cost::cache_bytes_per_token(spec)
        )
    }
}

/// Keys per tile of a dot-product item ([`KernelPlan::dot_k_tile`]): the largest power of two
/// whose K and V cache rows span at most [`DOT_TILE_PAGES`] pages, within
/// `DOT_MIN_K_TILE..=k_tile`. Latent specs have no dot-product items: `k_tile`.
fn dot_tile(spec: &AttentionSpec, k_tile: usize) -> usize {
    if matches!(spec.kv, KvLayout::Latent(_)) {
        return k_tile;
    }
    let fits = (DOT_TILE_PAGES * PAGE / grouped_row_bytes(spec).max(1)).max(1);
    let power = 1 << fits.ilog2();
    power.clamp(DOT_MIN_K_TILE, k_tile)
}

/// Bytes of one token's K and V cache rows, every KV head (0 for latent specs).
fn grouped_row_bytes(spec: &AttentionSpec) -> usize {
    match spec.kv {
        KvLayout::Grouped { kv_heads, head_dim, .. } => kv_heads * (head_dim + spec.v_head_dim) * 4,
        KvLayout::Latent(_) => 0,
    }
}

fn spec_nope(spec: &AttentionSpec) -> usize {
    match &spec.kv {
        KvLayout::Latent(l) => l.nope_dim,
        KvLayout::Grouped { head_dim, .. } => *head_dim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::GroupMap;

    /// Only absorbed MLA on AVX2 keeps its running output transposed; the plan records the
    /// target it was made for.
    #[test]
    fn the_target_decides_the_latent_output_layout() {
        let mla = AttentionSpec::mla(16, 512, 64, 128, 128);
        for target in [Target::AVX512, Target::AVX2, Target::NEON, Target::PORTABLE] {
            let layouts: Vec<(Form, bool)> = KernelPlan::all(&mla, target)
                .iter()
                .map(|plan| (plan.form, plan.state.transposed))
                .collect();
            let absorbed = target == Target::AVX2;
            assert_eq!(
                layouts,
                [(Form::LatentAbsorbed, absorbed), (Form::LatentExpanded, false)],
                "{target:?}"
            );
            let grouped = KernelPlan::new(&AttentionSpec::gqa(8, 2, 16), target);
            assert_eq!((grouped.target, grouped.state.transposed), (target, false));
        }
    }

    #[test]
    fn groups_pack_the_heads_of_each_kv_head() {
        let plan = KernelPlan::new(&AttentionSpec::gqa(8, 2, 16), Target::AVX2);
        assert_eq!(plan.groups, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!((plan.q_tile, plan.rows), (16, 64));
        let spec = AttentionSpec::gqa(5, 3, 8).group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2]));
        let plan = KernelPlan::new(&spec, Target::AVX2);
        assert_eq!(plan.groups, vec![vec![1, 2], vec![3], vec![0, 4]]);
        assert_eq!(plan.rows, plan.q_tile * 2);
        let mla = KernelPlan::new(&AttentionSpec::mla(16, 512, 64, 128, 128), Target::AVX2);
        assert_eq!(
            (mla.form, mla.groups.len(), mla.q_tile, mla.acc_dim),
            (Form::LatentAbsorbed, 1, 4, 512)
        );
    }

    #[test]
    fn head_maps_and_cache_rows_resolve_the_spec_for_the_emitters() {
        let contiguous = KernelPlan::new(&AttentionSpec::gqa(8, 2, 16), Target::AVX2);
        assert_eq!(contiguous.head_map, HeadMap::Contiguous { size: 4 });
        let interleaved = KernelPlan::new(
            &AttentionSpec::gqa(8, 2, 16).group_map(GroupMap::Interleaved),
            Target::AVX2,
        );
        assert_eq!(interleaved.head_map, HeadMap::Interleaved { groups: 2 });
        let explicit =
            AttentionSpec::gqa(5, 3, 8).group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2]));
        assert_eq!(KernelPlan::new(&explicit, Target::AVX2).head_map, HeadMap::Table);
        // Grouped rows are one KV head's slice of a token's row of every KV head.
        let row = contiguous.cache_row(CacheTensor::V);
        assert_eq!(row, Some(CacheRow { width: 16, stride: 32 }));
        assert_eq!(contiguous.cache_row(CacheTensor::CKv), None);
        let mla = KernelPlan::new(&AttentionSpec::mla(16, 512, 64, 128, 128), Target::AVX2);
        assert_eq!(mla.head_map, HeadMap::Contiguous { size: 16 });
        assert_eq!(mla.cache_row(CacheTensor::KRope), Some(CacheRow { width: 64, stride: 64 }));
        assert_eq!((mla.q_heads, mla.q_width), (16, 192));
    }

    #[test]
    fn decode_splits_only_when_tasks_are_few() {
        let gqa = KernelPlan::new(&AttentionSpec::gqa(32, 8, 128), Target::AVX2);
        // Decode items cover all 8 groups: 4 tasks, so each is split in two.
        let s = gqa.schedule(4, 1, 4096, 2);
        assert_eq!((s.groups_per_item, s.splits, s.packs_call), (8, 2, false));
        // Prefill items cover one group: 8 groups x 16 query tiles keep 2 threads busy, and
        // K/V are packed once for all 16 query tiles.
        let s = gqa.schedule(1, 256, 256, 2);
        assert_eq!((s.groups_per_item, s.q_tiles, s.splits, s.packs_call), (1, 16, 1, true));
        let mla = KernelPlan::new(&AttentionSpec::mla(16, 512, 64, 128, 128), Target::AVX2);
        let s = mla.schedule(1, 1, 4096, 2);
        assert_eq!((s.splits, s.keys_per_split), (8, 512));
        assert_eq!(mla.schedule(1, 1, 300, 2).splits, 1); // too few keys to split
        // 3 tasks on 2 threads: 4 splits each, so both threads get 6 units.
        assert_eq!(gqa.schedule(3, 1, 32768, 2).splits, 4);
        assert_eq!(gqa.schedule(3, 1, 32768, 3).splits, 4);
        assert_eq!(gqa.schedule(5, 1, 32768, 4).splits, 4);
    }

    #[test]
    fn prefill_runs_keep_their_shared_packed_keys_in_cache() {
        let lite = AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal);
        let plan = KernelPlan::with_form(&lite, Form::LatentExpanded, Target::AVX512);
        // 192 key floats and a 144-float value row per key: 1344 bytes, 1536 keys in 2 MiB.
        assert_eq!(plan.shared_run_keys, 1536);
        // 16 (batch, head) tasks keep 2 threads busy: one split, 22 runs of 1536 keys.
        let s = plan.schedule(1, 1024, 32768, 2);
        assert_eq!((s.splits, s.keys_per_split, s.keys_per_run, s.q_tiles), (1, 33792, 1536, 16));
        // W6 and shorter ranges stay whole.
        assert!(!plan.schedule(1, 1024, 1024, 2).divides_keys());
        assert!(!plan.schedule(1, 1000, 1536, 2).divides_keys());
        // Fewer tasks than threads: whole runs in as many splits as give every thread the
        // same number of tasks (16 heads, 32 threads: 2 splits of 11 runs).
        let s = plan.schedule(1, 1024, 32768, 32);
        assert_eq!((s.splits, s.keys_per_split, s.keys_per_run), (2, 16896, 1536));
        // No run packs more than the cap; runs are whole key tiles, and splits whole runs;
        // the splits cover every key, and none is empty.
        for seq_k in (1537..40_000).step_by(997) {
            for threads in [2, 7, 32, 64] {
                let s = plan.schedule(2, 300, seq_k, threads);
                assert!(s.keys_per_run <= 1536, "{s:?}");
                if s.splits > 1 {
                    assert!(s.keys_per_run.is_multiple_of(64), "{s:?}");
                }
                assert!(s.keys_per_split.is_multiple_of(s.keys_per_run), "{s:?}");
                assert!(s.splits * s.keys_per_split >= seq_k);
                assert!((s.splits - 1) * s.keys_per_split < seq_k, "{seq_k}: {s:?}");
                // Each split's runs cover its keys in order, none empty.
                let mut next = 0;
                for split in 0..s.splits {
                    let (k_lo, k_hi) = s.split(split, seq_k);
                    assert_eq!(k_lo, next);
                    for (lo, hi) in s.runs(k_lo, k_hi) {
                        assert!(lo == next && lo < hi && hi - lo <= s.keys_per_run, "{s:?}");
                        next = hi;
                    }
                }
                assert_eq!(next, seq_k);
            }
        }
        // A call-packed grouped prefill: 128 key and 128 value floats per key.
        let llama = KernelPlan::new(&AttentionSpec::gqa(32, 8, 128), Target::AVX2);
        assert_eq!(llama.shared_run_keys, 2048);
        let s = llama.schedule(1, 1024, 32768, 2);
        assert_eq!(
            (s.packs_call, s.splits, s.keys_per_split, s.keys_per_run),
            (true, 1, 32768, 2048)
        );
        assert!(!llama.schedule(1, 1024, 1024, 2).divides_keys());
        // A long prefill whose query tiles' states outweigh the packed keys (2048 tiles of
        // 8320 floats against 32768 keys of 256) reads one packed copy instead.
        assert!(!llama.schedule(1, 32768, 32768, 2).divides_keys());
        // MQA's one KV head splits in two for two threads, but no further: its 256 query
        // tiles' states weigh as much as 8320 keys, so at most 3 splits fit 32768 keys.
        let mqa = KernelPlan::new(&AttentionSpec::mqa(16, 128), Target::AVX512);
        let s = mqa.schedule(1, 1024, 32768, 2);
        assert_eq!((s.q_tiles, s.splits, s.keys_per_split, s.keys_per_run), (256, 2, 16384, 2048));
        assert_eq!(mqa.schedule(1, 1024, 32768, 8).splits, 3);
        // Decode items read the cache in place: split only for the threads' sake.
        let s = llama.schedule(1, 1, 32768, 2);
        assert_eq!((s.packs_call, s.splits), (false, 8));
        // Absorbed MLA reads the latent in place: not capped.
        let absorbed = KernelPlan::with_form(&lite, Form::LatentAbsorbed, Target::AVX512);
        assert_eq!(absorbed.shared_run_keys, usize::MAX);
        assert_eq!(absorbed.schedule(1, 1024, 32768, 2).splits, 1);
    }

    #[test]
    fn latent_buffers_hold_every_row_of_the_call() {
        let mla = KernelPlan::new(&AttentionSpec::mla(16, 512, 64, 128, 128), Target::AVX2);
        assert_eq!(mla.latent_len(4, 3), Some(4 * 3 * 16 * 512));
        assert_eq!(mla.latent_len(usize::MAX / 1024, 2), None);
        assert_eq!(
            KernelPlan::new(&AttentionSpec::gqa(8, 2, 16), Target::AVX2).latent_len(4, 3),
            Some(0)
        );
    }

    #[test]
    fn dot_tiles_keep_a_tile_within_the_tlb_reach() {
        let tile = |spec: AttentionSpec| KernelPlan::new(&spec, Target::AVX2).dot_k_tile;
        // Llama-3-8B: K and V rows of 4 KiB each, so 8 keys span 16 pages.
        assert_eq!(tile(AttentionSpec::gqa(32, 8, 128)), 8);
        // Small rows: 2 KV heads of 64 (1 KiB per token) fit 64 keys.
        assert_eq!(tile(AttentionSpec::gqa(8, 2, 64)), 64);
        // 8 KiB rows would allow 4 keys; tiles never drop below 8.
        assert_eq!(tile(AttentionSpec::gqa(16, 8, 256)), 8);
        // 3 KV heads of 40: 960 B per token, 68 keys fit, the tile stays at 64.
        assert_eq!(tile(AttentionSpec::gqa(6, 3, 40)), 64);
        // Latent specs have no dot-product items.
        assert_eq!(tile(AttentionSpec::mla(16, 512, 64, 128, 128)), K_TILE);
    }

    #[test]
    fn whole_next_tiles_are_prefetched_only_within_the_tlb_reach() {
        // Llama-3-8B: the 8-key dot tile spans 16 pages, a 64-key tile 128.
        let llama = KernelPlan::new(&AttentionSpec::gqa(32, 8, 128), Target::AVX2);
        assert!(llama.prefetches_whole_tiles(llama.dot_k_tile));
        assert!(!llama.prefetches_whole_tiles(llama.k_tile));
        // 8 KiB rows: even the smallest dot tile (8 keys) spans 32 pages.
        let wide = KernelPlan::new(&AttentionSpec::gqa(16, 8, 256), Target::AVX2);
        assert!(!wide.prefetches_whole_tiles(wide.dot_k_tile));
        // 2 KV heads of 64: a whole 64-key tile spans 16 pages.
        let narrow = KernelPlan::new(&AttentionSpec::gqa(8, 2, 64), Target::AVX2);
        assert!(narrow.prefetches_whole_tiles(narrow.k_tile));
    }

    #[test]
    fn the_call_packing_addresses_what_its_lengths_hold() {
        let plan = KernelPlan::new(&AttentionSpec::gqa(8, 2, 16).v_head_dim(20), Target::AVX2);
        let packing = plan.call_packing.unwrap();
        assert_eq!(
            packing,
            CallPacking {
                k_tile: 64,
                kv_heads: 2,
                key_width: 16,
                value_width: 20,
                up_projected: false
            }
        );
        // Keys 128..230: two tiles; V tiles are 2 panels of 16 columns, 64 deep.
        assert_eq!(packing.lens(128, 230), (2 * 64 * 16, 2 * 2 * 16 * 64));
        assert_eq!(
            (packing.value_tile(), packing.value_row(), packing.value_panel()),
            (2048, 16, 1024)
        );
        assert_eq!(packing.lens(128, 128), (0, 0));
        assert_eq!(
            KernelPlan::new(&AttentionSpec::mla(4, 32, 8, 16, 12), Target::AVX2).call_packing,
            None
        );
    }

    #[test]
    fn expanded_mla_plans_one_head_per_group_over_each_task_s_own_copy() {
        let spec = AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal);
        let forms: Vec<Form> =
            KernelPlan::all(&spec, Target::AVX2).iter().map(|plan| plan.form).collect();
        assert_eq!(forms, [Form::LatentAbsorbed, Form::LatentExpanded]);
        let forced = spec.clone().mla_form(MlaForm::Expanded);
        assert_eq!(Form::compiled(&forced), [Form::LatentExpanded]);
        let plan = KernelPlan::new(&forced, Target::AVX2);
        assert_eq!(
            (plan.form, plan.groups.len(), plan.q_tile, plan.acc_dim),
            (Form::LatentExpanded, 16, 64, 128)
        );
        assert_eq!(
            (plan.q_width, plan.scratch.query_width, plan.latent_len(4, 3)),
            (192, 192, Some(0))
        );
        let packing = plan.call_packing.unwrap();
        assert!(packing.up_projected);
        // Values row-major: a 64-key tile is 64 rows of 128, rows 144 floats (9 lines) apart.
        assert_eq!(
            (packing.value_tile(), packing.value_row(), packing.value_panel()),
            (64 * 144, 144, 16)
        );
        // Rows of an odd number of lines keep their width; others gain a line.
        let row = |value_width| CallPacking { value_width, ..packing }.value_row();
        assert_eq!((row(8), row(16), row(40), row(48), row(64)), (16, 16, 48, 48, 80));
        assert_eq!(plan.flops_per_pair(), 2 * (192 + 128));
        // Decode items still cover one head: the task's buffer holds that head's keys.
        assert_eq!(plan.schedule(4, 1, 4096, 2).groups_per_item, 1);
    }

    #[test]
    fn visible_keys_are_whole_tiles_up_to_the_sequence_end() {
        let causal =
            KernelPlan::new(&AttentionSpec::mla(2, 8, 0, 8, 8).mask(Mask::Causal), Target::AVX2);
        assert_eq!(causal.visible_keys(3, 1000), 0..1000);
        assert_eq!(causal.visible_keys(3, 0), 0..0);
        let window = AttentionSpec::mla(2, 8, 0, 8, 8).mask(Mask::SlidingWindow(100));
        let plan = KernelPlan::new(&window, Target::AVX2);
        // The first of 10 queries sits at key 990 and sees 891..=990: from tile 832.
        assert_eq!(plan.visible_keys(10, 1000), 832..1000);
        assert_eq!(plan.visible_keys(2000, 1000), 0..1000);
        // A run packs from the tile holding its first visible key to its end or the
        // sequence's, and nothing past a sequence's end.
        assert_eq!(plan.packed_keys(10, 1000, 0, 500), 448..448);
        assert_eq!(plan.packed_keys(10, 1000, 500, 900), 832..900);
        assert_eq!(plan.packed_keys(10, 1000, 900, 1300), 896..1000);
        assert_eq!(plan.packed_keys(10, 600, 900, 1300), 576..576);
        assert_eq!(causal.packed_keys(3, 1000, 130, 500), 128..500);
    }

    /// Every scratch region, group block and state slot is a whole number of cache lines, so
    /// the runtime's line-aligned buffers keep each of them aligned, whatever the head sizes
    /// (odd widths, and the 60 rows of five-head groups, included).
    #[test]
    fn scratch_regions_and_state_slots_are_whole_cache_lines() {
        let specs = [
            AttentionSpec::gqa(32, 8, 128),
            AttentionSpec::gqa(6, 3, 33),
            AttentionSpec::gqa(10, 2, 33),
            AttentionSpec::gqa(8, 2, 16).v_head_dim(20),
            AttentionSpec::mha(3, 7),
            AttentionSpec::mla(16, 512, 64, 128, 128),
            AttentionSpec::mla(4, 48, 0, 16, 12),
            AttentionSpec::mla(3, 40, 8, 24, 20).mla_form(MlaForm::Expanded),
        ];
        for spec in specs {
            for plan in KernelPlan::all(&spec, Target::AVX2) {
                let l = plan.scratch;
                let offsets = [
                    ("scores", l.scores),
                    ("keys", l.keys),
                    ("values", l.values),
                    ("ranges", l.ranges),
                    ("shared_len", l.shared_len),
                    ("queries", l.queries),
                    ("rope_queries", l.rope_queries),
                    ("query_rows", l.query_rows),
                    ("group_len", l.group_len),
                    ("state_len", plan.state_len),
                ];
                for (name, floats) in offsets {
                    assert_eq!(floats % ALIGN_FLOATS, 0, "{name} of {spec:?} ({:?})", plan.form);
                }
            }
        }
    }
}
