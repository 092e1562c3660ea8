//! Emits Cranelift IR for a kernel's tile program ([`crate::ir`]).
//!
//! The translator holds a `FunctionBuilder` and has one method per IR op. Loops, the group
//! mapping, mask bounds and edge-tile masking, the online softmax's cap, max and lazy rescale
//! (with a vectorised `exp2`), split merging and stores are generated here as f32x4 code
//! specialised to the spec; the tile products, a score tile's exponentials and the tile copies
//! are calls to pre-compiled routines ([`Callee`]).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::{
    AbiParam, ExtFuncData, ExternalName, FuncRef, Function, InstBuilder, MemFlagsData, Signature,
    StackSlotData, StackSlotKind, Type, UserExternalName, UserFuncName, Value, types,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

use crate::abi::{
    AbiFn, Callee, FinishFn, HeadFn, ItemFn, PANEL, Param, PrefetchRows, offsets, prefetch_offsets,
};
use crate::ir::{KernelIr, Op, Operand, ScoreTerm};
use crate::plan::{CacheRow, CacheTensor, Form, HeadMap, KernelPlan};
use crate::spec::Mask;

/// The generated functions of a kernel.
pub struct ClifKernel {
    /// `prologue(args, h)`, when the IR has one (absorbed MLA).
    pub prologue: Option<Function>,
    /// `item(args, b, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride)`.
    pub item: Function,
    /// `finish(args, b, g, q0, n_states, states, split_stride, scratch)`.
    pub finish: Function,
    /// `epilogue(args, h)`, when the IR has one (absorbed MLA).
    pub epilogue: Option<Function>,
}

/// The Cranelift signature of an ABI function type ([`crate::abi::AbiFn`]): `ItemFn`,
/// `FinishFn` and `HeadFn` for the generated functions, a routine's type for its calls.
pub fn signature<F: AbiFn>(call_conv: CallConv) -> Signature {
    signature_of(F::PARAMS, F::RETURNS, call_conv)
}

/// Signature of a callee, from its Rust function type ([`Callee::signature`]).
pub fn callee_signature(callee: Callee, call_conv: CallConv) -> Signature {
    let (params, returns) = callee.signature();
    signature_of(params, returns, call_conv)
}

fn signature_of(params: &[Param], returns: Option<Param>, call_conv: CallConv) -> Signature {
    let abi = |param: &Param| {
        AbiParam::new(match param {
            Param::Word => types::I64,
            Param::F32 => types::F32,
        })
    };
    let mut sig = Signature::new(call_conv);
    sig.params.extend(params.iter().map(abi));
    sig.returns.extend(returns.iter().map(abi));
    sig
}

/// Emits the kernel's functions for the target `frontend`. `callee_ids[i]` is the module's
/// function index of `Callee::ALL[i]`, so calls resolve to the micro-kernels the runtime
/// registered for this CPU.
pub fn emit(
    plan: &KernelPlan,
    ir: &KernelIr,
    frontend: TargetFrontendConfig,
    callee_ids: [u32; Callee::ALL.len()],
) -> ClifKernel {
    let mut ctx = FunctionBuilderContext::new();
    let mut build =
        |ops: &[Op], program| Translator::build(plan, ops, program, frontend, callee_ids, &mut ctx);
    let prologue = (!ir.prologue.is_empty()).then(|| build(&ir.prologue, Program::Prologue));
    let item = build(&ir.item, Program::Item);
    let finish = build(&ir.finish, Program::Finish);
    let epilogue = (!ir.epilogue.is_empty()).then(|| build(&ir.epilogue, Program::Epilogue));
    ClifKernel { prologue, item, finish, epilogue }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Program {
    Prologue,
    Item,
    Finish,
    Epilogue,
}

/// Unaligned, non-trapping: every address is in bounds (checked by the runtime before the call).
fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

const F32X4: Type = types::F32X4;

/// What [`Translator::row_map`] does to each element, with its factor.
#[derive(Clone, Copy)]
enum RowUpdate {
    /// `dst = src · f`.
    Scale(Value),
    /// `dst += src · f`.
    Axpy(Value),
}

/// The key tile being processed.
#[derive(Clone, Copy)]
struct Tile {
    /// Keys per full tile of the loop this tile belongs to.
    size: usize,
    /// First key.
    j0: Value,
    /// Keys in the tile.
    n: Value,
    /// Edge tile: apply the row key ranges.
    partial: bool,
}

struct Translator<'a> {
    b: FunctionBuilder<'a>,
    plan: &'a KernelPlan,
    callees: [FuncRef; Callee::ALL.len()],
    // Parameters.
    args: Value,
    /// The query head of a per-head program (prologue, epilogue).
    head: Value,
    batch: Value,
    /// The group being emitted for: the item's first group, or the loop variable of a
    /// `ForEachGroup`.
    group: Value,
    /// The item's first group and group count.
    group0: Value,
    groups: Value,
    q0: Value,
    k_lo: Value,
    k_hi: Value,
    scratch: Value,
    /// Item: the current group's state slot. Finish: the first of `n_states` slots.
    state: Value,
    /// Item: the first group's state slot, and the floats from one group's slot to the next.
    /// Finish: the first slot, and the floats from one split's slot to the next.
    state0: Value,
    state_stride: Value,
    n_states: Value,
    /// The current group's block of scratch (its packed queries).
    group_scratch: Value,
    // Loaded once at entry.
    seq_q: Value,
    seq_k: Value,
    /// Valid queries in this tile: min(q_tile, Sq − q0).
    nq: Value,
    /// Explicit maps: the stack table of heads per group, `groups × largest group` i32.
    head_table: Option<Value>,
    /// A stack [`PrefetchRows`] the tile products read.
    prefetch: Value,
    /// Rows of this work item: the group's heads × nq.
    rows: Value,
    /// `rows` rounded up to the plan's row multiple: the columns of the transposed tiles the
    /// softmax walks.
    rows_v4: Value,
    /// The visibility rule of the key loop being emitted (`Op::KeyTiles`).
    mask: Mask,
}

impl<'a> Translator<'a> {
    fn build(
        plan: &'a KernelPlan,
        ops: &[Op],
        program: Program,
        frontend: TargetFrontendConfig,
        callee_ids: [u32; Callee::ALL.len()],
        ctx: &'a mut FunctionBuilderContext,
    ) -> Function {
        let call_conv = frontend.default_call_conv;
        let (name, sig) = match program {
            Program::Item => (0, signature::<ItemFn>(call_conv)),
            Program::Finish => (1, signature::<FinishFn>(call_conv)),
            Program::Prologue => (2, signature::<HeadFn>(call_conv)),
            Program::Epilogue => (3, signature::<HeadFn>(call_conv)),
        };
        let mut func = Function::with_name_signature(UserFuncName::user(0, name), sig);
        let callees = Callee::ALL.map(|callee| {
            let signature = func.import_signature(callee_signature(callee, call_conv));
            let name = func.declare_imported_user_function(UserExternalName {
                namespace: 0,
                index: callee_ids[callee as usize],
            });
            func.import_function(ExtFuncData {
                name: ExternalName::user(name),
                signature,
                colocated: false,
                patchable: false,
            })
        });
        let mut b = FunctionBuilder::new(&mut func, ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let p = b.block_params(entry).to_vec();
        let zero = b.ins().iconst(types::I64, 0);
        let one = b.ins().iconst(types::I64, 1);
        // (b, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride, n_states); the per-head
        // programs have only their head (p[1]) and work on whole call buffers.
        let (batch, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride, n_states) =
            match program {
                Program::Item => (p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], zero),
                Program::Finish => (p[1], p[2], one, p[3], zero, zero, p[7], p[5], p[6], p[4]),
                Program::Prologue | Program::Epilogue => {
                    (zero, zero, one, zero, zero, zero, zero, zero, zero, zero)
                }
            };
        let head = match program {
            Program::Prologue | Program::Epilogue => p[1],
            Program::Item | Program::Finish => zero,
        };
        let args = p[0];
        let seq_q = b.ins().load(types::I64, mem(), args, offsets::SEQ_Q);
        let mut t = Translator {
            b,
            plan,
            callees,
            args,
            head,
            batch,
            group: g0,
            group0: g0,
            groups,
            q0,
            k_lo,
            k_hi,
            scratch,
            state,
            state0: state,
            state_stride,
            n_states,
            group_scratch: zero,
            seq_q,
            seq_k: zero,
            nq: zero,
            head_table: None,
            prefetch: zero,
            rows: zero,
            rows_v4: zero,
            mask: Mask::None,
        };
        if matches!(program, Program::Item | Program::Finish) {
            t.bind_work_item();
        }
        for op in ops {
            t.op(op);
        }
        t.b.ins().return_(&[]);
        t.b.finalize(frontend);
        func
    }

    /// Emits what the work-item programs share: Sk, the tile's valid queries and rows, the
    /// group blocks of scratch, the explicit map's head table and the prefetch descriptor.
    fn bind_work_item(&mut self) {
        self.seq_k = self.b.ins().load(types::I64, mem(), self.args, offsets::SEQ_K);
        let left = self.b.ins().isub(self.seq_q, self.q0);
        let q_tile = self.int(self.plan.q_tile as i64);
        self.nq = self.b.ins().smin(left, q_tile);
        self.group_scratch = self.add_imm(self.scratch, 4 * self.plan.scratch.shared_len);
        self.head_table = self.emit_head_table();
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            std::mem::size_of::<PrefetchRows>() as u32,
            3,
        ));
        self.prefetch = self.b.ins().stack_addr(types::I64, slot, 0);
        let heads = self.group_size();
        self.rows = self.mul(heads, self.nq);
        self.rows_v4 = self.pad_rows(self.rows);
    }

    // ---- small helpers -------------------------------------------------------------------

    fn int(&mut self, x: i64) -> Value {
        self.b.ins().iconst(types::I64, x)
    }

    fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }

    fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().imul(a, b)
    }

    fn mul_imm(&mut self, a: Value, x: usize) -> Value {
        self.b.ins().imul_imm_s(a, x as i64)
    }

    fn add_imm(&mut self, a: Value, x: usize) -> Value {
        self.b.ins().iadd_imm_s(a, x as i64)
    }

    /// `rows` rounded up to the plan's row multiple.
    fn pad_rows(&mut self, rows: Value) -> Value {
        let multiple = self.plan.row_multiple;
        debug_assert!(multiple.is_power_of_two());
        let up = self.add_imm(rows, multiple - 1);
        self.b.ins().band_imm_s(up, -(multiple as i64))
    }

    /// `base + 4·index`: the address of float `index`.
    fn float_addr(&mut self, base: Value, index: Value) -> Value {
        let bytes = self.b.ins().ishl_imm_s(index, 2);
        self.b.ins().iadd(base, bytes)
    }

    fn arg(&mut self, offset: i32) -> Value {
        self.b.ins().load(types::I64, mem(), self.args, offset)
    }

    fn f32(&mut self, x: f32) -> Value {
        self.b.ins().f32const(Ieee32::with_float(x))
    }

    fn splat(&mut self, x: f32) -> Value {
        let s = self.f32(x);
        self.b.ins().splat(F32X4, s)
    }

    /// `for i in lo..hi (step) { body(i) }`, with `i` a block parameter.
    fn for_range(
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

    /// `for i in lo..hi { body(i) }` with `unroll` copies of the body per trip (then single
    /// steps for the rest), so loop overhead and constant loads are shared between copies.
    fn for_range_unrolled(
        &mut self,
        lo: Value,
        hi: Value,
        unroll: usize,
        body: impl Fn(&mut Self, Value),
    ) {
        assert!(unroll.is_power_of_two(), "the trip count is rounded down with a mask");
        let whole = self.b.ins().isub(hi, lo);
        let whole = self.b.ins().band_imm_s(whole, -(unroll as i64));
        let main_end = self.add(lo, whole);
        self.for_range(lo, main_end, unroll, |t, i| {
            for u in 0..unroll {
                let iu = t.add_imm(i, u);
                body(t, iu);
            }
        });
        self.for_range(main_end, hi, 1, body);
    }

    /// `if cond { then() } else { otherwise() }`.
    fn if_else(
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
    fn if_then(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        self.if_else(cond, then, |_| {});
    }

    fn call(&mut self, callee: Callee, args: &[Value]) -> Option<Value> {
        let call = self.b.ins().call(self.callees[callee as usize], args);
        self.b.inst_results(call).first().copied()
    }

    // ---- group mapping -------------------------------------------------------------------

    /// Explicit maps get a per-call stack table of each group's heads; named maps compute them.
    fn emit_head_table(&mut self) -> Option<Value> {
        if self.plan.head_map != HeadMap::Table {
            return None;
        }
        let width = self.largest_group();
        let size = (self.plan.groups.len() * (width + 1) * 4) as u32;
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            size,
            2,
        ));
        let table = self.b.ins().stack_addr(types::I64, slot, 0);
        // Layout per group: its size, then its heads.
        for (g, heads) in self.plan.groups.iter().enumerate() {
            let base = (g * (width + 1) * 4) as i32;
            let count = self.b.ins().iconst(types::I32, heads.len() as i64);
            self.b.ins().store(mem(), count, table, base);
            for (slot, &h) in heads.iter().enumerate() {
                let head = self.b.ins().iconst(types::I32, h as i64);
                self.b.ins().store(mem(), head, table, base + 4 * (slot as i32 + 1));
            }
        }
        Some(table)
    }

    fn largest_group(&self) -> usize {
        self.plan.groups.iter().map(Vec::len).max().unwrap_or(1)
    }

    /// The number of query heads in the work item's group.
    fn group_size(&mut self) -> Value {
        match self.head_table {
            Some(table) => {
                let stride = (self.largest_group() + 1) * 4;
                let offset = self.mul_imm(self.group, stride);
                let at = self.add(table, offset);
                let count = self.b.ins().load(types::I32, mem(), at, 0);
                self.b.ins().sextend(types::I64, count)
            }
            None => self.int(self.plan.groups[0].len() as i64),
        }
    }

    /// The query head in slot `slot` of the work item's group.
    fn head_of(&mut self, slot: Value) -> Value {
        match (self.plan.head_map, self.head_table) {
            (_, Some(table)) => {
                let width = self.largest_group() + 1;
                let row = self.mul_imm(self.group, width);
                let index = self.add(row, slot);
                let index = self.add_imm(index, 1);
                let at = self.float_addr(table, index); // i32 and f32 are both 4 bytes
                let head = self.b.ins().load(types::I32, mem(), at, 0);
                self.b.ins().sextend(types::I64, head)
            }
            (HeadMap::Interleaved { groups }, None) => {
                let base = self.mul_imm(slot, groups);
                self.add(base, self.group)
            }
            (HeadMap::Contiguous { size }, None) => {
                let base = self.mul_imm(self.group, size);
                self.add(base, slot)
            }
            (HeadMap::Table, None) => unreachable!("explicit maps always have a head table"),
        }
    }

    /// `body(slot, head)` for every head of the work item's group.
    fn for_each_head(&mut self, body: impl Fn(&mut Self, Value, Value)) {
        let zero = self.int(0);
        let count = self.group_size();
        self.for_range(zero, count, 1, |t, slot| {
            let head = t.head_of(slot);
            body(t, slot, head);
        });
    }

    /// `body(slot, head, qi, row)` for every valid row of the work item.
    fn for_each_row(&mut self, body: impl Fn(&mut Self, Value, Value, Value, Value)) {
        self.for_each_head(|t, slot, head| {
            let zero = t.int(0);
            let nq = t.nq;
            t.for_range(zero, nq, 1, |t, qi| {
                let slot_rows = t.mul(slot, nq);
                let row = t.add(slot_rows, qi);
                body(t, slot, head, qi, row);
            });
        });
    }

    // ---- addresses -----------------------------------------------------------------------

    /// Float index of row `(b, q0 + qi, h)` of a `[B, Sq, H, width]` tensor: q, out, lse and
    /// the latent buffers.
    fn row_index(&mut self, head: Value, qi: Value, width: usize) -> Value {
        let h = self.plan.q_heads;
        let bs = self.mul(self.batch, self.seq_q);
        let i = self.add(bs, self.q0);
        let i = self.add(i, qi);
        let ih = self.mul_imm(i, h);
        let ih = self.add(ih, head);
        self.mul_imm(ih, width)
    }

    /// Address and row stride (floats) of key/value tensor `operand` at key `j0`.
    fn kv_rows(&mut self, operand: Operand, j0: Value) -> (Value, usize) {
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
    fn row_width(&self, operand: Operand) -> usize {
        self.cache_row(operand).width
    }

    /// Floats from one row of key/value tensor `operand` to the next.
    fn row_stride(&self, operand: Operand) -> usize {
        self.cache_row(operand).stride
    }

    /// The plan's layout of cache tensor `operand`.
    fn cache_row(&self, operand: Operand) -> CacheRow {
        let tensor = match operand {
            Operand::K => CacheTensor::K,
            Operand::V => CacheTensor::V,
            Operand::CKv => CacheTensor::CKv,
            Operand::KRope => CacheTensor::KRope,
            other => unreachable!("{other:?} is not a cache tensor"),
        };
        self.plan.cache_row(tensor).expect("lowering pairs operands with their spec kind")
    }

    /// Address of row `row` of O in the state slot at `state`: O (`padded_rows × acc_dim`),
    /// then m, then l (`padded_rows` each, so four rows load as one vector).
    fn state_o(&mut self, state: Value, row: Value) -> Value {
        let idx = self.mul_imm(row, self.plan.acc_dim);
        self.float_addr(state, idx)
    }

    /// Address of m of row `row`.
    fn state_m(&mut self, state: Value, row: Value) -> Value {
        let idx = self.add_imm(row, self.plan.padded_rows * self.plan.acc_dim);
        self.float_addr(state, idx)
    }

    /// Address of l of row `row`.
    fn state_l(&mut self, state: Value, row: Value) -> Value {
        let idx = self.add_imm(row, self.plan.padded_rows * (self.plan.acc_dim + 1));
        self.float_addr(state, idx)
    }

    fn scratch_at(&mut self, floats: usize, extra: Value) -> Value {
        let idx = self.add_imm(extra, floats);
        self.float_addr(self.scratch, idx)
    }

    // ---- vector math ---------------------------------------------------------------------

    /// `x < y ? y : x` per lane — one `maxps`. Unlike CLIF's `fmax` (nine instructions on
    /// x86-64) it is not NaN-symmetric: a NaN `y` is returned, a NaN `x` is not. The softmax
    /// only needs the first: a NaN score still reaches its row through `exp(s − m)`.
    fn max_ps(&mut self, x: Value, y: Value) -> Value {
        let y_less = self.b.ins().fcmp(FloatCC::LessThan, y, x);
        let y_less = self.b.ins().bitcast(F32X4, MemFlagsData::new(), y_less);
        self.b.ins().bitselect(y_less, x, y)
    }

    /// `bound < x ? bound : x` per lane — one `minps`; a NaN `x` is returned as is.
    fn min_ps(&mut self, bound: Value, x: Value) -> Value {
        let bound_less = self.b.ins().fcmp(FloatCC::LessThan, bound, x);
        let bound_less = self.b.ins().bitcast(F32X4, MemFlagsData::new(), bound_less);
        self.b.ins().bitselect(bound_less, bound, x)
    }

    /// 2^x for f32x4, for x <= 64 (every caller stays below: softmax arguments are at most the
    /// rescale threshold), exactly as [`crate::abi::exp2`] specifies — the same arithmetic as
    /// the pre-compiled tile exponentials, so the two round alike.
    fn exp2(&mut self, x: Value) -> Value {
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
    fn softcap_log2(&mut self, s: Value, cap: f32) -> Value {
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
    fn scalar_exp2(&mut self, x: Value) -> Value {
        let v = self.b.ins().splat(F32X4, x);
        let e = self.exp2(v);
        self.b.ins().extractlane(e, 0)
    }

    /// `dst[0..len] = src[0..len] * factor` (src may equal dst).
    fn scale_row(&mut self, dst: Value, src: Value, len: usize, factor: Value) {
        self.row_map(dst, src, len, RowUpdate::Scale(factor));
    }

    /// `dst[0..len] += src[0..len] * factor`.
    fn axpy_row(&mut self, dst: Value, src: Value, len: usize, factor: Value) {
        self.row_map(dst, src, len, RowUpdate::Axpy(factor));
    }

    /// A row update: a loop of 16-float steps (four f32x4 each), then unrolled f32x4 and
    /// scalar tails, all with the length known at compile time.
    fn row_map(&mut self, dst: Value, src: Value, len: usize, update: RowUpdate) {
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

    // ---- mask bounds ---------------------------------------------------------------------

    /// Visible keys `[lo, hi)` of query `i`, intersected with the item's key range.
    fn row_bounds(&mut self, i: Value) -> (Value, Value) {
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

    // ---- ops -----------------------------------------------------------------------------

    fn op(&mut self, op: &Op) {
        match op {
            Op::PackQueries { from, offset, len, factor, into } => {
                self.pack_queries(*from, *offset, *len, *factor, *into)
            }
            Op::AbsorbQueries { nope, rank } => self.absorb_queries(*nope, *rank),
            Op::InitState => self.init_state(),
            Op::ForEachGroup { body } => {
                self.for_each_group(|t| body.iter().for_each(|op| t.op(op)))
            }
            Op::KeyTiles { tile, few_rows_tile, mask, body } => match few_rows_tile {
                None => self.key_tiles(*tile, *mask, body),
                Some(narrow) => {
                    let dots = self.dots();
                    let pre = self.prepacked();
                    let in_place = self.b.ins().band_not(dots, pre);
                    self.if_else(
                        in_place,
                        |t| t.key_tiles(*narrow, *mask, body),
                        |t| t.key_tiles(*tile, *mask, body),
                    );
                }
            },
            Op::MergeSplits => self.merge_splits(),
            Op::Normalize => self.normalize(),
            Op::StoreOut { into } => self.store_out(*into),
            Op::ProjectOut { rank, v_dim } => self.project_out(*rank, *v_dim),
            Op::StoreLse => self.store_lse(),
            Op::Scores(_)
            | Op::OnlineSoftmax { .. }
            | Op::AccumulateValues { .. }
            | Op::PackTile { .. } => {
                unreachable!("tile ops only appear inside KeyTiles")
            }
        }
    }

    fn tile_op(&mut self, op: &Op, tile: Tile) {
        match op {
            Op::PackTile { from, into, width } => self.pack_tile(*from, *into, *width, tile),
            Op::Scores(term) => self.scores(term, tile),
            Op::OnlineSoftmax { cap, threshold } => self.online_softmax(*cap, *threshold, tile),
            Op::AccumulateValues { values, width } => self.accumulate_values(*values, *width, tile),
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

    /// Scratch address of a tile operand: the query tiles in the current group's block, the
    /// K/V tiles in the shared part.
    fn tile_addr(&mut self, operand: Operand) -> Value {
        let scratch = &self.plan.scratch;
        let (base, floats) = match operand {
            Operand::QueryTile => (self.group_scratch, scratch.queries),
            Operand::RopeTile => (self.group_scratch, scratch.rope_queries),
            Operand::QueryRows => (self.group_scratch, scratch.query_rows),
            Operand::KeyTile => (self.scratch, scratch.keys),
            Operand::ValueTile => (self.scratch, scratch.values),
            other => unreachable!("{other:?} is a tensor, not a scratch tile"),
        };
        self.add_imm(base, 4 * floats)
    }

    /// Emits `body` once per group of the item, in a loop: the group, its rows, its state
    /// slot and its scratch block are rebound for the body and restored after.
    fn for_each_group(&mut self, body: impl Fn(&mut Self)) {
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

    /// Qᵀ: `factor · q` of every row, transposed into [`PANEL`]-column panels (`len` deep),
    /// one `PackColumns` call per head; the columns from `rows` up to `rows_v4` are zero, so
    /// the score product may cover them.
    fn pack_queries(
        &mut self,
        from: Operand,
        offset: usize,
        len: usize,
        factor: f32,
        into: Operand,
    ) {
        let tile = self.tile_addr(into);
        let (base, width) = match from {
            Operand::Q => (offsets::Q, self.plan.q_width),
            Operand::LatentQ => (offsets::LATENT_Q, self.plan.acc_dim),
            other => unreachable!("{other:?} holds no queries"),
        };
        let row_floats = self.plan.q_heads * width;
        self.for_each_head(|t, slot, head| {
            let zero = t.int(0);
            let idx = t.row_index(head, zero, width);
            let idx = t.add_imm(idx, offset);
            let queries = t.arg(base);
            let src = t.float_addr(queries, idx);
            let first_column = t.mul(slot, t.nq);
            t.pack_columns(t.nq, len, src, row_floats, factor, tile, first_column);
        });
        self.zero_padding_columns(tile, len);
        if into == Operand::QueryTile && self.plan.dot_max_rows > 0 {
            let dots = self.dots();
            self.if_then(dots, |t| t.pack_query_rows(len, factor));
        }
    }

    /// Whether this work item computes scores as dot products: it has few rows.
    fn dots(&mut self) -> Value {
        let max = self.int(self.plan.dot_max_rows as i64);
        self.b.ins().icmp(IntCC::SignedLessThanOrEqual, self.rows, max)
    }

    /// The queries row-major and scaled (rows `rows..rows_v4` zero), for dot-product scores.
    fn pack_query_rows(&mut self, len: usize, factor: f32) {
        let dst = self.tile_addr(Operand::QueryRows);
        let head_dim = self.plan.q_width;
        self.for_each_row(|t, _, head, qi, row| {
            let idx = t.row_index(head, qi, head_dim);
            let q = t.arg(offsets::Q);
            let src = t.float_addr(q, idx);
            let at = t.mul_imm(row, len);
            let at = t.float_addr(dst, at);
            let factor = t.f32(factor);
            t.scale_row(at, src, len, factor);
        });
        let (rows, rows_v4) = (self.rows, self.rows_v4);
        self.for_range(rows, rows_v4, 1, |t, row| {
            let at = t.mul_imm(row, len);
            let at = t.float_addr(dst, at);
            t.zero_floats(at, len);
        });
    }

    /// `dst[0..len] = 0`: a vector loop, then a scalar tail.
    fn zero_floats(&mut self, dst: Value, len: usize) {
        let vectors = self.int((len / 4 * 4) as i64);
        self.zero_vectors(dst, vectors);
        let zero = self.f32(0.0);
        for c in len / 4 * 4..len {
            self.b.ins().store(mem(), zero, dst, 4 * c as i32);
        }
    }

    /// `dst[0..len] = 0` for a multiple of 4 known at run time: one vector store per trip, the
    /// loop counting the address itself (nothing to recompute per store).
    fn zero_vectors(&mut self, dst: Value, len: Value) {
        let zeros = self.splat(0.0);
        let bytes = self.mul_imm(len, 4);
        let end = self.add(dst, bytes);
        self.for_range(dst, end, 16, |t, at| {
            t.b.ins().store(mem(), zeros, at, 0);
        });
    }

    /// Calls `PackColumns`: `rows` rows of `len` floats at `src` into columns
    /// `first_column..` of the panel-packed tile at `tile`.
    #[allow(clippy::too_many_arguments)]
    fn pack_columns(
        &mut self,
        rows: Value,
        len: usize,
        src: Value,
        src_row: usize,
        factor: f32,
        tile: Value,
        first_column: Value,
    ) {
        let (width, src_row, panel) =
            (self.int(len as i64), self.int(src_row as i64), self.int((PANEL * len) as i64));
        let factor = self.f32(factor);
        let args = [rows, width, src, src_row, factor, tile, first_column, panel];
        self.call(Callee::PackColumns, &args);
    }

    /// Address of column `row`, depth 0, of a panel-packed transposed tile `len` deep.
    fn panel_column(&mut self, tile: Value, len: usize, row: Value) -> Value {
        let panel = self.b.ins().ushr_imm_u(row, i64::from(PANEL.trailing_zeros()));
        let panel_floats = self.mul_imm(panel, PANEL * len);
        let lane = self.b.ins().band_imm_s(row, PANEL as i64 - 1);
        let idx = self.add(panel_floats, lane);
        self.float_addr(tile, idx)
    }

    /// Zeroes columns `rows..rows_v4` of a transposed tile `len` deep.
    fn zero_padding_columns(&mut self, tile: Value, len: usize) {
        let zero = self.f32(0.0);
        let (rows, rows_v4) = (self.rows, self.rows_v4);
        self.for_range(rows, rows_v4, 1, |t, row| {
            let dst = t.panel_column(tile, len, row);
            let start = t.int(0);
            let end = t.int(len as i64);
            t.for_range(start, end, 1, |t, d| {
                let d_floats = t.mul_imm(d, PANEL);
                let at = t.float_addr(dst, d_floats);
                t.b.ins().store(mem(), zero, at, 0);
            });
        });
    }

    /// Whether this work item packs K/V tiles: only with enough rows to repay the copy.
    fn packs(&mut self) -> Value {
        if !self.plan.pack_per_item {
            return self.b.ins().iconst(types::I8, 0);
        }
        let min_rows = self.int(self.plan.pack_min_rows as i64);
        self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, self.rows, min_rows)
    }

    /// Copies the tile's rows of `from` (when this item packs): into a row-major key tile, or
    /// into the value tile's [`PANEL`]-column panels (`k_tile` deep).
    fn pack_tile(&mut self, from: Operand, into: Operand, width: usize, tile: Tile) {
        // Nothing to copy when this item reads the call's packed copy or the cache in place.
        let packs = self.packs();
        let pre = self.prepacked();
        let copies = self.b.ins().band_not(packs, pre);
        let k_tile = self.plan.k_tile;
        self.if_then(copies, |t| {
            let (src, stride) = t.kv_rows(from, tile.j0);
            let dst = t.tile_addr(into);
            let (dst_row, dst_panel) =
                if into == Operand::ValueTile { (PANEL, PANEL * k_tile) } else { (width, PANEL) };
            let (width, stride, dst_row, dst_panel) = (
                t.int(width as i64),
                t.int(stride as i64),
                t.int(dst_row as i64),
                t.int(dst_panel as i64),
            );
            let args = [tile.n, width, src, stride, dst, dst_row, dst_panel];
            t.call(Callee::PackRows, &args);
        });
    }

    /// Fills the stack [`PrefetchRows`] with the rows of cache tensor `cache` this group's
    /// products should prefetch, and returns its address: strided cache rows lie a page apart,
    /// past the hardware prefetchers. Null for contiguous rows.
    ///
    /// An item walks each key tile group by group. Where a whole tile of its rows spans few
    /// enough pages ([`KernelPlan::prefetches_whole_tiles`]), the group at position i of n asks
    /// for share i of n of the next tile's rows across all the item's groups (adjacent within a
    /// row; whole rows when the item covers every group, as decode items do): the next tile
    /// arrives one tile ahead, in address order. That measured 1.07–1.1× faster on W4 than the
    /// other way, which larger tiles keep: each group asks for the next group's rows of this
    /// tile (after the last group, the first group's of the next tile), 512-byte pieces of 16
    /// pages at a time on W4.
    fn prefetch_next(&mut self, cache: Operand, tile: Tile) -> Value {
        let width = self.row_width(cache);
        // Contiguous rows (one KV head, MLA's latent) stream through the hardware prefetchers;
        // prefetching a whole tile ahead into L1 only evicted the current one (W5: 1.04–1.06×
        // faster without).
        if self.row_stride(cache) == width {
            return self.int(0);
        }
        let (k_tile, j0) = (tile.size, tile.j0);
        let next_tile = self.add_imm(j0, k_tile);
        let group = self.group;
        let (base, stride, row, part, parts) = if self.plan.prefetches_whole_tiles(k_tile) {
            self.group = self.group0;
            let (base, stride) = self.kv_rows(cache, next_tile);
            let part = self.b.ins().isub(group, self.group0);
            (base, stride, self.mul_imm(self.groups, width), part, self.groups)
        } else {
            let next_group = self.add_imm(group, 1);
            let end = self.add(self.group0, self.groups);
            let last = self.b.ins().icmp(IntCC::Equal, next_group, end);
            let next = self.b.ins().select(last, next_tile, j0);
            self.group = self.b.ins().select(last, self.group0, next_group);
            let (base, stride) = self.kv_rows(cache, next);
            (base, stride, self.int(width as i64), self.int(0), self.int(1))
        };
        self.group = group;
        let (rows, stride) = (self.int(k_tile as i64), self.int(stride as i64));
        let at = self.prefetch;
        for (value, offset) in [
            (base, prefetch_offsets::BASE),
            (rows, prefetch_offsets::ROWS),
            (stride, prefetch_offsets::STRIDE),
            (row, prefetch_offsets::WIDTH),
            (part, prefetch_offsets::PART),
            (parts, prefetch_offsets::PARTS),
        ] {
            self.b.ins().store(mem(), value, at, offset);
        }
        // Items reading the call's packed copy stream it contiguously: no prefetch needed.
        let pre = self.prepacked();
        let none = self.int(0);
        self.b.ins().select(pre, none, at)
    }

    /// Address and row stride of a key operand (the broadcast side of the score product): the
    /// packed tile when this item packs, else the cache rows in place.
    fn key_side(&mut self, operand: Operand, width: usize, j0: Value) -> (Value, Value) {
        if operand != Operand::KeyTile {
            let (addr, stride) = self.kv_rows(operand, j0);
            return (addr, self.int(stride as i64));
        }
        let (in_place, stride) = self.kv_rows(Operand::K, j0);
        let packed = self.tile_addr(operand);
        let packs = self.packs();
        let addr = self.b.ins().select(packs, packed, in_place);
        let (width_v, stride) = (self.int(width as i64), self.int(stride as i64));
        let stride = self.b.ins().select(packs, width_v, stride);
        // Packed for the call: `[B][kv][Sk'][D]`, Sk' = Sk rounded up to whole tiles.
        let pre = self.prepacked();
        let kv = self.plan.groups.len();
        let head = self.mul_imm(self.batch, kv);
        let head = self.add(head, self.group);
        let k_tile = self.plan.k_tile as i64;
        let rows = self.b.ins().iadd_imm_s(self.seq_k, k_tile - 1);
        let rows = self.b.ins().band_imm_s(rows, -k_tile);
        let row = self.mul(head, rows);
        let row = self.add(row, j0);
        let idx = self.mul_imm(row, width);
        let base = self.arg(offsets::K_PACKED);
        let call_packed = self.float_addr(base, idx);
        (self.b.ins().select(pre, call_packed, addr), self.b.ins().select(pre, width_v, stride))
    }

    /// Whether K and V were packed once for the whole call (`CallArgs::k_packed` is set).
    fn prepacked(&mut self) -> Value {
        let k_packed = self.arg(offsets::K_PACKED);
        self.b.ins().icmp_imm_s(IntCC::NotEqual, k_packed, 0)
    }

    /// Address, row stride and panel stride of a value operand (B of the value product): the
    /// packed panels when this item packs, else the cache rows in place.
    fn value_side(&mut self, operand: Operand, j0: Value) -> (Value, Value, Value) {
        let cache = if operand == Operand::ValueTile { Operand::V } else { operand };
        let (in_place, stride) = self.kv_rows(cache, j0);
        let (panel_row, panel) = (self.int(PANEL as i64), self.int(PANEL as i64));
        let stride = self.int(stride as i64);
        if operand != Operand::ValueTile {
            return (in_place, stride, panel);
        }
        let packed = self.tile_addr(operand);
        let k_tile = self.plan.k_tile;
        let packed_panel = self.int((PANEL * k_tile) as i64);
        let packs = self.packs();
        let addr = self.b.ins().select(packs, packed, in_place);
        // Packed for the call: tile j0 / k_tile of (batch, group); key loops start on a
        // multiple of k_tile.
        let pre = self.prepacked();
        let kv = self.plan.groups.len();
        let head = self.mul_imm(self.batch, kv);
        let head = self.add(head, self.group);
        let last = self.add_imm(self.seq_k, k_tile - 1);
        let tiles = self.b.ins().udiv_imm_u(last, k_tile as i64);
        let tile = self.mul(head, tiles);
        let index = self.b.ins().udiv_imm_u(j0, k_tile as i64);
        let tile = self.add(tile, index);
        let idx = self.mul_imm(tile, self.plan.packed_value_tile());
        let base = self.arg(offsets::V_PACKED);
        let call_packed = self.float_addr(base, idx);
        let packed_tiles = self.b.ins().bor(packs, pre);
        (
            self.b.ins().select(pre, call_packed, addr),
            self.b.ins().select(packed_tiles, panel_row, stride),
            self.b.ins().select(packed_tiles, packed_panel, panel),
        )
    }

    /// Prologue: `latent_q[r, h] = q_nope[r, h] · W_UK[h]` for every row r = (b, q) of the
    /// call, as one tile product.
    fn absorb_queries(&mut self, nope: usize, rank: usize) {
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
    fn head_slice(&mut self, field: i32, floats_per_head: usize) -> Value {
        let base = self.arg(field);
        let at = self.mul_imm(self.head, floats_per_head);
        self.float_addr(base, at)
    }

    /// Rows of a per-head program: every (batch, query) of the call, `B · Sq`.
    fn call_rows(&mut self) -> Value {
        let batch = self.b.ins().load(types::I64, mem(), self.args, offsets::BATCH);
        self.mul(batch, self.seq_q)
    }

    fn init_state(&mut self) {
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

    fn key_tiles(&mut self, tile: usize, mask: Mask, body: &[Op]) {
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
                    t.tile_op(op, Tile { size: tile, j0, n: n_full, partial: false });
                }
                t.b.ins().jump(done, &[]);
                t.b.switch_to_block(partial_block);
                t.b.seal_block(partial_block);
                for op in body {
                    t.tile_op(op, Tile { size: tile, j0, n, partial: true });
                }
                t.b.ins().jump(done, &[]);
                t.b.switch_to_block(done);
                t.b.seal_block(done);
            });
        });
    }

    /// For an edge tile: each row's visible keys relative to `j0`, clamped to `0..n`, as i32
    /// lows then highs in scratch; the padding rows up to `rows_v4` see nothing.
    fn write_row_ranges(&mut self, j0: Value, n: Value) {
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
    fn range_tables(&mut self) -> (Value, Value) {
        let zero = self.int(0);
        let lows = self.scratch_at(self.plan.scratch.ranges, zero);
        let highs = self.add_imm(lows, 4 * self.plan.padded_rows);
        (lows, highs)
    }

    /// `Sᵀ (+)= keys · Qᵀ`: `n` keys by `rows_v4` columns.
    fn scores(&mut self, term: &ScoreTerm, tile: Tile) {
        let (a, a_row) = self.key_side(term.keys, term.len, tile.j0);
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
        let prefetch = match term.keys {
            _ if term.accumulate => zero,
            Operand::KeyTile => self.prefetch_next(Operand::K, tile),
            keys => self.prefetch_next(keys, tile),
        };
        let (n, rows_v4) = (tile.n, self.rows_v4);
        let broadcast = |t: &mut Self| {
            let args = [
                n, rows_v4, len, a, a_row, one, b, panel, panel_len, c, ldc, acc, zero, zero,
                prefetch,
            ];
            t.call(Callee::DotNn, &args);
        };
        if term.query == Operand::QueryTile && self.plan.dot_max_rows > 0 {
            let dots = self.dots();
            self.if_else(
                dots,
                |t| {
                    let rows = t.tile_addr(Operand::QueryRows);
                    let args = [n, rows_v4, len, a, a_row, rows, len, c, ldc, acc, prefetch];
                    t.call(Callee::DotNt, &args);
                },
                broadcast,
            );
        } else {
            broadcast(self);
        }
    }

    /// The online softmax of a tile: a generated pass down Sᵀ's columns, four rows per vector,
    /// for the tile max (applying the cap and the edge mask) and the rare lazy rescale; then
    /// `P = 2^(s − m)` and its row sums over the whole tile in one call of the pre-compiled
    /// tile exponentials, which use the CPU's full vector width.
    fn online_softmax(&mut self, cap: Option<f32>, threshold: f32, tile: Tile) {
        let ld = self.plan.padded_rows;
        let zero = self.int(0);
        let scores = self.scratch_at(self.plan.scratch.scores, zero);
        let (lows, highs) = self.range_tables();
        let state = self.state;
        let (rows_v4, n) = (self.rows_v4, tile.n);
        let neg_inf = self.splat(f32::NEG_INFINITY);
        self.for_range(zero, rows_v4, 4, |t, c| {
            let column = t.float_addr(scores, c);
            let bounds = tile.partial.then(|| {
                let offset = t.mul_imm(c, 4);
                let (lo_at, hi_at) = (t.add(lows, offset), t.add(highs, offset));
                let lo = t.b.ins().load(types::I32X4, mem(), lo_at, 0);
                let hi = t.b.ins().load(types::I32X4, mem(), hi_at, 0);
                (lo, hi)
            });
            let max_var = t.b.declare_var(F32X4);
            t.b.def_var(max_var, neg_inf);
            let start = t.int(0);
            t.for_range_unrolled(start, n, 4, |t, j| {
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
                let m = t.b.use_var(max_var);
                let m = t.max_ps(m, s);
                t.b.def_var(max_var, m);
            });
            let tile_max = t.b.use_var(max_var);
            // Lazy rescale: m moves only in lanes whose tile max exceeds it by the threshold
            // (always on a row's first visible tile, where m = f32::MIN).
            let m_at = t.state_m(state, c);
            let m_old = t.b.ins().load(F32X4, mem(), m_at, 0);
            let vthreshold = t.splat(threshold);
            let limit = t.b.ins().fadd(m_old, vthreshold);
            let raise = t.b.ins().fcmp(FloatCC::GreaterThan, tile_max, limit);
            let any = t.b.ins().vany_true(raise);
            t.if_then(any, |t| t.rescale(c, raise, tile_max));
        });
        // P = 2^(s − m), l += column sums. m is finite (it starts at f32::MIN), so a hidden
        // key's 2^(−∞ − m) is 0, never NaN.
        let m = self.state_m(state, zero);
        let l = self.state_l(state, zero);
        let ld = self.int(ld as i64);
        self.call(Callee::Exp2Columns, &[n, rows_v4, scores, ld, m, l]);
    }

    /// Rows `c..c + 4`, in the lanes `raise` selects: `m' = tile_max`, and l and O scaled by
    /// `2^(m − m')`. O rows are scaled only where the factor is not 1.
    fn rescale(&mut self, c: Value, raise: Value, tile_max: Value) {
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

    /// `O += P · values`: P read column-major from Sᵀ, per-row key ranges on edge tiles.
    fn accumulate_values(&mut self, values: Operand, width: usize, tile: Tile) {
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
        // Grouped values are their own tensor: prefetch their next rows when strided (latent
        // values are the keys, contiguous).
        let prefetch = match self.plan.form {
            Form::Grouped => self.prefetch_next(Operand::V, tile),
            Form::LatentAbsorbed => zero,
        };
        let (rows, n) = (self.rows, tile.n);
        let args =
            [rows, width, n, p, one, lda, v, b_row, b_panel, o, ldc, one, lows, highs, prefetch];
        self.call(Callee::DotNn, &args);
    }

    fn merge_splits(&mut self) {
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
    fn normalize(&mut self) {
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
    fn inverse_l(&mut self, state: Value, row: Value) -> Value {
        let at = self.state_l(state, row);
        self.b.ins().load(types::F32, mem(), at, 0)
    }

    /// `into = O · (1/l)`, row by row: `out`, or for absorbed MLA `latent_out`.
    fn store_out(&mut self, into: Operand) {
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

    /// Epilogue: `out[r, h] = latent_out[r, h] · W_UV[h]ᵀ` for every row r = (b, q) of the
    /// call, as one tile product.
    fn project_out(&mut self, rank: usize, v_dim: usize) {
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

    fn store_lse(&mut self) {
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
