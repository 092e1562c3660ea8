//! Spec-driven property checks of any [`Kernel`] against the [`Reference`] interpreter.
//!
//! [`check`] draws random call shapes and inputs with proptest (the same strategies the test
//! suite uses), compares every element of `out` and `lse` with semantics.md §4's tolerance, and on
//! a failure shrinks to a minimal (shape, input seed) and reports the first differing element.
//! [`run_case`] replays one such case exactly.
//!
//! ```
//! use attngen::harness::{self, CheckConfig};
//! use attngen::{AttentionSpec, Jit, Mask};
//!
//! let spec = AttentionSpec::gqa(4, 2, 16).mask(Mask::Causal);
//! let kernel = Jit::new()?.compile(&spec)?;
//! let report = harness::check(&kernel, &CheckConfig { cases: 8, ..CheckConfig::default() })?;
//! assert!(report.failure.is_none() && report.cases == 8);
//! # Ok::<(), attngen::Error>(())
//! ```

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

use crate::{
    AlignedBuffer, AttentionSpec, Error, Inputs, Kernel, KvLayout, Reference, Shape, Tensor,
};

/// How many cases to run and how large they may be.
#[derive(Clone, Copy, Debug)]
pub struct CheckConfig {
    /// Random cases to run.
    pub cases: u32,
    /// Seed of the case generator: the same seed draws the same cases.
    pub seed: u64,
    /// Largest batch drawn.
    pub max_batch: usize,
    /// Largest query length drawn.
    pub max_seq_q: usize,
    /// Largest key length drawn, except by long decode cases.
    pub max_seq_k: usize,
    /// Longest key length of the long decode cases, a quarter of the draws (two ninths with
    /// long prefill cases): B <= 2, Sq <= 2 and Sk from [`LONG_DECODE_KEYS`] up to this, so the
    /// JIT splits the keys across threads and merges the parts. 0 (or less than
    /// `LONG_DECODE_KEYS`) draws none.
    pub max_long_seq_k: usize,
    /// Long prefill cases, a ninth of the draws, where the spec's kernels read a task's shared
    /// keys in runs (see [`LongPrefill`]); `None` draws none.
    pub long_prefill: Option<LongPrefill>,
}

/// The shapes of long prefill cases: B = 1, Sq and Sk each from a range (inclusive). Sized by
/// [`CheckConfig::sized_for`] so that a task's query tiles share their packed keys and read
/// them in runs (`KernelPlan::schedule`), each tile's state carried from one run to the
/// next: the path a long prompt takes, which short cases never reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPrefill {
    /// Fewest and most queries: past one query tile, so a task has two.
    pub seq_q: (usize, usize),
    /// Fewest and most keys: from the shortest range read in runs, a key tile further.
    pub seq_k: (usize, usize),
}

/// Fewest keys of a long decode case: more than two of the JIT's decode splits
/// (`KernelPlan::min_keys_per_split`, 256 keys), so every such case is split.
pub const LONG_DECODE_KEYS: usize = 520;
/// Batch of long decode cases: at most this many sequences.
const LONG_DECODE_BATCH: usize = 2;
/// Queries of long decode cases: at most this many.
const LONG_DECODE_QUERIES: usize = 2;

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            cases: 64,
            seed: 0,
            max_batch: 3,
            max_seq_q: 70,
            max_seq_k: 300,
            max_long_seq_k: 1500,
            long_prefill: None,
        }
    }
}

/// Multiply-adds the reference may spend on the largest case [`CheckConfig::sized_for`] draws
/// (an average case costs about an eighth of it).
const REFERENCE_BUDGET: f64 = 4e8;

/// Multiply-adds the reference may spend on the largest long prefill case: such a case must
/// be long enough to fill a run of shared keys (2 MiB of them), so it gets more than the
/// others, and is drawn less often.
const LONG_PREFILL_BUDGET: f64 = 1e9;

impl CheckConfig {
    /// The default limits, shrunk for large specs so the largest case costs the reference at
    /// most a fixed budget: the batch first (more sequences only repeat the code paths that
    /// longer ones reach: several key tiles, masks, splits), then the sequence lengths (down
    /// to Sq 8, Sk 16); long decode cases keep as many keys as the budget allows, or are
    /// dropped below [`LONG_DECODE_KEYS`]. Per key the reference does `H·(D + Dv)`
    /// multiply-adds per query, and for latent specs also materialises every head's key and
    /// value: `H·(nope_dim + Dv)·rank`.
    ///
    /// Long prefill cases are sized from the spec's plan and the threads of rayon's current
    /// pool (whose count decides how a call's keys are split, and so how long a range must be
    /// to be read in runs), and drawn when the largest costs the reference at most a larger
    /// budget: for grouped specs, and for small latent ones forced to the expanded form (an
    /// absorbed plan has no runs; DeepSeek's expanded ones cost the reference too much).
    pub fn sized_for(spec: &AttentionSpec, cases: u32, seed: u64) -> CheckConfig {
        let h = spec.q_heads as f64;
        let per_pair = h * (spec.head_dim() + spec.v_head_dim) as f64;
        let per_key = match &spec.kv {
            KvLayout::Latent(l) => h * ((l.nope_dim + spec.v_head_dim) * l.rank) as f64,
            KvLayout::Grouped { .. } => 0.0,
        };
        let mut config = CheckConfig { cases, seed, ..CheckConfig::default() };
        let cost = |c: &CheckConfig| {
            c.max_batch as f64 * c.max_seq_k as f64 * (per_key + c.max_seq_q as f64 * per_pair)
        };
        while cost(&config) > REFERENCE_BUDGET && config.max_batch > 1 {
            config.max_batch -= 1;
        }
        while cost(&config) > REFERENCE_BUDGET && (config.max_seq_q > 8 || config.max_seq_k > 16) {
            config.max_seq_q = (config.max_seq_q * 3 / 4).max(8);
            config.max_seq_k = (config.max_seq_k * 3 / 4).max(16);
        }
        let long_per_key =
            LONG_DECODE_BATCH as f64 * (per_key + LONG_DECODE_QUERIES as f64 * per_pair);
        let affordable = (REFERENCE_BUDGET / long_per_key.max(1.0)) as usize;
        config.max_long_seq_k = config.max_long_seq_k.min(affordable);
        if config.max_long_seq_k < LONG_DECODE_KEYS {
            config.max_long_seq_k = 0;
        }
        let threads = rayon::current_num_threads();
        config.long_prefill = LongPrefill::sized_for(spec, threads, |seq_q, seq_k| {
            seq_k as f64 * (per_key + seq_q as f64 * per_pair) <= LONG_PREFILL_BUDGET
        });
        config
    }
}

impl LongPrefill {
    /// The long prefill shapes of `spec` on `threads` threads, or `None` when its plan has no
    /// runs of shared keys or the reference cannot `afford(Sq, Sk)` the largest: Sq over one
    /// query tile up to one and a half, and Sk from the fewest keys the schedule reads in more
    /// than one run per split, at the most queries, to a key tile more (a ragged last run).
    /// The tile sizes and run lengths are the same on every ISA's plan.
    pub fn sized_for(
        spec: &AttentionSpec,
        threads: usize,
        afford: impl Fn(usize, usize) -> bool,
    ) -> Option<LongPrefill> {
        use attngen_codegen::plan::{KernelPlan, Target};
        let plan = KernelPlan::new(spec, Target::PORTABLE);
        if plan.shared_run_keys == usize::MAX {
            return None;
        }
        let seq_q = (plan.q_tile + 1, plan.q_tile + plan.q_tile.div_ceil(2));
        let in_runs = |seq_k: usize| {
            let schedule = plan.schedule(1, seq_q.1, seq_k, threads);
            schedule.keys_per_run < schedule.keys_per_split
        };
        // Splits stop multiplying with the keys once the threads have enough of them, so some
        // multiple of a run's keys puts several runs in each split (or the budget ends the
        // search first).
        let mut seq_k = plan.shared_run_keys + 1;
        while !in_runs(seq_k) {
            seq_k = seq_k.checked_add(plan.shared_run_keys).filter(|&k| afford(seq_q.1, k))?;
        }
        let most_keys = seq_k + plan.k_tile;
        afford(seq_q.1, most_keys).then_some(LongPrefill { seq_q, seq_k: (seq_k, most_keys) })
    }
}

/// One case: a call shape, the seed its inputs (uniform in [−1, 1]) are drawn from, and
/// whether its sequences have their own key lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// B, Sq, Sk.
    pub shape: Shape,
    /// Seed of the inputs.
    pub input_seed: u64,
    /// Whether the call passes per-sequence key lengths, [`kv_lens`] of the shape and seed,
    /// with every cache row past them NaN (no kernel may read those).
    pub ragged: bool,
}

impl std::fmt::Display for Case {
    /// `B,Sq,Sk,SEED`, then `,ragged` for a ragged case: what `Case::from_str` reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Shape { batch, seq_q, seq_k } = self.shape;
        write!(f, "{batch},{seq_q},{seq_k},{}", self.input_seed)?;
        if self.ragged { write!(f, ",ragged") } else { Ok(()) }
    }
}

impl std::str::FromStr for Case {
    type Err = String;

    /// Reads `B,Sq,Sk,SEED` or `B,Sq,Sk,SEED,ragged`.
    fn from_str(text: &str) -> Result<Case, String> {
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let (numbers, ragged) = match fields[..] {
            [ref numbers @ .., "ragged"] => (numbers, true),
            ref numbers => (numbers, false),
        };
        let numbers: Vec<u64> = numbers
            .iter()
            .map(|n| n.parse().map_err(|e| format!("`{n}` is not a whole number below 2^64 ({e})")))
            .collect::<Result<_, _>>()?;
        let size = |n: u64| usize::try_from(n).map_err(|_| format!("{n} does not fit in usize"));
        match numbers[..] {
            [b, sq, sk, input_seed] => {
                Ok(Case { shape: Shape::new(size(b)?, size(sq)?, size(sk)?), input_seed, ragged })
            }
            _ => Err(format!("expected B,Sq,Sk,SEED or B,Sq,Sk,SEED,ragged, got `{text}`")),
        }
    }
}

/// The per-sequence key lengths of a ragged case: each drawn from `seed`, uniform in 0..=Sk
/// (so the longest may stop short of the cache's end, as in a KV cache with room to grow).
pub fn kv_lens(shape: Shape, seed: u64) -> Vec<usize> {
    let draws = uniform(seed ^ 0x006B_765F_6C65_6E73, shape.batch, 0.0, 1.0);
    draws.iter().map(|u| ((u * (shape.seq_k + 1) as f32) as usize).min(shape.seq_k)).collect()
}

/// Writes NaN into every cache row past its sequence's length (`k`, `v`, `c_kv`, `k_rope`):
/// semantics.md §3 step 5 says no output may see them.
pub fn poison_unused_rows(
    spec: &AttentionSpec,
    shape: Shape,
    lens: &[usize],
    tensors: &mut [(Tensor, Vec<f32>)],
) {
    for (tensor, data) in tensors.iter_mut() {
        if !matches!(tensor, Tensor::K | Tensor::V | Tensor::CKv | Tensor::KRope) {
            continue;
        }
        // [B, Sk, ...]: a sequence's rows are `row` floats each.
        let row = tensor.dims(spec, shape)[2..].iter().product::<usize>();
        for (b, &len) in lens.iter().enumerate() {
            let sequence = &mut data[b * shape.seq_k * row..][..shape.seq_k * row];
            sequence[len * row..].fill(f32::NAN);
        }
    }
}

/// The first element where a kernel and the reference disagree.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// `out` or `lse`.
    pub tensor: &'static str,
    /// Its multi-index in the tensor (e.g. [b, i, h, d] for `out`).
    pub index: Vec<usize>,
    /// The kernel's value.
    pub got: f32,
    /// The reference's value.
    pub expected: f32,
}

/// The largest errors of one case, and its first mismatch if any.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseResult {
    /// Largest |got − expected| over `out` and `lse` (finite values).
    pub max_abs: f64,
    /// Largest |got − expected| / |expected| over elements with |expected| > 1e-3.
    pub max_rel: f64,
    /// The first element outside the tolerance.
    pub mismatch: Option<Mismatch>,
}

/// What [`check`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    /// Cases run.
    pub cases: u32,
    /// Largest absolute error seen over all passing cases run (and the failing one).
    pub max_abs: f64,
    /// Largest relative error seen.
    pub max_rel: f64,
    /// The shrunk minimal failing case and its mismatch.
    pub failure: Option<(Case, Mismatch)>,
}

/// The shapes [`check`] draws under `config`'s limits (its case count and seed aside): B, Sq
/// and Sk from 1 up to the limits (Sq > Sk included; a third of these have Sq <= 4, decode);
/// with `max_long_seq_k >= LONG_DECODE_KEYS` a quarter of the draws are long decode cases
/// instead (see [`CheckConfig::max_long_seq_k`]), and with `long_prefill` a ninth are long
/// prefill cases ([`LongPrefill`]) and two ninths long decode ones. Proptest shrinks the sizes
/// toward their lower bounds.
pub fn shapes(config: CheckConfig) -> impl Strategy<Value = Shape> {
    // A third of the cases are decode-like (at most 4 queries): kernels take different
    // paths there (whole-row decode items, unpacked tiles), so they must be drawn often.
    let max_seq_q = config.max_seq_q.max(1);
    let seq_q = prop_oneof![1 => 1..=max_seq_q.min(4), 2 => 1..=max_seq_q];
    let short = (1..=config.max_batch.max(1), seq_q, 1..=config.max_seq_k.max(1));
    let short = short.prop_map(|(b, sq, sk)| Shape::new(b, sq, sk));
    let long_decode = (config.max_long_seq_k >= LONG_DECODE_KEYS).then(|| {
        let keys = LONG_DECODE_KEYS..=config.max_long_seq_k;
        let long = (1..=LONG_DECODE_BATCH, 1..=LONG_DECODE_QUERIES, keys);
        long.prop_map(|(b, sq, sk)| Shape::new(b, sq, sk))
    });
    let long_prefill = config.long_prefill.map(|LongPrefill { seq_q, seq_k }| {
        (seq_q.0..=seq_q.1, seq_k.0..=seq_k.1).prop_map(|(sq, sk)| Shape::new(1, sq, sk))
    });
    let mut classes: Vec<(u32, BoxedStrategy<Shape>)> = vec![(6, short.boxed())];
    classes.extend(long_decode.map(|s| (2, s.boxed())));
    classes.extend(long_prefill.map(|s| (1, s.boxed())));
    proptest::strategy::Union::new_weighted(classes).boxed()
}

/// The cases [`check`] runs: shapes from `shapes`, any input seed, and a quarter of them
/// ragged (per-sequence key lengths, NaN past them); shrinking goes toward dense calls.
pub fn cases_over(shapes: impl Strategy<Value = Shape>) -> impl Strategy<Value = Case> {
    let ragged = proptest::bool::weighted(0.25);
    (shapes, any::<u64>(), ragged).prop_map(|(shape, input_seed, ragged)| Case {
        shape,
        input_seed,
        ragged,
    })
}

/// Deterministic inputs for a spec and shape: every input tensor uniform in
/// [−`magnitude`, `magnitude`], from `seed` (splitmix64 per tensor).
///
/// # Errors
/// [`Error::TooLarge`] when a tensor's element count overflows `usize` or its memory cannot be
/// allocated.
pub fn inputs(
    spec: &AttentionSpec,
    shape: Shape,
    seed: u64,
    magnitude: f32,
) -> Result<Vec<(Tensor, Vec<f32>)>, Error> {
    Tensor::inputs(spec)
        .iter()
        .enumerate()
        .map(|(n, &t)| {
            let stream = seed ^ (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            Ok((t, filled(spec, shape, t, uniform_stream(stream, -magnitude, magnitude))?))
        })
        .collect()
}

/// A zeroed buffer for `tensor` at `shape`, such as `out` or `lse` for a call.
///
/// # Errors
/// [`Error::TooLarge`] when its element count overflows `usize` or its memory cannot be
/// allocated (a shape too large for this machine is an error, not an abort).
pub fn zeros(spec: &AttentionSpec, shape: Shape, tensor: Tensor) -> Result<Vec<f32>, Error> {
    filled(spec, shape, tensor, std::iter::repeat(0.0))
}

/// `tensor`'s elements, the first of `values`, in a buffer allocated fallibly.
fn filled(
    spec: &AttentionSpec,
    shape: Shape,
    tensor: Tensor,
    values: impl Iterator<Item = f32>,
) -> Result<Vec<f32>, Error> {
    let len = tensor.len(spec, shape)?;
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| Error::TooLarge { tensor: tensor.name(), shape: tensor.dims(spec, shape) })?;
    buffer.extend(values.take(len));
    Ok(buffer)
}

/// Borrowed [`Inputs`] over named tensors, such as those from [`inputs`] (or copies of them
/// placed elsewhere: any owner of a float slice).
pub fn view<'a, T: AsRef<[f32]>>(spec: &AttentionSpec, tensors: &'a [(Tensor, T)]) -> Inputs<'a> {
    let get =
        |t: Tensor| tensors.iter().find(|(n, _)| *n == t).map_or(&[][..], |(_, d)| d.as_ref());
    match spec.kv {
        KvLayout::Grouped { .. } => Inputs::grouped(get(Tensor::Q), get(Tensor::K), get(Tensor::V)),
        KvLayout::Latent(_) => Inputs::latent(
            get(Tensor::Q),
            get(Tensor::CKv),
            get(Tensor::KRope),
            get(Tensor::WUk),
            get(Tensor::WUv),
        ),
    }
}

/// A copy of an input tensor that starts `offset` floats past a 64-byte line, so that where
/// inputs lie is a benchmark's or a test's choice, not the allocator's (`attngen bench
/// --input-offset`; the tests that kernels are right wherever their inputs start). [`view`]
/// takes these as it takes vectors.
///
/// ```
/// use attngen::harness::Placed;
///
/// let placed = Placed::new(&[1.0, 2.0, 3.0], 4);
/// assert_eq!(placed.as_ref(), &[1.0, 2.0, 3.0]);
/// assert_eq!(placed.as_ref().as_ptr() as usize % 64, 16);
/// ```
#[derive(Clone, Debug)]
pub struct Placed {
    /// The floats from a line boundary: `offset` zeros, then the copy.
    lines: AlignedBuffer,
    /// Floats before the copy.
    offset: usize,
}

impl Placed {
    /// A copy of `data`, `offset` floats past a line.
    pub fn new(data: &[f32], offset: usize) -> Placed {
        let mut lines = AlignedBuffer::zeroed(offset + data.len());
        lines[offset..].copy_from_slice(data);
        Placed { lines, offset }
    }
}

impl AsRef<[f32]> for Placed {
    fn as_ref(&self) -> &[f32] {
        &self.lines[self.offset..]
    }
}

/// `len` values uniform in [lo, hi) from a seed (splitmix64).
pub fn uniform(seed: u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    uniform_stream(seed, lo, hi).take(len).collect()
}

/// The endless stream whose first `len` values [`uniform`] returns.
fn uniform_stream(seed: u64, lo: f32, hi: f32) -> impl Iterator<Item = f32> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    })
}

/// Runs one case on `kernel` and on the reference and compares them.
///
/// # Errors
/// What building the reference or either run returns (an invalid spec, a tensor too large);
/// a mismatch is not an error but the returned result's verdict.
pub fn run_case(kernel: &dyn Kernel, case: Case) -> Result<CaseResult, Error> {
    let spec = kernel.spec();
    let call = CaseCall::new(spec, case)?;
    let got = call.outputs(kernel)?;
    let want = call.outputs(&Reference::new(spec)?)?;
    Ok(compare(spec, case.shape, &got, &want))
}

/// The inputs of one case, built once for every kernel it runs on.
struct CaseCall {
    shape: Shape,
    tensors: Vec<(Tensor, Vec<f32>)>,
    kv_lens: Option<Vec<usize>>,
}

impl CaseCall {
    fn new(spec: &AttentionSpec, case: Case) -> Result<CaseCall, Error> {
        let mut tensors = inputs(spec, case.shape, case.input_seed, 1.0)?;
        let kv_lens = case.ragged.then(|| kv_lens(case.shape, case.input_seed));
        if let Some(lens) = &kv_lens {
            poison_unused_rows(spec, case.shape, lens, &mut tensors);
        }
        Ok(CaseCall { shape: case.shape, tensors, kv_lens })
    }

    /// `out` and `lse` of `kernel` on these inputs.
    fn outputs(&self, kernel: &dyn Kernel) -> Result<(Vec<f32>, Vec<f32>), Error> {
        let (spec, shape) = (kernel.spec(), self.shape);
        let (mut out, mut lse) =
            (zeros(spec, shape, Tensor::Out)?, zeros(spec, shape, Tensor::Lse)?);
        let mut inputs = view(spec, &self.tensors);
        if let Some(lens) = &self.kv_lens {
            inputs = inputs.with_kv_lens(lens);
        }
        kernel.run(shape, &inputs, &mut out, Some(&mut lse))?;
        Ok((out, lse))
    }
}

/// A kernel's outputs against the reference's: the largest differences and the first element
/// outside semantics.md §4's tolerance.
fn compare(
    spec: &AttentionSpec,
    shape: Shape,
    (out, lse): &(Vec<f32>, Vec<f32>),
    (want_out, want_lse): &(Vec<f32>, Vec<f32>),
) -> CaseResult {
    let mut result = CaseResult { max_abs: 0.0, max_rel: 0.0, mismatch: None };
    for (name, tensor, got, want) in
        [("out", Tensor::Out, out, want_out), ("lse", Tensor::Lse, lse, want_lse)]
    {
        for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
            let (g64, w64) = (f64::from(g), f64::from(w));
            let both_special = (g.is_nan() && w.is_nan()) || (w.is_infinite() && g == w);
            if g64.is_finite() && w64.is_finite() {
                let abs = (g64 - w64).abs();
                result.max_abs = result.max_abs.max(abs);
                if w64.abs() > 1e-3 {
                    result.max_rel = result.max_rel.max(abs / w64.abs());
                }
            }
            let within = both_special || (g64 - w64).abs() <= 1e-4 + 1e-4 * w64.abs();
            if !within && result.mismatch.is_none() {
                let dims = tensor.dims(spec, shape);
                result.mismatch =
                    Some(Mismatch { tensor: name, index: unravel(i, &dims), got: g, expected: w });
            }
        }
    }
    result
}

fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (slot, &d) in index.iter_mut().zip(dims).rev() {
        *slot = flat % d.max(1);
        flat /= d.max(1);
    }
    index
}

/// Runs `config.cases` random cases; on a failure shrinks to a minimal case (smallest shape,
/// then input seed) and reports it.
///
/// # Errors
/// [`Error::Spec`] for an invalid spec, [`Error::Check`] for zero cases, and what a case's
/// run returns; failing cases are in the report, not errors.
pub fn check(kernel: &dyn Kernel, config: &CheckConfig) -> Result<CheckReport, Error> {
    // Fail fast on an invalid spec rather than inside the runner.
    Reference::new(kernel.spec())?;
    if config.cases == 0 {
        return Err(Error::Check("zero cases would pass having checked nothing".to_owned()));
    }
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&config.seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let runner_config =
        Config { cases: config.cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(runner_config, rng);
    let shapes = shapes(*config);
    let worst = std::cell::Cell::new((0.0f64, 0.0f64));
    let outcome = runner.run(&cases_over(shapes), |case| {
        let result = run_case(kernel, case).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (abs, rel) = worst.get();
        worst.set((abs.max(result.max_abs), rel.max(result.max_rel)));
        match result.mismatch {
            Some(m) => Err(TestCaseError::fail(format!("{m:?}"))),
            None => Ok(()),
        }
    });
    let (max_abs, max_rel) = worst.get();
    let failure = match outcome {
        Ok(()) => None,
        Err(TestError::Fail(_, case)) => {
            let mismatch = run_case(kernel, case)?.mismatch.ok_or_else(|| {
                Error::Check("the shrunk failing case passed when replayed".to_owned())
            })?;
            Some((case, mismatch))
        }
        Err(TestError::Abort(reason)) => return Err(Error::Check(format!("aborted: {reason}"))),
    };
    Ok(CheckReport { cases: config.cases, max_abs, max_rel, failure })
}

/// A deliberately wrong kernel for testing checkers: it runs `inner`, then adds 0.5 to one
/// element of `out` (query 2, head 0, dim 0) whenever Sq >= 3. `attngen check --backend
/// perturbed` and the harness tests use it to watch a failure being found, shrunk and replayed.
pub struct Perturbed(pub Box<dyn Kernel>);

impl Kernel for Perturbed {
    fn spec(&self) -> &AttentionSpec {
        self.0.spec()
    }

    fn run(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), Error> {
        self.0.run(shape, inputs, out, lse)?;
        if shape.seq_q >= 3 {
            let spec = self.spec();
            out[2 * spec.q_heads * spec.v_head_dim] += 0.5;
        }
        Ok(())
    }
}

/// The ISAs this CPU runs, widest first; each one it lacks is named on stdout as skipped, so a
/// test over ISAs never passes one silently.
pub fn tested_isas() -> Vec<crate::Isa> {
    for isa in crate::Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
        println!("skipped: {isa} kernels (this CPU lacks {isa})");
    }
    crate::Isa::available()
}

/// Panics, naming the kernel, the shrunk failing case and its first differing element,
/// unless every kernel of `kernels` (one spec, each with a label) agrees with the reference
/// on `cases` random cases sized for the spec ([`CheckConfig::sized_for`]); the reference
/// runs once per case for all of them. What `attngen::spec_tests!` runs.
pub fn assert_matches_reference<K: Kernel>(kernels: &[(String, K)], cases: u32) {
    let Some((_, first)) = kernels.first() else { return };
    let spec = first.spec();
    let name = spec.name.clone().unwrap_or_else(|| spec.summary());
    let reference = Reference::new(spec).unwrap_or_else(|e| panic!("{name}: {e}"));
    let config = CheckConfig::sized_for(spec, cases, 0);
    let mut runner = TestRunner::new_with_rng(
        Config { cases, failure_persistence: None, ..Config::default() },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[0; 32]),
    );
    let shapes = shapes(config);
    let outcome = runner.run(&cases_over(shapes), |case| {
        let fail = |e: Error| TestCaseError::fail(e.to_string());
        let call = CaseCall::new(spec, case).map_err(fail)?;
        let want = call.outputs(&reference).map_err(fail)?;
        for (label, kernel) in kernels {
            let got = call.outputs(kernel).map_err(fail)?;
            if let Some(m) = compare(spec, case.shape, &got, &want).mismatch {
                return Err(TestCaseError::fail(format!("{label}: {m:?}")));
            }
        }
        Ok(())
    });
    match outcome {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            panic!("{name}: differs from the reference at {case:?}: {reason}")
        }
        Err(TestError::Abort(reason)) => panic!("{name}: aborted: {reason}"),
    }
}
