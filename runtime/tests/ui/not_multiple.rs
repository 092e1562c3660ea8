fn main() {
    let _ = attngen::spec!(q_heads = 30, kv_heads = 8, head_dim = 128);
}
