//! `attngen plan`: the four variants side by side — what each caches per token and what a
//! decoded token costs.

use std::path::PathBuf;

use attngen::{AttentionSpec, cost};
use attngen_codegen::spec_file::Compression;
use serde::Serialize;

use crate::{Failure, emit, load_spec, table};

/// One spec's numbers, per layer.
#[derive(Serialize)]
struct PlanRow {
    file: String,
    name: Option<String>,
    variant: String,
    summary: String,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    v_head_dim: usize,
    cache_elems_per_token: u64,
    cache_bytes_per_token: u64,
    context: u64,
    cache_bytes_for_context: u64,
    /// Cache size relative to MHA with the same heads and dims.
    vs_mha: f64,
    decode_flops_per_token: u64,
    /// Decode FLOPs per byte of cache read.
    decode_flop_per_byte: f64,
    /// What `attngen compress` measured when it wrote the spec (its `[compressed]` table).
    compressed: Option<Compression>,
}

impl PlanRow {
    fn new(
        file: String,
        spec: &AttentionSpec,
        context: u64,
        compressed: Option<Compression>,
    ) -> Self {
        let per_token = cost::cache_bytes_per_token(spec);
        let flops = cost::decode_flops_per_token(spec, context);
        let cache = per_token.saturating_mul(context);
        PlanRow {
            file,
            name: spec.name.clone(),
            variant: spec.variant().to_string(),
            summary: spec.summary(),
            q_heads: spec.q_heads,
            kv_heads: spec.kv_heads(),
            head_dim: spec.head_dim(),
            v_head_dim: spec.v_head_dim,
            cache_elems_per_token: cost::cache_elems_per_token(spec),
            cache_bytes_per_token: per_token,
            context,
            cache_bytes_for_context: cache,
            vs_mha: cost::cache_elems_per_token(spec) as f64
                / cost::mha_cache_elems_per_token(spec) as f64,
            decode_flops_per_token: flops,
            decode_flop_per_byte: if cache == 0 { 0.0 } else { flops as f64 / cache as f64 },
            compressed,
        }
    }
}

/// Prints the comparison table (or JSON) for `paths` at `context` tokens.
pub fn plan(paths: &[PathBuf], context: u64, json: bool) -> Result<(), Failure> {
    let rows = paths
        .iter()
        .map(|path| {
            let spec = load_spec(path)?;
            let compressed = std::fs::read_to_string(path).ok().and_then(|t| Compression::of(&t));
            Ok(PlanRow::new(path.display().to_string(), &spec, context, compressed))
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    if json {
        let text = serde_json::to_string_pretty(&rows).expect("plain data serialises");
        return emit(&format!("{text}\n"));
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone().unwrap_or_else(|| r.file.clone()),
                r.summary.clone(),
                r.cache_elems_per_token.to_string(),
                table::bytes(r.cache_bytes_per_token),
                table::bytes(r.cache_bytes_for_context),
                format!("{:.1}%", 100.0 * r.vs_mha),
                table::si(r.decode_flops_per_token as f64),
                format!("{:.2}", r.decode_flop_per_byte),
                r.compressed.map_or_else(|| "-".to_owned(), |c| format!("{:.2e}", c.output_error)),
            ]
        })
        .collect();
    let context_column = format!("cache @{context}");
    let mut report = table::render(
        &[
            "spec",
            "variant",
            "numbers/token",
            "bytes/token",
            &context_column,
            "vs MHA",
            "decode FLOP/token",
            "FLOP/byte",
            "output err",
        ],
        &[false, false, true, true, true, true, true, true, true],
        &cells,
    );
    report.push_str(&format!(
        "Per layer, f32. Latent (MLA) decode is counted in the absorbed form attngen runs: \
         q' = W_UKᵀ·q_nope, attention over the {context}-token latent cache, out = W_UV·o'.\n"
    ));
    if rows.iter().any(|r| r.compressed.is_some()) {
        report.push_str(
            "output err: for a spec `attngen compress` wrote, the relative error of its attention \
             output against the original layer's on random activations, as measured then.\n",
        );
    }
    emit(&report)
}
