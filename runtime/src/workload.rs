//! The standard workloads of design.md 4.1, for benchmarks and reports.

use attngen_codegen::{AttentionSpec, Form, Mask, cost};

use crate::{Shape, Tensor};

/// Keys of the long-context decode workloads, W7 and W8.
const LONG_CONTEXT: usize = 32768;

/// A named spec and call shape.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `W1` … `W8`, or a spec's name.
    pub id: String,
    /// What it models.
    pub description: &'static str,
    /// The layer.
    pub spec: AttentionSpec,
    /// B, Sq, Sk.
    pub shape: Shape,
}

impl Workload {
    /// W1–W6 of design.md 4.1, then two long-context decode workloads over 32768 keys whose
    /// caches are at least twice this machine's last-level cache ([`last_level_cache_bytes`]),
    /// so that they read from DRAM: W7, Llama-3-8B (268 MB of K/V per sequence), and W8,
    /// DeepSeek-V2-Lite (75.5 MB of latent and RoPE key per sequence); f32, default scale.
    /// [`Workload::standard_for_cache`] gives their batch sizes.
    pub fn standard() -> Vec<Workload> {
        Workload::standard_for_cache(last_level_cache_bytes())
    }

    /// [`Workload::standard`] for a machine whose last-level cache holds `llc_bytes` (`None`:
    /// unknown): W7 and W8 take the smallest batch, at least 1 and 4, whose cache is at least
    /// twice that.
    ///
    /// ```
    /// use attngen::Workload;
    ///
    /// let batch = |llc: usize, id: &str| {
    ///     let workloads = Workload::standard_for_cache(Some(llc));
    ///     workloads.into_iter().find(|w| w.id == id).unwrap().shape.batch
    /// };
    /// assert_eq!(batch(480 << 20, "W7"), 4); // 4 × 268 MB ≥ 2 × 480 MiB
    /// let workloads = Workload::standard_for_cache(Some(480 << 20));
    /// let w7 = workloads.iter().find(|w| w.id == "W7").unwrap();
    /// assert!(w7.kv_bytes() >= 2 * (480 << 20));
    /// assert_eq!(batch(480 << 20, "W8"), 14); // 14 × 75.5 MB
    /// // A small cache: the workloads' own batch sizes.
    /// assert_eq!(batch(32 << 20, "W7"), 1);
    /// assert_eq!(batch(32 << 20, "W8"), 4);
    /// ```
    pub fn standard_for_cache(llc_bytes: Option<usize>) -> Vec<Workload> {
        let lite = || AttentionSpec::mla(16, 512, 64, 128, 128).mask(Mask::Causal);
        vec![
            Workload {
                id: "W1".to_owned(),
                description: "GQA prefill, Llama-3-8B",
                spec: AttentionSpec::gqa(32, 8, 128).mask(Mask::Causal),
                shape: Shape::new(1, 1024, 1024),
            },
            Workload {
                id: "W2".to_owned(),
                description: "MHA prefill",
                spec: AttentionSpec::mha(16, 64).mask(Mask::Causal),
                shape: Shape::new(1, 2048, 2048),
            },
            Workload {
                id: "W3".to_owned(),
                description: "MQA prefill",
                spec: AttentionSpec::mqa(16, 128).mask(Mask::Causal),
                shape: Shape::new(1, 1024, 1024),
            },
            Workload {
                id: "W4".to_owned(),
                description: "GQA decode",
                spec: AttentionSpec::gqa(32, 8, 128),
                shape: Shape::new(4, 1, 4096),
            },
            Workload {
                id: "W5".to_owned(),
                description: "MLA decode, DeepSeek-V2-Lite",
                spec: lite(),
                shape: Shape::new(4, 1, 4096),
            },
            Workload {
                id: "W6".to_owned(),
                description: "MLA prefill, DeepSeek-V2-Lite",
                spec: lite(),
                shape: Shape::new(1, 1024, 1024),
            },
            Workload {
                id: "W7".to_owned(),
                description: "GQA decode, long context, Llama-3-8B",
                spec: AttentionSpec::gqa(32, 8, 128),
                shape: Shape::new(1, 1, LONG_CONTEXT),
            },
            Workload {
                id: "W8".to_owned(),
                description: "MLA decode, long context, DeepSeek-V2-Lite",
                spec: lite(),
                shape: Shape::new(4, 1, LONG_CONTEXT),
            },
        ]
        .into_iter()
        .map(|mut w| {
            w.spec.name = Some(w.id.clone());
            if w.shape.seq_k == LONG_CONTEXT {
                w.shape.batch = w.shape.batch.max(w.batch_beyond(llc_bytes.unwrap_or(0)));
            }
            w
        })
        .collect()
    }

    /// The smallest batch whose K/V bytes are at least twice `cache_bytes`.
    fn batch_beyond(&self, cache_bytes: usize) -> usize {
        let per_sequence = cost::kv_bytes(&self.spec, 1, self.shape.seq_k as u64);
        (2 * cache_bytes as u64).div_ceil(per_sequence.max(1)) as usize
    }

    /// Whether it is a decode workload (reported in GB/s) rather than prefill (GFLOP/s).
    pub fn is_decode(&self) -> bool {
        self.shape.seq_q == 1
    }

    /// FLOPs of one call as design.md 4 counts them.
    pub fn flops(&self) -> u64 {
        let s = self.shape;
        cost::attention_flops(&self.spec, s.batch as u64, s.seq_q as u64, s.seq_k as u64)
    }

    /// FLOPs of one call in `form` ([`cost::kernel_flops`] for the grouped and the absorbed
    /// form, [`cost::expanded_flops`] for the expanded one).
    pub fn kernel_flops(&self, form: Form) -> u64 {
        let (s, spec) = (self.shape, &self.spec);
        let (b, q, k) = (s.batch as u64, s.seq_q as u64, s.seq_k as u64);
        match form {
            Form::LatentExpanded => cost::expanded_flops(spec, b, q, k),
            Form::Grouped | Form::LatentAbsorbed => cost::kernel_flops(spec, b, q, k),
        }
    }

    /// Compulsory memory traffic of one call: every input read once, `out` and `lse` written
    /// once — the byte count of a roofline's arithmetic intensity.
    pub fn compulsory_bytes(&self) -> u64 {
        let tensors = Tensor::inputs(&self.spec).iter().chain(&[Tensor::Out, Tensor::Lse]);
        tensors.map(|t| t.len(&self.spec, self.shape).unwrap_or(0) as u64 * 4).sum()
    }

    /// Bytes of K/V (or latent and RoPE key) read once by one call.
    pub fn kv_bytes(&self) -> u64 {
        cost::kv_bytes(&self.spec, self.shape.batch as u64, self.shape.seq_k as u64)
    }
}

/// The largest cache of CPU 0 that Linux reports under `/sys` (the last level), in bytes;
/// `None` where the system does not say.
pub fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("size")).ok())
        .filter_map(|size| {
            let size = size.trim();
            let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
            let scale = match unit {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => return None,
            };
            digits.parse::<usize>().ok()?.checked_mul(scale)
        })
        .max()
}
