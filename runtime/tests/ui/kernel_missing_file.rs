#[attngen::kernel(spec = "tests/ui/no-such-spec.toml")]
struct Missing;

fn main() {}
