//! `attngen check`: validate, compile and property-check every spec against the reference.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use attngen::harness::{self, Case, CheckConfig, Mismatch, Perturbed};
use attngen::{Error, Jit, Kernel, Reference};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::{Backend, Failure, emit, table};

/// What to check and how: `attngen check`'s arguments.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Spec files or directories (searched for *.toml).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The backend under test.
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    pub backend: Backend,
    /// Random cases per spec, at least 1 (a check of none would pass having checked nothing).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub cases: u32,
    /// Seed of the case generator (the same seed draws the same cases).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replay one case, B,Sq,Sk,INPUT_SEED, as printed by a failing check.
    #[arg(long, value_parser = crate::parse_case)]
    pub replay: Option<Case>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    spec: String,
    file: String,
    variant: String,
    compile_ms: Option<f64>,
    cases: u32,
    /// The longest key length the cases could draw (long decode cases included), or the
    /// replayed case's: how far the check reached.
    longest_seq_k: usize,
    max_abs: f64,
    max_rel: f64,
    verdict: &'static str,
    /// Why a spec is invalid, or the failing element.
    problem: Option<String>,
    /// The minimal failing case, as `--replay` takes it: `B,Sq,Sk,SEED[,ragged]`.
    failing_case: Option<String>,
    /// Its sizes and seed, for the text report.
    #[serde(skip)]
    failing: Option<Case>,
    replay: Option<String>,
}

/// Runs the checks, prints the report, and fails with 1 if any check failed, 2 on bad input.
pub fn check(args: CheckArgs) -> Result<(), Failure> {
    let mut files = crate::spec_files(&args.paths)?;
    files.sort();
    let jit = match args.backend {
        Backend::Jit | Backend::Perturbed => {
            Some(Jit::new().map_err(|e| Failure { status: 1, message: e.to_string() })?)
        }
        Backend::Interp | Backend::Macro => None,
    };
    let bar = progress(files.len());
    let mut rows = Vec::new();
    for file in &files {
        bar.set_message(file.display().to_string());
        rows.push(check_file(file, &args, jit.as_ref()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&rows).expect("plain data serialises"))
    } else {
        render(&rows, &args)
    };
    emit(&text)?;
    let invalid = rows.iter().filter(|r| r.verdict == "invalid").count();
    let failed = rows.iter().filter(|r| r.verdict == "FAIL").count();
    let unbundled = rows.iter().filter(|r| r.verdict == "not bundled").count();
    if unbundled > 0 && invalid == 0 && failed == 0 {
        return Err(Failure::input(format!(
            "{unbundled} of {} specs have no kernel compiled into attngen: `--backend macro` runs the bundled specs only",
            rows.len()
        )));
    }
    match (invalid, failed) {
        (0, 0) => Ok(()),
        (0, n) => {
            Err(Failure { status: 1, message: format!("{n} of {} specs failed", rows.len()) })
        }
        (n, _) => Err(Failure::input(format!("{n} of {} spec files are invalid", rows.len()))),
    }
}

/// A progress bar on stderr while it is a terminal and not under CI; hidden otherwise.
fn progress(len: usize) -> ProgressBar {
    let visible = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len as u64), target);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}") {
        bar.set_style(style);
    }
    bar
}

fn check_file(file: &Path, args: &CheckArgs, jit: Option<&Jit>) -> Row {
    let mut row = Row {
        spec: file.display().to_string(),
        file: file.display().to_string(),
        variant: String::new(),
        compile_ms: None,
        cases: 0,
        longest_seq_k: 0,
        max_abs: 0.0,
        max_rel: 0.0,
        verdict: "ok",
        problem: None,
        failing_case: None,
        failing: None,
        replay: None,
    };
    let spec = match crate::load_spec(file) {
        Ok(spec) => spec,
        Err(failure) => {
            row.verdict = "invalid";
            row.problem = Some(failure.message);
            return row;
        }
    };
    row.spec = spec.name.clone().unwrap_or_else(|| row.file.clone());
    row.variant = spec.summary();
    // Compile time as measured when the kernel was built (a spec equal to an earlier one is a
    // cache hit and reports the original compile).
    let ms = |k: &attngen::JitKernel| k.compile_time().as_secs_f64() * 1e3;
    let kernel: Result<Box<dyn Kernel>, Error> = match (args.backend, jit) {
        (Backend::Jit, Some(jit)) => jit.compile(&spec).map(|k| {
            row.compile_ms = Some(ms(&k));
            Box::new(k) as Box<dyn Kernel>
        }),
        (Backend::Perturbed, Some(jit)) => jit.compile(&spec).map(|k| {
            row.compile_ms = Some(ms(&k));
            Box::new(Perturbed(Box::new(k))) as Box<dyn Kernel>
        }),
        (Backend::Macro, _) => match crate::bundled::default_kernel(&spec) {
            Ok(kernel) => Ok(Box::new(kernel) as Box<dyn Kernel>),
            Err(failure) => {
                row.verdict = "not bundled";
                row.problem = Some(failure.message);
                return row;
            }
        },
        _ => Reference::new(&spec).map(|k| Box::new(k) as Box<dyn Kernel>),
    };
    let kernel = match kernel {
        Ok(kernel) => kernel,
        Err(e) => {
            row.verdict = "FAIL";
            row.problem = Some(e.to_string());
            return row;
        }
    };
    // The case that failed (if any) and what went wrong with it.
    let outcome: Result<Option<(Case, Mismatch)>, Error> = match args.replay {
        Some(case) => {
            row.cases = 1;
            row.longest_seq_k = case.shape.seq_k;
            harness::run_case(kernel.as_ref(), case).map(|result| {
                (row.max_abs, row.max_rel) = (result.max_abs, result.max_rel);
                result.mismatch.map(|m| (case, m))
            })
        }
        None => {
            let config = CheckConfig::sized_for(&spec, args.cases, args.seed);
            row.cases = args.cases;
            let long_prefill_keys = config.long_prefill.map_or(0, |long| long.seq_k.1);
            row.longest_seq_k = config.max_seq_k.max(config.max_long_seq_k).max(long_prefill_keys);
            harness::check(kernel.as_ref(), &config).map(|report| {
                (row.max_abs, row.max_rel) = (report.max_abs, report.max_rel);
                report.failure
            })
        }
    };
    match outcome {
        Ok(None) => {}
        Ok(Some((case, m))) => {
            row.verdict = "FAIL";
            row.problem =
                Some(format!("{}{:?}: got {}, expected {}", m.tensor, m.index, m.got, m.expected));
            row.failing_case = Some(case.to_string());
            row.failing = Some(case);
            row.replay = Some(format!(
                "attngen check {} --backend {} --replay {case}",
                row.file,
                args.backend.name(),
            ));
        }
        Err(e) => {
            row.verdict = "FAIL";
            row.problem = Some(e.to_string());
        }
    }
    row
}

fn render(rows: &[Row], args: &CheckArgs) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.spec.clone(),
                r.variant.clone(),
                r.compile_ms.map_or_else(String::new, |ms| format!("{ms:.1}")),
                r.cases.to_string(),
                r.longest_seq_k.to_string(),
                format!("{:.1e}", r.max_abs),
                format!("{:.1e}", r.max_rel),
                r.verdict.to_owned(),
            ]
        })
        .collect();
    let mut text = table::render(
        &[
            "spec",
            "variant",
            "compile ms",
            "cases",
            "max Sk",
            "max abs err",
            "max rel err",
            "verdict",
        ],
        &[false, false, true, true, true, true, true, false],
        &cells,
    );
    text.push_str(&format!(
        "backend {}; each case: random B, Sq, Sk and inputs in [-1, 1] against the float64 reference, \
         |x - ref| <= 1e-4 + 1e-4·|ref| (semantics.md §4); seed {}\n\
         a quarter of the cases are long decode (B <= 2, Sq <= 2, Sk >= {}, split across threads) \
         where the reference's budget allows: max Sk above {}; for grouped specs (and small expanded \
         MLA ones) a ninth are long prefill (B = 1, two query tiles, keys read in runs of shared \
         packed tiles)\n",
        args.backend.name(),
        args.seed,
        harness::LONG_DECODE_KEYS,
        CheckConfig::default().max_seq_k,
    ));
    for r in rows.iter().filter(|r| r.verdict != "ok") {
        text.push_str(&format!(
            "\n{} {}: {}\n",
            r.verdict,
            r.spec,
            r.problem.as_deref().unwrap_or("")
        ));
        if let Some(Case { shape, input_seed, ragged }) = r.failing {
            let lengths = if ragged { ", per-sequence key lengths" } else { "" };
            text.push_str(&format!(
                "  minimal case: B={} Sq={} Sk={}, input seed {input_seed}{lengths}\n",
                shape.batch, shape.seq_q, shape.seq_k
            ));
        }
        if let Some(replay) = &r.replay {
            text.push_str(&format!("  replay: {replay}\n"));
        }
    }
    text
}
