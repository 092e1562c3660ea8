//! Absorbed MLA's per-head call-level programs: the query absorption and the output projection.

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
        let args = [rows, rank, nope, a, lda, one, w, rank, panel, c, ldc, zero, zero, zero, zero];
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
}
