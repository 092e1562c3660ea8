//! [`MacroKernel`]: a kernel `#[attngen::kernel]` compiled into the calling crate — its spec,
//! its plan and its functions for the ISA chosen at first use — run by the executor every
//! backend shares.

use std::sync::Arc;

use attngen_codegen::{AttentionSpec, KernelPlan};

use crate::exec::{EntryPoints, Executor};
use crate::{Error, Inputs, Isa, Kernel, Shape};

/// A kernel the attribute macro generated: `Name::compiled()` of a struct declared with
/// `#[attngen::kernel(...)]`, or `Name::with_isa(isa)` to force one ISA.
///
/// ```
/// use attngen::{Inputs, Isa, Kernel, Shape};
///
/// /// Llama-3-8B's attention, compiled with the crate.
/// #[attngen::kernel(q_heads = 32, kv_heads = 8, head_dim = 128, mask = "causal")]
/// pub struct Llama3;
///
/// let shape = Shape::new(1, 2, 2);
/// let (q, k, v) = (vec![0.1; 2 * 32 * 128], vec![0.2; 2 * 8 * 128], vec![1.0; 2 * 8 * 128]);
/// let mut out = vec![0.0; 2 * 32 * 128];
/// Llama3.run(shape, &Inputs::grouped(&q, &k, &v), &mut out, None)?;
/// assert!(out.iter().all(|&o| (o - 1.0).abs() < 1e-6));
/// assert_eq!(Llama3::compiled().isa(), Isa::detect());
/// # Ok::<(), attngen::Error>(())
/// ```
pub struct MacroKernel {
    spec: AttentionSpec,
    plan: KernelPlan,
    /// The ISA and its functions, or why none can run (an ISA this CPU lacks, or a plan that
    /// differs from the one the functions were generated for).
    chosen: Result<(Isa, EntryPoints), Error>,
    /// The kernel's own thread pool, or `None` for rayon's global one.
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl MacroKernel {
    /// Plans `spec` as the macro did and picks the functions of `isa` (else `ATTNGEN_ISA`'s,
    /// else the widest this CPU has) from `versions`. `generated_plan` is the plan the
    /// functions were generated from, as `{:?}` printed it: the functions bake in its sizes,
    /// so a different plan (attngen-macros built from another attngen-codegen) must not run.
    #[doc(hidden)]
    pub fn new(
        spec: AttentionSpec,
        generated_plan: &str,
        versions: Vec<(Isa, EntryPoints)>,
        isa: Option<Isa>,
    ) -> MacroKernel {
        let plan = KernelPlan::new(&spec);
        let chosen = if format!("{plan:?}") != generated_plan {
            Err(Error::Compile(
                "the kernel's functions were generated from a different plan: attngen-macros \
                 and attngen come from different versions of attngen-codegen"
                    .to_owned(),
            ))
        } else {
            choose(isa, versions)
        };
        MacroKernel { spec, plan, chosen, pool: None }
    }

    /// The same kernel on a pool of its own with `threads` threads, instead of rayon's
    /// global pool.
    pub fn threads(self, threads: usize) -> Result<MacroKernel, Error> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| Error::Threads { threads, reason: e.to_string() })?;
        Ok(MacroKernel { pool: Some(Arc::new(pool)), ..self })
    }

    /// The ISA whose functions run (the portable ones if none could be chosen).
    pub fn isa(&self) -> Isa {
        self.chosen.as_ref().map_or(Isa::Portable, |(isa, _)| *isa)
    }

    /// The plan the functions were generated from.
    pub fn plan(&self) -> &KernelPlan {
        &self.plan
    }
}

/// The functions of the ISA asked for, else `ATTNGEN_ISA`'s, else the widest this CPU has.
fn choose(
    isa: Option<Isa>,
    versions: Vec<(Isa, EntryPoints)>,
) -> Result<(Isa, EntryPoints), Error> {
    let isa = match isa {
        Some(isa) => isa.checked()?,
        None => Isa::from_env()?.unwrap_or_else(Isa::detect),
    };
    let entries = versions.into_iter().find(|(version, _)| *version == isa).map(|(_, e)| e);
    entries.map(|entries| (isa, entries)).ok_or_else(|| Error::Isa {
        requested: isa.name().to_owned(),
        reason: "the kernel was not compiled for it on this target".to_owned(),
    })
}

impl Kernel for MacroKernel {
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
        let (_, entries) = self.chosen.as_ref().map_err(Clone::clone)?;
        let pool = self.pool.as_deref();
        Executor { plan: &self.plan, entries, pool }.run(shape, inputs, out, lse)
    }
}
