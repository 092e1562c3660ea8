//! Emits Cranelift IR for a kernel's tile program ([`crate::ir`]).
//!
//! The translator holds a `FunctionBuilder` and has one method per IR op. Loops, the group
//! mapping, mask bounds and edge-tile masking, the online softmax's cap, max and lazy rescale
//! (with a vectorised `exp2`), split merging and stores are generated here as f32x4 code
//! specialised to the spec; the tile products, a score tile's exponentials and the tile copies
//! are calls to pre-compiled routines ([`Callee`]).
//!
//! The translator's methods are split by what they emit: `ops` (the op dispatch and the loop
//! structure), `tiles` (query and K/V tiles), `softmax` (the flash tile), `finish` (splits,
//! normalisation, stores), `calls` (absorbed MLA's per-head programs), `heads` (the group
//! mapping), `mask`, `addresses`, `vector` (f32x4 math) and `helpers`.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::{
    AbiParam, ExtFuncData, ExternalName, FuncRef, Function, InstBuilder, MemFlagsData, Signature,
    StackSlotData, StackSlotKind, Type, UserExternalName, UserFuncName, Value, types,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

use crate::abi::{
    AbiFn, Callee, ExpandFn, FinishFn, HeadFn, ItemFn, PANEL, Param, PrefetchRows, offsets,
    prefetch_offsets,
};
use crate::ir::{DotScores, KernelIr, Op, Operand, Prefetch, ScoreTerm, TileSource};
use crate::plan::{CacheRow, HeadMap, KernelPlan};
use crate::spec::Mask;

mod addresses;
mod calls;
mod finish;
mod heads;
mod helpers;
mod mask;
mod ops;
mod softmax;
mod tiles;
mod vector;

/// The generated functions of a kernel.
pub struct ClifKernel {
    /// `prologue(args, h)`, when the IR has one (absorbed MLA).
    pub prologue: Option<Function>,
    /// `item(args, b, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride, resume)`.
    pub item: Function,
    /// `finish(args, b, g, q0, n_states, states, split_stride, scratch)`.
    pub finish: Function,
    /// `epilogue(args, h)`, when the IR has one (absorbed MLA).
    pub epilogue: Option<Function>,
    /// `expand(args, b, h, j0, n, keys, values)`, when the IR has one (expanded MLA).
    pub expand: Option<Function>,
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
    let expand = (!ir.expand.is_empty()).then(|| build(&ir.expand, Program::Expand));
    ClifKernel { prologue, item, finish, epilogue, expand }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Program {
    Prologue,
    Item,
    Finish,
    Epilogue,
    Expand,
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
    /// How that loop's products prefetch.
    prefetch: Prefetch,
    /// First key.
    j0: Value,
    /// Keys in the tile.
    n: Value,
    /// A tile of the narrow loop of few-row items (`ir::NarrowTiles`).
    narrow: bool,
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
    /// Item: nonzero when the state slots carry on an earlier item's states (`ItemFn`).
    resume: Value,
    /// The current group's block of scratch (its packed queries).
    group_scratch: Value,
    // Loaded once at entry.
    seq_q: Value,
    /// Rows per sequence of the cache tensors (their addressing stride).
    seq_k: Value,
    /// Keys of this item's sequence: `kv_lens[b]`, or Sk without per-sequence lengths.
    keys: Value,
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
            Program::Expand => (4, signature::<ExpandFn>(call_conv)),
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
        // programs have only their head (p[1]) and work on whole call buffers; expand's
        // (b, h, j0, n, keys, values) take batch, head, k_lo, k_hi, scratch and state.
        let (batch, g0, groups, q0, k_lo, k_hi, scratch, state, state_stride, n_states) =
            match program {
                Program::Item => (p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], zero),
                Program::Finish => (p[1], p[2], one, p[3], zero, zero, p[7], p[5], p[6], p[4]),
                Program::Prologue | Program::Epilogue => {
                    (zero, zero, one, zero, zero, zero, zero, zero, zero, zero)
                }
                Program::Expand => (p[1], zero, one, zero, p[3], p[4], p[5], p[6], zero, zero),
            };
        let resume = if program == Program::Item { p[10] } else { zero };
        let head = match program {
            Program::Prologue | Program::Epilogue => p[1],
            Program::Expand => p[2],
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
            resume,
            group_scratch: zero,
            seq_q,
            seq_k: zero,
            keys: zero,
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

    /// Emits what the work-item programs share: Sk, the sequence's keys, the tile's valid
    /// queries and rows, the group blocks of scratch, the explicit map's head table and the
    /// prefetch descriptor.
    fn bind_work_item(&mut self) {
        self.seq_k = self.b.ins().load(types::I64, mem(), self.args, offsets::SEQ_K);
        self.keys = self.sequence_keys();
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
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use cranelift_codegen::{isa, settings};

    use super::*;

    /// The row-major query copies of dot-product scores read the operand and offset the op
    /// names: one more load of `latent_q` for the latent copy and one more of `q` for the RoPE
    /// copy than the program without them (not `q` twice).
    #[test]
    fn row_major_query_copies_read_the_named_operand_and_offset() {
        let (plan, with_copies) = crate::ir::row_major_latent_ir();
        let without = crate::ir::lower(&plan);
        let flags = settings::Flags::new(settings::builder());
        let frontend =
            isa::lookup_by_name("x86_64").unwrap().finish(flags).unwrap().frontend_config();
        let item =
            |ir| emit(&plan, ir, frontend, [0; Callee::ALL.len()]).item.display().to_string();
        let (with_copies, without) = (item(&with_copies), item(&without));
        // The arguments are the entry block's first parameter, v0.
        let loads = |clif: &str, offset: i32| {
            let at = if offset == 0 { String::new() } else { format!("+{offset}") };
            clif.matches(&format!("load.i64 notrap v0{at}\n")).count()
        };
        let added = |offset| loads(&with_copies, offset) - loads(&without, offset);
        assert_eq!((added(offsets::LATENT_Q), added(offsets::Q)), (1, 1), "{with_copies}");
    }
}
