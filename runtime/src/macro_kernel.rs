//! [`MacroKernel`]: a kernel `#[attngen::kernel]` compiled into the calling crate — its spec,
//! its plan and its functions for the ISA chosen at first use — run by the executor every
//! backend shares.

use std::sync::Arc;

use attngen_codegen::{AttentionSpec, KernelPlan};

use crate::exec::{CompiledForm, EntryPoints, pick_form, run_call};
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
    /// The first form's plan (see [`MacroKernel::plan`]).
    plan: KernelPlan,
    /// The ISA and its functions, one per form the spec compiles, or why none can run (an ISA
    /// this CPU lacks, or plans that differ from the ones the functions were generated for).
    chosen: Result<(Isa, Vec<CompiledForm>), Error>,
    /// The kernel's own thread pool, or `None` for rayon's global one.
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl MacroKernel {
    /// Picks the ISA `isa` names (else `ATTNGEN_ISA`'s, else the widest this CPU has), plans
    /// `spec` for it as the macro did, and takes that ISA's functions from `versions`, each
    /// holding one set of functions per form ([`KernelPlan::all`]). `generated_plans` holds,
    /// per ISA name, the plans the functions were generated from, as `{:?}` printed them: the
    /// functions bake in their sizes, so a different plan (attngen-macros built from another
    /// attngen-codegen) must not run.
    #[doc(hidden)]
    pub fn new(
        spec: AttentionSpec,
        generated_plans: &[(&str, &[&str])],
        versions: Vec<(Isa, Vec<EntryPoints>)>,
        isa: Option<Isa>,
    ) -> MacroKernel {
        let requested = match isa {
            Some(isa) => isa.checked(),
            None => Isa::from_env().map(|isa| isa.unwrap_or_else(Isa::detect)),
        };
        let target = requested.as_ref().map_or(Isa::Portable, |isa| *isa).target();
        let plans = KernelPlan::all(&spec, target);
        let chosen = requested.and_then(|isa| {
            let debug: Vec<String> = plans.iter().map(|plan| format!("{plan:?}")).collect();
            let generated = generated_plans.iter().find(|(name, _)| *name == isa.name());
            if generated.is_none_or(|(_, generated)| debug != *generated) {
                return Err(Error::Compile(
                    "the kernel's functions were generated from a different plan: \
                     attngen-macros and attngen come from different versions of attngen-codegen"
                        .to_owned(),
                ));
            }
            let entries = versions.into_iter().find(|(version, _)| *version == isa);
            let (_, entries) = entries.ok_or_else(|| Error::Isa {
                requested: isa.name().to_owned(),
                reason: "the kernel was not compiled for it on this target".to_owned(),
            })?;
            let forms = plans.iter().cloned().zip(entries);
            Ok((isa, forms.map(|(plan, entries)| CompiledForm { plan, entries }).collect()))
        });
        MacroKernel { spec, plan: plans[0].clone(), chosen, pool: None }
    }

    /// The same kernel on a pool of its own with `threads` threads, instead of rayon's
    /// global pool; each worker is pinned to a CPU of its own where [`crate::cpus`] can (on
    /// Linux, a CPU each) and `ATTNGEN_PIN` is not `0`.
    ///
    /// # Errors
    /// [`Error::Threads`] for zero threads or when the pool cannot start.
    pub fn threads(self, threads: usize) -> Result<MacroKernel, Error> {
        Ok(MacroKernel { pool: Some(crate::exec::own_pool(threads)?), ..self })
    }

    /// The ISA whose functions run (the portable ones if none could be chosen).
    pub fn isa(&self) -> Isa {
        self.chosen.as_ref().map_or(Isa::Portable, |(isa, _)| *isa)
    }

    /// The form a call of `shape` runs in: the only one compiled, or the cost model's choice
    /// (the first form if no functions could be chosen).
    pub fn form_for(&self, shape: Shape) -> attngen_codegen::Form {
        match &self.chosen {
            Ok((isa, forms)) => pick_form(forms, *isa, self.pool.as_deref(), shape).plan.form,
            Err(_) => self.plan.form,
        }
    }

    /// The plan the chosen ISA's functions were generated from (for a latent spec that leaves
    /// the form to each call, the absorbed one; [`KernelPlan::all`] lists both).
    pub fn plan(&self) -> &KernelPlan {
        &self.plan
    }
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
        let (isa, forms) = self.chosen.as_ref().map_err(Clone::clone)?;
        run_call(forms, *isa, self.pool.as_deref(), shape, inputs, out, lse)
    }
}
