//! Generation loops: autoregressive sampling, SpecTr, and standard
//! speculative sampling (SpecTr with `k = 1`).
//!
//! One SpecTr iteration (Sun et al., "SpecTr", arXiv 2310.15141, Sec. 5,
//! Algorithm 3 and Fig. 3), from the tokens decoded so far:
//!
//! 1. **Draft.** `k` independent draft sequences of length `L`, each
//!    sampled autoregressively from the draft model. Position by position,
//!    one draft call scores the distinct prefixes among the `k` drafts
//!    (`L` draft calls per block).
//! 2. **Score.** One target call returns the target's next-token law after
//!    every distinct prefix of every draft, positions `0..=L` (a transformer
//!    scores those `k x (L + 1)` tokens in one batched pass); this call is
//!    what block efficiency (tokens per target call) counts.
//! 3. **Select.** At position `j = 0..L`, the drafts whose first `j` tokens
//!    equal the tokens accepted so far survive; their `k'` tokens at `j` are
//!    i.i.d. from the draft law after that prefix (the selection so far
//!    looked only at earlier positions), so one K-SEQ step
//!    ([`super::kseq`]) with `k'` drafts emits a token with the target's
//!    law. A kept draft token extends the prefix and the drafts that carry
//!    it survive; a residual token ends the block. If all `L` positions are
//!    kept, one more token is drawn from the target after the full prefix.
//!
//! With `k = 1` this is standard speculative sampling (Leviathan et al.,
//! arXiv 2211.17192, Alg. 1; Chen et al., arXiv 2302.01318, Alg. 2), and its
//! expected tokens per block is `(1 - a^(L+1)) / (1 - a)` with
//! `a = sum min(p, q)` when every step has the same `p` and `q`.
//!
//! Every loop returns exactly `n` tokens (the last block is cut short) and
//! calls `check` once per block, so a job over its time budget stops itself.

use rand::Rng;

use baselines::sampling::sample_categorical;

use super::kseq::{KSeq, StepResult};
use super::lm::{Dist, LanguageModel};
use super::optimal::OptimalCoupling;
use crate::WorkloadError;

/// What a generation loop produced and what it cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generation {
    /// The `n` new tokens (prompt excluded).
    pub tokens: Vec<u32>,
    pub target_calls: u64,
    pub draft_calls: u64,
    /// Entry `j`: how many blocks kept a draft token at draft position `j`
    /// (`j < L`); empty for autoregressive sampling.
    pub accepted_per_position: Vec<u64>,
    /// Iterations of the loop (one target call each).
    pub blocks: u64,
}

impl Generation {
    /// Tokens per target call. Slightly below the block efficiency for
    /// short generations, whose last block is cut to `n` tokens.
    pub fn tokens_per_target_call(&self) -> f64 {
        self.tokens.len() as f64 / self.target_calls as f64
    }
}

/// The cooperative budget check, called once per block.
pub type Check<'a> = dyn FnMut() -> Result<(), WorkloadError> + 'a;

/// `n` tokens, one target call each.
pub fn autoregressive<R: Rng + ?Sized>(
    target: &dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    rng: &mut R,
    check: &mut Check<'_>,
) -> Result<Generation, WorkloadError> {
    let mut context = prompt.to_vec();
    context.reserve(n);
    let mut g = Generation::default();
    while g.tokens.len() < n {
        check()?;
        let dist = target.next_dist(&context);
        g.target_calls += 1;
        g.blocks += 1;
        expect_vocab("target", &dist, target.vocab_size())?;
        let t = sample_categorical(&dist, rng) as u32;
        context.push(t);
        g.tokens.push(t);
    }
    Ok(g)
}

/// SpecTr with `k` drafts of length `l` per block, K-SEQ at every position.
///
/// Errors on `k == 0`, `l == 0`, models of different vocabulary sizes, a
/// model returning a distribution of the wrong length, or a failed `check`.
#[allow(clippy::too_many_arguments)] // (k, L) are the paper's two knobs; a struct would only rename them
pub fn spectr<R: Rng + ?Sized>(
    draft: &dyn LanguageModel,
    target: &dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    k: usize,
    l: usize,
    rng: &mut R,
    check: &mut Check<'_>,
) -> Result<Generation, WorkloadError> {
    let mut kseq = KSeq::default();
    run_blocks(
        draft,
        target,
        prompt,
        n,
        k,
        l,
        rng,
        check,
        |p, q, draws, rng| kseq.plan(p, q, draws.len()).step(p, q, draws, rng),
    )
}

/// Standard speculative sampling: [`spectr`] with one draft.
pub fn speculative<R: Rng + ?Sized>(
    draft: &dyn LanguageModel,
    target: &dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    l: usize,
    rng: &mut R,
    check: &mut Check<'_>,
) -> Result<Generation, WorkloadError> {
    spectr(draft, target, prompt, n, 1, l, rng, check)
}

/// Blocks of `L = 1` where the target token is drawn from an optimal
/// coupling of `k` drafts (the LP of [`super::optimal`]) instead of K-SEQ.
///
/// The coupling is solved for one pair of distributions, so this is exact
/// only for pairs whose next-token laws do not depend on the context (the
/// synthetic i.i.d. pairs); every block checks that the models still give
/// the coupling's marginals and errors otherwise.
pub fn with_coupling<R: Rng + ?Sized>(
    draft: &dyn LanguageModel,
    target: &dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    coupling: &OptimalCoupling,
    rng: &mut R,
    check: &mut Check<'_>,
) -> Result<Generation, WorkloadError> {
    let (cp, cq) = coupling.marginals();
    let same = |d: &[f64], c: &[f64]| {
        d.len() == c.len() && d.iter().zip(c).all(|(a, b)| (a - b).abs() <= 1e-12)
    };
    run_blocks(
        draft,
        target,
        prompt,
        n,
        coupling.k(),
        1,
        rng,
        check,
        |p, q, draws, rng| {
            if !same(p, cp) || !same(q, cq) {
                return Err(WorkloadError::Config(
                "with_coupling: the models' next-token laws differ from the ones the coupling was \
                 solved for; an optimal coupling needs a context-independent pair"
                    .into(),
            ));
            }
            let y = coupling.sample(draws, rng);
            Ok(match draws.iter().position(|&d| d == y) {
                Some(draft_index) => StepResult::Accepted {
                    draft_index,
                    token: y,
                },
                None => StepResult::Residual { token: y },
            })
        },
    )
}

/// Turns an infallible selector's result into the shape `run_blocks` wants.
trait SelectOutput {
    fn into_step(self) -> Result<StepResult, WorkloadError>;
}

impl SelectOutput for StepResult {
    fn into_step(self) -> Result<StepResult, WorkloadError> {
        Ok(self)
    }
}

impl SelectOutput for Result<StepResult, WorkloadError> {
    fn into_step(self) -> Result<StepResult, WorkloadError> {
        self
    }
}

fn expect_vocab(who: &str, dist: &Dist, vocab: usize) -> Result<(), WorkloadError> {
    if dist.len() == vocab {
        Ok(())
    } else {
        Err(WorkloadError::Other(format!(
            "{who} model returned a distribution over {} tokens for a vocabulary of {vocab}",
            dist.len()
        )))
    }
}

/// The block loop shared by every speculative method; `select` is the
/// token-level draft selection (K-SEQ, a coupling, or in tests a wrong one).
#[allow(clippy::too_many_arguments)]
fn run_blocks<R, S, O>(
    draft: &dyn LanguageModel,
    target: &dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    k: usize,
    l: usize,
    rng: &mut R,
    check: &mut Check<'_>,
    mut select: S,
) -> Result<Generation, WorkloadError>
where
    R: Rng + ?Sized,
    S: FnMut(&[f64], &[f64], &[u32], &mut R) -> O,
    O: SelectOutput,
{
    if k == 0 || l == 0 {
        return Err(WorkloadError::Config(format!(
            "speculative decoding needs k >= 1 drafts of length L >= 1, got k = {k}, L = {l}"
        )));
    }
    let vocab = target.vocab_size();
    if draft.vocab_size() != vocab {
        return Err(WorkloadError::Config(format!(
            "draft vocabulary ({}) differs from the target's ({vocab})",
            draft.vocab_size()
        )));
    }
    let mut g = Generation {
        accepted_per_position: vec![0; l],
        ..Generation::default()
    };
    g.tokens.reserve(n + l + 1);
    // Per draft: prompt, tokens so far, then this block's draft tokens.
    let mut seqs: Vec<Vec<u32>> = (0..k)
        .map(|_| {
            let mut s = Vec::with_capacity(prompt.len() + n + l + 1);
            s.extend_from_slice(prompt);
            s
        })
        .collect();
    // rep[j * k + i]: the first draft whose length-j prefix equals draft i's;
    // slot[j * k + i]: row of that prefix in the position-j distributions.
    let mut rep = vec![0usize; (l + 1) * k];
    let mut draft_slot = vec![0usize; l * k];
    let mut target_slot = vec![0usize; (l + 1) * k];
    let mut draft_dists: Vec<Vec<Dist>> = Vec::with_capacity(l);
    let mut survivors: Vec<usize> = Vec::with_capacity(k);
    let mut draws: Vec<u32> = Vec::with_capacity(k);
    let mut new_tokens: Vec<u32> = Vec::with_capacity(l + 1);

    while g.tokens.len() < n {
        check()?;
        g.blocks += 1;
        let base = prompt.len() + g.tokens.len();
        rep[..k].fill(0);

        // 1. Draft, one call per position over the distinct prefixes.
        draft_dists.clear();
        for j in 0..l {
            let (rows, contexts) = distinct_prefixes(
                &seqs,
                &rep[j * k..(j + 1) * k],
                base + j,
                &mut draft_slot[j * k..(j + 1) * k],
            );
            let dists = draft.next_dists(&contexts);
            g.draft_calls += 1;
            drop(contexts);
            if dists.len() != rows {
                return Err(WorkloadError::Other(format!(
                    "draft model returned {} distributions for {rows} contexts",
                    dists.len()
                )));
            }
            for d in &dists {
                expect_vocab("draft", d, vocab)?;
            }
            for (i, seq) in seqs.iter_mut().enumerate() {
                let row = draft_slot[j * k + i];
                seq.push(sample_categorical(&dists[row], rng) as u32);
            }
            draft_dists.push(dists);
            next_reps(&seqs, &mut rep, j, k, base);
        }

        // 2. Score every distinct prefix, positions 0..=L, in one call.
        let mut contexts: Vec<&[u32]> = Vec::with_capacity((l + 1) * k);
        for j in 0..=l {
            for i in 0..k {
                if rep[j * k + i] == i {
                    target_slot[j * k + i] = contexts.len();
                    contexts.push(&seqs[i][..base + j]);
                }
            }
            for i in 0..k {
                target_slot[j * k + i] = target_slot[j * k + rep[j * k + i]];
            }
        }
        let rows = contexts.len();
        let target_dists = target.next_dists(&contexts);
        drop(contexts);
        g.target_calls += 1;
        if target_dists.len() != rows {
            return Err(WorkloadError::Other(format!(
                "target model returned {} distributions for {rows} contexts",
                target_dists.len()
            )));
        }
        for d in &target_dists {
            expect_vocab("target", d, vocab)?;
        }

        // 3. Select position by position among the surviving drafts.
        survivors.clear();
        survivors.extend(0..k);
        new_tokens.clear();
        let mut kept_all = true;
        for j in 0..l {
            let lead = survivors[0];
            let p = &draft_dists[j][draft_slot[j * k + lead]];
            let q = &target_dists[target_slot[j * k + lead]];
            draws.clear();
            draws.extend(survivors.iter().map(|&i| seqs[i][base + j]));
            match select(p, q, &draws, rng).into_step()? {
                StepResult::Accepted { token, .. } => {
                    new_tokens.push(token);
                    g.accepted_per_position[j] += 1;
                    survivors.retain(|&i| seqs[i][base + j] == token);
                }
                StepResult::Residual { token } => {
                    new_tokens.push(token);
                    kept_all = false;
                    break;
                }
            }
        }
        if kept_all {
            let q = &target_dists[target_slot[l * k + survivors[0]]];
            new_tokens.push(sample_categorical(q, rng) as u32);
        }

        g.tokens.extend_from_slice(&new_tokens);
        for seq in &mut seqs {
            seq.truncate(base);
            seq.extend_from_slice(&new_tokens);
        }
    }
    g.tokens.truncate(n);
    Ok(g)
}

/// The contexts (length `len`) of the drafts that represent their prefix
/// class, and each draft's row among them.
fn distinct_prefixes<'s>(
    seqs: &'s [Vec<u32>],
    rep: &[usize],
    len: usize,
    slot: &mut [usize],
) -> (usize, Vec<&'s [u32]>) {
    let mut contexts = Vec::with_capacity(seqs.len());
    for (i, seq) in seqs.iter().enumerate() {
        if rep[i] == i {
            slot[i] = contexts.len();
            contexts.push(&seq[..len]);
        }
    }
    for i in 0..seqs.len() {
        slot[i] = slot[rep[i]];
    }
    (contexts.len(), contexts)
}

/// Prefix classes at length `j + 1` from those at `j` and the tokens at `j`.
fn next_reps(seqs: &[Vec<u32>], rep: &mut [usize], j: usize, k: usize, base: usize) {
    for i in 0..k {
        let r = rep[j * k + i];
        let t = seqs[i][base + j];
        rep[(j + 1) * k + i] = (0..=i)
            .find(|&m| rep[j * k + m] == r && seqs[m][base + j] == t)
            .expect("i itself qualifies");
    }
}
