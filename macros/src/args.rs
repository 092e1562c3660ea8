//! Parsing `key = value, ...` macro arguments into [`SpecFields`], remembering where each key
//! was written.

use std::collections::HashMap;

use attngen_codegen::{
    AttentionSpec, GroupMap, LatentCache, LatentFields, Mask, MlaForm, SpecFields,
};
use proc_macro2::{Span, TokenStream};
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

    /// The validated spec, or one compile error per problem, each at its argument.
    pub fn spec(&self) -> Result<AttentionSpec, TokenStream> {
        self.fields.clone().into_spec().map_err(|errors| {
            errors
                .iter()
                .map(|error| syn::Error::new(self.span_of(error.field()), error).to_compile_error())
                .collect()
        })
    }
}

/// The arguments of `#[attngen::kernel]`: a spec written inline, or `spec = "path.toml"`.
pub enum KernelArgs {
    /// `key = value, ...` as for `spec!`.
    Inline(Box<SpecArgs>),
    /// `spec = "path"`, relative to `CARGO_MANIFEST_DIR`.
    File(LitStr),
}

impl Parse for KernelArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let fork = input.fork();
        if fork.parse::<Ident>().is_ok_and(|key| key == "spec") && fork.peek(Token![=]) {
            input.parse::<Ident>()?;
            input.parse::<Token![=]>()?;
            let path: LitStr = input.parse()?;
            if !input.is_empty() {
                let message =
                    "`spec = \"path.toml\"` takes the whole spec from the file: no other arguments";
                return Err(input.error(message));
            }
            return Ok(KernelArgs::File(path));
        }
        input.parse().map(|args| KernelArgs::Inline(Box::new(args)))
    }
}

impl KernelArgs {
    /// The validated spec, and the absolute path of its file when it came from one (for the
    /// generated code to `include_bytes!`, so editing the file rebuilds the crate).
    pub fn spec(&self) -> Result<(AttentionSpec, Option<String>), TokenStream> {
        let literal = match self {
            KernelArgs::Inline(args) => return args.spec().map(|spec| (spec, None)),
            KernelArgs::File(literal) => literal,
        };
        let fail = |message: String| syn::Error::new(literal.span(), message).to_compile_error();
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
        let path = std::path::Path::new(&dir).join(literal.value());
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| fail(format!("cannot read spec file `{shown}`: {e}")))?;
        let spec = AttentionSpec::from_toml(&text).map_err(|e| {
            let lines: Vec<String> = e.errors.iter().map(|e| format!("{shown}: {e}")).collect();
            fail(lines.join("\n"))
        })?;
        Ok((spec, Some(shown)))
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
                _ => return Err(syn::Error::new(key.span(), unknown_key(&name, KEYS))),
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(SpecArgs { fields, spans })
    }
}

/// "unknown field `name`", the closest of `keys` when one is close (at most a third of its
/// letters edited), and every key.
fn unknown_key(name: &str, keys: &[&str]) -> String {
    let closest = keys
        .iter()
        .map(|key| (edit_distance(name, key), *key))
        .filter(|(distance, key)| *distance <= key.len().max(name.len()).div_ceil(3))
        .min();
    let expected: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
    let hint = closest.map_or(String::new(), |(_, key)| format!("did you mean `{key}`? "));
    format!("unknown field `{name}`, {hint}expected one of {}", expected.join(", "))
}

/// Levenshtein distance: the fewest single-character insertions, deletions and substitutions
/// that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
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
    let (mut form, mut cache) = (None, None);
    while !content.is_empty() {
        let key: Ident = content.parse()?;
        content.parse::<Token![=]>()?;
        let slot = match key.to_string().as_str() {
            "rank" => &mut rank,
            "rope_dim" => &mut rope_dim,
            "nope_dim" => &mut nope_dim,
            named @ ("form" | "cache") => {
                match named {
                    "form" => form = Some(parsed_str::<MlaForm>(&content)?),
                    _ => cache = Some(parsed_str::<LatentCache>(&content)?),
                }
                spans.insert(format!("latent.{key}"), key.span());
                if content.is_empty() {
                    break;
                }
                content.parse::<Token![,]>()?;
                continue;
            }
            other => {
                let keys = ["rank", "rope_dim", "nope_dim", "form", "cache"];
                let message = unknown_key(other, &keys);
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
        form,
        cache,
    })
}

/// The spec files of `spec_tests!`'s folder, sorted: `(module name, absolute path)` of every
/// `.toml` in it, each checked to be a valid spec (an invalid one is a compile error naming
/// the file, its line and the problem).
pub fn spec_files(dir: &LitStr) -> syn::Result<Vec<(String, String)>> {
    let fail = |message: String| syn::Error::new(dir.span(), message);
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    let folder = std::path::Path::new(&root).join(dir.value());
    let entries = std::fs::read_dir(&folder)
        .map_err(|e| fail(format!("cannot read spec folder `{}`: {e}", folder.display())))?;
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(fail(format!("no .toml spec files in `{}`", folder.display())));
    }
    let mut files = Vec::new();
    for path in paths {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| fail(format!("cannot read spec file `{shown}`: {e}")))?;
        if let Err(e) = AttentionSpec::from_toml(&text) {
            let lines: Vec<String> = e.errors.iter().map(|e| format!("{shown}: {e}")).collect();
            return Err(fail(lines.join("\n")));
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let mut module: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .collect();
        if !module.starts_with(|c: char| c.is_ascii_alphabetic()) {
            module.insert_str(0, "spec_");
        }
        if let Some((_, other)) = files.iter().find(|(m, _)| *m == module) {
            return Err(fail(format!(
                "spec files `{other}` and `{shown}` would both be tested in module `{module}`: \
                 rename one"
            )));
        }
        files.push((module, shown));
    }
    Ok(files)
}
