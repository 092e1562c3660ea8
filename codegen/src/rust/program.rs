//! Translates a kernel's tile programs ([`crate::ir`]) into Rust: the `extern "C"`
//! functions of [`crate::abi`] with every size of the plan a constant, calling the
//! pre-compiled tile routines through `routines::` (the caller binds that path to one ISA's
//! routines and stamps the functions with its target features).
//!
//! The translation mirrors `clif`'s op for op; what differs is only how: the softmax's max and
//! rescale are plain loops that LLVM vectorises at the ISA's full width, and row updates call
//! `attngen::__private`'s inlined helpers.

use proc_macro2::{Literal, TokenStream};
use quote::quote;

use crate::abi::PANEL;
use crate::ir::{self, DotScores, KernelIr, Op, Operand, Prefetch, ScoreTerm, TileSource};
use crate::plan::{CacheRow, HeadMap, KernelPlan};
use crate::spec::Mask;

/// The entry points of a kernel (`prologue` and `epilogue` only for absorbed MLA, `expand`
/// only for expanded MLA), each preceded by `attributes` (the ISA's `#[target_feature]`).
pub fn functions(plan: &KernelPlan, ir: &KernelIr, attributes: &TokenStream) -> TokenStream {
    let emitter = Emitter { plan };
    let item = emitter.ops(&ir.item, None);
    let finish = emitter.ops(&ir.finish, None);
    let setup = emitter.work_item_setup();
    let mut fns = quote! {
        /// `item` (see `attngen_codegen::abi::ItemFn`).
        ///
        /// # Safety
        /// The executor's contract: `args` and every tensor it names were checked against the
        /// call's shape, `scratch` and the state slots are as large as the plan says.
        #attributes
        pub unsafe extern "C" fn item(
            args: *const CallArgs,
            b: usize,
            g0: usize,
            groups: usize,
            q0: usize,
            k_lo: usize,
            k_hi: usize,
            scratch: *mut f32,
            state0: *mut f32,
            state_stride: usize,
            resume: usize,
        ) {
            // SAFETY: the executor's contract, above; every address below is one the plan
            // places inside those buffers, except prefetch hints (wrapping arithmetic).
            unsafe {
                let args = &*args;
                let state = state0;
                let lowest = f32::MIN;
                #setup
                #item
            }
        }

        /// `finish` (see `attngen_codegen::abi::FinishFn`).
        ///
        /// # Safety
        /// As for `item`: `states` holds `n_states` slots `split_stride` floats apart.
        #attributes
        pub unsafe extern "C" fn finish(
            args: *const CallArgs,
            b: usize,
            g: usize,
            q0: usize,
            n_states: usize,
            states: *mut f32,
            split_stride: usize,
            scratch: *mut f32,
        ) {
            // SAFETY: as for `item`.
            unsafe {
                let args = &*args;
                let (g0, groups, k_lo, k_hi) = (g, 1usize, 0usize, 0usize);
                let (state, state_stride) = (states, split_stride);
                #setup
                #finish
            }
        }
    };
    for (name, ops) in [("prologue", &ir.prologue), ("epilogue", &ir.epilogue)] {
        if ops.is_empty() {
            continue;
        }
        let name = quote::format_ident!("{name}");
        let body = emitter.ops(ops, None);
        fns.extend(quote! {
            /// A per-head program (see `attngen_codegen::abi::HeadFn`).
            ///
            /// # Safety
            /// As for `item`, with the call's latent buffers set.
            #attributes
            pub unsafe extern "C" fn #name(args: *const CallArgs, head: usize) {
                // SAFETY: as for `item`: head < H, and every tensor holds B × Sq rows.
                unsafe {
                    let args = &*args;
                    #body
                }
            }
        });
    }
    if !ir.expand.is_empty() {
        let body = emitter.ops(&ir.expand, None);
        fns.extend(quote! {
            /// `expand` (see `attngen_codegen::abi::ExpandFn`).
            ///
            /// # Safety
            /// As for `item`: b < B, head < H, keys j0..j0 + n within the sequence's rows, and
            /// `keys` and `values` hold n rows of D and Dv floats.
            #attributes
            pub unsafe extern "C" fn expand(
                args: *const CallArgs,
                b: usize,
                head: usize,
                j0: usize,
                n: usize,
                keys: *mut f32,
                values: *mut f32,
            ) {
                // SAFETY: as for `item`: every address below is a row of sequence b's
                // c_kv or k_rope, a head-h weight matrix, or one of the n destination rows.
                unsafe {
                    let args = &*args;
                    let latent_row = b * args.seq_k + j0;
                    #body
                }
            }
        });
    }
    fns
}

/// The key tile a tile op is emitted for: its loop's tile size, whether the loop is the
/// narrow one of few-row items, and whether it is an edge tile (the generated code binds `j0`
/// and `n`).
#[derive(Clone, Copy)]
struct Tile {
    size: usize,
    prefetch: Prefetch,
    narrow: bool,
    partial: bool,
}

struct Emitter<'a> {
    plan: &'a KernelPlan,
}

/// A usize constant, unsuffixed so it takes the type its use needs.
fn lit(x: usize) -> Literal {
    Literal::usize_unsuffixed(x)
}

impl Emitter<'_> {
    fn ops(&self, ops: &[Op], tile: Option<Tile>) -> TokenStream {
        ops.iter().map(|op| self.op(op, tile)).collect()
    }

    /// What every work-item program binds first: Sk, the sequence's keys, the tile's valid
    /// queries, the first group's rows and scratch block, the prefetch descriptor.
    fn work_item_setup(&self) -> TokenStream {
        let plan = self.plan;
        let (q_tile, shared) = (lit(plan.q_tile), lit(plan.scratch.shared_len));
        let heads = self.group_size();
        let multiple = lit(plan.row_multiple);
        quote! {
            let (seq_q, seq_k) = (args.seq_q, args.seq_k);
            // The sequence's keys (`CallArgs::kv_lens`); the cache rows stay Sk apart per
            // sequence.
            let keys = if args.kv_lens.is_null() { seq_k } else { *args.kv_lens.add(b) };
            let nq = (seq_q - q0).min(#q_tile);
            let g = g0;
            let rows = #heads * nq;
            let rows_v4 = rows.next_multiple_of(#multiple);
            let group_scratch = scratch.add(#shared);
            let mut prefetch = PrefetchRows {
                base: ::core::ptr::null(), rows: 0, stride: 0, width: 0, part: 0, parts: 1,
            };
        }
    }

    fn op(&self, op: &Op, tile: Option<Tile>) -> TokenStream {
        match op {
            Op::PackQueries { from, offset, len, factor, into, row_major } => {
                self.pack_queries(*from, *offset, *len, *factor, *into, *row_major)
            }
            Op::AbsorbQueries { nope, rank } => self.absorb_queries(*nope, *rank),
            Op::InitState => self.init_state(),
            Op::ForEachGroup { body } => self.for_each_group(body, tile),
            Op::KeyTiles { tile, prefetch, narrow, mask, body } => {
                let wide = self.key_tiles(*tile, *prefetch, false, *mask, body);
                match narrow {
                    None => wide,
                    Some(narrow) => {
                        let few = self.rows_at_most(narrow.max_rows);
                        let narrow =
                            self.key_tiles(narrow.tile, narrow.prefetch, true, *mask, body);
                        quote! {
                            if #few && args.k_packed.is_null() { #narrow } else { #wide }
                        }
                    }
                }
            }
            Op::PackTile { from, into, width, min_rows } => {
                self.pack_tile(*from, *into, *width, *min_rows, tile)
            }
            Op::Scores(term) => self.scores(term, tile),
            Op::OnlineSoftmax { cap, threshold, partials, o_transposed, column_max } => {
                let column_max =
                    tile.is_some_and(|t| ir::routine_tile_max(*column_max, t.narrow, t.partial));
                self.online_softmax(*cap, *threshold, *partials, *o_transposed, column_max, tile)
            }
            Op::AccumulateValues { values, width, o_transposed } => {
                self.accumulate_values(values, *width, *o_transposed, tile)
            }
            Op::RestoreRowMajor { via } => self.restore_row_major(*via),
            Op::MergeSplits => self.merge_splits(),
            Op::Normalize => self.normalize(),
            Op::StoreOut { into } => self.store_out(*into),
            Op::ProjectOut { rank, v_dim } => self.project_out(*rank, *v_dim),
            Op::TransposeWeights { rank, nope, v_dim } => {
                self.transpose_weights(*rank, *nope, *v_dim)
            }
            Op::ExpandKeys { rank, nope, rope } => self.expand_keys(*rank, *nope, *rope),
            Op::ExpandValues { rank, v_dim, row } => self.expand_values(*rank, *v_dim, *row),
            Op::StoreLse => self.store_lse(),
        }
    }

    // --- The group mapping (the plan's `HeadMap`).

    /// The number of query heads of group `g`.
    fn group_size(&self) -> TokenStream {
        match self.plan.head_map {
            HeadMap::Table => quote!((GROUP_HEADS[g][0] as usize)),
            _ => {
                let size = lit(self.plan.groups[0].len());
                quote!(#size)
            }
        }
    }

    /// The query head in slot `slot` of group `g`.
    fn head_of(&self) -> TokenStream {
        match self.plan.head_map {
            HeadMap::Table => quote!((GROUP_HEADS[g][slot + 1] as usize)),
            HeadMap::Interleaved { groups } => {
                let groups = lit(groups);
                quote!((slot * #groups + g))
            }
            HeadMap::Contiguous { size } => {
                let size = lit(size);
                quote!((g * #size + slot))
            }
        }
    }

    /// `body` for every head of group `g`, with `slot` and `head` bound.
    fn for_each_head(&self, body: TokenStream) -> TokenStream {
        let (heads, head) = (self.group_size(), self.head_of());
        quote! {
            for slot in 0..#heads {
                let head = #head;
                #body
            }
        }
    }

    /// `body` for every valid row of the work item's group, with `slot`, `head`, `qi` and
    /// `row` bound.
    fn for_each_row(&self, body: TokenStream) -> TokenStream {
        self.for_each_head(quote! {
            for qi in 0..nq {
                let row = slot * nq + qi;
                #body
            }
        })
    }

    /// Float index of row `(b, q0 + qi, head)` of a `[B, Sq, H, width]` tensor.
    fn row_index(&self, qi: TokenStream, width: usize) -> TokenStream {
        let (h, width) = (lit(self.plan.q_heads), lit(width));
        quote!((((b * seq_q + q0 + #qi) * #h + head) * #width))
    }

    // --- State and scratch.

    /// Address of row `row`'s O in the state slot `state`.
    fn state_o(&self, row: TokenStream) -> TokenStream {
        let o_row = lit(self.plan.state.o_row);
        quote!(state.add(#row * #o_row))
    }

    fn state_m(&self) -> Literal {
        lit(self.plan.state.m)
    }

    fn state_l(&self) -> Literal {
        lit(self.plan.state.l)
    }

    /// Scratch address of a tile operand.
    fn tile_addr(&self, operand: Operand) -> TokenStream {
        let scratch = &self.plan.scratch;
        let (base, floats) = match operand {
            Operand::QueryTile => (quote!(group_scratch), scratch.queries),
            Operand::RopeTile => (quote!(group_scratch), scratch.rope_queries),
            Operand::QueryRows => (quote!(group_scratch), scratch.query_rows),
            Operand::KeyTile => (quote!(scratch), scratch.keys),
            Operand::ValueTile => (quote!(scratch), scratch.values),
            other => unreachable!("{other:?} is a tensor, not a scratch tile"),
        };
        let floats = lit(floats);
        quote!(#base.add(#floats))
    }

    fn for_each_group(&self, body: &[Op], tile: Option<Tile>) -> TokenStream {
        let plan = self.plan;
        let heads = self.group_size();
        let (multiple, shared, group_len) =
            (lit(plan.row_multiple), lit(plan.scratch.shared_len), lit(plan.scratch.group_len));
        let ranges = match tile {
            Some(Tile { partial: true, .. }) => self.write_row_ranges(),
            _ => TokenStream::new(),
        };
        let body = self.ops(body, tile);
        quote! {
            for i in 0..groups {
                let g = g0 + i;
                let rows = #heads * nq;
                let rows_v4 = rows.next_multiple_of(#multiple);
                let state = state0.add(i * state_stride);
                let group_scratch = scratch.add(#shared + i * #group_len);
                #ranges
                #body
            }
        }
    }

    fn init_state(&self) -> TokenStream {
        let (acc, m, l) = (lit(self.plan.acc_dim), self.state_m(), self.state_l());
        quote! {
            if resume == 0 {
                ::attngen::__private::zero(state, rows_v4 * #acc);
                for r in 0..rows_v4 {
                    *state.add(#m + r) = lowest;
                    *state.add(#l + r) = 0.0;
                }
            }
        }
    }

    // --- Query tiles.

    fn pack_queries(
        &self,
        from: Operand,
        offset: usize,
        len: usize,
        factor: f32,
        into: Operand,
        row_major: Option<DotScores>,
    ) -> TokenStream {
        let plan = self.plan;
        let tile = self.tile_addr(into);
        let (base, width) = match from {
            Operand::Q => (quote!(args.q), plan.q_width),
            Operand::LatentQ => (quote!(args.latent_q.cast_const()), plan.acc_dim),
            other => unreachable!("{other:?} holds no queries"),
        };
        let index = self.row_index(quote!(0), width);
        let (offset, row_floats, len_lit, panel, panel_len) =
            (lit(offset), lit(plan.q_heads * width), lit(len), lit(PANEL), lit(PANEL * len));
        let factor_lit = Literal::f32_suffixed(factor);
        let pack = self.for_each_head(quote! {
            let src = #base.add(#index + #offset);
            routines::pack_columns(nq, #len_lit, src, #row_floats, #factor_lit, tile, slot * nq, #panel_len, #panel);
        });
        let rows_major = if let Some(dot) = row_major {
            let dst = self.tile_addr(dot.query);
            let dots = self.rows_at_most(dot.max_rows);
            let index = self.row_index(quote!(qi), width);
            let copy = self.for_each_row(quote! {
                ::attngen::__private::scale_row(dst.add(row * #len_lit), #base.add(#index + #offset), #len_lit, #factor_lit);
            });
            quote! {
                if #dots {
                    let dst = #dst;
                    #copy
                    for row in rows..rows_v4 {
                        ::attngen::__private::zero(dst.add(row * #len_lit), #len_lit);
                    }
                }
            }
        } else {
            TokenStream::new()
        };
        quote! {
            {
                let tile = #tile;
                #pack
                for row in rows..rows_v4 {
                    let column = tile.add(row / #panel * #panel_len + row % #panel);
                    for d in 0..#len_lit {
                        *column.add(d * #panel) = 0.0;
                    }
                }
                #rows_major
            }
        }
    }

    /// Whether the work item's group has at most `max` rows.
    fn rows_at_most(&self, max: usize) -> TokenStream {
        let max = lit(max);
        quote!((rows <= #max))
    }

    /// Whether the work item's group has at least `min_rows` rows: enough to repay packing
    /// its own K/V tiles.
    fn packs(&self, min_rows: usize) -> TokenStream {
        let min = lit(min_rows);
        quote!((rows >= #min))
    }

    // --- Key and value tiles.

    fn cache_row(&self, operand: Operand) -> CacheRow {
        operand.cache_row(self.plan)
    }

    /// Address of cache tensor `operand`'s row at key `j0` for group `group` (wrapping: a
    /// prefetch may name the row past the tensor).
    fn kv_rows(&self, operand: Operand, j0: TokenStream, group: TokenStream) -> TokenStream {
        let CacheRow { width, stride } = self.cache_row(operand);
        let (width_lit, stride_lit) = (lit(width), lit(stride));
        match operand {
            Operand::K | Operand::V => {
                let base = if operand == Operand::K { quote!(args.k) } else { quote!(args.v) };
                let heads = lit(stride / width);
                quote!(#base.wrapping_add(((b * seq_k + #j0) * #heads + #group) * #width_lit))
            }
            Operand::CKv => quote!(args.c_kv.wrapping_add((b * seq_k + #j0) * #stride_lit)),
            Operand::KRope => quote!(args.k_rope.wrapping_add((b * seq_k + #j0) * #stride_lit)),
            other => unreachable!("{other:?} is not a cache tensor"),
        }
    }

    fn pack_tile(
        &self,
        from: Operand,
        into: Operand,
        width: usize,
        min_rows: usize,
        tile: Option<Tile>,
    ) -> TokenStream {
        assert!(tile.is_some(), "tile ops only appear inside KeyTiles");
        let packs = self.packs(min_rows);
        let src = self.kv_rows(from, quote!(j0), quote!(g));
        let stride = lit(self.cache_row(from).stride);
        let dst = self.tile_addr(into);
        let (dst_row, dst_panel) = if into == Operand::ValueTile {
            (lit(PANEL), lit(PANEL * self.plan.k_tile))
        } else {
            (lit(width), lit(PANEL))
        };
        let width = lit(width);
        quote! {
            if #packs && args.k_packed.is_null() {
                ::attngen::__private::pack_rows(n, #width, #src, #stride, #dst, #dst_row, #dst_panel);
            }
        }
    }

    /// Address and row stride of a key tile: the task's packed copy when there is one, else
    /// the item's packed tile when it packs, else the cache rows in place.
    fn key_side(&self, source: &TileSource, width: usize) -> TokenStream {
        let width_lit = lit(width);
        // CallPacking: key j at (j − packed_first_key)·D.
        let packed = source.call_packed.map(|layout| {
            let key_width = lit(layout.key_width);
            let side = quote! {
                (args.k_packed.add((j0 - args.packed_first_key) * #key_width), #width_lit)
            };
            (layout, side)
        });
        if let Some((_, side)) = packed.clone().filter(|(layout, _)| layout.up_projected) {
            return side;
        }
        let in_place = self.kv_rows(source.cache, quote!(j0), quote!(g));
        let stride = lit(self.cache_row(source.cache).stride);
        let mut side = quote!((#in_place, #stride));
        if let Some(item) = source.item_packed {
            let (packs, packed) = (self.packs(item.min_rows), self.tile_addr(item.tile));
            side = quote!(if #packs { (#packed.cast_const(), #width_lit) } else { #side });
        }
        if let Some((_, packed)) = packed {
            side = quote!(if !args.k_packed.is_null() { #packed } else { #side });
        }
        side
    }

    /// Address, row stride and panel stride of a value tile: the task's packed panels when
    /// there are some, else the item's packed tile when it packs, else the cache rows in place.
    fn value_side(&self, source: &TileSource) -> TokenStream {
        let panel = lit(PANEL);
        // CallPacking: key j's tile at (j − packed_first_key) / k_tile.
        let packed = source.call_packed.map(|layout| {
            let (k_tile, tile_floats, row, panel_floats) = (
                lit(layout.k_tile),
                lit(layout.value_tile()),
                lit(layout.value_row()),
                lit(layout.value_panel()),
            );
            let side = quote! {
                (args.v_packed.add((j0 - args.packed_first_key) / #k_tile * #tile_floats), #row, #panel_floats)
            };
            (layout, side)
        });
        if let Some((_, side)) = packed.clone().filter(|(layout, _)| layout.up_projected) {
            return side;
        }
        let in_place = self.kv_rows(source.cache, quote!(j0), quote!(g));
        let stride = lit(self.cache_row(source.cache).stride);
        let mut side = quote!((#in_place, #stride, #panel));
        if let Some(item) = source.item_packed {
            let (packs, packed) = (self.packs(item.min_rows), self.tile_addr(item.tile));
            let panel_floats = lit(PANEL * self.plan.k_tile);
            side =
                quote!(if #packs { (#packed.cast_const(), #panel, #panel_floats) } else { #side });
        }
        if let Some((_, packed)) = packed {
            side = quote!(if !args.v_packed.is_null() { #packed } else { #side });
        }
        side
    }

    /// The `*const PrefetchRows` a tile product gets for cache tensor `cache`: null for
    /// contiguous rows and for items reading the call's packed copy; else the rows the next
    /// group reads, or this group's share of the next tile (as `clif` describes).
    fn prefetch_next(&self, source: &TileSource, tile: Tile) -> TokenStream {
        if !source.prefetch {
            return quote!(::core::ptr::null());
        }
        let cache = source.cache;
        let CacheRow { width, stride } = self.cache_row(cache);
        let (size, stride, width_lit) = (lit(tile.size), lit(stride), lit(width));
        let fill = if tile.prefetch == Prefetch::WholeNextTile {
            let base = self.kv_rows(cache, quote!((j0 + #size)), quote!(g0));
            quote! {
                PrefetchRows {
                    base: #base, rows: #size, stride: #stride, width: groups * #width_lit,
                    part: g - g0, parts: groups,
                }
            }
        } else {
            let base = self.kv_rows(cache, quote!(next), quote!(next_group));
            quote! {{
                let last = g + 1 == g0 + groups;
                let (next, next_group) = if last { (j0 + #size, g0) } else { (j0, g + 1) };
                PrefetchRows {
                    base: #base, rows: #size, stride: #stride, width: #width_lit,
                    part: 0, parts: 1,
                }
            }}
        };
        match source.call_packed {
            Some(_) => quote! {{
                prefetch = #fill;
                if args.k_packed.is_null() { &raw const prefetch } else { ::core::ptr::null() }
            }},
            None => quote! {{
                prefetch = #fill;
                &raw const prefetch
            }},
        }
    }

    // --- The flash tile.

    fn scores(&self, term: &ScoreTerm, tile: Option<Tile>) -> TokenStream {
        let tile = tile.expect("tile ops only appear inside KeyTiles");
        let plan = self.plan;
        let key_side = self.key_side(&term.keys, term.len);
        let query = self.tile_addr(term.query);
        let (scores, ld, len, panel, panel_len, acc) = (
            lit(plan.scratch.scores),
            lit(plan.padded_rows),
            lit(term.len),
            lit(PANEL),
            lit(PANEL * term.len),
            lit(usize::from(term.accumulate)),
        );
        let prefetch = match term.accumulate {
            true => quote!(::core::ptr::null()),
            false => self.prefetch_next(&term.keys, tile),
        };
        // Edge tiles skip the blocks of keys no query row of the block sees.
        let (lows, highs) = self.range_tables(tile);
        let broadcast = quote! {
            routines::dot_nn(n, rows_v4, #len, a, a_row, 1, #query.cast_const(), #panel, #panel_len,
                c, #ld, 1, #acc, ::core::ptr::null(), ::core::ptr::null(), #lows, #highs, prefetch);
        };
        let product = if let Some(dot) = term.dot {
            let dots = self.rows_at_most(dot.max_rows);
            let rows = self.tile_addr(dot.query);
            quote! {
                if #dots {
                    routines::dot_nt(n, rows_v4, #len, a, a_row, #rows.cast_const(), #len, c, #ld, #acc, prefetch);
                } else {
                    #broadcast
                }
            }
        } else {
            broadcast
        };
        quote! {{
            let (a, a_row) = #key_side;
            let c = scratch.add(#scores);
            let prefetch: *const PrefetchRows = #prefetch;
            #product
        }}
    }

    fn online_softmax(
        &self,
        cap: Option<f32>,
        threshold: f32,
        partials: usize,
        o_transposed: bool,
        column_max: bool,
        tile: Option<Tile>,
    ) -> TokenStream {
        let tile = tile.expect("tile ops only appear inside KeyTiles");
        let plan = self.plan;
        let (scores, ld, ranges, acc, m, l) = (
            lit(plan.scratch.scores),
            lit(plan.padded_rows),
            lit(plan.scratch.ranges),
            lit(plan.acc_dim),
            self.state_m(),
            self.state_l(),
        );
        let capped = cap.map(|cap| {
            let cap = Literal::f32_suffixed(cap);
            quote!(s = ::attngen::__private::abi::softcap::log2_capped(s, #cap);)
        });
        let masked = tile.partial.then(|| {
            quote! {
                let key = j as i32;
                if !(key >= *lows.add(c) && key < *highs.add(c)) {
                    s = f32::NEG_INFINITY;
                }
            }
        });
        let store = (cap.is_some() || tile.partial).then(|| quote!(*row.add(lane) = s;));
        let threshold = Literal::f32_suffixed(threshold);
        // One block of `width` columns: their tile max (`s < t ? t : s`) down the tile, in
        // `partials` partial maxima combined pairwise (`Op::OnlineSoftmax`) — the routine's,
        // with `column_max`, which took it for every column before the blocks — then the lazy
        // rescale of their rows: m moves only where the tile max exceeds it by the threshold.
        // The max of finite scores does not depend on the order; a NaN score reaches its row
        // through `2^(s − m)`.
        let o_c = self.state_o(quote!(c));
        // Row c of O, or (transposed) nothing here: the block's rows are adjacent in every row
        // of Oᵀ, scaled together after the lanes.
        // A transposed O records each lane's factor, for the block's rows scaled together.
        let factors_record = o_transposed.then(|| quote!(factors[lane] = factor;));
        let (scale_o, scale_columns) = match o_transposed {
            false => (
                quote! {
                    let o = #o_c;
                    ::attngen::__private::scale_row(o, o, #acc, factor);
                },
                TokenStream::new(),
            ),
            true => (
                TokenStream::new(),
                quote! {
                    if factors.iter().any(|&f| f != 1.0) {
                        for d in 0..#acc {
                            let o = state.add(d * rows_v4 + c0);
                            for (lane, f) in factors.iter().enumerate() {
                                *o.add(lane) *= f;
                            }
                        }
                    }
                },
            ),
        };
        assert!(partials.is_power_of_two(), "partial maxima combine pairwise");
        let mut level: Vec<TokenStream> =
            (0..partials).map(|p| quote!(partial_max[#p][lane])).collect();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| {
                    let (a, b) = (&pair[0], &pair[1]);
                    quote!(max(#a, #b))
                })
                .collect();
        }
        let combined = &level[0];
        let partials = lit(partials);
        // The block's tile max: the routine's, or a pass down the block's columns.
        let block_max = |width: &Literal| match column_max {
            true => quote! {
                let tile_max: [f32; #width] = ::core::array::from_fn(|lane| *maxima.add(c0 + lane));
            },
            false => quote! {
                let step = |j: usize, partial: &mut [f32; #width]| {
                    let row = s_tile.add(j * #ld + c0);
                    for lane in 0..#width {
                        let c = c0 + lane;
                        let mut s = *row.add(lane);
                        #capped
                        #masked
                        #store
                        let t = partial[lane];
                        partial[lane] = if s < t { t } else { s };
                    }
                };
                let mut partial_max = [[f32::NEG_INFINITY; #width]; #partials];
                let mut j = 0;
                while j + #partials <= n {
                    for (copy, partial) in partial_max.iter_mut().enumerate() {
                        step(j + copy, partial);
                    }
                    j += #partials;
                }
                while j < n {
                    step(j, &mut partial_max[0]);
                    j += 1;
                }
                let tile_max: [f32; #width] = ::core::array::from_fn(|lane| {
                    let max = |a: f32, b: f32| if b < a { a } else { b };
                    #combined
                });
            },
        };
        let columns = |width: usize| {
            let width = lit(width);
            let factors_init = o_transposed.then(|| quote!(let mut factors = [1.0f32; #width];));
            let block_max = block_max(&width);
            quote! {{
                #block_max
                #factors_init
                for lane in 0..#width {
                    let c = c0 + lane;
                    let m_old = *state.add(#m + c);
                    if tile_max[lane] > m_old + #threshold {
                        let m_new = tile_max[lane];
                        let factor = ::attngen::__private::abi::exp2::eval(m_old - m_new);
                        #factors_record
                        *state.add(#l + c) *= factor;
                        *state.add(#m + c) = m_new;
                        if factor != 1.0 {
                            #scale_o
                        }
                    }
                }
                #scale_columns
            }}
        };
        // Blocks of a panel's width while they fit, then of the row multiple (rows_v4 is one):
        // fixed-width blocks become whole vectors, with no scalar tail.
        let (wide, narrow) = (columns(PANEL), columns(plan.row_multiple));
        let (panel, multiple) = (lit(PANEL), lit(plan.row_multiple));
        let maxima = lit(plan.scratch.tile_max);
        let routine_max = column_max.then(|| {
            quote! {
                let maxima = scratch.add(#maxima);
                routines::column_max(n, rows_v4, s_tile.cast_const(), #ld, maxima);
            }
        });
        quote! {{
            let s_tile = scratch.add(#scores);
            let lows = scratch.add(#ranges).cast::<i32>().cast_const();
            let highs = lows.add(#ld);
            #routine_max
            let mut c0 = 0;
            while c0 + #panel <= rows_v4 {
                #wide
                c0 += #panel;
            }
            while c0 < rows_v4 {
                #narrow
                c0 += #multiple;
            }
            routines::exp2_columns(n, rows_v4, s_tile, #ld, state.add(#m).cast_const(), state.add(#l));
        }}
    }

    fn accumulate_values(
        &self,
        values: &TileSource,
        width: usize,
        o_transposed: bool,
        tile: Option<Tile>,
    ) -> TokenStream {
        let tile = tile.expect("tile ops only appear inside KeyTiles");
        let plan = self.plan;
        let value_side = self.value_side(values);
        // C[i][j] at state[i·ldc + j·c_col]: O row-major, or Oᵀ (row i of O is column i).
        let (ldc, c_col) = match o_transposed {
            false => {
                let acc = lit(plan.acc_dim);
                (quote!(#acc), quote!(1))
            }
            true => (quote!(1), quote!(rows_v4)),
        };
        let (scores, ld, width) = (lit(plan.scratch.scores), lit(plan.padded_rows), lit(width));
        let prefetch = self.prefetch_next(values, tile);
        let (lows, highs) = self.range_tables(tile);
        quote! {{
            let (v, b_row, b_panel) = #value_side;
            let prefetch: *const PrefetchRows = #prefetch;
            routines::dot_nn(rows, #width, n, scratch.add(#scores).cast_const(), 1, #ld, v, b_row,
                b_panel, state, #ldc, #c_col, 1, #lows, #highs, ::core::ptr::null(),
                ::core::ptr::null(), prefetch);
        }}
    }

    /// An edge tile's per-row visible keys ([`Self::write_row_ranges`]) as a `dot_nn` range
    /// table pair — of C's rows for the value product, of its columns for the scores — and
    /// null pointers on full tiles.
    fn range_tables(&self, tile: Tile) -> (TokenStream, TokenStream) {
        if !tile.partial {
            return (quote!(::core::ptr::null()), quote!(::core::ptr::null()));
        }
        let (ranges, ld) = (lit(self.plan.scratch.ranges), lit(self.plan.padded_rows));
        (
            quote!(scratch.add(#ranges).cast::<i32>().cast_const()),
            quote!(scratch.add(#ranges + #ld).cast::<i32>().cast_const()),
        )
    }

    /// The visible keys `(lo, hi)` of query `i` under `mask`, within its sequence's keys and
    /// the item's key range, as a closure `bounds`.
    fn bounds(&self, mask: Mask) -> TokenStream {
        let range = match mask {
            Mask::None => quote!((0isize, keys as isize)),
            Mask::Causal => quote!((0isize, (diag + 1).min(keys as isize))),
            Mask::SlidingWindow(w) => {
                let w = Literal::isize_unsuffixed(w as isize);
                quote!(((diag + 1 - #w).max(0), (diag + 1).min(keys as isize)))
            }
        };
        quote! {
            let bounds = |i: usize| -> (isize, isize) {
                let diag = i as isize + keys as isize - seq_q as isize;
                let (lo, hi) = #range;
                (lo.max(k_lo as isize), hi.min(k_hi as isize))
            };
        }
    }

    /// The key loop: tiles from the first visible key's tile to the last visible key, each
    /// emitted twice — full (every row sees it whole: `n` is the constant tile) and edge.
    fn key_tiles(
        &self,
        size: usize,
        prefetch: Prefetch,
        narrow: bool,
        mask: Mask,
        body: &[Op],
    ) -> TokenStream {
        assert!(size.is_power_of_two(), "key tiles are aligned with a mask");
        let bounds = self.bounds(mask);
        let full = self.ops(body, Some(Tile { size, prefetch, narrow, partial: false }));
        let edge = self.ops(body, Some(Tile { size, prefetch, narrow, partial: true }));
        let size = lit(size);
        quote! {
            if nq > 0 {
                #bounds
                // Rows are sorted by query and bounds grow with it: the first query has the
                // smallest lo and hi, the last the largest.
                let (start, hi_min) = bounds(q0);
                let (lo_max, end) = bounds(q0 + nq - 1);
                let mut j0 = start & -(#size as isize);
                while j0 < end {
                    let n = (end - j0).min(#size) as usize;
                    if j0 >= lo_max && j0 + #size <= hi_min {
                        let (j0, n) = (j0 as usize, #size as usize);
                        #full
                    } else {
                        let j0 = j0 as usize;
                        #edge
                    }
                    j0 += #size;
                }
            }
        }
    }

    /// An edge tile's per-row visible keys relative to `j0`, clamped to `0..n`; the padding
    /// rows see nothing.
    fn write_row_ranges(&self) -> TokenStream {
        let (ranges, ld) = (lit(self.plan.scratch.ranges), lit(self.plan.padded_rows));
        let each = self.for_each_row(quote! {
            let (lo, hi) = bounds(q0 + qi);
            let clamp = |x: isize| (x - j0 as isize).max(0).min(n as isize) as i32;
            *lows.add(row) = clamp(lo);
            *highs.add(row) = clamp(hi);
        });
        quote! {
            let lows = scratch.add(#ranges).cast::<i32>();
            let highs = lows.add(#ld);
            #each
            for row in rows..rows_v4 {
                *lows.add(row) = 0;
                *highs.add(row) = 0;
            }
        }
    }

    /// `O = (Oᵀ)ᵀ` for the group's rows, through a copy of `Oᵀ` in the scratch tile `via`
    /// (`pack_rows`, one row): the copy's rows (one per element of a row of O) go back
    /// transposed by `pack_columns`, whose "panels" are then O's 16-float chunks and whose depth
    /// stride is O's row.
    fn restore_row_major(&self, via: Operand) -> TokenStream {
        let (copy, acc, panel) = (self.tile_addr(via), lit(self.plan.acc_dim), lit(PANEL));
        quote! {{
            let copy = #copy;
            let len = rows_v4 * #acc;
            ::attngen::__private::pack_rows(1, len, state.cast_const(), len, copy, len, #panel);
            routines::pack_columns(#acc, rows, copy.cast_const(), rows_v4, 1.0, state, 0, #panel, #acc);
        }}
    }

    // --- Finishing.

    fn merge_splits(&self) -> TokenStream {
        let (acc, m, l) = (lit(self.plan.acc_dim), self.state_m(), self.state_l());
        let (o_row, o_pitch) = (self.state_o(quote!(row)), lit(self.plan.state.o_row));
        let each = self.for_each_row(quote! {
            let m0 = *state.add(#m + row);
            let mut big_m = m0;
            for s in 1..n_states {
                let ms = *state.add(s * state_stride + #m + row);
                big_m = if big_m < ms { ms } else { big_m };
            }
            // Every m is finite, so each 2^(m_s − M) is a number in [0, 1].
            let c0 = ::attngen::__private::abi::exp2::eval(m0 - big_m);
            let mut l = *state.add(#l + row) * c0;
            let o0 = #o_row;
            ::attngen::__private::scale_row(o0, o0, #acc, c0);
            for s in 1..n_states {
                let slot = state.add(s * state_stride);
                let c = ::attngen::__private::abi::exp2::eval(*slot.add(#m + row) - big_m);
                l = (*slot.add(#l + row)).mul_add(c, l);
                ::attngen::__private::axpy_row(o0, slot.add(row * #o_pitch), #acc, c);
            }
            *state.add(#l + row) = l;
            *state.add(#m + row) = big_m;
        });
        quote! {
            if n_states > 1 {
                #each
            }
        }
    }

    fn normalize(&self) -> TokenStream {
        let (m, l) = (self.state_m(), self.state_l());
        self.for_each_row(quote! {
            let l = *state.add(#l + row);
            let m = *state.add(#m + row);
            let empty = l == 0.0;
            *state.add(#l + row) = if empty { 0.0 } else { 1.0 / l };
            let lse = m.mul_add(::core::f32::consts::LN_2, l.ln());
            *state.add(#m + row) = if empty { f32::NEG_INFINITY } else { lse };
        })
    }

    fn store_out(&self, into: Operand) -> TokenStream {
        let width = self.plan.acc_dim;
        let base = match into {
            Operand::Out => quote!(args.out),
            Operand::LatentOut => quote!(args.latent_out),
            other => unreachable!("{other:?} is not an output"),
        };
        let index = self.row_index(quote!(qi), width);
        let (acc, l, o_row) = (lit(width), self.state_l(), self.state_o(quote!(row)));
        self.for_each_row(quote! {
            ::attngen::__private::scale_row(#base.add(#index), #o_row, #acc, *state.add(#l + row));
        })
    }

    fn store_lse(&self) -> TokenStream {
        let index = self.row_index(quote!(qi), 1);
        let m = self.state_m();
        let each = self.for_each_row(quote! {
            *args.lse.add(#index) = *state.add(#m + row);
        });
        quote! {
            if !args.lse.is_null() {
                #each
            }
        }
    }

    // --- Absorbed MLA's per-head programs.

    fn absorb_queries(&self, nope: usize, rank: usize) -> TokenStream {
        let h = self.plan.q_heads;
        let width = self.plan.q_width;
        let (q_head, w_head, c_head, lda, ldc, nope, rank, panel) = (
            lit(width),
            lit(nope * rank),
            lit(rank),
            lit(h * width),
            lit(h * rank),
            lit(nope),
            lit(rank),
            lit(PANEL),
        );
        quote! {
            routines::dot_nn(args.batch * args.seq_q, #rank, #nope, args.q.add(head * #q_head), #lda, 1,
                args.w_uk.add(head * #w_head), #rank, #panel, args.latent_q.add(head * #c_head), #ldc,
                1, 0, ::core::ptr::null(), ::core::ptr::null(), ::core::ptr::null(),
                ::core::ptr::null(), ::core::ptr::null());
        }
    }

    fn project_out(&self, rank: usize, v_dim: usize) -> TokenStream {
        let h = self.plan.q_heads;
        let (a_head, w_head, lda, ldc, rank, v_dim_lit) =
            (lit(rank), lit(v_dim * rank), lit(h * rank), lit(h * v_dim), lit(rank), lit(v_dim));
        quote! {
            routines::dot_nt(args.batch * args.seq_q, #v_dim_lit, #rank,
                args.latent_out.add(head * #a_head).cast_const(), #lda, args.w_uv.add(head * #w_head),
                #rank, args.out.add(head * #v_dim_lit), #ldc, 0, ::core::ptr::null());
        }
    }

    /// Prologue (expanded MLA): `weights_t[h] = [W_UK[h]ᵀ, W_UV[h]ᵀ]` in column panels.
    fn transpose_weights(&self, rank: usize, nope: usize, v_dim: usize) -> TokenStream {
        let (per_head, values_at) = self.transposed_weights();
        let (per_head, panel, depth) = (lit(per_head), lit(PANEL * rank), lit(PANEL));
        let parts =
            [(quote!(w_uk), nope, 0), (quote!(w_uv), v_dim, values_at)].map(|(w, width, at)| {
                let (head, width, at, rank) = (lit(width * rank), lit(width), lit(at), lit(rank));
                quote! {
                    routines::pack_columns(#width, #rank, args.#w.add(head * #head), #rank, 1.0,
                        args.weights_t.add(head * #per_head + #at), 0, #panel, #depth);
                }
            });
        quote!(#(#parts)*)
    }

    /// The head's transposed weights: floats per head and where `W_UV[h]ᵀ` starts.
    fn transposed_weights(&self) -> (usize, usize) {
        self.plan.transposed_weights().expect("expanded plans transpose their weights")
    }

    /// `c = c_kv rows · B` (`width` columns, row stride `ldc`), B the head's transposed
    /// weights from float `at`: the up-projection's broadcast product.
    fn up_project(
        &self,
        rank: usize,
        width: usize,
        at: usize,
        c: TokenStream,
        ldc: usize,
    ) -> TokenStream {
        let (per_head, _) = self.transposed_weights();
        let (per_head, at, panel, b_panel) =
            (lit(per_head), lit(at), lit(PANEL), lit(PANEL * rank));
        let lda = lit(self.cache_row(Operand::CKv).stride);
        let (rank, width, ldc) = (lit(rank), lit(width), lit(ldc));
        quote! {
            routines::dot_nn(n, #width, #rank, args.c_kv.add(latent_row * #lda), #lda, 1,
                args.weights_t.add(head * #per_head + #at).cast_const(), #panel, #b_panel, #c, #ldc,
                1, 0, ::core::ptr::null(), ::core::ptr::null(), ::core::ptr::null(),
                ::core::ptr::null(), ::core::ptr::null());
        }
    }

    /// Expand: `keys[r] = [c_kv[b, j0 + r] · W_UK[h]ᵀ, k_rope[b, j0 + r]]` for r < n.
    fn expand_keys(&self, rank: usize, nope: usize, rope: usize) -> TokenStream {
        let d = nope + rope;
        let mut code = self.up_project(rank, nope, 0, quote!(keys), d);
        let (d, nope_lit) = (lit(d), lit(nope));
        if rope > 0 {
            let (rope, panel) = (lit(rope), lit(PANEL));
            let src_row = lit(self.cache_row(Operand::KRope).stride);
            code.extend(quote! {
                ::attngen::__private::pack_rows(n, #rope, args.k_rope.add(latent_row * #src_row),
                    #src_row, keys.add(#nope_lit), #d, #panel);
            });
        }
        code
    }

    /// Expand: `values[r] = c_kv[b, j0 + r] · W_UV[h]ᵀ` for r < n, rows `row` floats apart.
    fn expand_values(&self, rank: usize, v_dim: usize, row: usize) -> TokenStream {
        let (_, values_at) = self.transposed_weights();
        self.up_project(rank, v_dim, values_at, quote!(values), row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row-major query copies of dot-product scores read the operand and offset the op
    /// names: absorbed MLA's latent queries from 0, and `q` from the RoPE part's offset.
    #[test]
    fn row_major_query_copies_read_the_named_operand_and_offset() {
        let (plan, ir) = crate::ir::row_major_latent_ir();
        let code = functions(&plan, &ir, &TokenStream::new()).to_string();
        let copies: Vec<&str> = code
            .match_indices("scale_row (dst . add (row *")
            .map(|(at, _)| code[at..].split(';').next().unwrap())
            .collect();
        let [latent, rope] = copies[..] else { panic!("{copies:?}") };
        assert!(latent.contains("args . latent_q") && latent.contains("* 48) + 0)"), "{latent}");
        assert!(rope.contains("args . q .") && rope.contains("* 24) + 16)"), "{rope}");
    }
}
