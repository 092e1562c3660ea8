//! [`Error`]: everything that can go wrong when building or running a kernel.

use attngen_codegen::SpecError;

/// An error from building or running a kernel. Running never panics and never writes `out`
/// when it returns one of these.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// The spec breaks a rule of the contract.
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    /// Grouped inputs for a latent spec, or the other way round.
    #[error(
        "the spec has {expected} KV but the inputs are {got}: build them with Inputs::{expected}(..)"
    )]
    InputsKind {
        /// `grouped` or `latent`: what the spec needs.
        expected: &'static str,
        /// What was passed.
        got: &'static str,
    },
    /// A buffer whose length does not match its tensor's shape.
    #[error(
        "tensor `{tensor}`: expected shape {shape:?} = {expected} elements, got {got} elements"
    )]
    Length {
        /// The tensor's name, as in semantics.md §2.
        tensor: &'static str,
        /// Its expected shape.
        shape: Vec<usize>,
        /// Its expected element count.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// A tensor the spec does not take, passed non-empty.
    #[error("tensor `{tensor}` must be empty, got {got} elements: {why}")]
    NotTaken {
        /// The tensor's name.
        tensor: &'static str,
        /// Why the spec does not take it, and what to do instead.
        why: &'static str,
        /// The buffer's length.
        got: usize,
    },
    /// A sequence's key length beyond the rows its cache tensors hold.
    #[error(
        "kv_lens[{sequence}] is {len}, more than the {seq_k} rows per sequence (Sk) of the cache"
    )]
    KvLen {
        /// The sequence, b.
        sequence: usize,
        /// Its key length, `kv_lens[b]`.
        len: usize,
        /// Sk: the cache tensors' rows per sequence.
        seq_k: usize,
    },
    /// Code generation failed (the JIT), or a macro kernel's generated code does not match
    /// this attngen's plan: a bug or a version mix-up, reported rather than hidden.
    #[error("the kernel cannot be built: {0}")]
    Compile(String),
    /// The JIT's own thread pool could not be started.
    #[error("cannot start {threads} threads: {reason}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// What the system said.
        reason: String,
    },
    /// An ISA that is not one, or that this CPU lacks (`ATTNGEN_ISA` or [`crate::JitOptions`]).
    #[error("ISA `{requested}`: {reason}")]
    Isa {
        /// The ISA asked for.
        requested: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The property check could not run to a verdict.
    #[error("property check: {0}")]
    Check(String),
    /// A shape whose element count does not fit in `usize`, or a buffer of that shape that
    /// cannot be allocated.
    #[error("tensor `{tensor}`: shape {shape:?} has more elements than fit in memory")]
    TooLarge {
        /// The tensor's name.
        tensor: &'static str,
        /// The shape asked for.
        shape: Vec<usize>,
    },
}
