//! Emits Rust tokens for the proc macros: today, the construction of a validated
//! [`AttentionSpec`] (`attngen::spec!`).

use proc_macro2::TokenStream;
use quote::quote;

use crate::spec::{AttentionSpec, GroupMap, KvLayout, Mask};

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
            quote!(::attngen::KvLayout::Latent(::attngen::LatentKv {
                rank: #rank, rope_dim: #rope_dim, nope_dim: #nope_dim
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
