//! [`Jit`]: compiles specs to native kernels at run time with Cranelift.
//!
//! Pipeline: validate → plan → lower to the tile IR → emit CLIF → define in a long-lived
//! `JITModule` → finalize → function pointers. The `Jit` owns the module, one codegen context
//! reused across compiles, and a cache keyed by the spec, so compiling an equal spec again
//! returns the kernel already built. Calls run through the executor every backend shares
//! (`exec`): a compiled kernel is its plan and entry points.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attngen_codegen::abi::{Callee, ExpandFn, FinishFn, HeadFn, ItemFn};
use attngen_codegen::{AttentionSpec, KernelIr, KernelPlan, clif, ir, validate};
use cranelift_codegen::Context;
use cranelift_codegen::settings::Configurable;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};

use crate::exec::{CompiledForm, EntryPoints, call_costs, pick_form, run_call};
use crate::{Error, Inputs, Isa, Kernel, Shape, simd};

mod machine_code;

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

/// One compiled spec: a plan and entry points per form it compiles.
struct Compiled {
    forms: Vec<CompiledForm>,
    compile_time: Duration,
}

/// What `attngen dump` shows of a compiled spec.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The plan, as text.
    pub plan: String,
    /// The tile IR, as text.
    pub ir: String,
    /// The Cranelift IR of the kernel's functions: `item` and `finish`, for absorbed MLA
    /// `prologue` and `epilogue`, for expanded MLA `expand` (a latent spec whose calls choose
    /// their form lists both forms' functions).
    pub clif: String,
    /// Their machine code: disassembled by capstone with the `disasm` feature (the `attngen`
    /// command's), each function's constants one line after its code; else Cranelift's own
    /// listing of the instructions it emitted.
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

    /// Run kernels on a pool of their own with this many threads (at least 1: building the
    /// JIT refuses 0), instead of rayon's global pool; each worker is pinned to a CPU of its
    /// own where [`crate::cpus`] can (on Linux, a CPU each) and `ATTNGEN_PIN` is not `0`.
    pub fn threads(self, threads: usize) -> JitOptions {
        JitOptions { threads: Some(threads), ..self }
    }
}

impl Jit {
    /// A JIT for this CPU whose kernels use every core (rayon's global pool), with the widest
    /// ISA the CPU has or the one `ATTNGEN_ISA` names.
    ///
    /// # Errors
    /// As [`Jit::with_options`].
    pub fn new() -> Result<Jit, Error> {
        Self::with_options(JitOptions::default())
    }

    /// A JIT whose kernels run on their own pool of `threads` threads.
    ///
    /// # Errors
    /// As [`Jit::with_options`].
    pub fn with_threads(threads: usize) -> Result<Jit, Error> {
        Self::with_options(JitOptions::default().threads(threads))
    }

    /// A JIT built as `options` say. The ISA is the one they name, else `ATTNGEN_ISA`'s, else
    /// the widest this CPU has.
    ///
    /// # Errors
    /// [`Error::Isa`] when the ISA named (by `options` or `ATTNGEN_ISA`) is not one or this CPU
    /// lacks it, [`Error::Threads`] for zero threads or when the thread pool cannot start, and
    /// [`Error::Compile`] when Cranelift has no backend for this CPU.
    pub fn with_options(options: JitOptions) -> Result<Jit, Error> {
        let isa = match options.isa {
            Some(isa) => isa.checked()?,
            None => Isa::from_env()?.unwrap_or_else(Isa::detect),
        };
        let pool = options.threads.map(crate::exec::own_pool).transpose()?;
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
        builder.symbol(Callee::ColumnMax.symbol(), routines.column_max as *const u8);
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
    ///
    /// # Errors
    /// [`Error::Spec`] with the first rule `spec` breaks, and [`Error::Compile`] if Cranelift
    /// rejects the generated function (a bug in attngen, never in the spec).
    pub fn compile(&self, spec: &AttentionSpec) -> Result<JitKernel, Error> {
        validate(spec)?;
        let key = cache_key(spec);
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let compiled = match state.cache.get(&key) {
            Some(compiled) => Arc::clone(compiled),
            None => {
                let compiled = Arc::new(state.define(spec, self.isa, None)?);
                state.cache.insert(key, Arc::clone(&compiled));
                compiled
            }
        };
        Ok(JitKernel { spec: spec.clone(), isa: self.isa, compiled, pool: self.pool.clone() })
    }

    /// Compiles `spec` afresh and returns its plan, IR, CLIF and disassembly.
    ///
    /// # Errors
    /// As [`Jit::compile`].
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
        state.define(spec, self.isa, Some(&mut listing))?;
        Ok(listing)
    }
}

impl JitState {
    /// Plans (for `isa`), lowers, emits and defines every function of a spec's kernel, in each
    /// form it compiles.
    fn define(
        &mut self,
        spec: &AttentionSpec,
        isa: Isa,
        mut listing: Option<&mut Listing>,
    ) -> Result<Compiled, Error> {
        let started = Instant::now();
        let mut forms = Vec::new();
        for plan in KernelPlan::all(spec, isa.target()) {
            let entries = self.define_form(&plan, &mut listing)?;
            forms.push(CompiledForm { plan, entries });
        }
        Ok(Compiled { forms, compile_time: started.elapsed() })
    }

    /// Lowers, emits and defines the functions of one form's plan.
    fn define_form(
        &mut self,
        plan: &KernelPlan,
        listing: &mut Option<&mut Listing>,
    ) -> Result<EntryPoints, Error> {
        let program: KernelIr = ir::lower(plan);
        let frontend = self.module.isa().frontend_config();
        let callee_ids = self.callee_ids.map(|id| id.as_u32());
        let kernel = clif::emit(plan, &program, frontend, callee_ids);
        if let Some(listing) = listing.as_deref_mut() {
            let join = |text: &mut String, part: String| {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&part);
            };
            join(&mut listing.plan, plan.to_string());
            join(&mut listing.ir, format!("{} form:\n{program}", plan.form.name()));
        }
        // Each compile defines fresh symbols: the cache, not the module, deduplicates.
        self.compiled += 1;
        let mut define = |role, f| self.define_function(role, f, listing);
        let prologue = kernel.prologue.map(|f| define("prologue", f)).transpose()?;
        let item = define("item", kernel.item)?;
        let finish = define("finish", kernel.finish)?;
        let epilogue = kernel.epilogue.map(|f| define("epilogue", f)).transpose()?;
        let expand = kernel.expand.map(|f| define("expand", f)).transpose()?;
        self.module.finalize_definitions().map_err(compile_error)?;
        let code = |id: FuncId| self.module.get_finalized_function(id);
        let (prologue, item, finish, epilogue, expand) =
            (prologue.map(code), code(item), code(finish), epilogue.map(code), expand.map(code));
        // SAFETY: each function was just defined with the signature derived from its type
        // (`clif::signature::<ItemFn>`, `::<FinishFn>`, `::<HeadFn>`, `::<ExpandFn>`: the
        // types' own parameter kinds, in the platform's C calling convention), and the module
        // never frees their code (Cranelift's system memory provider leaks it on drop to keep
        // such pointers valid).
        let entries = unsafe {
            EntryPoints {
                prologue: prologue.map(|code| std::mem::transmute::<*const u8, HeadFn>(code)),
                item: std::mem::transmute::<*const u8, ItemFn>(item),
                finish: std::mem::transmute::<*const u8, FinishFn>(finish),
                epilogue: epilogue.map(|code| std::mem::transmute::<*const u8, HeadFn>(code)),
                expand: expand.map(|code| std::mem::transmute::<*const u8, ExpandFn>(code)),
            }
        };
        Ok(entries)
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
            let asm = machine_code::disassemble(&self.ctx, self.module.isa());
            listing.asm.push_str(&format!("; {role}\n{asm}\n"));
        }
        Ok(id)
    }
}

/// A Cranelift setting, ISA or module error, as the error `Jit` reports.
fn compile_error(e: impl std::fmt::Display) -> Error {
    Error::Compile(e.to_string())
}

/// Specs that differ only in their name compile to the same kernel.
fn cache_key(spec: &AttentionSpec) -> String {
    AttentionSpec { name: None, ..spec.clone() }.to_toml()
}

/// A kernel compiled by [`Jit::compile`].
#[derive(Clone)]
pub struct JitKernel {
    spec: AttentionSpec,
    isa: Isa,
    compiled: Arc<Compiled>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl JitKernel {
    /// How long planning, lowering and Cranelift took when this kernel was first compiled.
    pub fn compile_time(&self) -> Duration {
        self.compiled.compile_time
    }

    /// The plan the kernel was compiled from (for a latent spec that leaves the form to each
    /// call, the absorbed one; [`JitKernel::plans`] lists every form's).
    pub fn plan(&self) -> &KernelPlan {
        &self.compiled.forms[0].plan
    }

    /// The plan of every form the kernel compiled, one per [`attngen_codegen::Form::compiled`].
    pub fn plans(&self) -> impl Iterator<Item = &KernelPlan> {
        self.compiled.forms.iter().map(|form| &form.plan)
    }

    /// The form a call of `shape` runs in: the only one compiled, or the cost model's choice
    /// ([`attngen_codegen::cost::form_costs`]).
    pub fn form_for(&self, shape: Shape) -> attngen_codegen::Form {
        pick_form(&self.compiled.forms, self.isa, self.pool.as_deref(), shape).plan.form
    }

    /// Both MLA forms' costs for a call of `shape`, at the machine figures the kernel's choice
    /// uses ([`attngen_codegen::cost::Machine::estimate`] for its ISA and threads); `None` for
    /// grouped specs.
    pub fn form_costs(&self, shape: Shape) -> Option<attngen_codegen::cost::FormCosts> {
        call_costs(&self.spec, self.isa, self.pool.as_deref(), shape)
    }

    /// Whether two kernels share one compiled body (an equal spec hit the cache).
    pub fn same_code(&self, other: &JitKernel) -> bool {
        Arc::ptr_eq(&self.compiled, &other.compiled)
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
        let (forms, pool) = (&self.compiled.forms, self.pool.as_deref());
        run_call(forms, self.isa, pool, shape, inputs, out, lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With or without capstone (the `disasm` feature; `cargo test -p attngen` builds without
    /// it), the listing has each function's machine code, down to its return, and no more.
    #[test]
    fn dump_lists_the_machine_code_of_every_function() {
        let jit = Jit::new().unwrap();
        let listing = jit.dump(&AttentionSpec::gqa(4, 2, 32)).unwrap();
        for role in ["; item\n", "; finish\n"] {
            let code = listing.asm.split(role).nth(1).unwrap_or_else(|| panic!("{role:?}"));
            let code = code.split("\n; ").next().unwrap();
            let returns = code.lines().any(|line| matches!(line.trim(), "ret" | "retq"));
            assert!(code.lines().count() > 10 && returns, "{role:?}: {code}");
            // Capstone's listing ends where the code does: the constants after it (the item's
            // loads read some) are one line, not instructions.
            #[cfg(all(feature = "disasm", target_arch = "x86_64"))]
            {
                assert!(
                    code.contains("constants, not code") && !code.contains("addb %al, (%rax)"),
                    "{role:?}: {code}"
                );
                // The cut keeps the whole code: the last instruction before the constants is
                // the function's final jump or return.
                let lines: Vec<&str> = code.lines().collect();
                let at = lines.iter().position(|line| line.contains("constants, not code"));
                let last = at.and_then(|at| at.checked_sub(1)).map(|at| lines[at].trim());
                let mnemonic = last.and_then(|line| line.split_whitespace().next());
                assert!(matches!(mnemonic, Some("jmp" | "retq" | "ret")), "{role:?}: {code}");
            }
        }
    }
}
