//! Keys and values stored apart per (layer, KV head), for the caches whose
//! KV heads keep different positions: `chunk-select-evict` (each selection
//! drops what it leaves out) and `snapkv` (each head keeps its own
//! selection of the prompt).

use crate::decoder::KvShape;

/// The rows one (layer, KV head) holds, in position order, `head_dim`
/// floats of key and of value each.
#[derive(Debug, Clone, Default)]
pub struct Held {
    pub pos: Vec<u32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Every (layer, KV head)'s rows, at `layer * n_kv_heads + kv_head`.
#[derive(Debug)]
pub struct HeldRows {
    pub shape: KvShape,
    /// Positions committed.
    pub len: usize,
    pub heads: Vec<Held>,
}

impl HeldRows {
    /// Appends positions `pos..` of `layer` (rows of `kv_dim` floats in
    /// `k` and `v`) to each of its KV heads. The decoder appends every
    /// layer of a block, in order, before `len` moves; `what` names the
    /// cache in the panic for an append out of order.
    pub fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32], what: &str) {
        let shape = self.shape;
        assert_eq!(self.len, pos, "{what} cache: append out of order");
        assert_eq!(k.len(), v.len());
        let rows = k.len() / shape.kv_dim();
        for (g, h) in self.heads[layer * shape.n_kv_heads..(layer + 1) * shape.n_kv_heads]
            .iter_mut()
            .enumerate()
        {
            h.pos.extend((pos..pos + rows).map(|p| p as u32));
            shape.extend_head(&mut h.k, k, g, 0..rows);
            shape.extend_head(&mut h.v, v, g, 0..rows);
        }
        if layer + 1 == shape.n_layers {
            self.len = pos + rows;
        }
    }

    /// Forgets positions `len..` in every head.
    pub fn truncate(&mut self, len: usize) {
        let hd = self.shape.head_dim;
        for h in &mut self.heads {
            let keep = h.pos.partition_point(|&p| (p as usize) < len);
            h.pos.truncate(keep);
            h.k.truncate(keep * hd);
            h.v.truncate(keep * hd);
        }
        self.len = len;
    }

    /// Bytes held: keys, values and a 4-byte position per row.
    pub fn bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|h| (h.k.len() + h.v.len()) * 4 + h.pos.len() * 4)
            .sum()
    }

    /// The positions (`layer`, `kv_head`) holds, in order.
    pub fn positions(&self, layer: usize, kv_head: usize) -> Vec<usize> {
        self.heads[layer * self.shape.n_kv_heads + kv_head]
            .pos
            .iter()
            .map(|&p| p as usize)
            .collect()
    }
}
