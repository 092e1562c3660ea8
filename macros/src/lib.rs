//! attngen's procedural macros. Thin by design: parse the arguments (`args`), hand them to
//! `attngen-codegen` — the same structural rules and `validate` that TOML files and the JIT
//! use — and turn each error into a `compile_error!` at the argument it is about.

mod args;

use proc_macro::TokenStream;

/// A compile-time-checked [`AttentionSpec`](https://docs.rs/attngen): the keys of a spec file
/// as `key = value` arguments, with `latent = { rank = .., rope_dim = .., nope_dim = .. }` and
/// `mask = { sliding_window = W }` as braces. An invalid spec is a compile error with the same
/// message `attngen validate` prints, pointing at the offending argument.
#[proc_macro]
pub fn spec(input: TokenStream) -> TokenStream {
    let parsed = syn::parse_macro_input!(input as args::SpecArgs);
    match parsed.fields.clone().into_spec() {
        Ok(spec) => attngen_codegen::rust::spec_tokens(&spec).into(),
        Err(errors) => errors
            .iter()
            .map(|error| syn::Error::new(parsed.span_of(error.field()), error).to_compile_error())
            .collect::<proc_macro2::TokenStream>()
            .into(),
    }
}
