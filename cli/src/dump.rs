//! `attngen dump`: what the JIT generates for a spec, and why.

use std::path::Path;

use attngen::{Isa, Jit};

use crate::{Failure, emit, load_spec};

/// Prints the requested sections (plan and IR when none is requested).
pub fn dump(path: &Path, plan: bool, ir: bool, clif: bool, asm: bool) -> Result<(), Failure> {
    let spec = load_spec(path)?;
    let jit = Jit::new().map_err(|e| Failure { status: 1, message: e.to_string() })?;
    let listing = jit.dump(&spec).map_err(|e| Failure { status: 1, message: e.to_string() })?;
    let (plan, ir) = if plan || ir || clif || asm { (plan, ir) } else { (true, true) };
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
        section("plan", &(listing.plan.trim_end().to_owned() + &line));
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
    emit(&text)
}
