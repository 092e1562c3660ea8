//! Every rule a spec must satisfy, checked in one place.
//!
//! The TOML loader, the proc macro and the JIT all call [`validate`] (or [`errors`]), so the same
//! mistake gets the same message everywhere. Each [`SpecError`] names the field it is about
//! ([`SpecError::field`]) so a front end can point at the right line or macro argument.

use crate::spec::{AttentionSpec, GroupMap, KvLayout, Mask};

/// The largest `q_heads`, `head_dim` and `v_head_dim` a spec may have.
pub const MAX_HEADS_OR_DIM: usize = 1024;
/// The largest latent rank a spec may have (DeepSeek-V2/V3 use 512).
pub const MAX_LATENT_RANK: usize = 8192;

/// A spec that breaks a rule of the contract, naming the field and the values involved.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// A count or dimension outside its allowed range.
    #[error("{field} ({value}) must be in {min}..={max}")]
    OutOfRange {
        /// The field, as written in a spec file.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// The latent query/key dimension `nope_dim + rope_dim` is outside 1..=1024.
    #[error(
        "latent nope_dim + rope_dim ({nope_dim} + {rope_dim}) must be in 1..={MAX_HEADS_OR_DIM}: \
         it is the query/key head dim"
    )]
    LatentHeadDim {
        /// The given `nope_dim`.
        nope_dim: usize,
        /// The given `rope_dim`.
        rope_dim: usize,
    },
    /// More KV heads than query heads: some KV head would be read by nobody.
    #[error(
        "kv_heads ({kv_heads}) exceeds q_heads ({q_heads}): every KV head must be read by a query head"
    )]
    KvHeadsExceedQHeads {
        /// The given `kv_heads`.
        kv_heads: usize,
        /// The given `q_heads`.
        q_heads: usize,
    },
    /// A named group map needs `q_heads` to be a multiple of `kv_heads`.
    #[error(
        "q_heads ({q_heads}) is not a multiple of kv_heads ({kv_heads}) for group_map \"{map}\""
    )]
    NotMultiple {
        /// The given `q_heads`.
        q_heads: usize,
        /// The given `kv_heads`.
        kv_heads: usize,
        /// `contiguous` or `interleaved`.
        map: &'static str,
    },
    /// An explicit group map whose length is not `q_heads`.
    #[error(
        "group_map has {len} entries but q_heads is {q_heads}: it needs one KV head per query head"
    )]
    GroupMapLength {
        /// Entries given.
        len: usize,
        /// The given `q_heads`.
        q_heads: usize,
    },
    /// An explicit group map entry that names no KV head.
    #[error(
        "group_map[{index}] ({value}) is not a KV head: entries must be < kv_heads ({kv_heads})"
    )]
    GroupMapEntry {
        /// Position in the map (the query head).
        index: usize,
        /// The entry given.
        value: usize,
        /// The given `kv_heads`.
        kv_heads: usize,
    },
    /// An explicit group map that leaves a KV head unread.
    #[error(
        "group_map never uses KV head {kv_head} of kv_heads ({kv_heads}): every KV head must be read by a query head"
    )]
    UnusedKvHead {
        /// The unread KV head.
        kv_head: usize,
        /// The given `kv_heads`.
        kv_heads: usize,
    },
    /// A sliding window of zero keys (it must include at least the diagonal).
    #[error("mask sliding_window (0) must be at least 1: the window includes the diagonal")]
    EmptyWindow,
    /// A float field that is not finite and positive.
    #[error("{field} ({value}) must be finite and > 0")]
    NotPositiveFinite {
        /// `scale` or `softcap`.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A field that has no value where one is required.
    #[error("{field} is required{why}")]
    Missing {
        /// The missing field.
        field: &'static str,
        /// Context such as " for grouped KV".
        why: &'static str,
    },
    /// Two fields that cannot be given together.
    #[error("{field} cannot be given with {other}: {why}")]
    Conflict {
        /// The field that should not be there.
        field: &'static str,
        /// The field it conflicts with.
        other: &'static str,
        /// Why they conflict.
        why: &'static str,
    },
    /// A string field with a value that is not one of its choices.
    #[error("{field} (\"{value}\") must be {expected}")]
    UnknownValue {
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },
    /// A value the contract names but this version does not implement.
    #[error("{field} \"{value}\" is not supported yet: {why}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What to do instead.
        why: &'static str,
    },
}

impl SpecError {
    /// The spec-file field the error is about, as a dotted path (`latent.rank`, `mask`, ...).
    pub fn field(&self) -> &'static str {
        match self {
            SpecError::OutOfRange { field, .. }
            | SpecError::NotPositiveFinite { field, .. }
            | SpecError::Missing { field, .. }
            | SpecError::Conflict { field, .. }
            | SpecError::UnknownValue { field, .. }
            | SpecError::Unsupported { field, .. } => field,
            SpecError::LatentHeadDim { .. } => "latent",
            // The named maps are the default, so the count is the likelier mistake.
            SpecError::KvHeadsExceedQHeads { .. } | SpecError::NotMultiple { .. } => "kv_heads",
            SpecError::GroupMapLength { .. }
            | SpecError::GroupMapEntry { .. }
            | SpecError::UnusedKvHead { .. } => "group_map",
            SpecError::EmptyWindow => "mask",
        }
    }
}

/// Checks every rule of the contract and returns the first broken one.
///
/// # Errors
/// The first [`SpecError`] of [`errors`], which names the field, its value and the rule.
///
/// ```
/// use attngen_codegen::{validate, AttentionSpec};
///
/// let err = validate(&AttentionSpec::gqa(30, 8, 128)).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\""
/// );
/// ```
pub fn validate(spec: &AttentionSpec) -> Result<(), SpecError> {
    match errors(spec).into_iter().next() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Checks every rule of the contract and returns all broken ones, in field order.
pub fn errors(spec: &AttentionSpec) -> Vec<SpecError> {
    let mut found = Vec::new();
    let mut in_range = |field: &'static str, value: usize, min: usize, max: usize| {
        let ok = (min..=max).contains(&value);
        if !ok {
            found.push(SpecError::OutOfRange {
                field,
                value: value as u64,
                min: min as u64,
                max: max as u64,
            });
        }
        ok
    };
    let heads_ok = in_range("q_heads", spec.q_heads, 1, MAX_HEADS_OR_DIM);
    match &spec.kv {
        KvLayout::Grouped { kv_heads, head_dim, group_map } => {
            in_range("head_dim", *head_dim, 1, MAX_HEADS_OR_DIM);
            // A v_head_dim equal to head_dim is usually the default: one message is enough.
            if spec.v_head_dim != *head_dim {
                in_range("v_head_dim", spec.v_head_dim, 1, MAX_HEADS_OR_DIM);
            }
            if in_range("kv_heads", *kv_heads, 1, MAX_HEADS_OR_DIM) && heads_ok {
                group_map_errors(spec.q_heads, *kv_heads, group_map, &mut found);
            }
        }
        KvLayout::Latent(latent) => {
            in_range("latent.rank", latent.rank, 1, MAX_LATENT_RANK);
            in_range("latent.rope_dim", latent.rope_dim, 0, MAX_HEADS_OR_DIM);
            in_range("latent.nope_dim", latent.nope_dim, 0, MAX_HEADS_OR_DIM);
            in_range("v_head_dim", spec.v_head_dim, 1, MAX_HEADS_OR_DIM);
            let head_dim = latent.nope_dim.saturating_add(latent.rope_dim);
            if !(1..=MAX_HEADS_OR_DIM).contains(&head_dim) {
                found.push(SpecError::LatentHeadDim {
                    nope_dim: latent.nope_dim,
                    rope_dim: latent.rope_dim,
                });
            }
        }
    }
    if spec.mask == Mask::SlidingWindow(0) {
        found.push(SpecError::EmptyWindow);
    }
    for (field, value) in [("scale", spec.scale), ("softcap", spec.softcap)] {
        if let Some(value) = value
            && !(value.is_finite() && value > 0.0)
        {
            found.push(SpecError::NotPositiveFinite { field, value: f64::from(value) });
        }
    }
    found
}

/// The group-map rules, for `q_heads` and `kv_heads` already known to be in range.
fn group_map_errors(q_heads: usize, kv_heads: usize, map: &GroupMap, found: &mut Vec<SpecError>) {
    if kv_heads > q_heads {
        found.push(SpecError::KvHeadsExceedQHeads { kv_heads, q_heads });
        return;
    }
    match map {
        GroupMap::Contiguous | GroupMap::Interleaved => {
            if !q_heads.is_multiple_of(kv_heads) {
                found.push(SpecError::NotMultiple { q_heads, kv_heads, map: map.name() });
            }
        }
        GroupMap::Explicit(entries) => {
            if entries.len() != q_heads {
                found.push(SpecError::GroupMapLength { len: entries.len(), q_heads });
                return;
            }
            let mut used = vec![false; kv_heads];
            for (index, &value) in entries.iter().enumerate() {
                match used.get_mut(value) {
                    Some(slot) => *slot = true,
                    None => found.push(SpecError::GroupMapEntry { index, value, kv_heads }),
                }
            }
            if let Some(kv_head) = used.iter().position(|&u| !u) {
                found.push(SpecError::UnusedKvHead { kv_head, kv_heads });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{AttentionSpec, GroupMap, Mask};

    fn message(spec: &AttentionSpec) -> String {
        validate(spec).unwrap_err().to_string()
    }

    #[test]
    fn valid_specs_pass() {
        for spec in [
            AttentionSpec::mha(16, 64),
            AttentionSpec::mqa(16, 128),
            AttentionSpec::gqa(32, 8, 128).mask(Mask::SlidingWindow(4096)),
            AttentionSpec::gqa(5, 3, 7).group_map(GroupMap::Explicit(vec![0, 0, 1, 2, 2])),
            AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal),
            AttentionSpec::mla(1, 1, 0, 1, 1),
            AttentionSpec::mla(1, 4, 3, 0, 1),
        ] {
            assert_eq!(validate(&spec), Ok(()), "{spec:?}");
        }
    }

    #[test]
    fn q_heads_range() {
        assert_eq!(message(&AttentionSpec::mha(0, 64)), "q_heads (0) must be in 1..=1024");
        assert_eq!(
            message(&AttentionSpec::mha(1_000_000_000, 64)),
            "q_heads (1000000000) must be in 1..=1024"
        );
    }

    #[test]
    fn head_dim_range() {
        assert_eq!(message(&AttentionSpec::mha(8, 0)), "head_dim (0) must be in 1..=1024");
        assert_eq!(message(&AttentionSpec::mha(8, 1025)), "head_dim (1025) must be in 1..=1024");
    }

    #[test]
    fn v_head_dim_range() {
        assert_eq!(
            message(&AttentionSpec::mha(8, 64).v_head_dim(0)),
            "v_head_dim (0) must be in 1..=1024"
        );
        assert_eq!(
            message(&AttentionSpec::mla(8, 64, 0, 64, 5000)),
            "v_head_dim (5000) must be in 1..=1024"
        );
    }

    #[test]
    fn kv_heads_range() {
        assert_eq!(message(&AttentionSpec::gqa(8, 0, 64)), "kv_heads (0) must be in 1..=1024");
    }

    #[test]
    fn kv_heads_exceed_q_heads() {
        assert_eq!(
            message(&AttentionSpec::gqa(8, 16, 64)),
            "kv_heads (16) exceeds q_heads (8): every KV head must be read by a query head"
        );
    }

    #[test]
    fn contiguous_and_interleaved_need_a_multiple() {
        assert_eq!(
            message(&AttentionSpec::gqa(30, 8, 128)),
            "q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\""
        );
        assert_eq!(
            message(&AttentionSpec::gqa(30, 8, 128).group_map(GroupMap::Interleaved)),
            "q_heads (30) is not a multiple of kv_heads (8) for group_map \"interleaved\""
        );
    }

    #[test]
    fn explicit_map_length() {
        let spec = AttentionSpec::gqa(4, 2, 8).group_map(GroupMap::Explicit(vec![0, 1, 1]));
        assert_eq!(
            message(&spec),
            "group_map has 3 entries but q_heads is 4: it needs one KV head per query head"
        );
    }

    #[test]
    fn explicit_map_entry_range() {
        let spec = AttentionSpec::gqa(4, 2, 8).group_map(GroupMap::Explicit(vec![0, 1, 1, 9]));
        assert_eq!(
            message(&spec),
            "group_map[3] (9) is not a KV head: entries must be < kv_heads (2)"
        );
    }

    #[test]
    fn explicit_map_uses_every_kv_head() {
        let spec = AttentionSpec::gqa(4, 3, 8).group_map(GroupMap::Explicit(vec![0, 0, 2, 2]));
        assert_eq!(
            message(&spec),
            "group_map never uses KV head 1 of kv_heads (3): every KV head must be read by a query head"
        );
    }

    #[test]
    fn latent_ranges() {
        assert_eq!(
            message(&AttentionSpec::mla(16, 0, 64, 128, 128)),
            "latent.rank (0) must be in 1..=8192"
        );
        assert_eq!(
            message(&AttentionSpec::mla(16, 512, 2000, 128, 128)),
            "latent.rope_dim (2000) must be in 0..=1024"
        );
        assert_eq!(
            message(&AttentionSpec::mla(16, 512, 64, 4096, 128)),
            "latent.nope_dim (4096) must be in 0..=1024"
        );
    }

    #[test]
    fn latent_head_dim_is_nope_plus_rope() {
        assert_eq!(
            message(&AttentionSpec::mla(16, 512, 0, 0, 128)),
            "latent nope_dim + rope_dim (0 + 0) must be in 1..=1024: it is the query/key head dim"
        );
        assert_eq!(
            message(&AttentionSpec::mla(16, 512, 512, 1000, 128)),
            "latent nope_dim + rope_dim (1000 + 512) must be in 1..=1024: it is the query/key head dim"
        );
    }

    #[test]
    fn sliding_window_not_empty() {
        let spec = AttentionSpec::mha(8, 64).mask(Mask::SlidingWindow(0));
        assert_eq!(
            message(&spec),
            "mask sliding_window (0) must be at least 1: the window includes the diagonal"
        );
    }

    #[test]
    fn scale_and_softcap_finite_positive() {
        assert_eq!(
            message(&AttentionSpec::mha(8, 64).scale(0.0)),
            "scale (0) must be finite and > 0"
        );
        assert_eq!(
            message(&AttentionSpec::mha(8, 64).scale(f32::NAN)),
            "scale (NaN) must be finite and > 0"
        );
        assert_eq!(
            message(&AttentionSpec::mha(8, 64).softcap(f32::INFINITY)),
            "softcap (inf) must be finite and > 0"
        );
        assert_eq!(
            message(&AttentionSpec::mha(8, 64).softcap(-50.0)),
            "softcap (-50) must be finite and > 0"
        );
    }

    #[test]
    fn all_errors_are_reported_and_name_their_field() {
        let spec = AttentionSpec::gqa(0, 0, 0).v_head_dim(2000).scale(-1.0).softcap(0.0);
        let fields: Vec<_> = errors(&spec).iter().map(SpecError::field).collect();
        assert_eq!(fields, ["q_heads", "head_dim", "v_head_dim", "kv_heads", "scale", "softcap"]);
    }

    #[test]
    fn absurd_sizes_are_errors_not_allocations() {
        // A map of the right length but huge kv_heads must not allocate `kv_heads` flags.
        let spec = AttentionSpec::gqa(2, usize::MAX, 8).group_map(GroupMap::Explicit(vec![0, 1]));
        assert_eq!(message(&spec), format!("kv_heads ({}) must be in 1..=1024", usize::MAX));
        let spec = AttentionSpec::mla(8, usize::MAX, usize::MAX, usize::MAX, 8);
        assert_eq!(errors(&spec).len(), 4);
    }
}
