//! Word-level n-gram language models trained on real English text (the
//! Jargon File): the draft and target of the `ngram-jargon` variant.
//!
//! Where to start: [`NgramPair::from_text`] (or [`NgramPair::jargon`]) cuts
//! the text into documents, holds every tenth one out, fits a
//! [`WordTokenizer`] on the rest and trains two [`NgramModel`]s on it:
//!
//! - target: interpolated modified Kneser-Ney of order 4 (Chen & Goodman,
//!   "An empirical study of smoothing techniques for language modeling",
//!   Harvard TR-10-98, 1998, section 3), with three discounts per order
//!   estimated from counts of counts and continuation counts below the top
//!   order;
//! - draft: interpolated absolute discounting of order 2 (raw counts at
//!   every order, one estimated discount per order).
//!
//! Both bottom out in the uniform distribution, so every probability is
//! positive and speculative acceptance ratios q/p are always defined. Each
//! model returns the full dense next-token distribution over the vocabulary
//! in O(V + observed continuations): the context-free bottom of the
//! interpolation is cached as a dense row, and each higher order adds its
//! sparse discounted counts on top of it.
//!
//! Measured on 2026-11-26 (Jargon File 4.4.7, default [`NgramConfig`]:
//! V = 4096, one document in ten held out; 2-core machine, test profile at
//! opt-level 2; `cargo test -p workloads spectr::ngram::tests::jargon --
//! --nocapture` prints these):
//!
//! | | value |
//! |---|---|
//! | training / held-out tokens | 305,777 / 31,454 |
//! | held-out `<unk>` rate | 10.7 % |
//! | held-out perplexity, draft (bigram, absolute discounting) | 107.1 |
//! | held-out perplexity, target (4-gram, modified Kneser-Ney) | 69.4 |
//! | mean acceptance sum_x min(p, q), 4,494 held-out contexts | 0.674 |
//! | build (tokenize, split, both models) | 0.24-0.33 s |
//! | one dense target row (V = 4096) | 4.1 us |
//!
//! On the same split, modified Kneser-Ney of order 3 / 5 gives 73.6 / 68.2
//! and a 4-gram with one fixed discount of 0.75 gives 72.8: order 4 takes
//! most of the gain, and the three estimated discounts are worth having.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::lm::{Dist, LanguageModel};
use crate::WorkloadError;

/// The paragraph marker token (a blank line in the text).
pub const PARAGRAPH: &str = "<p>";
/// The out-of-vocabulary token; always id [`UNK_ID`].
pub const UNK: &str = "<unk>";
pub const UNK_ID: u32 = 0;

/// Token ids are packed 16 bits apiece into `u128` keys.
const ID_BITS: u32 = 16;
/// The largest vocabulary the packing allows.
pub const MAX_VOCAB: usize = 1 << ID_BITS;
/// The largest order the packing allows (8 ids of 16 bits in 128).
pub const MAX_ORDER: usize = 8;
/// Outside the lexicon (front matter, appendices) a document is cut after
/// this many paragraphs, so that no single long chapter decides the split.
const MAX_DOC_PARAGRAPHS: usize = 10;

// ---------------------------------------------------------------------------
// Tokenizer

/// Splits text into word-level pieces: lower-cased letter runs (an
/// apostrophe between letters stays inside, so "don't" is one piece), runs
/// of ASCII digits, and every other visible character on its own, except
/// that a run of one repeated mark ("---", "════") becomes one piece of at
/// most three. A blank line becomes [`PARAGRAPH`]; single newlines are
/// hard wrapping and count as spaces.
pub fn pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut out: Vec<String> = Vec::with_capacity(n / 4);
    let mut newlines = 0;
    let mut i = 0;
    while i < n {
        let c = chars[i];
        if c.is_whitespace() {
            newlines += usize::from(c == '\n');
            i += 1;
            continue;
        }
        if newlines >= 2 && out.last().is_some_and(|p| p != PARAGRAPH) {
            out.push(PARAGRAPH.to_string());
        }
        newlines = 0;
        if c.is_alphabetic() {
            let mut w = String::new();
            while i < n {
                let c = chars[i];
                if c.is_alphabetic() {
                    w.extend(c.to_lowercase());
                } else if (c == '\'' || c == '\u{2019}')
                    && chars.get(i + 1).is_some_and(|d| d.is_alphabetic())
                {
                    w.push('\'');
                } else {
                    break;
                }
                i += 1;
            }
            out.push(w);
        } else if c.is_ascii_digit() {
            let start = i;
            while i < n && chars[i].is_ascii_digit() {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else {
            let start = i;
            while i < n && chars[i] == c {
                i += 1;
            }
            out.push(std::iter::repeat_n(c, (i - start).min(3)).collect());
        }
    }
    out
}

/// A closed word-level vocabulary: `<unk>` (id 0) plus the most frequent
/// training pieces, most frequent first, ties broken by the piece's text so
/// that the ids do not depend on hash order.
#[derive(Debug, Clone)]
pub struct WordTokenizer {
    words: Vec<String>,
    index: HashMap<String, u32>,
}

impl WordTokenizer {
    /// Keeps the `vocab_size - 1` most frequent of `pieces` (fewer if there
    /// are fewer distinct pieces).
    pub fn fit<'a>(pieces: impl IntoIterator<Item = &'a str>, vocab_size: usize) -> Self {
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for p in pieces {
            *counts.entry(p).or_default() += 1;
        }
        let mut ranked: Vec<(&str, u64)> = counts.into_iter().filter(|&(p, _)| p != UNK).collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        ranked.truncate(vocab_size.saturating_sub(1));
        let words: Vec<String> = std::iter::once(UNK)
            .chain(ranked.iter().map(|&(p, _)| p))
            .map(str::to_string)
            .collect();
        let index = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        WordTokenizer { words, index }
    }

    pub fn vocab_size(&self) -> usize {
        self.words.len()
    }

    /// The id of a piece, [`UNK_ID`] when it is not in the vocabulary.
    pub fn id(&self, piece: &str) -> u32 {
        self.index.get(piece).copied().unwrap_or(UNK_ID)
    }

    /// The text of an id.
    ///
    /// # Panics
    /// When `id` is not below [`Self::vocab_size`].
    pub fn piece(&self, id: u32) -> &str {
        &self.words[id as usize]
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        pieces(text).iter().map(|p| self.id(p)).collect()
    }

    /// Pieces joined by spaces, with a blank line for each [`PARAGRAPH`]:
    /// readable, not a byte-exact inverse of [`Self::encode`].
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::new();
        for &id in ids {
            let p = self.piece(id);
            if p == PARAGRAPH {
                s.push_str("\n\n");
            } else {
                if !(s.is_empty() || s.ends_with('\n')) {
                    s.push(' ');
                }
                s.push_str(p);
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Documents and the held-out split

/// A Jargon File entry starts with a line `:term: ...`.
fn is_entry_heading(line: &str) -> bool {
    let mut chars = line.trim_start().chars();
    if chars.next() != Some(':') {
        return false;
    }
    match chars.next() {
        Some(c) if !c.is_whitespace() && c != ':' => chars.as_str().contains(':'),
        _ => false,
    }
}

/// Cuts text into documents: each lexicon entry from its heading to the
/// next, and elsewhere runs of at most [`MAX_DOC_PARAGRAPHS`] paragraphs.
pub fn documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut doc_start = 0;
    let mut paragraphs = 0;
    let mut offset = 0;
    let mut prev_blank = true;
    for line in text.split_inclusive('\n') {
        let blank = line.trim().is_empty();
        if !blank && prev_blank {
            let cut = is_entry_heading(line) || paragraphs == MAX_DOC_PARAGRAPHS;
            if cut && paragraphs > 0 {
                docs.push(&text[doc_start..offset]);
                doc_start = offset;
                paragraphs = 0;
            }
            paragraphs += 1;
        }
        prev_blank = blank;
        offset += line.len();
    }
    if !text[doc_start..].trim().is_empty() {
        docs.push(&text[doc_start..]);
    }
    docs
}

// ---------------------------------------------------------------------------
// Models

/// How an [`NgramModel`] smooths its counts. Every variant interpolates each
/// order with the next lower one and the unigram with the uniform
/// distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Smoothing {
    /// Interpolated modified Kneser-Ney: discounts D1, D2, D3+ per order
    /// from counts of counts; continuation counts N1+(. h w) below the top
    /// order.
    ModifiedKneserNey,
    /// Interpolated Kneser-Ney with one given discount in (0, 1] at every
    /// order (for hand-checkable tests).
    KneserNey { discount: f64 },
    /// Interpolated absolute discounting: raw counts at every order, one
    /// discount n1 / (n1 + 2 n2) per order.
    AbsoluteDiscounting,
}

impl Smoothing {
    fn continuation_counts(self) -> bool {
        !matches!(self, Smoothing::AbsoluteDiscounting)
    }
}

/// A fast hash for packed keys (std's SipHash guards against adversarial
/// keys, which token ids are not, and costs several times more here).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = crate::seed::mix64(self.0 ^ u64::from(b));
        }
    }

    fn write_u128(&mut self, k: u128) {
        self.0 = crate::seed::mix64(self.0 ^ crate::seed::mix64(k as u64) ^ (k >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyMap<V> = HashMap<u128, V, BuildHasherDefault<KeyHasher>>;

/// Packs ids, the last one in the low bits, so `key >> 16` is the context
/// and `key & 0xffff` the predicted token. Keys of one length never meet
/// keys of another (each order has its own map), so the packing is
/// injective where it matters.
fn pack(ids: &[u32]) -> u128 {
    ids.iter()
        .fold(0u128, |k, &t| (k << ID_BITS) | u128::from(t))
}

const LOW_ID: u128 = (1 << ID_BITS) - 1;

/// One observed context: its continuations are `words[start..start + len]`
/// (sorted) with discounted probabilities `mass[..]`, and `backoff` is the
/// weight left for the lower order.
#[derive(Debug, Clone, Copy)]
struct Context {
    start: u32,
    len: u32,
    backoff: f64,
}

/// The contexts of one length.
#[derive(Debug, Clone, Default)]
struct Level {
    contexts: KeyMap<Context>,
    words: Vec<u32>,
    mass: Vec<f64>,
}

/// An interpolated n-gram model with dense next-token distributions.
#[derive(Debug, Clone)]
pub struct NgramModel {
    order: usize,
    vocab: usize,
    smoothing: Smoothing,
    /// The unigram interpolated with the uniform distribution: the bottom of
    /// every row, computed once.
    base: Vec<f64>,
    /// `levels[j]` holds the contexts of length j + 1 (order j + 2).
    levels: Vec<Level>,
    /// Discounts (D1, D2, D3+) of orders 1..=order.
    discounts: Vec<[f64; 3]>,
}

/// Modified Kneser-Ney discounts from counts of counts n1..n4 (Chen &
/// Goodman: Y = n1 / (n1 + 2 n2), D_i = i - (i + 1) Y n_(i+1) / n_i),
/// guarded for tiny corpora: without singletons or doubletons there is no
/// basis for the estimate and (0.5, 1, 1.5) is used; a missing n3 or n4
/// repeats the previous discount; and D_i is kept in [0.05, i] so that
/// every seen context leaves some mass to the lower order and no
/// continuation gets a negative one.
pub fn modified_kn_discounts(n: [u64; 4]) -> [f64; 3] {
    let [n1, n2, n3, n4] = n.map(|x| x as f64);
    if n1 == 0.0 || n2 == 0.0 {
        return [0.5, 1.0, 1.5];
    }
    let y = n1 / (n1 + 2.0 * n2);
    let d1 = 1.0 - 2.0 * y * n2 / n1;
    let d2 = if n3 > 0.0 {
        2.0 - 3.0 * y * n3 / n2
    } else {
        d1
    };
    let d3 = if n4 > 0.0 {
        3.0 - 4.0 * y * n4 / n3
    } else {
        d2
    };
    [
        d1.clamp(0.05, 1.0),
        d2.clamp(0.05, 2.0),
        d3.clamp(0.05, 3.0),
    ]
}

impl NgramModel {
    /// Trains on one token stream. Ids must be below `vocab`.
    pub fn train(
        tokens: &[u32],
        vocab: usize,
        order: usize,
        smoothing: Smoothing,
    ) -> Result<NgramModel, WorkloadError> {
        if !(1..=MAX_ORDER).contains(&order) {
            return Err(WorkloadError::Config(format!(
                "n-gram order {order} is outside 1..={MAX_ORDER}"
            )));
        }
        if !(1..=MAX_VOCAB).contains(&vocab) {
            return Err(WorkloadError::Config(format!(
                "n-gram vocabulary {vocab} is outside 1..={MAX_VOCAB}"
            )));
        }
        if let Smoothing::KneserNey { discount } = smoothing {
            if !(discount > 0.0 && discount <= 1.0) {
                return Err(WorkloadError::Config(format!(
                    "Kneser-Ney discount {discount} is outside (0, 1]"
                )));
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(WorkloadError::Config(format!(
                "token id {bad} is not below the vocabulary size {vocab}"
            )));
        }

        // Raw counts of every k-gram, k = 1..=order.
        let mut raw: Vec<KeyMap<u32>> = vec![KeyMap::default(); order];
        for i in 0..tokens.len() {
            let mut key = 0u128;
            for k in 1..=order.min(i + 1) {
                key |= u128::from(tokens[i + 1 - k]) << (ID_BITS * (k as u32 - 1));
                *raw[k - 1].entry(key).or_default() += 1;
            }
        }
        // The counts each order is estimated from: raw at the top (and at
        // every order for absolute discounting), else the number of distinct
        // words seen before the k-gram, N1+(. g), from the (k+1)-gram types.
        let mut used: Vec<KeyMap<u32>> = Vec::with_capacity(order);
        for k in 1..=order {
            if k == order || !smoothing.continuation_counts() {
                used.push(std::mem::take(&mut raw[k - 1]));
            } else {
                let mask = (1u128 << (ID_BITS * k as u32)) - 1;
                let mut cont = KeyMap::default();
                for &key in raw[k].keys() {
                    *cont.entry(key & mask).or_default() += 1;
                }
                used.push(cont);
            }
        }

        let mut discounts = Vec::with_capacity(order);
        let mut levels = Vec::with_capacity(order - 1);
        let mut base = vec![1.0 / vocab as f64; vocab];
        for (k, counts) in used.into_iter().enumerate() {
            let mut entries: Vec<(u128, u32)> = counts.into_iter().collect();
            entries.sort_unstable_by_key(|e| e.0);
            let d = match smoothing {
                Smoothing::KneserNey { discount } => [discount; 3],
                Smoothing::ModifiedKneserNey | Smoothing::AbsoluteDiscounting => {
                    let mut n = [0u64; 4];
                    for &(_, c) in &entries {
                        if (1..=4).contains(&c) {
                            n[c as usize - 1] += 1;
                        }
                    }
                    if smoothing == Smoothing::ModifiedKneserNey {
                        modified_kn_discounts(n)
                    } else {
                        // Ney, Essen & Kneser's estimate, clamped as above.
                        // A closed vocabulary can leave no singletons or
                        // doubletons among the unigrams (the Jargon File at
                        // V = 4096 has none), hence the fallback.
                        let [n1, n2] = [n[0] as f64, n[1] as f64];
                        let d = if n1 + n2 > 0.0 {
                            n1 / (n1 + 2.0 * n2)
                        } else {
                            0.5
                        };
                        [d.clamp(0.05, 1.0); 3]
                    }
                }
            };
            discounts.push(d);
            let level = build_level(&entries, d);
            if k == 0 {
                // The unigram level has one context, the empty one.
                if let Some(ctx) = level.contexts.get(&0) {
                    for b in base.iter_mut() {
                        *b *= ctx.backoff;
                    }
                    let r = ctx.start as usize..(ctx.start + ctx.len) as usize;
                    for (&w, &m) in level.words[r.clone()].iter().zip(&level.mass[r]) {
                        base[w as usize] += m;
                    }
                }
            } else {
                levels.push(level);
            }
        }
        Ok(NgramModel {
            order,
            vocab,
            smoothing,
            base,
            levels,
            discounts,
        })
    }

    pub fn order(&self) -> usize {
        self.order
    }

    pub fn smoothing(&self) -> Smoothing {
        self.smoothing
    }

    /// The discounts (D1, D2, D3+) of orders 1..=order.
    pub fn discounts(&self) -> &[[f64; 3]] {
        &self.discounts
    }

    /// Walks from the longest usable context down, returning the observed
    /// contexts with the weight each one's discounted counts carry, and the
    /// weight left for the dense bottom row.
    fn chain(&self, context: &[u32]) -> ([(f64, usize, Context); MAX_ORDER], usize, f64) {
        let empty = Context {
            start: 0,
            len: 0,
            backoff: 1.0,
        };
        let mut hits = [(0.0, 0, empty); MAX_ORDER];
        let mut n_hits = 0;
        let mut weight = 1.0;
        let h = context.len().min(self.order - 1);
        let hist = &context[context.len() - h..];
        for len in (1..=h).rev() {
            let ids = &hist[h - len..];
            assert!(
                ids.iter().all(|&t| (t as usize) < self.vocab),
                "context ids must be below the vocabulary size {}",
                self.vocab
            );
            if let Some(ctx) = self.levels[len - 1].contexts.get(&pack(ids)) {
                hits[n_hits] = (weight, len - 1, *ctx);
                n_hits += 1;
                weight *= ctx.backoff;
            }
        }
        (hits, n_hits, weight)
    }

    /// Writes the next-token distribution after `context` into `row`.
    pub fn dist_into(&self, context: &[u32], row: &mut [f64]) {
        assert_eq!(row.len(), self.vocab);
        let (hits, n_hits, bottom) = self.chain(context);
        for (r, &b) in row.iter_mut().zip(&self.base) {
            *r = bottom * b;
        }
        for &(weight, level, ctx) in &hits[..n_hits] {
            let lv = &self.levels[level];
            let r = ctx.start as usize..(ctx.start + ctx.len) as usize;
            for (&w, &m) in lv.words[r.clone()].iter().zip(&lv.mass[r]) {
                row[w as usize] += weight * m;
            }
        }
    }

    /// One probability, P(token | context), without building the row.
    pub fn prob(&self, context: &[u32], token: u32) -> f64 {
        let (hits, n_hits, bottom) = self.chain(context);
        let mut p = bottom * self.base[token as usize];
        for &(weight, level, ctx) in &hits[..n_hits] {
            let lv = &self.levels[level];
            let r = ctx.start as usize..(ctx.start + ctx.len) as usize;
            if let Ok(i) = lv.words[r.clone()].binary_search(&token) {
                p += weight * lv.mass[r.start + i];
            }
        }
        p
    }

    /// Per-token perplexity of a stream, each token predicted from all the
    /// tokens before it.
    pub fn perplexity(&self, tokens: &[u32]) -> f64 {
        if tokens.is_empty() {
            return f64::NAN;
        }
        let nll: f64 = (0..tokens.len())
            .map(|i| -self.prob(&tokens[..i], tokens[i]).ln())
            .sum();
        (nll / tokens.len() as f64).exp()
    }
}

/// Groups sorted (key, count) entries of one order by context and applies
/// the discounts.
fn build_level(entries: &[(u128, u32)], d: [f64; 3]) -> Level {
    let mut level = Level {
        contexts: KeyMap::with_capacity_and_hasher(entries.len() / 2, Default::default()),
        words: Vec::with_capacity(entries.len()),
        mass: Vec::with_capacity(entries.len()),
    };
    let mut i = 0;
    while i < entries.len() {
        let ctx = entries[i].0 >> ID_BITS;
        let mut j = i;
        while j < entries.len() && entries[j].0 >> ID_BITS == ctx {
            j += 1;
        }
        let group = &entries[i..j];
        let total: f64 = group.iter().map(|e| f64::from(e.1)).sum();
        let mut left = 0.0;
        for &(key, c) in group {
            let di = d[(c as usize).min(3) - 1];
            left += di;
            level.words.push((key & LOW_ID) as u32);
            level.mass.push((f64::from(c) - di) / total);
        }
        level.contexts.insert(
            ctx,
            Context {
                start: i as u32,
                len: (j - i) as u32,
                backoff: left / total,
            },
        );
        i = j;
    }
    level
}

impl LanguageModel for NgramModel {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist> {
        contexts
            .iter()
            .map(|c| {
                let mut row = vec![0.0; self.vocab];
                self.dist_into(c, &mut row);
                row
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The pair

/// How an [`NgramPair`] is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NgramConfig {
    /// Vocabulary size, `<unk>` included (at most; fewer if the training
    /// text has fewer distinct pieces).
    pub vocab_size: usize,
    pub target_order: usize,
    pub target_smoothing: Smoothing,
    pub draft_order: usize,
    pub draft_smoothing: Smoothing,
    /// Document i is held out when i % heldout_every == heldout_every - 1.
    pub heldout_every: usize,
}

impl Default for NgramConfig {
    fn default() -> Self {
        NgramConfig {
            vocab_size: 4096,
            target_order: 4,
            target_smoothing: Smoothing::ModifiedKneserNey,
            draft_order: 2,
            draft_smoothing: Smoothing::AbsoluteDiscounting,
            heldout_every: 10,
        }
    }
}

/// A draft and a target model over one vocabulary, with the held-out text
/// that prompts are drawn from.
#[derive(Debug, Clone)]
pub struct NgramPair {
    pub draft: NgramModel,
    pub target: NgramModel,
    pub tokenizer: WordTokenizer,
    /// Number of training tokens.
    pub train_tokens: usize,
    /// The held-out documents, tokenized and concatenated.
    pub heldout: Vec<u32>,
}

/// Held-out quality of a pair (see [`NgramPair::heldout_report`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldoutReport {
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    /// Fraction of held-out tokens that are `<unk>`.
    pub unk_rate: f64,
    pub draft_perplexity: f64,
    pub target_perplexity: f64,
    /// Mean over held-out contexts of sum_x min(p(x), q(x)), the
    /// probability that standard speculative sampling accepts one draft
    /// token.
    pub acceptance: f64,
    /// Number of contexts the acceptance was averaged over.
    pub acceptance_contexts: usize,
}

impl NgramPair {
    /// Splits `text` into documents, holds one in `heldout_every` out, and
    /// trains the tokenizer and both models on the rest.
    pub fn from_text(text: &str, config: NgramConfig) -> Result<NgramPair, WorkloadError> {
        if config.heldout_every < 2 {
            return Err(WorkloadError::Config(format!(
                "heldout_every {} must be at least 2",
                config.heldout_every
            )));
        }
        if !(2..=MAX_VOCAB).contains(&config.vocab_size) {
            return Err(WorkloadError::Config(format!(
                "vocab_size {} is outside 2..={MAX_VOCAB}",
                config.vocab_size
            )));
        }
        let mut train: Vec<String> = Vec::new();
        let mut held: Vec<String> = Vec::new();
        for (i, doc) in documents(text).into_iter().enumerate() {
            let side = if i % config.heldout_every == config.heldout_every - 1 {
                &mut held
            } else {
                &mut train
            };
            let ps = pieces(doc);
            if ps.is_empty() {
                continue;
            }
            side.extend(ps);
            if side.last().is_some_and(|p| p != PARAGRAPH) {
                side.push(PARAGRAPH.to_string());
            }
        }
        if train.is_empty() || held.is_empty() {
            return Err(WorkloadError::Config(format!(
                "text too short for a split: {} training and {} held-out tokens from {} documents",
                train.len(),
                held.len(),
                documents(text).len()
            )));
        }
        let tokenizer = WordTokenizer::fit(train.iter().map(String::as_str), config.vocab_size);
        let encode = |ps: &[String]| -> Vec<u32> { ps.iter().map(|p| tokenizer.id(p)).collect() };
        let train_ids = encode(&train);
        let heldout = encode(&held);
        let v = tokenizer.vocab_size();
        let target =
            NgramModel::train(&train_ids, v, config.target_order, config.target_smoothing)?;
        let draft = NgramModel::train(&train_ids, v, config.draft_order, config.draft_smoothing)?;
        Ok(NgramPair {
            draft,
            target,
            tokenizer,
            train_tokens: train_ids.len(),
            heldout,
        })
    }

    /// The pair trained on the cached Jargon File (`scripts/fetch-assets.sh
    /// jargon` fetches it).
    pub fn jargon(config: NgramConfig) -> Result<NgramPair, WorkloadError> {
        NgramPair::from_text(&crate::assets::jargon_text()?, config)
    }

    /// `n` prompts of `len` tokens, windows of the held-out text at
    /// positions drawn uniformly with `seed`.
    ///
    /// # Panics
    /// When `len` exceeds the held-out text.
    pub fn prompts(&self, n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
        assert!(
            len <= self.heldout.len(),
            "prompt length {len} exceeds the {} held-out tokens",
            self.heldout.len()
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let start = rng.random_range(0..=self.heldout.len() - len);
                self.heldout[start..start + len].to_vec()
            })
            .collect()
    }

    /// Perplexities over the whole held-out text, and the acceptance
    /// averaged over up to `max_contexts` evenly spaced held-out contexts.
    pub fn heldout_report(&self, max_contexts: usize) -> HeldoutReport {
        let h = &self.heldout;
        let step = h.len().div_ceil(max_contexts.max(1)).max(1);
        let v = self.tokenizer.vocab_size();
        let (mut p, mut q) = (vec![0.0; v], vec![0.0; v]);
        let mut sum = 0.0;
        let mut count = 0;
        for i in (0..h.len()).step_by(step) {
            self.draft.dist_into(&h[..i], &mut p);
            self.target.dist_into(&h[..i], &mut q);
            sum += p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum::<f64>();
            count += 1;
        }
        HeldoutReport {
            train_tokens: self.train_tokens,
            heldout_tokens: h.len(),
            unk_rate: h.iter().filter(|&&t| t == UNK_ID).count() as f64 / h.len() as f64,
            draft_perplexity: self.draft.perplexity(h),
            target_perplexity: self.target.perplexity(h),
            acceptance: sum / count as f64,
            acceptance_contexts: count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made-up English-like text with long-range structure: sentences are
    /// strung from a phrase book whose phrases share words, so the word
    /// after one word is ambiguous but the word after three mostly is not.
    /// A 4-gram model should beat a bigram on it by a wide margin.
    fn generated_text(seed: u64, entries: usize) -> String {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let syllables = ["ka", "lo", "mi", "tu", "re", "san", "vo", "pe", "dri", "ux"];
        let words: Vec<String> = (0..150)
            .map(|_| {
                let n = rng.random_range(1..=3);
                (0..n)
                    .map(|_| syllables[rng.random_range(0..syllables.len())])
                    .collect()
            })
            .collect();
        let phrases: Vec<Vec<&str>> = (0..80)
            .map(|_| {
                let n = rng.random_range(4..=7);
                (0..n)
                    .map(|_| words[rng.random_range(0..40)].as_str())
                    .collect()
            })
            .collect();
        let mut text = String::from("   The Generated File\n\n");
        for _ in 0..entries {
            let head = &words[rng.random_range(0..words.len())];
            text.push_str(&format!("   :{head}: n.\n\n"));
            for _ in 0..rng.random_range(1..=3) {
                let mut line = String::from("  ");
                for _ in 0..rng.random_range(2..=4) {
                    for _ in 0..rng.random_range(1..=3) {
                        for w in &phrases[rng.random_range(0..phrases.len())] {
                            if line.len() > 70 {
                                text.push_str(&line);
                                text.push('\n');
                                line = String::from("  ");
                            }
                            line.push(' ');
                            line.push_str(w);
                        }
                    }
                    line.push('.');
                }
                text.push_str(&line);
                text.push_str("\n\n");
            }
        }
        text
    }

    fn small_pair() -> NgramPair {
        let config = NgramConfig {
            vocab_size: 64,
            ..NgramConfig::default()
        };
        NgramPair::from_text(&generated_text(7, 1500), config).unwrap()
    }

    #[test]
    fn pieces_split_words_digits_marks_and_paragraphs() {
        let got = pieces(
            "Don't PANIC: it\u{2019}s 42!! ‘Hack’\n  wrapped\n\n\n----- New—para  \n   \n x",
        );
        let want = [
            "don't", "panic", ":", "it's", "42", "!!", "‘", "hack", "’", "wrapped", PARAGRAPH,
            "---", "new", "—", "para", PARAGRAPH, "x",
        ];
        assert_eq!(got, want);
        assert!(pieces("\n\n  lead").first().is_some_and(|p| p == "lead"));
    }

    #[test]
    fn vocabulary_ranks_by_count_then_text() {
        let tok = WordTokenizer::fit(["b", "a", "c", "b", "a", "d", "c", "b"], 4);
        // b x3; a, c x2 (tie broken alphabetically); d x1 does not fit.
        assert_eq!(tok.vocab_size(), 4);
        assert_eq!(
            (tok.piece(0), tok.piece(1), tok.piece(2), tok.piece(3)),
            (UNK, "b", "a", "c")
        );
        assert_eq!(tok.id("d"), UNK_ID);
        assert_eq!(tok.encode("B, a d"), [1, UNK_ID, 2, UNK_ID]);
        assert_eq!(tok.decode(&[1, 2]), "b a");
    }

    #[test]
    fn documents_follow_entries_and_cap_other_text() {
        let mut text = String::from("Title\n\n");
        for i in 0..25 {
            text.push_str(&format!("front {i}\n\n"));
        }
        text.push_str("   :foo: n.\n\n   Foo text.\n   more.\n\n   :bar baz:\n\n   Bar.\n\n\n");
        let docs = documents(&text);
        // 26 front paragraphs in runs of 10, then two entries.
        assert_eq!(docs.len(), 5, "{docs:#?}");
        assert!(docs[0].starts_with("Title") && docs[2].starts_with("front 19"));
        assert_eq!(docs[3], "   :foo: n.\n\n   Foo text.\n   more.\n\n");
        assert_eq!(docs[4], "   :bar baz:\n\n   Bar.\n\n\n");
        assert_eq!(docs.concat(), text);
        assert!(!is_entry_heading("   : not an entry"));
        assert!(!is_entry_heading(":"));
        assert!(!is_entry_heading("::"));
        assert!(!is_entry_heading(":é"));
        assert_eq!(documents("\n\n   :a:\n\n   b\n"), ["\n\n   :a:\n\n   b\n"]);
        assert!(is_entry_heading("   :(TM): //"));
    }

    /// Interpolated Kneser-Ney with D = 1/2 on "a b a b a c" (ids 0 1 0 1 0
    /// 2, V = 4 with id 3 never seen), worked by hand:
    ///
    /// Unigram continuation counts N1+(. w): a 1 (after b), b 1, c 1, d 0;
    /// so P1(w) = (1 - 1/2)/3 + (1/2 * 3/3) / 4 = 7/24 for a, b, c and 3/24
    /// for d. Bigram (raw, top order): after a, b x2 and c x1 (c(a) = 3,
    /// backoff 1/2 * 2/3 = 1/3): P(b|a) = 1.5/3 + 1/3 * 7/24 = 43/72,
    /// P(c|a) = 0.5/3 + 7/72 = 19/72, P(a|a) = 7/72, P(d|a) = 3/72. After b,
    /// a x2 (backoff 1/4): P(a|b) = 3/4 + 7/96 = 79/96, P(b|b) = P(c|b) =
    /// 7/96, P(d|b) = 3/96.
    ///
    /// As a trigram: the bigram level uses continuation counts from the
    /// trigram types aba, bab, bac: (b,a) 1, (a,b) 1, (a,c) 1. P2(.|a) =
    /// (7, 19, 19, 3)/48, P2(.|b) = (31, 7, 7, 3)/48. Top: after "a b", a x2
    /// (backoff 1/4): P(.|a b) = (175, 7, 7, 3)/192; after "b a", b and c
    /// once each (backoff 1/2): P(.|b a) = (7, 43, 43, 3)/96. "c a" was not
    /// seen, so P(.|c a) = P2(.|a).
    #[test]
    fn kneser_ney_matches_hand_computed_probabilities() {
        let corpus = [0, 1, 0, 1, 0, 2];
        let kn = Smoothing::KneserNey { discount: 0.5 };
        let close = |got: Dist, want: [f64; 4]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
            }
        };
        let bi = NgramModel::train(&corpus, 4, 2, kn).unwrap();
        close(
            bi.next_dist(&[]),
            [7.0 / 24.0, 7.0 / 24.0, 7.0 / 24.0, 3.0 / 24.0],
        );
        close(
            bi.next_dist(&[0]),
            [7.0 / 72.0, 43.0 / 72.0, 19.0 / 72.0, 3.0 / 72.0],
        );
        close(
            bi.next_dist(&[2, 1]),
            [79.0 / 96.0, 7.0 / 96.0, 7.0 / 96.0, 3.0 / 96.0],
        );
        close(bi.next_dist(&[3]), bi.next_dist(&[]).try_into().unwrap());

        let tri = NgramModel::train(&corpus, 4, 3, kn).unwrap();
        let by = |xs: [f64; 4], d: f64| xs.map(|x| x / d);
        close(tri.next_dist(&[1]), by([31.0, 7.0, 7.0, 3.0], 48.0));
        close(tri.next_dist(&[0, 1]), by([175.0, 7.0, 7.0, 3.0], 192.0));
        close(tri.next_dist(&[3, 1, 0]), by([7.0, 43.0, 43.0, 3.0], 96.0));
        close(tri.next_dist(&[2, 0]), by([7.0, 19.0, 19.0, 3.0], 48.0));
        assert_eq!(tri.prob(&[0, 1], 0), tri.next_dist(&[0, 1])[0]);
    }

    #[test]
    fn modified_discounts_follow_chen_goodman() {
        // Y = 10 / (10 + 2 * 5) = 1/2.
        let [d1, d2, d3] = modified_kn_discounts([10, 5, 3, 2]);
        assert!((d1 - 0.5).abs() < 1e-12);
        assert!((d2 - 1.1).abs() < 1e-12);
        assert!((d3 - 5.0 / 3.0).abs() < 1e-12);
        assert_eq!(modified_kn_discounts([0, 3, 0, 9]), [0.5, 1.0, 1.5]);
        // Degenerate counts stay usable.
        for n in [
            [0, 0, 0, 0],
            [1, 0, 0, 0],
            [5, 3, 0, 0],
            [1, 100, 1, 100],
            [100, 1, 1, 100],
        ] {
            let d = modified_kn_discounts(n);
            assert!(
                d.iter()
                    .zip([1.0, 2.0, 3.0])
                    .all(|(&d, hi)| (0.05..=hi).contains(&d)),
                "{n:?} -> {d:?}"
            );
        }
    }

    #[test]
    fn distributions_are_proper_and_positive() {
        let pair = small_pair();
        let v = pair.tokenizer.vocab_size();
        assert_eq!(v, 64, "the generated text has more distinct pieces");
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut contexts: Vec<Vec<u32>> = (0..300)
            .map(|_| {
                let n = rng.random_range(0..8);
                (0..n).map(|_| rng.random_range(0..v as u32)).collect()
            })
            .collect();
        // Contexts seen in training text are the ones with sparse mass.
        contexts.extend(pair.prompts(300, 6, 3));
        for model in [&pair.draft, &pair.target] {
            let refs: Vec<&[u32]> = contexts.iter().map(Vec::as_slice).collect();
            let rows = model.next_dists(&refs);
            for (c, row) in contexts.iter().zip(&rows) {
                let s: f64 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-9, "sum {s} after {c:?}");
                assert!(row.iter().all(|&p| p > 0.0), "zero entry after {c:?}");
                let w = rng.random_range(0..v as u32);
                let p = model.prob(c, w);
                assert!(
                    (p - row[w as usize]).abs() < 1e-15,
                    "prob {p} vs row {}",
                    row[w as usize]
                );
            }
            assert_eq!(rows[5], model.next_dist(&contexts[5]));
        }
    }

    #[test]
    fn prompts_are_heldout_windows_and_seeded() {
        let pair = small_pair();
        let a = pair.prompts(20, 12, 5);
        assert_eq!(a, pair.prompts(20, 12, 5));
        assert_ne!(a, pair.prompts(20, 12, 6));
        for p in &a {
            assert_eq!(p.len(), 12);
            assert!(pair.heldout.windows(12).any(|w| w == p.as_slice()));
        }
    }

    #[test]
    fn target_beats_draft_on_generated_text() {
        let pair = small_pair();
        let r = pair.heldout_report(2000);
        println!("generated text: {r:?}");
        // Within phrases three words fix the next; one word does not.
        assert!(r.target_perplexity < 0.8 * r.draft_perplexity, "{r:?}");
        assert!(r.acceptance > 0.05 && r.acceptance < 0.95, "{r:?}");
    }

    #[test]
    fn bad_config_is_an_error() {
        let text = generated_text(1, 50);
        let bad = |c: NgramConfig| NgramPair::from_text(&text, c).is_err();
        let d = NgramConfig::default();
        assert!(bad(NgramConfig {
            heldout_every: 1,
            ..d
        }));
        assert!(bad(NgramConfig { vocab_size: 1, ..d }));
        assert!(bad(NgramConfig {
            target_order: 9,
            ..d
        }));
        assert!(bad(NgramConfig {
            draft_order: 0,
            ..d
        }));
        assert!(bad(NgramConfig {
            target_smoothing: Smoothing::KneserNey { discount: 1.5 },
            ..d
        }));
        assert!(NgramPair::from_text("one line", d).is_err());
        assert!(NgramModel::train(&[0, 5], 4, 2, Smoothing::ModifiedKneserNey).is_err());
    }

    /// The real corpus: the measured numbers in the module doc come from
    /// here. Skipped, with a notice, when the asset has not been fetched.
    #[test]
    fn jargon_target_beats_draft_on_heldout() {
        let text = match crate::assets::jargon_text() {
            Ok(t) => t,
            Err(WorkloadError::MissingAsset { path, fix }) => {
                eprintln!("skipped: {path} is missing; {fix}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let t0 = std::time::Instant::now();
        let pair = NgramPair::from_text(&text, NgramConfig::default()).unwrap();
        let build = t0.elapsed();
        let t1 = std::time::Instant::now();
        let r = pair.heldout_report(5000);
        let report = t1.elapsed();
        let t2 = std::time::Instant::now();
        let prompts = pair.prompts(64, 32, 1);
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let rows = pair.target.next_dists(&refs);
        let per_row = t2.elapsed() / rows.len() as u32;
        println!(
            "jargon: {} training / {} held-out tokens, V = {}, <unk> {:.2}% of held-out",
            r.train_tokens,
            r.heldout_tokens,
            pair.tokenizer.vocab_size(),
            100.0 * r.unk_rate
        );
        println!(
            "jargon: held-out perplexity draft ({}-gram {:?}) {:.2}, target ({}-gram {:?}) {:.2}",
            pair.draft.order(),
            pair.draft.smoothing(),
            r.draft_perplexity,
            pair.target.order(),
            pair.target.smoothing(),
            r.target_perplexity
        );
        println!(
            "jargon: mean acceptance sum_x min(p, q) {:.4} over {} held-out contexts",
            r.acceptance, r.acceptance_contexts
        );
        println!(
            "jargon: build {:.3} s, report {:.3} s, target row {:.1} us; discounts draft {:?}, target {:?}",
            build.as_secs_f64(),
            report.as_secs_f64(),
            per_row.as_secs_f64() * 1e6,
            pair.draft.discounts(),
            pair.target.discounts()
        );
        println!(
            "jargon: prompt 0: {}",
            pair.tokenizer.decode(&prompts[0]).replace("\n\n", " <p> ")
        );
        assert!(r.target_perplexity < r.draft_perplexity, "{r:?}");
        assert!(r.acceptance > 0.0 && r.acceptance < 1.0);
        assert!(r.heldout_tokens > 10_000, "{r:?}");
    }
}
