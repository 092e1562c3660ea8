//! Small helpers of the translator: integer and float constants, arithmetic, loops, branches and calls.

use super::*;

impl Translator<'_> {
    pub(super) fn int(&mut self, x: i64) -> Value {
        self.b.ins().iconst(types::I64, x)
    }

    pub(super) fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }

    pub(super) fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().imul(a, b)
    }

    pub(super) fn mul_imm(&mut self, a: Value, x: usize) -> Value {
        self.b.ins().imul_imm_s(a, x as i64)
    }

    pub(super) fn add_imm(&mut self, a: Value, x: usize) -> Value {
        self.b.ins().iadd_imm_s(a, x as i64)
    }

    /// `rows` rounded up to the plan's row multiple.
    pub(super) fn pad_rows(&mut self, rows: Value) -> Value {
        let multiple = self.plan.row_multiple;
        debug_assert!(multiple.is_power_of_two());
        let up = self.add_imm(rows, multiple - 1);
        self.b.ins().band_imm_s(up, -(multiple as i64))
    }

    /// `base + 4·index`: the address of float `index`.
    pub(super) fn float_addr(&mut self, base: Value, index: Value) -> Value {
        let bytes = self.b.ins().ishl_imm_s(index, 2);
        self.b.ins().iadd(base, bytes)
    }

    pub(super) fn arg(&mut self, offset: i32) -> Value {
        self.b.ins().load(types::I64, mem(), self.args, offset)
    }

    pub(super) fn f32(&mut self, x: f32) -> Value {
        self.b.ins().f32const(Ieee32::with_float(x))
    }

    pub(super) fn splat(&mut self, x: f32) -> Value {
        let s = self.f32(x);
        self.b.ins().splat(F32X4, s)
    }

    /// `for i in lo..hi (step) { body(i) }`, with `i` a block parameter.
    pub(super) fn for_range(
        &mut self,
        lo: Value,
        hi: Value,
        step: usize,
        body: impl FnOnce(&mut Self, Value),
    ) {
        let header = self.b.create_block();
        let body_block = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(header, types::I64);
        self.b.ins().jump(header, &[lo.into()]);
        self.b.switch_to_block(header);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, i, hi);
        self.b.ins().brif(more, body_block, &[], exit, &[]);
        self.b.switch_to_block(body_block);
        self.b.seal_block(body_block);
        body(self, i);
        let next = self.add_imm(i, step);
        self.b.ins().jump(header, &[next.into()]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
    }

    /// `for i in lo..hi { body(i, copy) }` with `unroll` copies of the body per trip, `copy`
    /// 0..unroll, then single steps for the rest as copy 0: loop overhead and constant loads
    /// are shared between copies, and a reduction can keep one accumulator per copy.
    pub(super) fn for_range_unrolled(
        &mut self,
        lo: Value,
        hi: Value,
        unroll: usize,
        body: impl Fn(&mut Self, Value, usize),
    ) {
        assert!(unroll.is_power_of_two(), "the trip count is rounded down with a mask");
        let whole = self.b.ins().isub(hi, lo);
        let whole = self.b.ins().band_imm_s(whole, -(unroll as i64));
        let main_end = self.add(lo, whole);
        self.for_range(lo, main_end, unroll, |t, i| {
            for copy in 0..unroll {
                let at = t.add_imm(i, copy);
                body(t, at, copy);
            }
        });
        self.for_range(main_end, hi, 1, |t, i| body(t, i, 0));
    }

    /// `if cond { then() } else { otherwise() }`.
    pub(super) fn if_else(
        &mut self,
        cond: Value,
        then: impl FnOnce(&mut Self),
        otherwise: impl FnOnce(&mut Self),
    ) {
        let then_block = self.b.create_block();
        let else_block = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().brif(cond, then_block, &[], else_block, &[]);
        self.b.switch_to_block(then_block);
        self.b.seal_block(then_block);
        then(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(else_block);
        self.b.seal_block(else_block);
        otherwise(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
        self.b.seal_block(done);
    }

    /// `if cond { then() }`.
    pub(super) fn if_then(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        self.if_else(cond, then, |_| {});
    }

    pub(super) fn call(&mut self, callee: Callee, args: &[Value]) -> Option<Value> {
        let call = self.b.ins().call(self.callees[callee as usize], args);
        self.b.inst_results(call).first().copied()
    }
}
