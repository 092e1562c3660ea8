//! `attngen bench`: times backends on the standard workloads (or a spec and shape) and reports
//! ms, GFLOP/s, GB/s and the fraction of the machine's measured peaks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use attngen::harness::Placed;
use attngen::{Form, Isa, Jit, JitOptions, Kernel, MlaForm, Reference, Shape, Tensor, Workload};
use serde::Serialize;

use crate::{Backend, Failure, emit, load_spec, outputs, peak, roofline, table};

/// What to time and how: `attngen bench`'s arguments.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Time this spec instead of the workloads (at --shape; with --forms, over its grid).
    #[arg(conflicts_with = "workloads")]
    pub spec: Option<PathBuf>,
    /// Workloads to time, e.g. `--workload W1,W4` (default: all eight).
    #[arg(long = "workload", value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// B,Sq,Sk for a spec.
    #[arg(long, value_parser = crate::parse_shape)]
    pub shape: Option<Shape>,
    /// Backends to time.
    #[arg(long = "backend", value_enum, value_delimiter = ',', default_value = "jit")]
    pub backends: Vec<Backend>,
    /// Micro-kernel ISAs to time the JIT and macro kernels with, each in its own row, e.g.
    /// `--isa avx512,avx2` (default: the widest this CPU has, or `ATTNGEN_ISA`'s).
    #[arg(long = "isa", value_delimiter = ',')]
    pub isas: Vec<String>,
    /// Threads for the kernels and the peak probes, at least 1 (default: every core).
    #[arg(long)]
    pub threads: Option<std::num::NonZeroUsize>,
    /// Most timed runs per row, at least 1; the compiled kernels stop early after about a
    /// second each (at least 3 runs, when --runs allows).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Use this FMA peak (GFLOP/s, of the widest ISA) instead of measuring it.
    #[arg(long, value_parser = positive)]
    pub peak_gflops: Option<f64>,
    /// Use this read bandwidth (GB/s) instead of measuring it.
    #[arg(long, value_parser = positive)]
    pub peak_gbs: Option<f64>,
    /// Place every input tensor this many floats past a 64-byte line (0 to 15). By default
    /// each starts on a line, as PyTorch's and ONNX Runtime's allocators place tensors (and a
    /// large one in huge pages, as `attngen::AlignedBuffer` and numpy place it); 4 is
    /// where a large `Vec<f32>` from glibc's `malloc` starts (16 bytes past a line), which
    /// costs decode, reading its cache in place, a few percent.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..16))]
    pub input_offset: u8,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw a roofline chart (SVG): the FMA and bandwidth ceilings and every result.
    #[arg(long, value_name = "FILE.svg")]
    pub roofline: Option<PathBuf>,
    /// Instead of workloads, time the two MLA forms and the cost model's per-call choice on
    /// DeepSeek-V2-Lite (or SPEC, a latent spec) over Sq in {1, 16, 128, 1024} x Sk in
    /// {1024, 4096}, B = 1, with the JIT on the first --isa: how far the choice is from the
    /// faster form.
    #[arg(long, conflicts_with_all = ["workloads", "shape", "backends", "roofline"])]
    pub forms: bool,
}

/// A rate given on the command line: a finite number above 0 (a peak of 0, NaN or ∞ would turn
/// every fraction of it into NaN or ∞).
fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("{x} is not a finite rate above 0")),
        Err(e) => Err(e.to_string()),
    }
}

/// One shape of the `--forms` grid.
#[derive(Serialize)]
struct FormsRow {
    seq_q: usize,
    seq_k: usize,
    absorbed_ms: f64,
    expanded_ms: f64,
    /// The form the cost model picks.
    choice: &'static str,
    /// The choice's time over the faster form's (1.0: the choice is the faster).
    choice_vs_best: f64,
    /// GFLOP/s of the faster form, in its own FLOPs.
    best_gflops: f64,
}

/// `bench --forms`: both MLA forms and the choice, timed in alternating rounds per shape.
fn forms_grid(args: &BenchArgs, threads: usize) -> Result<(), Failure> {
    let spec = match &args.spec {
        Some(path) => load_spec(path)?,
        None => {
            let mut standard = Workload::standard().into_iter();
            standard.find(|w| w.id == "W5").expect("W5 is a standard workload").spec
        }
    };
    if spec.requested_form().is_none() {
        return Err(Failure::input("--forms needs a latent (MLA) spec"));
    }
    let isa = isas(&args.isas)?[0];
    let jit = Jit::with_options(JitOptions::default().isa(isa).threads(threads))
        .map_err(|e| Failure { status: 2, message: e.to_string() })?;
    let mut rows = Vec::new();
    for seq_k in [1024, 4096] {
        for seq_q in [1, 16, 128, 1024] {
            let shape = Shape::new(1, seq_q, seq_k);
            let workload = Workload {
                id: format!("{seq_q}x{seq_k}"),
                description: "MLA form grid",
                spec: spec.clone(),
                shape,
            };
            let mut timed = Vec::new();
            for form in [MlaForm::Absorbed, MlaForm::Expanded] {
                let forced = Workload { spec: spec.clone().mla_form(form), ..workload.clone() };
                timed.push(build(&forced, Backend::Jit, &jit, threads)?);
            }
            let choice =
                jit.compile(&spec.clone().mla_form(MlaForm::Auto)).map_err(Failure::input)?;
            let choice = choice.form_for(shape);
            let times =
                time(&workload, timed, args.runs as usize, threads, args.input_offset.into())?;
            let (absorbed, expanded) = (&times[0], &times[1]);
            let best = if absorbed.median_ms <= expanded.median_ms { absorbed } else { expanded };
            let chosen = match choice {
                Form::LatentExpanded => expanded.median_ms,
                _ => absorbed.median_ms,
            };
            rows.push(FormsRow {
                seq_q,
                seq_k,
                absorbed_ms: absorbed.median_ms,
                expanded_ms: expanded.median_ms,
                choice: choice.name(),
                choice_vs_best: chosen / best.median_ms,
                best_gflops: best.kernel_gflops,
            });
        }
    }
    if args.json {
        let text = serde_json::to_string_pretty(&rows).expect("plain data serialises");
        return emit(&format!("{text}\n"));
    }
    let header =
        ["Sq", "Sk", "absorbed ms", "expanded ms", "choice", "choice vs best", "best GFLOP/s"];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.seq_q.to_string(),
                r.seq_k.to_string(),
                format!("{:.3}", r.absorbed_ms),
                format!("{:.3}", r.expanded_ms),
                r.choice.to_owned(),
                format!("{:.2}", r.choice_vs_best),
                format!("{:.1}", r.best_gflops),
            ]
        })
        .collect();
    let mut text = format!(
        "{} ({}), B = 1, {threads} threads, micro-kernels {isa}\n",
        spec.name.as_deref().unwrap_or("MLA"),
        spec.summary()
    );
    text.push_str(&table::render(&header, &[true, true, true, true, false, true, true], &cells));
    text.push_str("choice vs best: the chosen form's median over the faster one's (both timed in alternating rounds); best GFLOP/s in the faster form's own FLOPs.\n");
    emit(&text)
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Machine {
    threads: usize,
    /// The FMA peak of the widest ISA.
    peak_gflops: f64,
    /// The FMA peak of every ISA this CPU has, widest first.
    peaks: Vec<IsaPeak>,
    peak_gbs: f64,
    /// Bytes the bandwidth probe read (at least twice the last-level cache).
    probe_bytes: usize,
    /// Floats past a 64-byte line every input tensor starts (`--input-offset`).
    input_offset: usize,
    /// The last-level cache, as the system reports it.
    llc_bytes: Option<usize>,
    /// The transparent-huge-page setting (`attngen::transparent_huge_pages`), which decides
    /// whether the inputs, `AlignedBuffer`s, lie in huge pages.
    transparent_huge_pages: Option<String>,
    /// The ISA of the JIT rows (the first, when several were timed).
    isa: &'static str,
}

#[derive(Serialize)]
struct IsaPeak {
    isa: &'static str,
    gflops: f64,
}

#[derive(Serialize)]
struct Row {
    workload: String,
    backend: &'static str,
    /// The JIT's micro-kernel ISA (empty for the interpreter).
    isa: &'static str,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    runs: usize,
    /// design.md 4's FLOPs per second.
    gflops: f64,
    /// FLOPs per second as the kernel runs them (absorbed for MLA; else `gflops`).
    kernel_gflops: f64,
    gbs: f64,
    /// design.md 4's FLOP count.
    flops: u64,
    /// The FLOPs of the form the kernel runs ([`Workload::kernel_flops`]).
    kernel_flops: u64,
    /// That form: `grouped`, `absorbed` or `expanded`.
    form: &'static str,
    bytes: u64,
    /// Kernel FLOPs per byte of compulsory traffic (inputs read once, outputs written once).
    intensity: f64,
    compile_ms: Option<f64>,
    decode: bool,
    /// Decode: the median time of reading the workload's inputs once (the cache, the queries
    /// and MLA's weights) on as many threads as the kernels, each pinned to a CPU of its own,
    /// in the same rounds as the kernels — the memory ceiling of this sitting.
    read_ms: Option<f64>,
    /// Prefill: the median GFLOP/s of one short round of the widest ISA's FMA loop on as many
    /// threads as the kernels, pinned, timed in the same rounds as the kernels — the compute
    /// ceiling of this sitting (on a shared machine, often well below the start-up probe's
    /// best round).
    fma_gflops: Option<f64>,
    /// Prefill: the median GFLOP/s of the widest ISA's tile product on operands in L1
    /// ([`peak::product_round`]), in the same rounds: the ceiling of code that loads its
    /// operands.
    product_gflops: Option<f64>,
}

/// The pause before a round's ceilings, for the kernels' idle pool workers to stop spinning.
const SETTLE: Duration = Duration::from_millis(3);

/// Calls of [`peak::product_round`] per timing round: about 3 ms on an AVX-512 core.
const PRODUCT_REPS: u64 = 1000;

/// Runs the benchmark and prints the table or JSON.
pub fn bench(args: BenchArgs) -> Result<(), Failure> {
    if let Some(path) = &args.roofline {
        // Before minutes of timing, not after: the chart can be written, and not over the spec.
        let spec = args.spec.as_deref().map(|spec| ("the spec", spec));
        outputs::check(spec.as_slice(), &[("--roofline", path)])?;
    }
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, std::num::NonZeroUsize::get);
    if args.forms {
        return forms_grid(&args, threads);
    }
    let workloads = select(&args)?;
    let isas = isas(&args.isas)?;
    let jits = isas
        .iter()
        .map(|&isa| Jit::with_options(JitOptions::default().isa(isa).threads(threads)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure { status: 2, message: e.to_string() })?;
    // A given peak stands for the widest ISA timed, and nothing is probed.
    let peaks: Vec<IsaPeak> = match args.peak_gflops {
        Some(gflops) => vec![IsaPeak { isa: isas[0].name(), gflops }],
        None => Isa::available()
            .into_iter()
            .map(|isa| IsaPeak { isa: isa.name(), gflops: peak::fma_gflops(threads, isa) })
            .collect(),
    };
    let peak_gbs = args.peak_gbs.unwrap_or_else(|| peak::read_gbs(threads));
    let mut rows = Vec::new();
    for workload in &workloads {
        let mut timed = Vec::new();
        for &backend in &args.backends {
            match backend {
                Backend::Jit | Backend::Macro => {
                    for jit in &jits {
                        timed.push(build(workload, backend, jit, threads)?);
                    }
                }
                _ => timed.push(build(workload, backend, &jits[0], threads)?),
            }
        }
        rows.extend(time(workload, timed, args.runs as usize, threads, args.input_offset.into())?);
    }
    let machine = Machine {
        threads,
        peak_gflops: peaks[0].gflops,
        peaks,
        peak_gbs,
        probe_bytes: peak::read_buffer_bytes(),
        input_offset: args.input_offset.into(),
        llc_bytes: attngen::last_level_cache_bytes(),
        transparent_huge_pages: attngen::transparent_huge_pages(),
        isa: isas[0].name(),
    };
    let report = Report { machine, results: rows };
    if let Some(path) = &args.roofline {
        let points: Vec<roofline::Point> = report
            .results
            .iter()
            .map(|r| roofline::Point {
                label: match r.isa {
                    "" => format!("{} {}", r.workload, r.backend),
                    isa => format!("{} {} {isa}", r.workload, r.backend),
                },
                intensity: r.intensity,
                gflops: r.kernel_gflops,
            })
            .collect();
        let ceilings: Vec<(String, f64)> =
            report.machine.peaks.iter().map(|p| (p.isa.to_owned(), p.gflops)).collect();
        let svg = roofline::draw(&ceilings, peak_gbs, &points)
            .map_err(|message| Failure { status: 1, message })?;
        outputs::write_all(&[(path.as_path(), svg.as_bytes())])?;
    }
    if args.json {
        let text = serde_json::to_string_pretty(&report).expect("plain data serialises");
        return emit(&format!("{text}\n"));
    }
    emit(&render(&report))
}

/// The ISAs `--isa` names, each checked against this CPU; by default the JIT's own choice.
fn isas(names: &[String]) -> Result<Vec<Isa>, Failure> {
    let fail = |e: attngen::Error| Failure { status: 2, message: e.to_string() };
    if names.is_empty() {
        return Ok(vec![Isa::from_env().map_err(fail)?.unwrap_or_else(Isa::detect)]);
    }
    let isas: Vec<Isa> = names
        .iter()
        .map(|name| name.parse::<Isa>().and_then(Isa::checked).map_err(fail))
        .collect::<Result<_, _>>()?;
    match crate::first_repeat(&isas) {
        Some(isa) => Err(Failure::input(format!("--isa {isa} is listed twice"))),
        None => Ok(isas),
    }
}

fn select(args: &BenchArgs) -> Result<Vec<Workload>, Failure> {
    if let Some(path) = &args.spec {
        let spec = load_spec(path)?;
        let shape = args.shape.ok_or_else(|| {
            Failure::input("a SPEC needs --shape B,Sq,Sk (or --forms for the MLA forms' grid)")
        })?;
        let id = spec.name.clone().unwrap_or_else(|| path.display().to_string());
        return Ok(vec![Workload { id, description: "spec file", spec, shape }]);
    }
    let all = Workload::standard();
    if args.workloads.is_empty() {
        return Ok(all);
    }
    args.workloads
        .iter()
        .map(|id| {
            all.iter().find(|w| w.id.eq_ignore_ascii_case(id)).cloned().ok_or_else(|| {
                Failure::input(format!(
                    "unknown workload `{id}`: expected one of W1, W2, W3, W4, W5, W6, W7, W8"
                ))
            })
        })
        .collect()
}

/// A kernel to time: its backend, ISA (empty for the interpreter) and compile time.
struct Timed {
    backend: Backend,
    isa: &'static str,
    kernel: Box<dyn Kernel>,
    compile_ms: Option<f64>,
    /// The form the kernel runs the workload's call in (the reference: the spec's first).
    form: Form,
}

/// The kernel of `backend` for `workload`: the JIT's and macro's with `jit`'s ISA, on
/// `threads` threads.
fn build(
    workload: &Workload,
    backend: Backend,
    jit: &Jit,
    threads: usize,
) -> Result<Timed, Failure> {
    let spec = &workload.spec;
    let mut form = Form::compiled(spec)[0];
    let (kernel, compile_ms): (Box<dyn Kernel>, Option<f64>) = match backend {
        Backend::Interp => (Box::new(Reference::new(spec).map_err(Failure::input)?), None),
        Backend::Perturbed => {
            return Err(Failure::input("the perturbed backend is for `attngen check` tests only"));
        }
        Backend::Jit => {
            let kernel = jit.compile(spec).map_err(Failure::input)?;
            let ms = kernel.compile_time().as_secs_f64() * 1e3;
            form = kernel.form_for(workload.shape);
            (Box::new(kernel), Some(ms))
        }
        Backend::Macro => {
            let kernel = crate::bundled::kernel(spec, jit.isa())
                .ok_or_else(|| Failure::input(crate::bundled::missing(spec)))?;
            let kernel = kernel.threads(threads).map_err(Failure::input)?;
            form = kernel.form_for(workload.shape);
            (Box::new(kernel), Some(0.0))
        }
    };
    let isa = match backend {
        Backend::Jit | Backend::Macro => jit.isa().name(),
        Backend::Interp | Backend::Perturbed => "",
    };
    Ok(Timed { backend, isa, kernel, compile_ms, form })
}

/// Times `kernels` on `workload`, on copies of its inputs placed `input_offset` floats past a
/// 64-byte line. The interpreter is slow: one timed run. The compiled kernels: rounds that run
/// each in turn — so a slow spell of a shared machine falls on all of them alike — twice,
/// timing the second call (the first is the warm-up), until about a second per kernel has
/// passed (at least 3 rounds, at most `max_runs`). A decode workload's rounds
/// also read its inputs once on `threads` threads ([`peak::read_once`]): each row's `read_ms`
/// is that ceiling's median; a prefill workload's rounds run a few milliseconds of the widest
/// ISA's FMA loop ([`peak::fma_round`]) and of its tile product in L1
/// ([`peak::product_round`]) instead, whose medians are each row's `fma_gflops` and
/// `product_gflops`.
fn time(
    workload: &Workload,
    kernels: Vec<Timed>,
    max_runs: usize,
    threads: usize,
    input_offset: usize,
) -> Result<Vec<Row>, Failure> {
    let spec = &workload.spec;
    let shape = workload.shape;
    let inputs: Vec<(Tensor, Placed)> = attngen::harness::inputs(spec, shape, 1, 1.0)
        .map_err(Failure::input)?
        .into_iter()
        .map(|(tensor, data)| (tensor, Placed::new(&data, input_offset)))
        .collect();
    let named = attngen::harness::view(spec, &inputs);
    let zeros = |t: Tensor| attngen::harness::zeros(spec, shape, t).map_err(Failure::input);
    let (mut out, mut lse) = (zeros(Tensor::Out)?, zeros(Tensor::Lse)?);
    let mut call = |kernel: &dyn Kernel| -> Result<Duration, Failure> {
        let start = Instant::now();
        kernel.run(shape, &named, &mut out, Some(&mut lse)).map_err(Failure::input)?;
        Ok(start.elapsed())
    };
    // A decode workload's ceiling in the same sitting: every input a call must read (the
    // cache, the queries and MLA's up-projection weights) read once, split over the kernels'
    // threads, in the same rounds as the kernels.
    let to_read: Vec<&[f32]> = match workload.is_decode() {
        true => inputs.iter().map(|(_, d)| d.as_ref()).collect(),
        false => Vec::new(),
    };
    let read = |times: &mut Vec<Duration>| {
        if !to_read.is_empty() {
            let (total, time) = peak::read_once(&to_read, threads);
            std::hint::black_box(total);
            times.push(time);
        }
    };
    // A prefill workload's compute ceilings in the same sitting, with the widest ISA this CPU
    // has, in the same rounds as the kernels: its FMA loop (half a start-up probe round, a few
    // ms) and its tile product on operands in L1 (a few ms too).
    let widest = Isa::detect();
    let compute = |fma: &mut Vec<f64>, product: &mut Vec<f64>| {
        if !workload.is_decode() {
            fma.push(peak::fma_round(threads, widest, peak::FMA_ROUND_ITERATIONS / 2));
            product.push(peak::product_round(threads, widest, PRODUCT_REPS));
        }
    };
    let (mut fma_rates, mut product_rates) = (Vec::new(), Vec::new());
    let mut read_times = Vec::new();
    let mut times = vec![Vec::new(); kernels.len()];
    let compiled: Vec<usize> =
        (0..kernels.len()).filter(|&i| kernels[i].backend != Backend::Interp).collect();
    for (i, timed) in kernels.iter().enumerate() {
        if timed.backend == Backend::Interp {
            times[i].push(call(timed.kernel.as_ref())?);
        }
    }
    let budget = Instant::now();
    let seconds = Duration::from_secs(compiled.len() as u64);
    for round in 0..max_runs {
        if round >= 3 && budget.elapsed() > seconds {
            break;
        }
        for &i in &compiled {
            // Untimed first: after the round's ceilings the kernel's pool has been idle for
            // milliseconds, and a call after idle time is slow on a shared VM whatever the
            // kernel does (W5 took 4.17 ms after 2 ms idle, 8.06 after 20, 3.98 back to back;
            // W4 5.56 and 11.37): the timed call runs back to back, as the peers' are.
            call(kernels[i].kernel.as_ref())?;
            times[i].push(call(kernels[i].kernel.as_ref())?);
        }
        // The kernels' pools keep their workers spinning for about a millisecond after a
        // call; a ceiling timed then would share the cores with them (a 2-thread FMA round
        // of 3 ms right after a call read half of one timed 1 ms later).
        std::thread::sleep(SETTLE);
        read(&mut read_times);
        compute(&mut fma_rates, &mut product_rates);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    read_times.sort();
    let read_ms = read_times.get(read_times.len() / 2).map(|&d| ms(d));
    let median = |mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates.get(rates.len() / 2).copied()
    };
    let (fma_gflops, product_gflops) = (median(fma_rates), median(product_rates));
    let (flops, bytes) = (workload.flops(), workload.kv_bytes());
    let rows = kernels.into_iter().zip(times).map(|(timed, mut times)| {
        times.sort();
        let kernel_flops = workload.kernel_flops(timed.form);
        let median = ms(times[times.len() / 2]);
        Row {
            workload: workload.id.clone(),
            backend: timed.backend.name(),
            isa: timed.isa,
            median_ms: median,
            min_ms: ms(times[0]),
            max_ms: ms(times[times.len() - 1]),
            runs: times.len(),
            gflops: flops as f64 / median / 1e6,
            kernel_gflops: kernel_flops as f64 / median / 1e6,
            gbs: bytes as f64 / median / 1e6,
            flops,
            kernel_flops,
            form: timed.form.name(),
            bytes,
            intensity: kernel_flops as f64 / workload.compulsory_bytes() as f64,
            compile_ms: timed.compile_ms,
            decode: workload.is_decode(),
            read_ms,
            fma_gflops,
            product_gflops,
        }
    });
    Ok(rows.collect())
}

/// The table's comparisons of row `r` with the rows of its workload in `results`: its time over
/// the first-timed ISA's row of the same compiled backend (rows of a later ISA: the "AVX2
/// forced" ratio), and, for a macro row, its speed against the JIT's with the same ISA (the
/// JIT's time over its own; above 1: faster).
fn comparisons(results: &[Row], r: &Row) -> (Option<f64>, Option<f64>) {
    let mut same = results.iter().filter(|o| o.workload == r.workload);
    let first_isa = matches!(r.backend, "jit" | "macro")
        .then(|| same.clone().find(|o| o.backend == r.backend))
        .flatten();
    let vs_first =
        first_isa.filter(|first| first.isa != r.isa).map(|first| r.median_ms / first.median_ms);
    let vs_jit = (r.backend == "macro")
        .then(|| same.find(|o| o.backend == "jit" && o.isa == r.isa))
        .flatten()
        .map(|jit| jit.median_ms / r.median_ms);
    (vs_first, vs_jit)
}

fn render(report: &Report) -> String {
    let m = &report.machine;
    let peaks: Vec<String> = m.peaks.iter().map(|p| format!("{} {:.1}", p.isa, p.gflops)).collect();
    let llc =
        m.llc_bytes.map_or_else(String::new, |b| format!(", last-level cache {} MiB", b >> 20));
    let placed = match m.input_offset {
        0 => "on 64-byte lines".to_owned(),
        floats => format!("{floats} floats past a 64-byte line"),
    };
    let placed = match m.transparent_huge_pages.as_deref() {
        Some(setting @ ("always" | "madvise")) => {
            format!("{placed}, large ones advised for huge pages (THP {setting})")
        }
        Some(setting) => format!("{placed}, in small pages (THP {setting})"),
        None => placed,
    };
    let mut text = format!(
        "machine: {} threads, f32 FMA peak GFLOP/s {}, streaming read {:.1} GB/s (of {} MiB{llc}), micro-kernels {}; inputs {placed}\n\n",
        m.threads,
        peaks.join(", "),
        m.peak_gbs,
        m.probe_bytes >> 20,
        m.isa
    );
    // Only ISAs whose peak is known: with --peak-gflops, the widest timed one alone.
    let peak_of = |isa: &str| m.peaks.iter().find(|p| p.isa == isa).map(|p| p.gflops);
    let cells: Vec<Vec<String>> = report
        .results
        .iter()
        .map(|r| {
            let same = |o: &&Row| o.workload == r.workload;
            let interp = report
                .results
                .iter()
                .filter(same)
                .find(|o| o.backend == "interp")
                .map(|o| o.median_ms);
            let (rate, peak) = if r.decode {
                (format!("{:.1} GB/s", r.gbs), 100.0 * r.gbs / m.peak_gbs)
            } else {
                (format!("{:.1} GFLOP/s", r.gflops), 100.0 * r.gflops / m.peak_gflops)
            };
            let (vs_first, vs_jit) = comparisons(&report.results, r);
            let ratio = |x: Option<f64>| x.map_or_else(String::new, |x| format!("{x:.2}x"));
            let (vs_first, vs_jit) = (ratio(vs_first), ratio(vs_jit));
            // A call with nothing to read or compute (B, Sq or Sk zero) has no share of a
            // ceiling.
            let empty = if r.decode { r.bytes == 0 } else { r.kernel_flops == 0 };
            // The same rounds' ceilings: decode, the median time to read the inputs once over
            // the kernel's; prefill, the kernel's GFLOP/s (of the form it runs) over the FMA
            // loop's and the tile product's medians.
            let same_rounds = match (r.read_ms, r.fma_gflops, r.product_gflops) {
                _ if empty => "-".to_owned(),
                (Some(read), ..) => format!("{:.0}% read", 100.0 * read / r.median_ms),
                (None, Some(fma), Some(product)) => format!(
                    "{:.0}% FMA, {:.0}% tile",
                    100.0 * r.kernel_gflops / fma,
                    100.0 * r.kernel_gflops / product
                ),
                _ => String::new(),
            };
            vec![
                r.workload.clone(),
                r.backend.to_owned(),
                r.isa.to_owned(),
                format!("{:.2}", r.median_ms),
                format!("{:.2}", r.min_ms),
                format!("{:.2}", r.max_ms),
                rate,
                format!("{peak:.0}%"),
                same_rounds,
                format!("{:.1}", r.kernel_gflops),
                peak_of(r.isa)
                    .or((r.isa.is_empty()).then_some(m.peak_gflops))
                    .map_or_else(String::new, |p| format!("{:.0}%", 100.0 * r.kernel_gflops / p)),
                vs_first,
                vs_jit,
                interp.map_or_else(String::new, |i| format!("{:.0}x", i / r.median_ms)),
                r.compile_ms.map_or_else(String::new, |c| format!("{c:.1}")),
            ]
        })
        .collect();
    text.push_str(&table::render(
        &[
            "workload",
            "backend",
            "isa",
            "median ms",
            "min",
            "max",
            "rate",
            "of peak",
            "of same rounds",
            "GFLOP/s run",
            "of ISA peak",
            "time vs 1st isa",
            "speed vs jit",
            "vs interp",
            "compile ms",
        ],
        &[
            false, false, false, true, true, true, true, true, true, true, true, true, true, true,
            true,
        ],
        &cells,
    ));
    text.push_str("Prefill in GFLOP/s (2·B·H·visible pairs·(D+Dv)) of the widest ISA's peak; decode in GB/s of K/V or latent read once, of the start-up probe's bandwidth. Of same rounds: the machine's ceiling while the kernels ran, timed in the same rounds on as many threads, each pinned to a CPU of its own — decode, the time to read the same inputs once (cache, queries, MLA's weights) over the kernel's; prefill, the kernel's GFLOP/s run over the widest ISA's FMA loop's and over its tile product's with every operand in L1 (the ceiling of code that loads its operands).\n");
    text.push_str("GFLOP/s run: the FLOPs of the form the kernel computes for the call (absorbed MLA: q' = q·W_UK, attention over the latent, out = o'·W_UV; expanded MLA: K_h and V_h up-projected per head, then attention over them), against the peak of the row's ISA; the form is in --json.\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of `workload` timed at `median_ms`; the other fields do not enter the comparisons.
    fn row(workload: &str, backend: &'static str, isa: &'static str, median_ms: f64) -> Row {
        Row {
            workload: workload.to_owned(),
            backend,
            isa,
            median_ms,
            min_ms: median_ms,
            max_ms: median_ms,
            runs: 3,
            gflops: 1.0,
            kernel_gflops: 1.0,
            gbs: 1.0,
            flops: 1,
            kernel_flops: 1,
            form: "grouped",
            bytes: 1,
            intensity: 1.0,
            compile_ms: None,
            decode: false,
            read_ms: None,
            fma_gflops: None,
            product_gflops: None,
        }
    }

    /// Each compiled backend's later-ISA row is timed against that backend's first row, and
    /// each macro row against the JIT row of its own ISA; other workloads' rows never enter.
    #[test]
    fn comparisons_pair_rows_of_the_same_backend_isa_and_workload() {
        let results = vec![
            row("W1", "macro", "avx512", 2.0),
            row("W1", "macro", "avx2", 3.0),
            row("W1", "jit", "avx512", 2.5),
            row("W1", "jit", "avx2", 3.3),
            row("W1", "interp", "", 100.0),
            row("W2", "macro", "avx512", 7.0),
            row("W2", "jit", "avx512", 1.0),
        ];
        let at = |i: usize| comparisons(&results, &results[i]);
        let close = |got: Option<f64>, want: f64| got.is_some_and(|x| (x - want).abs() < 1e-12);
        assert_eq!(at(0).0, None, "the first ISA's row has nothing to be timed against");
        assert!(close(at(0).1, 2.5 / 2.0), "{:?}", at(0));
        assert!(close(at(1).0, 3.0 / 2.0) && close(at(1).1, 3.3 / 3.0), "{:?}", at(1));
        assert_eq!(at(2), (None, None));
        assert!(close(at(3).0, 3.3 / 2.5) && at(3).1.is_none(), "{:?}", at(3));
        assert_eq!(at(4), (None, None), "the interpreter has no ISA rows");
        assert!(at(5).0.is_none() && close(at(5).1, 1.0 / 7.0), "{:?}", at(5));
    }
}
