#[attngen::kernel(q_heads = 30, kv_heads = 8, head_dim = 128, mask = "causal")]
struct Uneven;

fn main() {}
