//! attngen: attention kernels compiled from a declarative spec.
//!
//! Describe a layer with [`AttentionSpec`] — MHA, MQA, GQA with any group map, or DeepSeek-style
//! MLA — and get a [`Kernel`] for it. Every kernel checks its buffers before it touches them and
//! agrees with the [`Reference`] interpreter to semantics.md §4's tolerance.
//!
//! ```
//! use attngen::{AttentionSpec, Inputs, Kernel, Mask, Reference, Shape};
//!
//! let spec = AttentionSpec::gqa(4, 2, 8).mask(Mask::Causal);
//! let kernel = Reference::new(&spec)?;
//! let shape = Shape::new(1, 3, 3);
//! let q = vec![0.5; 3 * 4 * 8];
//! let (k, v) = (vec![0.25; 3 * 2 * 8], vec![1.0; 3 * 2 * 8]);
//! let mut out = vec![0.0; 3 * 4 * 8];
//! kernel.run(shape, &Inputs::grouped(&q, &k, &v), &mut out, None)?;
//! assert!(out.iter().all(|&o| (o - 1.0).abs() < 1e-6));
//! # Ok::<(), attngen::Error>(())
//! ```
// Every public function that returns a `Result` says, under `# Errors`, when it fails.
#![warn(clippy::missing_errors_doc)]

// The README's example is compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctest;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
mod aligned;
pub mod cpus;
mod error;
mod exec;
#[cfg(feature = "harness")]
pub mod harness;
#[cfg(feature = "jit")]
mod jit;
mod kernel;
mod macro_kernel;
mod reference;
mod shape;
mod simd;
mod workload;

pub use aligned::{AlignedBuffer, transparent_huge_pages};
pub use attngen_codegen::{
    AttentionSpec, Dtype, Form, GroupMap, KvLayout, LatentCache, LatentKv, Mask, MlaForm,
    SpecError, SpecFileError, Variant, cost, validate,
};
pub use attngen_macros::{kernel, spec, spec_tests};
pub use error::Error;
#[cfg(feature = "jit")]
pub use jit::{Jit, JitKernel, JitOptions, Listing};
pub use kernel::Kernel;
pub use macro_kernel::MacroKernel;
pub use reference::Reference;
pub use shape::{InputTensors, Inputs, Shape, Tensor, check_call};
pub use simd::Isa;
pub use workload::{Workload, last_level_cache_bytes};
