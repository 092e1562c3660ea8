fn main() {
    let _ = attngen::spec!(q_heads = 16, v_head_dim = 128, latent = { rank = 0, rope_dim = 64, nope_dim = 128 });
}
