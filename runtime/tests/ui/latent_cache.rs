fn main() {
    let _ = attngen::spec!(q_heads = 2, v_head_dim = 4, latent = { rank = 8, rope_dim = 2, nope_dim = 4, cache = "merged" });
}
