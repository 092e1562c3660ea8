//! The flat, user-written form of a spec — TOML files, and the proc macro's arguments — and its
//! conversion to and from [`AttentionSpec`].
//!
//! Both front ends fill a [`SpecFields`] and call [`SpecFields::into_spec`], so the structural
//! rules (what is required, what conflicts) and then [`crate::validate()`] give the same messages
//! whichever way a spec was written.

use std::fmt::{self, Write as _};
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::spec::{AttentionSpec, Dtype, GroupMap, KvLayout, LatentCache, LatentKv, Mask, MlaForm};
use crate::validate::{self, SpecError};

/// The keys of a spec file, each as written (absent keys are `None`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFields {
    /// `name = "..."`.
    pub name: Option<String>,
    /// `q_heads = H`.
    pub q_heads: Option<u64>,
    /// `kv_heads = G` (grouped; defaults to `q_heads`, i.e. MHA).
    pub kv_heads: Option<u64>,
    /// `head_dim = D` (grouped).
    pub head_dim: Option<u64>,
    /// `v_head_dim = Dv` (defaults to `head_dim` for grouped KV; required for latent).
    pub v_head_dim: Option<u64>,
    /// `group_map = "contiguous" | "interleaved" | [g0, g1, ...]`.
    pub group_map: Option<GroupMap>,
    /// `mask = "none" | "causal" | { sliding_window = W }`.
    pub mask: Option<Mask>,
    /// `scale = s`.
    pub scale: Option<f64>,
    /// `softcap = c`.
    pub softcap: Option<f64>,
    /// `dtype = "f32"`.
    pub dtype: Option<Dtype>,
    /// The `[latent]` table (MLA).
    pub latent: Option<LatentFields>,
    /// The `[compressed]` table: what `attngen compress` measured when it wrote this spec.
    /// Informational: the kernel ignores it; `attngen plan` shows it.
    pub compressed: Option<Compression>,
}

/// What a rank of `attngen compress` keeps of the layer it converted, as the `[compressed]`
/// table of the spec it writes records it.
///
/// ```
/// use attngen_codegen::spec_file::Compression;
/// let text = "q_heads = 4\nv_head_dim = 8\n[latent]\nrank = 8\nrope_dim = 0\nnope_dim = 8\n\
///             [compressed]\nretained_energy = 0.9\nk_error = 0.2\nv_error = 0.3\noutput_error = 0.05\n";
/// assert_eq!(Compression::of(text).unwrap().output_error, 0.05);
/// assert!(attngen_codegen::AttentionSpec::from_toml(text).is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Σ_{i<R} σᵢ² / Σ σᵢ² of the stacked `[W_K; W_V]`.
    pub retained_energy: f64,
    /// ‖W_K − Ŵ_K‖_F / ‖W_K‖_F.
    pub k_error: f64,
    /// ‖W_V − Ŵ_V‖_F / ‖W_V‖_F.
    pub v_error: f64,
    /// ‖out_MLA − out_original‖_F / ‖out_original‖_F, measured on random activations.
    pub output_error: f64,
}

impl Compression {
    /// The `[compressed]` table of a spec file's text, if it has a valid one.
    pub fn of(text: &str) -> Option<Compression> {
        toml::from_str::<SpecFields>(text).ok()?.compressed
    }

    /// The table as TOML, to append to a spec file.
    pub fn to_toml(&self) -> String {
        format!(
            "\n[compressed]\nretained_energy = {:e}\nk_error = {:e}\nv_error = {:e}\noutput_error = {:e}\n",
            self.retained_energy, self.k_error, self.v_error, self.output_error
        )
    }
}

/// The keys of the `[latent]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentFields {
    /// `rank = r`: latent length per token.
    pub rank: u64,
    /// `rope_dim = dr`: shared RoPE key length per token (may be 0).
    pub rope_dim: u64,
    /// `nope_dim = dn`: per-head key length produced from the latent.
    pub nope_dim: u64,
    /// `form = "auto" | "absorbed" | "expanded"`: force the kernel's MLA form (default auto,
    /// chosen per call).
    #[serde(default)]
    pub form: Option<MlaForm>,
    /// `cache = "separate" | "combined"`: `c_kv` and `k_rope` as two cache tensors (default),
    /// or as one `[B, Sk, rank + rope_dim]` tensor, each row `[c_kv | k_rope]`.
    #[serde(default)]
    pub cache: Option<LatentCache>,
}

/// Saturates rather than wraps, so an absurd value still fails its range check.
fn size(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl SpecFields {
    /// Applies defaults and structural rules, then [`validate::errors`].
    ///
    /// # Errors
    /// Every rule the fields break: missing and conflicting fields, then [`validate::errors`]'s.
    pub fn into_spec(self) -> Result<AttentionSpec, Vec<SpecError>> {
        let mut found = Vec::new();
        let q_heads = self.q_heads.map(size).unwrap_or_else(|| {
            found.push(SpecError::Missing { field: "q_heads", why: "" });
            1
        });
        let (kv, v_head_dim) = match self.latent {
            Some(latent) => {
                let conflicts = [
                    (
                        "kv_heads",
                        self.kv_heads.is_some(),
                        "latent KV is one latent head shared by every query head",
                    ),
                    (
                        "head_dim",
                        self.head_dim.is_some(),
                        "the latent query/key dim is nope_dim + rope_dim",
                    ),
                    (
                        "group_map",
                        self.group_map.is_some(),
                        "latent KV is one latent head shared by every query head",
                    ),
                ];
                for (field, given, why) in conflicts {
                    if given {
                        found.push(SpecError::Conflict { field, other: "[latent]", why });
                    }
                }
                let v_head_dim = self.v_head_dim.map(size).unwrap_or_else(|| {
                    found.push(SpecError::Missing { field: "v_head_dim", why: " for latent KV" });
                    1
                });
                let latent = LatentKv {
                    rank: size(latent.rank),
                    rope_dim: size(latent.rope_dim),
                    nope_dim: size(latent.nope_dim),
                    form: latent.form.unwrap_or_default(),
                    cache: latent.cache.unwrap_or_default(),
                };
                (KvLayout::Latent(latent), v_head_dim)
            }
            None => {
                let head_dim = self.head_dim.map(size).unwrap_or_else(|| {
                    found.push(SpecError::Missing {
                        field: "head_dim",
                        why: " (or a [latent] table for MLA)",
                    });
                    1
                });
                let kv = KvLayout::Grouped {
                    kv_heads: self.kv_heads.map_or(q_heads, size),
                    head_dim,
                    group_map: self.group_map.unwrap_or_default(),
                };
                (kv, self.v_head_dim.map_or(head_dim, size))
            }
        };
        let spec = AttentionSpec {
            name: self.name,
            q_heads,
            kv,
            v_head_dim,
            mask: self.mask.unwrap_or_default(),
            // Narrowing may overflow to inf, which the range check then reports.
            scale: self.scale.map(|s| s as f32),
            softcap: self.softcap.map(|c| c as f32),
            dtype: self.dtype.unwrap_or_default(),
        };
        if found.is_empty() {
            found = validate::errors(&spec);
        }
        if found.is_empty() { Ok(spec) } else { Err(found) }
    }
}

/// A problem in a spec file, at a line and column (both 1-based).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("line {line}, column {column}: {problem}")]
pub struct TomlError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub problem: TomlProblem,
}

/// What is wrong in a spec file.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TomlProblem {
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// Valid TOML that breaks a rule of the spec.
    #[error(transparent)]
    Spec(SpecError),
}

/// Every problem found in a spec file (at least one).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct SpecFileError {
    /// The problems, in the order found.
    pub errors: Vec<TomlError>,
}

impl fmt::Display for SpecFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_char('\n')?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl AttentionSpec {
    /// Parses and validates a spec file.
    ///
    /// # Errors
    /// A [`SpecFileError`] holding the first TOML syntax error or unknown key, or else every
    /// missing field and broken rule, each with a line and column: the key's, or 1:1 for a
    /// missing field.
    ///
    /// ```
    /// use attngen_codegen::AttentionSpec;
    ///
    /// let spec = AttentionSpec::from_toml("q_heads = 32\nkv_heads = 8\nhead_dim = 128\n").unwrap();
    /// assert_eq!(spec, AttentionSpec::gqa(32, 8, 128));
    ///
    /// let err = AttentionSpec::from_toml("q_heads = 30\nkv_heads = 8\nhead_dim = 128\n").unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "line 2, column 1: q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\""
    /// );
    /// ```
    pub fn from_toml(text: &str) -> Result<AttentionSpec, SpecFileError> {
        let fields: SpecFields = toml::from_str(text).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            let problem = TomlProblem::Syntax(e.message().trim_end().to_owned());
            SpecFileError { errors: vec![TomlError { line, column, problem }] }
        })?;
        fields.into_spec().map_err(|errors| {
            let mut errors: Vec<TomlError> = errors
                .into_iter()
                .map(|error| {
                    let offset = key_span(text, error.field()).map_or(0, |s| s.start);
                    let (line, column) = line_column(text, offset);
                    TomlError { line, column, problem: TomlProblem::Spec(error) }
                })
                .collect();
            errors.sort_by_key(|e| (e.line, e.column));
            SpecFileError { errors }
        })
    }

    /// Writes the spec as a TOML file that [`AttentionSpec::from_toml`] reads back unchanged.
    /// Defaults are written out explicitly, except `v_head_dim` equal to `head_dim`.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        // `fmt::Write` for String never fails.
        let mut line = |key: &str, value: String| {
            let _ = writeln!(out, "{key} = {value}");
        };
        if let Some(name) = &self.name {
            line("name", toml::Value::String(name.clone()).to_string());
        }
        line("q_heads", self.q_heads.to_string());
        if let KvLayout::Grouped { kv_heads, head_dim, group_map } = &self.kv {
            line("kv_heads", kv_heads.to_string());
            line("head_dim", head_dim.to_string());
            if self.v_head_dim != *head_dim {
                line("v_head_dim", self.v_head_dim.to_string());
            }
            line(
                "group_map",
                match group_map {
                    GroupMap::Explicit(map) => format!("{map:?}"),
                    named => format!("\"{}\"", named.name()),
                },
            );
        } else {
            line("v_head_dim", self.v_head_dim.to_string());
        }
        line(
            "mask",
            match self.mask {
                Mask::SlidingWindow(w) => format!("{{ sliding_window = {w} }}"),
                named => format!("\"{named}\""),
            },
        );
        if let Some(scale) = self.scale {
            line("scale", float(scale));
        }
        if let Some(softcap) = self.softcap {
            line("softcap", float(softcap));
        }
        line("dtype", format!("\"{}\"", self.dtype.name()));
        if let KvLayout::Latent(l) = &self.kv {
            let _ = write!(
                out,
                "\n[latent]\nrank = {}\nrope_dim = {}\nnope_dim = {}\n",
                l.rank, l.rope_dim, l.nope_dim
            );
            if l.form != MlaForm::Auto {
                let _ = writeln!(out, "form = \"{}\"", l.form);
            }
            if l.cache != LatentCache::Separate {
                let _ = writeln!(out, "cache = \"{}\"", l.cache);
            }
        }
        out
    }
}

/// A TOML float that reads back as exactly `value`: the shortest form when that survives the
/// trip through f64, else the exact f64 value.
fn float(value: f32) -> String {
    let short = format!("{value:?}");
    if short.parse::<f64>().map(|v| v as f32) == Ok(value) {
        short
    } else {
        format!("{:?}", f64::from(value))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The byte span of the key at a dotted path (`latent.rank`) in a TOML document.
fn key_span(text: &str, path: &str) -> Option<Range<usize>> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut span = None;
    for part in path.split('.') {
        let (key, value) = table.get_key_value(part)?;
        span = Some(key.span());
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    span
}

impl<'de> Deserialize<'de> for GroupMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GroupMapVisitor;
        impl<'de> Visitor<'de> for GroupMapVisitor {
            type Value = GroupMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"contiguous\", \"interleaved\" or a list of KV head indices")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GroupMap, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GroupMap, A::Error> {
                let mut map = Vec::new();
                while let Some(entry) = seq.next_element::<u64>()? {
                    map.push(size(entry));
                }
                Ok(GroupMap::Explicit(map))
            }
        }
        deserializer.deserialize_any(GroupMapVisitor)
    }
}

impl<'de> Deserialize<'de> for Mask {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MaskVisitor;
        impl<'de> Visitor<'de> for MaskVisitor {
            type Value = Mask;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"none\", \"causal\" or { sliding_window = W }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mask, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Mask, A::Error> {
                let mut window = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "sliding_window" || window.is_some() {
                        return Err(de::Error::custom(format!(
                            "mask has key `{key}`: the only mask table is {{ sliding_window = W }}"
                        )));
                    }
                    window = Some(size(map.next_value::<u64>()?));
                }
                window.map(Mask::SlidingWindow).ok_or_else(|| {
                    de::Error::custom("mask table needs sliding_window: { sliding_window = W }")
                })
            }
        }
        deserializer.deserialize_any(MaskVisitor)
    }
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_error(text: &str) -> String {
        AttentionSpec::from_toml(text).unwrap_err().errors[0].to_string()
    }

    #[test]
    fn design_examples_parse() {
        let llama = AttentionSpec::from_toml(
            "name = \"llama3-8b\"\nq_heads = 32\nkv_heads = 8\nhead_dim = 128\n\
             group_map = \"contiguous\"\nmask = \"causal\"\n",
        )
        .unwrap();
        assert_eq!(llama, AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal).named("llama3-8b"));

        let lite = AttentionSpec::from_toml(
            "name = \"deepseek-v2-lite\"\nq_heads = 16\nv_head_dim = 128\nmask = \"causal\"\n\
             [latent]\nrank = 512\nrope_dim = 64\nnope_dim = 128\n",
        )
        .unwrap();
        assert_eq!(
            lite,
            AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal).named("deepseek-v2-lite")
        );
    }

    #[test]
    fn maps_masks_and_floats_parse() {
        let spec = AttentionSpec::from_toml(
            "q_heads = 5\nkv_heads = 3\nhead_dim = 8\ngroup_map = [0, 0, 1, 2, 2]\n\
             mask = { sliding_window = 16 }\nscale = 0.25\nsoftcap = 50.0\ndtype = \"f32\"\n",
        )
        .unwrap();
        let expected = AttentionSpec::gqa(5, 3, 8)
            .group_map(GroupMap::Explicit(vec![0, 0, 1, 2, 2]))
            .mask(Mask::SlidingWindow(16))
            .scale(0.25)
            .softcap(50.0);
        assert_eq!(spec, expected);
    }

    #[test]
    fn kv_heads_defaults_to_mha() {
        let spec = AttentionSpec::from_toml("q_heads = 4\nhead_dim = 8\n").unwrap();
        assert_eq!(spec, AttentionSpec::mha(4, 8));
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        assert_eq!(
            first_error("q_heads = 4\nhead_dim = 8\nheads = 3\n"),
            "line 3, column 1: unknown field `heads`, expected one of `name`, `q_heads`, \
             `kv_heads`, `head_dim`, `v_head_dim`, `group_map`, `mask`, `scale`, `softcap`, \
             `dtype`, `latent`, `compressed`"
        );
        assert!(
            first_error("q_heads = 4\nv_head_dim = 8\n[latent]\nrank = 8\nrope_dim = 0\nnope_dim = 8\nextra = 1\n")
                .starts_with("line 7, column 1: unknown field `extra`")
        );
    }

    #[test]
    fn syntax_and_type_errors_have_location() {
        assert!(first_error("q_heads = \n").starts_with("line 1, column 11:"));
        assert!(first_error("q_heads = 4\nhead_dim = -8\n").starts_with("line 2, column 12:"));
        assert_eq!(
            first_error("q_heads = 4\nhead_dim = 8\nmask = \"diagonal\"\n"),
            "line 3, column 8: mask (\"diagonal\") must be \"none\", \"causal\" or { sliding_window = W }"
        );
        assert_eq!(
            first_error("q_heads = 4\nhead_dim = 8\ndtype = \"bf16\"\n"),
            "line 3, column 9: dtype \"bf16\" is not supported yet: bf16 storage is planned; use \"f32\" for now"
        );
        assert_eq!(
            first_error("q_heads = 4\nhead_dim = 8\ngroup_map = \"blocked\"\n"),
            "line 3, column 13: group_map (\"blocked\") must be \"contiguous\", \"interleaved\" or a list of KV head indices"
        );
    }

    #[test]
    fn validation_errors_point_at_their_key() {
        let text =
            "q_heads = 16\nv_head_dim = 128\n\n[latent]\nrank = 0\nrope_dim = 64\nnope_dim = 128\n";
        assert_eq!(first_error(text), "line 5, column 1: latent.rank (0) must be in 1..=8192");
        assert_eq!(first_error("head_dim = 8\n"), "line 1, column 1: q_heads is required");
    }

    #[test]
    fn structural_rules() {
        let errors: Vec<String> = AttentionSpec::from_toml(
            "q_heads = 4\nkv_heads = 2\nhead_dim = 8\ngroup_map = \"interleaved\"\n\
             [latent]\nrank = 8\nrope_dim = 0\nnope_dim = 8\n",
        )
        .unwrap_err()
        .errors
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            errors,
            [
                "line 1, column 1: v_head_dim is required for latent KV",
                "line 2, column 1: kv_heads cannot be given with [latent]: latent KV is one latent head shared by every query head",
                "line 3, column 1: head_dim cannot be given with [latent]: the latent query/key dim is nope_dim + rope_dim",
                "line 4, column 1: group_map cannot be given with [latent]: latent KV is one latent head shared by every query head",
            ]
        );
        assert_eq!(
            first_error("q_heads = 4\n"),
            "line 1, column 1: head_dim is required (or a [latent] table for MLA)"
        );
    }

    #[test]
    fn floats_round_trip_exactly() {
        for value in [0.1f32, 1.0 / 3.0, 1e-30, 3.4e38, f32::MIN_POSITIVE, 0.088_388_35] {
            let text = AttentionSpec::mha(1, 1).scale(value).to_toml();
            assert_eq!(AttentionSpec::from_toml(&text).unwrap().scale, Some(value), "{text}");
        }
    }
}
