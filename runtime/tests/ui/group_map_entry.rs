fn main() {
    let _ = attngen::spec!(q_heads = 4, kv_heads = 2, head_dim = 8, group_map = [0, 1, 1, 9]);
}
