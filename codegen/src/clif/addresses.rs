//! Addresses: rows of the call's tensors, cache rows, the state slots and scratch.

use super::*;

impl Translator<'_> {
    /// Float index of row `(b, q0 + qi, h)` of a `[B, Sq, H, width]` tensor: q, out, lse and
    /// the latent buffers.
    pub(super) fn row_index(&mut self, head: Value, qi: Value, width: usize) -> Value {
        let h = self.plan.q_heads;
        let bs = self.mul(self.batch, self.seq_q);
        let i = self.add(bs, self.q0);
        let i = self.add(i, qi);
        let ih = self.mul_imm(i, h);
        let ih = self.add(ih, head);
        self.mul_imm(ih, width)
    }

    /// Address and row stride (floats) of key/value tensor `operand` at key `j0`.
    pub(super) fn kv_rows(&mut self, operand: Operand, j0: Value) -> (Value, usize) {
        let (width, stride) = (self.row_width(operand), self.row_stride(operand));
        let bs = self.mul(self.batch, self.seq_k);
        let t = self.add(bs, j0);
        let (base, idx) = match operand {
            Operand::K | Operand::V => {
                // Token t's row holds every KV head; this group's is the g-th `width` of it.
                let tg = self.mul_imm(t, stride / width);
                let tg = self.add(tg, self.group);
                let base = if operand == Operand::K { offsets::K } else { offsets::V };
                (base, self.mul_imm(tg, width))
            }
            Operand::CKv => (offsets::C_KV, self.mul_imm(t, stride)),
            Operand::KRope => (offsets::K_ROPE, self.mul_imm(t, stride)),
            other => unreachable!("{other:?} is not a cache tensor"),
        };
        let base = self.arg(base);
        (self.float_addr(base, idx), stride)
    }

    /// Floats of one row of key/value tensor `operand` that an item reads.
    pub(super) fn row_width(&self, operand: Operand) -> usize {
        self.cache_row(operand).width
    }

    /// Floats from one row of key/value tensor `operand` to the next.
    pub(super) fn row_stride(&self, operand: Operand) -> usize {
        self.cache_row(operand).stride
    }

    /// The plan's layout of cache tensor `operand`.
    pub(super) fn cache_row(&self, operand: Operand) -> CacheRow {
        operand.cache_row(self.plan)
    }

    /// Address of row `row` of O in the state slot at `state`: O (`padded_rows × acc_dim`),
    /// then m, then l (`padded_rows` each, so four rows load as one vector).
    pub(super) fn state_o(&mut self, state: Value, row: Value) -> Value {
        let idx = self.mul_imm(row, self.plan.state.o_row);
        self.float_addr(state, idx)
    }

    /// Address of m of row `row`.
    pub(super) fn state_m(&mut self, state: Value, row: Value) -> Value {
        let idx = self.add_imm(row, self.plan.state.m);
        self.float_addr(state, idx)
    }

    /// Address of l of row `row`.
    pub(super) fn state_l(&mut self, state: Value, row: Value) -> Value {
        let idx = self.add_imm(row, self.plan.state.l);
        self.float_addr(state, idx)
    }

    pub(super) fn scratch_at(&mut self, floats: usize, extra: Value) -> Value {
        let idx = self.add_imm(extra, floats);
        self.float_addr(self.scratch, idx)
    }
}
