fn main() {
    let _ = attngen::spec!(q_heads = 4, head_dim = 8, mask = "diagonal");
}
