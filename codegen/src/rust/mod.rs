//! Emits Rust tokens for the proc macros: the construction of a validated [`AttentionSpec`]
//! (`attngen::spec!`), and a whole kernel (`#[attngen::kernel]`, [`kernel_tokens`]).
//!
//! A kernel is the spec's [`KernelIr`] translated (by the `program` module) into the
//! `extern "C"` functions of [`crate::abi`], once per form the spec compiles
//! ([`KernelPlan::all`]: a latent spec whose calls choose their form has two), planned and
//! stamped once per ISA (its [`Target`], target features and pre-compiled tile routines), plus
//! the impls that hand them to attngen's executor — the one every backend runs through, which
//! picks the ISA at first use and the form per call.

mod program;

use proc_macro2::{Ident, Literal, TokenStream};
use quote::{format_ident, quote};

use crate::ir::{self, KernelIr};
use crate::plan::{HeadMap, KernelPlan, Target};
use crate::spec::{AttentionSpec, GroupMap, KvLayout, LatentCache, Mask, MlaForm};

/// One ISA the generated kernels are compiled for: the module of `attngen::__private` holding
/// its tile routines, the target features its functions enable (the same as those routines'),
/// and the one architecture it exists on, if it is not portable.
#[derive(Clone, Copy, Debug)]
pub struct IsaVersion {
    /// Module name, here and in `attngen::__private`; also the `ATTNGEN_ISA` name.
    pub module: &'static str,
    /// `#[target_feature(enable = ..)]`, if any.
    pub features: Option<&'static str>,
    /// The `target_arch` it is compiled for (`None`: every one).
    pub arch: Option<&'static str>,
    /// The `attngen::Isa` variant.
    pub variant: &'static str,
    /// What the plan takes from the ISA.
    pub target: Target,
}

/// Every ISA a kernel is stamped for, in the order of the runtime's `Isa::ALL`.
pub const ISA_VERSIONS: [IsaVersion; 4] = [
    IsaVersion {
        module: "avx512",
        features: Some("avx512f,avx2,fma"),
        arch: Some("x86_64"),
        variant: "Avx512",
        target: Target::AVX512,
    },
    IsaVersion {
        module: "avx2",
        features: Some("avx2,fma"),
        arch: Some("x86_64"),
        variant: "Avx2Fma",
        target: Target::AVX2,
    },
    IsaVersion {
        module: "neon",
        features: Some("neon"),
        arch: Some("aarch64"),
        variant: "Neon",
        target: Target::NEON,
    },
    IsaVersion {
        module: "portable",
        features: None,
        arch: None,
        variant: "Portable",
        target: Target::PORTABLE,
    },
];

fn target_features(isa: IsaVersion) -> TokenStream {
    match isa.features {
        Some(features) => quote!(#[target_feature(enable = #features)]),
        None => TokenStream::new(),
    }
}

/// What `#[attngen::kernel]` expands to for a validated `spec` on the unit struct `name`
/// (whose declaration the macro keeps): the kernel's functions per ISA in a hidden module, and
/// `impl attngen::Kernel for name`, which runs them through attngen's executor.
pub fn kernel_tokens(
    name: &Ident,
    spec: &AttentionSpec,
    tracked_file: Option<&str>,
) -> TokenStream {
    let module = format_ident!("__attngen_kernel_{}", name.to_string().to_lowercase());
    let spec_expr = spec_tokens(spec);
    let group_heads = group_heads(&KernelPlan::new(spec, Target::PORTABLE));
    let mut versions = TokenStream::new();
    let mut table = TokenStream::new();
    let mut plan_debug = Vec::new();
    for isa in ISA_VERSIONS {
        let plans = KernelPlan::all(spec, isa.target);
        let programs: Vec<KernelIr> = plans.iter().map(ir::lower).collect();
        let debug = plans.iter().map(|plan| format!("{plan:?}"));
        let isa_name = isa.module;
        plan_debug.push(quote!((#isa_name, &[#(#debug),*])));
        let ident = format_ident!("{}", isa.module);
        let mut forms = TokenStream::new();
        let mut entries = Vec::new();
        for (plan, program) in plans.iter().zip(&programs) {
            let form = format_ident!("{}", plan.form.name());
            let fns = program::functions(plan, program, &target_features(isa));
            forms.extend(quote! {
                pub mod #form {
                    use super::super::*;
                    use ::attngen::__private::#ident as routines;
                    #fns
                }
            });
            entries.push(entry_points(&quote!(#ident::#form), program));
        }
        let cfg = isa.arch.map(|arch| quote!(#[cfg(target_arch = #arch)]));
        versions.extend(quote! {
            #cfg
            pub mod #ident {
                #forms
            }
        });
        let variant = format_ident!("{}", isa.variant);
        let entries = quote!(::std::vec![#(#entries),*]);
        versions_table(&mut table, cfg, quote!((::attngen::Isa::#variant, #entries)));
    }
    let track = tracked_file.map(|path| {
        quote!(
            const _: &[u8] = ::core::include_bytes!(#path);
        )
    });
    quote! {
        #[doc(hidden)]
        #[allow(unused, clippy::all, clippy::pedantic, unsafe_op_in_unsafe_fn)]
        mod #module {
            use ::attngen::__private::abi::{CallArgs, PrefetchRows};
            #track
            #group_heads
            #versions

            /// The spec the kernel was compiled from.
            pub fn spec() -> ::attngen::AttentionSpec {
                #spec_expr
            }

            /// Per ISA, the plan of each form its functions were generated from, as `{:?}`
            /// prints it.
            pub const PLANS: &[(&str, &[&str])] = &[#(#plan_debug),*];

            /// The functions of every ISA this target has, one set per form.
            pub fn versions() -> ::std::vec::Vec<(::attngen::Isa, ::std::vec::Vec<::attngen::__private::EntryPoints>)> {
                let mut versions = ::std::vec::Vec::new();
                #table
                versions
            }
        }

        impl #name {
            /// The kernel, compiled once per process at first use for the ISA
            /// `ATTNGEN_ISA` names or else the widest this CPU has.
            pub fn compiled() -> &'static ::attngen::MacroKernel {
                static KERNEL: ::std::sync::OnceLock<::attngen::MacroKernel> = ::std::sync::OnceLock::new();
                KERNEL.get_or_init(|| {
                    ::attngen::MacroKernel::new(#module::spec(), #module::PLANS, #module::versions(), None)
                })
            }

            /// The kernel's functions for `isa` (for comparisons and tests): running it fails
            /// with `attngen::Error::Isa` if this CPU lacks `isa`.
            pub fn with_isa(isa: ::attngen::Isa) -> ::attngen::MacroKernel {
                ::attngen::MacroKernel::new(#module::spec(), #module::PLANS, #module::versions(), Some(isa))
            }
        }

        impl ::attngen::Kernel for #name {
            fn spec(&self) -> &::attngen::AttentionSpec {
                ::attngen::Kernel::spec(Self::compiled())
            }

            fn run(
                &self,
                shape: ::attngen::Shape,
                inputs: &::attngen::Inputs<'_>,
                out: &mut [f32],
                lse: ::core::option::Option<&mut [f32]>,
            ) -> ::core::result::Result<(), ::attngen::Error> {
                ::attngen::Kernel::run(Self::compiled(), shape, inputs, out, lse)
            }
        }
    }
}

/// Appends `versions.push(entry)` under `cfg` to the body of `versions()`.
fn versions_table(table: &mut TokenStream, cfg: Option<TokenStream>, entry: TokenStream) {
    table.extend(quote! {
        #cfg
        versions.push(#entry);
    });
}

/// `EntryPoints` of the functions in module `path` (an ISA's module of one form).
fn entry_points(path: &TokenStream, program: &KernelIr) -> TokenStream {
    let optional = |ops: &[ir::Op], name: &str, ty: &str| {
        let (name, ty) = (format_ident!("{name}"), format_ident!("{ty}"));
        match ops.is_empty() {
            false => {
                quote!(::core::option::Option::Some(#path::#name as ::attngen::__private::abi::#ty))
            }
            true => quote!(::core::option::Option::None),
        }
    };
    let prologue = optional(&program.prologue, "prologue", "HeadFn");
    let epilogue = optional(&program.epilogue, "epilogue", "HeadFn");
    let expand = optional(&program.expand, "expand", "ExpandFn");
    quote! {
        ::attngen::__private::EntryPoints {
            prologue: #prologue,
            item: #path::item,
            finish: #path::finish,
            epilogue: #epilogue,
            expand: #expand,
        }
    }
}

/// Explicit group maps: `GROUP_HEADS[g]` is group g's size, then its heads.
fn group_heads(plan: &KernelPlan) -> TokenStream {
    if plan.head_map != HeadMap::Table {
        return TokenStream::new();
    }
    let width = plan.groups.iter().map(Vec::len).max().unwrap_or(1) + 1;
    let rows = plan.groups.iter().map(|heads| {
        let mut row = vec![heads.len() as u32];
        row.extend(heads.iter().map(|&h| h as u32));
        row.resize(width, 0);
        let row = row.into_iter().map(Literal::u32_unsuffixed);
        quote!([#(#row),*])
    });
    let (groups, width) = (plan.groups.len(), width);
    quote!(const GROUP_HEADS: [[u32; #width]; #groups] = [#(#rows),*];)
}

/// An expression that builds `spec` through `::attngen`'s public fields.
pub fn spec_tokens(spec: &AttentionSpec) -> TokenStream {
    let name = match &spec.name {
        Some(name) => quote!(::core::option::Option::Some(::std::string::String::from(#name))),
        None => quote!(::core::option::Option::None),
    };
    let q_heads = spec.q_heads;
    let kv = match &spec.kv {
        KvLayout::Grouped { kv_heads, head_dim, group_map } => {
            let map = match group_map {
                GroupMap::Contiguous => quote!(::attngen::GroupMap::Contiguous),
                GroupMap::Interleaved => quote!(::attngen::GroupMap::Interleaved),
                GroupMap::Explicit(entries) => {
                    quote!(::attngen::GroupMap::Explicit(::std::vec![#(#entries),*]))
                }
            };
            quote!(::attngen::KvLayout::Grouped { kv_heads: #kv_heads, head_dim: #head_dim, group_map: #map })
        }
        KvLayout::Latent(l) => {
            let (rank, rope_dim, nope_dim) = (l.rank, l.rope_dim, l.nope_dim);
            let form = match l.form {
                MlaForm::Auto => quote!(::attngen::MlaForm::Auto),
                MlaForm::Absorbed => quote!(::attngen::MlaForm::Absorbed),
                MlaForm::Expanded => quote!(::attngen::MlaForm::Expanded),
            };
            let cache = match l.cache {
                LatentCache::Separate => quote!(::attngen::LatentCache::Separate),
                LatentCache::Combined => quote!(::attngen::LatentCache::Combined),
            };
            quote!(::attngen::KvLayout::Latent(::attngen::LatentKv {
                rank: #rank, rope_dim: #rope_dim, nope_dim: #nope_dim, form: #form, cache: #cache
            }))
        }
    };
    let v_head_dim = spec.v_head_dim;
    let mask = match spec.mask {
        Mask::None => quote!(::attngen::Mask::None),
        Mask::Causal => quote!(::attngen::Mask::Causal),
        Mask::SlidingWindow(w) => quote!(::attngen::Mask::SlidingWindow(#w)),
    };
    let float = |x: Option<f32>| match x {
        Some(x) => quote!(::core::option::Option::Some(#x)),
        None => quote!(::core::option::Option::None),
    };
    let (scale, softcap) = (float(spec.scale), float(spec.softcap));
    quote! {
        ::attngen::AttentionSpec {
            name: #name,
            q_heads: #q_heads,
            kv: #kv,
            v_head_dim: #v_head_dim,
            mask: #mask,
            scale: #scale,
            softcap: #softcap,
            dtype: ::attngen::Dtype::F32,
        }
    }
}

/// What `attngen::spec_tests!` expands to for the spec files `files` (`(module name, absolute
/// path)`, each already validated): per file a module with the file's macro kernel and two
/// `#[test]`s that property-check it and the JIT's kernel for the same spec against the
/// reference, on every ISA this CPU has, with `attngen::harness`'s strategies.
pub fn spec_tests_tokens(files: &[(String, String)]) -> TokenStream {
    files
        .iter()
        .map(|(module, path)| {
            let module = format_ident!("{module}");
            quote! {
                mod #module {
                    #[::attngen::kernel(spec = #path)]
                    struct SpecKernel;

                    fn cases() -> u32 {
                        ::std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32)
                    }

                    #[test]
                    fn macro_kernel_matches_the_reference() {
                        let kernels: ::std::vec::Vec<_> = ::attngen::harness::tested_isas()
                            .into_iter()
                            .map(|isa| (::std::format!("macro kernel, {isa}"), SpecKernel::with_isa(isa)))
                            .collect();
                        ::attngen::harness::assert_matches_reference(&kernels, cases());
                    }

                    #[test]
                    fn jit_kernel_matches_the_reference() {
                        let spec = ::attngen::Kernel::spec(&SpecKernel);
                        let kernels: ::std::vec::Vec<_> = ::attngen::harness::tested_isas()
                            .into_iter()
                            .map(|isa| {
                                let options = ::attngen::JitOptions::default().isa(isa);
                                let jit = ::attngen::Jit::with_options(options).expect("a JIT for this CPU");
                                (::std::format!("JIT kernel, {isa}"), jit.compile(spec).expect("the spec is valid"))
                            })
                            .collect();
                        ::attngen::harness::assert_matches_reference(&kernels, cases());
                    }
                }
            }
        })
        .collect()
}
