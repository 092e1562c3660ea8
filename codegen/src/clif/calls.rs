//! MLA's programs besides the items: absorbed MLA's per-head query absorption and output
//! projection, and expanded MLA's per-tile up-projection of keys and values.

use super::*;

impl Translator<'_> {
    /// Prologue: `latent_q[r, h] = q_nope[r, h] · W_UK[h]` for every row r = (b, q) of the
    /// call, as one tile product.
    pub(super) fn absorb_queries(&mut self, nope: usize, rank: usize) {
        let h = self.plan.q_heads;
        let rows = self.call_rows();
        let a = self.head_slice(offsets::Q, self.plan.q_width);
        let w = self.head_slice(offsets::W_UK, nope * rank);
        let c = self.head_slice(offsets::LATENT_Q, rank);
        let (nope, rank, lda, ldc, one, panel, zero) = (
            self.int(nope as i64),
            self.int(rank as i64),
            self.int((h * self.plan.q_width) as i64),
            self.int((h * rank) as i64),
            self.int(1),
            self.int(PANEL as i64),
            self.int(0),
        );
        let args = [
            rows, rank, nope, a, lda, one, w, rank, panel, c, ldc, one, zero, zero, zero, zero,
            zero, zero,
        ];
        self.call(Callee::DotNn, &args);
    }

    /// The current head's part of the `CallArgs` tensor at byte offset `field`: the tensor's
    /// base plus `head · floats_per_head` — its first row's slice of a `[.., H, width]` tensor,
    /// or its matrix of a `[H, ..]` weight.
    pub(super) fn head_slice(&mut self, field: i32, floats_per_head: usize) -> Value {
        let base = self.arg(field);
        let at = self.mul_imm(self.head, floats_per_head);
        self.float_addr(base, at)
    }

    /// Rows of a per-head program: every (batch, query) of the call, `B · Sq`.
    pub(super) fn call_rows(&mut self) -> Value {
        let batch = self.b.ins().load(types::I64, mem(), self.args, offsets::BATCH);
        self.mul(batch, self.seq_q)
    }

    /// Epilogue: `out[r, h] = latent_out[r, h] · W_UV[h]ᵀ` for every row r = (b, q) of the
    /// call, as one tile product.
    pub(super) fn project_out(&mut self, rank: usize, v_dim: usize) {
        let h = self.plan.q_heads;
        let rows = self.call_rows();
        let a = self.head_slice(offsets::LATENT_OUT, rank);
        let w = self.head_slice(offsets::W_UV, v_dim * rank);
        let c = self.head_slice(offsets::OUT, v_dim);
        let (v_dim, rank, lda, ldc, zero) = (
            self.int(v_dim as i64),
            self.int(rank as i64),
            self.int((h * rank) as i64),
            self.int((h * v_dim) as i64),
            self.int(0),
        );
        self.call(Callee::DotNt, &[rows, v_dim, rank, a, lda, w, rank, c, ldc, zero, zero]);
    }

    /// Prologue (expanded MLA): `weights_t[h] = [W_UK[h]ᵀ, W_UV[h]ᵀ]` in column panels, two
    /// `PackColumns` calls (each weight row becomes a column).
    pub(super) fn transpose_weights(&mut self, rank: usize, nope: usize, v_dim: usize) {
        let (per_head, values_at) =
            self.plan.transposed_weights().expect("expanded plans transpose their weights");
        let dst = self.head_slice(offsets::WEIGHTS_T, per_head);
        for (field, width, at) in [(offsets::W_UK, nope, 0), (offsets::W_UV, v_dim, values_at)] {
            let src = self.head_slice(field, width * rank);
            let dst = self.add_imm(dst, 4 * at);
            let (rows, rank_v, one, zero, panel, depth) = (
                self.int(width as i64),
                self.int(rank as i64),
                self.f32(1.0),
                self.int(0),
                self.int((PANEL * rank) as i64),
                self.int(PANEL as i64),
            );
            let args = [rows, rank_v, src, rank_v, one, dst, zero, panel, depth];
            self.call(Callee::PackColumns, &args);
        }
    }

    /// The broadcast product `C = c_kv rows · B` of the up-projection, B being the head's
    /// transposed weights from float `at` on (`rank` rows in panels), `width` columns into
    /// `c` with row stride `ldc`.
    fn up_project(&mut self, rank: usize, width: usize, at: usize, c: Value, ldc: usize) {
        let (per_head, _) =
            self.plan.transposed_weights().expect("expanded plans transpose their weights");
        let (a, lda) = self.latent_rows(Operand::CKv);
        let b = self.head_slice(offsets::WEIGHTS_T, per_head);
        let b = self.add_imm(b, 4 * at);
        let (n, width, rank_v, lda, one, panel, b_panel, ldc, zero) = (
            self.k_hi,
            self.int(width as i64),
            self.int(rank as i64),
            self.int(lda as i64),
            self.int(1),
            self.int(PANEL as i64),
            self.int((PANEL * rank) as i64),
            self.int(ldc as i64),
            self.int(0),
        );
        let args = [
            n, width, rank_v, a, lda, one, b, panel, b_panel, c, ldc, one, zero, zero, zero, zero,
            zero, zero,
        ];
        self.call(Callee::DotNn, &args);
    }

    /// Expand: `keys[r] = [c_kv[b, j0 + r] · W_UK[h]ᵀ, k_rope[b, j0 + r]]` for the tile's `n`
    /// rows (the program's `k_lo` and `k_hi` parameters hold j0 and n, `scratch` the keys).
    pub(super) fn expand_keys(&mut self, rank: usize, nope: usize, rope: usize) {
        let d = nope + rope;
        let keys = self.scratch;
        self.up_project(rank, nope, 0, keys, d);
        let (n, d_v) = (self.k_hi, self.int(d as i64));
        if rope > 0 {
            let (src, src_row) = self.latent_rows(Operand::KRope);
            let dst = self.add_imm(keys, 4 * nope);
            let (rope, src_row) = (self.int(rope as i64), self.int(src_row as i64));
            let panel = self.int(PANEL as i64);
            self.call(Callee::PackRows, &[n, rope, src, src_row, dst, d_v, panel]);
        }
    }

    /// Expand: `values[r] = c_kv[b, j0 + r] · W_UV[h]ᵀ` for the tile's `n` rows, `row` floats
    /// apart (`state` holds the values' address).
    pub(super) fn expand_values(&mut self, rank: usize, v_dim: usize, row: usize) {
        let (_, values_at) =
            self.plan.transposed_weights().expect("expanded plans transpose their weights");
        let values = self.state;
        self.up_project(rank, v_dim, values_at, values, row);
    }

    /// Address and row stride (floats) of token `b·Sk + j0`'s row of `c_kv` or `k_rope`
    /// (`j0` in `k_lo`: the expand programs bind no work item, so Sk is loaded here).
    fn latent_rows(&mut self, operand: Operand) -> (Value, usize) {
        let stride = self.row_stride(operand);
        let field = match operand {
            Operand::CKv => offsets::C_KV,
            Operand::KRope => offsets::K_ROPE,
            other => unreachable!("{other:?} is not a latent cache tensor"),
        };
        let seq_k = self.b.ins().load(types::I64, mem(), self.args, offsets::SEQ_K);
        let row = self.mul(self.batch, seq_k);
        let row = self.add(row, self.k_lo);
        let at = self.mul_imm(row, stride);
        let base = self.arg(field);
        (self.float_addr(base, at), stride)
    }
}
