//! The kernels compiled into this binary with `#[attngen::kernel]` (`--backend macro`): one
//! per spec file of the repository's `specs/`, plus the grouped decode spec of W4 and W7 (no
//! mask). Every standard workload's spec is among them.

use attngen::{AttentionSpec, Isa, Kernel, MacroKernel};

#[attngen::kernel(spec = "../specs/deepseek-v2-lite.toml")]
struct DeepSeekV2Lite;
#[attngen::kernel(spec = "../specs/deepseek-v2-lite-combined.toml")]
struct DeepSeekV2LiteCombined;
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

/// Every bundled kernel: its process-wide instance (for its spec) and `with_isa`.
type Bundled = (fn() -> &'static MacroKernel, fn(Isa) -> MacroKernel);

const BUNDLED: [Bundled; 11] = [
    (DeepSeekV2Lite::compiled, DeepSeekV2Lite::with_isa),
    (DeepSeekV2LiteCombined::compiled, DeepSeekV2LiteCombined::with_isa),
    (DeepSeekV2::compiled, DeepSeekV2::with_isa),
    (Gemma2::compiled, Gemma2::with_isa),
    (GqaInterleaved::compiled, GqaInterleaved::with_isa),
    (GqaUneven::compiled, GqaUneven::with_isa),
    (Llama3::compiled, Llama3::with_isa),
    (Mha::compiled, Mha::with_isa),
    (Mistral::compiled, Mistral::with_isa),
    (Mqa::compiled, Mqa::with_isa),
    (Llama3Decode::compiled, Llama3Decode::with_isa),
];

/// The bundled kernel for `spec` (names aside) with `isa`'s functions, if the binary has one.
pub fn kernel(spec: &AttentionSpec, isa: Isa) -> Option<MacroKernel> {
    let unnamed = |s: &AttentionSpec| AttentionSpec { name: None, ..s.clone() };
    let wanted = unnamed(spec);
    let found = BUNDLED.iter().find(|(compiled, _)| unnamed(compiled().spec()) == wanted);
    found.map(|(_, with_isa)| with_isa(isa))
}

/// The bundled kernel for `spec` with the ISA `ATTNGEN_ISA` names, else the widest this CPU
/// has; a spec without one is bad input, with [`missing`]'s message.
pub fn default_kernel(spec: &AttentionSpec) -> Result<MacroKernel, crate::Failure> {
    let isa = Isa::from_env().map_err(crate::Failure::input)?.unwrap_or_else(Isa::detect);
    kernel(spec, isa).ok_or_else(|| crate::Failure::input(missing(spec)))
}

/// Why `--backend macro` cannot run `spec`: it lists what the binary has.
pub fn missing(spec: &AttentionSpec) -> String {
    let have: Vec<String> =
        BUNDLED.iter().filter_map(|(compiled, _)| compiled().spec().name.clone()).collect();
    format!(
        "`--backend macro` runs only the kernels compiled into attngen (the specs of specs/ and \
         the standard workloads); {} is not one of them. Bundled: {} and the unmasked Llama-3-8B \
         decode spec of W4/W7. Use `--backend jit` for any spec.",
        spec.summary(),
        have.join("; ")
    )
}
