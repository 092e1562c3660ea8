//! The flash tile: scores, the online softmax and the value product.

use super::*;

impl Translator<'_> {
    /// `Sᵀ (+)= keys · Qᵀ`: `n` keys by `rows_v4` columns.
    pub(super) fn scores(&mut self, term: &ScoreTerm, tile: Tile) {
        let (a, a_row) = self.key_side(&term.keys, term.len, tile.j0);
        let b = self.tile_addr(term.query);
        let zero = self.int(0);
        let c = self.scratch_at(self.plan.scratch.scores, zero);
        let (len, one, panel, panel_len, ldc, acc) = (
            self.int(term.len as i64),
            self.int(1),
            self.int(PANEL as i64),
            self.int((PANEL * term.len) as i64),
            self.int(self.plan.padded_rows as i64),
            self.int(i64::from(term.accumulate)),
        );
        // The first term prefetches the next rows of the keys it reads, when they are strided.
        let prefetch = match term.accumulate {
            true => zero,
            false => self.prefetch_next(&term.keys, tile),
        };
        let (n, rows_v4) = (tile.n, self.rows_v4);
        // Edge tiles skip the blocks of keys no query row of the block sees.
        let (lows, highs) = if tile.partial { self.range_tables() } else { (zero, zero) };
        let broadcast = |t: &mut Self| {
            let args = [
                n, rows_v4, len, a, a_row, one, b, panel, panel_len, c, ldc, one, acc, zero, zero,
                lows, highs, prefetch,
            ];
            t.call(Callee::DotNn, &args);
        };
        if let Some(dot) = term.dot {
            let few = self.rows_at_most(dot.max_rows);
            self.if_else(
                few,
                |t| {
                    let rows = t.tile_addr(dot.query);
                    let args = [n, rows_v4, len, a, a_row, rows, len, c, ldc, acc, prefetch];
                    t.call(Callee::DotNt, &args);
                },
                broadcast,
            );
        } else {
            broadcast(self);
        }
    }

    /// The online softmax of a tile: its tile max — with `column_max` from one call of the
    /// pre-compiled tile max, else from a generated pass down Sᵀ's columns, four rows per
    /// vector, that applies the cap and the edge mask — and, four columns at a time, the rare
    /// lazy rescale; then `P = 2^(s − m)` and its row sums over the whole tile in one call of
    /// the pre-compiled tile exponentials. The routines use the CPU's full vector width.
    pub(super) fn online_softmax(
        &mut self,
        cap: Option<f32>,
        threshold: f32,
        partials: usize,
        o_transposed: bool,
        column_max: bool,
        tile: Tile,
    ) {
        let ld = self.plan.padded_rows;
        let zero = self.int(0);
        let scores = self.scratch_at(self.plan.scratch.scores, zero);
        let state = self.state;
        let (rows_v4, n) = (self.rows_v4, tile.n);
        let maxima = column_max.then(|| {
            let maxima = self.scratch_at(self.plan.scratch.tile_max, zero);
            let ld = self.int(ld as i64);
            self.call(Callee::ColumnMax, &[n, rows_v4, scores, ld, maxima]);
            maxima
        });
        // Once per tile, not per four columns: the edge tables and −∞ of the generated pass.
        let (lows, highs) = self.range_tables();
        let neg_inf = self.splat(f32::NEG_INFINITY);
        self.for_range(zero, rows_v4, 4, |t, c| {
            let tile_max = match maxima {
                Some(maxima) => {
                    let at = t.float_addr(maxima, c);
                    t.b.ins().load(F32X4, mem(), at, 0)
                }
                None => {
                    let invariants = (scores, lows, highs, neg_inf);
                    t.generated_tile_max(c, invariants, cap, partials, tile)
                }
            };
            t.lazy_rescale(c, tile_max, threshold, o_transposed);
        });
        // P = 2^(s − m), l += column sums. m is finite (it starts at f32::MIN), so a hidden
        // key's 2^(−∞ − m) is 0, never NaN.
        let m = self.state_m(state, zero);
        let l = self.state_l(state, zero);
        let ld = self.int(ld as i64);
        self.call(Callee::Exp2Columns, &[n, rows_v4, scores, ld, m, l]);
    }

    /// Rows `c..c + 4`: the tile max by a generated pass down their columns, which applies the
    /// cap and (on edge tiles) the mask first and stores the scores it changed. `invariants` are
    /// the tile's: the score tile, the edge tables' lows and highs, and a vector of −∞.
    fn generated_tile_max(
        &mut self,
        c: Value,
        (scores, lows, highs, neg_inf): (Value, Value, Value, Value),
        cap: Option<f32>,
        partials: usize,
        tile: Tile,
    ) -> Value {
        let ld = self.plan.padded_rows;
        let column = self.float_addr(scores, c);
        let bounds = tile.partial.then(|| {
            let offset = self.mul_imm(c, 4);
            let (lo_at, hi_at) = (self.add(lows, offset), self.add(highs, offset));
            let lo = self.b.ins().load(types::I32X4, mem(), lo_at, 0);
            let hi = self.b.ins().load(types::I32X4, mem(), hi_at, 0);
            (lo, hi)
        });
        // One partial max per copy of the unrolled key loop (`Op::OnlineSoftmax`).
        let partial_max: Vec<Variable> = (0..partials)
            .map(|_| {
                let var = self.b.declare_var(F32X4);
                self.b.def_var(var, neg_inf);
                var
            })
            .collect();
        let start = self.int(0);
        self.for_range_unrolled(start, tile.n, partials, |t, j, copy| {
            let offset = t.mul_imm(j, 4 * ld);
            let at = t.add(column, offset);
            let mut s = t.b.ins().load(F32X4, mem(), at, 0);
            if let Some(cap) = cap {
                s = t.softcap_log2(s, cap);
            }
            if let Some((lo, hi)) = bounds {
                let j32 = t.b.ins().ireduce(types::I32, j);
                let key = t.b.ins().splat(types::I32X4, j32);
                let after_lo = t.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, key, lo);
                let before_hi = t.b.ins().icmp(IntCC::SignedLessThan, key, hi);
                let visible = t.b.ins().band(after_lo, before_hi);
                let visible = t.b.ins().bitcast(F32X4, MemFlagsData::new(), visible);
                s = t.b.ins().bitselect(visible, s, neg_inf);
            }
            if cap.is_some() || bounds.is_some() {
                t.b.ins().store(mem(), s, at, 0);
            }
            let m = t.b.use_var(partial_max[copy]);
            let m = t.max_ps(m, s);
            t.b.def_var(partial_max[copy], m);
        });
        // Pairwise, as the op says. The max of finite scores does not depend on the order
        // (a NaN score reaches its row through `2^(s − m)` whatever m is).
        let mut level: Vec<Value> = partial_max.iter().map(|&var| self.b.use_var(var)).collect();
        while level.len() > 1 {
            level = level.chunks(2).map(|pair| self.max_ps(pair[0], pair[1])).collect();
        }
        level[0]
    }

    /// Rows `c..c + 4` after their tile max: m moves only in lanes whose tile max exceeds it
    /// by the threshold (always on a row's first visible tile, where m = f32::MIN).
    fn lazy_rescale(&mut self, c: Value, tile_max: Value, threshold: f32, o_transposed: bool) {
        let m_at = self.state_m(self.state, c);
        let m_old = self.b.ins().load(F32X4, mem(), m_at, 0);
        let vthreshold = self.splat(threshold);
        let limit = self.b.ins().fadd(m_old, vthreshold);
        let raise = self.b.ins().fcmp(FloatCC::GreaterThan, tile_max, limit);
        let any = self.b.ins().vany_true(raise);
        self.if_then(any, |t| t.rescale(c, raise, tile_max, o_transposed));
    }

    /// Rows `c..c + 4`, in the lanes `raise` selects: `m' = tile_max`, and l and O scaled by
    /// `2^(m − m')`. O rows are scaled only where the factor is not 1; with `o_transposed` the
    /// four rows are adjacent in every row of `Oᵀ`, scaled as one vector unless all four factors
    /// are 1.
    pub(super) fn rescale(&mut self, c: Value, raise: Value, tile_max: Value, o_transposed: bool) {
        let state = self.state;
        let m_at = self.state_m(state, c);
        let l_at = self.state_l(state, c);
        let m_old = self.b.ins().load(F32X4, mem(), m_at, 0);
        let raise = self.b.ins().bitcast(F32X4, MemFlagsData::new(), raise);
        let m_new = self.b.ins().bitselect(raise, tile_max, m_old);
        // Lanes not raised get exactly 2^0 = 1; from m = f32::MIN the shift may round to −∞,
        // giving 0.
        let shift = self.b.ins().fsub(m_old, m_new);
        let factor = self.exp2(shift);
        let l = self.b.ins().load(F32X4, mem(), l_at, 0);
        let l = self.b.ins().fmul(l, factor);
        self.b.ins().store(mem(), l, l_at, 0);
        self.b.ins().store(mem(), m_new, m_at, 0);
        let acc_dim = self.plan.acc_dim;
        if o_transposed {
            // The four rows are four adjacent floats of every row of Oᵀ: one vector each.
            let ones = self.splat(1.0);
            let same = self.b.ins().fcmp(FloatCC::Equal, factor, ones);
            let unchanged = self.b.ins().vall_true(same);
            let moved = self.b.ins().bnot(unchanged);
            self.if_then(moved, |t| {
                let column = t.float_addr(state, c);
                let (zero, end) = (t.int(0), t.int(acc_dim as i64));
                let pitch = t.rows_v4;
                t.for_range(zero, end, 1, |t, d| {
                    let offset = t.mul(d, pitch);
                    let at = t.float_addr(column, offset);
                    let x = t.b.ins().load(F32X4, mem(), at, 0);
                    let x = t.b.ins().fmul(x, factor);
                    t.b.ins().store(mem(), x, at, 0);
                });
            });
            return;
        }
        let one = self.f32(1.0);
        for lane in 0..4u8 {
            let f = self.b.ins().extractlane(factor, lane);
            let same = self.b.ins().fcmp(FloatCC::Equal, f, one);
            let moved = self.b.ins().bnot(same);
            self.if_then(moved, |t| {
                let row = t.add_imm(c, usize::from(lane));
                let o = t.state_o(state, row);
                t.scale_row(o, o, acc_dim, f);
            });
        }
    }

    /// `O += P · values`: P read column-major from Sᵀ, per-row key ranges on edge tiles; with
    /// `o_transposed`, into `Oᵀ` (C column-major, `rows_v4` floats per row of `Oᵀ`).
    pub(super) fn accumulate_values(
        &mut self,
        values: &TileSource,
        width: usize,
        o_transposed: bool,
        tile: Tile,
    ) {
        let zero = self.int(0);
        let p = self.scratch_at(self.plan.scratch.scores, zero);
        let (v, b_row, b_panel) = self.value_side(values, tile.j0);
        let o = self.state;
        let (lows, highs) = if tile.partial { self.range_tables() } else { (zero, zero) };
        let (width, one, lda, ldc) = (
            self.int(width as i64),
            self.int(1),
            self.int(self.plan.padded_rows as i64),
            self.int(self.plan.acc_dim as i64),
        );
        let prefetch = match values.prefetch {
            true => self.prefetch_next(values, tile),
            false => zero,
        };
        let (rows, n) = (self.rows, tile.n);
        // C[i][j] at o[i·ldc + j·c_col]: O row-major, or Oᵀ (row i of O is column i of Oᵀ).
        let (ldc, c_col) = match o_transposed {
            false => (ldc, one),
            true => (one, self.rows_v4),
        };
        let args = [
            rows, width, n, p, one, lda, v, b_row, b_panel, o, ldc, c_col, one, lows, highs, zero,
            zero, prefetch,
        ];
        self.call(Callee::DotNn, &args);
    }

    /// `O = (Oᵀ)ᵀ` for the group's rows, through a copy of `Oᵀ` in the scratch tile `via`
    /// (`PackRows`, one row): the copy's rows (one per element of a row of O) go back
    /// transposed by `PackColumns`, whose "panels" are then O's 16-float chunks and whose depth
    /// stride is O's row.
    pub(super) fn restore_row_major(&mut self, via: Operand) {
        let state = self.state;
        let (rows, rows_v4) = (self.rows, self.rows_v4);
        let acc_dim = self.plan.acc_dim;
        let copy = self.tile_addr(via);
        let len = self.mul_imm(rows_v4, acc_dim);
        let (zero, one, panel) = (self.int(0), self.int(1), self.int(PANEL as i64));
        self.call(Callee::PackRows, &[one, len, state, len, copy, len, panel]);
        let (width, unit) = (self.int(acc_dim as i64), self.f32(1.0));
        let args = [width, rows, copy, rows_v4, unit, state, zero, panel, width];
        self.call(Callee::PackColumns, &args);
    }
}
