//! [`Executor`]: the call path every backend shares. A backend provides its entry points
//! ([`EntryPoints`], the `abi` functions compiled for one plan) and the plan; the executor
//! checks the call against the spec, sets up the call's buffers (absorbed MLA's `q'` and `o'`,
//! the packed K/V of a prefill read whole), schedules the work items over the thread pool with
//! per-thread scratch, split states and run-packed K/V, and runs prologue → items → finishes →
//! epilogue.
//!
//! How generated code finds a sequence's keys: `CallArgs::seq_k` is the cache tensors' rows
//! per sequence (row j of sequence b is row `b·Sk + j`) and `CallArgs::kv_lens` each
//! sequence's keys, so one call serves a batch of different lengths in a cache with room to
//! grow. The cache layouts still to come slot in at the two places that already vary per
//! product, the IR's `TileSource`: a paged cache (a block table per sequence) changes the
//! in-place row address at each key tile, whose start is a multiple of `k_tile` (pages of a
//! multiple of it never split a tile), and its call-packed copy's source; a bf16/f16 cache
//! reads through the packing step (the copy converts) or through product routines over 16-bit
//! elements. Neither changes this executor's order of work.

use std::ops::Range;

use attngen_codegen::abi::{ALIGN_FLOATS, CallArgs, ExpandFn, FinishFn, HeadFn, ItemFn, PANEL};
use attngen_codegen::plan::CallPacking;
use attngen_codegen::{Form, KernelPlan, KvLayout, LatentCache, MlaForm, Schedule, cost};
use rayon::prelude::*;

use crate::{Error, InputTensors, Inputs, Isa, Shape, check_call, simd};

mod buffers;

use buffers::{LATENT, PACKED, SPLIT_STATES, with_kept, with_kept_in_pool, with_workspace};

/// A thread pool of its own for a kernel (`Jit::with_threads`, `MacroKernel::threads`), each
/// worker pinned to a CPU of its own unless [`crate::cpus`] says otherwise.
///
/// # Errors
/// [`Error::Threads`] for zero threads (rayon would read 0 as every core, a surprise for a
/// count asked for) or when the system cannot start them.
pub(crate) fn own_pool(threads: usize) -> Result<std::sync::Arc<rayon::ThreadPool>, Error> {
    let refuse = |reason: String| Error::Threads { threads, reason };
    if threads == 0 {
        return Err(refuse(
            "a pool needs at least one thread (leave the count unset for every core)".into(),
        ));
    }
    let cpus = crate::cpus::for_pool(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(move |worker| {
            if let Some(cpus) = &cpus {
                crate::cpus::pin_current_thread(cpus[worker]);
            }
        })
        .build();
    Ok(std::sync::Arc::new(pool.map_err(|e| refuse(e.to_string()))?))
}

/// A kernel's generated functions for one plan, as `attngen_codegen::abi` types them: `item`
/// and `finish`, for absorbed MLA the per-head `prologue` and `epilogue`, and for expanded MLA
/// the per-tile `expand`.
#[derive(Clone, Copy, Debug)]
pub struct EntryPoints {
    /// Absorbs the queries of one head (absorbed MLA).
    pub prologue: Option<HeadFn>,
    /// Runs one work item.
    pub item: ItemFn,
    /// Merges a task's splits and stores its rows.
    pub finish: FinishFn,
    /// Projects the latent output of one head (absorbed MLA).
    pub epilogue: Option<HeadFn>,
    /// Up-projects one key tile of one (batch, head) task (expanded MLA).
    pub expand: Option<ExpandFn>,
}

/// One form of a compiled kernel: its plan and the functions generated from it.
pub(crate) struct CompiledForm {
    /// The plan.
    pub plan: KernelPlan,
    /// Its functions.
    pub entries: EntryPoints,
}

/// Runs a call on the form of `forms` (one per [`Form::compiled`]) that suits its shape: the
/// only one, or the one [`cost::form_costs`] finds cheaper at (B, Sq, Sk) on `threads` threads
/// of `isa`'s width.
pub(crate) fn run_call(
    forms: &[CompiledForm],
    isa: Isa,
    pool: Option<&rayon::ThreadPool>,
    shape: Shape,
    inputs: &Inputs<'_>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<(), Error> {
    let form = pick_form(forms, isa, pool, shape);
    Executor { plan: &form.plan, entries: &form.entries, pool }.run(shape, inputs, out, lse)
}

/// The form of `forms` that runs a call of `shape` ([`run_call`]).
pub(crate) fn pick_form<'a>(
    forms: &'a [CompiledForm],
    isa: Isa,
    pool: Option<&rayon::ThreadPool>,
    shape: Shape,
) -> &'a CompiledForm {
    let [first, rest @ ..] = forms else { unreachable!("a kernel compiles at least one form") };
    if rest.is_empty() {
        return first;
    }
    let form = match call_costs(&first.plan.spec, isa, pool, shape).map(|c| c.choice()) {
        Some(MlaForm::Expanded) => Form::LatentExpanded,
        _ => Form::LatentAbsorbed,
    };
    forms.iter().find(|f| f.plan.form == form).unwrap_or(first)
}

/// The cost model's figures for a call of `shape` to a latent `spec` on `isa` and the pool's
/// threads ([`cost::Machine::estimate`]); `None` for grouped specs.
pub(crate) fn call_costs(
    spec: &attngen_codegen::AttentionSpec,
    isa: Isa,
    pool: Option<&rayon::ThreadPool>,
    shape: Shape,
) -> Option<cost::FormCosts> {
    let threads = pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
    let machine = cost::Machine::estimate(isa.lanes(), threads);
    let (b, q, k) = (shape.batch as u64, shape.seq_q as u64, shape.seq_k as u64);
    cost::form_costs(spec, b, q, k, machine)
}

/// Runs calls of one compiled kernel: its plan, its entry points and the pool its work items
/// run on (rayon's global pool when `None`).
pub(crate) struct Executor<'a> {
    /// The plan the entry points were compiled from.
    pub plan: &'a KernelPlan,
    /// The generated functions.
    pub entries: &'a EntryPoints,
    /// The kernel's own thread pool, if it has one.
    pub pool: Option<&'a rayon::ThreadPool>,
}

impl Executor<'_> {
    /// [`crate::Kernel::run`] of the plan's spec: checks every buffer with [`check_call`]
    /// before anything is read or written, then runs the call.
    pub fn run(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), Error> {
        let spec = &self.plan.spec;
        check_call(spec, shape, inputs, out.len(), lse.as_deref().map(<[f32]>::len))?;
        if shape.batch == 0 || shape.seq_q == 0 {
            return Ok(());
        }
        let empty: &[f32] = &[];
        let (q, k, v, c_kv, k_rope, w_uk, w_uv) = match inputs.tensors {
            InputTensors::Grouped { q, k, v } => (q, k, v, empty, empty, empty, empty),
            InputTensors::Latent { q, c_kv, k_rope, w_uk, w_uv } => {
                (q, empty, empty, c_kv, k_rope, w_uk, w_uv)
            }
        };
        // A combined latent cache's RoPE keys are the tail of each `c_kv` row: generated code
        // reads them `rank` floats in, a row apart (`KernelPlan::cache_row`), so row t's
        // `rope_dim` floats end where c_kv's row t does, inside the length `check_call` checked.
        let k_rope = match spec.kv {
            KvLayout::Latent(l) if l.cache == LatentCache::Combined => {
                c_kv.as_ptr().wrapping_add(l.rank)
            }
            _ => k_rope.as_ptr(),
        };
        let args = CallArgs {
            q: q.as_ptr(),
            k: k.as_ptr(),
            v: v.as_ptr(),
            c_kv: c_kv.as_ptr(),
            k_rope,
            w_uk: w_uk.as_ptr(),
            w_uv: w_uv.as_ptr(),
            out: out.as_mut_ptr(),
            lse: lse.map_or(std::ptr::null_mut(), |l| l.as_mut_ptr()),
            k_packed: std::ptr::null(),
            v_packed: std::ptr::null(),
            packed_first_key: 0,
            weights_t: std::ptr::null_mut(),
            latent_q: std::ptr::null_mut(),
            latent_out: std::ptr::null_mut(),
            batch: shape.batch,
            seq_q: shape.seq_q,
            seq_k: shape.seq_k,
            kv_lens: inputs.kv_lens.map_or(std::ptr::null(), <[usize]>::as_ptr),
        };
        let plan = self.plan;
        // Absorbed MLA's q' and o' buffers, each latent_len floats (0 for grouped specs), o'
        // from the first cache line after q'.
        let lens = plan.latent_len(shape.batch, shape.seq_q);
        let both = |n: usize| n.checked_next_multiple_of(ALIGN_FLOATS)?.checked_mul(2);
        let too_large = || Error::TooLarge {
            tensor: "q' and o' (absorbed MLA)",
            shape: vec![2, shape.batch, shape.seq_q, spec.q_heads, plan.acc_dim],
        };
        let Some((latent_len, both)) = lens.and_then(|n| Some((n, both(n)?))) else {
            return Err(too_large());
        };
        if latent_len == 0 {
            return self.run_checked(shape, inputs, args, k, v);
        }
        let latent = with_kept(&LATENT, both, |latent| {
            let (latent_q, latent_out) = latent.split_at_mut(both / 2);
            let args = CallArgs {
                latent_q: latent_q.as_mut_ptr(),
                latent_out: latent_out.as_mut_ptr(),
                ..args
            };
            self.run_checked(shape, inputs, args, k, v)
        });
        latent.ok_or_else(too_large)?
    }

    /// Runs a call whose buffers `check_call` verified (and, for absorbed MLA, whose latent
    /// buffers hold `plan.latent_len` floats each): the prologue per head, the work items and
    /// finishes, the epilogue per head. `k` and `v` are the grouped caches `args` points to.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when a call buffer (the packed K/V, expanded MLA's transposed
    /// weights) cannot be allocated; nothing is written then.
    fn run_checked(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        args: CallArgs,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), Error> {
        let plan = self.plan;
        let threads =
            self.pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        // Work is split by the longest sequence's keys; a shorter one's items past its end
        // find no visible key and leave an empty state.
        let longest =
            inputs.kv_lens.map_or(shape.seq_k, |lens| lens.iter().copied().max().unwrap_or(0));
        let schedule = plan.schedule(shape.batch, shape.seq_q, longest, threads);
        if plan.form == Form::LatentExpanded {
            return self.execute_expanded(shape, inputs, longest, SharedArgs(args), schedule);
        }
        let pack = plan.call_packing.filter(|_| schedule.packs_call);
        let pack = pack.map(|packing| CallPack { packing, shape, inputs, k, v });
        let Some(call_pack) = pack.as_ref().filter(|_| !schedule.divides_keys()) else {
            // Divided keys are packed run by run, into each split's thread's buffer.
            self.execute(shape, longest, SharedArgs(args), schedule, pack.as_ref());
            return Ok(());
        };
        // Unsplit, every (batch, KV head) packs all its keys into its part of one call buffer:
        // K parts, then V parts.
        let (k_len, v_len) = call_pack.head_lens();
        let heads = shape.batch * call_pack.packing.kv_heads;
        let lens = heads.checked_mul(k_len).zip(heads.checked_mul(v_len));
        let packed = lens.and_then(|(k_all, v_all)| {
            with_kept(&PACKED, k_all.checked_add(v_all)?, |packed| {
                let (k_packed, v_packed) = packed.split_at_mut(k_all);
                // Writable pointers: the tasks fill the buffer (`CallPack::pack`).
                let args = CallArgs {
                    k_packed: k_packed.as_mut_ptr(),
                    v_packed: v_packed.as_mut_ptr(),
                    ..args
                };
                self.execute(shape, longest, SharedArgs(args), schedule, pack.as_ref());
            })
        });
        packed.ok_or_else(|| {
            let key_floats = call_pack.packing.key_width + call_pack.packing.value_width;
            let shape = vec![heads, shape.seq_k.next_multiple_of(plan.k_tile), key_floats];
            Error::TooLarge { tensor: "packed K and V", shape }
        })
    }

    /// Runs `f` on this kernel's thread pool (the global one by default).
    fn in_pool(&self, f: impl FnOnce() + Send) {
        match self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// Runs every work item and finish of a checked call whose longest sequence has `longest`
    /// keys; with `pack`, the call's packed K/V at `args` is empty, and each (batch, KV head)
    /// fills its part before its items run.
    fn execute(
        &self,
        shape: Shape,
        longest: usize,
        args: SharedArgs,
        schedule: Schedule,
        pack: Option<&CallPack<'_>>,
    ) {
        let (entries, plan) = (self.entries, self.plan);
        let per_item = schedule.groups_per_item;
        let blocks = plan.groups.len() / per_item;
        let tasks = shape.batch * blocks * schedule.q_tiles;
        let (state_len, splits) = (plan.state_len, schedule.splits);
        let scratch_len = plan.scratch.len(per_item);
        // One work item: the rows of groups g0..g0 + per_item of sequence b from query q0, over
        // keys k_lo..k_hi, into per_item state slots from the start of `states` (carrying on
        // the states there when it `resumes`); `call` is the call's arguments or a task's (its
        // packed K/V).
        let item = |call: &SharedArgs,
                    (b, g0, q0): (usize, usize, usize),
                    (k_lo, k_hi): (usize, usize),
                    resumes: bool,
                    scratch: &mut [f32],
                    states: &mut [f32]| {
            assert!(scratch.len() >= scratch_len && states.len() >= per_item * state_len);
            // Only a row-major state resumes (`ItemFn`): never absorbed MLA's transposed one.
            assert!(!resumes || !plan.state.transposed);
            // SAFETY: `check_call` verified every buffer against `shape`; the generated
            // code reads and writes only within those tensors for b < B, q0 < Sq, keys
            // 0..kv_lens[b] <= Sk (Sk without kv_lens; `check_call` bounded each length;
            // its key range, from the start of the tile holding k_lo) and the heads
            // of groups g0..g0 + per_item < groups; within the task's packed K/V when set
            // (filled before its items start, holding every key they read: `CallPack`);
            // within `scratch` (the plan's size for per_item groups) and per_item state slots
            // of state_len floats, state_len apart (asserted above). Addresses past a tensor
            // are only ever prefetched. A resuming item's slots hold the states an item of the
            // same rows left over the keys before k_lo, row-major (asserted above).
            unsafe {
                (entries.item)(
                    call.ptr(),
                    b,
                    g0,
                    per_item,
                    q0,
                    k_lo,
                    k_hi,
                    scratch.as_mut_ptr(),
                    states.as_mut_ptr(),
                    state_len,
                    usize::from(resumes),
                )
            };
        };
        let finish = |at, states: &mut [f32], stride, scratch: &mut [f32]| {
            self.finish(&args, at, splits, (states, stride), scratch)
        };
        // A task's states: `splits` blocks of `per_item` group slots ([split][group]), so each
        // split's item writes one contiguous block.
        let run_task = |call: &SharedArgs, task: usize| {
            let (b, rest) =
                (task / (blocks * schedule.q_tiles), task % (blocks * schedule.q_tiles));
            let (block, tile) = (rest / schedule.q_tiles, rest % schedule.q_tiles);
            let (g0, q0) = (block * per_item, tile * plan.q_tile);
            let finish_all = |states: &mut [f32], scratch: &mut [f32]| {
                for i in 0..per_item {
                    let stride = per_item * state_len;
                    finish((b, g0 + i, q0), &mut states[i * state_len..], stride, scratch);
                }
            };
            let states_len = splits * per_item * state_len;
            if splits == 1 {
                with_workspace(scratch_len + states_len, |work| {
                    let (scratch, states) = work.split_at_mut(scratch_len);
                    item(call, (b, g0, q0), (0, longest), false, scratch, states);
                    finish_all(states, scratch);
                });
                return;
            }
            with_kept_in_pool(&SPLIT_STATES, states_len, |states| {
                let blocks = states.par_chunks_mut(per_item * state_len).enumerate();
                blocks.for_each(|(split, block)| {
                    with_workspace(scratch_len, |scratch| {
                        item(
                            call,
                            (b, g0, q0),
                            schedule.split(split, longest),
                            false,
                            scratch,
                            block,
                        )
                    });
                });
                with_workspace(scratch_len, |scratch| finish_all(states, scratch));
            });
        };
        // Every query tile of one (batch, KV head) of a prefill with long shared keys, split by
        // split and run by run: a run's keys are packed into its thread's buffer and every
        // tile's item runs over them while they are in cache, carrying on the state its item
        // over the run before left (`Schedule::keys_per_run`). States [split][tile].
        let run_shared_splits = |pack: &CallPack<'_>, b: usize, g: usize| {
            let q_tiles = schedule.q_tiles;
            let run_split = |split: usize, states: &mut [f32]| {
                let (k_lo, k_hi) = schedule.split(split, longest);
                for (run, (r_lo, r_hi)) in schedule.runs(k_lo, k_hi).enumerate() {
                    let keys = pack.keys_read(plan, b, r_lo, r_hi);
                    let (k_len, v_len) = pack.packing.lens(keys.start, keys.end);
                    with_kept_in_pool(&PACKED, k_len + v_len, |packed| {
                        let (k_dst, v_dst) = packed.split_at_mut(k_len);
                        pack.pack(b, g, keys.clone(), k_dst, v_dst, false);
                        let call = args.with_packed(k_dst, v_dst, keys.start);
                        with_workspace(scratch_len, |scratch| {
                            for tile in 0..q_tiles {
                                let at = (b, g, tile * plan.q_tile);
                                let states = &mut states[tile * state_len..];
                                item(&call, at, (r_lo, r_hi), run > 0, scratch, states);
                            }
                        });
                    });
                }
            };
            let finish_tile =
                |tile: usize, states: &mut [f32], stride: usize, scratch: &mut [f32]| {
                    finish((b, g, tile * plan.q_tile), states, stride, scratch)
                };
            split_outer((splits, q_tiles, state_len, scratch_len), run_split, finish_tile);
        };
        if let Some(prologue) = entries.prologue {
            // Every q' row is written before any item reads it: the items start after this
            // parallel loop returns.
            self.for_each_head(prologue, &args);
        }
        if let Some(pack) = pack {
            // One task per (batch, KV head) packs its keys, then runs its query tiles: one
            // head's copy overlaps other heads' items, and is still in cache when its own read
            // it. Packing every head first, then running every item, took 1.02–1.06× the time
            // on W1 and W2 (2 threads, alternating calls; 1 thread: W2 1.03×, W1 1.00×). Long
            // keys go run by run (`run_shared_splits`), each run's keys in cache.
            let (k_len, v_len) = pack.head_lens();
            let q_tiles = schedule.q_tiles;
            self.in_pool(|| {
                (0..shape.batch * blocks).into_par_iter().for_each(|head| {
                    // groups_per_item is 1 when the call packs: `head` is (b, g).
                    let (b, g) = (head / blocks, head % blocks);
                    if schedule.divides_keys() {
                        return run_shared_splits(pack, b, g);
                    }
                    // SAFETY: `run_checked` made k_packed and v_packed from writable buffers of
                    // batch·kv_heads parts of k_len and v_len floats (`CallPack::head_lens`),
                    // one per (batch, KV head). Only this task touches part `head` until
                    // `pack` returns — its items, the only readers of that part, start after
                    // — and other tasks and their items touch only their own parts.
                    let (k_dst, v_dst) = unsafe {
                        let (k_packed, v_packed) = args.packed();
                        (
                            std::slice::from_raw_parts_mut(k_packed.add(head * k_len), k_len),
                            std::slice::from_raw_parts_mut(v_packed.add(head * v_len), v_len),
                        )
                    };
                    let keys = pack.keys_read(plan, b, 0, longest);
                    pack.pack(b, g, keys.clone(), k_dst, v_dst, true);
                    let call = args.with_packed(k_dst, v_dst, keys.start);
                    let tiles = 0..q_tiles;
                    tiles.into_par_iter().for_each(|tile| run_task(&call, head * q_tiles + tile));
                })
            });
        } else if tasks == 1 && splits == 1 {
            // One work item (a short decode call): run it here rather than wake a pool thread
            // and wait for it.
            run_task(&args, 0);
        } else {
            self.in_pool(|| (0..tasks).into_par_iter().for_each(|task| run_task(&args, task)));
        }
        if let Some(epilogue) = entries.epilogue {
            self.for_each_head(epilogue, &args);
        }
    }

    /// Runs an expanded MLA call: the prologue transposes each head's weights into a call
    /// buffer (`CallArgs::weights_t`); then one task per (batch, head) (or per split of its
    /// keys, when the tasks are fewer than the threads), each of whose runs up-projects the
    /// keys its queries see into a buffer of its own, tile by tile (`expand`), then runs every
    /// query tile's item over that buffer — so each visible key is up-projected once per head,
    /// as materialising K and V once per call would, but the buffer holds one head's keys of
    /// one run and stays in cache. Finishes run per query tile.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the weights' copy cannot be allocated; nothing runs then.
    fn execute_expanded(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        longest: usize,
        args: SharedArgs,
        schedule: Schedule,
    ) -> Result<(), Error> {
        let (entries, plan) = (self.entries, self.plan);
        let (per_head, _) = plan.transposed_weights().expect("expanded plans transpose weights");
        let prologue = entries.prologue.expect("expanded plans have a prologue");
        // The weights' copy is the size of w_uk and w_uv (in whole panels), which `check_call`
        // found in memory: the product fits.
        let heads = plan.spec.q_heads;
        let expanded = with_kept(&LATENT, per_head * heads, |weights_t| {
            let args = SharedArgs(CallArgs { weights_t: weights_t.as_mut_ptr(), ..args.0 });
            // Every head's copy is written before any task reads it: the tasks start after
            // this parallel loop returns.
            self.for_each_head(prologue, &args);
            self.expanded_tasks(shape, inputs, longest, &args, schedule);
        });
        expanded.ok_or(Error::TooLarge {
            tensor: "w_uk and w_uv (transposed)",
            shape: vec![heads, per_head],
        })
    }

    /// The (batch, head) tasks of an expanded call whose `args.weights_t` the prologue filled.
    fn expanded_tasks(
        &self,
        shape: Shape,
        inputs: &Inputs<'_>,
        longest: usize,
        args: &SharedArgs,
        schedule: Schedule,
    ) {
        let (entries, plan) = (self.entries, self.plan);
        let expand = entries.expand.expect("expanded plans have an expand program");
        let packing = plan.call_packing.expect("expanded plans have a per-task packing");
        let heads = plan.groups.len();
        let (q_tiles, splits, state_len) = (schedule.q_tiles, schedule.splits, plan.state_len);
        let scratch_len = plan.scratch.len(1);
        // Each query tile's item runs once, over the task's keys whole.
        let only = !schedule.divides_keys();
        let (k_tile, key_width, value_tile) =
            (packing.k_tile, packing.key_width, packing.value_tile());
        let run_task = |task: usize| {
            let (b, h) = (task / heads, task % heads);
            let keys_b = inputs.keys(b, shape.seq_k);
            // Query tile `tile`'s finish, its `splits` slots starting at `states` and
            // `stride` floats apart.
            let finish = |tile: usize, states: &mut [f32], stride: usize, scratch: &mut [f32]| {
                self.finish(args, (b, h, tile * plan.q_tile), splits, (states, stride), scratch)
            };
            // One run: keys r_lo..r_hi, up-projected, then every query tile's item over them.
            let expanded_run = |r_lo: usize, r_hi: usize, resumes: bool, states: &mut [f32]| {
                let Range { start: first, end } = plan.packed_keys(shape.seq_q, keys_b, r_lo, r_hi);
                let tiles = (end - first).div_ceil(k_tile);
                let (k_len, v_len) = packing.lens(first, end);
                with_workspace(scratch_len + k_len + v_len, |work| {
                    let (scratch, packed) = work.split_at_mut(scratch_len);
                    let (keys, values) = packed.split_at_mut(k_len);
                    for tile in 0..tiles {
                        let j0 = first + tile * k_tile;
                        let n = k_tile.min(end - j0);
                        let (k_dst, v_dst) = (
                            &mut keys[tile * k_tile * key_width..],
                            &mut values[tile * value_tile..],
                        );
                        assert!(k_dst.len() >= n * key_width && v_dst.len() >= value_tile);
                        // SAFETY: `check_call` verified c_kv, k_rope, w_uk and w_uv against the
                        // shape (a combined cache's k_rope is the tail of each c_kv row, whose
                        // length covers it); b < B, h < H, and keys j0..j0 + n <= kv_lens[b]
                        // (or Sk) are rows of sequence b; the destinations hold n rows of D floats and one
                        // value tile (k_tile rows of Dv, row-major) (asserted above).
                        unsafe {
                            expand(args.ptr(), b, h, j0, n, k_dst.as_mut_ptr(), v_dst.as_mut_ptr())
                        };
                    }
                    // The task's copy: keys first..end, tile t at t·k_tile·D and t·value_tile.
                    let task_args = args.with_packed(keys, values, first);
                    for tile in 0..q_tiles {
                        let state = &mut states[if only { 0 } else { tile * state_len }..];
                        assert!(state.len() >= state_len && !plan.state.transposed);
                        // SAFETY: as for the grouped items (`execute`), for one group (head h);
                        // the item reads the packed K/V only at keys of its tiles that its
                        // queries see within r_lo..r_hi — tiles from `first` (the tile holding
                        // the first such key) to `end`, all written above — through
                        // `task_args`, which points at this run's buffers; its state slot
                        // holds state_len floats (asserted above), the state the tile's item
                        // over the run before left when it resumes (row-major, asserted).
                        unsafe {
                            (entries.item)(
                                task_args.ptr(),
                                b,
                                h,
                                1,
                                tile * plan.q_tile,
                                r_lo,
                                r_hi,
                                scratch.as_mut_ptr(),
                                state.as_mut_ptr(),
                                state_len,
                                usize::from(resumes),
                            )
                        };
                        if only {
                            finish(tile, state, state_len, scratch);
                        }
                    }
                });
            };
            // One split of every query tile, run by run (`keys_per_run`): a
            // run's keys are up-projected into this thread's buffer, then every query tile's
            // item runs over them, carrying on the state its item over the run before left.
            // The call's only run finishes each query tile right after its item, while its
            // state is in cache, so every tile uses slot 0; otherwise tile t's state stays in
            // slot t for the runs after and the merge.
            let split = |split: usize, states: &mut [f32]| {
                assert!(states.len() >= if only { state_len } else { q_tiles * state_len });
                let (k_lo, k_hi) = schedule.split(split, longest);
                for (run, (r_lo, r_hi)) in schedule.runs(k_lo, k_hi).enumerate() {
                    expanded_run(r_lo, r_hi, run > 0, states);
                }
            };
            if only {
                with_kept_in_pool(&SPLIT_STATES, state_len, |state| split(0, state));
                return;
            }
            split_outer((splits, q_tiles, state_len, scratch_len), split, finish);
        };
        let tasks = shape.batch * heads;
        if tasks == 1 && only {
            run_task(0);
        } else {
            self.in_pool(|| (0..tasks).into_par_iter().for_each(run_task));
        }
    }

    /// Group `g`'s rows of sequence `b` from query `q0`: merges its `splits` state slots, the
    /// first at the start of `states` and each `stride` floats after the last, and stores them
    /// through `args`.
    fn finish(
        &self,
        args: &SharedArgs,
        (b, g, q0): (usize, usize, usize),
        splits: usize,
        (states, stride): (&mut [f32], usize),
        scratch: &mut [f32],
    ) {
        let fits = states.len() >= (splits - 1) * stride + self.plan.state_len;
        assert!(fits && scratch.len() >= self.plan.scratch.len(1));
        // SAFETY: as for the work items (`execute`), for one group: `check_call` verified
        // `out` and `lse` against the call's shape, b < B, q0 < Sq and g < groups; the
        // `splits` slots of state_len floats lie `stride` apart inside `states`, and `scratch`
        // holds one group's scratch (asserted above).
        unsafe {
            (self.entries.finish)(
                args.ptr(),
                b,
                g,
                q0,
                splits,
                states.as_mut_ptr(),
                stride,
                scratch.as_mut_ptr(),
            )
        };
    }

    /// Runs a per-head program (absorbed MLA's prologue or epilogue) for every query head, in
    /// parallel.
    fn for_each_head(&self, program: HeadFn, args: &SharedArgs) {
        let heads = self.plan.spec.q_heads;
        self.in_pool(|| {
            (0..heads).into_par_iter().for_each(|head| {
                // SAFETY: `check_call` verified q, w_uk, w_uv and out against the call's shape,
                // and `run` made latent_q and latent_out `plan.latent_len` floats each (absorbed
                // MLA), or `execute_expanded` weights_t `transposed_weights` floats per head
                // (expanded MLA). Head h's program reads q's, latent_out's and the weights'
                // slices of head h and writes only head h's slice of latent_q or weights_t
                // (prologue) or out (epilogue), for every (batch, query) row: the heads running
                // in parallel write disjoint elements. The epilogue runs after every finish
                // has written latent_out.
                unsafe { program(args.ptr(), head) }
            })
        });
    }
}

/// The call's tensors for generated code, shareable across the worker threads.
struct SharedArgs(CallArgs);

// SAFETY: the pointers in CallArgs come from the `&[f32]` inputs and `&mut [f32]` outputs of one
// `run` call and from its packed K/V, latent and transposed-weight buffers, which outlive every
// worker (rayon joins before `run` returns). Workers only read the inputs, latent_q and
// weights_t (each written before the items start), and write disjoint parts of `out`, `lse`
// and `latent_out`: each (batch, group, query tile) task owns the rows of its group's heads and
// its queries, and every head belongs to one group; the per-head prologue and epilogue write
// one head's slice each. An unsplit call's packed K/V is written in disjoint (batch, KV head)
// parts, each by one task before the items that read it start, through a CallArgs of that
// task's own (`SharedArgs::with_packed`), as are a run's packed keys and an expanded run's
// up-projection, in buffers of the thread that fills them and runs their items (`execute`,
// `expanded_tasks`), which outlive those items.
unsafe impl Sync for SharedArgs {}

impl SharedArgs {
    fn ptr(&self) -> *const CallArgs {
        &self.0
    }

    /// The call's packed K and V, writable (`run_checked` made them from mutable buffers).
    fn packed(&self) -> (*mut f32, *mut f32) {
        (self.0.k_packed.cast_mut(), self.0.v_packed.cast_mut())
    }

    /// A task's arguments: the call's, reading the task's packed K and V from key `first`.
    fn with_packed(&self, k_packed: &[f32], v_packed: &[f32], first: usize) -> SharedArgs {
        let (k_packed, v_packed) = (k_packed.as_ptr(), v_packed.as_ptr());
        SharedArgs(CallArgs { k_packed, v_packed, packed_first_key: first, ..self.0 })
    }
}

/// A call's grouped K and V, to be packed once as [`CallPacking`] lays them out, (batch, KV
/// head) by (batch, KV head), with the same copy routine items use. Only each sequence's keys
/// are copied: items never read a packed row past them.
struct CallPack<'a> {
    packing: CallPacking,
    shape: Shape,
    inputs: &'a Inputs<'a>,
    k: &'a [f32],
    v: &'a [f32],
}

impl CallPack<'_> {
    /// Floats of one (batch, KV head)'s part of the unsplit call's packed K and of its packed
    /// V: whole key tiles of Sk.
    fn head_lens(&self) -> (usize, usize) {
        self.packing.lens(0, self.shape.seq_k)
    }

    /// The keys of sequence `b` that a run over `k_lo..k_hi` packs ([`KernelPlan::packed_keys`]).
    fn keys_read(&self, plan: &KernelPlan, b: usize, k_lo: usize, k_hi: usize) -> Range<usize> {
        let keys = self.inputs.keys(b, self.shape.seq_k);
        plan.packed_keys(self.shape.seq_q, keys, k_lo, k_hi)
    }

    /// Packs keys `keys` (`keys.start` a multiple of `k_tile`; at most the sequence's) of
    /// (batch `b`, KV head `g`) into `k_packed` and `v_packed` ([`CallPacking::lens`] floats
    /// of them each), a key tile per task when `parallel`.
    fn pack(
        &self,
        b: usize,
        g: usize,
        keys: Range<usize>,
        k_packed: &mut [f32],
        v_packed: &mut [f32],
        parallel: bool,
    ) {
        let CallPack { packing, shape, k, v, .. } = self;
        let CallPacking { k_tile, kv_heads: kv, key_width: d, value_width: dv, .. } = *packing;
        let value_tile = packing.value_tile();
        assert!(keys.start.is_multiple_of(k_tile) && keys.end <= self.inputs.keys(b, shape.seq_k));
        let (k_len, v_len) = packing.lens(keys.start, keys.end);
        // Key tile `tile`: rows j0..j0 + n at tile·k_tile·D of the packed K, its values at
        // tile·value_tile of the packed V.
        let pack_tile = |tile: usize, k_dst: &mut [f32], v_dst: &mut [f32]| {
            let j0 = keys.start + tile * k_tile;
            let n = k_tile.min(keys.end - j0);
            let k_src = &k[((b * shape.seq_k + j0) * kv + g) * d..];
            let v_src = &v[((b * shape.seq_k + j0) * kv + g) * dv..];
            // Rows j0..j0 + n of head g, `kv` heads apart.
            assert!(k_src.len() >= (n - 1) * kv * d + d && v_src.len() >= (n - 1) * kv * dv + dv);
            assert!(k_dst.len() >= n * d && v_dst.len() >= value_tile);
            // SAFETY: the asserts above: n source rows of d (dv) floats, kv·d (kv·dv) apart,
            // and destinations of n·d floats (row-major) and one panel tile (k_tile rows of dv
            // floats in PANEL-column panels).
            unsafe {
                simd::pack_rows(n, d, k_src.as_ptr(), kv * d, k_dst.as_mut_ptr(), d, PANEL);
                simd::pack_rows(
                    n,
                    dv,
                    v_src.as_ptr(),
                    kv * dv,
                    v_dst.as_mut_ptr(),
                    PANEL,
                    packing.value_panel(),
                );
            }
        };
        let (k_packed, v_packed) = (&mut k_packed[..k_len], &mut v_packed[..v_len]);
        if parallel {
            let k_tiles = k_packed.par_chunks_mut(k_tile * d);
            let tiles = k_tiles.zip(v_packed.par_chunks_mut(value_tile)).enumerate();
            tiles.for_each(|(tile, (k_dst, v_dst))| pack_tile(tile, k_dst, v_dst));
        } else {
            let k_tiles = k_packed.chunks_mut(k_tile * d);
            let tiles = k_tiles.zip(v_packed.chunks_mut(value_tile)).enumerate();
            tiles.for_each(|(tile, (k_dst, v_dst))| pack_tile(tile, k_dst, v_dst));
        }
    }
}

/// Runs one task's `splits` key splits, each over all `q_tiles` of its query tiles, then each
/// tile's finish: `run_split(split, block)` fills `block`, the split's `q_tiles` state slots
/// (`state_len` floats each), splits in parallel; `finish(tile, states, stride, scratch)` merges
/// the tile's slots, which start at `states` and lie `stride` floats apart. The states are
/// [split][query tile], so a split writes one contiguous block.
fn split_outer(
    (splits, q_tiles, state_len, scratch_len): (usize, usize, usize, usize),
    run_split: impl Fn(usize, &mut [f32]) + Sync + Send,
    finish: impl Fn(usize, &mut [f32], usize, &mut [f32]),
) {
    let stride = q_tiles * state_len;
    with_kept_in_pool(&SPLIT_STATES, splits * stride, |states| {
        let blocks = states.par_chunks_mut(stride).enumerate();
        blocks.for_each(|(split, block)| run_split(split, block));
        with_workspace(scratch_len, |scratch| {
            for tile in 0..q_tiles {
                finish(tile, &mut states[tile * state_len..], stride, scratch);
            }
        });
    });
}
