//! The prompts of `long-context`: needle-in-a-haystack retrieval over real
//! text, in the spirit of RULER (Hsieh et al., arXiv 2404.06654, Sec. 3.1
//! "Retrieval" and Sec. 3.2 "Multi-hop tracing"), and perplexity windows of
//! long real text.
//!
//! Haystacks are entries of the Jargon File (public domain), cut at entry
//! boundaries (an entry starts at a `   :term:` line), so no sentence is
//! broken; every prompt draws its own run of consecutive entries from a
//! seeded start. Needles go between entries, at a depth measured in tokens.
//!
//! Four task kinds, cycled over a trial's prompts in grid order and shifted
//! by one each trial, so that over four trials every cell sees every kind:
//! - `passkey`: one needle, "The pass key is N. Remember it. N is the pass
//!   key." (the passkey test of Mohtashami and Jaggi, arXiv 2305.16300).
//! - `multikey`: four "special magic number for <word>" needles with
//!   different keys; the question names the one at the cell's depth
//!   (RULER's NIAH multi-key).
//! - `multivalue`: two needles with the same key and different numbers;
//!   the answer is both, in order (RULER's NIAH multi-value uses four; two
//!   keep the answer inside the 16 generated tokens the scoring reads).
//! - `vartrack`: a chain "VAR A = N", "VAR B = VAR A", "VAR C = VAR B" in
//!   text order, the first link at the cell's depth; the question asks for
//!   the number C holds. RULER's variable tracking asks instead for every
//!   name bound to N; asking for the number keeps one scoring rule (the
//!   first number of the answer) for all tasks. This is a departure.
//!
//! Every answer is numeric, so scoring is uniform: an answer is correct when
//! the numbers in the generated text start with the expected ones (the
//! first number for single answers; the first two for `multivalue`), which
//! lets a model answer in a sentence.

use rand::seq::IndexedRandom;
use rand::Rng;

use crate::decoder::{DecoderError, Model};

/// A Jargon File entry and its length in tokens (counted alone).
#[derive(Debug, Clone)]
struct Entry {
    text: String,
    tokens: usize,
}

/// The haystack text, tokenized once per model.
#[derive(Debug, Clone)]
pub struct Corpus {
    entries: Vec<Entry>,
}

/// An entry as running text: the indentation dropped, wrapped lines joined,
/// paragraphs kept apart by one blank line.
fn clean(entry: &str) -> String {
    let mut out = String::new();
    let mut blank = 0;
    for line in entry.lines() {
        let l = line.trim();
        if l.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { " " });
        }
        blank = 0;
        out.push_str(l);
    }
    out
}

impl Corpus {
    /// The glossary entries of the Jargon File, each tokenized with `model`'s
    /// tokenizer (untimed; about a second for the whole file).
    pub fn jargon(text: &str, model: &Model) -> Result<Corpus, DecoderError> {
        let mut entries = Vec::new();
        let mut cur: Option<String> = None;
        for line in text.lines() {
            let is_head = line.starts_with("   :")
                && line[4..].find(':').is_some_and(|i| i > 0)
                && !line.starts_with("    ");
            if is_head {
                if let Some(e) = cur.take() {
                    entries.push(e);
                }
                cur = Some(String::new());
            }
            if let Some(e) = cur.as_mut() {
                e.push_str(line);
                e.push('\n');
            }
        }
        entries.extend(cur);
        let tok = model.tokenizer();
        let entries = entries
            .iter()
            .map(|e| clean(e))
            .filter(|e| !e.is_empty())
            .map(|text| {
                let tokens = tok.encode(&text)?.len() + 1;
                Ok(Entry { text, tokens })
            })
            .collect::<Result<Vec<_>, DecoderError>>()?;
        if entries.len() < 100 {
            return Err(DecoderError::Input(format!(
                "the Jargon File text has {} glossary entries; expected over 2,000 \
                 (re-fetch it: scripts/fetch-assets.sh jargon)",
                entries.len()
            )));
        }
        Ok(Corpus { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Consecutive entries from a random start (wrapping around) whose
    /// counted tokens sum to at most `tokens`: their texts and counts.
    fn run(&self, tokens: usize, rng: &mut impl Rng) -> (Vec<&str>, Vec<usize>) {
        let start = rng.random_range(0..self.entries.len());
        let (mut texts, mut counts) = (Vec::new(), Vec::new());
        let mut used = 0;
        for i in 0..self.entries.len() {
            let e = &self.entries[(start + i) % self.entries.len()];
            if used + e.tokens > tokens {
                if texts.is_empty() {
                    continue;
                }
                break;
            }
            used += e.tokens;
            texts.push(e.text.as_str());
            counts.push(e.tokens);
        }
        (texts, counts)
    }
}

impl Corpus {
    /// Consecutive entries from a random start (wrapping around) until
    /// their counted tokens reach `tokens`: text to cut a window from.
    fn run_at_least(&self, tokens: usize, rng: &mut impl Rng) -> Vec<&str> {
        let start = rng.random_range(0..self.entries.len());
        let mut out = Vec::new();
        let mut used = 0;
        for i in 0..self.entries.len() {
            let e = &self.entries[(start + i) % self.entries.len()];
            out.push(e.text.as_str());
            used += e.tokens;
            if used >= tokens {
                break;
            }
        }
        out
    }
}

/// The four task kinds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Passkey,
    MultiKey,
    MultiValue,
    VarTrack,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::Passkey,
        Task::MultiKey,
        Task::MultiValue,
        Task::VarTrack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Passkey => "passkey",
            Task::MultiKey => "multikey",
            Task::MultiValue => "multivalue",
            Task::VarTrack => "vartrack",
        }
    }
}

/// Keys of the multi-key and multi-value needles, and variable names.
const WORDS: &[&str] = &[
    "harbor", "lantern", "meadow", "granite", "violet", "compass", "thunder", "orchard", "saffron",
    "glacier", "falcon", "marble", "cinder", "willow", "quartz", "ember", "juniper", "canyon",
    "pepper", "beacon", "hollow", "tundra", "walnut", "ripple",
];
const VARS: &[&str] = &[
    "QKX", "RTV", "ZMB", "PLW", "HJD", "WCF", "NYS", "GTR", "BVK", "XUE", "MDA", "KFO",
];

/// One retrieval prompt.
#[derive(Debug, Clone)]
pub struct NeedlePrompt {
    /// Requested context length (the cell's row).
    pub context: usize,
    /// Requested depth of the needle, 0 (start) to 1 (end).
    pub depth: f64,
    pub task: Task,
    /// The prompt, tokenized (chat template included); at most `context`
    /// tokens.
    pub tokens: Vec<u32>,
    /// The expected answer as text, and tokenized (for teacher forcing).
    pub answer: String,
    pub answer_tokens: Vec<u32>,
    /// The numbers a correct answer starts with.
    pub values: Vec<u64>,
}

fn number(rng: &mut impl Rng, used: &mut Vec<u64>) -> u64 {
    loop {
        let v = rng.random_range(10_000..100_000u64);
        if !used.contains(&v) {
            used.push(v);
            return v;
        }
    }
}

/// A depth in `[lo, hi]` for a distractor or a later link.
fn depth_in(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi <= lo {
        lo
    } else {
        rng.random_range(lo..hi)
    }
}

/// The needles of one prompt, each with its depth, the question and the
/// answer.
fn needles(task: Task, depth: f64, rng: &mut impl Rng) -> (Vec<(f64, String)>, String, Vec<u64>) {
    let mut used = Vec::new();
    match task {
        Task::Passkey => {
            let v = number(rng, &mut used);
            (
                vec![(
                    depth,
                    format!("The pass key is {v}. Remember it. {v} is the pass key."),
                )],
                "What is the pass key?".into(),
                vec![v],
            )
        }
        Task::MultiKey => {
            let keys: Vec<&str> = WORDS.choose_multiple(rng, 4).copied().collect();
            let mut out = Vec::new();
            let mut want = 0;
            for (i, k) in keys.iter().enumerate() {
                let v = number(rng, &mut used);
                let d = if i == 0 {
                    want = v;
                    depth
                } else {
                    depth_in(rng, 0.0, 1.0)
                };
                out.push((
                    d,
                    format!("One of the special magic numbers for {k} is: {v}."),
                ));
            }
            (
                out,
                format!("What is the special magic number for {}?", keys[0]),
                vec![want],
            )
        }
        Task::MultiValue => {
            let key = WORDS.choose(rng).copied().unwrap_or("harbor");
            let (a, b) = (number(rng, &mut used), number(rng, &mut used));
            let later = depth_in(rng, depth, 1.0);
            (
                vec![
                    (
                        depth,
                        format!("One of the special magic numbers for {key} is: {a}."),
                    ),
                    (
                        later,
                        format!("One of the special magic numbers for {key} is: {b}."),
                    ),
                ],
                format!(
                    "What are the two special magic numbers for {key}? Give them in the order \
                     they appear."
                ),
                vec![a, b],
            )
        }
        Task::VarTrack => {
            let names: Vec<&str> = VARS.choose_multiple(rng, 3).copied().collect();
            let v = number(rng, &mut used);
            let d1 = depth_in(rng, depth, 1.0);
            let d2 = depth_in(rng, d1, 1.0);
            (
                vec![
                    (depth, format!("VAR {} = {v}.", names[0])),
                    (d1, format!("VAR {} = VAR {}.", names[1], names[0])),
                    (d2, format!("VAR {} = VAR {}.", names[2], names[1])),
                ],
                format!("Which number does VAR {} hold?", names[2]),
                vec![v],
            )
        }
    }
}

const PREAMBLE: &str = "Below is a long document. Somewhere in it are facts you will be asked \
                        about; find them and answer the question at the end.";

/// The user turn: preamble, haystack with the needles between entries, the
/// question.
fn user_text(
    entries: &[&str],
    needles: &[(f64, String)],
    question: &str,
    counts: &[usize],
) -> String {
    let total: usize = counts.iter().sum();
    // The entry boundary before which each needle goes: the first boundary
    // at or past its depth in tokens.
    let mut at: Vec<(usize, &str)> = needles
        .iter()
        .map(|(d, text)| {
            let goal = (d * total as f64).round() as usize;
            let mut acc = 0;
            let mut b = entries.len();
            for (i, &c) in counts.iter().enumerate() {
                if acc >= goal {
                    b = i;
                    break;
                }
                acc += c;
            }
            (b, text.as_str())
        })
        .collect();
    // Stable: needles at the same boundary keep their declared order, which
    // is the text order the task needs.
    at.sort_by_key(|&(b, _)| b);
    let mut s = String::from(PREAMBLE);
    s.push_str("\n\n");
    let mut next = 0;
    for (i, e) in entries.iter().enumerate() {
        while next < at.len() && at[next].0 == i {
            s.push_str(at[next].1);
            s.push_str("\n\n");
            next += 1;
        }
        s.push_str(e);
        s.push_str("\n\n");
    }
    for (_, n) in &at[next..] {
        s.push_str(n);
        s.push_str("\n\n");
    }
    s.push_str(question);
    s.push_str(" Answer with the number only.");
    s
}

fn render(model: &Model, user: &str) -> String {
    match model.tokenizer().chat_template() {
        Some(t) => t.format(None, user),
        None => format!("{user}\n\nAnswer:"),
    }
}

/// One retrieval prompt of `context` tokens at most, its first needle at
/// `depth` (untimed; a few tokenizer calls).
pub fn needle_prompt(
    corpus: &Corpus,
    model: &Model,
    context: usize,
    depth: f64,
    task: Task,
    rng: &mut impl Rng,
) -> Result<NeedlePrompt, DecoderError> {
    let tok = model.tokenizer();
    let (needles, question, values) = needles(task, depth, rng);
    let overhead = tok
        .encode(&render(model, &user_text(&[], &needles, &question, &[])))?
        .len();
    if overhead + 16 > context {
        return Err(DecoderError::Input(format!(
            "a context of {context} tokens cannot hold a {} prompt ({overhead} tokens without \
             haystack)",
            task.as_str()
        )));
    }
    let mut room = context - overhead;
    loop {
        let (entries, counts) = corpus.run(room, rng);
        let text = render(model, &user_text(&entries, &needles, &question, &counts));
        let tokens = tok.encode(&text)?;
        if tokens.len() <= context {
            let answer = values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let answer_tokens = tok.encode(&answer)?;
            return Ok(NeedlePrompt {
                context,
                depth,
                task,
                tokens,
                answer,
                answer_tokens,
                values,
            });
        }
        // Entries tokenized alone undercount a little at the joins: shrink
        // the room by the overshoot and draw again.
        room = room.saturating_sub(tokens.len() - context + 8);
    }
}

/// The numbers in `text`, in order.
pub fn numbers(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur: Option<u64> = None;
    for c in text.chars() {
        match c.to_digit(10) {
            Some(d) => cur = Some(cur.unwrap_or(0).saturating_mul(10).saturating_add(d as u64)),
            None => {
                out.extend(cur.take());
            }
        }
    }
    out.extend(cur);
    out
}

/// Whether a generated answer is right: its numbers start with `values`.
pub fn correct(generated: &str, values: &[u64]) -> bool {
    numbers(generated).starts_with(values)
}

/// A perplexity window: `context` tokens of real text and the
/// `continuation` tokens that follow them.
#[derive(Debug, Clone)]
pub struct Window {
    pub context: usize,
    pub tokens: Vec<u32>,
}

/// A window of `context + continuation` tokens of consecutive entries,
/// from a random start (untimed).
pub fn window(
    corpus: &Corpus,
    model: &Model,
    context: usize,
    continuation: usize,
    rng: &mut impl Rng,
) -> Result<Window, DecoderError> {
    let want = context + continuation;
    // Ask for a margin over the counted tokens: the joins merge a few.
    let entries = corpus.run_at_least(want + want / 8 + 64, rng);
    let mut tokens = model.tokenizer().encode(&entries.join("\n\n"))?;
    if tokens.len() < want {
        return Err(DecoderError::Input(format!(
            "a perplexity window of {want} tokens needs more text than the whole corpus \
             gives ({} tokens)",
            tokens.len()
        )));
    }
    tokens.truncate(want);
    Ok(Window { context, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn numbers_and_scoring_read_sentences() {
        assert_eq!(numbers("The pass key is 48213."), vec![48213]);
        assert_eq!(numbers("12, 345 and 6"), vec![12, 345, 6]);
        assert!(correct("It is 48213, I think", &[48213]));
        assert!(!correct("48214", &[48213]));
        assert!(!correct("Key 1: 48213", &[48213]));
        assert!(correct("71234, 55555", &[71234, 55555]));
        assert!(!correct("55555, 71234", &[71234, 55555]));
        assert!(!correct("", &[1]));
    }

    #[test]
    fn needles_go_in_text_order_at_their_depths() {
        let entries = ["a a", "b b", "c c", "d d"];
        let counts = [10, 10, 10, 10];
        let n = vec![
            (0.5, "N1".to_string()),
            (0.0, "N0".into()),
            (1.0, "N2".into()),
        ];
        let s = user_text(&entries, &n, "Q?", &counts);
        let pos = |x: &str| s.find(x).unwrap();
        assert!(pos("N0") < pos("a a"));
        assert!(pos("b b") < pos("N1") && pos("N1") < pos("c c"));
        assert!(pos("d d") < pos("N2") && pos("N2") < pos("Q?"));
        // A chain keeps its declared order even at one boundary.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            let (n, q, v) = needles(Task::VarTrack, 0.9, &mut rng);
            let s = user_text(&entries, &n, &q, &counts);
            let p: Vec<usize> = n.iter().map(|(_, t)| s.find(t.as_str()).unwrap()).collect();
            assert!(p[0] < p[1] && p[1] < p[2], "{s}");
            assert_eq!(v.len(), 1);
            assert!(s.contains(&format!("= {}.", v[0])));
        }
        for t in Task::ALL {
            let (n, _, v) = needles(t, 0.3, &mut rng);
            assert!(v.iter().all(|x| (10_000..100_000).contains(x)));
            assert_eq!(
                n[0].0, 0.3,
                "{t:?}: the first needle sits at the cell's depth"
            );
        }
    }

    /// Every context the perplexity grids use gets a full window, from
    /// any start (on SmolLM2's tokenizer; skipped when it is not fetched).
    #[test]
    fn perplexity_windows_are_full_at_every_grid_context() {
        let Ok(path) = crate::assets::path(&crate::assets::SMOLLM2_135M) else {
            eprintln!("skipped: SmolLM2 not fetched");
            return;
        };
        let model = Model::load(path).unwrap();
        let text = crate::assets::jargon_text().unwrap();
        let corpus = Corpus::jargon(&text, &model).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for _ in 0..10 {
            for context in [256, 1024, 2048, 4096] {
                let w = window(&corpus, &model, context, 64, &mut rng).unwrap();
                assert_eq!(w.tokens.len(), context + 64);
            }
        }
    }

    #[test]
    fn cleaning_joins_lines_and_keeps_paragraphs() {
        assert_eq!(
            clean("   :foo: n.\n\n   one\n   two\n\n\n   three\n"),
            ":foo: n.\n\none two\n\nthree"
        );
    }
}
