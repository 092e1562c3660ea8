//! The kernels compiled into this binary with `#[attngen::kernel]` (`--backend macro`): one
//! per spec file of the repository's `specs/`, plus the grouped decode spec of W4 and W7 (no
//! mask). Every standard workload's spec is among them.

use attngen::{AttentionSpec, Isa, Kernel, MacroKernel};

#[attngen::kernel(spec = "../specs/deepseek-v2-lite.toml")]
struct DeepSeekV2Lite;
#[attngen::kernel(spec = "../specs/deepseek-v2.toml")]
struct DeepSeekV2;
#[attngen::kernel(spec = "../specs/gemma2-9b.toml")]
struct Gemma2;
#[attngen::kernel(spec = "../specs/gqa-interleaved.toml")]
struct GqaInterleaved;
#[attngen::kernel(spec = "../specs/gqa-uneven.toml")]
struct GqaUneven;
#[attngen::kernel(spec = "../specs/llama3-8b.toml")]
struct Llama3;
#[attngen::kernel(spec = "../specs/mha.toml")]
struct Mha;
#[attngen::kernel(spec = "../specs/mistral-7b.toml")]
struct Mistral;
#[attngen::kernel(spec = "../specs/mqa.toml")]
struct Mqa;
/// W4 and W7: Llama-3-8B decode, no mask.
#[attngen::kernel(q_heads = 32, kv_heads = 8, head_dim = 128)]
struct Llama3Decode;

/// `with_isa` of every bundled kernel.
const BUNDLED: [fn(Isa) -> MacroKernel; 10] = [
    DeepSeekV2Lite::with_isa,
    DeepSeekV2::with_isa,
    Gemma2::with_isa,
    GqaInterleaved::with_isa,
    GqaUneven::with_isa,
    Llama3::with_isa,
    Mha::with_isa,
    Mistral::with_isa,
    Mqa::with_isa,
    Llama3Decode::with_isa,
];

/// The bundled kernel for `spec` (names aside) with `isa`'s functions, if the binary has one.
pub fn kernel(spec: &AttentionSpec, isa: Isa) -> Option<MacroKernel> {
    let unnamed = |s: &AttentionSpec| AttentionSpec { name: None, ..s.clone() };
    let wanted = unnamed(spec);
    BUNDLED.iter().map(|with_isa| with_isa(isa)).find(|k| unnamed(k.spec()) == wanted)
}

/// The bundled kernel for `spec` with the ISA `ATTNGEN_ISA` names, else the widest this CPU
/// has; a spec without one is bad input, with [`missing`]'s message.
pub fn default_kernel(spec: &AttentionSpec) -> Result<MacroKernel, crate::Failure> {
    let isa = Isa::from_env().map_err(crate::Failure::input)?.unwrap_or_else(Isa::detect);
    kernel(spec, isa).ok_or_else(|| crate::Failure::input(missing(spec)))
}

/// Why `--backend macro` cannot run `spec`: it lists what the binary has.
pub fn missing(spec: &AttentionSpec) -> String {
    let have: Vec<String> = BUNDLED
        .iter()
        .map(|with_isa| with_isa(Isa::Portable).spec().name.clone().unwrap_or_default())
        .collect();
    format!(
        "`--backend macro` runs only the kernels compiled into attngen (the specs of specs/ and \
         the standard workloads); {} is not one of them. Bundled: {} and the unmasked Llama-3-8B decode spec of W4/W7. Use `--backend jit` for \
         any spec.",
        spec.summary(),
        have.join("; ")
    )
}
