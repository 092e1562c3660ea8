//! Reading a call's input tensors from safetensors, and encoding its outputs.

use std::fmt;

use attngen::{AttentionSpec, Shape, Tensor};
use safetensors::{Dtype, SafeTensorError, SafeTensors, tensor::TensorView};

/// What is wrong with an inputs file, naming the tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// Not a safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Format(#[from] SafeTensorError),
    /// A tensor the spec needs is absent.
    #[error("tensor `{name}` is missing: expected shape {expected}")]
    Missing {
        /// The tensor.
        name: &'static str,
        /// Its expected shape.
        expected: Dims,
    },
    /// A tensor the spec does not read.
    #[error("unexpected tensor `{name}`: a {kind} spec reads {expected}")]
    Unexpected {
        /// The tensor's name in the file.
        name: String,
        /// `grouped`, `latent` or `combined-cache latent`.
        kind: &'static str,
        /// The names it reads.
        expected: String,
    },
    /// A tensor stored as something other than F32.
    #[error("tensor `{name}` has dtype {found:?}: expected F32")]
    Dtype {
        /// The tensor.
        name: &'static str,
        /// Its dtype in the file.
        found: Dtype,
    },
    /// `kv_lens` stored as something other than a 32- or 64-bit integer, or holding a negative
    /// length.
    #[error("tensor `kv_lens`: {0}")]
    KvLens(String),
    /// A tensor whose shape does not fit the spec and the other tensors.
    #[error("tensor `{name}`: expected shape {expected}, found {found}")]
    Shape {
        /// The tensor.
        name: &'static str,
        /// The expected shape.
        expected: Dims,
        /// Its shape in the file.
        found: Dims,
    },
}

/// A tensor shape for messages: known sizes as numbers, sizes still to be read as names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims(pub Vec<String>);

impl Dims {
    fn known(dims: &[usize]) -> Self {
        Dims(dims.iter().map(usize::to_string).collect())
    }
}

impl fmt::Display for Dims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.0.join(", "))
    }
}

/// Input tensors read from a file, with the call shape taken from their dims.
pub struct LoadedInputs {
    /// B, Sq, Sk.
    pub shape: Shape,
    /// Each input tensor of the spec with its values.
    pub tensors: Vec<(Tensor, Vec<f32>)>,
    /// Per-sequence key lengths, from an optional `kv_lens` tensor ([B], I32 or I64).
    pub kv_lens: Option<Vec<usize>>,
}

/// The optional tensor of per-sequence key lengths (`Inputs::with_kv_lens`).
pub const KV_LENS: &str = "kv_lens";

/// Reads and checks the inputs a spec needs: every name present and no other but an optional
/// `kv_lens`, F32, and shapes consistent with the spec and with one (B, Sq, Sk) taken from `q`
/// and `k`/`c_kv`; `kv_lens` is [B] of I32 or I64, each length at least 0 (the kernel checks
/// each against Sk).
pub fn load(spec: &AttentionSpec, bytes: &[u8]) -> Result<LoadedInputs, TensorError> {
    let file = SafeTensors::deserialize(bytes)?;
    let wanted = Tensor::inputs(spec);
    let kind = match (wanted.contains(&Tensor::K), wanted.contains(&Tensor::KRope)) {
        (true, _) => "grouped",
        (false, true) => "latent",
        (false, false) => "combined-cache latent",
    };
    let mut names = file.names();
    names.sort_unstable();
    let known = |name: &str| name == KV_LENS || wanted.iter().any(|t| t.name() == name);
    if let Some(extra) = names.iter().find(|n| !known(n)) {
        let expected = wanted.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
        let expected = format!("{expected} (and optionally {KV_LENS})");
        return Err(TensorError::Unexpected { name: extra.to_string(), kind, expected });
    }
    let symbolic = Shape::new(0, 0, 0);
    let view = |t: Tensor| -> Result<TensorView<'_>, TensorError> {
        let view = file.tensor(t.name()).map_err(|_| TensorError::Missing {
            name: t.name(),
            expected: with_symbols(t, &t.dims(spec, symbolic)),
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(TensorError::Dtype { name: t.name(), found: view.dtype() });
        }
        Ok(view)
    };
    // B and Sq come from q; Sk from the first per-token KV tensor.
    let q = view(Tensor::Q)?;
    let kv_tensor = if wanted.contains(&Tensor::K) { Tensor::K } else { Tensor::CKv };
    let kv = view(kv_tensor)?;
    let leading = |t: Tensor, v: &TensorView<'_>| -> Result<(usize, usize), TensorError> {
        let expected = t.dims(spec, symbolic);
        match v.shape() {
            [a, b, rest @ ..] if rest.len() + 2 == expected.len() => Ok((*a, *b)),
            found => Err(TensorError::Shape {
                name: t.name(),
                expected: with_symbols(t, &expected),
                found: Dims::known(found),
            }),
        }
    };
    let (batch, seq_q) = leading(Tensor::Q, &q)?;
    let (_, seq_k) = leading(kv_tensor, &kv)?;
    let shape = Shape::new(batch, seq_q, seq_k);
    let mut tensors = Vec::with_capacity(wanted.len());
    for &t in wanted {
        let v = view(t)?;
        let expected = t.dims(spec, shape);
        if v.shape() != expected.as_slice() {
            return Err(TensorError::Shape {
                name: t.name(),
                expected: Dims::known(&expected),
                found: Dims::known(v.shape()),
            });
        }
        let values = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.push((t, values));
    }
    let kv_lens = match file.tensor(KV_LENS) {
        Ok(view) => Some(kv_lens(&view, batch)?),
        Err(_) => None,
    };
    Ok(LoadedInputs { shape, tensors, kv_lens })
}

/// The lengths of a `kv_lens` tensor: [B] of I32 or I64, none negative.
fn kv_lens(view: &TensorView<'_>, batch: usize) -> Result<Vec<usize>, TensorError> {
    if view.shape() != [batch] {
        return Err(TensorError::Shape {
            name: KV_LENS,
            expected: Dims::known(&[batch]),
            found: Dims::known(view.shape()),
        });
    }
    let lengths: Vec<i64> = match view.dtype() {
        Dtype::I32 => view
            .data()
            .chunks_exact(4)
            .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
            .collect(),
        other => return Err(TensorError::KvLens(format!("dtype {other:?}: expected I32 or I64"))),
    };
    lengths
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            usize::try_from(len).map_err(|_| {
                TensorError::KvLens(format!("kv_lens[{b}] is {len}: lengths are >= 0"))
            })
        })
        .collect()
}

/// The expected dims with B, Sq and Sk written as names (they are read from the file).
fn with_symbols(t: Tensor, dims: &[usize]) -> Dims {
    let names: &[&str] = match t {
        Tensor::Q | Tensor::Out | Tensor::Lse => &["B", "Sq"],
        Tensor::K | Tensor::V | Tensor::CKv | Tensor::KRope => &["B", "Sk"],
        Tensor::WUk | Tensor::WUv => &[],
    };
    Dims(
        dims.iter()
            .enumerate()
            .map(|(i, d)| names.get(i).map_or_else(|| d.to_string(), |n| (*n).to_owned()))
            .collect(),
    )
}

/// `tensors` (name, shape, values) as a safetensors file's bytes.
///
/// # Errors
/// When a shape does not match its values' count.
pub fn encode(tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<Vec<u8>, SafeTensorError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, dims, _), data)| {
            Ok((*name, TensorView::new(Dtype::F32, dims.clone(), data)?))
        })
        .collect::<Result<Vec<_>, SafeTensorError>>()?;
    safetensors::serialize(views, None)
}
