//! `attngen::spec!` and `#[attngen::kernel]`: valid specs expand to the same value the builders
//! make; each kind of mistake — a rule of `validate`, an unknown key (with the closest valid
//! one), a missing or invalid spec file, the attribute on a struct with fields, `spec_tests!`
//! on a folder with no spec or with two files that name one module — is a compile error at the
//! offending argument with attngen's message (the .stderr files beside the cases are the
//! documentation of those messages).

use attngen::{AttentionSpec, GroupMap, LatentCache, Mask};

#[test]
fn valid_specs_expand_to_their_builder_values() {
    let llama = attngen::spec!(
        name = "llama3-8b",
        q_heads = 32,
        kv_heads = 8,
        head_dim = 128,
        mask = "causal"
    );
    assert_eq!(llama, AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal).named("llama3-8b"));
    let uneven = attngen::spec!(
        q_heads = 5,
        kv_heads = 3,
        head_dim = 8,
        group_map = [2, 0, 0, 1, 2],
        mask = { sliding_window = 16 },
        scale = 0.25,
        softcap = 50,
    );
    let expected = AttentionSpec::gqa(5, 3, 8)
        .group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2]))
        .mask(Mask::SlidingWindow(16))
        .scale(0.25)
        .softcap(50.0);
    assert_eq!(uneven, expected);
    let lite = attngen::spec!(q_heads = 16, v_head_dim = 128, latent = { rank = 512, rope_dim = 64, nope_dim = 128 });
    assert_eq!(lite, AttentionSpec::mla(16, 512, 64, 128, 128));
    let one_cache = attngen::spec!(
        q_heads = 16,
        v_head_dim = 128,
        latent = { rank = 512, rope_dim = 64, nope_dim = 128, cache = "combined" }
    );
    let expected = AttentionSpec::mla(16, 512, 64, 128, 128).latent_cache(LatentCache::Combined);
    assert_eq!(one_cache, expected);
}

#[test]
fn mistakes_are_compile_errors_at_the_argument() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
