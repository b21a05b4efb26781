//! Generation loops: autoregressive sampling, SpecTr, and standard
//! speculative sampling (SpecTr with `k = 1`).
//!
//! One SpecTr iteration (Sun et al., "SpecTr", arXiv 2310.15141: Fig. 2,
//! "One iteration of SpecTr", with the draft selection step detailed in its
//! Fig. 3, and Algorithm 3 as later papers cite it; section numbers not
//! verified, see the README), from the tokens decoded so far:
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
    /// Contexts scored over all target (draft) calls: a transformer feeds
    /// about one new token per context, so rows per call is the batch a
    /// call costs (the GPU cost model of `bench-suite predict-spectr`).
    pub target_rows: u64,
    pub draft_rows: u64,
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
        g.target_rows += 1;
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
            g.draft_rows += rows as u64;
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
        g.target_rows += rows as u64;
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

#[cfg(test)]
mod tests {
    //! Exactness is tested on the joint law of the first three emitted
    //! tokens (125 cells) against the target's exact joint, at a fixed seed.
    //! With `N` runs, a sampler off by total variation `d` has noncentrality
    //! at least `4 N d^2` (Cauchy-Schwarz over the cells); `N = 300_000`
    //! gives 120 at `d = 1%`, and on 124 degrees of freedom the statistic
    //! then exceeds the `p = 1e-4` threshold (about 183) with probability
    //! about 0.99. A right sampler must give `p > 1e-4`; the wrong one below
    //! must give `p < 1e-12`.

    use super::*;
    use crate::spectr::kseq::{self, Plan};
    use crate::stats::chi_square_gof;
    use baselines::sampling::{speculative_step, SpecStep};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const V: usize = 5;

    /// A model whose next-token law depends on the last token only.
    struct Markov([[f64; V]; V]);

    impl LanguageModel for Markov {
        fn vocab_size(&self) -> usize {
            V
        }
        fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist> {
            contexts
                .iter()
                .map(|c| self.0[*c.last().expect("tests always prompt") as usize].to_vec())
                .collect()
        }
    }

    /// A model whose next-token law ignores the context.
    struct Iid(Vec<f64>);

    impl LanguageModel for Iid {
        fn vocab_size(&self) -> usize {
            self.0.len()
        }
        fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist> {
            contexts.iter().map(|_| self.0.clone()).collect()
        }
    }

    const TARGET: [[f64; V]; V] = [
        [0.40, 0.25, 0.15, 0.12, 0.08],
        [0.10, 0.20, 0.45, 0.15, 0.10],
        [0.30, 0.05, 0.10, 0.25, 0.30],
        [0.22, 0.18, 0.20, 0.20, 0.20],
        [0.06, 0.34, 0.10, 0.40, 0.10],
    ];
    // Rows 0.2 to 0.45 apart from the target's in total variation, so
    // acceptance and rejection both happen often at every position.
    const DRAFT: [[f64; V]; V] = [
        [0.20, 0.45, 0.15, 0.05, 0.15],
        [0.35, 0.20, 0.20, 0.15, 0.10],
        [0.10, 0.20, 0.30, 0.30, 0.10],
        [0.40, 0.10, 0.10, 0.10, 0.30],
        [0.20, 0.20, 0.20, 0.20, 0.20],
    ];
    const PROMPT: [u32; 1] = [0];

    fn no_check() -> impl FnMut() -> Result<(), WorkloadError> {
        || Ok(())
    }

    fn exact_joint() -> Vec<f64> {
        (0..V * V * V)
            .map(|c| {
                let (a, b, d) = (c / (V * V), c / V % V, c % V);
                TARGET[0][a] * TARGET[a][b] * TARGET[b][d]
            })
            .collect()
    }

    fn cell(t: &[u32]) -> usize {
        (t[0] as usize * V + t[1] as usize) * V + t[2] as usize
    }

    /// Joint counts of the first three tokens over `runs` generations.
    fn joint_counts(
        runs: usize,
        seed: u64,
        mut generate: impl FnMut(&mut ChaCha8Rng) -> Generation,
    ) -> Vec<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut counts = vec![0u64; V * V * V];
        for _ in 0..runs {
            counts[cell(&generate(&mut rng).tokens)] += 1;
        }
        counts
    }

    const RUNS: usize = 300_000;

    #[test]
    fn spectr_emits_the_target_joint() {
        let (draft, target) = (Markov(DRAFT), Markov(TARGET));
        let exact = exact_joint();
        for (i, (k, l)) in [1, 2, 4]
            .into_iter()
            .flat_map(|k| [1, 2, 3].map(|l| (k, l)))
            .enumerate()
        {
            let counts = joint_counts(RUNS, 100 + i as u64, |rng| {
                let g = spectr(&draft, &target, &PROMPT, 3, k, l, rng, &mut no_check()).unwrap();
                assert_eq!(g.tokens.len(), 3);
                assert_eq!(g.target_calls, g.blocks);
                assert_eq!(g.draft_calls, g.blocks * l as u64);
                g
            });
            let gof = chi_square_gof(&counts, &exact);
            assert!(gof.p_value > 1e-4, "k {k} L {l}: p = {}", gof.p_value);
        }
    }

    #[test]
    fn rows_count_the_distinct_prefixes_each_call_scores() {
        let target = Markov(TARGET);
        let (k, l) = (4usize, 3usize);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Drafts that always agree: one context per position.
        let same = Iid(vec![0.0, 1.0, 0.0, 0.0, 0.0]);
        let g = spectr(&same, &target, &PROMPT, 40, k, l, &mut rng, &mut no_check()).unwrap();
        assert_eq!(g.draft_rows, g.draft_calls);
        assert_eq!(g.target_rows, g.blocks * (l as u64 + 1));
        // Drafts that disagree: position 0 is shared, later ones hold at
        // most k distinct prefixes, and some block must use more than one.
        let spread = Iid(vec![0.2; V]);
        let g = spectr(
            &spread,
            &target,
            &PROMPT,
            40,
            k,
            l,
            &mut rng,
            &mut no_check(),
        )
        .unwrap();
        let (kk, ll) = (k as u64, l as u64);
        assert!(g.draft_rows <= g.blocks * (1 + (ll - 1) * kk));
        assert!(g.target_rows <= g.blocks * (1 + ll * kk));
        assert!(g.target_rows > g.blocks * (ll + 1), "{g:?}");
        let g = autoregressive(&target, &PROMPT, 7, &mut rng, &mut no_check()).unwrap();
        assert_eq!((g.target_rows, g.draft_rows), (7, 0));
    }

    #[test]
    fn a_selection_that_ignores_rho_is_caught() {
        // K-SEQ with rho forced to 1 for k > 1: each draft is kept with
        // min(1, q/p) and the residual is max(0, q - p), as if k were 1.
        let (draft, target) = (Markov(DRAFT), Markov(TARGET));
        let exact = exact_joint();
        for (i, k) in [2, 4].into_iter().enumerate() {
            let counts = joint_counts(RUNS, 200 + i as u64, |rng| {
                run_blocks(
                    &draft,
                    &target,
                    &PROMPT,
                    3,
                    k,
                    2,
                    rng,
                    &mut no_check(),
                    |p, q, d, rng| Plan::naive(p, q, d.len()).step(p, q, d, rng),
                )
                .unwrap()
            });
            let p = chi_square_gof(&counts, &exact).p_value;
            assert!(p < 1e-12, "k {k}: the naive selection passed with p = {p}");
        }
    }

    #[test]
    fn a_sampler_one_percent_off_is_caught() {
        // SpecTr's output, except that with probability eps the sequence
        // starts from the draft's first-token law instead (later tokens
        // still from the target given the first): the joint is then exactly
        // eps * TV(draft row, target row) = 0.037 * 0.27 = 1.0% off in total
        // variation.
        let (draft, target) = (Markov(DRAFT), Markov(TARGET));
        let eps = 0.037;
        let tv = eps
            * 0.5
            * DRAFT[0]
                .iter()
                .zip(&TARGET[0])
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
        assert!((tv - 0.01).abs() < 1e-4);
        let counts = joint_counts(RUNS, 250, |rng| {
            if rng.random::<f64>() < eps {
                let first = sample_categorical(&DRAFT[0], rng) as u32;
                let mut g = autoregressive(&target, &[first], 2, rng, &mut no_check()).unwrap();
                g.tokens.insert(0, first);
                g
            } else {
                spectr(&draft, &target, &PROMPT, 3, 2, 2, rng, &mut no_check()).unwrap()
            }
        });
        let p = chi_square_gof(&counts, &exact_joint()).p_value;
        assert!(p < 1e-4, "a sampler 1% off passed with p = {p}");
    }

    /// Standard speculative sampling written out with the baseline step,
    /// consuming random numbers in the order `spectr` does: `L` draft draws,
    /// then one uniform per acceptance test, one for a residual, one for the
    /// bonus token.
    fn reference_speculative(n: usize, l: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
        let mut seq = PROMPT.to_vec();
        while seq.len() - PROMPT.len() < n {
            let mut drafts = Vec::new();
            for _ in 0..l {
                let last = *drafts.last().unwrap_or(seq.last().unwrap()) as usize;
                drafts.push(sample_categorical(&DRAFT[last], rng) as u32);
            }
            let mut prev = *seq.last().unwrap() as usize;
            let mut all = true;
            for &x in &drafts {
                match speculative_step(&DRAFT[prev], &TARGET[prev], x as usize, rng) {
                    SpecStep::Accepted(t) => {
                        seq.push(t as u32);
                        prev = t;
                    }
                    SpecStep::Resampled(t) => {
                        seq.push(t as u32);
                        all = false;
                        break;
                    }
                }
            }
            if all {
                seq.push(sample_categorical(&TARGET[prev], rng) as u32);
            }
        }
        seq[PROMPT.len()..PROMPT.len() + n].to_vec()
    }

    #[test]
    fn k_one_is_standard_speculative_sampling() {
        let (draft, target) = (Markov(DRAFT), Markov(TARGET));
        for l in [1, 2, 4] {
            let seed = 300 + l as u64;
            let ours = spectr(
                &draft,
                &target,
                &PROMPT,
                500,
                1,
                l,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut no_check(),
            )
            .unwrap();
            let spec = speculative(
                &draft,
                &target,
                &PROMPT,
                500,
                l,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut no_check(),
            )
            .unwrap();
            assert_eq!(ours, spec);
            let reference = reference_speculative(500, l, &mut ChaCha8Rng::seed_from_u64(seed));
            assert_eq!(ours.tokens, reference, "L {l}");
        }
    }

    const P_IID: [f64; 5] = [0.35, 0.25, 0.20, 0.15, 0.05];
    const Q_IID: [f64; 5] = [0.20, 0.30, 0.10, 0.15, 0.25];

    #[test]
    fn tokens_per_call_match_the_closed_form_for_k_one() {
        // Tokens per block N = min(G, L) + 1 with G geometric: P(N = j + 1) =
        // a^j (1 - a) for j < L and P(N = L + 1) = a^L. Its exact variance
        // gives the standard error of the mean over the blocks run; the test
        // allows 5 of them plus L / blocks for the cut last block.
        let a: f64 = P_IID.iter().zip(&Q_IID).map(|(p, q)| p.min(*q)).sum();
        let (draft, target) = (Iid(P_IID.to_vec()), Iid(Q_IID.to_vec()));
        for l in [1, 2, 4] {
            let law: Vec<f64> = (0..=l)
                .map(|j| {
                    if j < l {
                        a.powi(j as i32) * (1.0 - a)
                    } else {
                        a.powi(l as i32)
                    }
                })
                .collect();
            let mean: f64 = law
                .iter()
                .enumerate()
                .map(|(j, w)| (j + 1) as f64 * w)
                .sum();
            let var: f64 = law
                .iter()
                .enumerate()
                .map(|(j, w)| ((j + 1) as f64 - mean).powi(2) * w)
                .sum();
            assert!((mean - (1.0 - a.powi(l as i32 + 1)) / (1.0 - a)).abs() < 1e-12);
            let g = spectr(
                &draft,
                &target,
                &[],
                100_000,
                1,
                l,
                &mut ChaCha8Rng::seed_from_u64(400 + l as u64),
                &mut no_check(),
            )
            .unwrap();
            let blocks = g.blocks as f64;
            let tol = 5.0 * (var / blocks).sqrt() + l as f64 / blocks;
            let got = g.tokens_per_target_call();
            assert!((got - mean).abs() < tol, "L {l}: {got} vs {mean} +- {tol}");
        }
    }

    #[test]
    fn first_position_acceptance_matches_kseq() {
        let (draft, target) = (Iid(P_IID.to_vec()), Iid(Q_IID.to_vec()));
        for k in [2, 4] {
            let (_, beta) = kseq::solve_rho(&P_IID, &Q_IID, k);
            let want = kseq::acceptance(beta, k);
            let g = spectr(
                &draft,
                &target,
                &[],
                100_000,
                k,
                2,
                &mut ChaCha8Rng::seed_from_u64(500 + k as u64),
                &mut no_check(),
            )
            .unwrap();
            let got = g.accepted_per_position[0] as f64 / g.blocks as f64;
            let se = (want * (1.0 - want) / g.blocks as f64).sqrt();
            assert!((got - want).abs() < 5.0 * se, "k {k}: {got} vs {want}");
        }
    }

    #[test]
    fn the_optimal_coupling_is_exact_and_reaches_its_acceptance() {
        let (p, q) = ([0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]);
        let (draft, target) = (Iid(p.to_vec()), Iid(q.to_vec()));
        let coupling = OptimalCoupling::solve(&p, &q, 2).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(600);
        let mut counts = vec![0u64; 64];
        let (mut accepted, mut blocks) = (0u64, 0u64);
        for _ in 0..100_000 {
            let g = with_coupling(
                &draft,
                &target,
                &[],
                3,
                &coupling,
                &mut rng,
                &mut no_check(),
            )
            .unwrap();
            let t = &g.tokens;
            counts[(t[0] as usize * 4 + t[1] as usize) * 4 + t[2] as usize] += 1;
            accepted += g.accepted_per_position[0];
            blocks += g.blocks;
        }
        let exact: Vec<f64> = (0..64)
            .map(|c| q[c / 16] * q[c / 4 % 4] * q[c % 4])
            .collect();
        let gof = chi_square_gof(&counts, &exact);
        assert!(gof.p_value > 1e-4, "p = {}", gof.p_value);
        let want = coupling.acceptance();
        let got = accepted as f64 / blocks as f64;
        let se = (want * (1.0 - want) / blocks as f64).sqrt();
        assert!((got - want).abs() < 5.0 * se, "{got} vs {want}");
        // A context-dependent pair is refused.
        let err = with_coupling(
            &Markov(DRAFT),
            &Markov(TARGET),
            &PROMPT,
            3,
            &OptimalCoupling::solve(&DRAFT[0], &TARGET[0], 2).unwrap(),
            &mut rng,
            &mut no_check(),
        );
        assert!(matches!(err, Err(WorkloadError::Config(_))), "{err:?}");
    }

    #[test]
    fn check_stops_the_loop_and_bad_shapes_are_refused() {
        let (draft, target) = (Markov(DRAFT), Markov(TARGET));
        let mut rng = ChaCha8Rng::seed_from_u64(700);
        let mut blocks = 0;
        let mut check = || {
            blocks += 1;
            if blocks > 3 {
                Err(WorkloadError::OverBudget {
                    elapsed_s: 2.0,
                    budget_s: 1.0,
                })
            } else {
                Ok(())
            }
        };
        let r = spectr(&draft, &target, &PROMPT, 1000, 2, 2, &mut rng, &mut check);
        assert!(matches!(r, Err(WorkloadError::OverBudget { .. })));
        assert_eq!(blocks, 4);
        for (k, l) in [(0, 2), (2, 0)] {
            let r = spectr(
                &draft,
                &target,
                &PROMPT,
                10,
                k,
                l,
                &mut rng,
                &mut no_check(),
            );
            assert!(matches!(r, Err(WorkloadError::Config(_))));
        }
        let small = Iid(vec![0.5, 0.5]);
        let r = spectr(
            &small,
            &target,
            &PROMPT,
            10,
            2,
            2,
            &mut rng,
            &mut no_check(),
        );
        assert!(matches!(r, Err(WorkloadError::Config(_))));
        let g = autoregressive(&target, &PROMPT, 7, &mut rng, &mut no_check()).unwrap();
        assert_eq!((g.tokens.len(), g.target_calls, g.draft_calls), (7, 7, 0));
    }

    #[test]
    fn autoregressive_emits_the_target_joint() {
        let target = Markov(TARGET);
        let counts = joint_counts(RUNS, 800, |rng| {
            autoregressive(&target, &PROMPT, 3, rng, &mut no_check()).unwrap()
        });
        let gof = chi_square_gof(&counts, &exact_joint());
        assert!(gof.p_value > 1e-4, "p = {}", gof.p_value);
    }
}
