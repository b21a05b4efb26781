//! Loading a GGUF checkpoint ([`Model`]) and running it over a KV cache
//! ([`Decoder`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Device;

use super::kernels::{self, matmul, Product, QWeight, RopeStyle, Scratch};
use super::kv::{BlockKv, DenseKv, KvCache, KvShape};
use super::tokenizer::Tokenizer;
use super::{DecoderError, Engine};

/// The architectures we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (SmolLM2): no attention biases, interleaved RoPE.
    Llama,
    /// `qwen2`: q/k/v biases, NeoX RoPE.
    Qwen2,
}

/// Hyper-parameters, all read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    /// No `output.weight`: the output projection is the embedding matrix.
    pub tied_embeddings: bool,
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: QWeight,
    pub(crate) wk: QWeight,
    pub(crate) wv: QWeight,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) wo: QWeight,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: QWeight,
    pub(crate) up: QWeight,
    pub(crate) down: QWeight,
}

/// Immutable weights, shareable (`Arc`) between decoders.
pub struct Model {
    config: Config,
    pub(crate) embed: QWeight,
    pub(crate) layers: Vec<Layer>,
    pub(crate) out_norm: Vec<f32>,
    pub(crate) output: Option<QWeight>,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

struct Loader<'a, R> {
    ct: &'a gguf_file::Content,
    reader: &'a mut R,
    path: String,
}

impl<R: std::io::Read + std::io::Seek> Loader<'_, R> {
    fn tensor(&mut self, name: &str) -> Result<QTensor, DecoderError> {
        self.ct
            .tensor(self.reader, name, &Device::Cpu)
            .map_err(|e| DecoderError::Gguf {
                path: self.path.clone(),
                problem: format!("tensor {name}: {e}"),
            })
    }

    fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    fn weight(&mut self, name: &str) -> Result<QWeight, DecoderError> {
        QWeight::new(name, self.tensor(name)?)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>, DecoderError> {
        let t = self.tensor(name)?;
        t.dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| DecoderError::Gguf {
                path: self.path.clone(),
                problem: format!("tensor {name}: {e}"),
            })
    }

    fn vector_opt(&mut self, name: &str) -> Result<Option<Vec<f32>>, DecoderError> {
        if self.has(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }

    fn meta(&self, key: &str) -> Result<&gguf_file::Value, DecoderError> {
        self.ct
            .metadata
            .get(key)
            .ok_or_else(|| DecoderError::Metadata {
                key: key.into(),
                problem: format!("missing from {}", self.path),
            })
    }

    fn usize(&self, key: &str) -> Result<usize, DecoderError> {
        let v = self.meta(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| DecoderError::Metadata {
                key: key.into(),
                problem: e.to_string(),
            })
    }

    fn f32(&self, key: &str) -> Result<f32, DecoderError> {
        self.meta(key)?
            .to_f32()
            .map_err(|e| DecoderError::Metadata {
                key: key.into(),
                problem: e.to_string(),
            })
    }
}

impl Model {
    /// Loads a `llama` or `qwen2` GGUF file (weights stay quantized).
    pub fn load(path: impl AsRef<Path>) -> Result<Model, DecoderError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let io = |e: std::io::Error| DecoderError::Gguf {
            path: shown.clone(),
            problem: e.to_string(),
        };
        let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        let ct = gguf_file::Content::read(&mut file).map_err(|e| DecoderError::Gguf {
            path: shown.clone(),
            problem: e.to_string(),
        })?;
        Model::from_gguf(&ct, &mut file, &shown)
    }

    /// Loads from already-parsed GGUF content; `source` names it in errors.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        source: &str,
    ) -> Result<Model, DecoderError> {
        let mut ld = Loader {
            ct,
            reader,
            path: source.to_string(),
        };
        let arch_name = ld
            .meta("general.architecture")?
            .to_string()
            .map_err(|e| DecoderError::Metadata {
                key: "general.architecture".into(),
                problem: e.to_string(),
            })?
            .clone();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(DecoderError::Unsupported {
                    what: format!("architecture `{other}` in {source}"),
                    problem: "known: llama, qwen2".into(),
                })
            }
        };
        let a = &arch_name;
        let n_layers = ld.usize(&format!("{a}.block_count"))?;
        let d_model = ld.usize(&format!("{a}.embedding_length"))?;
        let n_heads = ld.usize(&format!("{a}.attention.head_count"))?;
        let n_kv_heads = ld.usize(&format!("{a}.attention.head_count_kv"))?;
        let head_dim = ld
            .usize(&format!("{a}.attention.key_length"))
            .unwrap_or(d_model / n_heads);
        let d_ff = ld.usize(&format!("{a}.feed_forward_length"))?;
        let context_length = ld.usize(&format!("{a}.context_length"))?;
        let rope_base = ld.f32(&format!("{a}.rope.freq_base")).unwrap_or(10_000.0);
        let rope_dim = ld
            .usize(&format!("{a}.rope.dimension_count"))
            .unwrap_or(head_dim);
        let rms_eps = ld.f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?;
        if !n_heads.is_multiple_of(n_kv_heads) || rope_dim > head_dim || !rope_dim.is_multiple_of(2)
        {
            return Err(DecoderError::Unsupported {
                what: format!("head layout of {source}"),
                problem: format!(
                    "{n_heads} heads, {n_kv_heads} KV heads, rope over {rope_dim} of {head_dim}"
                ),
            });
        }

        // The embedding table is also the output projection when there is
        // no `output.weight`; otherwise it is only looked up (no packed copy).
        let tied = !ld.has("output.weight");
        let embed = if tied {
            ld.weight("token_embd.weight")?
        } else {
            QWeight::lookup("token_embd.weight", ld.tensor("token_embd.weight")?)?
        };
        let vocab_size = embed.n_out;
        let output = if tied {
            None
        } else {
            Some(ld.weight("output.weight")?)
        };
        let out_norm = ld.vector("output_norm.weight")?;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: ld.vector(&format!("{p}.attn_norm.weight"))?,
                wq: ld.weight(&format!("{p}.attn_q.weight"))?,
                wk: ld.weight(&format!("{p}.attn_k.weight"))?,
                wv: ld.weight(&format!("{p}.attn_v.weight"))?,
                bq: ld.vector_opt(&format!("{p}.attn_q.bias"))?,
                bk: ld.vector_opt(&format!("{p}.attn_k.bias"))?,
                bv: ld.vector_opt(&format!("{p}.attn_v.bias"))?,
                wo: ld.weight(&format!("{p}.attn_output.weight"))?,
                ffn_norm: ld.vector(&format!("{p}.ffn_norm.weight"))?,
                gate: ld.weight(&format!("{p}.ffn_gate.weight"))?,
                up: ld.weight(&format!("{p}.ffn_up.weight"))?,
                down: ld.weight(&format!("{p}.ffn_down.weight"))?,
            });
        }
        let config = Config {
            arch,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab_size,
            context_length,
            rope_base,
            rope_dim,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            rms_eps,
            tied_embeddings: output.is_none(),
        };
        let model = Model {
            config,
            embed,
            layers,
            out_norm,
            output,
            tokenizer: Tokenizer::from_gguf(ct)?,
        };
        model.check_shapes(source)?;
        Ok(model)
    }

    fn check_shapes(&self, source: &str) -> Result<(), DecoderError> {
        let c = &self.config;
        let (dq, dkv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut expect: Vec<(&str, &QWeight, usize, usize)> =
            vec![("token_embd", &self.embed, c.vocab_size, c.d_model)];
        if let Some(o) = &self.output {
            expect.push(("output", o, c.vocab_size, c.d_model));
        }
        for l in &self.layers {
            expect.extend([
                ("attn_q", &l.wq, dq, c.d_model),
                ("attn_k", &l.wk, dkv, c.d_model),
                ("attn_v", &l.wv, dkv, c.d_model),
                ("attn_output", &l.wo, c.d_model, dq),
                ("ffn_gate", &l.gate, c.d_ff, c.d_model),
                ("ffn_up", &l.up, c.d_ff, c.d_model),
                ("ffn_down", &l.down, c.d_model, c.d_ff),
            ]);
            let biases = [(&l.bq, dq), (&l.bk, dkv), (&l.bv, dkv)];
            if biases
                .iter()
                .any(|(b, n)| b.as_ref().is_some_and(|b| b.len() != *n))
            {
                return Err(DecoderError::Unsupported {
                    what: format!("attention biases in {source}"),
                    problem: "wrong length".into(),
                });
            }
        }
        for (name, w, n, k) in expect {
            if (w.n_out, w.k_in) != (n, k) {
                return Err(DecoderError::Unsupported {
                    what: format!("tensor {name} in {source}"),
                    problem: format!("shape [{}, {}], expected [{n}, {k}]", w.n_out, w.k_in),
                });
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Rows of the logits (the output projection's size).
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// What a KV cache for this model stores per position.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Bytes of weight data (quantized blocks and f32 vectors).
    pub fn weight_bytes(&self) -> usize {
        let q = |w: &QWeight| w.tensor().storage_size_in_bytes();
        let v = |x: &Option<Vec<f32>>| x.as_ref().map_or(0, |x| x.len() * 4);
        q(&self.embed)
            + self.output.as_ref().map_or(0, q)
            + self.out_norm.len() * 4
            + self
                .layers
                .iter()
                .map(|l| {
                    [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                        .into_iter()
                        .map(q)
                        .sum::<usize>()
                        + (l.attn_norm.len() + l.ffn_norm.len()) * 4
                        + v(&l.bq)
                        + v(&l.bk)
                        + v(&l.bv)
                })
                .sum::<usize>()
    }

    fn output(&self) -> &QWeight {
        self.output.as_ref().unwrap_or(&self.embed)
    }
}

/// The result of [`Decoder::verify`]: logits for every node of the draft
/// tree, and which nodes each draft's rows are.
#[derive(Debug, Clone)]
pub struct Verification {
    vocab: usize,
    logits: Vec<f32>,
    paths: Vec<Vec<usize>>,
    nodes: usize,
}

impl Verification {
    /// `logits`: one row of `vocab` per tree node.
    pub(crate) fn new(vocab: usize, logits: Vec<f32>, paths: Vec<Vec<usize>>) -> Verification {
        let nodes = logits.len() / vocab.max(1);
        Verification {
            vocab,
            logits,
            paths,
            nodes,
        }
    }

    pub fn n_drafts(&self) -> usize {
        self.paths.len()
    }

    /// Rows of draft `d`: its length plus one.
    pub fn rows(&self, d: usize) -> usize {
        self.paths[d].len()
    }

    /// Logits after the root and the first `j` tokens of draft `d`
    /// (`j = 0` is the root's row, shared by every draft).
    pub fn logits(&self, d: usize, j: usize) -> &[f32] {
        let n = self.paths[d][j];
        &self.logits[n * self.vocab..(n + 1) * self.vocab]
    }

    /// Distinct positions scored (drafts sharing a prefix share its nodes).
    pub fn tree_nodes(&self) -> usize {
        self.nodes
    }
}

/// Draft continuations merged into a token tree: node 0 is the root, each
/// draft a path from it; drafts that share a prefix share its nodes.
pub(crate) struct DraftTree {
    pub tokens: Vec<u32>,
    /// Parent of each node (`None` for the root); always an earlier node.
    pub parents: Vec<Option<usize>>,
    /// Per draft, its nodes: the root, then one per draft token.
    pub paths: Vec<Vec<usize>>,
}

impl DraftTree {
    pub fn new(root: u32, drafts: &[&[u32]]) -> DraftTree {
        let mut tokens = vec![root];
        let mut parents = vec![None];
        let mut children: std::collections::HashMap<(usize, u32), usize> = Default::default();
        let mut paths = Vec::with_capacity(drafts.len().max(1));
        for d in drafts
            .iter()
            .copied()
            .chain(drafts.is_empty().then_some(&[][..]))
        {
            let mut path = vec![0];
            let mut cur = 0;
            for &t in d {
                cur = *children.entry((cur, t)).or_insert_with(|| {
                    tokens.push(t);
                    parents.push(Some(cur));
                    tokens.len() - 1
                });
                path.push(cur);
            }
            paths.push(path);
        }
        DraftTree {
            tokens,
            parents,
            paths,
        }
    }
}

/// The nodes that [`Decoder::accept`] commits: the root and the first
/// `n_accepted` tokens of draft `draft` of a verification made when the
/// sequence had `base` tokens (it must still have: `len`).
pub(crate) fn accepted_path(
    paths: &[Vec<usize>],
    base: usize,
    len: usize,
    draft: usize,
    n_accepted: usize,
) -> Result<&[usize], DecoderError> {
    if base != len {
        return Err(DecoderError::Input(
            "the sequence changed since verify".into(),
        ));
    }
    let path = paths
        .get(draft)
        .ok_or_else(|| DecoderError::Input(format!("no draft {draft}")))?;
    if n_accepted >= path.len() {
        return Err(DecoderError::Input(format!(
            "draft {draft} has {} tokens, {n_accepted} accepted",
            path.len() - 1
        )));
    }
    Ok(&path[..=n_accepted])
}

/// Depth (position after the committed `base` tokens) and ancestors (itself
/// included, in order) of each node of a block whose node `i` has parent
/// `parents[i] < i` (`None`: right after the committed tokens). Refuses a
/// parent that is not earlier and a position at or beyond `context`.
pub(crate) fn block_layout(
    parents: &[Option<usize>],
    base: usize,
    context: usize,
) -> Result<(Vec<usize>, Vec<Vec<usize>>), DecoderError> {
    let t = parents.len();
    let mut depth = vec![0usize; t];
    let mut ancestors: Vec<Vec<usize>> = Vec::with_capacity(t);
    for i in 0..t {
        let mut a = match parents[i] {
            Some(p) if p < i => {
                depth[i] = depth[p] + 1;
                ancestors[p].clone()
            }
            Some(p) => {
                return Err(DecoderError::Input(format!(
                    "parent {p} of node {i} is not before it"
                )))
            }
            None => Vec::new(),
        };
        a.push(i);
        ancestors.push(a);
    }
    let deepest = depth.iter().max().copied().unwrap_or(0);
    if base + deepest >= context {
        return Err(DecoderError::Input(format!(
            "position {} beyond the context length {context}",
            base + deepest
        )));
    }
    Ok((depth, ancestors))
}

/// The block of a verification, held until [`Decoder::accept`] commits a
/// path of it.
struct Pending {
    base: usize,
    tokens: Vec<u32>,
    paths: Vec<Vec<usize>>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Buffers reused across calls, so that a decode step allocates nothing
/// once warm.
#[derive(Default)]
struct Work {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    block_k: Vec<Vec<f32>>,
    block_v: Vec<Vec<f32>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    scratch: Scratch,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// One sequence being decoded: the model, a KV cache, and the committed
/// tokens.
///
/// Every entry point runs one code path, [`Decoder::forward`], over a block
/// of new positions where each position names its parent (the previous one
/// for a prompt, a tree node for verification). Rows are computed
/// independently of each other (see `kernels` and `kv`), so a position's
/// logits are the same bits however it was batched: greedy speculative
/// decoding reproduces greedy decoding exactly.
pub struct Decoder {
    model: Arc<Model>,
    cache: Box<dyn KvCache>,
    tokens: Vec<u32>,
    pending: Option<Pending>,
    work: Work,
    chunk: usize,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Decoder({} tokens)", self.tokens.len())
    }
}

/// Prompt positions per forward block: enough rows to reuse each weight
/// row from cache many times, few enough that the quantized activations
/// stay in L2.
pub const DEFAULT_CHUNK: usize = 64;

impl Decoder {
    /// A decoder with a dense cache.
    pub fn new(model: Arc<Model>) -> Decoder {
        let cache = DenseKv::new(model.kv_shape(), 256);
        Decoder::with_cache(model, Box::new(cache))
    }

    /// A decoder over any cache (an eviction or compression policy). The
    /// cache must be empty and shaped for this model.
    pub fn with_cache(model: Arc<Model>, cache: Box<dyn KvCache>) -> Decoder {
        assert!(cache.is_empty(), "a new decoder needs an empty cache");
        Decoder {
            model,
            cache,
            tokens: Vec::new(),
            pending: None,
            work: Work::default(),
            chunk: DEFAULT_CHUNK,
        }
    }

    /// A decoder that continues a sequence already in `cache`: `tokens` are
    /// the committed tokens (`cache.len()` of them). A policy that starts
    /// from a shared dense prefill is built from it and resumed here; the
    /// next call is a [`Decoder::step`] with the token the prefill's last
    /// logits chose.
    pub fn resume(
        model: Arc<Model>,
        cache: Box<dyn KvCache>,
        tokens: Vec<u32>,
    ) -> Result<Decoder, DecoderError> {
        if cache.len() != tokens.len() {
            return Err(DecoderError::Input(format!(
                "resume with {} tokens over a cache of {} positions",
                tokens.len(),
                cache.len()
            )));
        }
        Ok(Decoder {
            model,
            cache,
            tokens,
            pending: None,
            work: Work::default(),
            chunk: DEFAULT_CHUNK,
        })
    }

    /// Prompt positions per forward block (results do not depend on it).
    pub fn set_chunk(&mut self, chunk: usize) {
        self.chunk = chunk.max(1);
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    pub fn cache(&self) -> &dyn KvCache {
        &*self.cache
    }

    /// Committed tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends `tokens` to the sequence and returns the logits after the
    /// last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], DecoderError> {
        if tokens.is_empty() {
            return Err(DecoderError::Input("prefill of no tokens".into()));
        }
        self.pending = None;
        let chunk = self.chunk;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (c, piece) in tokens.chunks(chunk).enumerate() {
            let parents: Vec<Option<usize>> = (0..piece.len()).map(|i| i.checked_sub(1)).collect();
            let last = c + 1 == n_chunks;
            let want: &[usize] = if last { &[piece.len() - 1] } else { &[] };
            self.forward(piece, &parents, want)?;
            self.commit_block(piece, &(0..piece.len()).collect::<Vec<_>>());
        }
        Ok(&self.work.logits[..self.model.vocab_size()])
    }

    /// As [`Decoder::prefill`], but returns the logits after every token of
    /// `tokens[from..]`, row-major (row `i`: after `tokens[..=from + i]`).
    /// Rows are the bits one `step` per token would give; scoring a whole
    /// generated sequence this way costs one prompt-sized pass, not one
    /// pass per token.
    pub fn prefill_logits(
        &mut self,
        tokens: &[u32],
        from: usize,
    ) -> Result<Vec<f32>, DecoderError> {
        if from >= tokens.len() {
            return Err(DecoderError::Input(format!(
                "logits from row {from} of a prefill of {} tokens",
                tokens.len()
            )));
        }
        self.pending = None;
        let vocab = self.model.vocab_size();
        let mut out = Vec::with_capacity((tokens.len() - from) * vocab);
        let chunk = self.chunk;
        for (c, piece) in tokens.chunks(chunk).enumerate() {
            let parents: Vec<Option<usize>> = (0..piece.len()).map(|i| i.checked_sub(1)).collect();
            let want: Vec<usize> = (from.saturating_sub(c * chunk)..piece.len()).collect();
            self.forward(piece, &parents, &want)?;
            out.extend_from_slice(&self.work.logits[..want.len() * vocab]);
            self.commit_block(piece, &(0..piece.len()).collect::<Vec<_>>());
        }
        Ok(out)
    }

    /// Appends one token; the logits after it.
    pub fn step(&mut self, token: u32) -> Result<&[f32], DecoderError> {
        self.prefill(&[token])
    }

    /// Scores draft continuations in one forward call. `root` is the next
    /// token of the sequence (not yet committed: the one the last logits
    /// chose); each draft continues after it. The drafts are merged into a
    /// token tree (shared prefixes computed once) and every node attends to
    /// the committed sequence and its own ancestors. Nothing is committed
    /// until [`Decoder::accept`].
    pub fn verify(&mut self, root: u32, drafts: &[&[u32]]) -> Result<Verification, DecoderError> {
        let DraftTree {
            tokens,
            parents,
            paths,
        } = DraftTree::new(root, drafts);
        let all: Vec<usize> = (0..tokens.len()).collect();
        self.pending = None;
        self.forward(&tokens, &parents, &all)?;
        let vocab = self.model.vocab_size();
        let logits = self.work.logits[..tokens.len() * vocab].to_vec();
        self.pending = Some(Pending {
            base: self.tokens.len(),
            tokens,
            paths: paths.clone(),
            k: std::mem::take(&mut self.work.block_k),
            v: std::mem::take(&mut self.work.block_v),
        });
        Ok(Verification::new(vocab, logits, paths))
    }

    /// Commits the root of the last [`Decoder::verify`] and the first
    /// `n_accepted` tokens of draft `draft` (their keys and values are
    /// already computed). The logits after them are the verification's
    /// `logits(draft, n_accepted)`.
    pub fn accept(&mut self, draft: usize, n_accepted: usize) -> Result<(), DecoderError> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| DecoderError::Input("accept without a verification".into()))?;
        let rows = accepted_path(&p.paths, p.base, self.tokens.len(), draft, n_accepted)?;
        self.work.block_k = p.k;
        self.work.block_v = p.v;
        let toks: Vec<u32> = rows.iter().map(|&r| p.tokens[r]).collect();
        self.commit_block(&toks, rows);
        Ok(())
    }

    /// Forgets everything after the first `len` tokens (and any pending
    /// verification).
    pub fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        self.pending = None;
        if len > self.tokens.len() {
            return Err(DecoderError::Input(format!(
                "truncate to {len} of {} tokens",
                self.tokens.len()
            )));
        }
        self.cache.truncate(len)?;
        self.tokens.truncate(len);
        Ok(())
    }

    /// Appends rows `rows` of the block buffers (in that order) to the cache.
    fn commit_block(&mut self, tokens: &[u32], rows: &[usize]) {
        let base = self.tokens.len();
        let d = self.model.kv_shape().kv_dim();
        let contiguous = rows.iter().enumerate().all(|(i, &r)| r == i);
        let mut k = Vec::new();
        let mut v = Vec::new();
        for l in 0..self.model.config.n_layers {
            let (bk, bv) = (&self.work.block_k[l], &self.work.block_v[l]);
            if contiguous {
                self.cache
                    .append(l, base, &bk[..rows.len() * d], &bv[..rows.len() * d]);
            } else {
                k.clear();
                v.clear();
                for &r in rows {
                    k.extend_from_slice(&bk[r * d..(r + 1) * d]);
                    v.extend_from_slice(&bv[r * d..(r + 1) * d]);
                }
                self.cache.append(l, base, &k, &v);
            }
        }
        self.tokens.extend_from_slice(tokens);
    }

    /// Runs the block `tokens` (parent of row `i`: `parents[i] < i`, or
    /// `None` for the position right after the committed sequence) through
    /// every layer, leaving its keys/values in `work.block_k/v` and the
    /// logits of rows `want` in `work.logits`.
    fn forward(
        &mut self,
        tokens: &[u32],
        parents: &[Option<usize>],
        want: &[usize],
    ) -> Result<(), DecoderError> {
        let model = &*self.model;
        let c = &model.config;
        let t = tokens.len();
        let base = self.tokens.len();
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= c.vocab_size) {
            return Err(DecoderError::Input(format!(
                "token {bad} outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let (depth, ancestors) = block_layout(parents, base, c.context_length)?;
        self.cache.begin_block(base, tokens);

        let (d, dq, dkv, hd) = (
            c.d_model,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.head_dim,
        );
        let n_rep = c.n_heads / c.n_kv_heads;
        let w = &mut self.work;
        if w.block_k.len() != c.n_layers {
            w.block_k = vec![Vec::new(); c.n_layers];
            w.block_v = vec![Vec::new(); c.n_layers];
        }
        let x = sized(&mut w.x, t * d);
        for (i, &tok) in tokens.iter().enumerate() {
            model
                .embed
                .dequantize_row(tok as usize, &mut x[i * d..(i + 1) * d]);
        }
        let half = c.rope_dim / 2;
        let (cos, sin) = (sized(&mut w.cos, t * half), sized(&mut w.sin, t * half));
        kernels::rope_tables(base, &depth, c.rope_dim, c.rope_base, cos, sin);

        for (l, layer) in model.layers.iter().enumerate() {
            let h = sized(&mut w.h, t * d);
            for i in 0..t {
                kernels::rms_norm(
                    &w.x[i * d..(i + 1) * d],
                    &layer.attn_norm,
                    c.rms_eps,
                    &mut h[i * d..(i + 1) * d],
                );
            }
            let q = sized(&mut w.q, t * dq);
            let bk = sized(&mut w.block_k[l], t * dkv);
            let bv = sized(&mut w.block_v[l], t * dkv);
            matmul(
                h,
                t,
                d,
                &mut [
                    Product {
                        w: &layer.wq,
                        out: q,
                    },
                    Product {
                        w: &layer.wk,
                        out: bk,
                    },
                    Product {
                        w: &layer.wv,
                        out: bv,
                    },
                ],
                &mut w.scratch,
            );
            for (buf, bias, n) in [
                (&mut *q, &layer.bq, dq),
                (&mut *bk, &layer.bk, dkv),
                (&mut *bv, &layer.bv, dkv),
            ] {
                if let Some(b) = bias {
                    for row in buf.chunks_exact_mut(n) {
                        for (y, &z) in row.iter_mut().zip(b) {
                            *y += z;
                        }
                    }
                }
            }
            for i in 0..t {
                let (cs, sn) = (
                    &w.cos[i * half..(i + 1) * half],
                    &w.sin[i * half..(i + 1) * half],
                );
                kernels::rope(&mut q[i * dq..(i + 1) * dq], hd, c.rope_style, cs, sn);
                kernels::rope(&mut bk[i * dkv..(i + 1) * dkv], hd, c.rope_style, cs, sn);
            }

            // Attention, one (row, KV head) per work item.
            let att = sized(&mut w.att, t * dq);
            {
                let (q, bk, bv) = (&*q, &*bk, &*bv);
                let att_ptr = att.as_mut_ptr() as usize;
                let cache = &*self.cache;
                let ancestors = &ancestors;
                candle_core::utils::barrier_pool().execute_chunked(t * c.n_kv_heads, |range| {
                    thread_local! {
                        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
                    }
                    SCORES.with(|s| {
                        let mut scores = s.borrow_mut();
                        for item in range {
                            let (i, g) = (item / c.n_kv_heads, item % c.n_kv_heads);
                            let off = i * dq + g * n_rep * hd;
                            // SAFETY: each item writes its own disjoint
                            // `n_rep * hd` floats of `att`.
                            let out = unsafe {
                                std::slice::from_raw_parts_mut((att_ptr as *mut f32).add(off), n_rep * hd)
                            };
                            let block = BlockKv {
                                k: bk,
                                v: bv,
                                rows: &ancestors[i],
                            };
                            cache.attend(l, g, &q[off..off + n_rep * hd], &block, &mut scores, out);
                        }
                    })
                });
            }
            let o = sized(&mut w.o, t * d);
            matmul(
                att,
                t,
                dq,
                &mut [Product {
                    w: &layer.wo,
                    out: o,
                }],
                &mut w.scratch,
            );
            for (y, &z) in w.x[..t * d].iter_mut().zip(o.iter()) {
                *y += z;
            }

            let h = sized(&mut w.h, t * d);
            for i in 0..t {
                kernels::rms_norm(
                    &w.x[i * d..(i + 1) * d],
                    &layer.ffn_norm,
                    c.rms_eps,
                    &mut h[i * d..(i + 1) * d],
                );
            }
            let gate = sized(&mut w.gate, t * c.d_ff);
            let up = sized(&mut w.up, t * c.d_ff);
            matmul(
                h,
                t,
                d,
                &mut [
                    Product {
                        w: &layer.gate,
                        out: gate,
                    },
                    Product {
                        w: &layer.up,
                        out: up,
                    },
                ],
                &mut w.scratch,
            );
            kernels::swiglu(gate, up);
            let o = sized(&mut w.o, t * d);
            matmul(
                gate,
                t,
                c.d_ff,
                &mut [Product {
                    w: &layer.down,
                    out: o,
                }],
                &mut w.scratch,
            );
            for (y, &z) in w.x[..t * d].iter_mut().zip(o.iter()) {
                *y += z;
            }
        }

        if !want.is_empty() {
            let r = want.len();
            let h = sized(&mut w.h, r * d);
            for (j, &i) in want.iter().enumerate() {
                kernels::rms_norm(
                    &w.x[i * d..(i + 1) * d],
                    &model.out_norm,
                    c.rms_eps,
                    &mut h[j * d..(j + 1) * d],
                );
            }
            let logits = sized(&mut w.logits, r * c.vocab_size);
            matmul(
                h,
                r,
                d,
                &mut [Product {
                    w: model.output(),
                    out: logits,
                }],
                &mut w.scratch,
            );
        }
        Ok(())
    }
}

/// The CPU decoder as an [`Engine`] (the inherent methods, unchanged).
impl Engine for Decoder {
    fn tokens(&self) -> &[u32] {
        Decoder::tokens(self)
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], DecoderError> {
        Decoder::prefill(self, tokens)
    }

    fn prefill_logits(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>, DecoderError> {
        Decoder::prefill_logits(self, tokens, from)
    }

    fn verify(&mut self, root: u32, drafts: &[&[u32]]) -> Result<Verification, DecoderError> {
        Decoder::verify(self, root, drafts)
    }

    fn accept(&mut self, draft: usize, n_accepted: usize) -> Result<(), DecoderError> {
        Decoder::accept(self, draft, n_accepted)
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        Decoder::truncate(self, len)
    }
}
