//! [`Jit`]: compiles specs to native kernels at run time with Cranelift.
//!
//! Pipeline: validate → plan → lower to the tile IR → emit CLIF → define in a long-lived
//! `JITModule` → finalize → function pointers. The `Jit` owns the module, one codegen context
//! reused across compiles, and a cache keyed by the spec, so compiling an equal spec again
//! returns the kernel already built.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attngen_codegen::abi::{CallArgs, Callee, FinishFn, HeadFn, ItemFn, PANEL};
use attngen_codegen::{AttentionSpec, KernelIr, KernelPlan, Schedule, clif, ir, validate};
use cranelift_codegen::Context;
use cranelift_codegen::settings::Configurable;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};
use rayon::prelude::*;

use crate::{Error, Inputs, Isa, Kernel, Shape, check_call, simd};

/// The run-time compiler. Cheap to share: compiling takes an internal lock, running kernels
/// does not.
///
/// ```
/// use attngen::{AttentionSpec, Inputs, Jit, Kernel, Mask, Shape};
///
/// let jit = Jit::new()?;
/// let kernel = jit.compile(&AttentionSpec::gqa(4, 2, 8).mask(Mask::Causal))?;
/// let shape = Shape::new(1, 3, 3);
/// let (q, k, v) = (vec![0.5; 3 * 4 * 8], vec![0.25; 3 * 2 * 8], vec![1.0; 3 * 2 * 8]);
/// let mut out = vec![0.0; 3 * 4 * 8];
/// kernel.run(shape, &Inputs::grouped(&q, &k, &v), &mut out, None)?;
/// assert!(out.iter().all(|&o| (o - 1.0).abs() < 1e-6));
/// # Ok::<(), attngen::Error>(())
/// ```
pub struct Jit {
    state: Mutex<JitState>,
    isa: Isa,
    pool: Option<Arc<rayon::ThreadPool>>,
}

struct JitState {
    module: JITModule,
    callee_ids: [FuncId; Callee::ALL.len()],
    ctx: Context,
    cache: HashMap<String, Arc<Compiled>>,
    compiled: usize,
}

/// One compiled spec: its plan and entry points.
struct Compiled {
    plan: KernelPlan,
    prologue: Option<HeadFn>,
    item: ItemFn,
    finish: FinishFn,
    epilogue: Option<HeadFn>,
    compile_time: Duration,
}

/// What `attngen dump` shows of a compiled spec.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The plan, as text.
    pub plan: String,
    /// The tile IR, as text.
    pub ir: String,
    /// The Cranelift IR of the kernel's functions: `item` and `finish`, and for absorbed MLA
    /// `prologue` and `epilogue`.
    pub clif: String,
    /// Their machine code, disassembled.
    pub asm: String,
    /// The micro-kernel ISA the code calls.
    pub isa: Isa,
    /// One line per pre-compiled routine: the name the CLIF and the machine code give it
    /// (`u0:N`), its symbol and what it does.
    pub routines: String,
}

/// Natural log for generated code (called once per output row).
extern "C" fn attngen_ln(x: f32) -> f32 {
    x.ln()
}

/// How a [`Jit`] is built: its micro-kernel ISA and its threads.
///
/// ```
/// use attngen::{Isa, Jit, JitOptions};
///
/// // The portable routines on two threads of the JIT's own pool, whatever the CPU.
/// let jit = Jit::with_options(JitOptions::default().isa(Isa::Portable).threads(2))?;
/// assert_eq!(jit.isa(), Isa::Portable);
/// # Ok::<(), attngen::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitOptions {
    isa: Option<Isa>,
    threads: Option<usize>,
}

impl JitOptions {
    /// Call this ISA's routines instead of the one `ATTNGEN_ISA` names or the widest the CPU
    /// has; building the JIT fails if the CPU lacks it.
    pub fn isa(self, isa: Isa) -> JitOptions {
        JitOptions { isa: Some(isa), ..self }
    }

    /// Run kernels on a pool of their own with this many threads, instead of rayon's global
    /// pool.
    pub fn threads(self, threads: usize) -> JitOptions {
        JitOptions { threads: Some(threads), ..self }
    }
}

impl Jit {
    /// A JIT for this CPU whose kernels use every core (rayon's global pool), with the widest
    /// ISA the CPU has or the one `ATTNGEN_ISA` names.
    pub fn new() -> Result<Jit, Error> {
        Self::with_options(JitOptions::default())
    }

    /// A JIT whose kernels run on their own pool of `threads` threads.
    pub fn with_threads(threads: usize) -> Result<Jit, Error> {
        Self::with_options(JitOptions::default().threads(threads))
    }

    /// A JIT built as `options` say. The ISA is the one they name, else `ATTNGEN_ISA`'s, else
    /// the widest this CPU has; one the CPU lacks is [`Error::Isa`].
    pub fn with_options(options: JitOptions) -> Result<Jit, Error> {
        let isa = match options.isa {
            Some(isa) => isa.checked()?,
            None => Isa::from_env()?.unwrap_or_else(Isa::detect),
        };
        let pool = match options.threads {
            Some(threads) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .build()
                    .map_err(|e| Error::Threads { threads, reason: e.to_string() })?,
            )),
            None => None,
        };
        Self::build(isa, pool)
    }

    fn build(isa: Isa, pool: Option<Arc<rayon::ThreadPool>>) -> Result<Jit, Error> {
        let mut flags = cranelift_codegen::settings::builder();
        flags.set("opt_level", "speed").map_err(compile_error)?;
        flags.set("use_colocated_libcalls", "false").map_err(compile_error)?;
        flags.set("is_pic", "false").map_err(compile_error)?;
        // Block offsets in `dump --asm`, so profiler samples (offsets into attngen_item_N)
        // can be matched to the listing.
        flags.set("machine_code_cfg_info", "true").map_err(compile_error)?;
        let isa_builder = cranelift_native::builder().map_err(compile_error)?;
        let target = isa_builder
            .finish(cranelift_codegen::settings::Flags::new(flags))
            .map_err(compile_error)?;
        let routines = isa.routines();
        let mut builder = JITBuilder::with_isa(target, cranelift_module::default_libcall_names());
        builder.symbol(Callee::DotNt.symbol(), routines.dot_nt as *const u8);
        builder.symbol(Callee::DotNn.symbol(), routines.dot_nn as *const u8);
        builder.symbol(Callee::Exp2Columns.symbol(), routines.exp2_columns as *const u8);
        builder.symbol(Callee::Ln.symbol(), attngen_ln as *const u8);
        builder.symbol(Callee::PackRows.symbol(), simd::pack_rows as *const u8);
        builder.symbol(Callee::PackColumns.symbol(), routines.pack_columns as *const u8);
        let mut module = JITModule::new(builder);
        let call_conv = module.isa().default_call_conv();
        let mut callee_ids = [FuncId::from_u32(0); Callee::ALL.len()];
        for (id, callee) in callee_ids.iter_mut().zip(Callee::ALL) {
            let sig = clif::callee_signature(callee, call_conv);
            *id = module
                .declare_function(callee.symbol(), Linkage::Import, &sig)
                .map_err(compile_error)?;
        }
        let ctx = module.make_context();
        let state = JitState { module, callee_ids, ctx, cache: HashMap::new(), compiled: 0 };
        Ok(Jit { state: Mutex::new(state), isa, pool })
    }

    /// The micro-kernel ISA this JIT's kernels call.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Compiles `spec` (or returns the cached kernel for an equal spec).
    pub fn compile(&self, spec: &AttentionSpec) -> Result<JitKernel, Error> {
        validate(spec)?;
        let key = cache_key(spec);
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let compiled = match state.cache.get(&key) {
            Some(compiled) => Arc::clone(compiled),
            None => {
                let compiled = Arc::new(state.define(spec, None)?);
                state.cache.insert(key, Arc::clone(&compiled));
                compiled
            }
        };
        Ok(JitKernel { spec: spec.clone(), compiled, pool: self.pool.clone() })
    }

    /// Compiles `spec` afresh and returns its plan, IR, CLIF and disassembly.
    pub fn dump(&self, spec: &AttentionSpec) -> Result<Listing, Error> {
        validate(spec)?;
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut listing = Listing {
            plan: String::new(),
            ir: String::new(),
            clif: String::new(),
            asm: String::new(),
            isa: self.isa,
            routines: Callee::ALL
                .iter()
                .zip(state.callee_ids)
                .map(|(callee, id)| {
                    format!("u0:{} = {}: {}\n", id.as_u32(), callee.symbol(), callee.purpose())
                })
                .collect(),
        };
        state.define(spec, Some(&mut listing))?;
        Ok(listing)
    }
}

impl JitState {
    /// Plans, lowers, emits and defines every function of a spec's kernel.
    fn define(
        &mut self,
        spec: &AttentionSpec,
        mut listing: Option<&mut Listing>,
    ) -> Result<Compiled, Error> {
        let started = Instant::now();
        let plan = KernelPlan::new(spec);
        let program: KernelIr = ir::lower(&plan);
        let frontend = self.module.isa().frontend_config();
        let callee_ids = self.callee_ids.map(|id| id.as_u32());
        let kernel = clif::emit(&plan, &program, frontend, callee_ids);
        if let Some(listing) = listing.as_deref_mut() {
            listing.plan = plan.to_string();
            listing.ir = program.to_string();
        }
        // Each compile defines fresh symbols: the cache, not the module, deduplicates.
        self.compiled += 1;
        let mut define = |role, f| self.define_function(role, f, &mut listing);
        let prologue = kernel.prologue.map(|f| define("prologue", f)).transpose()?;
        let item = define("item", kernel.item)?;
        let finish = define("finish", kernel.finish)?;
        let epilogue = kernel.epilogue.map(|f| define("epilogue", f)).transpose()?;
        self.module.finalize_definitions().map_err(compile_error)?;
        let code = |id: FuncId| self.module.get_finalized_function(id);
        let (prologue, item, finish, epilogue) =
            (prologue.map(code), code(item), code(finish), epilogue.map(code));
        // SAFETY: each function was just defined with the signature of its type (ItemFn,
        // FinishFn, HeadFn: clif::item_signature, finish_signature and head_signature, all
        // pointer-sized integers in the platform's C calling convention), and the module never
        // frees their code (Cranelift's system memory provider leaks it on drop to keep such
        // pointers valid).
        let (prologue, item, finish, epilogue) = unsafe {
            (
                prologue.map(|code| std::mem::transmute::<*const u8, HeadFn>(code)),
                std::mem::transmute::<*const u8, ItemFn>(item),
                std::mem::transmute::<*const u8, FinishFn>(finish),
                epilogue.map(|code| std::mem::transmute::<*const u8, HeadFn>(code)),
            )
        };
        Ok(Compiled { plan, prologue, item, finish, epilogue, compile_time: started.elapsed() })
    }

    /// Declares and defines one generated function as `attngen_{role}_N`, adding its CLIF and
    /// machine code to the listing when there is one.
    fn define_function(
        &mut self,
        role: &str,
        func: cranelift_codegen::ir::Function,
        listing: &mut Option<&mut Listing>,
    ) -> Result<FuncId, Error> {
        let name = format!("attngen_{role}_{}", self.compiled);
        let id = self
            .module
            .declare_function(&name, Linkage::Local, &func.signature)
            .map_err(compile_error)?;
        self.ctx.clear();
        self.ctx.func = func;
        self.ctx.set_disasm(listing.is_some());
        if let Some(listing) = listing.as_deref_mut() {
            listing.clif.push_str(&format!("; {role}\n{}\n", self.ctx.func.display()));
        }
        self.module.define_function(id, &mut self.ctx).map_err(|e| {
            Error::Compile(format!("Cranelift rejected the {role} function: {e:?}"))
        })?;
        if let Some(listing) = listing.as_deref_mut() {
            let asm = disassemble(&self.ctx, self.module.isa());
            listing.asm.push_str(&format!("; {role}\n{asm}\n"));
        }
        Ok(id)
    }
}

/// A Cranelift setting, ISA or module error, as the error `Jit` reports.
fn compile_error(e: impl std::fmt::Display) -> Error {
    Error::Compile(e.to_string())
}

fn disassemble(ctx: &Context, isa: &dyn cranelift_codegen::isa::TargetIsa) -> String {
    let Some(code) = ctx.compiled_code() else { return String::from("(no code)") };
    match isa.to_capstone() {
        Ok(capstone) => code
            .disassemble(Some(&ctx.func.params), &capstone)
            .unwrap_or_else(|e| format!("(disassembly failed: {e})")),
        Err(e) => code.vcode.clone().unwrap_or_else(|| format!("(no disassembler: {e})")),
    }
}

thread_local! {
    /// Each thread's work-item buffers, reused across items and calls: allocating them per item
    /// cost page faults, and with glibc's mmap threshold an unmap (a TLB shootdown on every
    /// core) per item. Generated code writes every scratch and state element before reading it,
    /// so the buffer is never cleared.
    static WORKSPACE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's workspace, grown to at least `len` floats. `f` must not re-enter
/// (it runs generated code, which never calls back into the runtime).
fn with_workspace<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    WORKSPACE.with(|workspace| {
        let mut workspace = workspace.borrow_mut();
        if workspace.len() < len {
            workspace.resize(len, 0.0);
        }
        f(&mut workspace[..len])
    })
}

thread_local! {
    /// The call-level packed K/V of the calls made from this thread, reused across calls.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Absorbed MLA's `latent_q` and `latent_out` of the calls made from this thread.
    static LATENT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The split states of the decode tasks this thread runs, reused across tasks and calls: a
    /// fresh zeroed buffer per task (megabytes for long contexts) cost page faults and an
    /// unmap per task. Every state element is written (InitState) before it is read.
    static SPLIT_STATES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Floats a thread keeps in each of its reused call buffers between calls (128 MB); larger
/// calls allocate their own buffer and free it when they return, so a single long prefill does
/// not pin its copy.
const KEPT_FLOATS: usize = 1 << 25;

/// Runs `f` on this thread's `buffer`, grown to at least `len` floats; a nested use on the
/// same thread (rayon may run another task here while this one waits) or one larger than
/// [`KEPT_FLOATS`] gets a fresh buffer.
fn with_kept<R>(
    buffer: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    if len > KEPT_FLOATS {
        return f(&mut vec![0.0; len]);
    }
    buffer.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => {
            if kept.len() < len {
                kept.resize(len, 0.0);
            }
            f(&mut kept[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Specs that differ only in their name compile to the same kernel.
fn cache_key(spec: &AttentionSpec) -> String {
    AttentionSpec { name: None, ..spec.clone() }.to_toml()
}

/// A kernel compiled by [`Jit::compile`].
#[derive(Clone)]
pub struct JitKernel {
    spec: AttentionSpec,
    compiled: Arc<Compiled>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl JitKernel {
    /// How long planning, lowering and Cranelift took when this kernel was first compiled.
    pub fn compile_time(&self) -> Duration {
        self.compiled.compile_time
    }

    /// The plan the kernel was compiled from.
    pub fn plan(&self) -> &KernelPlan {
        &self.compiled.plan
    }

    /// Whether two kernels share one compiled body (an equal spec hit the cache).
    pub fn same_code(&self, other: &JitKernel) -> bool {
        Arc::ptr_eq(&self.compiled, &other.compiled)
    }
}

/// The call's tensors for generated code, shareable across the worker threads.
struct SharedArgs(CallArgs);

// SAFETY: the pointers in CallArgs come from the `&[f32]` inputs and `&mut [f32]` outputs of one
// `run` call and from its packed K/V and latent buffers, which outlive every worker (rayon joins
// before `run` returns). Workers only read the inputs, the packed K/V and latent_q (each written
// before the items start), and write disjoint parts of `out`, `lse` and `latent_out`: each
// (batch, group, query tile) task owns the rows of its group's heads and its queries, and every
// head belongs to one group; the per-head prologue and epilogue write one head's slice each.
unsafe impl Sync for SharedArgs {}

impl SharedArgs {
    fn ptr(&self) -> *const CallArgs {
        &self.0
    }
}

impl Kernel for JitKernel {
    fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    fn run(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), Error> {
        check_call(&self.spec, shape, inputs, out.len(), lse.as_deref().map(<[f32]>::len))?;
        if shape.batch == 0 || shape.seq_q == 0 {
            return Ok(());
        }
        let empty: &[f32] = &[];
        let (q, k, v, c_kv, k_rope, w_uk, w_uv) = match *inputs {
            Inputs::Grouped { q, k, v } => (q, k, v, empty, empty, empty, empty),
            Inputs::Latent { q, c_kv, k_rope, w_uk, w_uv } => {
                (q, empty, empty, c_kv, k_rope, w_uk, w_uv)
            }
        };
        let args = CallArgs {
            q: q.as_ptr(),
            k: k.as_ptr(),
            v: v.as_ptr(),
            c_kv: c_kv.as_ptr(),
            k_rope: k_rope.as_ptr(),
            w_uk: w_uk.as_ptr(),
            w_uv: w_uv.as_ptr(),
            out: out.as_mut_ptr(),
            lse: lse.map_or(std::ptr::null_mut(), |l| l.as_mut_ptr()),
            k_packed: std::ptr::null(),
            v_packed: std::ptr::null(),
            latent_q: std::ptr::null_mut(),
            latent_out: std::ptr::null_mut(),
            batch: shape.batch,
            seq_q: shape.seq_q,
            seq_k: shape.seq_k,
        };
        let plan = &self.compiled.plan;
        // Absorbed MLA's q' and o' buffers, each latent_len floats (0 for grouped specs).
        let lens = plan.latent_len(shape.batch, shape.seq_q);
        let Some((latent_len, both)) = lens.and_then(|n| Some((n, n.checked_mul(2)?))) else {
            let shape = vec![2, shape.batch, shape.seq_q, self.spec.q_heads, plan.acc_dim];
            return Err(Error::TooLarge { tensor: "q' and o' (absorbed MLA)", shape });
        };
        if latent_len > 0 {
            with_kept(&LATENT, both, |latent| {
                let (latent_q, latent_out) = latent.split_at_mut(latent_len);
                let args = CallArgs {
                    latent_q: latent_q.as_mut_ptr(),
                    latent_out: latent_out.as_mut_ptr(),
                    ..args
                };
                self.run_checked(shape, args, k, v);
            });
        } else {
            self.run_checked(shape, args, k, v);
        }
        Ok(())
    }
}

impl JitKernel {
    /// Runs a call whose buffers `check_call` verified (and, for absorbed MLA, whose latent
    /// buffers hold `plan.latent_len` floats each): the prologue per head, the work items and
    /// finishes, the epilogue per head. `k` and `v` are the grouped caches `args` points to.
    fn run_checked(&self, shape: Shape, args: CallArgs, k: &[f32], v: &[f32]) {
        let plan = &self.compiled.plan;
        let threads =
            self.pool.as_ref().map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        let schedule = plan.schedule(shape.batch, shape.seq_q, shape.seq_k, threads);
        if schedule.packs_call {
            let (k_len, v_len) = plan.packed_lens(shape.batch, shape.seq_k);
            with_kept(&PACKED, k_len + v_len, |packed| {
                let (k_packed, v_packed) = packed.split_at_mut(k_len);
                self.in_pool(|| pack_call(plan, shape, k, v, k_packed, v_packed));
                let args =
                    CallArgs { k_packed: k_packed.as_ptr(), v_packed: v_packed.as_ptr(), ..args };
                self.execute(shape, SharedArgs(args), schedule);
            });
        } else {
            self.execute(shape, SharedArgs(args), schedule);
        }
    }

    /// Runs `f` on this kernel's thread pool (the global one by default).
    fn in_pool(&self, f: impl FnOnce() + Send) {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// Runs every work item and finish of a checked call.
    fn execute(&self, shape: Shape, args: SharedArgs, schedule: Schedule) {
        let compiled = &*self.compiled;
        let plan = &compiled.plan;
        let per_item = schedule.groups_per_item;
        let blocks = plan.groups.len() / per_item;
        let tasks = shape.batch * blocks * schedule.q_tiles;
        let (state_len, splits) = (plan.state_len, schedule.splits);
        let scratch_len = plan.scratch.len(per_item);
        // A task's states: `splits` runs of `per_item` group slots ([split][group]), so each
        // split's item writes one contiguous run.
        let run_task = |task: usize| {
            let (b, rest) =
                (task / (blocks * schedule.q_tiles), task % (blocks * schedule.q_tiles));
            let (block, tile) = (rest / schedule.q_tiles, rest % schedule.q_tiles);
            let (g0, q0) = (block * per_item, tile * plan.q_tile);
            let item = |k_lo: usize, k_hi: usize, scratch: &mut [f32], states: &mut [f32]| {
                assert!(scratch.len() >= scratch_len && states.len() >= per_item * state_len);
                // SAFETY: `check_call` verified every buffer against `shape`; the generated
                // code reads and writes only within those tensors for b < B, q0 < Sq, keys
                // 0..Sk (its key range, from the start of the tile holding k_lo) and the heads
                // of groups g0..g0 + per_item < groups; within the call's packed K/V when set
                // (`pack_call` filled `plan.packed_lens`); within `scratch` (the plan's size for
                // per_item groups) and per_item state slots of state_len floats, state_len apart
                // (asserted above). Addresses past a tensor are only ever prefetched.
                unsafe {
                    (compiled.item)(
                        args.ptr(),
                        b,
                        g0,
                        per_item,
                        q0,
                        k_lo,
                        k_hi,
                        scratch.as_mut_ptr(),
                        states.as_mut_ptr(),
                        state_len,
                    )
                };
            };
            let finish = |states: &mut [f32], scratch: &mut [f32]| {
                assert!(states.len() >= splits * per_item * state_len);
                for i in 0..per_item {
                    // SAFETY: as above; group i's `splits` slots start at slot i and lie
                    // per_item slots apart, inside `states` (asserted above).
                    unsafe {
                        (compiled.finish)(
                            args.ptr(),
                            b,
                            g0 + i,
                            q0,
                            splits,
                            states.as_mut_ptr().add(i * state_len),
                            per_item * state_len,
                            scratch.as_mut_ptr(),
                        )
                    };
                }
            };
            let states_len = splits * per_item * state_len;
            if splits == 1 {
                with_workspace(scratch_len + states_len, |work| {
                    let (scratch, states) = work.split_at_mut(scratch_len);
                    item(0, shape.seq_k, scratch, states);
                    finish(states, scratch);
                });
                return;
            }
            with_kept(&SPLIT_STATES, states_len, |states| {
                states.par_chunks_mut(per_item * state_len).enumerate().for_each(|(split, run)| {
                    let k_lo = split * schedule.keys_per_split;
                    let k_hi = (k_lo + schedule.keys_per_split).min(shape.seq_k);
                    with_workspace(scratch_len, |scratch| item(k_lo, k_hi, scratch, run));
                });
                with_workspace(scratch_len, |scratch| finish(states, scratch));
            });
        };
        if let Some(prologue) = compiled.prologue {
            // Every q' row is written before any item reads it: the items start after this
            // parallel loop returns.
            self.for_each_head(prologue, &args);
        }
        if tasks == 1 && splits == 1 {
            // One work item (a short decode call): run it here rather than wake a pool thread
            // and wait for it.
            run_task(0);
        } else {
            self.in_pool(|| (0..tasks).into_par_iter().for_each(run_task));
        }
        if let Some(epilogue) = compiled.epilogue {
            self.for_each_head(epilogue, &args);
        }
    }

    /// Runs a per-head program (absorbed MLA's prologue or epilogue) for every query head, in
    /// parallel.
    fn for_each_head(&self, program: HeadFn, args: &SharedArgs) {
        let heads = self.compiled.plan.spec.q_heads;
        self.in_pool(|| {
            (0..heads).into_par_iter().for_each(|head| {
                // SAFETY: `check_call` verified q, w_uk, w_uv and out against the call's shape,
                // and `run` made latent_q and latent_out `plan.latent_len` floats each. Head
                // h's program reads q's, latent_out's and the weights' slices of head h and
                // writes only head h's slice of latent_q (prologue) or out (epilogue), for
                // every (batch, query) row: the heads running in parallel write disjoint
                // elements. The epilogue runs after every finish has written latent_out.
                unsafe { program(args.ptr(), head) }
            })
        });
    }
}

/// Packs grouped K and V once for a call (layouts in [`KernelPlan::packed_lens`]), one
/// (batch, KV head, key tile) per task, with the same copy routine items use.
fn pack_call(
    plan: &KernelPlan,
    shape: Shape,
    k: &[f32],
    v: &[f32],
    k_packed: &mut [f32],
    v_packed: &mut [f32],
) {
    let (kv, d, dv, k_tile) =
        (plan.spec.kv_heads(), plan.spec.head_dim(), plan.spec.v_head_dim, plan.k_tile);
    let tiles = shape.seq_k.div_ceil(k_tile);
    let value_tile = plan.packed_value_tile();
    // Each task writes its own tile: K rows j0..j0 + n of its (batch, head), and its V tile.
    let k_chunks = k_packed.par_chunks_mut(k_tile * d);
    let v_chunks = v_packed.par_chunks_mut(value_tile);
    k_chunks.zip(v_chunks).enumerate().for_each(|(task, (k_dst, v_dst))| {
        let (head, tile) = (task / tiles, task % tiles);
        let (b, g) = (head / kv, head % kv);
        let j0 = tile * k_tile;
        let n = k_tile.min(shape.seq_k - j0);
        let k_src = &k[((b * shape.seq_k + j0) * kv + g) * d..];
        let v_src = &v[((b * shape.seq_k + j0) * kv + g) * dv..];
        // Rows j0..j0 + n of head g, `kv` heads apart.
        assert!(k_src.len() >= (n - 1) * kv * d + d && v_src.len() >= (n - 1) * kv * dv + dv);
        assert!(k_dst.len() >= n * d && v_dst.len() >= value_tile);
        // SAFETY: the asserts above: n source rows of d (dv) floats, kv·d (kv·dv) apart, and
        // destinations of n·d floats (row-major) and one panel tile (k_tile rows of dv floats in
        // PANEL-column panels).
        unsafe {
            simd::pack_rows(n, d, k_src.as_ptr(), kv * d, k_dst.as_mut_ptr(), d, PANEL);
            simd::pack_rows(
                n,
                dv,
                v_src.as_ptr(),
                kv * dv,
                v_dst.as_mut_ptr(),
                PANEL,
                PANEL * k_tile,
            );
        }
    });
}
