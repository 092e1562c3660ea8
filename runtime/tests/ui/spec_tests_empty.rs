// trybuild builds this file in target/tests/trybuild/attngen/, the CARGO_MANIFEST_DIR that
// the folder is relative to: the path climbs back to the workspace.
attngen::spec_tests!("../../../../runtime/tests/ui/spec_tests_empty");

fn main() {}
