#[attngen::kernel(qheads = 4, head_dim = 8)]
struct Misspelt;

fn main() {}
