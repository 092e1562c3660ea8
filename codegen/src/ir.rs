//! The kernel IR: a tile-level program, lowered from a [`KernelPlan`] and emitted by every
//! backend (`clif` for the JIT), so a schedule change lands in all of them at once.
//!
//! A kernel is two programs over one work item — a batch entry `b`, a KV group `g` and a query
//! tile starting at `q0`:
//! - `item` runs the flash-attention loop over one key range (a whole sequence, or one decode
//!   split) and leaves the running state O, m, l of every row in a state slot;
//! - `finish` merges the state slots of a task's splits and writes `out` and `lse`.
//!
//! Every op works on whole tiles, for every head slot of the group: the ops name *what* happens
//! to a tile; the emitter decides how (generated vector loops, or a call to a tile micro-kernel).

use std::fmt;

use crate::plan::KernelPlan;
use crate::spec::{KvLayout, Mask};

/// The two programs of a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelIr {
    /// The flash loop over one key range.
    pub item: Vec<Op>,
    /// Merge the splits, normalise, store.
    pub finish: Vec<Op>,
}

/// One tile-level operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Absorbed MLA: `q'[slot] = q_nope[b, q0.., h] · W_UK[h]` (`nope → rank`).
    AbsorbQueries {
        /// Length of `q_nope`.
        nope: usize,
        /// Latent rank.
        rank: usize,
    },
    /// `O = 0`, `m = −∞`, `l = 0` for every row.
    InitState,
    /// Loop over the key tiles of the item's key range that the mask leaves visible to some
    /// query of the tile. Tiles every row sees whole run `body` unmasked; edge tiles (the
    /// diagonal, the window's start, the sequence's end) apply the mask by index.
    KeyTiles {
        /// Keys per tile.
        tile: usize,
        /// The visibility rule.
        mask: Mask,
        /// Ops run per tile.
        body: Vec<Op>,
    },
    /// `S[slot] (+)= query · keysᵀ` for one part of the score dot product.
    Scores(ScoreTerm),
    /// Score transform and online softmax on the tile: `s = scale·S`, softcap, hidden keys to
    /// −∞ on edge tiles; `m' = max(m, rowmax s)`, `P = exp(s − m')`,
    /// `l = l·exp(m − m') + rowsum P`, `O *= exp(m − m')`.
    OnlineSoftmax {
        /// Score scale.
        scale: f32,
        /// Logit cap.
        softcap: Option<f32>,
    },
    /// `O[slot] += P · values[b, j0..]`, with per-row key ranges on edge tiles.
    AccumulateValues {
        /// Where the values come from.
        values: Operand,
        /// Width of a value row.
        width: usize,
    },
    /// Combine the task's split states into the first: `M = max m_s`,
    /// `l = Σ l_s·exp(m_s − M)`, `O = Σ O_s·exp(m_s − M)`.
    MergeSplits,
    /// `O /= l` and `lse = m + ln l`; a row with no visible key gets `O = 0`, `lse = −∞`.
    Normalize,
    /// Grouped: `out[b, q0 + qi, h] = O[slot, qi]`.
    StoreOut,
    /// Absorbed MLA: `out[b, q0 + qi, h] = O[slot, qi] · W_UV[h]ᵀ` (`rank → Dv`).
    ProjectOut {
        /// Latent rank.
        rank: usize,
        /// Output width Dv.
        v_dim: usize,
    },
    /// `lse[b, q0 + qi, h] = lse` of each row, when the caller asked for it.
    StoreLse,
}

/// One part of a score dot product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreTerm {
    /// The query side: a tensor (read in place) or a scratch buffer.
    pub query: Operand,
    /// First query element used.
    pub query_offset: usize,
    /// The key side.
    pub keys: Operand,
    /// Dot-product length.
    pub len: usize,
    /// Add to S instead of overwriting it.
    pub accumulate: bool,
}

/// A tensor or buffer an op reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// `q` [B, Sq, H, D].
    Q,
    /// `k` [B, Sk, kv_heads, D].
    K,
    /// `v` [B, Sk, kv_heads, Dv].
    V,
    /// `c_kv` [B, Sk, rank].
    CKv,
    /// `k_rope` [B, Sk, rope_dim].
    KRope,
    /// The absorbed queries q' in scratch.
    AbsorbedQ,
}

/// Lowers a plan to its tile program.
pub fn lower(plan: &KernelPlan) -> KernelIr {
    let spec = &plan.spec;
    let softmax = Op::OnlineSoftmax { scale: plan.scale, softcap: spec.softcap };
    let (prologue, scores, values, store) = match &spec.kv {
        KvLayout::Latent(l) => {
            let mut scores = vec![Op::Scores(ScoreTerm {
                query: Operand::AbsorbedQ,
                query_offset: 0,
                keys: Operand::CKv,
                len: l.rank,
                accumulate: false,
            })];
            if l.rope_dim > 0 {
                scores.push(Op::Scores(ScoreTerm {
                    query: Operand::Q,
                    query_offset: l.nope_dim,
                    keys: Operand::KRope,
                    len: l.rope_dim,
                    accumulate: true,
                }));
            }
            (
                vec![Op::AbsorbQueries { nope: l.nope_dim, rank: l.rank }],
                scores,
                Op::AccumulateValues { values: Operand::CKv, width: l.rank },
                Op::ProjectOut { rank: l.rank, v_dim: spec.v_head_dim },
            )
        }
        KvLayout::Grouped { head_dim, .. } => (
            Vec::new(),
            vec![Op::Scores(ScoreTerm {
                query: Operand::Q,
                query_offset: 0,
                keys: Operand::K,
                len: *head_dim,
                accumulate: false,
            })],
            Op::AccumulateValues { values: Operand::V, width: spec.v_head_dim },
            Op::StoreOut,
        ),
    };
    let mut body = scores;
    body.push(softmax);
    body.push(values);
    let mut item = prologue;
    item.push(Op::InitState);
    item.push(Op::KeyTiles { tile: plan.k_tile, mask: spec.mask, body });
    KernelIr { item, finish: vec![Op::MergeSplits, Op::Normalize, store, Op::StoreLse] }
}

impl fmt::Display for KernelIr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "item(b, g, q0, keys k_lo..k_hi) -> state:")?;
        for op in &self.item {
            write_op(f, op, 1)?;
        }
        writeln!(f, "finish(b, g, q0, states of the task's splits):")?;
        for op in &self.finish {
            write_op(f, op, 1)?;
        }
        Ok(())
    }
}

fn write_op(f: &mut fmt::Formatter<'_>, op: &Op, depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    match op {
        Op::AbsorbQueries { nope, rank } => writeln!(
            f,
            "{pad}for each head h of g: q'[h] = q[b, q0.., h, 0..{nope}] · W_UK[h]   (tile A·B, {nope} -> {rank})"
        ),
        Op::InitState => writeln!(f, "{pad}O = 0; m = -inf; l = 0"),
        Op::KeyTiles { tile, mask, body } => {
            let skip = match mask {
                Mask::None => "",
                Mask::Causal => ", tiles past the last query's diagonal skipped",
                Mask::SlidingWindow(_) => ", tiles outside the window band skipped",
            };
            writeln!(
                f,
                "{pad}for each key tile j0 in k_lo..k_hi step {tile} (mask {mask}{skip}):"
            )?;
            for op in body {
                write_op(f, op, depth + 1)?;
            }
            Ok(())
        }
        Op::Scores(t) => {
            let query = match t.query {
                Operand::AbsorbedQ => "q'[h]".to_owned(),
                other => format!(
                    "{}[b, q0.., h, {}..{}]",
                    name(other),
                    t.query_offset,
                    t.query_offset + t.len
                ),
            };
            let keys = match t.keys {
                Operand::K => "k[b, j0.., g]".to_owned(),
                other => format!("{}[b, j0..]", name(other)),
            };
            let op = if t.accumulate { "+=" } else { "=" };
            writeln!(f, "{pad}S[h] {op} {query} · {keys}ᵀ   (tile A·Bᵀ, k = {})", t.len)
        }
        Op::OnlineSoftmax { scale, softcap } => {
            write!(f, "{pad}s = {scale} * S")?;
            if let Some(c) = softcap {
                write!(f, "; s = {c} * tanh(s / {c})")?;
            }
            writeln!(f, "; edge tiles: hidden keys -> -inf")?;
            writeln!(
                f,
                "{pad}m' = max(m, rowmax s); P = exp(s - m'); l = l * exp(m - m') + rowsum P; O *= exp(m - m'); m = m'   (generated f32x4 code)"
            )
        }
        Op::AccumulateValues { values, width } => {
            let src = match values {
                Operand::V => "v[b, j0.., g]".to_owned(),
                other => format!("{}[b, j0..]", name(*other)),
            };
            writeln!(
                f,
                "{pad}O[h] += P · {src}   (tile A·B, width {width}; per-row key ranges on edge tiles)"
            )
        }
        Op::MergeSplits => {
            writeln!(
                f,
                "{pad}merge splits: M = max m_s; l = sum l_s * exp(m_s - M); O = sum O_s * exp(m_s - M)"
            )
        }
        Op::Normalize => {
            writeln!(f, "{pad}O /= l; lse = m + ln l   (no visible key: O = 0, lse = -inf)")
        }
        Op::StoreOut => writeln!(f, "{pad}out[b, q0.., h] = O[h]"),
        Op::ProjectOut { rank, v_dim } => {
            writeln!(f, "{pad}out[b, q0.., h] = O[h] · W_UV[h]ᵀ   (tile A·Bᵀ, {rank} -> {v_dim})")
        }
        Op::StoreLse => writeln!(f, "{pad}lse[b, q0.., h] = lse   (if requested)"),
    }
}

fn name(operand: Operand) -> &'static str {
    match operand {
        Operand::Q => "q",
        Operand::K => "k",
        Operand::V => "v",
        Operand::CKv => "c_kv",
        Operand::KRope => "k_rope",
        Operand::AbsorbedQ => "q'",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::AttentionSpec;

    #[test]
    fn grouped_program() {
        let ir = lower(&KernelPlan::new(&AttentionSpec::gqa(8, 2, 16).mask(Mask::Causal)));
        assert_eq!(ir.item.len(), 2);
        let Op::KeyTiles { body, mask, .. } = &ir.item[1] else { panic!("{ir}") };
        assert_eq!(*mask, Mask::Causal);
        assert!(matches!(body[0], Op::Scores(ScoreTerm { keys: Operand::K, len: 16, .. })));
        assert!(matches!(body[2], Op::AccumulateValues { values: Operand::V, width: 16 }));
        assert_eq!(ir.finish, [Op::MergeSplits, Op::Normalize, Op::StoreOut, Op::StoreLse]);
    }

    #[test]
    fn latent_program_absorbs_and_projects() {
        let ir = lower(&KernelPlan::new(&AttentionSpec::mla(4, 32, 8, 16, 12)));
        assert_eq!(ir.item[0], Op::AbsorbQueries { nope: 16, rank: 32 });
        let Op::KeyTiles { body, .. } = &ir.item[2] else { panic!("{ir}") };
        assert_eq!(body.len(), 4); // latent scores, rope scores, softmax, values
        assert!(matches!(
            body[1],
            Op::Scores(ScoreTerm { keys: Operand::KRope, accumulate: true, query_offset: 16, .. })
        ));
        assert_eq!(ir.finish[2], Op::ProjectOut { rank: 32, v_dim: 12 });
        let text = ir.to_string();
        assert!(text.contains("W_UK[h]") && text.contains("W_UV[h]"), "{text}");
        // Without a RoPE part there is one score term.
        let ir = lower(&KernelPlan::new(&AttentionSpec::mla(4, 32, 0, 16, 12)));
        let Op::KeyTiles { body, .. } = &ir.item[2] else { panic!() };
        assert_eq!(body.len(), 3);
    }
}
