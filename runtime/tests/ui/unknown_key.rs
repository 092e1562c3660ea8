fn main() {
    let _ = attngen::spec!(q_heads = 4, heads = 2, head_dim = 8);
}
