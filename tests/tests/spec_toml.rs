//! Spec files: random valid specs survive a TOML round trip unchanged, and the bundled specs
//! all load.

use attngen::AttentionSpec;
use attngen_tests::strategies::{self, Limits};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn toml_round_trip(spec in strategies::spec(Limits::FULL)) {
        let text = spec.to_toml();
        let back = AttentionSpec::from_toml(&text);
        prop_assert_eq!(back.as_ref(), Ok(&spec), "{}", text);
    }
}

#[test]
fn every_bundled_spec_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut count = 0;
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = AttentionSpec::from_toml(&text) {
                panic!("{}: {e}", path.display());
            }
            count += 1;
        }
    }
    assert!(count >= 15, "expected the bundled specs, found {count}");
}
