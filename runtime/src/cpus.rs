//! Where threads run: the CPUs this process may use, and pinning a thread to one of them.
//!
//! A kernel's own pool ([`crate::JitOptions::threads`], [`crate::MacroKernel::threads`]) pins
//! each worker to a CPU of its own, so the scheduler cannot stack two of them on one CPU after
//! other threads have run (on a 2-vCPU Zen 5, a 0.3 ms decode took 0.69–0.76 ms unpinned after
//! two pinned threads had run, 0.39–0.52 pinned). `ATTNGEN_PIN=0` leaves placement to the
//! system.
//!
//! ```
//! let cpus = attngen::cpus::allowed();
//! // On Linux, the calling thread's affinity mask; elsewhere empty.
//! assert!(cpus.windows(2).all(|pair| pair[0] < pair[1]));
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

/// The CPUs the calling thread may run on (on Linux its affinity mask), in increasing order;
/// empty where the system does not say.
pub fn allowed() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed `cpu_set_t` is a valid empty set; `sched_getaffinity` writes at most
        // `size_of::<cpu_set_t>()` bytes into it, and `CPU_ISSET` reads bit `cpu` of it, for
        // `cpu` below `CPU_SETSIZE`, the set's size in bits.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Vec::new();
            }
            let size = libc::CPU_SETSIZE as usize;
            (0..size).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
        }
    }
    #[cfg(not(target_os = "linux"))]
    Vec::new()
}

/// Pins the calling thread to `cpu` (one of [`allowed`]); returns whether the system did. A
/// thread the system does not pin runs where the scheduler puts it, as it would elsewhere
/// than on Linux.
pub fn pin_current_thread(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: the set is built in place from a zeroed (empty) one, with bit `cpu` below
        // `CPU_SETSIZE` (checked above); pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

/// The CPU each of a new pool's `threads` workers is pinned to, or `None` to leave them
/// unpinned: when `ATTNGEN_PIN` is `0`, when the system does not say which CPUs are allowed,
/// or when the workers outnumber them. Pools take the allowed CPUs in turn (see [`spread`]).
pub(crate) fn for_pool(threads: usize) -> Option<Vec<usize>> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    if std::env::var("ATTNGEN_PIN").is_ok_and(|pin| pin.trim() == "0") {
        return None;
    }
    let cpus = allowed();
    let first = NEXT.fetch_add(threads, Ordering::Relaxed);
    spread(threads, &cpus, first)
}

/// `threads` workers on `cpus` from the `first`-th on, wrapping round: pools that take their
/// `first` in turn share the CPUs out, so two pools of two threads on a 64-CPU machine run on
/// CPUs 0–1 and 2–3, not both on 0–1. `None` when there are no CPUs to name or too few for a
/// CPU each.
fn spread(threads: usize, cpus: &[usize], first: usize) -> Option<Vec<usize>> {
    if cpus.is_empty() || threads > cpus.len() {
        return None;
    }
    Some((0..threads).map(|worker| cpus[(first + worker) % cpus.len()]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_take_the_cpus_in_turn_and_never_share_one_within_a_pool() {
        let cpus = [0, 1, 4, 5];
        assert_eq!(spread(2, &cpus, 0), Some(vec![0, 1]));
        assert_eq!(spread(2, &cpus, 2), Some(vec![4, 5]));
        assert_eq!(spread(3, &cpus, 2), Some(vec![4, 5, 0]));
        assert_eq!(spread(4, &cpus, 5), Some(vec![1, 4, 5, 0]));
        // More workers than CPUs, or no CPUs known: the system places them.
        assert_eq!(spread(5, &cpus, 0), None);
        assert_eq!(spread(1, &[], 0), None);
    }

    /// A kernel's own pool, built as `Jit::with_threads` builds it, runs each worker on one CPU
    /// of its own (on Linux, with at least two CPUs allowed and `ATTNGEN_PIN` not `0`).
    #[test]
    fn a_pools_workers_each_run_on_a_cpu_of_their_own() {
        let cpus = allowed();
        let off = std::env::var("ATTNGEN_PIN").is_ok_and(|pin| pin.trim() == "0");
        if cpus.len() < 2 || off {
            println!(
                "skipped: pinning a pool's workers ({} CPUs allowed, ATTNGEN_PIN=0: {off})",
                cpus.len()
            );
            return;
        }
        let pool = crate::exec::own_pool(2).expect("two threads start");
        let masks = pool.broadcast(|_| allowed());
        assert!(masks.iter().all(|mask| mask.len() == 1), "{masks:?}");
        assert_ne!(masks[0], masks[1], "{masks:?}");
        assert!(masks.iter().all(|mask| cpus.contains(&mask[0])), "{masks:?} of {cpus:?}");
    }
}
