//! `attngen validate`: every error of every spec file, located, or `ok`.

use std::path::PathBuf;

use std::fmt::Write as _;

use attngen::AttentionSpec;

use crate::{Failure, emit};

/// Prints `path: ok` or one `path:line:column: message` per error; fails (status 1) if any
/// spec is invalid, or (status 2) if a file cannot be read.
pub fn validate(paths: &[PathBuf]) -> Result<(), Failure> {
    let mut invalid = 0;
    let mut report = String::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::input(format!("{}: cannot read: {e}", path.display())))?;
        match AttentionSpec::from_toml(&text) {
            Ok(_) => writeln!(report, "{}: ok", path.display()).expect("String write"),
            Err(errors) => {
                invalid += 1;
                for e in &errors.errors {
                    writeln!(report, "{}:{}:{}: {}", path.display(), e.line, e.column, e.problem)
                        .expect("String write");
                }
            }
        }
    }
    emit(&report)?;
    match invalid {
        0 => Ok(()),
        n => Err(Failure { status: 1, message: format!("{n} of {} specs invalid", paths.len()) }),
    }
}
