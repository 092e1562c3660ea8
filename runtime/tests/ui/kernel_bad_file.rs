// trybuild builds this file in target/tests/trybuild/attngen/, the CARGO_MANIFEST_DIR that
// `spec = ".."` is relative to: the path climbs back to the workspace.
#[attngen::kernel(spec = "../../../../runtime/tests/ui/kernel_bad_file.toml")]
struct Bad;

fn main() {}
