//! Every kind of spec as an attribute kernel, each run on a few shapes and compared with
//! attngen's reference interpreter (semantics.md §4: `|x − ref| <= 1e-4 + 1e-4·|ref|`),
//! including a NaN key hidden behind the causal mask. Exits 1 on the first disagreement.

use attngen::{AttentionSpec, Inputs, Kernel, KvLayout, LatentCache, Reference, Shape, Tensor};

/// Llama-3-8B: GQA 32/8, causal.
#[attngen::kernel(q_heads = 32, kv_heads = 8, head_dim = 128, mask = "causal")]
pub struct Llama3;

/// MHA, no mask.
#[attngen::kernel(q_heads = 4, head_dim = 64)]
pub struct Mha;

/// MQA under a sliding window.
#[attngen::kernel(q_heads = 8, kv_heads = 1, head_dim = 96, mask = { sliding_window = 33 })]
pub struct MqaWindow;

/// Uneven groups (2, 1 and 3 query heads), odd head dims.
#[attngen::kernel(
    q_heads = 6,
    kv_heads = 3,
    head_dim = 40,
    v_head_dim = 24,
    group_map = [0, 2, 1, 2, 0, 2],
    mask = "causal"
)]
pub struct Uneven;

/// Interleaved groups with an explicit scale.
#[attngen::kernel(q_heads = 8, kv_heads = 2, head_dim = 32, group_map = "interleaved", scale = 0.2)]
pub struct Interleaved;

/// Gemma-2-9B from its spec file: GQA 16/8, head_dim 256, softcap 50.
#[attngen::kernel(spec = "specs/gemma2-9b.toml")]
pub struct Gemma2;

/// DeepSeek-V2-Lite: MLA with a RoPE part.
#[attngen::kernel(
    q_heads = 16,
    v_head_dim = 128,
    mask = "causal",
    latent = { rank = 512, rope_dim = 64, nope_dim = 128 }
)]
pub struct DeepSeekV2Lite;

/// DeepSeek-V2-Lite on its cache as inference engines keep it: one `[c_kv | k_rope]` row per
/// token.
#[attngen::kernel(
    q_heads = 16,
    v_head_dim = 128,
    mask = "causal",
    latent = { rank = 512, rope_dim = 64, nope_dim = 128, cache = "combined" }
)]
pub struct DeepSeekV2LiteCombined;

/// MLA without RoPE (a converted grouped layer).
#[attngen::kernel(q_heads = 4, v_head_dim = 32, latent = { rank = 48, rope_dim = 0, nope_dim = 32 })]
pub struct MlaNoRope;

/// Values in [−1, 1) from a seed (a 64-bit LCG's high bits).
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The spec's input tensors for `shape`, random.
fn inputs(spec: &AttentionSpec, shape: Shape, seed: u64) -> Vec<Vec<f32>> {
    Tensor::inputs(spec)
        .iter()
        .enumerate()
        .map(|(i, t)| values(seed + i as u64, t.len(spec, shape).expect("small shapes")))
        .collect()
}

fn view<'a>(spec: &AttentionSpec, tensors: &'a [Vec<f32>]) -> Inputs<'a> {
    match spec.kv {
        KvLayout::Grouped { .. } => Inputs::grouped(&tensors[0], &tensors[1], &tensors[2]),
        KvLayout::Latent(l) if l.cache == LatentCache::Combined => {
            Inputs::latent_combined(&tensors[0], &tensors[1], &tensors[2], &tensors[3])
        }
        KvLayout::Latent(_) => {
            Inputs::latent(&tensors[0], &tensors[1], &tensors[2], &tensors[3], &tensors[4])
        }
    }
}

/// `out` and `lse` of one call.
fn run(
    kernel: &dyn Kernel,
    shape: Shape,
    inputs: &Inputs<'_>,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let spec = kernel.spec();
    let mut out = vec![0.0; Tensor::Out.len(spec, shape).map_err(|e| e.to_string())?];
    let mut lse = vec![0.0; Tensor::Lse.len(spec, shape).map_err(|e| e.to_string())?];
    kernel.run(shape, inputs, &mut out, Some(&mut lse)).map_err(|e| e.to_string())?;
    Ok((out, lse))
}

/// Whether `got` agrees with `want` within semantics.md §4 (NaN matches NaN).
fn agrees(got: &[f32], want: &[f32]) -> Option<usize> {
    got.iter().zip(want).position(|(&g, &w)| {
        let (g, w) = (f64::from(g), f64::from(w));
        let same = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= 1e-4 + 1e-4 * w.abs();
        !same
    })
}

/// The kernel against the reference on `shape`, with key 0 of every sequence set to NaN when
/// `nan_key` (a causal kernel's query rows past the first then see it, and only row 0 of a
/// sliding window past it does not).
fn check(name: &str, kernel: &dyn Kernel, shape: Shape, nan_key: bool) -> Result<(), String> {
    let spec = kernel.spec();
    let mut tensors = inputs(spec, shape, 11);
    if nan_key {
        // The last key of each sequence: with a causal mask and Sq = Sk only the last query
        // sees it, so every other row must stay finite.
        let width = tensors[1].len() / (shape.batch * shape.seq_k);
        for b in 0..shape.batch {
            let row = (b * shape.seq_k + shape.seq_k - 1) * width;
            tensors[1][row..row + width].fill(f32::NAN);
        }
    }
    let reference = Reference::new(spec).map_err(|e| e.to_string())?;
    let (want_out, want_lse) = run(&reference, shape, &view(spec, &tensors))?;
    let (out, lse) = run(kernel, shape, &view(spec, &tensors))?;
    for (tensor, got, want) in [("out", &out, &want_out), ("lse", &lse, &want_lse)] {
        if let Some(i) = agrees(got, want) {
            return Err(format!(
                "{name} {shape:?}: {tensor}[{i}] = {}, reference {}",
                got[i], want[i]
            ));
        }
    }
    if nan_key {
        let finite = out.iter().filter(|x| x.is_finite()).count();
        let nan = out.iter().filter(|x| x.is_nan()).count();
        if finite == 0 || nan == 0 {
            return Err(format!("{name}: a masked NaN key leaked ({nan} NaN, {finite} finite)"));
        }
    }
    Ok(())
}

fn main() {
    let kernels: [(&str, &dyn Kernel); 9] = [
        ("Llama3", &Llama3),
        ("Mha", &Mha),
        ("MqaWindow", &MqaWindow),
        ("Uneven", &Uneven),
        ("Interleaved", &Interleaved),
        ("Gemma2", &Gemma2),
        ("DeepSeekV2Lite", &DeepSeekV2Lite),
        ("DeepSeekV2LiteCombined", &DeepSeekV2LiteCombined),
        ("MlaNoRope", &MlaNoRope),
    ];
    let shapes =
        [Shape::new(1, 1, 1), Shape::new(2, 1, 700), Shape::new(1, 37, 37), Shape::new(2, 70, 130)];
    let mut failed = false;
    for (name, kernel) in kernels {
        let masked = kernel.spec().mask != attngen::Mask::None;
        for shape in shapes {
            if let Err(e) = check(name, kernel, shape, false) {
                eprintln!("FAIL {e}");
                failed = true;
            }
        }
        if masked && let Err(e) = check(name, kernel, Shape::new(2, 40, 40), true) {
            eprintln!("FAIL {e}");
            failed = true;
        }
        println!("ok {name}: {}", kernel.spec().summary());
    }
    if failed {
        std::process::exit(1);
    }
    println!("every kernel agrees with the reference");
}
