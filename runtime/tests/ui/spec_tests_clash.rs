// Two file names that make the same module name (see spec_tests_empty.rs for the path).
attngen::spec_tests!("../../../../runtime/tests/ui/spec_tests_clash");

fn main() {}
