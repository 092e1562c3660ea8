//! attngen's compiler: it turns a declarative attention spec into kernels.
//!
//! Data flows one way: a spec ([`AttentionSpec`], written with builders, TOML or macro
//! arguments) is checked by [`validate()`]; later stages plan and lower it. [`cost`] counts the
//! FLOPs and bytes every report uses.
// Every public function that returns a `Result` says, under `# Errors`, when it fails.
#![warn(clippy::missing_errors_doc)]

pub mod abi;
#[cfg(feature = "jit")]
pub mod clif;
pub mod cost;
pub mod ir;
pub mod plan;
pub mod rust;
pub mod spec;
pub mod spec_file;
pub mod validate;

pub use ir::KernelIr;
pub use plan::{Form, KernelPlan, Schedule, Target};
pub use spec::{
    AttentionSpec, Dtype, GroupMap, KvLayout, LatentCache, LatentKv, Mask, MlaForm, Variant,
};
pub use spec_file::{LatentFields, SpecFields, SpecFileError, TomlError, TomlProblem};
pub use validate::{SpecError, validate};
