//! `attngen::spec_tests!` over the repository's specs and over this crate's folder of further
//! specs (every variant: uneven and interleaved maps, sliding windows, softcaps, odd head dims,
//! MLA with and without RoPE): each file's macro kernel and JIT kernel against the reference.

mod repository {
    attngen::spec_tests!("../specs");
}

mod variants {
    attngen::spec_tests!("specs");
}
