fn main() {
    let _ = attngen::spec!(q_heads = 4, kv_heads = 2);
}
