//! Mask bounds: each query's visible keys within its sequence and the item's key range.

use super::*;

impl Translator<'_> {
    /// Keys of the item's sequence: `kv_lens[b]` when the call has per-sequence lengths, else
    /// Sk.
    pub(super) fn sequence_keys(&mut self) -> Value {
        let lens = self.arg(offsets::KV_LENS);
        let (given, join) = (self.b.create_block(), self.b.create_block());
        let keys = self.b.append_block_param(join, types::I64);
        self.b.ins().brif(lens, given, &[], join, &[self.seq_k.into()]);
        self.b.switch_to_block(given);
        self.b.seal_block(given);
        let at = self.mul_imm(self.batch, std::mem::size_of::<usize>());
        let at = self.add(lens, at);
        let len = self.b.ins().load(types::I64, mem(), at, 0);
        self.b.ins().jump(join, &[len.into()]);
        self.b.switch_to_block(join);
        self.b.seal_block(join);
        keys
    }

    /// Visible keys `[lo, hi)` of query `i`, intersected with the item's key range.
    pub(super) fn row_bounds(&mut self, i: Value) -> (Value, Value) {
        let offset = self.b.ins().isub(self.keys, self.seq_q);
        let diag = self.add(i, offset);
        let (lo, hi) = match self.mask {
            Mask::None => (self.int(0), self.keys),
            Mask::Causal => {
                let end = self.add_imm(diag, 1);
                (self.int(0), self.b.ins().smin(end, self.keys))
            }
            Mask::SlidingWindow(w) => {
                let end = self.add_imm(diag, 1);
                let start = self.b.ins().iadd_imm_s(diag, 1 - w as i64);
                let zero = self.int(0);
                (self.b.ins().smax(start, zero), self.b.ins().smin(end, self.keys))
            }
        };
        (self.b.ins().smax(lo, self.k_lo), self.b.ins().smin(hi, self.k_hi))
    }
}
