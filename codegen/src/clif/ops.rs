//! The op dispatch and the loop structure of a work item: groups, state, key tiles and edge-tile ranges.

use super::*;

impl Translator<'_> {
    pub(super) fn op(&mut self, op: &Op) {
        match op {
            Op::PackQueries { from, offset, len, factor, into, row_major } => {
                self.pack_queries(*from, *offset, *len, *factor, *into, *row_major)
            }
            Op::AbsorbQueries { nope, rank } => self.absorb_queries(*nope, *rank),
            Op::InitState => self.init_state(),
            Op::ForEachGroup { body } => {
                self.for_each_group(|t| body.iter().for_each(|op| t.op(op)))
            }
            Op::KeyTiles { tile, prefetch, narrow, mask, body } => match narrow {
                None => self.key_tiles(*tile, *prefetch, false, *mask, body),
                Some(narrow) => {
                    let few = self.rows_at_most(narrow.max_rows);
                    let pre = self.prepacked();
                    let in_place = self.b.ins().band_not(few, pre);
                    self.if_else(
                        in_place,
                        |t| t.key_tiles(narrow.tile, narrow.prefetch, true, *mask, body),
                        |t| t.key_tiles(*tile, *prefetch, false, *mask, body),
                    );
                }
            },
            Op::RestoreRowMajor { via } => self.restore_row_major(*via),
            Op::MergeSplits => self.merge_splits(),
            Op::Normalize => self.normalize(),
            Op::StoreOut { into } => self.store_out(*into),
            Op::ProjectOut { rank, v_dim } => self.project_out(*rank, *v_dim),
            Op::StoreLse => self.store_lse(),
            Op::TransposeWeights { rank, nope, v_dim } => {
                self.transpose_weights(*rank, *nope, *v_dim)
            }
            Op::ExpandKeys { rank, nope, rope } => self.expand_keys(*rank, *nope, *rope),
            Op::ExpandValues { rank, v_dim, row } => self.expand_values(*rank, *v_dim, *row),
            Op::Scores(_)
            | Op::OnlineSoftmax { .. }
            | Op::AccumulateValues { .. }
            | Op::PackTile { .. } => {
                unreachable!("tile ops only appear inside KeyTiles")
            }
        }
    }

    pub(super) fn tile_op(&mut self, op: &Op, tile: Tile) {
        match op {
            Op::PackTile { from, into, width, min_rows } => {
                self.pack_tile(*from, *into, *width, *min_rows, tile)
            }
            Op::Scores(term) => self.scores(term, tile),
            Op::OnlineSoftmax { cap, threshold, partials, o_transposed, column_max } => {
                let column_max =
                    crate::ir::routine_tile_max(*column_max, tile.narrow, tile.partial);
                self.online_softmax(*cap, *threshold, *partials, *o_transposed, column_max, tile)
            }
            Op::AccumulateValues { values, width, o_transposed } => {
                self.accumulate_values(values, *width, *o_transposed, tile)
            }
            // An edge tile's row ranges depend on the group's rows: written per group.
            Op::ForEachGroup { body } => self.for_each_group(|t| {
                if tile.partial {
                    t.write_row_ranges(tile.j0, tile.n);
                }
                body.iter().for_each(|op| t.tile_op(op, tile))
            }),
            other => unreachable!("{other:?} is not a tile op"),
        }
    }

    /// Emits `body` once per group of the item, in a loop: the group, its rows, its state
    /// slot and its scratch block are rebound for the body and restored after.
    pub(super) fn for_each_group(&mut self, body: impl Fn(&mut Self)) {
        let saved = (self.group, self.rows, self.rows_v4, self.state, self.group_scratch);
        let zero = self.int(0);
        let (group0, groups, state0, stride) =
            (self.group0, self.groups, self.state0, self.state_stride);
        self.for_range(zero, groups, 1, |t, i| {
            t.group = t.add(group0, i);
            let heads = t.group_size();
            t.rows = t.mul(heads, t.nq);
            t.rows_v4 = t.pad_rows(t.rows);
            let slot = t.mul(i, stride);
            t.state = t.float_addr(state0, slot);
            let block = t.mul_imm(i, t.plan.scratch.group_len);
            let block = t.add_imm(block, t.plan.scratch.shared_len);
            t.group_scratch = t.float_addr(t.scratch, block);
            body(t);
        });
        (self.group, self.rows, self.rows_v4, self.state, self.group_scratch) = saved;
    }

    pub(super) fn init_state(&mut self) {
        let fresh = self.b.ins().icmp_imm_u(IntCC::Equal, self.resume, 0);
        self.if_then(fresh, Self::clear_state);
    }

    /// `O = 0`, `l = 0`, `m = f32::MIN` for the current group's state (`Op::InitState`).
    fn clear_state(&mut self) {
        let zero = self.int(0);
        let state = self.state;
        // O = 0, l = 0, m = f32::MIN for the group's rows up to rows_v4, the rows the softmax's
        // vectors and the rescale touch; the slot's rows past them (up to `padded_rows`, the
        // largest group's) are never read. A decode item's group has 4 rows of 64: clearing
        // every row cost about 16 µs per Llama-3-8B item, as much as 16 keys of work.
        let o_len = self.mul_imm(self.rows_v4, self.plan.acc_dim);
        self.zero_vectors(state, o_len);
        let scalar_zero = self.f32(0.0);
        // m starts at the most negative finite float, not −∞: every later `s − m` and
        // `m − m'` is then −∞ at worst, never NaN, and its 2^x is 0.
        let lowest = self.f32(f32::MIN);
        let rows_v = self.rows_v4;
        self.for_range(zero, rows_v, 1, |t, r| {
            let m = t.state_m(state, r);
            t.b.ins().store(mem(), lowest, m, 0);
            let l = t.state_l(state, r);
            t.b.ins().store(mem(), scalar_zero, l, 0);
        });
    }

    pub(super) fn key_tiles(
        &mut self,
        tile: usize,
        prefetch: Prefetch,
        narrow: bool,
        mask: Mask,
        body: &[Op],
    ) {
        self.mask = mask;
        let zero = self.int(0);
        let empty = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, self.nq, zero);
        // Rows are sorted by query, and bounds grow with the query: the first query has the
        // smallest lo and hi, the last the largest.
        let first = self.q0;
        let last = self.add(self.q0, self.nq);
        let last = self.b.ins().iadd_imm_s(last, -1);
        let (start, hi_min) = self.row_bounds(first);
        let (lo_max, end) = self.row_bounds(last);
        // Tiles start on multiples of `tile` (the call-level packed copy is stored per tile);
        // keys before the first visible one fall in an edge tile and are masked.
        assert!(tile.is_power_of_two(), "key tiles are aligned with a mask");
        let start = self.b.ins().band_imm_s(start, -(tile as i64));
        let proceed = self.b.ins().bnot(empty);
        self.if_then(proceed, |t| {
            t.for_range(start, end, tile, |t, j0| {
                let left = t.b.ins().isub(end, j0);
                let width = t.int(tile as i64);
                let n = t.b.ins().smin(left, width);
                // A tile is full when every row sees all of it.
                let j1 = t.add_imm(j0, tile);
                let after_lo = t.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, j0, lo_max);
                let before_hi = t.b.ins().icmp(IntCC::SignedLessThanOrEqual, j1, hi_min);
                let full = t.b.ins().band(after_lo, before_hi);
                let full_block = t.b.create_block();
                let partial_block = t.b.create_block();
                let done = t.b.create_block();
                t.b.ins().brif(full, full_block, &[], partial_block, &[]);
                t.b.switch_to_block(full_block);
                t.b.seal_block(full_block);
                // A full tile has exactly `tile` keys: a constant for the loops.
                let n_full = t.int(tile as i64);
                for op in body {
                    let tile = Tile { size: tile, prefetch, j0, n: n_full, narrow, partial: false };
                    t.tile_op(op, tile);
                }
                t.b.ins().jump(done, &[]);
                t.b.switch_to_block(partial_block);
                t.b.seal_block(partial_block);
                for op in body {
                    t.tile_op(op, Tile { size: tile, prefetch, j0, n, narrow, partial: true });
                }
                t.b.ins().jump(done, &[]);
                t.b.switch_to_block(done);
                t.b.seal_block(done);
            });
        });
    }

    /// For an edge tile: each row's visible keys relative to `j0`, clamped to `0..n`, as i32
    /// lows then highs in scratch; the padding rows up to `rows_v4` see nothing.
    pub(super) fn write_row_ranges(&mut self, j0: Value, n: Value) {
        let (lows, highs) = self.range_tables();
        self.for_each_row(|t, _, _, qi, row| {
            let i = t.add(t.q0, qi);
            let (lo, hi) = t.row_bounds(i);
            let zero = t.int(0);
            let clamp = |t: &mut Self, x: Value| {
                let rel = t.b.ins().isub(x, j0);
                let rel = t.b.ins().smax(rel, zero);
                let rel = t.b.ins().smin(rel, n);
                t.b.ins().ireduce(types::I32, rel)
            };
            let (lo, hi) = (clamp(t, lo), clamp(t, hi));
            let offset = t.mul_imm(row, 4);
            let (lo_at, hi_at) = (t.add(lows, offset), t.add(highs, offset));
            t.b.ins().store(mem(), lo, lo_at, 0);
            t.b.ins().store(mem(), hi, hi_at, 0);
        });
        let none = self.b.ins().iconst(types::I32, 0);
        let (rows, rows_v4) = (self.rows, self.rows_v4);
        self.for_range(rows, rows_v4, 1, |t, row| {
            let offset = t.mul_imm(row, 4);
            let (lo_at, hi_at) = (t.add(lows, offset), t.add(highs, offset));
            t.b.ins().store(mem(), none, lo_at, 0);
            t.b.ins().store(mem(), none, hi_at, 0);
        });
    }

    /// Addresses of the row-range tables: lows, then highs.
    pub(super) fn range_tables(&mut self) -> (Value, Value) {
        let zero = self.int(0);
        let lows = self.scratch_at(self.plan.scratch.ranges, zero);
        let highs = self.add_imm(lows, 4 * self.plan.padded_rows);
        (lows, highs)
    }
}
