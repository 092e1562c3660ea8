//! The kernel IR: a tile-level program, lowered from a [`KernelPlan`] and emitted by every
//! backend (`clif` for the JIT), so a schedule change lands in all of them at once.
//!
//! A kernel is two programs over one work item — a batch entry `b`, a block of KV groups
//! starting at `g0` (one group, or all of them for decode) and a query tile starting at `q0`:
//! - `item` runs the flash-attention loop over one key range (a whole sequence, or one decode
//!   split) and leaves the running state O, m, l of every row in a state slot;
//! - `finish` merges the state slots of a task's splits and writes `out` and `lse`.
//!
//! Absorbed MLA adds two programs over one query head and every (batch, query) row of the
//! call: `prologue` absorbs the queries (`q' = q_nope·W_UK[h]`) before the items, and
//! `epilogue` projects the latent output (`out = o'·W_UV[h]ᵀ`) after the finishes, so each
//! head's weights are read once per call rather than once per work item and split.
//!
//! Expanded MLA adds one program over a key tile of one (batch, head) task: `expand`
//! up-projects the tile's keys and values (`K_h = [c_kv·W_UK[h]ᵀ, k_rope]`, `V_h =
//! c_kv·W_UV[h]ᵀ`) into the task's buffer; the runtime runs it over the keys the call's
//! queries see, before the task's items, which read the buffer as a per-task packed copy.
//!
//! Every op works on whole tiles, for every head slot of the group: the ops name *what* happens
//! to a tile; the emitter decides how (generated vector loops, or a call to a tile micro-kernel).

use std::fmt;

use crate::plan::{CacheRow, CacheTensor, CallPacking, Form, KernelPlan, ScratchLayout};
use crate::spec::{KvLayout, Mask};

/// The programs of a kernel: two over a work item, and for absorbed MLA two over a query head.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelIr {
    /// Per query head, over the whole call, before the items (empty for grouped specs).
    pub prologue: Vec<Op>,
    /// The flash loop over one key range.
    pub item: Vec<Op>,
    /// Merge the splits, normalise, store.
    pub finish: Vec<Op>,
    /// Per query head, over the whole call, after the finishes (empty for grouped specs).
    pub epilogue: Vec<Op>,
    /// Per key tile of a (batch, head) task, before its items (expanded MLA; else empty).
    pub expand: Vec<Op>,
}

/// One tile-level operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Copy `factor · from[b, q0 + qi, h, offset..offset + len]` of every head of the group
    /// into the columns of a transposed, panel-packed scratch tile, so the group's heads become
    /// rows of one matrix. Columns past the item's rows are zero.
    PackQueries {
        /// `Q`, or the prologue's `LatentQ`.
        from: Operand,
        /// First element copied.
        offset: usize,
        /// Elements copied.
        len: usize,
        /// The scale folded into the queries (`KernelPlan::query_factor`).
        factor: f32,
        /// The scratch tile written.
        into: Operand,
        /// Items that compute scores as dot products also copy the same elements, scaled,
        /// row-major into that variant's query operand (rows past the item's zero).
        row_major: Option<DotScores>,
    },
    /// Copy the current key tile's rows of a cache tensor into scratch — keys row-major,
    /// values into column panels — in items whose group has at least `min_rows` rows and
    /// whose call did not pack K/V itself.
    PackTile {
        /// `K` or `V`.
        from: Operand,
        /// `KeyTile` or `ValueTile`.
        into: Operand,
        /// Row width.
        width: usize,
        /// Fewest rows for which the copy repays itself.
        min_rows: usize,
    },
    /// Absorbed MLA, prologue: `latent_q[.., h] = q_nope[.., h] · W_UK[h]` (`nope → rank`) for
    /// every (batch, query) row of the call, as one tile product.
    AbsorbQueries {
        /// Length of `q_nope`.
        nope: usize,
        /// Latent rank.
        rank: usize,
    },
    /// Run `body` for each group of the work item in turn, each with its own query tile and
    /// state. Inside the key loop this makes an item read all KV heads of a key tile before
    /// the next tile: whole cache rows, in order.
    ForEachGroup {
        /// Ops run per group.
        body: Vec<Op>,
    },
    /// `O = 0`, `l = 0`, and `m = f32::MIN` for every row: the most negative finite float,
    /// so `2^(m − m')` and `2^(s − m)` never see `−∞ − (−∞)`. Skipped when the item resumes
    /// (`abi::ItemFn`'s `resume`: a later run of a split's keys carries the state on).
    InitState,
    /// Loop over the key tiles of the item's key range that the mask leaves visible to some
    /// query of the tile. Tiles every row sees whole run `body` unmasked; edge tiles (the
    /// diagonal, the window's start, the sequence's end) apply the mask by index.
    ///
    /// Items whose first group has at most `narrow.max_rows` rows and whose call did not pack
    /// K/V — decode — take `narrow.tile` keys per tile instead when `narrow` is set: the same
    /// body over narrower tiles, whose pages stay in the TLB while the item walks the tile
    /// group by group.
    KeyTiles {
        /// Keys per tile.
        tile: usize,
        /// How the tile products of this loop prefetch strided cache rows.
        prefetch: Prefetch,
        /// The narrower loop of few-row items reading the cache in place.
        narrow: Option<NarrowTiles>,
        /// The visibility rule.
        mask: Mask,
        /// Ops run per tile.
        body: Vec<Op>,
    },
    /// `Sᵀ (+)= keys · (query tile)ᵀ` for one part of the score dot product, all rows at once.
    /// The queries carry the scale (and, without a softcap, `log2 e`: S is in base-2 units).
    /// On edge tiles the product skips the register blocks of keys that no row of the block
    /// sees (the rows' visible keys as column ranges of `DotNn`): their entries of S are left as
    /// they were, and the online softmax masks them — with AVX2's 16-column blocks, about a
    /// third of a causal diagonal tile of 64 queries (W2 and W6 about 1–2% faster).
    Scores(ScoreTerm),
    /// Online softmax down the columns of Sᵀ (base 2): with a cap,
    /// `s = log2 e · cap · tanh(S / cap)`; on
    /// edge tiles hidden keys become −∞; `t = rowmax s`; where `t > m + threshold`,
    /// `m' = t`, `l *= 2^(m − m')`, `O *= 2^(m − m')`; `P = 2^(s − m')`, `l += rowsum P`.
    OnlineSoftmax {
        /// The spec's softcap.
        cap: Option<f32>,
        /// `KernelPlan::rescale_threshold`.
        threshold: f32,
        /// `KernelPlan::max_partials`: the tile max keeps this many partial maxima, key `j`
        /// of an unrolled step feeding partial `j mod partials` (the remainder keys partial 0),
        /// combined pairwise — `(m0 max m1) max (m2 max m3)`, `a max b` being `b < a ? a : b`.
        partials: usize,
        /// O is kept transposed in the key loop (`StateLayout::transposed`): a row of O is a
        /// column of `Oᵀ`, its elements `rows4` floats apart.
        o_transposed: bool,
        /// The main loop's whole tiles take their max with the pre-compiled [`ColumnMax`] (at
        /// the ISA's full width, into the scratch's `tile_max`), in the same partial maxima;
        /// edge tiles, which mask, tiles of the narrow loop (at most four rows: one 128-bit
        /// vector per key, where a call costs more than it saves) and every tile of a capped
        /// spec, whose scores are capped first, in the generated pass
        /// (`KernelPlan::routine_tile_max`). [`routine_tile_max`] applies the rule to a tile.
        ///
        /// In one process (JIT, two threads, alternating calls) the routine took W1 0.98× the
        /// time, W2 0.96–0.97×, W3 0.99×; the macro kernels' pass, which LLVM vectorises at
        /// the ISA's width, 0.99–1.01×.
        ///
        /// [`ColumnMax`]: crate::abi::ColumnMax
        column_max: bool,
    },
    /// `O += P · values`, all rows at once (P read from the transposed tile), with per-row key
    /// ranges on edge tiles; with `o_transposed`, into `Oᵀ` (`DotNn`'s column-major C, whose
    /// routine computes `Oᵀ += valuesᵀ·Pᵀ`).
    AccumulateValues {
        /// Where the values come from.
        values: TileSource,
        /// Width of a value row.
        width: usize,
        /// O is kept transposed in the key loop (`StateLayout::transposed`).
        o_transposed: bool,
    },
    /// After the key loop of a plan that keeps O transposed: rewrite the group's `Oᵀ` (`acc_dim`
    /// rows of `rows4` floats) row-major in place, so the finish reads every state alike. `via`
    /// is scratch the loop no longer reads (the group's query panels), which holds a copy.
    RestoreRowMajor {
        /// The scratch tile the copy goes through.
        via: Operand,
    },
    /// Combine the task's split states into the first: `M = max m_s`,
    /// `l = Σ l_s·2^(m_s − M)`, `O = Σ O_s·2^(m_s − M)`.
    MergeSplits,
    /// `lse = m·ln 2 + ln l` into m's slot and `1/l` into l's; a row of no weight (l = 0: no
    /// visible key, or every visible score −∞) gets `lse = −∞` and `1/l = 0`, so its output is
    /// `0·O` (semantics.md §3 step 4). O is scaled as it is stored.
    Normalize,
    /// `into[b, q0 + qi, h] = O[slot, qi] / l`, one pass over O: `Out` for grouped specs, the
    /// epilogue's `LatentOut` for absorbed MLA.
    StoreOut {
        /// `Out` or `LatentOut`.
        into: Operand,
    },
    /// Absorbed MLA, epilogue: `out[.., h] = latent_out[.., h] · W_UV[h]ᵀ` (`rank → Dv`) for
    /// every (batch, query) row of the call, as one tile product.
    ProjectOut {
        /// Latent rank.
        rank: usize,
        /// Output width Dv.
        v_dim: usize,
    },
    /// `lse[b, q0 + qi, h] = lse` of each row, when the caller asked for it.
    StoreLse,
    /// Expanded MLA, prologue: `weights_t[h] = [W_UK[h]ᵀ, W_UV[h]ᵀ]` in column panels
    /// (`KernelPlan::transposed_weights`), so the up-projection is a broadcast product.
    TransposeWeights {
        /// Latent rank (rows of each transposed matrix).
        rank: usize,
        /// Columns of `W_UK[h]ᵀ`.
        nope: usize,
        /// Columns of `W_UV[h]ᵀ`.
        v_dim: usize,
    },
    /// Expanded MLA: `keys[r, 0..nope] = c_kv[b, j0 + r] · W_UK[h]ᵀ` and `keys[r, nope..] =
    /// k_rope[b, j0 + r]` for the tile's rows, row-major, `nope + rope` floats a row.
    ExpandKeys {
        /// Latent rank.
        rank: usize,
        /// Key columns from the latent.
        nope: usize,
        /// Key columns copied from `k_rope`.
        rope: usize,
    },
    /// Expanded MLA: `values[r] = c_kv[b, j0 + r] · W_UV[h]ᵀ` for the tile's rows, row-major,
    /// `row` floats apart (`CallPacking::value_row`).
    ExpandValues {
        /// Latent rank.
        rank: usize,
        /// Value width Dv.
        v_dim: usize,
        /// Floats from one value row to the next.
        row: usize,
    },
}

/// One part of a score dot product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreTerm {
    /// The query side: a scratch tile of packed rows, transposed (`Qᵀ`, for the broadcast
    /// product).
    pub query: Operand,
    /// The key side.
    pub keys: TileSource,
    /// Dot-product length.
    pub len: usize,
    /// Add to S instead of overwriting it.
    pub accumulate: bool,
    /// Items with few rows compute this term as dot products of key rows with row-major
    /// queries instead (a broadcast per key element would fill `rows / lanes` of a vector).
    pub dot: Option<DotScores>,
}

/// The dot-product variant of a score term (`DotNt`), for items with few rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DotScores {
    /// Most rows of an item's group that take it.
    pub max_rows: usize,
    /// The row-major queries it reads.
    pub query: Operand,
}

/// Where a tile product reads a cache tensor's current tile. The choice is the work item's,
/// at run time: the task's packed copy when the executor made one (`CallArgs::k_packed` is set),
/// else the item's own packed tile when its group has enough rows, else the cache rows in
/// place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileSource {
    /// The cache tensor: `K`, `V`, `CKv` or `KRope`.
    pub cache: Operand,
    /// The layout of the call-level packed copy, if calls may make one.
    pub call_packed: Option<CallPacking>,
    /// The item-packed tile, if items may pack one (a `PackTile` op fills it).
    pub item_packed: Option<ItemPacked>,
    /// Whether the product prefetches the next rows of the cache tensor, as its loop's
    /// [`Prefetch`] says (strided rows, past the hardware prefetchers), when it reads them in
    /// place or packs them itself.
    pub prefetch: bool,
}

/// An item-packed tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemPacked {
    /// `KeyTile` or `ValueTile`.
    pub tile: Operand,
    /// Fewest rows of the item's group that pack it.
    pub min_rows: usize,
}

/// How a key loop's tile products prefetch strided cache rows ([`abi::PrefetchRows`]).
///
/// [`abi::PrefetchRows`]: crate::abi::PrefetchRows
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// The group at position i of the item's n asks for share i of n of the next tile's rows
    /// across all the item's groups: the next tile arrives one tile ahead, in address order
    /// (tiles whose rows span few pages, `KernelPlan::prefetches_whole_tiles`).
    WholeNextTile,
    /// Each group asks for the next group's rows of this tile; the last group, for the first
    /// group's rows of the next tile.
    NextGroup,
}

/// The narrow key loop of [`Op::KeyTiles`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NarrowTiles {
    /// Keys per tile.
    pub tile: usize,
    /// Most rows of the item's first group that take it.
    pub max_rows: usize,
    /// How its products prefetch.
    pub prefetch: Prefetch,
}

/// A tensor or buffer an op reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// `q` [B, Sq, H, D].
    Q,
    /// `out` [B, Sq, H, Dv].
    Out,
    /// Absorbed MLA: the prologue's `q'` [B, Sq, H, rank].
    LatentQ,
    /// Absorbed MLA: the finishes' `o' = O / l` [B, Sq, H, rank].
    LatentOut,
    /// `k` [B, Sk, kv_heads, D].
    K,
    /// `v` [B, Sk, kv_heads, Dv].
    V,
    /// `c_kv` [B, Sk, rank].
    CKv,
    /// `k_rope` [B, Sk, rope_dim].
    KRope,
    /// Scratch: the packed query rows (q, or the absorbed q').
    QueryTile,
    /// Scratch: the packed RoPE query rows (absorbed MLA).
    RopeTile,
    /// Scratch: the queries row-major, for dot-product scores on items with few rows.
    QueryRows,
    /// Scratch: the packed key tile.
    KeyTile,
    /// Scratch: the packed value tile.
    ValueTile,
}

impl Operand {
    /// Where a work item's rows of this cache tensor lie (`K`, `V`, `CKv` or `KRope`, of the
    /// plan's kind: lowering pairs them).
    pub fn cache_row(self, plan: &KernelPlan) -> CacheRow {
        let tensor = match self {
            Operand::K => CacheTensor::K,
            Operand::V => CacheTensor::V,
            Operand::CKv => CacheTensor::CKv,
            Operand::KRope => CacheTensor::KRope,
            other => unreachable!("{other:?} is not a cache tensor"),
        };
        plan.cache_row(tensor).expect("lowering pairs operands with their spec kind")
    }
}

/// Whether a tile of a key loop takes its tile max from [`crate::abi::ColumnMax`]: the rule of
/// `Op::OnlineSoftmax`'s `column_max` (the op's flag), for a tile of the narrow loop or not,
/// an edge tile or a whole one. Both backends ask here.
pub fn routine_tile_max(column_max: bool, narrow: bool, edge: bool) -> bool {
    column_max && !narrow && !edge
}

/// Lowers a plan to its tile program.
pub fn lower(plan: &KernelPlan) -> KernelIr {
    let spec = &plan.spec;
    let o_transposed = plan.state.transposed;
    let softmax = Op::OnlineSoftmax {
        cap: spec.softcap,
        threshold: plan.rescale_threshold,
        partials: plan.max_partials,
        o_transposed,
        column_max: plan.routine_tile_max,
    };
    let factor = plan.query_factor;
    let in_place =
        |cache, prefetch| TileSource { cache, call_packed: None, item_packed: None, prefetch };
    let term = |query, keys, len, accumulate, dot| {
        Op::Scores(ScoreTerm { query, keys, len, accumulate, dot })
    };
    // The queries of a head-per-row form (grouped, expanded MLA): all D of q.
    let pack_q = |len, row_major| Op::PackQueries {
        from: Operand::Q,
        offset: 0,
        len,
        factor,
        into: Operand::QueryTile,
        row_major,
    };
    let (mut setup, body, store, calls) = match &spec.kv {
        KvLayout::Latent(l) if plan.form == Form::LatentExpanded => {
            let d = spec.head_dim();
            let value_row = plan.call_packing.expect("expanded plans pack per task").value_row();
            let setup = vec![pack_q(d, None)];
            // K and V exist only as the task's up-projected copy (`CallPacking::up_projected`),
            // contiguous rows.
            let source = |cache| TileSource {
                cache,
                call_packed: plan.call_packing,
                item_packed: None,
                prefetch: false,
            };
            let body = vec![
                term(Operand::QueryTile, source(Operand::K), d, false, None),
                softmax,
                Op::AccumulateValues {
                    values: source(Operand::V),
                    width: spec.v_head_dim,
                    o_transposed,
                },
            ];
            let calls = CallPrograms {
                prologue: vec![Op::TransposeWeights {
                    rank: l.rank,
                    nope: l.nope_dim,
                    v_dim: spec.v_head_dim,
                }],
                expand: vec![
                    Op::ExpandKeys { rank: l.rank, nope: l.nope_dim, rope: l.rope_dim },
                    Op::ExpandValues { rank: l.rank, v_dim: spec.v_head_dim, row: value_row },
                ],
                epilogue: Vec::new(),
            };
            (setup, body, Operand::Out, calls)
        }
        KvLayout::Latent(l) => {
            let mut setup = vec![Op::PackQueries {
                from: Operand::LatentQ,
                offset: 0,
                len: l.rank,
                factor,
                into: Operand::QueryTile,
                row_major: None,
            }];
            // c_kv rows are contiguous: keys and values are read in place, left to the
            // hardware prefetchers (a software prefetch a tile ahead measured 1.04–1.06×
            // slower on W5, and on a Zen 5 1.09× on W5 and 1.13× on W8).
            let latent = in_place(Operand::CKv, false);
            let mut body = vec![term(Operand::QueryTile, latent, l.rank, false, None)];
            if l.rope_dim > 0 {
                setup.push(Op::PackQueries {
                    from: Operand::Q,
                    offset: l.nope_dim,
                    len: l.rope_dim,
                    factor,
                    into: Operand::RopeTile,
                    row_major: None,
                });
                let rope = in_place(Operand::KRope, false);
                body.push(term(Operand::RopeTile, rope, l.rope_dim, true, None));
            }
            body.push(softmax);
            body.push(Op::AccumulateValues { values: latent, width: l.rank, o_transposed });
            let calls = CallPrograms {
                prologue: vec![Op::AbsorbQueries { nope: l.nope_dim, rank: l.rank }],
                epilogue: vec![Op::ProjectOut { rank: l.rank, v_dim: spec.v_head_dim }],
                ..CallPrograms::default()
            };
            (setup, body, Operand::LatentOut, calls)
        }
        KvLayout::Grouped { head_dim, kv_heads, .. } => {
            let (d, dv) = (*head_dim, spec.v_head_dim);
            let dot = (plan.dot_max_rows > 0)
                .then_some(DotScores { max_rows: plan.dot_max_rows, query: Operand::QueryRows });
            let setup = vec![pack_q(d, dot)];
            // K/V come from the task's packed copy (prefill), the item's own packed tiles
            // (several KV heads, enough rows), or the cache rows in place; rows of one KV head
            // among several are strided, so products reading them prefetch.
            let min_rows = plan.pack_min_rows;
            let source = |cache, tile| TileSource {
                cache,
                call_packed: plan.call_packing,
                item_packed: plan.pack_per_item.then_some(ItemPacked { tile, min_rows }),
                prefetch: *kv_heads > 1,
            };
            let (keys, values) =
                (source(Operand::K, Operand::KeyTile), source(Operand::V, Operand::ValueTile));
            let mut body = Vec::new();
            if plan.pack_per_item {
                body.push(Op::PackTile {
                    from: Operand::K,
                    into: Operand::KeyTile,
                    width: d,
                    min_rows,
                });
                body.push(Op::PackTile {
                    from: Operand::V,
                    into: Operand::ValueTile,
                    width: dv,
                    min_rows,
                });
            }
            body.push(term(Operand::QueryTile, keys, d, false, dot));
            body.push(softmax);
            body.push(Op::AccumulateValues { values, width: dv, o_transposed });
            (setup, body, Operand::Out, CallPrograms::default())
        }
    };
    setup.push(Op::InitState);
    let prefetch = |keys| match plan.prefetches_whole_tiles(keys) {
        true => Prefetch::WholeNextTile,
        false => Prefetch::NextGroup,
    };
    let mut item = vec![
        Op::ForEachGroup { body: setup },
        Op::KeyTiles {
            tile: plan.k_tile,
            prefetch: prefetch(plan.k_tile),
            narrow: (plan.dot_max_rows > 0 && plan.dot_k_tile < plan.k_tile).then(|| NarrowTiles {
                tile: plan.dot_k_tile,
                max_rows: plan.dot_max_rows,
                prefetch: prefetch(plan.dot_k_tile),
            }),
            mask: spec.mask,
            body: vec![Op::ForEachGroup { body }],
        },
    ];
    if o_transposed {
        // The query panels (`rank` deep, a whole panel of rows wide) hold a copy of Oᵀ.
        let scratch = &plan.scratch;
        let panels = ScratchLayout::panels(scratch.query_width, plan.padded_rows);
        assert!(panels >= plan.padded_rows * plan.acc_dim, "Oᵀ fits the query panels");
        let body = vec![Op::RestoreRowMajor { via: Operand::QueryTile }];
        item.push(Op::ForEachGroup { body });
    }
    KernelIr {
        prologue: calls.prologue,
        item,
        finish: vec![Op::MergeSplits, Op::Normalize, Op::StoreOut { into: store }, Op::StoreLse],
        epilogue: calls.epilogue,
        expand: calls.expand,
    }
}

/// The programs of a kernel besides its items and finishes (MLA only).
#[derive(Default)]
struct CallPrograms {
    prologue: Vec<Op>,
    epilogue: Vec<Op>,
    expand: Vec<Op>,
}

impl fmt::Display for KernelIr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let programs = [
            ("prologue(h), once per query head before the items", &self.prologue),
            ("item(b, groups g0.., q0, keys k_lo..k_hi) -> state per group", &self.item),
            ("finish(b, g, q0, states of the task's splits)", &self.finish),
            ("epilogue(h), once per query head after the finishes", &self.epilogue),
            (
                "expand(b, h, key tile j0..j0 + n), per tile a (batch, head) task's queries see, before its items",
                &self.expand,
            ),
        ];
        for (title, ops) in programs.into_iter().filter(|(_, ops)| !ops.is_empty()) {
            writeln!(f, "{title}:")?;
            for op in ops {
                write_op(f, op, 1)?;
            }
        }
        Ok(())
    }
}

fn write_op(f: &mut fmt::Formatter<'_>, op: &Op, depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    match op {
        Op::PackQueries { from, offset, len, factor, into, row_major } => {
            writeln!(
                f,
                "{pad}{}ᵀ[.., rows of h, q] = {factor} * {}[b, q0 + q, h, {offset}..{}] for each head h of g   (rows = heads x queries; transposed, in panels)",
                name(*into),
                name(*from),
                offset + len
            )?;
            if let Some(dot) = row_major {
                writeln!(
                    f,
                    "{pad}  items of <= {} rows: also {} = the same rows, row-major",
                    dot.max_rows,
                    name(dot.query)
                )?;
            }
            Ok(())
        }
        Op::PackTile { from, into, width, min_rows } => writeln!(
            f,
            "{pad}{} = {}, {width} wide, in items of >= {min_rows} rows whose call packed nothing   ({})",
            name(*into),
            tile_name(*from),
            if *into == Operand::ValueTile { "into column panels" } else { "row-major" }
        ),
        Op::AbsorbQueries { nope, rank } => writeln!(
            f,
            "{pad}q'[.., h] = q[.., h, 0..{nope}] · W_UK[h] for every (batch, query) row   (tile A·B, {nope} -> {rank}; W_UK[h] read once per call)"
        ),
        Op::InitState => {
            writeln!(f, "{pad}O = 0; m = f32::MIN; l = 0   (unless the item resumes a run's state)")
        }
        Op::ForEachGroup { body } => {
            writeln!(f, "{pad}for each group g of the item:")?;
            for op in body {
                write_op(f, op, depth + 1)?;
            }
            Ok(())
        }
        Op::KeyTiles { tile, prefetch, narrow, mask, body } => {
            let skip = match mask {
                Mask::None => "",
                Mask::Causal => ", tiles past the last query's diagonal skipped",
                Mask::SlidingWindow(_) => ", tiles outside the window band skipped",
            };
            let narrow = narrow.map_or(String::new(), |n| {
                format!(
                    "; items whose first group has <= {} rows and whose call packed nothing: step {} (a tile's pages stay in the TLB; prefetch {})",
                    n.max_rows,
                    n.tile,
                    prefetch_name(n.prefetch)
                )
            });
            writeln!(
                f,
                "{pad}for each key tile j0 in k_lo..k_hi step {tile} (mask {mask}{skip}; prefetch {}{narrow}):",
                prefetch_name(*prefetch)
            )?;
            for op in body {
                write_op(f, op, depth + 1)?;
            }
            Ok(())
        }
        Op::Scores(t) => {
            let op = if t.accumulate { "+=" } else { "=" };
            writeln!(
                f,
                "{pad}Sᵀ {op} keys · {}ᵀ   (tile A·B, each key element broadcast against a row of {}ᵀ; k = {}; edge tiles skip the blocks of keys no row of the block sees); keys: {}",
                name(t.query),
                name(t.query),
                t.len,
                source_text(&t.keys, t.accumulate)
            )?;
            if let Some(dot) = t.dot {
                writeln!(
                    f,
                    "{pad}  items of <= {} rows: dot products of key rows with {} (tile A·Bᵀ)",
                    dot.max_rows,
                    name(dot.query)
                )?;
            }
            Ok(())
        }
        Op::OnlineSoftmax { cap, threshold, partials, o_transposed, column_max } => {
            write!(f, "{pad}s = S")?;
            if let Some(c) = cap {
                write!(f, "; s = log2 e * {c} * tanh(s / {c})")?;
            }
            writeln!(f, "; edge tiles: hidden keys -> -inf   (base-2 units)")?;
            let max = match column_max {
                true => {
                    "the main loop's whole tiles: one call of the tile max; edge and narrow tiles: generated"
                }
                false => "generated",
            };
            writeln!(
                f,
                "{pad}t = rowmax s; where t > m + {threshold}: m' = t, l *= 2^(m - m'), O *= 2^(m - m'){}; P = 2^(s - m'); l += rowsum P   (max down the columns of Sᵀ in {partials} partial maxima, {max}; rescale: generated per spec; P and sums: one call of the tile exponentials)",
                if *o_transposed { " (a column of Oᵀ)" } else { "" }
            )
        }
        Op::AccumulateValues { values, width, o_transposed: false } => writeln!(
            f,
            "{pad}O += P · values   (tile A·B over all rows, P read from Sᵀ, width {width}; per-row key ranges on edge tiles); values: {}",
            source_text(values, false)
        ),
        Op::AccumulateValues { values, width, o_transposed: true } => writeln!(
            f,
            "{pad}Oᵀ += valuesᵀ · Pᵀ   (tile A·B, O kept transposed: the value rows broadcast against Sᵀ, width {width}; per-row key ranges on edge tiles); values: {}",
            source_text(values, false)
        ),
        Op::RestoreRowMajor { via } => writeln!(
            f,
            "{pad}O = (Oᵀ)ᵀ, row-major again for the finish   (through a copy in {})",
            name(*via)
        ),
        Op::MergeSplits => {
            writeln!(
                f,
                "{pad}merge splits: M = max m_s; l = sum l_s * 2^(m_s - M); O = sum O_s * 2^(m_s - M)"
            )
        }
        Op::Normalize => {
            writeln!(
                f,
                "{pad}lse = m * ln 2 + ln l; l = 1/l   (no weight, l = 0: lse = -inf, 1/l = 0)"
            )
        }
        Op::StoreOut { into } => {
            writeln!(f, "{pad}{}[b, q0 + q, h] = O[row of (h, q)] / l", name(*into))
        }
        Op::ProjectOut { rank, v_dim } => writeln!(
            f,
            "{pad}out[.., h] = o'[.., h] · W_UV[h]ᵀ for every (batch, query) row   (tile A·Bᵀ, {rank} -> {v_dim}; W_UV[h] read once per call)"
        ),
        Op::StoreLse => writeln!(f, "{pad}lse[b, q0.., h] = lse   (if requested)"),
        Op::TransposeWeights { rank, nope, v_dim } => writeln!(
            f,
            "{pad}weights_t[h] = [W_UK[h]ᵀ ({rank} x {nope}), W_UV[h]ᵀ ({rank} x {v_dim})] in column panels   (once per call)"
        ),
        Op::ExpandKeys { rank, nope, rope } => {
            writeln!(
                f,
                "{pad}K_h[j0 + r, 0..{nope}] = c_kv[b, j0 + r] · W_UK[h]ᵀ   (tile A·B against weights_t[h], {rank} -> {nope}, row-major into the task's K)"
            )?;
            if *rope > 0 {
                writeln!(
                    f,
                    "{pad}K_h[j0 + r, {nope}..{}] = k_rope[b, j0 + r]   (copied)",
                    nope + rope
                )?;
            }
            Ok(())
        }
        Op::ExpandValues { rank, v_dim, row } => writeln!(
            f,
            "{pad}V_h[j0 + r] = c_kv[b, j0 + r] · W_UV[h]ᵀ   (tile A·B against weights_t[h], {rank} -> {v_dim}, row-major into the task's V, rows {row} floats apart)"
        ),
    }
}

fn name(operand: Operand) -> &'static str {
    match operand {
        Operand::Q => "q",
        Operand::Out => "out",
        Operand::LatentQ => "q'",
        Operand::LatentOut => "o'",
        Operand::K => "k",
        Operand::V => "v",
        Operand::CKv => "c_kv",
        Operand::KRope => "k_rope",
        Operand::QueryTile => "Q",
        Operand::RopeTile => "Qrope",
        Operand::QueryRows => "Qrows",
        Operand::KeyTile => "Ktile",
        Operand::ValueTile => "Vtile",
    }
}

/// Where a tile product reads, in words: the task's packed copy, the item's tile, the cache.
fn source_text(source: &TileSource, accumulate: bool) -> String {
    let mut text = String::new();
    if let Some(layout) = source.call_packed.filter(|layout| layout.up_projected) {
        return format!(
            "the task's up-projected {} ({}-key tiles, row-major)",
            if source.cache == Operand::V { "V_h" } else { "K_h" },
            layout.k_tile
        );
    }
    if let Some(layout) = source.call_packed {
        let layout = match source.cache {
            Operand::V => format!("per {}-key tile, its panels", layout.k_tile),
            _ => "row-major".to_owned(),
        };
        text.push_str(&format!(
            "the task's packed copy of {} when it made one ({layout}); else ",
            name(source.cache)
        ));
    }
    if let Some(item) = source.item_packed {
        text.push_str(&format!("{} in items of >= {} rows; else ", name(item.tile), item.min_rows));
    }
    text.push_str(&format!("{} in place", tile_name(source.cache)));
    if source.prefetch && !accumulate {
        text.push_str(" (strided: its next rows prefetched while computing)");
    }
    text
}

fn prefetch_name(prefetch: Prefetch) -> &'static str {
    match prefetch {
        Prefetch::WholeNextTile => "a share of the next tile per group",
        Prefetch::NextGroup => "the rows the next group reads",
    }
}

/// A key-side operand as the tile it denotes.
fn tile_name(operand: Operand) -> String {
    match operand {
        Operand::K | Operand::V => format!("{}[b, j0.., g]", name(operand)),
        Operand::CKv | Operand::KRope => format!("{}[b, j0..]", name(operand)),
        tile => name(tile).to_owned(),
    }
}

/// An absorbed MLA plan and its IR whose query copies (the latent queries, and the RoPE part
/// of `q` from `offset` 16) also ask for the row-major copy of dot-product scores: a
/// combination the lowering never makes (it measured slower from DRAM), for tests that the
/// emitters read `PackQueries` as the op says.
#[cfg(test)]
pub(crate) fn row_major_latent_ir() -> (KernelPlan, KernelIr) {
    use crate::plan::Target;
    use crate::spec::AttentionSpec;

    let spec = AttentionSpec::mla(4, 48, 8, 16, 16);
    let plan = KernelPlan::with_form(&spec, Form::LatentAbsorbed, Target::AVX512);
    let mut ir = lower(&plan);
    let Some(Op::ForEachGroup { body }) = ir.item.first_mut() else { panic!("{ir}") };
    let mut copies = 0;
    for op in body {
        if let Op::PackQueries { row_major, .. } = op {
            *row_major = Some(DotScores { max_rows: 16, query: Operand::QueryRows });
            copies += 1;
        }
    }
    assert_eq!(copies, 2, "the latent and RoPE query copies");
    (plan, ir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Target;
    use crate::spec::{AttentionSpec, MlaForm};

    /// The per-group setup ops, the per-group tile ops and the mask of an item program (whose
    /// ops after the key loop, if any, restore a transposed O).
    fn parts(ir: &KernelIr) -> (&[Op], &[Op], Mask) {
        let [Op::ForEachGroup { body: setup }, Op::KeyTiles { body, mask, .. }, ..] = &ir.item[..]
        else {
            panic!("{ir}")
        };
        let [Op::ForEachGroup { body: tile }] = &body[..] else { panic!("{ir}") };
        (setup, tile, *mask)
    }

    #[test]
    fn grouped_program() {
        let plan = KernelPlan::new(&AttentionSpec::gqa(8, 2, 16).mask(Mask::Causal), Target::AVX2);
        let ir = lower(&plan);
        let (setup, body, mask) = parts(&ir);
        let factor = plan.query_factor;
        let dot = Some(DotScores { max_rows: 4, query: Operand::QueryRows });
        assert_eq!(
            setup,
            [
                Op::PackQueries {
                    from: Operand::Q,
                    offset: 0,
                    len: 16,
                    factor,
                    into: Operand::QueryTile,
                    row_major: dot,
                },
                Op::InitState
            ]
        );
        assert_eq!(mask, Mask::Causal);
        // Two KV heads: their rows are strided in the cache, so items with enough rows pack
        // tiles, and products reading the cache prefetch.
        assert!(matches!(body[0], Op::PackTile { from: Operand::K, width: 16, min_rows: 16, .. }));
        let Op::Scores(scores) = body[2] else { panic!("{ir}") };
        let layout = plan.call_packing;
        assert_eq!(
            (scores.keys, scores.len, scores.dot),
            (
                TileSource {
                    cache: Operand::K,
                    call_packed: layout,
                    item_packed: Some(ItemPacked { tile: Operand::KeyTile, min_rows: 16 }),
                    prefetch: true,
                },
                16,
                dot
            )
        );
        // The softmax's tile max runs in the plan's partial maxima, several, combined pairwise,
        // which the pre-compiled tile max keeps; whole tiles take it, unless a cap must be
        // applied first.
        let Op::OnlineSoftmax { partials, column_max, .. } = body[3] else { panic!("{ir}") };
        assert_eq!((partials, column_max), (plan.max_partials, true));
        assert!(partials > 1 && partials.is_power_of_two());
        assert_eq!(partials, crate::abi::MAX_PARTIALS);
        let capped = lower(&KernelPlan::new(&plan.spec.clone().softcap(30.0), Target::AVX2));
        let (_, capped_body, _) = parts(&capped);
        let Op::OnlineSoftmax { column_max, .. } = capped_body[3] else { panic!("{capped}") };
        assert!(!column_max, "{capped}");
        // Of an uncapped spec's tiles, only the main loop's whole ones call the routine.
        let tiles = [(false, false), (true, false), (false, true), (true, true)];
        let calls = tiles.map(|(narrow, edge)| routine_tile_max(true, narrow, edge));
        assert_eq!(calls, [true, false, false, false]);
        assert!(!routine_tile_max(false, false, false));
        let Op::AccumulateValues { values, width: 16, .. } = body[4] else { panic!("{ir}") };
        assert_eq!(
            (values.cache, values.item_packed.unwrap().tile),
            (Operand::V, Operand::ValueTile)
        );
        let store = Op::StoreOut { into: Operand::Out };
        assert_eq!(ir.finish, [Op::MergeSplits, Op::Normalize, store, Op::StoreLse]);
        assert!(ir.prologue.is_empty() && ir.epilogue.is_empty());
        // One KV head: rows are contiguous already, so items never copy them (the call may)
        // and nothing is prefetched.
        let ir = lower(&KernelPlan::new(&AttentionSpec::mqa(8, 16), Target::AVX2));
        let (_, body, _) = parts(&ir);
        let Op::Scores(scores) = body[0] else { panic!("{ir}") };
        assert_eq!((scores.keys.item_packed, scores.keys.prefetch), (None, false));
        assert!(scores.keys.call_packed.is_some());
        // Decode items of Llama-3-8B's shape read 4 KiB cache rows: 8-key tiles, each
        // prefetched a share of the next tile per group; 64-key tiles, the next group's rows.
        let ir = lower(&KernelPlan::new(&AttentionSpec::gqa(32, 8, 128), Target::AVX2));
        let narrow = NarrowTiles { tile: 8, max_rows: 4, prefetch: Prefetch::WholeNextTile };
        assert!(matches!(
            ir.item[1],
            Op::KeyTiles { tile: 64, prefetch: Prefetch::NextGroup, narrow: Some(n), .. } if n == narrow
        ));
        let text = ir.to_string();
        for decision in [
            "items whose first group has <= 4 rows and whose call packed nothing: step 8",
            "Ktile in items of >= 16 rows",
            "items of <= 4 rows: dot products of key rows with Qrows",
            "the task's packed copy of k when it made one (row-major)",
            "prefetch the rows the next group reads",
        ] {
            assert!(text.contains(decision), "{decision:?} not in {text}");
        }
    }

    #[test]
    fn latent_program_absorbs_and_projects() {
        let spec = AttentionSpec::mla(4, 32, 8, 16, 12);
        // AVX2 keeps O transposed through the key loop and row-major again after it; AVX-512
        // and the portable ISA keep it row-major throughout.
        for (target, transposed) in
            [(Target::AVX2, true), (Target::AVX512, false), (Target::PORTABLE, false)]
        {
            let ir = lower(&KernelPlan::new(&spec, target));
            let (_, body, _) = parts(&ir);
            let Op::AccumulateValues { o_transposed, .. } = body[3] else { panic!("{ir}") };
            let Op::OnlineSoftmax { o_transposed: softmax, .. } = body[2] else { panic!("{ir}") };
            assert_eq!((o_transposed, softmax), (transposed, transposed), "{ir}");
            let restore =
                Op::ForEachGroup { body: vec![Op::RestoreRowMajor { via: Operand::QueryTile }] };
            assert_eq!(ir.item.get(2), transposed.then_some(&restore), "{ir}");
        }
        let plan = KernelPlan::new(&spec, Target::AVX2);
        let factor = plan.query_factor;
        let ir = lower(&plan);
        let (setup, body, _) = parts(&ir);
        // The prologue absorbs every row of the call; items pack their rows of q'.
        assert_eq!(ir.prologue, [Op::AbsorbQueries { nope: 16, rank: 32 }]);
        let pack = |from, offset, len, into| Op::PackQueries {
            from,
            offset,
            len,
            factor,
            into,
            row_major: None,
        };
        assert_eq!(setup[0], pack(Operand::LatentQ, 0, 32, Operand::QueryTile));
        assert_eq!(setup[1], pack(Operand::Q, 16, 8, Operand::RopeTile));
        assert_eq!(body.len(), 4); // latent scores, rope scores, softmax, values
        // Latent rows are contiguous and read in place, whatever the item.
        let Op::Scores(rope) = body[1] else { panic!("{ir}") };
        let in_place = TileSource {
            cache: Operand::KRope,
            call_packed: None,
            item_packed: None,
            prefetch: false,
        };
        assert_eq!((rope.keys, rope.accumulate, rope.dot), (in_place, true, None));
        // Finishes leave o' for the epilogue, which projects every row of the call.
        assert_eq!(ir.finish[2], Op::StoreOut { into: Operand::LatentOut });
        assert_eq!(ir.epilogue, [Op::ProjectOut { rank: 32, v_dim: 12 }]);
        assert!(matches!(ir.item[1], Op::KeyTiles { narrow: None, .. }));
        let text = ir.to_string();
        assert!(text.contains("W_UK[h]") && text.contains("W_UV[h]"), "{text}");
        assert!(text.starts_with("prologue(h)") && text.contains("\nepilogue(h)"), "{text}");
        // The expanded form: one head per group, scores over the task's up-projected keys,
        // an expand program and no latent buffers.
        let expanded = KernelPlan::new(
            &AttentionSpec::mla(4, 32, 8, 16, 12).mla_form(MlaForm::Expanded),
            Target::AVX2,
        );
        let ir = lower(&expanded);
        assert_eq!(ir.prologue, [Op::TransposeWeights { rank: 32, nope: 16, v_dim: 12 }]);
        assert!(ir.epilogue.is_empty());
        assert_eq!(
            ir.expand,
            [
                Op::ExpandKeys { rank: 32, nope: 16, rope: 8 },
                Op::ExpandValues { rank: 32, v_dim: 12, row: 16 }
            ]
        );
        let (setup, body, _) = parts(&ir);
        assert!(matches!(setup[0], Op::PackQueries { from: Operand::Q, offset: 0, len: 24, .. }));
        let Op::Scores(scores) = body[0] else { panic!("{ir}") };
        assert_eq!((scores.len, scores.keys.call_packed.map(|p| p.up_projected)), (24, Some(true)));
        assert_eq!(ir.finish[2], Op::StoreOut { into: Operand::Out });
        assert!(ir.to_string().contains("the task's up-projected K_h"), "{ir}");
        // Without a RoPE part there is one score term.
        let ir = lower(&KernelPlan::new(&AttentionSpec::mla(4, 32, 0, 16, 12), Target::AVX2));
        assert_eq!(parts(&ir).1.len(), 3);
    }
}
