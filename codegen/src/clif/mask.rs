//! Mask bounds: each query's visible keys within the item's key range.

use super::*;

impl Translator<'_> {
    /// Visible keys `[lo, hi)` of query `i`, intersected with the item's key range.
    pub(super) fn row_bounds(&mut self, i: Value) -> (Value, Value) {
        let offset = self.b.ins().isub(self.seq_k, self.seq_q);
        let diag = self.add(i, offset);
        let (lo, hi) = match self.mask {
            Mask::None => (self.int(0), self.seq_k),
            Mask::Causal => {
                let end = self.add_imm(diag, 1);
                (self.int(0), self.b.ins().smin(end, self.seq_k))
            }
            Mask::SlidingWindow(w) => {
                let end = self.add_imm(diag, 1);
                let start = self.b.ins().iadd_imm_s(diag, 1 - w as i64);
                let zero = self.int(0);
                (self.b.ins().smax(start, zero), self.b.ins().smin(end, self.seq_k))
            }
        };
        (self.b.ins().smax(lo, self.k_lo), self.b.ins().smin(hi, self.k_hi))
    }
}
