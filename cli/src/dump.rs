//! `attngen dump`: what the JIT generates for a spec, and why.

use std::path::Path;

use attngen::{Isa, Jit};

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
pub fn dump(path: &Path, sections: Sections) -> Result<(), Failure> {
    let Sections { plan, ir, clif, asm, rust } = sections;
    let spec = load_spec(path)?;
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
    if rust {
        section(
            "rust (what #[attngen::kernel] generates; `Kernel` stands for your struct)",
            &expansion(&spec),
        );
    }
    emit(&text)
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
