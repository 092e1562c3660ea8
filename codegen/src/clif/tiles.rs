//! Query and K/V tiles: packing, tile addresses, the call-packed copies and prefetching.

use super::*;

impl Translator<'_> {
    /// Scratch address of a tile operand: the query tiles in the current group's block, the
    /// K/V tiles in the shared part.
    pub(super) fn tile_addr(&mut self, operand: Operand) -> Value {
        let scratch = &self.plan.scratch;
        let (base, floats) = match operand {
            Operand::QueryTile => (self.group_scratch, scratch.queries),
            Operand::RopeTile => (self.group_scratch, scratch.rope_queries),
            Operand::QueryRows => (self.group_scratch, scratch.query_rows),
            Operand::KeyTile => (self.scratch, scratch.keys),
            Operand::ValueTile => (self.scratch, scratch.values),
            other => unreachable!("{other:?} is a tensor, not a scratch tile"),
        };
        self.add_imm(base, 4 * floats)
    }

    /// Qᵀ: `factor · q` of every row, transposed into [`PANEL`]-column panels (`len` deep),
    /// one `PackColumns` call per head; the columns from `rows` up to `rows_v4` are zero, so
    /// the score product may cover them.
    pub(super) fn pack_queries(
        &mut self,
        from: Operand,
        offset: usize,
        len: usize,
        factor: f32,
        into: Operand,
        row_major: Option<DotScores>,
    ) {
        let tile = self.tile_addr(into);
        let (base, width) = self.query_rows(from);
        let row_floats = self.plan.q_heads * width;
        self.for_each_head(|t, slot, head| {
            let zero = t.int(0);
            let idx = t.row_index(head, zero, width);
            let idx = t.add_imm(idx, offset);
            let queries = t.arg(base);
            let src = t.float_addr(queries, idx);
            let first_column = t.mul(slot, t.nq);
            t.pack_columns(t.nq, len, src, row_floats, factor, tile, first_column);
        });
        self.zero_padding_columns(tile, len);
        if let Some(dot) = row_major {
            let few = self.rows_at_most(dot.max_rows);
            self.if_then(few, |t| t.pack_query_rows(from, offset, len, factor, dot.query));
        }
    }

    /// Whether the work item's group has at most `max` rows.
    pub(super) fn rows_at_most(&mut self, max: usize) -> Value {
        let max = self.int(max as i64);
        self.b.ins().icmp(IntCC::SignedLessThanOrEqual, self.rows, max)
    }

    /// The `CallArgs` field holding `from`'s rows (`Q` or the prologue's `LatentQ`) and the
    /// floats per head of a row.
    fn query_rows(&self, from: Operand) -> (i32, usize) {
        match from {
            Operand::Q => (offsets::Q, self.plan.q_width),
            Operand::LatentQ => (offsets::LATENT_Q, self.plan.acc_dim),
            other => unreachable!("{other:?} holds no queries"),
        }
    }

    /// `factor · from[b, q0 + qi, h, offset..offset + len]` of every row, row-major into `into`
    /// (rows `rows..rows_v4` zero), for dot-product scores.
    fn pack_query_rows(
        &mut self,
        from: Operand,
        offset: usize,
        len: usize,
        factor: f32,
        into: Operand,
    ) {
        let dst = self.tile_addr(into);
        let (base, width) = self.query_rows(from);
        self.for_each_row(|t, _, head, qi, row| {
            let idx = t.row_index(head, qi, width);
            let idx = t.add_imm(idx, offset);
            let q = t.arg(base);
            let src = t.float_addr(q, idx);
            let at = t.mul_imm(row, len);
            let at = t.float_addr(dst, at);
            let factor = t.f32(factor);
            t.scale_row(at, src, len, factor);
        });
        let (rows, rows_v4) = (self.rows, self.rows_v4);
        self.for_range(rows, rows_v4, 1, |t, row| {
            let at = t.mul_imm(row, len);
            let at = t.float_addr(dst, at);
            t.zero_floats(at, len);
        });
    }

    /// `dst[0..len] = 0`: a vector loop, then a scalar tail.
    pub(super) fn zero_floats(&mut self, dst: Value, len: usize) {
        let vectors = self.int((len / 4 * 4) as i64);
        self.zero_vectors(dst, vectors);
        let zero = self.f32(0.0);
        for c in len / 4 * 4..len {
            self.b.ins().store(mem(), zero, dst, 4 * c as i32);
        }
    }

    /// `dst[0..len] = 0` for a multiple of 4 known at run time: one vector store per trip, the
    /// loop counting the address itself (nothing to recompute per store).
    pub(super) fn zero_vectors(&mut self, dst: Value, len: Value) {
        let zeros = self.splat(0.0);
        let bytes = self.mul_imm(len, 4);
        let end = self.add(dst, bytes);
        self.for_range(dst, end, 16, |t, at| {
            t.b.ins().store(mem(), zeros, at, 0);
        });
    }

    /// Calls `PackColumns`: `rows` rows of `len` floats at `src` into columns
    /// `first_column..` of the panel-packed tile at `tile`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pack_columns(
        &mut self,
        rows: Value,
        len: usize,
        src: Value,
        src_row: usize,
        factor: f32,
        tile: Value,
        first_column: Value,
    ) {
        let (width, src_row, panel, depth) = (
            self.int(len as i64),
            self.int(src_row as i64),
            self.int((PANEL * len) as i64),
            self.int(PANEL as i64),
        );
        let factor = self.f32(factor);
        let args = [rows, width, src, src_row, factor, tile, first_column, panel, depth];
        self.call(Callee::PackColumns, &args);
    }

    /// Address of column `row`, depth 0, of a panel-packed transposed tile `len` deep.
    pub(super) fn panel_column(&mut self, tile: Value, len: usize, row: Value) -> Value {
        let panel = self.b.ins().ushr_imm_u(row, i64::from(PANEL.trailing_zeros()));
        let panel_floats = self.mul_imm(panel, PANEL * len);
        let lane = self.b.ins().band_imm_s(row, PANEL as i64 - 1);
        let idx = self.add(panel_floats, lane);
        self.float_addr(tile, idx)
    }

    /// Zeroes columns `rows..rows_v4` of a transposed tile `len` deep.
    pub(super) fn zero_padding_columns(&mut self, tile: Value, len: usize) {
        let zero = self.f32(0.0);
        let (rows, rows_v4) = (self.rows, self.rows_v4);
        self.for_range(rows, rows_v4, 1, |t, row| {
            let dst = t.panel_column(tile, len, row);
            let start = t.int(0);
            let end = t.int(len as i64);
            t.for_range(start, end, 1, |t, d| {
                let d_floats = t.mul_imm(d, PANEL);
                let at = t.float_addr(dst, d_floats);
                t.b.ins().store(mem(), zero, at, 0);
            });
        });
    }

    /// Whether the work item's group has at least `min_rows` rows: enough to repay packing
    /// its own K/V tiles.
    pub(super) fn packs(&mut self, min_rows: usize) -> Value {
        let min_rows = self.int(min_rows as i64);
        self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, self.rows, min_rows)
    }

    /// Copies the tile's rows of `from` (when this item packs): into a row-major key tile, or
    /// into the value tile's [`PANEL`]-column panels (`k_tile` deep).
    pub(super) fn pack_tile(
        &mut self,
        from: Operand,
        into: Operand,
        width: usize,
        min_rows: usize,
        tile: Tile,
    ) {
        // Nothing to copy when this item reads the task's packed copy or the cache in place.
        let packs = self.packs(min_rows);
        let pre = self.prepacked();
        let copies = self.b.ins().band_not(packs, pre);
        let k_tile = self.plan.k_tile;
        self.if_then(copies, |t| {
            let (src, stride) = t.kv_rows(from, tile.j0);
            let dst = t.tile_addr(into);
            let (dst_row, dst_panel) =
                if into == Operand::ValueTile { (PANEL, PANEL * k_tile) } else { (width, PANEL) };
            let (width, stride, dst_row, dst_panel) = (
                t.int(width as i64),
                t.int(stride as i64),
                t.int(dst_row as i64),
                t.int(dst_panel as i64),
            );
            let args = [tile.n, width, src, stride, dst, dst_row, dst_panel];
            t.call(Callee::PackRows, &args);
        });
    }

    /// Fills the stack [`PrefetchRows`] with the rows of cache tensor `cache` this group's
    /// products should prefetch, and returns its address: strided cache rows lie a page apart,
    /// past the hardware prefetchers. Null for contiguous rows.
    ///
    /// An item walks each key tile group by group. Where a whole tile of its rows spans few
    /// enough pages ([`KernelPlan::prefetches_whole_tiles`]), the group at position i of n asks
    /// for share i of n of the next tile's rows across all the item's groups (adjacent within a
    /// row; whole rows when the item covers every group, as decode items do): the next tile
    /// arrives one tile ahead, in address order. That measured 1.07–1.1× faster on W4 than the
    /// other way, which larger tiles keep: each group asks for the next group's rows of this
    /// tile (after the last group, the first group's of the next tile), 512-byte pieces of 16
    /// pages at a time on W4.
    pub(super) fn prefetch_next(&mut self, source: &TileSource, tile: Tile) -> Value {
        // Contiguous rows (one KV head, MLA's latent) stream through the hardware prefetchers.
        if !source.prefetch {
            return self.int(0);
        }
        let cache = source.cache;
        let width = self.row_width(cache);
        let (k_tile, j0) = (tile.size, tile.j0);
        let next_tile = self.add_imm(j0, k_tile);
        let group = self.group;
        let (base, stride, row, part, parts) = if tile.prefetch == Prefetch::WholeNextTile {
            self.group = self.group0;
            let (base, stride) = self.kv_rows(cache, next_tile);
            let part = self.b.ins().isub(group, self.group0);
            (base, stride, self.mul_imm(self.groups, width), part, self.groups)
        } else {
            let next_group = self.add_imm(group, 1);
            let end = self.add(self.group0, self.groups);
            let last = self.b.ins().icmp(IntCC::Equal, next_group, end);
            let next = self.b.ins().select(last, next_tile, j0);
            self.group = self.b.ins().select(last, self.group0, next_group);
            let (base, stride) = self.kv_rows(cache, next);
            (base, stride, self.int(width as i64), self.int(0), self.int(1))
        };
        self.group = group;
        let (rows, stride) = (self.int(k_tile as i64), self.int(stride as i64));
        let at = self.prefetch;
        for (value, offset) in [
            (base, prefetch_offsets::BASE),
            (rows, prefetch_offsets::ROWS),
            (stride, prefetch_offsets::STRIDE),
            (row, prefetch_offsets::WIDTH),
            (part, prefetch_offsets::PART),
            (parts, prefetch_offsets::PARTS),
        ] {
            self.b.ins().store(mem(), value, at, offset);
        }
        // Items reading the task's packed copy stream it contiguously: no prefetch needed.
        if source.call_packed.is_none() {
            return at;
        }
        let pre = self.prepacked();
        let none = self.int(0);
        self.b.ins().select(pre, none, at)
    }

    /// Address and row stride of a key tile (the broadcast side of the score product): the
    /// task's packed copy when there is one, else the item's packed tile when it packs, else
    /// the cache rows in place.
    pub(super) fn key_side(
        &mut self,
        source: &TileSource,
        width: usize,
        j0: Value,
    ) -> (Value, Value) {
        let packed = source.call_packed.map(|layout| {
            // CallPacking: key j at (j − packed_first_key)·D.
            let first = self.arg(offsets::PACKED_FIRST_KEY);
            let row = self.b.ins().isub(j0, first);
            let idx = self.mul_imm(row, layout.key_width);
            let base = self.arg(offsets::K_PACKED);
            (layout, self.float_addr(base, idx))
        });
        let width_v = self.int(width as i64);
        if let Some((layout, packed)) = packed.filter(|(layout, _)| layout.up_projected) {
            debug_assert_eq!(layout.key_width, width);
            return (packed, width_v);
        }
        let (in_place, stride) = self.kv_rows(source.cache, j0);
        let item = source.item_packed.map(|item| {
            let packed = self.tile_addr(item.tile);
            let packs = self.packs(item.min_rows);
            (packs, self.b.ins().select(packs, packed, in_place))
        });
        if item.is_none() && packed.is_none() {
            return (in_place, self.int(stride as i64));
        }
        let addr = item.map_or(in_place, |(_, addr)| addr);
        let stride = self.int(stride as i64);
        let stride = match item {
            Some((packs, _)) => self.b.ins().select(packs, width_v, stride),
            None => stride,
        };
        let Some((_, packed)) = packed else { return (addr, stride) };
        let pre = self.prepacked();
        (self.b.ins().select(pre, packed, addr), self.b.ins().select(pre, width_v, stride))
    }

    /// Whether the task's K and V are packed (`CallArgs::k_packed` is set).
    pub(super) fn prepacked(&mut self) -> Value {
        let k_packed = self.arg(offsets::K_PACKED);
        self.b.ins().icmp_imm_s(IntCC::NotEqual, k_packed, 0)
    }

    /// Address, row stride and panel stride of a value tile (B of the value product): the
    /// task's packed panels when there are some, else the item's packed tile when it packs,
    /// else the cache rows in place. Both packed forms store a tile as panels `k_tile` deep.
    pub(super) fn value_side(&mut self, source: &TileSource, j0: Value) -> (Value, Value, Value) {
        let call = source.call_packed.map(|layout| {
            // CallPacking: key j's tile at (j − packed_first_key) / k_tile.
            let first = self.arg(offsets::PACKED_FIRST_KEY);
            let key = self.b.ins().isub(j0, first);
            let tile = self.b.ins().udiv_imm_u(key, layout.k_tile as i64);
            let idx = self.mul_imm(tile, layout.value_tile());
            let base = self.arg(offsets::V_PACKED);
            (layout, self.float_addr(base, idx))
        });
        if let Some((layout, packed)) = call.filter(|(layout, _)| layout.up_projected) {
            let (row, panel) =
                (self.int(layout.value_row() as i64), self.int(layout.value_panel() as i64));
            return (packed, row, panel);
        }
        let (in_place, stride) = self.kv_rows(source.cache, j0);
        let (panel_row, panel) = (self.int(PANEL as i64), self.int(PANEL as i64));
        let stride = self.int(stride as i64);
        if source.item_packed.is_none() && call.is_none() {
            return (in_place, stride, panel);
        }
        let packed_panel_floats = PANEL * self.plan.k_tile;
        if let Some((layout, _)) = call {
            assert_eq!(layout.value_panel(), packed_panel_floats, "one panel depth for both");
        }
        let item = source.item_packed.map(|item| self.tile_addr(item.tile));
        let packed_panel = self.int(packed_panel_floats as i64);
        let item = item.zip(source.item_packed).map(|(packed, item)| {
            let packs = self.packs(item.min_rows);
            (packs, self.b.ins().select(packs, packed, in_place))
        });
        let addr = item.map_or(in_place, |(_, addr)| addr);
        let (addr, packed) = match call {
            Some((_, call_packed)) => {
                let pre = self.prepacked();
                let packed = match item {
                    Some((packs, _)) => self.b.ins().bor(packs, pre),
                    None => pre,
                };
                (self.b.ins().select(pre, call_packed, addr), packed)
            }
            None => (addr, item.map(|(packs, _)| packs).expect("an item-packed source")),
        };
        (
            addr,
            self.b.ins().select(packed, panel_row, stride),
            self.b.ins().select(packed, packed_panel, panel),
        )
    }
}
