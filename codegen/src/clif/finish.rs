//! Finishing a task: merging splits, normalising, storing `out` and `lse`.

use super::*;

impl Translator<'_> {
    pub(super) fn merge_splits(&mut self) {
        let one = self.int(1);
        let several = self.b.ins().icmp(IntCC::SignedGreaterThan, self.n_states, one);
        let (acc_dim, split_stride) = (self.plan.acc_dim, self.state_stride);
        let first = self.state;
        let n_states = self.n_states;
        self.if_then(several, |t| {
            t.for_each_row(|t, _, _, _, row| {
                // M = max over splits of m.
                let m_var = t.b.declare_var(types::F32);
                let m0_at = t.state_m(first, row);
                let m0 = t.b.ins().load(types::F32, mem(), m0_at, 0);
                t.b.def_var(m_var, m0);
                let one = t.int(1);
                t.for_range(one, n_states, 1, |t, s| {
                    let offset = t.mul(s, split_stride);
                    let slot = t.float_addr(first, offset);
                    let at = t.state_m(slot, row);
                    let m = t.b.ins().load(types::F32, mem(), at, 0);
                    let acc = t.b.use_var(m_var);
                    let acc = t.b.ins().fmax(acc, m);
                    t.b.def_var(m_var, acc);
                });
                // Every m is finite, so each 2^(m_s − M) is a number in [0, 1].
                let big_m = t.b.use_var(m_var);
                // Rescale split 0 in place, then add the others.
                let l0_at = t.state_l(first, row);
                let l0 = t.b.ins().load(types::F32, mem(), l0_at, 0);
                let d0 = t.b.ins().fsub(m0, big_m);
                let c0 = t.scalar_exp2(d0);
                let l_var = t.b.declare_var(types::F32);
                let l = t.b.ins().fmul(l0, c0);
                t.b.def_var(l_var, l);
                let o0 = t.state_o(first, row);
                t.scale_row(o0, o0, acc_dim, c0);
                t.for_range(one, n_states, 1, |t, s| {
                    let offset = t.mul(s, split_stride);
                    let slot = t.float_addr(first, offset);
                    let m_at = t.state_m(slot, row);
                    let m = t.b.ins().load(types::F32, mem(), m_at, 0);
                    let d = t.b.ins().fsub(m, big_m);
                    let c = t.scalar_exp2(d);
                    let l_at = t.state_l(slot, row);
                    let ls = t.b.ins().load(types::F32, mem(), l_at, 0);
                    let acc = t.b.use_var(l_var);
                    let acc = t.b.ins().fma(ls, c, acc);
                    t.b.def_var(l_var, acc);
                    let os = t.state_o(slot, row);
                    t.axpy_row(o0, os, acc_dim, c);
                });
                let l = t.b.use_var(l_var);
                t.b.ins().store(mem(), l, l0_at, 0);
                t.b.ins().store(mem(), big_m, m0_at, 0);
            });
        });
    }

    /// m's slot gets `lse = m·ln 2 + ln l` and l's slot `1/l`; a row with no visible key gets
    /// −∞ and 0.
    pub(super) fn normalize(&mut self) {
        let state = self.state;
        self.for_each_row(|t, _, _, _, row| {
            let l_at = t.state_l(state, row);
            let l = t.b.ins().load(types::F32, mem(), l_at, 0);
            let m_at = t.state_m(state, row);
            let m = t.b.ins().load(types::F32, mem(), m_at, 0);
            let zero = t.f32(0.0);
            let empty = t.b.ins().fcmp(FloatCC::Equal, l, zero);
            let one = t.f32(1.0);
            let inv = t.b.ins().fdiv(one, l);
            let inv = t.b.ins().select(empty, zero, inv);
            t.b.ins().store(mem(), inv, l_at, 0);
            let ln = t.call(Callee::Ln, &[l]).expect("ln returns a value");
            let ln2 = t.f32(std::f32::consts::LN_2);
            let lse = t.b.ins().fma(m, ln2, ln);
            let neg_inf = t.f32(f32::NEG_INFINITY);
            let lse = t.b.ins().select(empty, neg_inf, lse);
            t.b.ins().store(mem(), lse, m_at, 0);
        });
    }

    /// `1/l` of row `row`, which l's slot holds after [`Translator::normalize`].
    pub(super) fn inverse_l(&mut self, state: Value, row: Value) -> Value {
        let at = self.state_l(state, row);
        self.b.ins().load(types::F32, mem(), at, 0)
    }

    /// `into = O · (1/l)`, row by row: `out`, or for absorbed MLA `latent_out`.
    pub(super) fn store_out(&mut self, into: Operand) {
        let width = self.plan.acc_dim;
        let base = match into {
            Operand::Out => offsets::OUT,
            Operand::LatentOut => offsets::LATENT_OUT,
            other => unreachable!("{other:?} is not an output"),
        };
        let state = self.state;
        self.for_each_row(|t, _, head, qi, row| {
            let idx = t.row_index(head, qi, width);
            let out = t.arg(base);
            let dst = t.float_addr(out, idx);
            let src = t.state_o(state, row);
            let inv = t.inverse_l(state, row);
            t.scale_row(dst, src, width, inv);
        });
    }

    pub(super) fn store_lse(&mut self) {
        let lse = self.arg(offsets::LSE);
        let zero = self.int(0);
        let wanted = self.b.ins().icmp(IntCC::NotEqual, lse, zero);
        let state = self.state;
        self.if_then(wanted, |t| {
            t.for_each_row(|t, _, head, qi, row| {
                let idx = t.row_index(head, qi, 1);
                let dst = t.float_addr(lse, idx);
                let m_at = t.state_m(state, row);
                let value = t.b.ins().load(types::F32, mem(), m_at, 0);
                t.b.ins().store(mem(), value, dst, 0);
            });
        });
    }
}
