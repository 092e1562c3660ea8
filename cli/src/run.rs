//! `attngen run`: one spec on tensors from a file, outputs written atomically.

use std::path::Path;

use attngen::{Jit, Kernel, Reference, Tensor};

use crate::{Backend, Failure, load_spec};
use crate::{outputs, tensors};

/// Runs `spec_path` on the tensors in `inputs_path` and writes `out` and `lse` to `out_path`.
pub fn run(
    spec_path: &Path,
    inputs_path: &Path,
    out_path: &Path,
    backend: Backend,
) -> Result<(), Failure> {
    outputs::check(&[("the spec", spec_path), ("--inputs", inputs_path)], &[("--out", out_path)])?;
    let spec = load_spec(spec_path)?;
    let bytes = std::fs::read(inputs_path)
        .map_err(|e| Failure::input(format!("{}: cannot read: {e}", inputs_path.display())))?;
    let loaded = tensors::load(&spec, &bytes)
        .map_err(|e| Failure::input(format!("{}: {e}", inputs_path.display())))?;
    let kernel: Box<dyn Kernel> = match backend {
        Backend::Interp => Box::new(Reference::new(&spec).map_err(Failure::input)?),
        Backend::Perturbed => {
            return Err(Failure::input("the perturbed backend is for `attngen check` tests only"));
        }
        Backend::Jit => {
            let jit = Jit::new().map_err(|e| Failure { status: 1, message: e.to_string() })?;
            Box::new(jit.compile(&spec).map_err(Failure::input)?)
        }
        Backend::Macro => Box::new(crate::bundled::default_kernel(&spec)?),
    };
    let shape = loaded.shape;
    let zeros = |t: Tensor| attngen::harness::zeros(&spec, shape, t).map_err(Failure::input);
    let (mut out, mut lse) = (zeros(Tensor::Out)?, zeros(Tensor::Lse)?);
    let mut inputs = attngen::harness::view(&spec, &loaded.tensors);
    if let Some(lens) = &loaded.kv_lens {
        inputs = inputs.with_kv_lens(lens);
    }
    kernel.run(shape, &inputs, &mut out, Some(&mut lse)).map_err(Failure::input)?;
    let encoded = tensors::encode(&[
        ("lse", Tensor::Lse.dims(&spec, shape), &lse),
        ("out", Tensor::Out.dims(&spec, shape), &out),
    ])
    .map_err(|e| Failure { status: 1, message: format!("cannot encode the outputs: {e}") })?;
    outputs::write_all(&[(out_path, &encoded)])
}
