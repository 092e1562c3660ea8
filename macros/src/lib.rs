//! attngen's procedural macros. Thin by design: parse the arguments (`args`), hand them to
//! `attngen-codegen` — the same structural rules and `validate` that TOML files and the JIT
//! use, and the same plan, IR and emitter (`codegen::rust`) for kernels — and turn each error
//! into a `compile_error!` at the argument it is about.

mod args;

use proc_macro::TokenStream;
use quote::quote;

/// A compile-time-checked [`AttentionSpec`](https://docs.rs/attngen): the keys of a spec file
/// as `key = value` arguments, with `latent = { rank = .., rope_dim = .., nope_dim = .. }` and
/// `mask = { sliding_window = W }` as braces. An invalid spec is a compile error with the same
/// message `attngen validate` prints, pointing at the offending argument.
#[proc_macro]
pub fn spec(input: TokenStream) -> TokenStream {
    let parsed = syn::parse_macro_input!(input as args::SpecArgs);
    match parsed.spec() {
        Ok(spec) => attngen_codegen::rust::spec_tokens(&spec).into(),
        Err(errors) => errors.into(),
    }
}

/// Compiles a kernel for a spec into the crate: on a unit struct, with the arguments of
/// [`spec!`] or `spec = "path.toml"` (relative to the crate's `Cargo.toml`; editing the file
/// rebuilds the crate). The struct implements `attngen::Kernel`; its functions are generated
/// from the same plan and IR as the JIT's, once per ISA, and the widest the CPU has is picked
/// at first use.
#[proc_macro_attribute]
pub fn kernel(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = syn::parse_macro_input!(item as syn::DeriveInput);
    let unit = matches!(&item.data, syn::Data::Struct(s) if matches!(s.fields, syn::Fields::Unit));
    if !unit || !item.generics.params.is_empty() {
        let message =
            "#[attngen::kernel] goes on a unit struct without generics: `pub struct Name;`";
        return syn::Error::new_spanned(&item, message).to_compile_error().into();
    }
    let args = syn::parse_macro_input!(args as args::KernelArgs);
    let (spec, tracked) = match args.spec() {
        Ok(found) => found,
        Err(errors) => return errors.into(),
    };
    let kernel = attngen_codegen::rust::kernel_tokens(&item.ident, &spec, tracked.as_deref());
    quote!(#item #kernel).into()
}

/// `attngen::spec_tests!("dir")`: for every `.toml` spec file in `dir` (relative to the crate's
/// `Cargo.toml`), a module named after the file holding its `#[attngen::kernel]` and two
/// `#[test]`s that property-test that kernel and the JIT's against the reference interpreter
/// on every ISA the CPU has. Needs `attngen` with its `harness` feature (a dev-dependency).
/// Editing a spec file re-runs the expansion; adding one needs a rebuild (`touch` the file
/// that calls the macro).
#[proc_macro]
pub fn spec_tests(input: TokenStream) -> TokenStream {
    let dir = syn::parse_macro_input!(input as syn::LitStr);
    match args::spec_files(&dir) {
        Ok(files) => attngen_codegen::rust::spec_tests_tokens(&files).into(),
        Err(error) => error.to_compile_error().into(),
    }
}
