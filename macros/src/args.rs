//! Parsing `key = value, ...` macro arguments into [`SpecFields`], remembering where each key
//! was written.

use std::collections::HashMap;

use attngen_codegen::{GroupMap, LatentFields, Mask, SpecFields};
use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitFloat, LitInt, LitStr, Token, braced, bracketed};

/// The keys a spec accepts, in the order messages list them.
const KEYS: &[&str] = &[
    "name",
    "q_heads",
    "kv_heads",
    "head_dim",
    "v_head_dim",
    "group_map",
    "mask",
    "scale",
    "softcap",
    "dtype",
    "latent",
];

/// Parsed arguments: the fields, and the span of each key by dotted path (`latent.rank`).
pub struct SpecArgs {
    /// The spec's fields as written.
    pub fields: SpecFields,
    spans: HashMap<String, Span>,
}

impl SpecArgs {
    /// Where the field at `path` was written (the whole call if it was not).
    pub fn span_of(&self, path: &str) -> Span {
        self.spans.get(path).copied().unwrap_or_else(Span::call_site)
    }
}

impl Parse for SpecArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut fields = SpecFields::default();
        let mut spans = HashMap::new();
        while !input.is_empty() {
            let key: Ident = input.parse()?;
            let name = key.to_string();
            if spans.insert(name.clone(), key.span()).is_some() {
                return Err(syn::Error::new(key.span(), format!("duplicate key `{name}`")));
            }
            input.parse::<Token![=]>()?;
            match name.as_str() {
                "name" => fields.name = Some(input.parse::<LitStr>()?.value()),
                "q_heads" => fields.q_heads = Some(int(input)?),
                "kv_heads" => fields.kv_heads = Some(int(input)?),
                "head_dim" => fields.head_dim = Some(int(input)?),
                "v_head_dim" => fields.v_head_dim = Some(int(input)?),
                "scale" => fields.scale = Some(float(input)?),
                "softcap" => fields.softcap = Some(float(input)?),
                "dtype" => fields.dtype = Some(parsed_str(input)?),
                "group_map" => fields.group_map = Some(group_map(input)?),
                "mask" => fields.mask = Some(mask(input)?),
                "latent" => fields.latent = Some(latent(input, &mut spans)?),
                _ => {
                    let expected: Vec<String> = KEYS.iter().map(|k| format!("`{k}`")).collect();
                    let message =
                        format!("unknown field `{name}`, expected one of {}", expected.join(", "));
                    return Err(syn::Error::new(key.span(), message));
                }
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(SpecArgs { fields, spans })
    }
}

fn int(input: ParseStream<'_>) -> syn::Result<u64> {
    input.parse::<LitInt>()?.base10_parse()
}

fn float(input: ParseStream<'_>) -> syn::Result<f64> {
    if input.peek(LitInt) {
        return input.parse::<LitInt>()?.base10_parse();
    }
    input.parse::<LitFloat>()?.base10_parse()
}

/// A string literal parsed with the type's `FromStr`, whose errors are attngen's own messages.
fn parsed_str<T>(input: ParseStream<'_>) -> syn::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let lit: LitStr = input.parse()?;
    lit.value().parse().map_err(|e| syn::Error::new(lit.span(), e))
}

fn group_map(input: ParseStream<'_>) -> syn::Result<GroupMap> {
    if input.peek(LitStr) {
        return parsed_str(input);
    }
    let content;
    bracketed!(content in input);
    let entries =
        content.parse_terminated(|p| p.parse::<LitInt>()?.base10_parse::<usize>(), Token![,])?;
    Ok(GroupMap::Explicit(entries.into_iter().collect()))
}

fn mask(input: ParseStream<'_>) -> syn::Result<Mask> {
    if input.peek(LitStr) {
        return parsed_str(input);
    }
    let content;
    braced!(content in input);
    let key: Ident = content.parse()?;
    if key != "sliding_window" {
        return Err(syn::Error::new(key.span(), "the only mask table is { sliding_window = W }"));
    }
    content.parse::<Token![=]>()?;
    let window = int(&content)?;
    Ok(Mask::SlidingWindow(usize::try_from(window).unwrap_or(usize::MAX)))
}

fn latent(input: ParseStream<'_>, spans: &mut HashMap<String, Span>) -> syn::Result<LatentFields> {
    let content;
    let brace = braced!(content in input);
    let (mut rank, mut rope_dim, mut nope_dim) = (None, None, None);
    while !content.is_empty() {
        let key: Ident = content.parse()?;
        content.parse::<Token![=]>()?;
        let slot = match key.to_string().as_str() {
            "rank" => &mut rank,
            "rope_dim" => &mut rope_dim,
            "nope_dim" => &mut nope_dim,
            other => {
                let message = format!(
                    "unknown field `{other}`, expected one of `rank`, `rope_dim`, `nope_dim`"
                );
                return Err(syn::Error::new(key.span(), message));
            }
        };
        *slot = Some(int(&content)?);
        spans.insert(format!("latent.{key}"), key.span());
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    let missing = |field: &str| {
        syn::Error::new(brace.span.join(), format!("missing field `{field}` in latent"))
    };
    Ok(LatentFields {
        rank: rank.ok_or_else(|| missing("rank"))?,
        rope_dim: rope_dim.ok_or_else(|| missing("rope_dim"))?,
        nope_dim: nope_dim.ok_or_else(|| missing("nope_dim"))?,
    })
}
