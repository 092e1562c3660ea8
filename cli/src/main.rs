//! `attngen`: run, plan and validate attention specs from the command line.

mod bench;
mod bundled;
mod check;
mod compress;
mod dump;
mod outputs;
mod peak;
mod plan;
mod roofline;
mod run;
mod table;
mod tensors;
mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use attngen::AttentionSpec;
use clap::{Parser, Subcommand, ValueEnum};

/// attngen compiles declarative attention specs (MHA, MQA, GQA, MLA) into fused CPU kernels.
///
/// A spec is a small TOML file describing one attention layer: head counts, how query heads
/// share keys and values, mask, scale and softcap. See specs/ for examples.
#[derive(Parser)]
#[command(name = "attngen", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a spec on tensors from a safetensors file and write `out` and `lse`.
    ///
    /// The inputs file holds the tensors of semantics.md §2 by name, all F32: q, k, v for grouped
    /// specs; q, c_kv, k_rope, w_uk, w_uv for latent (MLA) specs (with `cache = "combined"`, no
    /// k_rope: c_kv is [B, Sk, rank + rope_dim]). B, Sq and Sk are read from
    /// their shapes. The output file gets `out` [B, Sq, H, Dv] and `lse` [B, Sq, H]. Exit
    /// status 2, with the problem on stderr and no output file, for any bad spec, tensor name,
    /// dtype or shape.
    Run {
        /// The spec file.
        spec: PathBuf,
        /// Input tensors (safetensors, F32), named as the spec's inputs are, and optionally
        /// `kv_lens` ([B], I32 or I64): each sequence's key length.
        #[arg(long, value_name = "IN.safetensors")]
        inputs: PathBuf,
        /// Where to write `out` and `lse` (safetensors).
        #[arg(long, value_name = "OUT.safetensors")]
        out: PathBuf,
        /// Which backend computes the result.
        #[arg(long, value_enum, default_value_t = Backend::Interp)]
        backend: Backend,
    },
    /// Validate, compile and property-check specs against the float64 reference.
    ///
    /// For each spec (directories are searched for *.toml): compile it (reporting the time),
    /// run random cases — B, Sq, Sk and inputs in [-1, 1], drawn with the test suite's proptest
    /// strategies — comparing every element of out and lse with semantics.md §4's tolerance, and
    /// print one row with the largest errors and the verdict. A failure is shrunk to a minimal
    /// case, shown with the element that differs and the command that replays it. Exit status
    /// 1 when a check fails, 2 when a spec file is invalid or unreadable or a directory holds
    /// no spec.
    Check(check::CheckArgs),
    /// Compare specs: variant, KV-cache size per token and for a context, decode cost.
    ///
    /// All numbers are per layer. "vs MHA" is the cache relative to multi-head attention with
    /// the same query heads and head dims; "FLOP/byte" is decode arithmetic intensity, the
    /// decode FLOPs per byte of KV cache read.
    Plan {
        /// Spec files or directories (searched for *.toml).
        #[arg(required = true)]
        specs: Vec<PathBuf>,
        /// Context length (tokens in the KV cache) for the cache and decode columns, at most
        /// 2^32 (beyond it the counts would not be exact).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(..=1 << 32))]
        context: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show what the JIT generates for a spec: plan, tile IR, Cranelift IR, machine code.
    ///
    /// With no section flag, prints the plan and the IR.
    Dump {
        /// The spec file.
        spec: PathBuf,
        /// The kernel plan: form, tiles, head packing, mask handling, decode splits.
        #[arg(long)]
        plan: bool,
        /// The tile IR both backends lower.
        #[arg(long)]
        ir: bool,
        /// The Cranelift IR of the generated functions.
        #[arg(long)]
        clif: bool,
        /// The generated machine code, disassembled.
        #[arg(long)]
        asm: bool,
        /// The Rust `#[attngen::kernel(spec = "SPEC.toml")] struct Kernel;` expands to.
        #[arg(long)]
        rust: bool,
        /// A call's shape `B,Sq,Sk`, shown in the plan section (which it turns on): the call's
        /// schedule and, for latent specs, both MLA forms' FLOPs, bytes and estimated time, and
        /// the form the kernel picks for it.
        #[arg(long, value_parser = parse_shape)]
        shape: Option<attngen::Shape>,
    },
    /// Time backends on the standard workloads W1–W8 (or a spec and shape).
    ///
    /// Reports the median, min and max of repeated runs after a warm-up, GFLOP/s for prefill and
    /// GB/s for decode, and the fraction of the machine's peaks, which are measured at start-up
    /// (an FMA loop and a streaming read) unless given.
    Bench(bench::BenchArgs),
    /// Convert a grouped layer into multi-head latent attention: a joint low-rank factoring of
    /// its key and value projections.
    ///
    /// Reads W_K and W_V ([kv_heads·head_dim, hidden], F32, as Hugging Face checkpoints store
    /// k_proj and v_proj), factors [W_K; W_V] by a thin SVD, and per rank writes w_dkv [R,
    /// hidden], w_uk and w_uv [H, D, R] and a matching MLA spec (rope_dim 0). Reports per rank
    /// the singular-value energy kept, the K and V reconstruction errors, the KV-cache bytes
    /// per token before and after, and the attention output error on random activations. Exit
    /// status 2, writing nothing, for a missing tensor, a wrong shape or dtype, or a rank above
    /// min(hidden, 2·kv_heads·head_dim).
    Compress(compress::CompressArgs),
    /// Check spec files and print each one's errors as file:line:column, or `ok`.
    ///
    /// Exit status 1 if any spec is invalid, 2 if a file cannot be read or a directory holds no
    /// spec.
    Validate {
        /// Spec files or directories (searched for *.toml).
        #[arg(required = true)]
        specs: Vec<PathBuf>,
    },
}

/// A backend that computes a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The reference interpreter: float64, un-fused, slow, the oracle.
    Interp,
    /// The Cranelift JIT: a fused kernel compiled for this spec and this CPU.
    Jit,
    /// A kernel compiled into this binary by `#[attngen::kernel]`: the specs of specs/ and the
    /// standard workloads only (any other spec is refused, naming what is bundled).
    Macro,
    /// Test only: the JIT with one output element perturbed, to exercise failure reports.
    #[value(hide = true)]
    Perturbed,
}

impl Backend {
    /// The name on the command line.
    fn name(self) -> &'static str {
        match self {
            Backend::Interp => "interp",
            Backend::Jit => "jit",
            Backend::Macro => "macro",
            Backend::Perturbed => "perturbed",
        }
    }
}

/// Why a command failed, and with which exit status.
#[derive(Debug)]
pub struct Failure {
    /// 1: the command ran and found a problem; 2: bad input (spec, tensors, file).
    pub status: u8,
    /// What to print on stderr.
    pub message: String,
}

impl Failure {
    /// Bad input: exit status 2.
    pub fn input(message: impl std::fmt::Display) -> Self {
        Failure { status: 2, message: message.to_string() }
    }
}

/// The spec files `paths` name, in their order: a file as given, a directory as the `*.toml`
/// files under it (searched recursively, sorted). A path that does not exist, or a directory
/// holding no spec file, is bad input — never a command that succeeds having read nothing.
pub fn spec_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            if !path.exists() {
                let path = path.display();
                return Err(Failure::input(format!("{path}: no such file or directory")));
            }
            files.push(path.clone());
            continue;
        }
        let mut found = Vec::new();
        let mut pending = vec![path.clone()];
        while let Some(dir) = pending.pop() {
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| Failure::input(format!("{}: cannot read: {e}", dir.display())))?;
            for entry in entries {
                let entry = entry.map_err(|e| Failure::input(format!("{}: {e}", dir.display())))?;
                let child = entry.path();
                if child.is_dir() {
                    pending.push(child);
                } else if child.extension().is_some_and(|e| e == "toml") {
                    found.push(child);
                }
            }
        }
        if found.is_empty() {
            let path = path.display();
            return Err(Failure::input(format!("{path}: no spec files (*.toml) in it")));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// The first item of a list given on the command line that an earlier one repeats
/// (`--rank 64,64`, `--isa avx2,avx2`): refused by the commands, which would otherwise do the
/// same work twice or write one file twice.
pub fn first_repeat<T: PartialEq>(items: &[T]) -> Option<&T> {
    items.iter().enumerate().find(|(i, item)| items[..*i].contains(item)).map(|(_, item)| item)
}

/// Parses `B,Sq,Sk`.
pub fn parse_shape(text: &str) -> Result<attngen::Shape, String> {
    let dims: Vec<usize> = text
        .split(',')
        .map(|d| d.trim().parse().map_err(|e| format!("`{d}` is not a size ({e})")))
        .collect::<Result<_, _>>()?;
    match dims[..] {
        [b, sq, sk] => Ok(attngen::Shape::new(b, sq, sk)),
        _ => Err(format!("expected B,Sq,Sk, got `{text}`")),
    }
}

/// Parses `B,Sq,Sk,INPUT_SEED` or `B,Sq,Sk,INPUT_SEED,ragged` (the form `check` prints).
pub fn parse_case(text: &str) -> Result<attngen::harness::Case, String> {
    text.parse()
}

/// Writes a command's report to stdout. A closed pipe (`attngen plan ... | head`) ends the
/// output quietly instead of panicking.
pub fn emit(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure { status: 1, message: format!("cannot write to stdout: {e}") })
        }
        _ => Ok(()),
    }
}

/// Reads and parses a spec file; a read or spec error is bad input.
pub fn load_spec(path: &Path) -> Result<AttentionSpec, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("{}: cannot read: {e}", path.display())))?;
    AttentionSpec::from_toml(&text).map_err(|errors| {
        let lines: Vec<String> = errors
            .errors
            .iter()
            .map(|e| format!("{}:{}:{}: {}", path.display(), e.line, e.column, e.problem))
            .collect();
        Failure::input(lines.join("\n"))
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { spec, inputs, out, backend } => run::run(&spec, &inputs, &out, backend),
        Command::Plan { specs, context, json } => {
            spec_files(&specs).and_then(|files| plan::plan(&files, context, json))
        }
        Command::Check(args) => check::check(args),
        Command::Dump { spec, plan, ir, clif, asm, rust, shape } => {
            dump::dump(&spec, dump::Sections { plan, ir, clif, asm, rust }, shape)
        }
        Command::Validate { specs } => {
            spec_files(&specs).and_then(|files| validate::validate(&files))
        }
        Command::Bench(args) => bench::bench(args),
        Command::Compress(args) => compress::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("attngen: {}", failure.message.replace('\n', "\nattngen: "));
            }
            ExitCode::from(failure.status)
        }
    }
}
