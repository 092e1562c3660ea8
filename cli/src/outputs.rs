//! The files a command writes: checked against its inputs and each other before any work, then
//! written all or nothing.

use std::path::{Path, PathBuf};

use crate::Failure;

/// A file a command reads or writes, with the flag (or words) that named it, for messages.
pub type Named<'a> = (&'a str, &'a Path);

/// Checks, before any work, that every output can be created and that none would replace an
/// input or another output: its name is a file name, its directory exists, it is not a
/// directory, and the directory entry it names (its directory resolved through `..` and
/// symbolic links) is neither another output's nor the file an input's path leads to. An
/// output that is itself a symbolic link is replaced as a link: the file it leads to is left
/// alone. A mistake is bad input (exit status 2) naming both flags.
///
/// # Errors
/// The first output that fails one of those checks.
pub fn check(inputs: &[Named], outputs: &[Named]) -> Result<(), Failure> {
    // (is an input, named file, resolved path) of every file checked so far.
    let mut seen: Vec<(bool, Named, PathBuf)> = Vec::new();
    for &(flag, path) in inputs {
        // An input that cannot be resolved was not read either, and its reader reports that.
        if let Ok(resolved) = std::fs::canonicalize(path) {
            seen.push((true, (flag, path), resolved));
        }
    }
    for &(flag, path) in outputs {
        let directory = parent(path);
        if path.file_name().is_none() || path.is_dir() {
            return Err(Failure::input(format!(
                "{flag} {}: is not a file name (a directory?); name the file to write",
                path.display()
            )));
        }
        if !directory.is_dir() {
            return Err(Failure::input(format!(
                "{flag} {}: no such directory {}",
                path.display(),
                directory.display()
            )));
        }
        let resolved = entry(path).ok_or_else(|| {
            Failure::input(format!("{flag} {}: cannot resolve its directory", path.display()))
        })?;
        if let Some((is_input, (other_flag, other), _)) = seen.iter().find(|s| s.2 == resolved) {
            let (path, other) = (path.display(), other.display());
            return Err(Failure::input(if *is_input {
                format!("{flag} {path}: would replace {other_flag} {other}; write it elsewhere")
            } else {
                format!("{flag} {path} and {other_flag} {other} are the same file")
            }));
        }
        seen.push((false, (flag, path), resolved));
    }
    Ok(())
}

/// Writes every `(path, bytes)` to a temporary file beside its destination, and only when all
/// are written renames them into place, so a failure (a full disk, say) leaves no destination
/// changed and no temporary behind. The renames, within one directory each, are what remain.
///
/// # Errors
/// The first file that could not be written, as a failure with exit status 1.
pub fn write_all(files: &[(&Path, &[u8])]) -> Result<(), Failure> {
    let mut staged = Staged(Vec::with_capacity(files.len()));
    for &(path, bytes) in files {
        let temp = temporary(path);
        // Pushed before writing, so a partial temporary is removed too.
        staged.0.push((temp.clone(), path));
        std::fs::write(&temp, bytes).map_err(|e| cannot_write(path, &e))?;
    }
    while !staged.0.is_empty() {
        // Taken out first: a failed rename's temporary is removed here, the rest on drop.
        let (temp, path) = staged.0.remove(0);
        std::fs::rename(&temp, path).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            cannot_write(path, &e)
        })?;
    }
    Ok(())
}

/// Temporaries not yet renamed, removed when dropped.
struct Staged<'a>(Vec<(PathBuf, &'a Path)>);

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        for (temp, _) in &self.0 {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// `dir/name` → `dir/.name.PID.tmp`: hidden, in the same directory (so the rename is atomic),
/// and distinct between processes.
fn temporary(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

fn cannot_write(path: &Path, error: &std::io::Error) -> Failure {
    Failure { status: 1, message: format!("{}: cannot write: {error}", path.display()) }
}

/// The directory a path's file lies in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The directory entry `path` names, absolute: its directory with every symbolic link
/// resolved, joined with its file name (itself not followed, as a rename does not).
fn entry(path: &Path) -> Option<PathBuf> {
    Some(std::fs::canonicalize(parent(path)).ok()?.join(path.file_name()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory, removed with everything in it when the test ends.
    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("attngen-outputs-{name}-")).tempdir().unwrap()
    }

    fn refusal(result: Result<(), Failure>) -> String {
        let failure = result.expect_err("should be refused");
        assert_eq!(failure.status, 2, "{}", failure.message);
        failure.message
    }

    #[test]
    fn an_output_may_not_replace_an_input_however_it_is_spelled() {
        let scratch_dir = scratch("input");
        let dir = scratch_dir.path();
        let input = dir.join("layer.safetensors");
        std::fs::write(&input, b"weights").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let inputs = [("--weights", input.as_path())];
        let roundabout = dir.join("sub").join("..").join("layer.safetensors");
        let message = refusal(check(&inputs, &[("--out", roundabout.as_path())]));
        assert!(message.starts_with("--out ") && message.contains("would replace --weights"));
        #[cfg(unix)]
        {
            // Reached through a link, the input is still the file the link leads to.
            let link = dir.join("link.safetensors");
            std::os::unix::fs::symlink(&input, &link).unwrap();
            let message = refusal(check(&[("--weights", link.as_path())], &[("--out", &input)]));
            assert!(message.contains("would replace --weights"), "{message}");
            // An output that is a link is replaced as a link, the input left whole.
            assert!(check(&inputs, &[("--out", link.as_path())]).is_ok());
            write_all(&[(link.as_path(), b"mla")]).unwrap();
            assert_eq!(std::fs::read(&input).unwrap(), b"weights");
            assert!(!link.is_symlink());
        }
        let other = dir.join("mla.safetensors");
        assert!(check(&inputs, &[("--out", other.as_path())]).is_ok());
    }

    #[test]
    fn two_outputs_may_not_be_one_file() {
        let scratch_dir = scratch("twice");
        let dir = scratch_dir.path();
        let (first, again) = (dir.join("mla.toml"), dir.join("sub").join("..").join("mla.toml"));
        std::fs::create_dir(dir.join("sub")).unwrap();
        let outputs = [("--out", first.as_path()), ("--spec-out", again.as_path())];
        let message = refusal(check(&[], &outputs));
        assert!(message.starts_with("--spec-out ") && message.contains(" and --out "), "{message}");
        assert!(message.ends_with("are the same file"), "{message}");
    }

    #[test]
    fn an_output_needs_an_existing_directory_and_a_file_name() {
        let scratch_dir = scratch("where");
        let dir = scratch_dir.path();
        let missing = dir.join("no-such-dir").join("mla.safetensors");
        assert!(refusal(check(&[], &[("--out", missing.as_path())])).contains("no such directory"));
        assert!(refusal(check(&[], &[("--out", dir)])).contains("is not a file name"));
        assert!(refusal(check(&[], &[("--out", Path::new(""))])).contains("is not a file name"));
    }

    #[test]
    fn a_failed_write_changes_no_destination_and_leaves_no_temporary() {
        let scratch_dir = scratch("all-or-nothing");
        let dir = scratch_dir.path();
        let first = dir.join("first.bin");
        std::fs::write(&first, b"old").unwrap();
        let unwritable = dir.join("no-such-dir").join("second.bin");
        let failure = write_all(&[(first.as_path(), b"new"), (unwritable.as_path(), b"x")])
            .expect_err("the second file cannot be written");
        assert_eq!(failure.status, 1);
        assert!(failure.message.contains("second.bin: cannot write"), "{}", failure.message);
        assert_eq!(std::fs::read(&first).unwrap(), b"old");
        let names: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["first.bin"]);
        write_all(&[(first.as_path(), b"new")]).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), b"new");
    }
}
