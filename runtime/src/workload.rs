//! The standard workloads of design.md 4.1, for benchmarks and reports.

use attngen_codegen::{AttentionSpec, Form, Mask, cost};

use crate::{Shape, Tensor};

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
    /// W1–W6 of design.md 4.1, then two long-context decode workloads whose caches (268 MB
    /// and 302 MB) are several times a server CPU's last-level cache, so they read from DRAM:
    /// W7, Llama-3-8B at B = 1 over 32768 keys, and W8, DeepSeek-V2-Lite at B = 4 over 32768
    /// (f32, default scale).
    pub fn standard() -> Vec<Workload> {
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
                shape: Shape::new(1, 1, 32768),
            },
            Workload {
                id: "W8".to_owned(),
                description: "MLA decode, long context, DeepSeek-V2-Lite",
                spec: lite(),
                shape: Shape::new(4, 1, 32768),
            },
        ]
        .into_iter()
        .map(|mut w| {
            w.spec.name = Some(w.id.clone());
            w
        })
        .collect()
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
