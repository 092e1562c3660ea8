//! Vector math in f32x4: max and min, `exp2` and the softcap, row maps.

use super::*;

impl Translator<'_> {
    /// `x < y ? y : x` per lane — one `maxps`. Unlike CLIF's `fmax` (nine instructions on
    /// x86-64) it is not NaN-symmetric: a NaN `y` is returned, a NaN `x` is not. The softmax
    /// only needs the first: a NaN score still reaches its row through `exp(s − m)`.
    pub(super) fn max_ps(&mut self, x: Value, y: Value) -> Value {
        let y_less = self.b.ins().fcmp(FloatCC::LessThan, y, x);
        let y_less = self.b.ins().bitcast(F32X4, MemFlagsData::new(), y_less);
        self.b.ins().bitselect(y_less, x, y)
    }

    /// `bound < x ? bound : x` per lane — one `minps`; a NaN `x` is returned as is.
    pub(super) fn min_ps(&mut self, bound: Value, x: Value) -> Value {
        let bound_less = self.b.ins().fcmp(FloatCC::LessThan, bound, x);
        let bound_less = self.b.ins().bitcast(F32X4, MemFlagsData::new(), bound_less);
        self.b.ins().bitselect(bound_less, bound, x)
    }

    /// 2^x for f32x4, for x <= 64 (every caller stays below: softmax arguments are at most the
    /// rescale threshold), exactly as [`crate::abi::exp2`] specifies — the same arithmetic as
    /// the pre-compiled tile exponentials, so the two round alike.
    pub(super) fn exp2(&mut self, x: Value) -> Value {
        use crate::abi::exp2::{FLOOR, POLY, ROUNDER};
        let floor = self.splat(FLOOR);
        let x = self.max_ps(floor, x);
        let rounder = self.splat(ROUNDER);
        let t = self.b.ins().fadd(x, rounder);
        let n = self.b.ins().fsub(t, rounder);
        let f = self.b.ins().fsub(x, n);
        let mut poly = self.splat(POLY[5]);
        for c in POLY[..5].iter().rev().copied().chain([1.0]) {
            let c = self.splat(c);
            poly = self.b.ins().fma(poly, f, c);
        }
        // t's bits are 0x4B40_0000 + n; shifting out the top 9 bits leaves (n + 127) << 23.
        let bits = self.b.ins().bitcast(types::I32X4, MemFlagsData::new(), t);
        let bias = self.b.ins().iconst(types::I32, 127);
        let bias = self.b.ins().splat(types::I32X4, bias);
        let biased = self.b.ins().iadd(bits, bias);
        let exponent = self.b.ins().ishl_imm_s(biased, 23);
        let pow2 = self.b.ins().bitcast(F32X4, MemFlagsData::new(), exponent);
        self.b.ins().fmul(poly, pow2)
    }

    /// The softcap in base-2 units for f32x4: `log2 e · cap · tanh(s / cap)`, evaluated as
    /// [`crate::abi::softcap`] specifies (absolute error ~1e-7 in the large form, relative
    /// < 2e-9 in the small one).
    pub(super) fn softcap_log2(&mut self, s: Value, cap: f32) -> Value {
        use crate::abi::softcap::{EXP_LIMIT, RATIO_POLY, SMALL};
        let inv_cap = self.splat((1.0 / f64::from(cap)) as f32);
        let x = self.b.ins().fmul(s, inv_cap);
        let ax = self.b.ins().fabs(x);
        let two_log2e = self.splat(2.0 * std::f32::consts::LOG2_E);
        let arg = self.b.ins().fmul(ax, two_log2e);
        let limit = self.splat(EXP_LIMIT);
        let arg = self.min_ps(limit, arg);
        let e = self.exp2(arg);
        let one = self.splat(1.0);
        let two = self.splat(2.0);
        let e1 = self.b.ins().fadd(e, one);
        let frac = self.b.ins().fdiv(two, e1);
        let t = self.b.ins().fsub(one, frac);
        // t >= 0: copy x's sign bit in (fcopysign has no f32x4 lowering on x86-64 here).
        let sign_bit = self.splat(-0.0);
        let sign = self.b.ins().band(x, sign_bit);
        let signed = self.b.ins().bor(t, sign);
        let vcap = self.splat(cap);
        let large = self.b.ins().fmul(signed, vcap);
        let x2 = self.b.ins().fmul(x, x);
        let mut poly = self.splat(RATIO_POLY[0]);
        for c in [RATIO_POLY[1], RATIO_POLY[2]] {
            let c = self.splat(c);
            poly = self.b.ins().fma(poly, x2, c);
        }
        let ratio = self.b.ins().fma(poly, x2, one);
        let small = self.b.ins().fmul(s, ratio);
        let threshold = self.splat(SMALL);
        let is_small = self.b.ins().fcmp(FloatCC::LessThan, ax, threshold);
        let is_small = self.b.ins().bitcast(F32X4, MemFlagsData::new(), is_small);
        let capped = self.b.ins().bitselect(is_small, small, large);
        let log2e = self.splat(std::f32::consts::LOG2_E);
        self.b.ins().fmul(capped, log2e)
    }

    /// 2^x of one f32 (x <= 64), through the vector routine.
    pub(super) fn scalar_exp2(&mut self, x: Value) -> Value {
        let v = self.b.ins().splat(F32X4, x);
        let e = self.exp2(v);
        self.b.ins().extractlane(e, 0)
    }

    /// `dst[0..len] = src[0..len] * factor` (src may equal dst).
    pub(super) fn scale_row(&mut self, dst: Value, src: Value, len: usize, factor: Value) {
        self.row_map(dst, src, len, RowUpdate::Scale(factor));
    }

    /// `dst[0..len] += src[0..len] * factor`.
    pub(super) fn axpy_row(&mut self, dst: Value, src: Value, len: usize, factor: Value) {
        self.row_map(dst, src, len, RowUpdate::Axpy(factor));
    }

    /// A row update: a loop of 16-float steps (four f32x4 each), then unrolled f32x4 and
    /// scalar tails, all with the length known at compile time.
    pub(super) fn row_map(&mut self, dst: Value, src: Value, len: usize, update: RowUpdate) {
        let (RowUpdate::Scale(factor) | RowUpdate::Axpy(factor)) = update;
        let vf = self.b.ins().splat(F32X4, factor);
        let step = |t: &mut Self, ty: Type, d: Value, s: Value, offset: i32| {
            let f = if ty == F32X4 { vf } else { factor };
            let x = t.b.ins().load(ty, mem(), s, offset);
            let y = match update {
                RowUpdate::Axpy(_) => {
                    let y = t.b.ins().load(ty, mem(), d, offset);
                    t.b.ins().fma(x, f, y)
                }
                RowUpdate::Scale(_) => t.b.ins().fmul(x, f),
            };
            t.b.ins().store(mem(), y, d, offset);
        };
        let blocked = len / 16 * 16;
        if blocked > 0 {
            let zero = self.int(0);
            let end = self.int(blocked as i64);
            self.for_range(zero, end, 16, |t, c| {
                let d = t.float_addr(dst, c);
                let s = t.float_addr(src, c);
                for k in 0..4 {
                    step(t, F32X4, d, s, 16 * k);
                }
            });
        }
        let vectors = len / 4 * 4;
        for c in (blocked..vectors).step_by(4) {
            step(self, F32X4, dst, src, 4 * c as i32);
        }
        for c in vectors..len {
            step(self, types::F32, dst, src, 4 * c as i32);
        }
    }
}
