#[attngen::kernel(q_heads = 4, head_dim = 8)]
struct WithFields {
    cache: Vec<f32>,
}

fn main() {}
