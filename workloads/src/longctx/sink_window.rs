//! Entry `sink-window`: StreamingLLM's attention sinks plus a rolling window
//! (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//! arXiv 2309.17453).
//!
//! The paper's Section 3.1 finds that the first few tokens soak up attention
//! whatever their content (the softmax needs somewhere to put the mass a
//! query does not want to spend), so evicting them breaks window attention;
//! Section 3.2 ("Rolling KV Cache with Attention Sinks", Figure 4) keeps the
//! KV of [`SINKS`] = 4 initial tokens beside the KV of the most recent
//! tokens, and Table 2 shows that four sinks suffice. The authors' cache
//! (`StartRecentKVCache` in mit-han-lab/streaming-llm) does exactly this
//! slicing: start tokens plus the recent ones, everything in between
//! dropped.
//!
//! As implemented: per layer, the first `min(SINKS, budget)` positions are
//! kept for good and the newest `budget - sinks` positions live in a ring
//! buffer; every committed position past the budget overwrites the oldest
//! non-sink slot. A query attends to the sinks, then the window in position
//! order, then the block in flight, through [`attend_segments`]. The dense
//! prefill is cut down the same way (the official code also prefills
//! densely and evicts afterwards), and decode steps keep rolling the window.
//! Nothing here looks at the query, so every KV head keeps the same
//! positions.
//!
//! Departure from the paper:
//! - Positions. Section 3.2 assigns RoPE positions *within the cache*
//!   ("positions within the cache rather than those in the original text":
//!   tokens [0, 1, 2, 3, 6, 7, 8] decoding the 9th are given positions
//!   0..7), caching keys before the rotation and re-rotating them each step.
//!   That is what lets StreamingLLM run past the pre-training window, its
//!   stated goal (Section 1 and its appendix: it does not extend the context
//!   window). Our decoder stores keys already rotated with their original
//!   positions, and our contexts (at most 8k tokens) stay inside both
//!   models' trained windows, so no relative distance ever leaves the trained
//!   range. We keep original positions; the only effect is that the sinks sit
//!   at their true distance from the query instead of just before the
//!   window.
//!
//! `truncate` can only restore a state in which nothing visible was evicted:
//! once a position past the sinks has been dropped, going back would need it
//! again, and the cache says so with [`DecoderError::Cache`].

use crate::decoder::{
    attend_segments, BlockKv, DecoderError, DenseKv, KvCache, KvShape, ReadCounter, Reads, Rows,
    Segment,
};

use super::policy::{Plan, Policy};

/// Initial positions kept as attention sinks (StreamingLLM Section 3.2 and
/// Table 2: four initial tokens restore window attention).
pub const SINKS: usize = 4;

/// The `sink-window` entry: a [`SinkWindowKv`] of `plan.budget` positions.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkWindow;

impl Policy for SinkWindow {
    fn id(&self) -> &'static str {
        "sink-window"
    }

    fn from_dense(&self, dense: &DenseKv, plan: &Plan<'_>) -> Box<dyn KvCache> {
        Box::new(SinkWindowKv::from_dense(dense, plan.budget))
    }
}

/// Attention sinks plus a rolling window of the newest positions, at most
/// `budget` positions per layer (every KV head keeps the same ones).
#[derive(Debug, Clone)]
pub struct SinkWindowKv {
    shape: KvShape,
    sinks: usize,
    window: usize,
    layers: Vec<Layer>,
    reads: ReadCounter,
}

#[derive(Debug, Clone, Default)]
struct Layer {
    /// Positions committed to this layer.
    n: usize,
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
    /// Ring of `min(n - sinks, window)` rows; position `p >= sinks` lives in
    /// slot `(p - sinks) % window`, so the slots' order follows from `n`
    /// alone and no head index has to be stored.
    ring_k: Vec<f32>,
    ring_v: Vec<f32>,
}

impl SinkWindowKv {
    /// An empty cache that keeps at most `budget` positions per layer.
    pub fn new(shape: KvShape, budget: usize) -> SinkWindowKv {
        let sinks = SINKS.min(budget);
        let window = budget - sinks;
        let d = shape.kv_dim();
        let layers = (0..shape.n_layers)
            .map(|_| Layer {
                n: 0,
                sink_k: Vec::with_capacity(sinks * d),
                sink_v: Vec::with_capacity(sinks * d),
                ring_k: Vec::with_capacity(window * d),
                ring_v: Vec::with_capacity(window * d),
            })
            .collect();
        SinkWindowKv {
            shape,
            sinks,
            window,
            layers,
            reads: ReadCounter::default(),
        }
    }

    /// The sinks and window of a dense prefill (only the rows that survive
    /// are copied).
    pub fn from_dense(dense: &DenseKv, budget: usize) -> SinkWindowKv {
        let mut c = SinkWindowKv::new(dense.shape(), budget);
        for l in 0..c.shape.n_layers {
            c.push_rows(l, 0, dense.keys(l), dense.values(l));
        }
        c
    }

    /// Stores rows `pos..pos + k.len() / kv_dim` of `layer`, skipping those
    /// that a later row of the same batch would overwrite anyway.
    fn push_rows(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.shape.kv_dim();
        let (sinks, window) = (self.sinks, self.window);
        let m = k.len() / d;
        let end = pos + m;
        let ly = &mut self.layers[layer];
        assert_eq!(ly.n, pos, "sink-window cache: append out of order");
        assert_eq!(k.len(), v.len());
        for p in pos..end.min(sinks) {
            let r = (p - pos) * d..(p - pos + 1) * d;
            ly.sink_k.extend_from_slice(&k[r.clone()]);
            ly.sink_v.extend_from_slice(&v[r]);
        }
        if window > 0 && end > sinks {
            let rows = (end - sinks).min(window);
            ly.ring_k.resize(rows * d, 0.0);
            ly.ring_v.resize(rows * d, 0.0);
            for p in pos.max(sinks).max(end.saturating_sub(window))..end {
                let s = (p - sinks) % window;
                let r = (p - pos) * d..(p - pos + 1) * d;
                ly.ring_k[s * d..(s + 1) * d].copy_from_slice(&k[r.clone()]);
                ly.ring_v[s * d..(s + 1) * d].copy_from_slice(&v[r]);
            }
        }
        ly.n = end;
    }

    /// The row ranges a query of `layer` reads, in position order: the
    /// sinks, then the ring from its oldest slot, wrapping once.
    fn ranges(&self, layer: usize) -> [(usize, usize); 3] {
        let ly = &self.layers[layer];
        let d = self.shape.kv_dim();
        let sink_rows = ly.sink_k.len() / d;
        let ring_rows = ly.ring_k.len() / d;
        if ring_rows < self.window || ring_rows == 0 {
            return [(0, sink_rows), (0, ring_rows), (0, 0)];
        }
        let oldest = (ly.n - self.sinks) % self.window;
        [(0, sink_rows), (oldest, ring_rows), (0, oldest)]
    }
}

impl KvCache for SinkWindowKv {
    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.push_rows(layer, pos, k, v);
    }

    fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.n)
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        let n = self.len();
        if len >= n {
            return Ok(());
        }
        if n > self.sinks + self.window {
            return Err(DecoderError::Cache(format!(
                "sink-window cache cannot truncate {n} positions to {len}: positions \
                 {}..{} were evicted and would be visible again",
                self.sinks,
                n - self.window
            )));
        }
        // Nothing evicted yet: the ring holds positions sinks..n in slot
        // order, so dropping the suffix is a plain truncation.
        let d = self.shape.kv_dim();
        let (sinks, window) = (self.sinks, self.window);
        for ly in &mut self.layers {
            let keep_sinks = len.min(sinks) * d;
            ly.sink_k.truncate(keep_sinks);
            ly.sink_v.truncate(keep_sinks);
            let keep_ring = len.saturating_sub(sinks).min(window) * d;
            ly.ring_k.truncate(keep_ring);
            ly.ring_v.truncate(keep_ring);
            ly.n = ly.n.min(len);
        }
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        kv_head: usize,
        q: &[f32],
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let ly = &self.layers[layer];
        let [(s0, s1), (a0, a1), (b0, b1)] = self.ranges(layer);
        let segments = [
            Segment {
                k: &ly.sink_k,
                v: &ly.sink_v,
                rows: Rows::Range(s0, s1),
                bias: None,
            },
            Segment {
                k: &ly.ring_k,
                v: &ly.ring_v,
                rows: Rows::Range(a0, a1),
                bias: None,
            },
            Segment {
                k: &ly.ring_k,
                v: &ly.ring_v,
                rows: Rows::Range(b0, b1),
                bias: None,
            },
            block.segment(),
        ];
        let d = self.shape.kv_dim();
        attend_segments(q, self.shape.head_dim, d, kv_head, &segments, scores, out);
        self.reads
            .add((s1 - s0) + (a1 - a0) + (b1 - b0), self.layers[layer].n);
    }

    fn bytes(&self) -> usize {
        // Only the rows held count (as for `DenseKv`): the ring's order is
        // derived from `n`, so there is no per-row metadata.
        self.layers
            .iter()
            .map(|l| (l.sink_k.len() + l.sink_v.len() + l.ring_k.len() + l.ring_v.len()) * 4)
            .sum()
    }

    fn reads(&self) -> Reads {
        self.reads.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::longctx::testutil::{assert_close, attention_f64, dense_of, uniform};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const SHAPE: KvShape = KvShape {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 8,
    };

    /// Keys whose every channel holds the position (and values its
    /// negation), so the rows a cache holds name themselves.
    fn labelled(pos: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
        let d = SHAPE.kv_dim();
        let k: Vec<f32> = (pos..pos + rows)
            .flat_map(|p| std::iter::repeat_n(p as f32, d))
            .collect();
        let v = k.iter().map(|x| -x).collect();
        (k, v)
    }

    fn held_positions(c: &SinkWindowKv, layer: usize) -> Vec<usize> {
        let d = SHAPE.kv_dim();
        let ly = &c.layers[layer];
        let [s, a, b] = c.ranges(layer);
        let sinks = (s.0..s.1).map(|r| ly.sink_k[r * d] as usize);
        let ring = (a.0..a.1)
            .chain(b.0..b.1)
            .map(|r| ly.ring_k[r * d] as usize);
        sinks.chain(ring).collect()
    }

    /// The output over sinks + window + block matches a float64 softmax over
    /// exactly those rows, after the ring has wrapped several times. The
    /// tolerance, 1e-5 relative, covers f32 sums of ~20 terms of magnitude
    /// <= 1 (about 1e-6 of rounding) with room to spare.
    #[test]
    fn attention_matches_f64_over_sinks_and_window() {
        let d = SHAPE.kv_dim();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (k, v) = (uniform(&mut rng, 30 * d), uniform(&mut rng, 30 * d));
        let dense = dense_of(SHAPE, &k, &v);
        let mut c = SinkWindowKv::from_dense(&dense, 12);
        let (mut all_k, mut all_v) = (k, v);
        for pos in 30..47 {
            let (k1, v1) = (uniform(&mut rng, d), uniform(&mut rng, d));
            for l in 0..2 {
                c.append(l, pos, &k1, &v1);
            }
            all_k.extend_from_slice(&k1);
            all_v.extend_from_slice(&v1);
        }
        let (bk, bv) = (uniform(&mut rng, 2 * d), uniform(&mut rng, 2 * d));
        let block = BlockKv {
            k: &bk,
            v: &bv,
            rows: &[0, 1],
        };
        let q = uniform(&mut rng, 3 * 8);
        let mut out = vec![0f32; 3 * 8];
        let h = 1;
        c.attend(1, h, &q, &block, &mut Vec::new(), &mut out);
        let kept: Vec<usize> = (0..4).chain(47 - 8..47).collect();
        let row =
            |x: &[f32], r: usize| -> Vec<f32> { x[r * d + h * 8..r * d + h * 8 + 8].to_vec() };
        let owned: Vec<(Vec<f32>, Vec<f32>)> = kept
            .iter()
            .map(|&p| (row(&all_k, p), row(&all_v, p)))
            .chain((0..2).map(|r| (row(&bk, r), row(&bv, r))))
            .collect();
        let rows: Vec<(&[f32], &[f32])> = owned.iter().map(|(a, b)| (&a[..], &b[..])).collect();
        assert_close(&out, &attention_f64(&q, 8, &rows), 1e-5, "head 1");
        assert_eq!(
            c.reads(),
            Reads {
                calls: 1,
                rows_read: 12,
                rows_visible: 47
            }
        );
    }

    /// With a budget that covers every position nothing is evicted and the
    /// rows reach `attend_segments` in the same order as `DenseKv`'s, so the
    /// output is the same bits (the arithmetic depends only on that order).
    #[test]
    fn covering_budget_equals_dense_bitwise() {
        let d = SHAPE.kv_dim();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (k, v) = (uniform(&mut rng, 20 * d), uniform(&mut rng, 20 * d));
        let mut dense = dense_of(SHAPE, &k, &v);
        let mut c = SinkWindowKv::from_dense(&dense, 25);
        for pos in 20..25 {
            let (k1, v1) = (uniform(&mut rng, d), uniform(&mut rng, d));
            for l in 0..2 {
                c.append(l, pos, &k1, &v1);
                dense.append(l, pos, &k1, &v1);
            }
        }
        let (bk, bv) = (uniform(&mut rng, d), uniform(&mut rng, d));
        let block = BlockKv {
            k: &bk,
            v: &bv,
            rows: &[0],
        };
        for h in 0..2 {
            let q = uniform(&mut rng, 16);
            let (mut a, mut b) = (vec![0f32; 16], vec![0f32; 16]);
            c.attend(0, h, &q, &block, &mut Vec::new(), &mut a);
            dense.attend(0, h, &q, &block, &mut Vec::new(), &mut b);
            assert_eq!(a, b);
        }
        assert_eq!(c.bytes(), dense.bytes());
    }

    /// After hundreds of one-row appends (and a multi-row one that wraps the
    /// ring within a single call) the cache holds exactly the sinks and the
    /// newest positions, in position order, and its bytes stop growing at
    /// the budget.
    #[test]
    fn keeps_sinks_and_newest_rows_with_bounded_bytes() {
        let d = SHAPE.kv_dim();
        let budget = 11;
        let full = 2 * 2 * budget * d * 4;
        let mut c = SinkWindowKv::new(SHAPE, budget);
        let mut n = 0;
        for step in 0..300 {
            let rows = if step == 150 { 23 } else { 1 };
            let (k, v) = labelled(n, rows);
            for l in 0..2 {
                c.append(l, n, &k, &v);
            }
            n += rows;
            let want: Vec<usize> = (0..n.min(SINKS))
                .chain(SINKS.max(n.saturating_sub(budget - SINKS))..n)
                .collect();
            assert_eq!(held_positions(&c, 1), want, "after {n} positions");
            assert!(c.bytes() <= full);
        }
        assert_eq!(c.len(), n);
        assert_eq!(c.bytes(), full);
        let ly = &c.layers[0];
        let [_, a, b] = c.ranges(0);
        let newest = (a.0..a.1).chain(b.0..b.1).last().unwrap();
        assert_eq!(ly.ring_v[newest * d], -((n - 1) as f32));
    }

    /// Each attend call reads the held rows out of the committed ones, so
    /// the read share is budget / length once the window is full.
    #[test]
    fn reads_share_is_budget_over_length() {
        let mut c = SinkWindowKv::new(SHAPE, 10);
        let (k, v) = labelled(0, 40);
        for l in 0..2 {
            c.append(l, 0, &k, &v);
        }
        let block = BlockKv {
            k: &[],
            v: &[],
            rows: &[],
        };
        let q = vec![0.1f32; 8];
        let mut out = vec![0f32; 8];
        for h in 0..2 {
            c.attend(1, h, &q, &block, &mut Vec::new(), &mut out);
        }
        let r = c.reads();
        assert_eq!((r.calls, r.rows_read, r.rows_visible), (2, 20, 80));
        assert!((r.share() - 0.25).abs() < 1e-12);
        // The window holds positions 34..40 after the sinks: the output is a
        // mix of their values only (v = -p), so it lies in [-39, 0].
        assert!(out.iter().all(|&x| (-39.0..=0.0).contains(&x)));
    }

    /// Truncation succeeds (and leaves the state a fresh cache would have)
    /// while nothing has been evicted; once positions were dropped it fails
    /// with a message naming them.
    #[test]
    fn truncate_works_until_the_first_eviction() {
        let mut c = SinkWindowKv::new(SHAPE, 10);
        let (k, v) = labelled(0, 9);
        for l in 0..2 {
            c.append(l, 0, &k, &v);
        }
        c.truncate(6).unwrap();
        assert_eq!(c.len(), 6);
        assert_eq!(held_positions(&c, 0), (0..6).collect::<Vec<_>>());
        c.truncate(2).unwrap();
        assert_eq!(held_positions(&c, 1), vec![0, 1]);
        let (k, v) = labelled(2, 20);
        for l in 0..2 {
            c.append(l, 2, &k, &v);
        }
        assert_eq!(
            held_positions(&c, 0),
            vec![0, 1, 2, 3, 16, 17, 18, 19, 20, 21]
        );
        c.truncate(22).unwrap();
        let err = c.truncate(21).unwrap_err().to_string();
        assert!(err.contains("4..16"), "{err}");
        assert_eq!(c.len(), 22);
    }
}
