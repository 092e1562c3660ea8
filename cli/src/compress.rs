//! `attngen compress`: a grouped layer's key and value projections, jointly factored by a
//! truncated SVD into the down- and up-projections of multi-head latent attention.
//!
//! The stacked projection `W = [W_K; W_V]` ([2·G·D, hidden], Hugging Face's
//! `[kv_heads·D, hidden]` per tensor) is factored once, `W = U Σ Vᵀ`. At rank R the latent of a
//! token x is `c = W_DKV x` with `W_DKV = V_Rᵀ` ([R, hidden]), and `U_R Σ_R` ([2·G·D, R]) splits
//! into each KV head's key rows and value rows: query head h takes its KV head's rows as
//! `w_uk[h]` and `w_uv[h]` ([D, R] each, semantics.md §2). `W_UKV · W_DKV` is then the best
//! rank-R approximation of W in the Frobenius norm (Eckart–Young), and at full rank it is W.

use std::path::{Path, PathBuf};

use attngen::{AttentionSpec, Inputs, Kernel, Mask, Reference, Shape};
use attngen_codegen::spec_file::Compression;
use faer::Mat;
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::{Failure, emit, outputs, table, tensors};

/// `attngen compress`'s arguments.
#[derive(clap::Args, Debug)]
pub struct CompressArgs {
    /// The layer's weights (safetensors, F32).
    #[arg(long, value_name = "W.safetensors")]
    pub weights: PathBuf,
    /// The key projection's tensor, [kv_heads·head_dim, hidden].
    #[arg(long, value_name = "NAME")]
    pub k_proj: String,
    /// The value projection's tensor, [kv_heads·head_dim, hidden].
    #[arg(long, value_name = "NAME")]
    pub v_proj: String,
    /// Query heads H.
    #[arg(long)]
    pub heads: usize,
    /// KV heads G (query heads h·G/H.. share KV head h·G/H, contiguously, as Hugging Face's
    /// `repeat_kv` does).
    #[arg(long)]
    pub kv_heads: usize,
    /// Head dim D (of keys and values).
    #[arg(long)]
    pub head_dim: usize,
    /// Latent ranks to make, e.g. `--rank 64,128,256`; each at most min(hidden, 2·G·D).
    #[arg(long, value_delimiter = ',', required = true)]
    pub rank: Vec<usize>,
    /// Where to write `w_dkv`, `w_uk`, `w_uv` (with several ranks, `-rR` is added to the file
    /// stem); the spec is written beside it with the extension `.toml`. Neither may replace
    /// `--weights`.
    #[arg(long, value_name = "MLA.safetensors")]
    pub out: PathBuf,
    /// The layer's mask, for the converted spec and the output-error check: `none`, `causal`
    /// or `sliding_window=W` (Mistral's layers, say).
    #[arg(long, default_value = "causal", value_parser = parse_mask)]
    pub mask: Mask,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `none`, `causal` or `sliding_window=W` (spaces around `=` allowed), W at least 1.
fn parse_mask(text: &str) -> Result<Mask, String> {
    match text.split_once('=') {
        Some((key, window)) if key.trim() == "sliding_window" => match window.trim().parse() {
            Ok(w) if w >= 1 => Ok(Mask::SlidingWindow(w)),
            _ => Err(format!("the window in `{text}` must be a whole number of keys, at least 1")),
        },
        _ => text
            .parse()
            .map_err(|_| format!("`{text}` is not a mask: none, causal or sliding_window=W")),
    }
}

/// What one rank buys: how much of W it keeps, and what that does to the cache and the output.
#[derive(Debug, Serialize)]
struct RankReport {
    rank: usize,
    /// Σ_{i<R} σᵢ² / Σ σᵢ².
    energy: f64,
    /// ‖W_K − Ŵ_K‖_F / ‖W_K‖_F.
    k_error: f64,
    /// ‖W_V − Ŵ_V‖_F / ‖W_V‖_F.
    v_error: f64,
    /// KV-cache bytes per token of the grouped layer (f32 K and V).
    cache_bytes_before: u64,
    /// KV-cache bytes per token of the converted layer (the f32 latent).
    cache_bytes_after: u64,
    /// ‖out_MLA − out_GQA‖_F / ‖out_GQA‖_F on random activations.
    output_error: f64,
    /// The largest |out_MLA − out_GQA| there.
    output_max_abs: f64,
    /// The weights written.
    weights: PathBuf,
    /// The spec written.
    spec: PathBuf,
}

/// Tokens and queries of the output-error check.
const CHECK_KEYS: usize = 64;
const CHECK_QUERIES: usize = 16;

/// The grouped layer's projections, checked.
struct Layer {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    /// [G·D, hidden], row-major.
    w_k: Vec<f32>,
    w_v: Vec<f32>,
}

/// Runs `attngen compress`: everything is read and checked (the ranks, and that no output
/// would replace the weights or another output), and every rank factored and measured, before
/// the files are written, all or none.
pub fn run(args: &CompressArgs) -> Result<(), Failure> {
    let mask = args.mask;
    let bytes = std::fs::read(&args.weights)
        .map_err(|e| Failure::input(format!("{}: cannot read: {e}", args.weights.display())))?;
    let layer = load(args, &bytes)?;
    let full = layer.hidden.min(2 * layer.kv_heads * layer.head_dim);
    if let Some(&bad) = args.rank.iter().find(|&&r| r == 0 || r > full) {
        return Err(Failure::input(format!(
            "--rank {bad}: a rank must be 1..={full}, min(hidden = {}, 2·kv_heads·head_dim = {})",
            layer.hidden,
            2 * layer.kv_heads * layer.head_dim
        )));
    }
    if let Some(rank) = crate::first_repeat(&args.rank) {
        return Err(Failure::input(format!("--rank {rank} is listed twice")));
    }
    if args.out.extension().is_some_and(|e| e == "toml") {
        return Err(Failure::input(format!(
            "--out {}: the spec is written beside the weights with the extension .toml; give \
             the weights another (.safetensors)",
            args.out.display()
        )));
    }
    let several = args.rank.len() > 1;
    let paths: Vec<(PathBuf, PathBuf)> = args
        .rank
        .iter()
        .map(|&rank| {
            let weights = if several { with_rank(&args.out, rank) } else { args.out.clone() };
            let spec = weights.with_extension("toml");
            (weights, spec)
        })
        .collect();
    let named: Vec<outputs::Named> = paths
        .iter()
        .flat_map(|(weights, spec)| [("--out", weights.as_path()), ("its spec", spec.as_path())])
        .collect();
    outputs::check(&[("--weights", args.weights.as_path())], &named)?;
    let factors = Factors::of(&layer)?;
    let mut files = Vec::new();
    let mut reports = Vec::new();
    for (&rank, (weights, spec_path)) in args.rank.iter().zip(&paths) {
        let converted = factors.truncate(&layer, rank);
        let spec = converted.spec(&layer, mask, weights);
        let (output_error, output_max_abs) = output_error(&layer, &converted, &spec, mask)?;
        let (k_error, v_error) = factors.errors(&layer, rank);
        reports.push(RankReport {
            rank,
            energy: factors.energy(rank),
            k_error,
            v_error,
            cache_bytes_before: (2 * layer.kv_heads * layer.head_dim * 4) as u64,
            cache_bytes_after: attngen::cost::cache_bytes_per_token(&spec),
            output_error,
            output_max_abs,
            weights: weights.clone(),
            spec: spec_path.clone(),
        });
        let compression =
            Compression { retained_energy: factors.energy(rank), k_error, v_error, output_error };
        let (r, h, d, hidden) = (rank, layer.heads, layer.head_dim, layer.hidden);
        let tensors = tensors::encode(&[
            ("w_dkv", vec![r, hidden], converted.w_dkv.as_slice()),
            ("w_uk", vec![h, d, r], converted.w_uk.as_slice()),
            ("w_uv", vec![h, d, r], converted.w_uv.as_slice()),
        ])
        .map_err(|e| Failure { status: 1, message: format!("cannot encode rank {rank}: {e}") })?;
        files.push((weights.as_path(), tensors));
        files.push((spec_path.as_path(), (spec.to_toml() + &compression.to_toml()).into_bytes()));
    }
    let files: Vec<(&Path, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    outputs::write_all(&files)?;
    if args.json {
        let json = serde_json::to_string_pretty(&reports).expect("reports serialise");
        return emit(&format!("{json}\n"));
    }
    emit(&render(&layer, &reports))
}

/// Reads the two projections: present, F32, [G·D, hidden] with one hidden size, and head
/// counts that divide.
fn load(args: &CompressArgs, bytes: &[u8]) -> Result<Layer, Failure> {
    let (h, g, d) = (args.heads, args.kv_heads, args.head_dim);
    if h == 0 || g == 0 || d == 0 {
        return Err(Failure::input("--heads, --kv-heads and --head-dim must be at least 1"));
    }
    if h % g != 0 {
        return Err(Failure::input(format!("--heads ({h}) is not a multiple of --kv-heads ({g})")));
    }
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| Failure::input(format!("{}: {e}", args.weights.display())))?;
    let read = |flag: &str, name: &str, hidden: Option<usize>| -> Result<Vec<f32>, Failure> {
        let view = file.tensor(name).map_err(|_| {
            Failure::input(format!("{flag} {name}: no such tensor in {}", args.weights.display()))
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(Failure::input(format!(
                "{flag} {name}: dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        match view.shape() {
            &[rows, cols] if rows == g * d && cols > 0 && hidden.is_none_or(|n| n == cols) => {}
            found => {
                let hidden = hidden.map_or_else(|| "hidden".to_owned(), |n| n.to_string());
                return Err(Failure::input(format!(
                    "{flag} {name}: shape {found:?}, expected [kv_heads·head_dim = {}, {hidden}]",
                    g * d
                )));
            }
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let w_k = read("--k-proj", &args.k_proj, None)?;
    let hidden = w_k.len() / (g * d);
    let w_v = read("--v-proj", &args.v_proj, Some(hidden))?;
    Ok(Layer { heads: h, kv_heads: g, head_dim: d, hidden, w_k, w_v })
}

/// The thin SVD of the stacked `[W_K; W_V]`.
struct Factors {
    /// U Σ: [2·G·D, k], k = min(2·G·D, hidden).
    u_sigma: Mat<f64>,
    /// V: [hidden, k].
    v: Mat<f64>,
    /// σ², descending.
    energies: Vec<f64>,
}

impl Factors {
    fn of(layer: &Layer) -> Result<Factors, Failure> {
        let rows = layer.kv_heads * layer.head_dim;
        let w = Mat::<f64>::from_fn(2 * rows, layer.hidden, |i, j| {
            let (tensor, i) = if i < rows { (&layer.w_k, i) } else { (&layer.w_v, i - rows) };
            f64::from(tensor[i * layer.hidden + j])
        });
        let svd = w.thin_svd().map_err(|e| Failure {
            status: 1,
            message: format!("the SVD did not converge: {e:?}"),
        })?;
        let sigma = svd.S().column_vector();
        let energies: Vec<f64> = (0..sigma.nrows()).map(|i| sigma[i] * sigma[i]).collect();
        let u_sigma = Mat::from_fn(2 * rows, sigma.nrows(), |i, j| svd.U()[(i, j)] * sigma[j]);
        Ok(Factors { u_sigma, v: svd.V().to_owned(), energies })
    }

    /// The share of ‖W‖_F² the first `rank` singular values keep.
    fn energy(&self, rank: usize) -> f64 {
        let total: f64 = self.energies.iter().sum();
        if total == 0.0 { 1.0 } else { self.energies[..rank].iter().sum::<f64>() / total }
    }

    /// The relative Frobenius errors of the rank-`rank` K and V projections, without forming
    /// them: the thin SVD is exact, `W_K = Σ_r (UΣ)_K[:, r] v_rᵀ` over all k columns, so
    /// `W_K − Ŵ_K` is the sum over r >= R, and with orthonormal v_r
    /// `‖W_K − Ŵ_K‖² = Σ_{r>=R} ‖(UΣ)_K[:, r]‖²` (likewise for V).
    fn errors(&self, layer: &Layer, rank: usize) -> (f64, f64) {
        let rows = layer.kv_heads * layer.head_dim;
        let columns = self.u_sigma.ncols();
        let relative = |tensor: &[f32], first_row: usize| {
            let norm: f64 = tensor.iter().map(|&x| f64::from(x).powi(2)).sum();
            let lost: f64 = (first_row..first_row + rows)
                .flat_map(|i| (rank..columns).map(move |r| (i, r)))
                .map(|(i, r)| self.u_sigma[(i, r)].powi(2))
                .fold(0.0, |sum, x| sum + x); // +0 at full rank (an empty `sum` is -0)
            if norm == 0.0 { 0.0 } else { (lost / norm).sqrt() }
        };
        (relative(&layer.w_k, 0), relative(&layer.w_v, rows))
    }

    /// The MLA weights at `rank`, laid out as semantics.md §2 wants.
    fn truncate(&self, layer: &Layer, rank: usize) -> Converted {
        let (h, g, d) = (layer.heads, layer.kv_heads, layer.head_dim);
        let w_dkv = (0..rank)
            .flat_map(|r| (0..layer.hidden).map(move |j| (r, j)))
            .map(|(r, j)| self.v[(j, r)] as f32)
            .collect();
        // Query head h reads KV head h / (H / G): its D key rows, then (G·D rows on) its
        // value rows.
        let up = |first_row: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(h * d * rank);
            for head in 0..h {
                let kv = head / (h / g);
                for i in 0..d {
                    let row = first_row + kv * d + i;
                    out.extend((0..rank).map(|r| self.u_sigma[(row, r)] as f32));
                }
            }
            out
        };
        Converted { rank, w_dkv, w_uk: up(0), w_uv: up(g * d) }
    }
}

/// One rank's MLA weights.
struct Converted {
    rank: usize,
    /// [R, hidden].
    w_dkv: Vec<f32>,
    /// [H, D, R].
    w_uk: Vec<f32>,
    /// [H, D, R].
    w_uv: Vec<f32>,
}

impl Converted {
    /// The converted layer's spec: rope_dim 0, D = nope_dim = v_head_dim, the original's mask
    /// and scale (both default to 1/√D).
    fn spec(&self, layer: &Layer, mask: Mask, weights: &Path) -> AttentionSpec {
        let stem = weights.file_stem().map_or("mla".into(), |s| s.to_string_lossy());
        let (h, d) = (layer.heads, layer.head_dim);
        AttentionSpec::mla(h, self.rank, 0, d, d).mask(mask).named(stem)
    }
}

/// The attention outputs of the grouped layer and of the converted one on the same random
/// activations (hidden states of `CHECK_KEYS` tokens, `CHECK_QUERIES` queries per head):
/// relative Frobenius error and largest absolute difference. Both run on the reference.
fn output_error(
    layer: &Layer,
    converted: &Converted,
    spec: &AttentionSpec,
    mask: Mask,
) -> Result<(f64, f64), Failure> {
    let (h, g, d, n) = (layer.heads, layer.kv_heads, layer.head_dim, layer.hidden);
    let x = attngen::harness::uniform(7, CHECK_KEYS * n, -1.0, 1.0);
    let q = attngen::harness::uniform(11, CHECK_QUERIES * h * d, -1.0, 1.0);
    // Token t's projection: rows of `w` ([rows, n]) times x[t].
    let project = |w: &[f32], rows: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(CHECK_KEYS * rows);
        for t in 0..CHECK_KEYS {
            let x_t = &x[t * n..][..n];
            out.extend((0..rows).map(|r| {
                let dot: f64 = w[r * n..][..n]
                    .iter()
                    .zip(x_t)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                dot as f32
            }));
        }
        out
    };
    let shape = Shape::new(1, CHECK_QUERIES, CHECK_KEYS);
    let fail = |e: attngen::Error| Failure { status: 1, message: e.to_string() };
    let grouped = AttentionSpec::gqa(h, g, d).mask(mask);
    let (k, v) = (project(&layer.w_k, g * d), project(&layer.w_v, g * d));
    let mut want = vec![0.0; CHECK_QUERIES * h * d];
    Reference::new(&grouped)
        .map_err(fail)?
        .run(shape, &Inputs::grouped(&q, &k, &v), &mut want, None)
        .map_err(fail)?;
    let c_kv = project(&converted.w_dkv, converted.rank);
    let mut got = vec![0.0; want.len()];
    let inputs = Inputs::latent(&q, &c_kv, &[], &converted.w_uk, &converted.w_uv);
    Reference::new(spec).map_err(fail)?.run(shape, &inputs, &mut got, None).map_err(fail)?;
    let (mut diff, mut norm, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(&want) {
        let e = f64::from(a) - f64::from(b);
        diff += e * e;
        norm += f64::from(b) * f64::from(b);
        max_abs = max_abs.max(e.abs());
    }
    Ok(((diff / norm.max(f64::MIN_POSITIVE)).sqrt(), max_abs))
}

/// `MLA.safetensors` → `MLA-r64.safetensors`.
fn with_rank(path: &Path, rank: usize) -> PathBuf {
    let stem = path.file_stem().map_or("mla".into(), |s| s.to_string_lossy());
    let ext = path.extension().map_or("safetensors".into(), |e| e.to_string_lossy());
    path.with_file_name(format!("{stem}-r{rank}.{ext}"))
}

fn render(layer: &Layer, reports: &[RankReport]) -> String {
    let header = [
        "rank",
        "energy kept",
        "K error",
        "V error",
        "cache B/token",
        "vs GQA",
        "output error",
        "max |Δout|",
        "files",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.rank.to_string(),
                format!("{:.4}%", 100.0 * r.energy),
                format!("{:.2e}", r.k_error),
                format!("{:.2e}", r.v_error),
                format!("{} → {}", r.cache_bytes_before, r.cache_bytes_after),
                format!("{:.3}x", r.cache_bytes_after as f64 / r.cache_bytes_before as f64),
                format!("{:.2e}", r.output_error),
                format!("{:.2e}", r.output_max_abs),
                format!("{}, {}", r.weights.display(), r.spec.display()),
            ]
        })
        .collect();
    let right = [true, true, true, true, true, true, true, true, false];
    let mut text = table::render(&header, &right, &rows);
    text.push_str(&format!(
        "GQA {}→{} heads, head dim {}, hidden {}: [W_K; W_V] factored by a thin SVD; errors are relative Frobenius norms; the output error is attention on {CHECK_KEYS} random tokens and {CHECK_QUERIES} queries, float64 reference, both forms.\n",
        layer.heads, layer.kv_heads, layer.head_dim, layer.hidden
    ));
    text
}
