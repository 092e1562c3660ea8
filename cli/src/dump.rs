//! `attngen dump`: what the JIT generates for a spec, and why.

use std::path::Path;

use attngen::cost::{self, FormCost};
use attngen::{Isa, Jit, JitKernel, Shape, Tensor};

use crate::{Failure, emit, load_spec};

/// The sections `dump` prints.
pub struct Sections {
    /// The plan.
    pub plan: bool,
    /// The tile IR.
    pub ir: bool,
    /// The Cranelift IR.
    pub clif: bool,
    /// The JIT's machine code.
    pub asm: bool,
    /// The attribute macro's expansion.
    pub rust: bool,
}

/// Prints the requested sections (plan and IR when none is requested).
pub fn dump(path: &Path, sections: Sections, shape: Option<Shape>) -> Result<(), Failure> {
    let Sections { plan, ir, clif, asm, rust } = sections;
    // A shape is a question about the plan: it brings the plan section with it.
    let plan = plan || shape.is_some();
    let spec = load_spec(path)?;
    if let Some(shape) = shape {
        // A call no tensor of which could exist has no plan worth printing: its counts would
        // saturate. Refused as `run` would refuse it.
        for tensor in Tensor::inputs(&spec).iter().chain(&[Tensor::Out, Tensor::Lse]) {
            tensor.len(&spec, shape).map_err(|e| Failure::input(format!("--shape: {e}")))?;
        }
    }
    let jit = Jit::new().map_err(|e| Failure { status: 1, message: e.to_string() })?;
    let listing = jit.dump(&spec).map_err(|e| Failure { status: 1, message: e.to_string() })?;
    let (plan, ir) = if plan || ir || clif || asm || rust { (plan, ir) } else { (true, true) };
    let mut text = String::new();
    let mut section = |title: &str, body: &str| {
        text.push_str(&format!("== {title}\n{}\n", body.trim_end()));
    };
    if plan {
        let have: Vec<&str> = Isa::available().into_iter().map(Isa::name).collect();
        let why = match Isa::from_env() {
            Ok(Some(_)) => "forced by ATTNGEN_ISA".to_owned(),
            _ => format!("the widest this CPU has ({})", have.join(", ")),
        };
        let isa = listing.isa;
        let line = format!("\n  micro-kernels {isa}: {} f32 lanes per vector; {why}", isa.lanes());
        let mut plan = listing.plan.trim_end().to_owned() + &line;
        if let Some(shape) = shape {
            let kernel =
                jit.compile(&spec).map_err(|e| Failure { status: 1, message: e.to_string() })?;
            plan.push_str(&call_plan(&kernel, shape, listing.isa));
        }
        section("plan", &plan);
    }
    if ir {
        section("ir", &listing.ir);
    }
    if clif || asm {
        let title = format!("pre-compiled routines called (for this CPU: {})", listing.isa.name());
        section(&title, &listing.routines);
    }
    if clif {
        section("clif", &listing.clif);
    }
    if asm {
        section("asm", &listing.asm);
    }
    if rust {
        section(
            "rust (what #[attngen::kernel] generates; `Kernel` stands for your struct)",
            &expansion(&spec),
        );
    }
    emit(&text)
}

/// What a call of `shape` does: its form (and for latent specs why), and its schedule.
fn call_plan(kernel: &JitKernel, shape: Shape, isa: Isa) -> String {
    let form = kernel.form_for(shape);
    let (b, q, k) = (shape.batch, shape.seq_q, shape.seq_k);
    let mut text = format!("\n\ncall B = {b}, Sq = {q}, Sk = {k}: {} form", form.name());
    if let Some(costs) = kernel.form_costs(shape) {
        let forced = kernel.plans().count() == 1;
        text.push_str(if forced { " (forced by the spec)" } else { " (the cost model's choice)" });
        let row = |name: &str, cost: FormCost| {
            format!(
                "\n  {name:<9} {:>9.3} GFLOP  {:>9.3} MB  est. {:>9.3} ms",
                cost.flops as f64 / 1e9,
                cost.bytes as f64 / 1e6,
                cost.seconds * 1e3
            )
        };
        text.push_str(&row("absorbed", costs.absorbed));
        text.push_str(&row("expanded", costs.expanded));
        text.push_str(&format!(
            "\n  estimates: the larger of FLOPs at {:.0}% (absorbed) or {:.0}% (expanded) of an estimated FMA peak and bytes at the read bandwidth (cost::Machine::estimate for {} lanes); {} is cheaper, {:.2}x",
            100.0 * cost::ABSORBED_EFFICIENCY,
            100.0 * cost::EXPANDED_EFFICIENCY,
            isa.lanes(),
            costs.choice(),
            costs.absorbed.seconds.max(costs.expanded.seconds)
                / costs.absorbed.seconds.min(costs.expanded.seconds)
        ));
    }
    let plan = kernel.plans().find(|plan| plan.form == form).unwrap_or(kernel.plan());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let s = plan.schedule(b, q, k, threads);
    let runs = match s.keys_per_run < s.keys_per_split {
        true => {
            format!(" in runs of {} (each tile's state carried from run to run)", s.keys_per_run)
        }
        false => String::new(),
    };
    let expanded = plan.form == attngen::Form::LatentExpanded;
    text.push_str(&format!(
        "\n  schedule on {}: {} per sequence, {} per item, {} of {}{runs}{}",
        counted(threads, "thread"),
        counted(s.q_tiles, "query tile"),
        counted(s.groups_per_item, "group"),
        counted(s.splits, "key split"),
        counted(s.keys_per_split.min(k), "key"),
        match (expanded, s.packs_call, s.divides_keys()) {
            (true, _, false) => ", each head's keys up-projected once for all its query tiles",
            (true, _, true) => ", each run's keys up-projected once for all its query tiles",
            (false, true, false) => ", each KV head's K/V packed once for all its query tiles",
            (false, true, true) => ", each run's K/V packed once for all its query tiles",
            (false, false, _) => "",
        }
    ));
    text
}

/// `n` and `noun`, plural unless `n` is 1: "1 key split", "2 key splits".
fn counted(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        _ => format!("{n} {noun}s"),
    }
}

/// `#[attngen::kernel]` on `pub struct Kernel;` for `spec`, formatted.
fn expansion(spec: &attngen::AttentionSpec) -> String {
    let name = proc_macro2::Ident::new("Kernel", proc_macro2::Span::call_site());
    let kernel = attngen_codegen::rust::kernel_tokens(&name, spec, None);
    let tokens = quote::quote!(pub struct #name; #kernel);
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}
