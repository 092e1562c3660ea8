//! The `attngen` binary, driven as a user would: run on every kind of spec (checked against the
//! independent float64 formulation), every kind of bad input, plan and validate.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attngen::{AttentionSpec, GroupMap, Isa, LatentCache, Mask, Shape, Tensor};
use attngen_tests::strategies::OwnedInputs;
use attngen_tests::{first_mismatch, independent};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn attngen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attngen")).args(args).output().expect("binary runs")
}

/// `attngen run SPEC --inputs IN --out OUT [--backend B]`.
fn run_cli(spec: &Path, inputs: &Path, out: &Path, backend: Option<&str>) -> Output {
    let mut args = vec![
        "run",
        spec.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    if let Some(backend) = backend {
        args.extend(["--backend", backend]);
    }
    attngen(&args)
}

/// A fresh scratch directory for one test, removed with everything in it when the test ends
/// (passed or failed).
struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

fn scratch(test: &str) -> Scratch {
    Scratch(tempfile::Builder::new().prefix(&format!("attngen-cli-{test}-")).tempdir().unwrap())
}

fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, dims, data)| {
            (*name, TensorView::new(*dtype, dims.clone(), data).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes the spec and its random inputs into `dir`; returns (spec path, inputs path, inputs).
fn prepare(
    dir: &Path,
    spec: &AttentionSpec,
    shape: Shape,
    seed: u64,
) -> (PathBuf, PathBuf, OwnedInputs) {
    let spec_path = dir.join("spec.toml");
    std::fs::write(&spec_path, spec.to_toml()).unwrap();
    let inputs = OwnedInputs::random(spec, shape, seed, 1.0);
    let tensors: Vec<_> = inputs
        .tensors
        .iter()
        .map(|(t, data)| (t.name(), Dtype::F32, t.dims(spec, shape), f32_bytes(data)))
        .collect();
    let inputs_path = dir.join("in.safetensors");
    write_safetensors(&inputs_path, &tensors);
    (spec_path, inputs_path, inputs)
}

fn read_f32(file: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = file.tensor(name).unwrap();
    assert_eq!(view.dtype(), Dtype::F32);
    let values =
        view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (view.shape().to_vec(), values)
}

#[test]
fn run_interp_agrees_with_the_independent_formulation_on_every_kind_of_spec() {
    let specs = [
        AttentionSpec::mha(3, 8).mask(Mask::Causal),
        AttentionSpec::mqa(4, 5),
        AttentionSpec::gqa(6, 2, 7).group_map(GroupMap::Interleaved).mask(Mask::Causal),
        AttentionSpec::gqa(5, 3, 4)
            .group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2]))
            .v_head_dim(6),
        AttentionSpec::gqa(4, 2, 8).mask(Mask::SlidingWindow(3)),
        AttentionSpec::gqa(4, 2, 8).softcap(0.5).scale(2.0).mask(Mask::Causal),
        AttentionSpec::mla(3, 12, 4, 6, 5).mask(Mask::Causal),
        AttentionSpec::mla(2, 8, 0, 3, 4),
        AttentionSpec::mla(3, 12, 4, 6, 5).latent_cache(LatentCache::Combined),
    ];
    for (n, spec) in specs.iter().enumerate() {
        let dir = scratch(&format!("agree{n}"));
        // Sq > Sk on some specs, so some rows see no key.
        let shape = if n % 2 == 0 { Shape::new(2, 3, 7) } else { Shape::new(1, 6, 4) };
        let (spec_path, inputs_path, inputs) = prepare(&dir, spec, shape, n as u64);
        let out_path = dir.join("out.safetensors");
        let output = run_cli(&spec_path, &inputs_path, &out_path, Some("interp"));
        assert!(output.status.success(), "{spec:?}: {}", String::from_utf8_lossy(&output.stderr));
        let bytes = std::fs::read(&out_path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let (out_dims, out) = read_f32(&file, "out");
        let (lse_dims, lse) = read_f32(&file, "lse");
        assert_eq!(out_dims, Tensor::Out.dims(spec, shape));
        assert_eq!(lse_dims, Tensor::Lse.dims(spec, shape));
        let separate = inputs.separated(spec);
        let (want_out, want_lse) = independent::attention(spec, shape, &separate.tensors());
        assert_eq!(first_mismatch(&out, &want_out), None, "{spec:?}");
        assert_eq!(first_mismatch(&lse, &want_lse), None, "{spec:?}");
        assert!(lse.iter().any(|l| l.is_finite()));
    }
}

/// Runs with a broken inputs file; asserts exit status 2, the message, and no output file.
fn assert_bad_inputs(
    test: &str,
    spec: &AttentionSpec,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    message: &str,
) {
    let dir = scratch(test);
    let spec_path = dir.join("spec.toml");
    std::fs::write(&spec_path, spec.to_toml()).unwrap();
    let inputs_path = dir.join("in.safetensors");
    write_safetensors(&inputs_path, tensors);
    let out_path = dir.join("out.safetensors");
    let output = run_cli(&spec_path, &inputs_path, &out_path, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "a failed run left files behind: {left:?}");
}

fn zeros(n: usize) -> Vec<u8> {
    vec![0; 4 * n]
}

#[test]
fn bad_tensors_exit_2_naming_the_tensor_and_leave_no_file() {
    let spec = AttentionSpec::gqa(4, 2, 3);
    let q = ("q", Dtype::F32, vec![1, 2, 4, 3], zeros(24));
    let k = ("k", Dtype::F32, vec![1, 5, 2, 3], zeros(30));
    let v = ("v", Dtype::F32, vec![1, 5, 2, 3], zeros(30));
    assert_bad_inputs(
        "missing",
        &spec,
        &[q.clone(), k.clone()],
        "tensor `v` is missing: expected shape [B, Sk, 2, 3]",
    );
    assert_bad_inputs(
        "unexpected",
        &spec,
        &[q.clone(), k.clone(), v.clone(), ("kk", Dtype::F32, vec![1], zeros(1))],
        "unexpected tensor `kk`: a grouped spec reads q, k, v",
    );
    assert_bad_inputs(
        "dtype",
        &spec,
        &[("q", Dtype::F16, vec![1, 2, 4, 3], vec![0; 48]), k.clone(), v.clone()],
        "tensor `q` has dtype F16: expected F32",
    );
    assert_bad_inputs(
        "shape",
        &spec,
        &[q.clone(), k.clone(), ("v", Dtype::F32, vec![1, 4, 2, 3], zeros(24))],
        "tensor `v`: expected shape [1, 5, 2, 3], found [1, 4, 2, 3]",
    );
    assert_bad_inputs(
        "heads",
        &spec,
        &[("q", Dtype::F32, vec![1, 2, 3, 4], zeros(24)), k.clone(), v.clone()],
        "tensor `q`: expected shape [1, 2, 4, 3], found [1, 2, 3, 4]",
    );
    assert_bad_inputs(
        "rank",
        &spec,
        &[("q", Dtype::F32, vec![24], zeros(24)), k, v],
        "tensor `q`: expected shape [B, Sq, 4, 3], found [24]",
    );
    let mla = AttentionSpec::mla(2, 8, 2, 3, 4);
    assert_bad_inputs(
        "latent",
        &mla,
        &[
            ("q", Dtype::F32, vec![1, 1, 2, 5], zeros(10)),
            ("c_kv", Dtype::F32, vec![1, 3, 8], zeros(24)),
            ("k_rope", Dtype::F32, vec![1, 3, 2], zeros(6)),
            ("w_uk", Dtype::F32, vec![2, 3, 8], zeros(48)),
            ("w_uv", Dtype::F32, vec![2, 8, 4], zeros(64)),
        ],
        "tensor `w_uv`: expected shape [2, 4, 8], found [2, 8, 4]",
    );
    // A combined latent cache: c_kv holds [c_kv | k_rope] rows, and a k_rope is refused.
    let combined = mla.clone().latent_cache(LatentCache::Combined);
    let latent_inputs = |c_kv: usize, k_rope: bool| {
        let mut tensors = vec![
            ("q", Dtype::F32, vec![1, 1, 2, 5], zeros(10)),
            ("c_kv", Dtype::F32, vec![1, 3, c_kv], zeros(3 * c_kv)),
            ("w_uk", Dtype::F32, vec![2, 3, 8], zeros(48)),
            ("w_uv", Dtype::F32, vec![2, 4, 8], zeros(64)),
        ];
        if k_rope {
            tensors.push(("k_rope", Dtype::F32, vec![1, 3, 2], zeros(6)));
        }
        tensors
    };
    assert_bad_inputs(
        "combined_rope",
        &combined,
        &latent_inputs(10, true),
        "unexpected tensor `k_rope`: a combined-cache latent spec reads q, c_kv, w_uk, w_uv",
    );
    assert_bad_inputs(
        "combined_width",
        &combined,
        &latent_inputs(8, false),
        "tensor `c_kv`: expected shape [1, 3, 10], found [1, 3, 8]",
    );
}

#[test]
fn bad_spec_and_bad_files_exit_2() {
    let dir = scratch("badspec");
    let spec_path = dir.join("spec.toml");
    std::fs::write(&spec_path, "q_heads = 30\nkv_heads = 8\nhead_dim = 128\n").unwrap();
    let inputs_path = dir.join("in.safetensors");
    std::fs::write(&inputs_path, b"not safetensors").unwrap();
    let out_path = dir.join("out.safetensors");
    let run = |spec: &Path| run_cli(spec, &inputs_path, &out_path, None);
    let output = run(&spec_path);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains(
        "spec.toml:2:1: q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\""
    ));
    std::fs::write(&spec_path, AttentionSpec::mha(2, 2).to_toml()).unwrap();
    let output = run(&spec_path);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a valid safetensors file"));
    let output = run(&dir.join("absent.toml"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent.toml: cannot read"));
    assert!(!out_path.exists());
}

fn specs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs")
}

#[test]
fn plan_compares_the_variants() {
    let names =
        ["mha.toml", "mqa.toml", "llama3-8b.toml", "gqa-uneven.toml", "deepseek-v2-lite.toml"];
    let paths: Vec<String> =
        names.iter().map(|n| specs_dir().join(n).display().to_string()).collect();
    let mut args = vec!["plan", "--context", "1000"];
    args.extend(paths.iter().map(String::as_str));
    let output = attngen(&args);
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("cache @1000"), "{table}");
    let llama = table.lines().find(|l| l.starts_with("llama3-8b")).unwrap();
    for cell in ["GQA 32→8 (4 per KV head)", "2048", "8.0 KiB", "7.8 MiB", "25.0%"] {
        assert!(llama.contains(cell), "{cell:?} not in {llama:?}");
    }
    let uneven = table.lines().find(|l| l.starts_with("gqa-uneven")).unwrap();
    assert!(uneven.contains("GQA 10→4 (3,1,4,2 per KV head)"), "{uneven}");
    let lite = table.lines().find(|l| l.starts_with("deepseek-v2-lite")).unwrap();
    assert!(lite.contains("MLA 16 heads, latent 512 + rope 64") && lite.contains("576"), "{lite}");

    args.push("--json");
    let output = attngen(&args);
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let lite = &rows[4];
    assert_eq!(lite["variant"], "MLA");
    assert_eq!(lite["cache_bytes_per_token"], 576 * 4);
    assert_eq!(lite["cache_bytes_for_context"], 576 * 4 * 1000);
    let absorbed = 2 * 16 * 128 * 512 + 2 * 16 * 1000 * (512 + 64 + 512) + 2 * 16 * 128 * 512;
    assert_eq!(lite["decode_flops_per_token"], absorbed);
    assert_eq!(rows[1]["kv_heads"], 1);
}

#[test]
fn validate_reports_every_error_with_its_location() {
    let dir = scratch("validate");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "q_heads = 30\nkv_heads = 8\nhead_dim = 0\nsoftcap = -1.0\n").unwrap();
    let good = specs_dir().join("llama3-8b.toml");
    let output = attngen(&["validate", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let b = bad.display();
    assert_eq!(
        stdout,
        format!(
            "{}: ok\n\
             {b}:2:1: q_heads (30) is not a multiple of kv_heads (8) for group_map \"contiguous\"\n\
             {b}:3:1: head_dim (0) must be in 1..=1024\n\
             {b}:4:1: softcap (-1) must be finite and > 0\n",
            good.display()
        )
    );
    std::fs::write(&bad, "q_heads = 4\nhead_dim = 8\nmask = \"causal\"\nwindow = 3\n").unwrap();
    let output = attngen(&["validate", bad.to_str().unwrap()]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.starts_with(&format!("{b}:4:1: unknown field `window`")), "{stdout}");
}

/// `validate` and `plan` take directories as `check` does: the `*.toml` under them, sorted,
/// in the place of the argument; a directory without one is bad input.
#[test]
fn validate_and_plan_search_directories() {
    let dir = scratch("spec-dirs");
    std::fs::create_dir(dir.join("more")).unwrap();
    std::fs::write(dir.join("b.toml"), AttentionSpec::mha(2, 4).to_toml()).unwrap();
    std::fs::write(dir.join("more").join("a.toml"), AttentionSpec::mqa(2, 4).to_toml()).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a spec").unwrap();
    let first = specs_dir().join("mqa.toml");
    let (first, dir_arg) = (first.to_str().unwrap(), dir.to_str().unwrap());
    let output = attngen(&["validate", first, dir_arg]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim_end_matches(": ok").to_owned())
        .collect();
    let b = dir.join("b.toml").display().to_string();
    let a = dir.join("more").join("a.toml").display().to_string();
    assert_eq!(listed, [first.to_owned(), b, a]);
    let output = attngen(&["plan", dir_arg, "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    let empty = scratch("spec-dirs-empty");
    for command in ["validate", "plan"] {
        let output = attngen(&[command, empty.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("no spec files (*.toml) in it"), "{command}: {stderr}");
    }
}

/// `run` takes per-sequence key lengths from an optional `kv_lens` tensor ([B], I32 or I64):
/// the JIT's outputs match the reference's on a ragged batch whose unused cache rows are NaN,
/// and a negative length, one above Sk, a float dtype or a wrong shape exit 2 naming it.
#[test]
fn run_takes_per_sequence_key_lengths() {
    use attngen::{Kernel, Reference};
    let dir = scratch("run-kv-lens");
    let spec = AttentionSpec::gqa(4, 2, 8).mask(Mask::Causal);
    let shape = Shape::new(3, 2, 40);
    std::fs::write(dir.join("spec.toml"), spec.to_toml()).unwrap();
    let inputs = OwnedInputs::random(&spec, shape, 12, 1.0).ragged(&spec, shape, 12);
    let lens = inputs.kv_lens.clone().unwrap();
    let write = |lens: (Dtype, Vec<usize>, Vec<u8>)| {
        let mut tensors: Vec<_> = inputs
            .tensors
            .iter()
            .map(|(t, data)| (t.name(), Dtype::F32, t.dims(&spec, shape), f32_bytes(data)))
            .collect();
        tensors.push(("kv_lens", lens.0, lens.1, lens.2));
        let path = dir.join("in.safetensors");
        write_safetensors(&path, &tensors);
        path
    };
    let i64s = |xs: &[i64]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let as_i64: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
    let path = write((Dtype::I64, vec![3], i64s(&as_i64)));
    let out_path = dir.join("out.safetensors");
    let output = run_cli(&dir.join("spec.toml"), &path, &out_path, Some("jit"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bytes = std::fs::read(&out_path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (mut want, mut want_lse) = (vec![0.0; 3 * 2 * 4 * 8], vec![0.0; 3 * 2 * 4]);
    let reference = Reference::new(&spec).unwrap();
    reference.run(shape, &inputs.inputs(), &mut want, Some(&mut want_lse)).unwrap();
    let widen = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    assert_eq!(first_mismatch(&read_f32(&file, "out").1, &widen(&want)), None, "{lens:?}");
    assert_eq!(first_mismatch(&read_f32(&file, "lse").1, &widen(&want_lse)), None);
    let i32s = |xs: &[i32]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (lens, message) in [
        ((Dtype::I32, vec![3], i32s(&[5, -1, 7])), "kv_lens[1] is -1"),
        ((Dtype::I32, vec![3], i32s(&[5, 41, 7])), "kv_lens[1] is 41, more than the 40 rows"),
        ((Dtype::F32, vec![3], f32_bytes(&[5.0, 6.0, 7.0])), "dtype F32: expected I32 or I64"),
        ((Dtype::I32, vec![2], i32s(&[5, 6])), "`kv_lens`: expected shape [3], found [2]"),
    ] {
        let path = write(lens);
        std::fs::remove_file(&out_path).unwrap_or(());
        let output = run_cli(&dir.join("spec.toml"), &path, &out_path, Some("jit"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{message}: {stderr}");
        assert!(stderr.contains(message), "expected {message:?} in {stderr}");
        assert!(!out_path.exists());
    }
}

/// `run --out` naming its own spec or inputs is refused before the kernel runs, both untouched.
#[test]
fn run_refuses_to_write_over_its_inputs() {
    let dir = scratch("run-over-inputs");
    let spec = AttentionSpec::gqa(4, 2, 8);
    let (spec_path, inputs_path, _) = prepare(&dir, &spec, Shape::new(1, 2, 3), 9);
    let before = (std::fs::read(&spec_path).unwrap(), std::fs::read(&inputs_path).unwrap());
    for (out, message) in [
        (&inputs_path, "would replace --inputs"),
        (&dir.join(".").join("spec.toml"), "would replace the spec"),
    ] {
        let output = run_cli(&spec_path, &inputs_path, out, None);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
    }
    let after = (std::fs::read(&spec_path).unwrap(), std::fs::read(&inputs_path).unwrap());
    assert!(after == before, "an input changed");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "a refused run left files behind: {left:?}");
}

#[test]
fn run_jit_agrees_with_the_independent_formulation() {
    let specs = [
        AttentionSpec::gqa(6, 2, 16).group_map(GroupMap::Interleaved).mask(Mask::Causal),
        AttentionSpec::gqa(5, 3, 7).group_map(GroupMap::Explicit(vec![2, 0, 0, 1, 2])).softcap(3.0),
        AttentionSpec::mla(4, 40, 8, 12, 9).mask(Mask::SlidingWindow(5)),
        AttentionSpec::mla(4, 40, 8, 12, 9).mask(Mask::Causal).latent_cache(LatentCache::Combined),
    ];
    for (n, spec) in specs.iter().enumerate() {
        let dir = scratch(&format!("jit{n}"));
        let shape = Shape::new(2, 5, 70);
        let (spec_path, inputs_path, inputs) = prepare(&dir, spec, shape, 40 + n as u64);
        let out_path = dir.join("out.safetensors");
        let output = run_cli(&spec_path, &inputs_path, &out_path, Some("jit"));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let bytes = std::fs::read(&out_path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let separate = inputs.separated(spec);
        let (want_out, want_lse) = independent::attention(spec, shape, &separate.tensors());
        assert_eq!(first_mismatch(&read_f32(&file, "out").1, &want_out), None, "{spec:?}");
        assert_eq!(first_mismatch(&read_f32(&file, "lse").1, &want_lse), None, "{spec:?}");
    }
}

#[test]
fn dump_with_a_shape_prints_both_mla_forms_costs_and_the_choice() {
    let spec = specs_dir().join("deepseek-v2-lite.toml");
    let dump = |shape: &str| {
        let output = attngen(&["dump", spec.to_str().unwrap(), "--shape", shape]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let decode = dump("4,1,4096");
    assert!(
        decode.contains("call B = 4, Sq = 1, Sk = 4096: absorbed form (the cost model's choice)"),
        "{decode}"
    );
    for line in ["  absorbed ", "  expanded ", "absorbed is cheaper", "schedule on"] {
        assert!(decode.contains(line), "{line:?} not in {decode}");
    }
    // Counts of one are singular: one query tile per sequence, one group (MLA's one latent
    // head) per item.
    assert!(decode.contains(": 1 query tile per sequence, 1 group per item, "), "{decode}");
    let prefill = dump("1,1024,1024");
    assert!(prefill.contains("expanded form (the cost model's choice)"), "{prefill}");
    // Both forms are compiled, and both plans listed.
    assert!(prefill.contains("absorbed MLA") && prefill.contains("expanded MLA"), "{prefill}");
    // A call whose tensors could not exist has no plan (its counts would saturate), nor does a
    // context beyond exact counts.
    let huge = attngen(&["dump", spec.to_str().unwrap(), "--shape", "4000000000,4000000000,1"]);
    assert_eq!(huge.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&huge.stderr);
    assert!(stderr.contains("--shape: tensor `q`") && stderr.contains("fit in memory"), "{stderr}");
    let far = attngen(&["plan", spec.to_str().unwrap(), "--context", "4294967297"]);
    assert_eq!(far.status.code(), Some(2));
}

#[test]
fn dump_shows_plan_ir_clif_and_machine_code() {
    let spec = specs_dir().join("deepseek-v2-lite.toml");
    let output = attngen(&["dump", spec.to_str().unwrap()]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("== plan") && text.contains("absorbed MLA") && text.contains("== ir"),
        "{text}"
    );
    assert!(text.contains("W_UK[h]") && !text.contains("== clif"), "{text}");
    let spec = specs_dir().join("gqa-uneven.toml");
    let output = attngen(&["dump", spec.to_str().unwrap(), "--clif", "--asm"]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("== clif") && text.contains("function u0:0") && text.contains("f32x4"),
        "{text}"
    );
    assert!(text.contains("call fn0") || text.contains("call fn1"), "tile products are calls");
    // The legend names every routine the listing calls by its module index.
    assert!(text.contains("== pre-compiled routines called"), "{text}");
    for line in ["u0:1 = attngen_dot_nn", "u0:5 = attngen_exp2_columns"] {
        assert!(text.contains(line), "missing {line:?} in {text}");
    }
    assert!(text.contains("reloc_external Abs8 u0:5"), "the tile exponentials are called");
    assert!(text.contains("== asm") && text.contains("ret"), "machine code is listed");
}

/// `attngen bench` on a bundled spec and shape with `backends`, 3 runs, fixed peaks (100
/// GFLOP/s, 20 GB/s) so no probe runs, plus `extra` flags.
fn bench(spec: &str, shape: &str, backends: &str, extra: &[&str]) -> Output {
    let spec = specs_dir().join(spec);
    let mut args = vec!["bench", spec.to_str().unwrap(), "--shape", shape];
    args.extend(["--backend", backends, "--runs", "3", "--peak-gflops", "100"]);
    args.extend(["--peak-gbs", "20"]);
    args.extend(extra);
    attngen(&args)
}

/// [`bench`] with the JIT and the interpreter.
fn bench_both_backends(spec: &str, shape: &str, extra: &[&str]) -> Output {
    bench(spec, shape, "jit,interp", extra)
}

#[test]
fn bench_reports_json_for_a_spec_and_shape() {
    let output = bench_both_backends("llama3-8b.toml", "1,8,40", &["--threads", "2", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["machine"]["threads"], 2);
    assert_eq!(report["machine"]["peak_gflops"], 100.0);
    assert_eq!(report["machine"]["input_offset"], 0, "inputs start on a 64-byte line");
    // The system's THP setting, which decides whether the inputs lie in huge pages.
    let thp = report["machine"]["transparent_huge_pages"].as_str().map(str::to_owned);
    assert_eq!(thp, attngen::transparent_huge_pages());
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let flops = 2 * 32 * (8 * 33 + 28) * 256; // causal pairs for Sq = 8 over Sk = 40
    for (row, backend) in results.iter().zip(["jit", "interp"]) {
        assert_eq!(row["workload"], "llama3-8b");
        assert_eq!(row["backend"], backend);
        assert_eq!(row["flops"], flops);
        assert_eq!(row["kernel_flops"], flops, "grouped kernels run design.md's FLOPs");
        assert_eq!(row["bytes"], 40 * 8 * 256 * 4);
        let (min, median, max) = (
            row["min_ms"].as_f64().unwrap(),
            row["median_ms"].as_f64().unwrap(),
            row["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{row}");
        assert!((row["gflops"].as_f64().unwrap() - flops as f64 / median / 1e6).abs() < 1e-6);
        assert!(row["read_ms"].is_null(), "prefill has no cache-read ceiling: {row}");
    }
    // Prefill rows carry the FMA loop's and the tile product's rates, timed in the same rounds
    // as the kernels.
    for ceiling in ["fma_gflops", "product_gflops"] {
        let rate = results[0][ceiling].as_f64().unwrap();
        assert!(rate > 0.0 && results.iter().all(|r| r[ceiling] == rate), "{results:?}");
    }
    assert!(results[0]["compile_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(results[0]["isa"], Isa::from_env().unwrap().unwrap_or_else(Isa::detect).name());
    let output = attngen(&["bench", "--workload", "W9"]);
    assert_eq!(output.status.code(), Some(2));
}

/// `bench --forms SPEC` times the MLA forms' grid for the spec given (no --shape: the grid is
/// the shapes); arguments the grid would ignore are refused rather than ignored.
#[test]
fn bench_forms_takes_a_spec_and_refuses_what_it_would_ignore() {
    let dir = scratch("forms");
    let spec = dir.join("tiny-mla.toml");
    let tiny = AttentionSpec::mla(2, 16, 4, 8, 8).mask(Mask::Causal);
    std::fs::write(&spec, tiny.to_toml()).unwrap();
    let output = attngen(&["bench", "--forms", spec.to_str().unwrap(), "--runs", "3", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let shapes: Vec<_> = rows.iter().map(|r| (r["seq_q"].clone(), r["seq_k"].clone())).collect();
    assert_eq!(shapes.len(), 8, "Sq in 1, 16, 128, 1024 by Sk in 1024, 4096: {shapes:?}");
    for row in &rows {
        assert!(row["absorbed_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["choice_vs_best"].as_f64().unwrap() >= 1.0, "{row}");
    }
    for wrong in [&["--workload", "W1"][..], &["--backend", "macro"], &["--shape", "1,1,1"]] {
        let mut args = vec!["bench", "--forms"];
        args.extend(wrong);
        let output = attngen(&args);
        assert_eq!(output.status.code(), Some(2), "{wrong:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("cannot be used with"));
    }
    let output = attngen(&["bench", spec.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("a SPEC needs --shape B,Sq,Sk"));
}

/// Bench arguments no run can honour exit 2 with a message, never an abort or a table of NaN:
/// a shape whose tensors cannot be allocated (q: 2^62 floats, 2^64 bytes), zero threads or
/// runs, and peaks that are not finite rates above 0.
#[test]
fn bench_refuses_arguments_no_run_can_honour() {
    let output = bench_both_backends("llama3-8b.toml", "33554432,33554432,1", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let message = "tensor `q`: shape [33554432, 33554432, 32, 128] has more elements than fit";
    assert!(stderr.contains(message), "{stderr}");
    let output = attngen(&["bench", "--workload", "W4", "--isa", "portable,PORTABLE"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--isa portable is listed twice"), "{stderr}");
    for (flag, value) in [
        ("--threads", "0"),
        ("--runs", "0"),
        ("--peak-gflops", "0"),
        ("--peak-gflops", "nan"),
        ("--peak-gbs", "inf"),
    ] {
        let mut args = vec!["bench", "--workload", "W4", flag, value];
        if flag != "--peak-gbs" {
            args.extend(["--peak-gbs", "20"]);
        }
        let output = attngen(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(&format!("invalid value '{value}' for '{flag}")), "{stderr}");
    }
}

/// `--isa` times the JIT once per ISA named, and counts absorbed MLA as the kernel runs it.
#[test]
fn bench_times_each_isa_and_counts_absorbed_mla() {
    let widest = Isa::detect().name();
    let isas = format!("{widest},portable");
    let flags = ["--isa", &isas, "--json", "--input-offset", "4"];
    let output = bench_both_backends("deepseek-v2-lite.toml", "1,1,64", &flags);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["machine"]["input_offset"], 4);
    let results = report["results"].as_array().unwrap();
    let backends: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r["backend"].as_str().unwrap(), r["isa"].as_str().unwrap()))
        .collect();
    assert_eq!(backends, [("jit", widest), ("jit", "portable"), ("interp", "")]);
    // 16 heads, one query over 64 keys: absorb 128 -> 512, attend over 512 + 64 and 512,
    // project 512 -> 128; design.md counts attention over D = 192 and Dv = 128 instead.
    let kernel = 16 * (2 * 512 * (128 + 128) + 64 * 2 * (2 * 512 + 64));
    assert_eq!(results[0]["kernel_flops"], kernel);
    assert_eq!(results[0]["flops"], 2 * 16 * 64 * (192 + 128));
    // Decode rows carry the time of reading the cache once, timed in the same rounds.
    let read_ms = results[0]["read_ms"].as_f64().unwrap();
    assert!(read_ms > 0.0 && results.iter().all(|r| r["read_ms"] == read_ms), "{results:?}");
    let compute =
        |r: &serde_json::Value| r["fma_gflops"].is_null() && r["product_gflops"].is_null();
    assert!(results.iter().all(compute), "decode has no compute ceilings");
    let output = attngen(&["bench", "--workload", "W1", "--isa", "avx3"]);
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("ISA `avx3`: not an ISA name"), "{text}");
    // An offset of a whole line or more is not a placement within one.
    let output = attngen(&["bench", "--workload", "W4", "--input-offset", "16"]);
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("--input-offset") && text.contains("0..16"), "{text}");
}

/// The table gives each compiled backend's rows of a later ISA their time against the first
/// ISA's row of the same backend, and each macro row its speed against the JIT's.
#[test]
fn bench_table_compares_each_backend_across_isas() {
    if Isa::detect() == Isa::Portable {
        println!("skipped: this CPU has only the portable ISA, no second ISA to compare");
        return;
    }
    let isas = format!("{},portable", Isa::detect().name());
    let output = bench("llama3-8b.toml", "1,8,40", "macro,jit", &["--isa", &isas]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let header = text.lines().find(|line| line.starts_with("workload")).unwrap();
    // Numbers are right-aligned under their header, within its span (counted in chars).
    let cell = |line: &str, title: &str| -> String {
        let at = header.find(title).unwrap_or_else(|| panic!("no column {title}: {text}"));
        let start = header[..at].chars().count();
        line.chars().skip(start).take(title.chars().count()).collect::<String>().trim().to_owned()
    };
    let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("llama3-8b")).collect();
    assert_eq!(rows.len(), 4, "{text}");
    for row in rows {
        let (vs_first, vs_jit) = (cell(row, "time vs 1st isa"), cell(row, "speed vs jit"));
        assert_eq!(vs_first.ends_with('x'), row.contains("portable"), "{vs_first:?} in {row}");
        assert_eq!(vs_jit.ends_with('x'), row.contains("macro"), "{vs_jit:?} in {row}");
    }
}

/// A call with nothing to do still runs and is timed, but its "of same rounds" cell is a
/// dash, not the share of a ceiling it never approached (a B = 0 decode, whose inputs are
/// empty, had printed the read's start-up time over the kernel's as "323% read").
#[test]
fn bench_gives_an_empty_call_no_share_of_the_ceiling() {
    for shape in ["0,1,1", "1,1,0", "1,0,64"] {
        let output = bench("llama3-8b.toml", shape, "jit", &[]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).unwrap();
        let header = text.lines().find(|line| line.starts_with("workload")).unwrap();
        let row = text.lines().find(|line| line.starts_with("llama3-8b")).unwrap();
        let title = "of same rounds";
        let start = header[..header.find(title).unwrap()].chars().count();
        let cell: String = row.chars().skip(start).take(title.chars().count()).collect();
        assert_eq!(cell.trim(), "-", "{shape}: {text}");
    }
}

/// `ATTNGEN_ISA` forces the JIT's ISA; a name that is not one, or an ISA the CPU lacks, is an
/// error that says so.
#[test]
fn attngen_isa_forces_the_jit_routines() {
    let spec = specs_dir().join("mqa.toml");
    let dump = |isa: &str| {
        Command::new(env!("CARGO_BIN_EXE_attngen"))
            .args(["dump", spec.to_str().unwrap(), "--plan"])
            .env("ATTNGEN_ISA", isa)
            .output()
            .expect("binary runs")
    };
    let output = dump("portable");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("micro-kernels portable: 8 f32 lanes per vector; forced by ATTNGEN_ISA"),
        "{text}"
    );
    let output = dump("avx3");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("ISA `avx3`"));
    for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
        println!("this CPU lacks {isa}: asking for it must fail");
        let output = dump(isa.name());
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("this CPU lacks it"));
    }
}

#[test]
fn check_passes_bundled_specs_and_reports_json() {
    let paths: Vec<String> = ["llama3-8b.toml", "gqa-uneven.toml", "deepseek-v2-lite.toml"]
        .iter()
        .map(|n| specs_dir().join(n).display().to_string())
        .collect();
    let mut args = vec!["check", "--cases", "6", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let output = attngen(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["verdict"], "ok", "{row}");
        assert_eq!(row["cases"], 6);
        assert!(row["compile_ms"].as_f64().unwrap() > 0.0);
        assert!(row["max_abs"].as_f64().unwrap() < 1e-4);
    }
    assert_eq!(rows[0]["spec"], "deepseek-v2-lite"); // files are checked in path order
    assert_eq!(rows[0]["variant"], "MLA 16 heads, latent 512 + rope 64");
}

#[test]
fn a_failing_check_prints_a_minimal_case_and_a_replay_command_that_reproduces_it() {
    let spec = specs_dir().join("mqa.toml");
    let output =
        attngen(&["check", spec.to_str().unwrap(), "--backend", "perturbed", "--cases", "16"]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("FAIL mqa-16x128: out[0, 2, 0, 0]"), "{text}");
    assert!(text.contains("minimal case: B=1 Sq=3 Sk=1"), "{text}");
    let replay =
        text.lines().find_map(|l| l.trim().strip_prefix("replay: ")).expect("a replay line");
    let words: Vec<&str> = replay.split_whitespace().collect();
    assert_eq!(words[..2], ["attngen", "check"]);
    // The printed command reproduces the failure exactly...
    let again = attngen(&words[1..]);
    assert_eq!(again.status.code(), Some(1));
    let again = String::from_utf8(again.stdout).unwrap();
    assert!(again.contains("FAIL mqa-16x128: out[0, 2, 0, 0]"), "{again}");
    // ...and the same case passes on the real JIT.
    let mut fixed: Vec<&str> = words[1..].to_vec();
    let backend = fixed.iter().position(|w| *w == "--backend").unwrap();
    fixed[backend + 1] = "jit";
    assert!(attngen(&fixed).status.success());
}

#[test]
fn check_exits_2_on_an_invalid_spec() {
    let dir = scratch("check-invalid");
    std::fs::write(dir.join("bad.toml"), "q_heads = 30\nkv_heads = 8\nhead_dim = 128\n").unwrap();
    std::fs::write(dir.join("good.toml"), AttentionSpec::mha(2, 4).to_toml()).unwrap();
    let output = attngen(&["check", dir.to_str().unwrap(), "--cases", "4"]);
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("invalid") && text.contains("bad.toml:2:1: q_heads (30) is not a multiple"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("good.toml") && l.ends_with("ok")), "{text}");
}

/// A directory holding no spec, or zero cases, is bad input, not a check that passes having
/// checked nothing.
#[test]
fn check_exits_2_when_it_would_check_nothing() {
    let dir = scratch("check-empty");
    std::fs::write(dir.join("notes.txt"), "not a spec").unwrap();
    let output = attngen(&["check", dir.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no spec files (*.toml) in it"), "{stderr}");
    // Nor may it check no case.
    let spec = specs_dir().join("mqa.toml");
    let output = attngen(&["check", spec.to_str().unwrap(), "--cases", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid value '0' for '--cases"));
}

#[test]
fn bench_draws_a_roofline_with_ceilings_and_one_point_per_result() {
    let dir = scratch("roofline");
    let svg = dir.join("r.svg");
    let output = bench_both_backends("mqa.toml", "1,16,64", &["--roofline", svg.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("mqa-16x128  jit") && table.contains("mqa-16x128  interp"), "{table}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "not an SVG");
    assert!(text.contains("100 GFLOP/s widest FMA peak, 20.0 GB/s read bandwidth"), "caption");
    assert!(text.contains("arithmetic intensity") && text.contains("GFLOP/s"), "axis titles");
    // Two measured points (plus one in the legend), each labelled.
    assert_eq!(text.matches("<circle").count(), 3, "{text}");
    assert!(text.contains("mqa-16x128 jit") && text.contains("mqa-16x128 interp"));
    assert!(text.contains("<polyline"), "the roofline ceiling");
    // A chart that could not be written, or would replace the spec timed, is refused before
    // anything is timed, the spec untouched.
    let spec = dir.join("spec.toml");
    std::fs::write(&spec, AttentionSpec::mqa(2, 8).to_toml()).unwrap();
    let before = std::fs::read(&spec).unwrap();
    let missing = dir.join("no-such-dir").join("r.svg");
    for (chart, message) in [(&spec, "would replace the spec"), (&missing, "no such directory")] {
        let spec = spec.to_str().unwrap();
        let args = ["bench", spec, "--shape", "1,2,3", "--roofline", chart.to_str().unwrap()];
        let output = attngen(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(message) && output.stdout.is_empty(), "{stderr}");
    }
    assert_eq!(std::fs::read(&spec).unwrap(), before);
}

/// `--backend macro` runs the kernels compiled into the binary: `check` and `run` on bundled
/// specs, `bench` beside the JIT (compile time 0); a spec that is not bundled exits 2 naming
/// what is.
#[test]
fn the_macro_backend_runs_the_bundled_specs_and_names_what_it_lacks() {
    let output = attngen(&[
        "check",
        specs_dir().to_str().unwrap(),
        "--backend",
        "macro",
        "--cases",
        "4",
        "--json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(rows.len() >= 9 && rows.iter().all(|r| r["verdict"] == "ok"), "{rows:?}");
    let dir = scratch("macro-unbundled");
    let spec = AttentionSpec::mha(2, 4);
    let shape = Shape::new(1, 3, 5);
    let (spec_path, inputs_path, _) = prepare(&dir, &spec, shape, 5);
    let output = attngen(&["check", spec_path.to_str().unwrap(), "--backend", "macro"]);
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("not bundled") && text.contains("llama3-8b"), "{text}");
    let output = run_cli(&spec_path, &inputs_path, &dir.join("out.safetensors"), Some("macro"));
    assert_eq!(output.status.code(), Some(2));
    assert!(!dir.join("out.safetensors").exists());
    // A bundled spec (written anew: names aside, it is the bundled one) runs and agrees.
    let spec = AttentionSpec::gqa(10, 4, 64)
        .group_map(GroupMap::Explicit(vec![0, 0, 0, 1, 2, 2, 2, 2, 3, 3]))
        .mask(Mask::Causal);
    let shape = Shape::new(2, 5, 70);
    let (spec_path, inputs_path, inputs) = prepare(&dir, &spec, shape, 6);
    let out_path = dir.join("out.safetensors");
    let output = run_cli(&spec_path, &inputs_path, &out_path, Some("macro"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bytes = std::fs::read(&out_path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (want_out, want_lse) = independent::attention(&spec, shape, &inputs.tensors());
    assert_eq!(first_mismatch(&read_f32(&file, "out").1, &want_out), None);
    assert_eq!(first_mismatch(&read_f32(&file, "lse").1, &want_lse), None);
    let output = bench("llama3-8b.toml", "1,8,40", "jit,macro", &["--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let results = report["results"].as_array().unwrap();
    let backends: Vec<&str> = results.iter().map(|r| r["backend"].as_str().unwrap()).collect();
    assert_eq!(backends, ["jit", "macro"]);
    assert_eq!(results[1]["compile_ms"], 0.0);
    assert_eq!(results[0]["isa"], results[1]["isa"]);
}

/// `dump --rust` prints the attribute's expansion: every ISA's functions and the impls.
#[test]
fn dump_rust_prints_what_the_attribute_generates() {
    let spec = specs_dir().join("gemma2-9b.toml");
    let output = attngen(&["dump", spec.to_str().unwrap(), "--rust"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "== rust",
        "pub struct Kernel;",
        "#[target_feature(enable = \"avx512f,avx2,fma\")]",
        "#[target_feature(enable = \"avx2,fma\")]",
        "pub mod portable",
        "pub unsafe extern \"C\" fn item(",
        "pub unsafe extern \"C\" fn finish(",
        "softcap::log2_capped(",
        "50f32",
        "impl ::attngen::Kernel for Kernel",
    ] {
        assert!(text.contains(needle), "missing {needle:?}");
    }
    assert!(!text.contains("== plan"), "only the sections asked for");
}

/// A random grouped layer's projections: H 4, G 2, D 8, hidden 24 (2·G·D = 32, so full rank is
/// 24), named as Hugging Face checkpoints name them.
fn grouped_layer(dir: &Path) -> (PathBuf, Vec<f32>, Vec<f32>) {
    let (rows, hidden) = (16, 24);
    let w_k = attngen_tests::uniform(21, rows * hidden, -0.3, 0.3);
    let w_v = attngen_tests::uniform(22, rows * hidden, -0.3, 0.3);
    let bytes = |w: &[f32]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let path = dir.join("layer.safetensors");
    write_safetensors(
        &path,
        &[
            ("k_proj.weight", Dtype::F32, vec![rows, hidden], bytes(&w_k)),
            ("v_proj.weight", Dtype::F32, vec![rows, hidden], bytes(&w_v)),
        ],
    );
    (path, w_k, w_v)
}

/// `attngen compress` of `grouped_layer`'s file at `rank`; `changes` (flag, value pairs)
/// replace flags' values, or add flags.
fn compress(weights: &Path, out: &Path, rank: &str, changes: &[&str]) -> Output {
    let mut flags = [
        ("--weights", weights.to_str().unwrap()),
        ("--k-proj", "k_proj.weight"),
        ("--v-proj", "v_proj.weight"),
        ("--heads", "4"),
        ("--kv-heads", "2"),
        ("--head-dim", "8"),
        ("--rank", rank),
        ("--out", out.to_str().unwrap()),
    ];
    let mut extra = Vec::new();
    for change in changes.chunks(2) {
        match (flags.iter_mut().find(|(flag, _)| *flag == change[0]), change) {
            (Some(flag), [_, value]) => flag.1 = value,
            _ => extra.extend_from_slice(change),
        }
    }
    let mut args = vec!["compress"];
    args.extend(flags.iter().flat_map(|(flag, value)| [*flag, *value]));
    args.extend(extra);
    attngen(&args)
}

/// At full rank the converted layer is the original: its attention output, computed here from
/// the written files (not from the command's own report), matches the grouped layer's.
#[test]
fn compress_at_full_rank_reproduces_the_grouped_layer() {
    use attngen::{Inputs, Kernel, Reference};
    let dir = scratch("compress-full");
    let (weights, w_k, w_v) = grouped_layer(&dir);
    let out = dir.join("mla.safetensors");
    let output = compress(&weights, &out, "24", &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let spec_text = std::fs::read_to_string(dir.join("mla.toml")).unwrap();
    let spec = AttentionSpec::from_toml(&spec_text).unwrap();
    assert_eq!(spec, AttentionSpec::mla(4, 24, 0, 8, 8).mask(Mask::Causal).named("mla"));
    let bytes = std::fs::read(&out).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.tensor("w_uk").unwrap().shape(), [4, 8, 24]);
    let (w_dkv, w_uk, w_uv) =
        (read_f32(&file, "w_dkv").1, read_f32(&file, "w_uk").1, read_f32(&file, "w_uv").1);
    // Activations: 10 tokens of hidden states, 3 queries per head.
    let (tokens, hidden) = (10, 24);
    let x = attngen_tests::uniform(5, tokens * hidden, -1.0, 1.0);
    let q = attngen_tests::uniform(6, 3 * 4 * 8, -1.0, 1.0);
    let project = |w: &[f32], rows: usize| -> Vec<f32> {
        let x = &x;
        (0..tokens)
            .flat_map(|t| {
                (0..rows).map(move |r| {
                    let x_t = &x[t * hidden..][..hidden];
                    w[r * hidden..][..hidden].iter().zip(x_t).map(|(a, b)| a * b).sum::<f32>()
                })
            })
            .collect()
    };
    let shape = Shape::new(1, 3, tokens);
    let grouped = Reference::new(&AttentionSpec::gqa(4, 2, 8).mask(Mask::Causal)).unwrap();
    let (k, v) = (project(&w_k, 16), project(&w_v, 16));
    let mut want = vec![0.0; 3 * 4 * 8];
    grouped.run(shape, &Inputs::grouped(&q, &k, &v), &mut want, None).unwrap();
    let c_kv = project(&w_dkv, 24);
    let mut got = vec![0.0; want.len()];
    let latent = Reference::new(&spec).unwrap();
    latent.run(shape, &Inputs::latent(&q, &c_kv, &[], &w_uk, &w_uv), &mut got, None).unwrap();
    let widen = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    assert_eq!(first_mismatch(&got, &widen(&want)), None);
}

/// A sliding-window layer (Mistral's, say) converts with its window: the spec written keeps
/// it, and at full rank the output under the window matches the grouped layer's.
#[test]
fn compress_keeps_a_sliding_window() {
    let dir = scratch("compress-window");
    let (weights, _, _) = grouped_layer(&dir);
    let out = dir.join("mla.safetensors");
    let output = compress(&weights, &out, "24", &["--mask", "sliding_window=5", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert!(rows[0]["output_error"].as_f64().unwrap() < 1e-5, "{rows:?}");
    let spec = AttentionSpec::from_toml(&std::fs::read_to_string(dir.join("mla.toml")).unwrap());
    assert_eq!(spec.unwrap().mask, Mask::SlidingWindow(5));
    for bad in ["window", "sliding_window=0"] {
        let output = compress(&weights, &out, "24", &["--mask", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--mask"), "{bad}");
    }
}

/// More rank never costs accuracy: the energy kept rises, and the K, V and output errors fall,
/// to about 0 at full rank; the cache holds R floats per token.
#[test]
fn compress_errors_shrink_as_the_rank_grows() {
    let dir = scratch("compress-ranks");
    let (weights, _, _) = grouped_layer(&dir);
    let output = compress(&weights, &dir.join("mla.safetensors"), "2,6,12,24", &["--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let column = |key: &str| rows.iter().map(|r| r[key].as_f64().unwrap()).collect::<Vec<_>>();
    assert!(column("energy").windows(2).all(|w| w[0] <= w[1]), "{rows:?}");
    for key in ["k_error", "v_error", "output_error"] {
        assert!(column(key).windows(2).all(|w| w[0] >= w[1]), "{key}: {rows:?}");
    }
    let last = rows.last().unwrap();
    assert!((last["energy"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{last}");
    assert!(last["k_error"].as_f64().unwrap() < 1e-6, "{last}");
    assert!(last["output_error"].as_f64().unwrap() < 1e-5, "{last}");
    assert_eq!(column("cache_bytes_before"), [128.0; 4]);
    assert_eq!(column("cache_bytes_after"), [8.0, 24.0, 48.0, 96.0]);
    for rank in [2, 6, 12, 24] {
        assert!(dir.join(format!("mla-r{rank}.safetensors")).exists());
        assert!(dir.join(format!("mla-r{rank}.toml")).exists());
    }
    // `plan` shows each converted spec's measured output error next to the others' numbers.
    let specs: Vec<String> =
        [2, 24].iter().map(|r| dir.join(format!("mla-r{r}.toml")).display().to_string()).collect();
    let mut args = vec!["plan", specs[0].as_str(), specs[1].as_str(), "--json"];
    let output = attngen(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let planned: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    for (planned, measured) in planned.iter().zip([&rows[0], &rows[3]]) {
        let (got, want) = (&planned["compressed"]["output_error"], &measured["output_error"]);
        assert_eq!(got.as_f64(), want.as_f64(), "{planned}");
    }
    args.pop();
    let table = String::from_utf8(attngen(&args).stdout).unwrap();
    let error = format!("{:.2e}", rows[0]["output_error"].as_f64().unwrap());
    assert!(table.contains("output err") && table.contains(&error), "{error} not in {table}");
}

/// Bad inputs exit 2 with a message naming the tensor or flag, and write nothing.
#[test]
fn compress_rejects_bad_inputs_and_writes_nothing() {
    let dir = scratch("compress-bad");
    let (weights, _, _) = grouped_layer(&dir);
    let f64_weights = dir.join("f64.safetensors");
    let zeros = vec![0u8; 16 * 24 * 8];
    write_safetensors(
        &f64_weights,
        &[
            ("k_proj.weight", Dtype::F64, vec![16, 24], zeros.clone()),
            ("v_proj.weight", Dtype::F64, vec![16, 24], zeros),
        ],
    );
    let out = dir.join("never.safetensors");
    let cases: [(&Path, &str, &[&str], &str); 5] = [
        (&weights, "25", &[], "--rank 25: a rank must be 1..=24"),
        (&weights, "4,0", &[], "--rank 0"),
        (&f64_weights, "4", &[], "--k-proj k_proj.weight: dtype F64, expected F32"),
        (&weights, "4", &["--head-dim", "4"], "shape [16, 24], expected [kv_heads·head_dim = 8"),
        (&weights, "4", &["--v-proj", "v.weight"], "--v-proj v.weight: no such tensor"),
    ];
    for (file, rank, changes, message) in cases {
        let output = compress(file, &out, rank, changes);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{message}: {stderr}");
        assert!(stderr.contains(message), "expected `{message}` in: {stderr}");
        assert!(!out.exists() && !dir.join("never.toml").exists());
    }
    // Outputs that would replace the weights, or each other, or cannot be created: refused
    // before any work, the weights untouched and nothing new in the directory.
    let before = std::fs::read(&weights).unwrap();
    let files = || {
        let mut names: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let listed = files();
    let roundabout = dir.join(".").join("layer.safetensors");
    let missing = dir.join("no-such-dir").join("mla.safetensors");
    let cases: [(&Path, &str, &str); 6] = [
        (&weights, "4", "would replace --weights"),
        (&roundabout, "4", "would replace --weights"),
        (&dir.join("mla.toml"), "4", "the spec is written beside the weights"),
        (&missing, "4", "no such directory"),
        (&dir, "4", "is not a file name"),
        (&out, "4,8,4", "--rank 4 is listed twice"),
    ];
    for (out, rank, message) in cases {
        let output = compress(&weights, out, rank, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{message}: {stderr}");
        assert!(stderr.contains(message), "expected `{message}` in: {stderr}");
        assert_eq!(std::fs::read(&weights).unwrap(), before, "{message}: the weights changed");
        assert_eq!(files(), listed, "{message}: a file was written");
    }
}
