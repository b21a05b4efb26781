//! The GGUF decoder as a [`LanguageModel`]: stateless calls, incremental
//! work.
//!
//! The samplers in [`super::decode`] ask for next-token laws after whole
//! contexts (prompt included) and never say what they will ask next. A
//! transformer wants the opposite: keep a KV cache and compute only new
//! positions. [`DecoderLm`] keeps one decoder, an [`Engine`] on the CPU or
//! a GPU ([`Weights`]), behind a `RefCell` (as `next_dists` takes `&self`),
//! and turns each call into as little work as the decoder's API allows:
//!
//! 1. The longest common prefix `S` of the call's contexts is what every row
//!    shares. The cache keeps the part of `S` it already holds (after
//!    committing the path of the previous verification tree that the new
//!    contexts took, see below) and drops the rest.
//! 2. All contexts equal (autoregressive sampling, a draft position where
//!    the `k` drafts agree): one `prefill` of the missing tokens (a `step`
//!    when one is missing), or no forward at all when the cache already ends
//!    with the context and its logits are kept.
//! 3. Contexts that differ (the target scoring `k` drafts: `P`, `P + d_i[..j]`;
//!    a draft position where drafts disagree): ONE [`Decoder::verify`] whose
//!    root is the first uncommitted token of `S` and whose drafts are each
//!    context's remaining tokens. The decoder merges them into a tree, so
//!    missing shared tokens, the drafts' common prefixes and every node are
//!    each computed once. Each context's row is its path's last node.
//!
//! Nothing of a verification is committed when it is made (the adapter
//! cannot know which draft will be kept). The next call commits, with
//! [`Decoder::accept`], the longest path of that tree its contexts share, so
//! the target's accepted tokens are never recomputed; only the token after
//! them (the residual or bonus token) is new. Draft calls whose `k` drafts
//! disagree recompute the tree of earlier positions in each call (the
//! decoder keeps one path, not a tree): `1 + (nodes so far)` positions per
//! call, batched into one forward.
//!
//! One [`LanguageModel::next_dists`] is one model call whatever it costs
//! ([`LmStats`] counts forwards and positions for the curious). A row's
//! distribution is computed from its logits by one function,
//! [`logits_to_dist`], and the decoder promises the same logits bits for a
//! position however it was batched, so a context gets the same `f64`s from
//! any path. At temperature 0 the distributions are one-hot on the argmax:
//! greedy speculative decoding then emits exactly greedy autoregressive
//! decoding's tokens (tested below).
//!
//! Contexts must be non-empty (the decoder has no logits before the first
//! token); a decoder error inside `next_dists`, which cannot return one,
//! panics. [`ModelPair::check_context`] checks lengths up front so that a
//! workload never gets there.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::lm::{Dist, LanguageModel};
use crate::decoder::{DecoderError, Engine, Model, Verification, Weights};
use crate::device::Device;
use crate::WorkloadError;

/// What a [`DecoderLm`] has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LmStats {
    /// [`LanguageModel::next_dists`] calls (the sampler's model calls).
    pub calls: u64,
    /// Decoder forward passes (`prefill`, `step`, `verify`) those calls ran.
    pub forwards: u64,
    /// Positions those forwards computed (tree nodes, prompt tokens).
    pub positions: u64,
    /// Wall seconds inside the decoder (forwards, accept, truncate; on a
    /// GPU up to the logits' arrival on the host, which synchronises).
    pub decoder_s: f64,
    /// Wall seconds turning logits into distributions ([`logits_to_dist`]).
    pub softmax_s: f64,
}

/// A decoder with a temperature, as a [`LanguageModel`].
pub struct DecoderLm {
    weights: Weights,
    state: RefCell<State>,
    temperature: f64,
    vocab: usize,
}

impl std::fmt::Debug for DecoderLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DecoderLm(T = {}, {:?})",
            self.temperature,
            self.state.borrow().decoder
        )
    }
}

struct State {
    decoder: Box<dyn Engine>,
    /// Logits after the committed tokens, when known.
    last: Option<Vec<f32>>,
    /// The previous call's verification, not committed.
    pending: Option<PendingTree>,
    stats: LmStats,
}

struct PendingTree {
    verification: Verification,
    root: u32,
    drafts: Vec<Vec<u32>>,
}

impl DecoderLm {
    /// An adapter over a fresh decoder of `model`. `temperature` divides the
    /// logits; 1 is the model's own distribution, 0 is greedy (one-hot on
    /// the argmax).
    pub fn new(model: Arc<Model>, temperature: f64) -> Result<DecoderLm, WorkloadError> {
        DecoderLm::on(Weights::Cpu(model), temperature)
    }

    /// As [`DecoderLm::new`], on the device that holds `weights`.
    pub fn on(weights: Weights, temperature: f64) -> Result<DecoderLm, WorkloadError> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(WorkloadError::Config(format!(
                "temperature must be finite and non-negative, got {temperature}"
            )));
        }
        Ok(DecoderLm {
            vocab: weights.model().vocab_size(),
            state: RefCell::new(State {
                decoder: weights.engine(),
                last: None,
                pending: None,
                stats: LmStats::default(),
            }),
            temperature,
            weights,
        })
    }

    /// Another adapter over the same weights (its own cache) at another
    /// temperature.
    pub fn with_temperature(&self, temperature: f64) -> Result<DecoderLm, WorkloadError> {
        DecoderLm::on(self.weights.clone(), temperature)
    }

    pub fn model(&self) -> Arc<Model> {
        self.weights.model().clone()
    }

    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    pub fn stats(&self) -> LmStats {
        self.state.borrow().stats
    }

    /// The tokens whose keys and values the cache holds now.
    pub fn cached_tokens(&self) -> Vec<u32> {
        self.state.borrow().decoder.tokens().to_vec()
    }
}

impl LanguageModel for DecoderLm {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist> {
        let mut s = self.state.borrow_mut();
        s.stats.calls += 1;
        let start = Instant::now();
        let rows = s
            .logits_for(contexts)
            .unwrap_or_else(|e| panic!("DecoderLm::next_dists: {e}"));
        let mid = Instant::now();
        let t = self.temperature;
        let dists = rows.par_iter().map(|r| logits_to_dist(r, t)).collect();
        s.stats.decoder_s += (mid - start).as_secs_f64();
        s.stats.softmax_s += mid.elapsed().as_secs_f64();
        dists
    }

    /// One `prefill` over the tokens the cache lacks, with the logits of
    /// every position from `first - 1` on.
    fn conditionals(&self, tokens: &[u32], first: usize) -> Vec<Dist> {
        if first >= tokens.len() {
            return Vec::new();
        }
        assert!(
            first > 0,
            "DecoderLm: no distribution before the first token"
        );
        let mut s = self.state.borrow_mut();
        s.pending = None;
        let start = Instant::now();
        let h = common_prefix(s.decoder.tokens(), tokens).min(first - 1);
        s.truncate(h)
            .unwrap_or_else(|e| panic!("DecoderLm::conditionals: {e}"));
        let logits = s
            .decoder
            .prefill_logits(&tokens[h..tokens.len() - 1], first - 1 - h)
            .unwrap_or_else(|e| panic!("DecoderLm::conditionals: {e}"));
        s.stats.forwards += 1;
        s.stats.positions += (tokens.len() - 1 - h) as u64;
        let mid = Instant::now();
        let t = self.temperature;
        let dists = logits
            .par_chunks_exact(self.vocab)
            .map(|r| logits_to_dist(r, t))
            .collect();
        s.stats.decoder_s += (mid - start).as_secs_f64();
        s.stats.softmax_s += mid.elapsed().as_secs_f64();
        s.last = logits
            .len()
            .checked_sub(self.vocab)
            .map(|at| logits[at..].to_vec());
        dists
    }
}

impl State {
    /// Drops the cache after `len` tokens (nothing if it holds no more).
    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        if len < self.decoder.tokens().len() {
            self.pending = None;
            self.last = None;
            self.decoder.truncate(len)?;
        }
        Ok(())
    }

    /// The logits after each context (see the module doc for the plan).
    fn logits_for(&mut self, contexts: &[&[u32]]) -> Result<Vec<Vec<f32>>, DecoderError> {
        let Some(&first) = contexts.first() else {
            return Ok(Vec::new());
        };
        if contexts.iter().any(|c| c.is_empty()) {
            return Err(DecoderError::Input(
                "an empty context has no next-token distribution".into(),
            ));
        }
        let lcp = contexts[1..]
            .iter()
            .fold(first.len(), |n, c| n.min(common_prefix(first, c)));
        if lcp == 0 {
            // No shared first token, so no tree: one context at a time.
            return contexts
                .iter()
                .map(|&c| self.logits_for(&[c]).map(|mut r| r.remove(0)))
                .collect();
        }
        let same = contexts.iter().all(|c| c.len() == lcp);
        // Committed tokens may run up to the shared prefix when one row is
        // wanted, and must stop one short of it for a tree (its root is the
        // first uncommitted token, which every context must share).
        let cap = if same { lcp } else { lcp - 1 };
        self.resolve_pending(first, cap)?;
        let h = common_prefix(self.decoder.tokens(), first).min(cap);
        self.truncate(h)?;
        if same {
            if h < lcp || self.last.is_none() {
                let from = h.min(lcp - 1);
                self.truncate(from)?;
                let logits = self.decoder.prefill(&first[from..])?.to_vec();
                self.stats.forwards += 1;
                self.stats.positions += (lcp - from) as u64;
                self.last = Some(logits);
            }
            let last = self.last.as_ref().expect("just set");
            return Ok(vec![last.clone(); contexts.len()]);
        }
        let root = first[h];
        let drafts: Vec<Vec<u32>> = contexts.iter().map(|c| c[h + 1..].to_vec()).collect();
        let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
        let verification = self.decoder.verify(root, &refs)?;
        self.stats.forwards += 1;
        self.stats.positions += verification.tree_nodes() as u64;
        let rows = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| verification.logits(i, d.len()).to_vec())
            .collect();
        self.pending = Some(PendingTree {
            verification,
            root,
            drafts,
        });
        Ok(rows)
    }

    /// Commits the longest path of the pending tree that `context` follows
    /// within its first `cap` tokens (the part every new context shares).
    fn resolve_pending(&mut self, context: &[u32], cap: usize) -> Result<(), DecoderError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let base = self.decoder.tokens().len();
        if cap <= base
            || context[base] != p.root
            || common_prefix(self.decoder.tokens(), context) < base
        {
            return Ok(());
        }
        let want = &context[base + 1..cap];
        let (draft, n) = p
            .drafts
            .iter()
            .map(|d| common_prefix(d, want))
            .enumerate()
            .fold(
                (0, 0),
                |best, (i, n)| if n > best.1 { (i, n) } else { best },
            );
        self.decoder.accept(draft, n)?;
        self.last = Some(p.verification.logits(draft, n).to_vec());
        Ok(())
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Softmax of `logits / temperature` in `f64`, normalised by its sum; at
/// temperature 0, one-hot on the largest logit (the lowest id among ties).
///
/// The exponentials and the division run in parallel (rayon), element by
/// element, and the sum in order, so the result is the same bits on any
/// number of threads. For 151,936 tokens a row costs 2.1 ms on one core
/// of the H100 machine's host and 0.68 ms on its 16 (bench
/// `sampler_152k/logits_to_dist`), against 7-9 ms for a GPU decoder call;
/// callers map rows in parallel too.
///
/// # Panics
/// On a non-finite logit (a broken model, not something to sample from).
pub fn logits_to_dist(logits: &[f32], temperature: f64) -> Dist {
    const PAR_MIN: usize = 8192;
    assert!(
        logits.iter().all(|x| x.is_finite()),
        "logits_to_dist: non-finite logit"
    );
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    if temperature == 0.0 {
        let mut d = vec![0.0; logits.len()];
        d[best] = 1.0;
        return d;
    }
    let max = logits[best] as f64;
    let mut d: Dist = logits
        .par_iter()
        .with_min_len(PAR_MIN)
        .map(|&x| ((x as f64 - max) / temperature).exp())
        .collect();
    // The largest term is exp(0) = 1, so the sum is in [1, vocab].
    let sum: f64 = d.iter().sum();
    d.par_iter_mut()
        .with_min_len(PAR_MIN)
        .for_each(|p| *p /= sum);
    d
}

// ---------------------------------------------------------------------------
// A draft/target pair of GGUF files.

/// Environment variable naming the draft GGUF of the `user-pair` variant.
pub const ENV_DRAFT: &str = "BENCH_SUITE_DRAFT_GGUF";
/// Environment variable naming the target GGUF of the `user-pair` variant.
pub const ENV_TARGET: &str = "BENCH_SUITE_TARGET_GGUF";

/// A draft and a target model that share a tokenizer, each at temperature
/// 1 (for sampling) and 0 (for the greedy check).
pub struct ModelPair {
    pub draft: DecoderLm,
    pub target: DecoderLm,
    pub greedy_draft: DecoderLm,
    pub greedy_target: DecoderLm,
}

impl ModelPair {
    /// Loads both files, refusing a pair whose tokenizers (vocabulary,
    /// merges, pre-tokenizer) or output sizes differ.
    pub fn load(draft: &Path, target: &Path, device: Device) -> Result<ModelPair, WorkloadError> {
        for p in [draft, target] {
            if !p.is_file() {
                return Err(WorkloadError::Config(format!(
                    "model file {} does not exist",
                    p.display()
                )));
            }
        }
        let (dt, tt) = (tokenizer_digest(draft)?, tokenizer_digest(target)?);
        if dt != tt {
            return Err(WorkloadError::Config(format!(
                "the draft {} and the target {} have different tokenizers (vocabulary, merges \
                 or pre-tokenizer differ); speculative decoding needs one token space, so pick \
                 two models of one family",
                draft.display(),
                target.display()
            )));
        }
        let load = |p: &Path| Model::load(p).map(Arc::new).map_err(WorkloadError::from);
        let (dm, tm) = (load(draft)?, load(target)?);
        if dm.vocab_size() != tm.vocab_size() {
            return Err(WorkloadError::Config(format!(
                "the draft {} scores {} tokens and the target {} scores {}; they must agree",
                draft.display(),
                dm.vocab_size(),
                target.display(),
                tm.vocab_size()
            )));
        }
        let (dw, tw) = (Weights::on(dm, device)?, Weights::on(tm, device)?);
        Ok(ModelPair {
            draft: DecoderLm::on(dw.clone(), 1.0)?,
            target: DecoderLm::on(tw.clone(), 1.0)?,
            greedy_draft: DecoderLm::on(dw, 0.0)?,
            greedy_target: DecoderLm::on(tw, 0.0)?,
        })
    }

    /// The pair named by [`ENV_DRAFT`] and [`ENV_TARGET`].
    pub fn from_env(device: Device) -> Result<ModelPair, WorkloadError> {
        let var = |name: &str| {
            std::env::var_os(name).map(PathBuf::from).ok_or_else(|| {
                WorkloadError::Config(format!(
                    "variant `user-pair` reads the draft GGUF from {ENV_DRAFT} and the target \
                     GGUF from {ENV_TARGET}; {name} is not set"
                ))
            })
        };
        ModelPair::load(&var(ENV_DRAFT)?, &var(ENV_TARGET)?, device)
    }

    /// Refuses a job whose sequences (prompt, new tokens and one block of
    /// drafts) would not fit both models' context.
    pub fn check_context(&self, longest: usize) -> Result<(), WorkloadError> {
        for (who, lm) in [("draft", &self.draft), ("target", &self.target)] {
            let n = lm.model().config().context_length;
            if longest >= n {
                return Err(WorkloadError::Config(format!(
                    "the {who} model has a context of {n} tokens; this job needs {longest}"
                )));
            }
        }
        Ok(())
    }
}

/// A digest of a GGUF file's tokenizer: its model, pre-tokenizer, token
/// strings, token types and merges (read from the header only).
pub fn tokenizer_digest(path: &Path) -> Result<[u8; 32], WorkloadError> {
    let bad = |problem: String| WorkloadError::Config(format!("{}: {problem}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let ct = gguf_file::Content::read(&mut file).map_err(|e| bad(e.to_string()))?;
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre"] {
        let v = ct.metadata.get(key).and_then(|v| v.to_string().ok());
        put(v.map_or(&b""[..], |s| s.as_bytes()));
    }
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    ] {
        put(key.as_bytes());
        let Some(v) = ct.metadata.get(key) else {
            continue;
        };
        let items = v.to_vec().map_err(|e| bad(format!("{key}: {e}")))?;
        put(&(items.len() as u64).to_le_bytes());
        for item in items {
            match item {
                gguf_file::Value::String(s) => put(s.as_bytes()),
                other => put(&other.to_i32().unwrap_or(i32::MIN).to_le_bytes()),
            }
        }
    }
    Ok(h.finalize().into())
}

// ---------------------------------------------------------------------------
// Prompts.

/// The workload's prompts (48, eight per category), one JSON object a line:
/// `{"id", "category", "turns": [user turns], "source"}`.
pub const PROMPTS_JSONL: &str = include_str!("../../data/spectr-prompts.jsonl");

/// One prompt of [`PROMPTS_JSONL`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Prompt {
    pub id: String,
    pub category: String,
    pub turns: Vec<String>,
}

/// Parses [`PROMPTS_JSONL`] (blank lines skipped).
pub fn prompts() -> Result<Vec<Prompt>, WorkloadError> {
    PROMPTS_JSONL
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let p: Prompt = serde_json::from_str(l).map_err(|e| {
                WorkloadError::Config(format!(
                    "workloads/data/spectr-prompts.jsonl line {}: {e}",
                    i + 1
                ))
            })?;
            if p.turns.is_empty() {
                return Err(WorkloadError::Config(format!(
                    "workloads/data/spectr-prompts.jsonl line {}: prompt `{}` has no turns",
                    i + 1,
                    p.id
                )));
            }
            Ok(p)
        })
        .collect()
}

/// The text a chat model is prompted with: its ChatML template with the
/// default system turn and every user turn in order, then the opening of
/// the assistant's turn. The prompt file has no assistant replies, so a
/// multi-turn prompt is consecutive user turns (the model answers them
/// together). A model without a chat template gets the turns separated by
/// blank lines.
pub fn render(model: &Model, prompt: &Prompt) -> String {
    let Some(template) = model.tokenizer().chat_template() else {
        return prompt.turns.join("\n\n");
    };
    let last = prompt.turns.len() - 1;
    let mut s = template.format(None, &prompt.turns[last]);
    if last > 0 {
        // `format` writes one user turn; the earlier ones go right before it.
        let at = s
            .rfind("<|im_start|>user\n")
            .expect("the template opens a user turn");
        let earlier: String = prompt.turns[..last]
            .iter()
            .map(|t| format!("<|im_start|>user\n{t}<|im_end|>\n"))
            .collect();
        s.insert_str(at, &earlier);
    }
    s
}

#[cfg(test)]
mod tests {
    //! On the real models when their GGUF files are fetched (tests skip with
    //! a notice otherwise; CI fetches neither SmolLM2 nor Qwen).

    use super::*;
    use crate::assets;
    use crate::spectr::decode;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use statrs::distribution::{ChiSquared, ContinuousCDF};

    fn real(asset: &assets::Asset) -> Option<Arc<Model>> {
        match assets::path(asset) {
            Ok(p) => Some(Arc::new(Model::load(p).unwrap())),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn chat(model: &Model, user: &str) -> Vec<u32> {
        let p = Prompt {
            id: "t".into(),
            category: "t".into(),
            turns: vec![user.into()],
        };
        model.tokenizer().encode(&render(model, &p)).unwrap()
    }

    fn no_check() -> impl FnMut() -> Result<(), WorkloadError> {
        || Ok(())
    }

    #[test]
    fn softmax_sums_to_one_and_greedy_breaks_ties_low() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        for t in [0.5, 1.0, 2.0] {
            let d = logits_to_dist(&logits, t);
            assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-15);
            // Against the closed form in f64.
            let z: f64 = logits.iter().map(|&x| (x as f64 / t).exp()).sum();
            for (p, &x) in d.iter().zip(&logits) {
                assert!((p - (x as f64 / t).exp() / z).abs() < 1e-15);
            }
        }
        assert_eq!(logits_to_dist(&logits, 0.0), vec![0.0, 1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn the_prompt_file_parses_and_renders_multi_turn_in_order() {
        let ps = prompts().unwrap();
        assert!(!ps.is_empty());
        assert!(ps.iter().all(|p| !p.turns.is_empty()));
        let Some(model) = real(&assets::SMOLLM2_135M) else {
            return;
        };
        let template = model.tokenizer().chat_template().unwrap();
        let one = Prompt {
            id: "a".into(),
            category: "c".into(),
            turns: vec!["hi".into()],
        };
        assert_eq!(render(&model, &one), template.format(None, "hi"));
        let two = Prompt {
            turns: vec!["first".into(), "second".into()],
            ..one
        };
        let s = render(&model, &two);
        assert!(s.ends_with(
            "<|im_start|>user\nfirst<|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n\
             <|im_start|>assistant\n"
        ));
        assert!(s.starts_with("<|im_start|>system\n"));
    }

    #[test]
    fn a_pair_with_different_tokenizers_is_refused_naming_both_files() {
        let (Ok(smol), Ok(qwen)) = (
            assets::path(&assets::SMOLLM2_135M),
            assets::path(&assets::QWEN_CODER_0_5B),
        ) else {
            eprintln!("skipped: SmolLM2 or Qwen 0.5B not fetched");
            return;
        };
        assert_eq!(
            tokenizer_digest(&smol).unwrap(),
            tokenizer_digest(&smol).unwrap()
        );
        let Err(WorkloadError::Config(msg)) = ModelPair::load(&smol, &qwen, Device::Cpu) else {
            panic!("a SmolLM2 draft for a Qwen target was accepted");
        };
        assert!(msg.contains("different tokenizers"), "{msg}");
        assert!(msg.contains(&smol.display().to_string()), "{msg}");
        assert!(msg.contains(&qwen.display().to_string()), "{msg}");
        let missing = Path::new("/no/such/model.gguf");
        let Err(WorkloadError::Config(msg)) = ModelPair::load(missing, &qwen, Device::Cpu) else {
            panic!("a missing file was accepted");
        };
        assert!(msg.contains("/no/such/model.gguf"), "{msg}");
    }

    /// Contexts of a SpecTr target call (prompt, then every prefix of `k`
    /// drafts that branch) in one batched call, against single-context
    /// calls: every distribution bitwise equal. The single-context
    /// reference is one adapter asked one context at a time (a prefill
    /// after truncation), itself checked against fresh adapters at the
    /// prompt and at the deepest context. Then calls in the order a sampler
    /// makes them (a draft call, a tree, the next block) on the reused
    /// adapter, and whole-sequence scoring, against the reference again.
    fn tree_equals_single(model: Arc<Model>) {
        let prompt = chat(&model, "Name three rivers.");
        let vocab = model.vocab_size() as u32;
        let drafts: Vec<Vec<u32>> = (0..3u32)
            .map(|i| {
                (0..3u32)
                    .map(|j| (1000 + 37 * i + 11 * j * (i % 2)) % vocab)
                    .collect()
            })
            .collect();
        let mut contexts = vec![prompt.clone()];
        for d in &drafts {
            for j in 1..=d.len() {
                let c = [&prompt[..], &d[..j]].concat();
                if !contexts.contains(&c) {
                    contexts.push(c);
                }
            }
        }
        let solo = DecoderLm::new(model.clone(), 1.0).unwrap();
        let single = |c: &[u32]| solo.next_dist(c);
        for c in [&contexts[0], contexts.last().unwrap()] {
            let fresh = DecoderLm::new(model.clone(), 1.0).unwrap().next_dist(c);
            assert!(
                single(c) == fresh,
                "a reused single-context adapter differs"
            );
        }
        let lm = DecoderLm::new(model.clone(), 1.0).unwrap();
        // A first call that leaves something in the cache to reuse.
        lm.next_dist(&prompt[..prompt.len() - 4]);
        let refs: Vec<&[u32]> = contexts.iter().map(|c| &c[..]).collect();
        let batched = lm.next_dists(&refs);
        assert_eq!(lm.stats().forwards, 2, "the tree is one forward");
        for (c, b) in contexts.iter().zip(&batched) {
            assert!(single(c) == *b, "context of {} tokens differs", c.len());
            assert!((b.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        // Next block: drafts[1][..2] kept, then a new token; a draft call at
        // two branches, and a target tree over them.
        let next = [&prompt[..], &drafts[1][..2], &[7]].concat();
        let (a, b) = ([&next[..], &[5]].concat(), [&next[..], &[9]].concat());
        let calls: Vec<Vec<Vec<u32>>> = vec![
            vec![next.clone()],
            vec![a.clone(), b.clone()],
            vec![next.clone(), a.clone(), b.clone(), [&a[..], &[3]].concat()],
            vec![prompt.clone()],
        ];
        for (i, call) in calls.iter().enumerate() {
            let before = lm.stats().positions;
            let refs: Vec<&[u32]> = call.iter().map(|c| &c[..]).collect();
            for (c, got) in call.iter().zip(lm.next_dists(&refs)) {
                assert!(
                    single(c) == got,
                    "reused adapter differs at {} tokens",
                    c.len()
                );
            }
            if i == 0 {
                // The kept path of the tree was committed, not recomputed:
                // only the new token 7 was.
                assert_eq!(lm.stats().positions - before, 1);
            }
        }
        let seq = [&prompt[..], &drafts[0][..]].concat();
        let along = lm.conditionals(&seq, prompt.len());
        assert_eq!(along.len(), drafts[0].len());
        for (j, d) in along.iter().enumerate() {
            assert!(single(&seq[..prompt.len() + j]) == *d, "conditional {j}");
        }
    }

    #[test]
    fn smollm2_tree_call_equals_single_calls() {
        if let Some(m) = real(&assets::SMOLLM2_135M) {
            tree_equals_single(m);
        }
    }

    #[test]
    fn qwen_0_5b_tree_call_equals_single_calls() {
        if let Some(m) = real(&assets::QWEN_CODER_0_5B) {
            tree_equals_single(m);
        }
    }

    /// A greedy draft that disagrees with its model at every third
    /// position (one-hot on the next id after the argmax), so greedy
    /// speculative decoding has rejections to get right.
    struct Contrary<'a>(&'a DecoderLm);

    impl LanguageModel for Contrary<'_> {
        fn vocab_size(&self) -> usize {
            self.0.vocab_size()
        }
        fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist> {
            let mut dists = self.0.next_dists(contexts);
            for (c, d) in contexts.iter().zip(&mut dists) {
                if c.len() % 3 == 0 {
                    let top = d.iter().position(|&p| p == 1.0).expect("one-hot");
                    let n = d.len();
                    d[top] = 0.0;
                    d[(top + 1) % n] = 1.0;
                }
            }
            dists
        }
    }

    /// Greedy SpecTr against greedy autoregressive decoding, token for
    /// token, for each `(k, L)` of `configs`; configuration `i` runs on
    /// prompt `i % prompts.len()` (so every prompt and every configuration
    /// is covered without the product's cost).
    fn greedy_equality(
        draft: &dyn LanguageModel,
        target: &DecoderLm,
        prompts: &[Vec<u32>],
        n: usize,
        configs: &[(usize, usize)],
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let reference: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                decode::autoregressive(target, p, n, &mut rng, &mut no_check())
                    .unwrap()
                    .tokens
            })
            .collect();
        for (i, &(k, l)) in configs.iter().enumerate() {
            let pi = i % prompts.len();
            let g = decode::spectr(
                draft,
                target,
                &prompts[pi],
                n,
                k,
                l,
                &mut rng,
                &mut no_check(),
            )
            .unwrap();
            assert_eq!(g.tokens, reference[pi], "prompt {pi}, k {k}, L {l}");
            assert!(g.blocks > 1 && g.tokens.len() == n);
        }
    }

    fn three_prompts(model: &Model) -> Vec<Vec<u32>> {
        [
            "Write a haiku about autumn.",
            "What is 17 times 23? Explain step by step.",
            "Translate to French: The cat sleeps on the warm windowsill.",
        ]
        .iter()
        .map(|u| chat(model, u))
        .collect()
    }

    #[test]
    fn smollm2_greedy_spectr_equals_greedy_autoregressive() {
        let Some(m) = real(&assets::SMOLLM2_135M) else {
            return;
        };
        let target = DecoderLm::new(m.clone(), 0.0).unwrap();
        let draft = DecoderLm::new(m.clone(), 0.0).unwrap();
        let configs = [(1, 2), (2, 4), (4, 2), (1, 4), (2, 2), (4, 4)];
        greedy_equality(&Contrary(&draft), &target, &three_prompts(&m), 32, &configs);
    }

    #[test]
    fn qwen_greedy_spectr_equals_greedy_autoregressive() {
        let (Some(small), Some(large)) = (
            real(&assets::QWEN_CODER_0_5B),
            real(&assets::QWEN_CODER_1_5B),
        ) else {
            return;
        };
        let draft = DecoderLm::new(small, 0.0).unwrap();
        let target = DecoderLm::new(large.clone(), 0.0).unwrap();
        greedy_equality(&draft, &target, &three_prompts(&large)[..1], 32, &[(2, 4)]);
    }

    /// Two-sample chi-square test of homogeneity over several tables
    /// (summed statistics and degrees of freedom). In each table, tokens
    /// with fewer than 10 draws over both samples are pooled into one cell.
    fn two_sample_p(tables: &[(Vec<u32>, Vec<u32>)]) -> f64 {
        let (mut stat, mut dof) = (0.0, 0usize);
        for (a, b) in tables {
            let mut counts: std::collections::BTreeMap<u32, (f64, f64)> = Default::default();
            for &t in a {
                counts.entry(t).or_default().0 += 1.0;
            }
            for &t in b {
                counts.entry(t).or_default().1 += 1.0;
            }
            let mut cells: Vec<(f64, f64)> = Vec::new();
            let mut pool = (0.0, 0.0);
            for &(x, y) in counts.values() {
                if x + y < 10.0 {
                    pool = (pool.0 + x, pool.1 + y);
                } else {
                    cells.push((x, y));
                }
            }
            if pool.0 + pool.1 > 0.0 {
                cells.push(pool);
            }
            let (na, nb) = (a.len() as f64, b.len() as f64);
            for &(x, y) in &cells {
                let e = (x + y) / (na + nb);
                stat += (x - na * e).powi(2) / (na * e) + (y - nb * e).powi(2) / (nb * e);
            }
            dof += cells.len().saturating_sub(1);
        }
        if dof == 0 {
            return 1.0;
        }
        ChiSquared::new(dof as f64).unwrap().sf(stat)
    }

    #[test]
    fn smollm2_spectr_first_token_follows_the_target() {
        // Draft: SmolLM2 at temperature 2, far from the target (SmolLM2 at
        // temperature 1), so K-SEQ rejects often. The draft's own samples
        // must fail the same test (the test has power); SpecTr's must pass.
        let Some(m) = real(&assets::SMOLLM2_135M) else {
            return;
        };
        let target = DecoderLm::new(m.clone(), 1.0).unwrap();
        let draft = DecoderLm::new(m.clone(), 2.0).unwrap();
        let prompts: Vec<Vec<u32>> = ["Give me one word that describes the sea.", "Pick a colour."]
            .iter()
            .map(|u| chat(&m, u))
            .collect();
        let draws = 150;
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (mut ours, mut wrong) = (Vec::new(), Vec::new());
        for p in &prompts {
            let first = |lm: &dyn LanguageModel, rng: &mut ChaCha8Rng| {
                decode::autoregressive(lm, p, 1, rng, &mut no_check())
                    .unwrap()
                    .tokens[0]
            };
            let reference: Vec<u32> = (0..draws).map(|_| first(&target, &mut rng)).collect();
            let spectr: Vec<u32> = (0..draws)
                .map(|_| {
                    decode::spectr(&draft, &target, p, 1, 2, 1, &mut rng, &mut no_check())
                        .unwrap()
                        .tokens[0]
                })
                .collect();
            let drafted: Vec<u32> = (0..draws).map(|_| first(&draft, &mut rng)).collect();
            ours.push((spectr, reference.clone()));
            wrong.push((drafted, reference));
        }
        let (p_ours, p_wrong) = (two_sample_p(&ours), two_sample_p(&wrong));
        eprintln!("first-token homogeneity: spectr p = {p_ours:.3e}, draft p = {p_wrong:.3e}");
        assert!(p_ours > 1e-3, "SpecTr's first token is off: p = {p_ours}");
        assert!(
            p_wrong < 1e-3,
            "the test cannot tell the draft apart: p = {p_wrong}"
        );
    }
}
