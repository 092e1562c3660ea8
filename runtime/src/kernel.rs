//! The [`Kernel`] trait every backend implements.

use attngen_codegen::AttentionSpec;

use crate::{Error, Inputs, Shape};

/// A compiled (or interpreted) attention kernel for one spec.
///
/// `run` checks every buffer against `shape` with [`crate::check_call`] before it reads or
/// writes anything: on `Err`, `out` and `lse` are untouched.
pub trait Kernel: Send + Sync {
    /// The spec this kernel computes.
    fn spec(&self) -> &AttentionSpec;

    /// Computes attention for `inputs` of the given `shape` into `out` ([B, Sq, H, Dv]) and, if
    /// given, the log-sum-exp of each row into `lse` ([B, Sq, H]).
    ///
    /// # Errors
    /// [`Error::InputsKind`] when `inputs` are of the other kind than the spec's (grouped or
    /// latent), [`Error::Length`] when a buffer's length is not its tensor's element count at
    /// `shape`, [`Error::NotTaken`] when a combined latent cache's call passes a `k_rope`,
    /// [`Error::TooLarge`] when a count overflows `usize` or a buffer of the call's own
    /// (absorbed MLA's `q'` and `o'`, a prefill's packed K and V, expanded MLA's copy of the
    /// weights) cannot be allocated, and [`Error::KvLen`] when `kv_lens` has other than B
    /// entries or one above Sk. A macro
    /// kernel whose ISA could not be chosen returns from every call the [`Error::Isa`] or
    /// [`Error::Compile`] that choice met (an `ATTNGEN_ISA` this CPU lacks; attngen-macros and
    /// attngen of different versions). Nothing is written then.
    fn run(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), Error>;
}

/// A boxed kernel is a kernel, so collections of different backends (`Box<dyn Kernel>`) go
/// wherever one kernel type does.
impl<K: Kernel + ?Sized> Kernel for Box<K> {
    fn spec(&self) -> &AttentionSpec {
        (**self).spec()
    }

    fn run(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), Error> {
        (**self).run(shape, inputs, out, lse)
    }
}
