//! Writes a random grouped layer's key and value projections for `attngen compress`:
//! `k_proj.weight` and `v_proj.weight`, [kv_heads·head_dim, hidden] F32, Hugging Face's layout.
//! Their singular values decay like a trained layer's (σ_t ∝ 0.98^t), so low ranks keep most
//! of the energy, as they do on real checkpoints.
//!
//! `cargo run --release -p attngen-cli --example random_layer -- LAYER.safetensors [KV_HEADS
//! HEAD_DIM HIDDEN]` (default 4 × 64, hidden 1024).

use safetensors::{Dtype, tensor::TensorView};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path =
        args.first().ok_or("usage: random_layer OUT.safetensors [KV_HEADS HEAD_DIM HIDDEN]")?;
    let size = |i: usize, default: usize| args.get(i).map_or(Ok(default), |a| a.parse());
    let (kv_heads, head_dim, hidden) = (size(1, 4)?, size(2, 64)?, size(3, 1024)?);
    let rows = 2 * kv_heads * head_dim;
    let inner = rows.min(hidden);
    // W = A · diag(0.98^t) · B over `inner` terms, A and B uniform in [-1, 1].
    let a = attngen::harness::uniform(1, rows * inner, -1.0, 1.0);
    let b = attngen::harness::uniform(2, inner * hidden, -1.0, 1.0);
    let scale = 1.0 / (inner as f32 * hidden as f32).sqrt();
    let mut w = vec![0.0f32; rows * hidden];
    for (i, w_row) in w.chunks_exact_mut(hidden).enumerate() {
        for t in 0..inner {
            let coefficient = a[i * inner + t] * 0.98f32.powi(t as i32) * scale;
            for (w, &b) in w_row.iter_mut().zip(&b[t * hidden..][..hidden]) {
                *w += coefficient * b;
            }
        }
    }
    let (k, v) = w.split_at(rows / 2 * hidden);
    let bytes = |w: &[f32]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (k, v) = (bytes(k), bytes(v));
    let shape = vec![rows / 2, hidden];
    let tensors = [
        ("k_proj.weight", TensorView::new(Dtype::F32, shape.clone(), &k)?),
        ("v_proj.weight", TensorView::new(Dtype::F32, shape, &v)?),
    ];
    std::fs::write(path, safetensors::serialize(tensors, None)?)?;
    println!("wrote {path}: k_proj.weight, v_proj.weight [{}, {hidden}]", rows / 2);
    Ok(())
}
