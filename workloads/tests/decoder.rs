//! The shared decoder against candle-transformers on the same weights, and
//! its batch-invariance promise on the real models.
//!
//! Tests on the real GGUF files skip (with a notice) when the asset is not
//! fetched (`scripts/fetch-assets.sh smollm2` / `qwen-0.5b`).

use std::io::Cursor;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use workloads::assets;
use workloads::decoder::{Decoder, Model};

// ---------------------------------------------------------------------------
// A small random model, written as GGUF in memory.

struct Tiny {
    arch: &'static str,
    d: usize,
    ff: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    vocab: usize,
    tied: bool,
}

fn tiny_gguf(t: &Tiny, dtype: GgmlDType, seed: u64) -> Vec<u8> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let dev = Device::Cpu;
    let rng = std::cell::RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let randn = |n: usize, mean: f32, std: f32| -> Vec<f32> {
        let d = rand_distr::Normal::new(mean, std).unwrap();
        let mut r = rng.borrow_mut();
        (0..n).map(|_| d.sample(&mut *r)).collect()
    };
    let hd = t.d / t.heads;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut mat = |name: String, n: usize, k: usize, std: f64| {
        let w = Tensor::from_vec(randn(n * k, 0.0, std as f32), (n, k), &dev).unwrap();
        tensors.push((name, QTensor::quantize(&w, dtype).unwrap()));
    };
    mat("token_embd.weight".into(), t.vocab, t.d, 1.0);
    if !t.tied {
        mat("output.weight".into(), t.vocab, t.d, 0.1);
    }
    let s = 1.0 / (t.d as f64).sqrt();
    for l in 0..t.layers {
        let p = format!("blk.{l}");
        mat(format!("{p}.attn_q.weight"), t.heads * hd, t.d, 2.0 * s);
        mat(format!("{p}.attn_k.weight"), t.kv_heads * hd, t.d, 2.0 * s);
        mat(format!("{p}.attn_v.weight"), t.kv_heads * hd, t.d, s);
        mat(format!("{p}.attn_output.weight"), t.d, t.heads * hd, s);
        mat(format!("{p}.ffn_gate.weight"), t.ff, t.d, s);
        mat(format!("{p}.ffn_up.weight"), t.ff, t.d, s);
        mat(
            format!("{p}.ffn_down.weight"),
            t.d,
            t.ff,
            1.0 / (t.ff as f64).sqrt(),
        );
    }
    let mut vecs: Vec<(String, QTensor)> = Vec::new();
    let mut vec = |name: String, n: usize, mean: f32, std: f32| {
        let v = Tensor::from_vec(randn(n, mean, std), n, &dev).unwrap();
        vecs.push((name, QTensor::quantize(&v, GgmlDType::F32).unwrap()));
    };
    vec("output_norm.weight".into(), t.d, 1.0, 0.1);
    for l in 0..t.layers {
        let p = format!("blk.{l}");
        vec(format!("{p}.attn_norm.weight"), t.d, 1.0, 0.1);
        vec(format!("{p}.ffn_norm.weight"), t.d, 1.0, 0.1);
        if t.arch == "qwen2" {
            vec(format!("{p}.attn_q.bias"), t.heads * hd, 0.0, 0.5);
            vec(format!("{p}.attn_k.bias"), t.kv_heads * hd, 0.0, 0.5);
            vec(format!("{p}.attn_v.bias"), t.kv_heads * hd, 0.0, 0.5);
        }
    }
    tensors.extend(vecs);

    let a = t.arch;
    let u = |x: usize| Value::U32(x as u32);
    let tokens: Vec<Value> = (0..t.vocab)
        .map(|i| Value::String(format!("t{i}")))
        .collect();
    let types: Vec<Value> = (0..t.vocab).map(|_| Value::I32(1)).collect();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), u(t.layers)),
        (format!("{a}.embedding_length"), u(t.d)),
        (format!("{a}.feed_forward_length"), u(t.ff)),
        (format!("{a}.attention.head_count"), u(t.heads)),
        (format!("{a}.attention.head_count_kv"), u(t.kv_heads)),
        (format!("{a}.context_length"), u(512)),
        (format!("{a}.rope.dimension_count"), u(hd)),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(if a == "qwen2" { 1e6 } else { 1e5 }),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md_refs, &t_refs).unwrap();
    buf.into_inner()
}

enum Reference {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Reference {
    fn load(bytes: &[u8], arch: &str) -> Reference {
        let mut r = Cursor::new(bytes);
        let ct = gguf_file::Content::read(&mut r).unwrap();
        match arch {
            "llama" => Reference::Llama(
                quantized_llama::ModelWeights::from_gguf(ct, &mut r, &Device::Cpu).unwrap(),
            ),
            _ => Reference::Qwen2(
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut r, &Device::Cpu).unwrap(),
            ),
        }
    }

    /// Logits after the last of `tokens`, which start at position `pos`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let y = match self {
            Reference::Llama(m) => m.forward(&x, pos),
            Reference::Qwen2(m) => m.forward(&x, pos),
        }
        .unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    }
}

fn ours(bytes: &[u8]) -> Decoder {
    let mut r = Cursor::new(bytes);
    let ct = gguf_file::Content::read(&mut r).unwrap();
    Decoder::new(Arc::new(Model::from_gguf(&ct, &mut r, "tiny").unwrap()))
}

/// max |a - b| / max(1, max |b|).
fn rel_max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Prefill of 7 tokens, then 5 single steps, against candle-transformers
/// on the same random GGUF. Returns the worst relative difference.
fn compare(t: &Tiny, dtype: GgmlDType, seed: u64) -> f32 {
    let bytes = tiny_gguf(t, dtype, seed);
    let mut reference = Reference::load(&bytes, t.arch);
    let mut dec = ours(&bytes);
    assert_eq!(dec.model().config().tied_embeddings, t.tied);
    let prompt: Vec<u32> = (0..7)
        .map(|i| (i * 37 + seed as u32) % t.vocab as u32)
        .collect();
    let mut worst = rel_max_diff(
        dec.prefill(&prompt).unwrap(),
        &reference.forward(&prompt, 0),
    );
    eprintln!("  prefill {worst:.2e}");
    for s in 0..5u32 {
        let tok = (s * 11 + 3) % t.vocab as u32;
        let pos = dec.len();
        let a = dec.step(tok).unwrap().to_vec();
        let d = rel_max_diff(&a, &reference.forward(&[tok], pos));
        eprintln!("  step {s}: {d:.2e}");
        worst = worst.max(d);
    }
    worst
}

const LLAMA: Tiny = Tiny {
    arch: "llama",
    d: 256,
    ff: 512,
    heads: 4,
    kv_heads: 2,
    layers: 3,
    vocab: 320,
    tied: true,
};
const QWEN2: Tiny = Tiny {
    arch: "qwen2",
    d: 256,
    ff: 768,
    heads: 4,
    kv_heads: 1,
    layers: 3,
    vocab: 288,
    tied: false,
};
/// 4 layers (Quest's first 2 dense) and 2 KV heads of 4 query heads each,
/// so that the KV heads of the selection tests choose differently.
const GQA: Tiny = Tiny {
    arch: "qwen2",
    d: 512,
    ff: 512,
    heads: 8,
    kv_heads: 2,
    layers: 4,
    vocab: 288,
    tied: false,
};

/// F32 weights: both sides compute the same real-number function in f32;
/// only summation orders (dot products of 256-768 terms, softmax) and libm
/// differ, each ~1e-7 relative, amplified a little through 3 layers. 1e-4
/// of the logit scale leaves a wide margin and still catches any wrong
/// formula (a wrong RoPE pairing, bias or norm moves logits by O(1)).
#[test]
fn f32_weights_match_candle_transformers() {
    for (t, seed) in [
        (&LLAMA, 1),
        (&QWEN2, 2),
        (
            &Tiny {
                tied: false,
                ..LLAMA
            },
            3,
        ),
        (
            &Tiny {
                tied: true,
                ..QWEN2
            },
            4,
        ),
    ] {
        let d = compare(t, GgmlDType::F32, seed);
        eprintln!("{} tied={} f32: max rel diff {d:.2e}", t.arch, t.tied);
        assert!(d < 1e-4, "{} f32: {d}", t.arch);
    }
}

/// Quantized weights: the same blocks, but not always the same arithmetic.
/// On an AVX512-VNNI CPU candle's Q8_0 and Q4_K (and multi-row Q6_K)
/// matmuls use repacked kernels that quantize activations to Q8_K (one
/// scale per 256 values) where ggml's formats (and we) use one per 32: that
/// alone moves logits by ~1e-2 of their scale here. Where the activation
/// formats agree (Q4_1, Q5_0) only summation order differs (~1e-7), unless
/// such a difference flips the rounding of one 8-bit activation, which
/// moves a dot product by one quantum (|x|max/127 times a weight), again
/// ~1e-2 after 3 random layers (seen once: qwen2 Q4_1, 1.3e-2). Tolerance:
/// 3e-2 where the activation formats agree, 1e-1 where candle uses Q8_K
/// (measured up to 5.2e-2); a wrong block layout, scale or min term moves
/// logits by O(1). The kernel
/// level comparison without these effects is in `kernels::tests`
/// (relative 1e-5).
#[test]
fn quantized_weights_match_candle_transformers() {
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        for (t, seed) in [(&LLAMA, 5), (&QWEN2, 6)] {
            let d = compare(t, dtype, seed);
            eprintln!("{} {dtype:?}: max rel diff {d:.2e}", t.arch);
            // Candle's activations are Q8_K (per 256) for these three on
            // VNNI CPUs: a coarser check; `kernels::tests` checks our
            // kernels for them against f64 within the 8-bit error.
            let repacked = matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K);
            let tol = if repacked { 1e-1 } else { 3e-2 };
            assert!(d < tol, "{} {dtype:?}: {d}", t.arch);
        }
    }
}

/// Batch invariance on the random model too (cheap, always runs).
#[test]
fn tiny_verification_equals_single_steps() {
    for (t, dtype) in [
        (&LLAMA, GgmlDType::Q4_1),
        (&QWEN2, GgmlDType::Q5_0),
        (&QWEN2, GgmlDType::Q4K),
    ] {
        let mut dec = ours(&tiny_gguf(t, dtype, 7));
        batched_equals_single(&mut dec, &[5, 9, 13, 2, 77, 31], 3, 8);
    }
}

// ---------------------------------------------------------------------------
// Shared checks.

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// After `prompt`: verification of `k` drafts of length `l` (the greedy
/// continuation, and variants that branch from it) in one call, against one
/// `step` per token from the same prefix: every row bitwise equal. Then
/// accept a path and check the next step equals the fresh computation.
fn batched_equals_single(dec: &mut Decoder, prompt: &[u32], k: usize, l: usize) {
    dec.truncate(0).unwrap();
    let root = argmax(dec.prefill(prompt).unwrap());
    let n = dec.len();
    // Greedy continuation by single steps: rows 0..=l of draft 0.
    let mut single = vec![dec.step(root).unwrap().to_vec()];
    let mut greedy = Vec::new();
    for _ in 0..l {
        let t = argmax(single.last().unwrap());
        greedy.push(t);
        single.push(dec.step(t).unwrap().to_vec());
    }
    let vocab = dec.vocab_size() as u32;
    let mut drafts = vec![greedy.clone()];
    for j in 1..k {
        let mut d = greedy.clone();
        let at = (j * 3) % l;
        d[at] = (d[at] + 1 + j as u32) % vocab;
        drafts.push(d);
    }
    dec.truncate(n).unwrap();
    let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
    let ver = dec.verify(root, &refs).unwrap();
    assert_eq!(ver.n_drafts(), k);
    for (j, row) in single.iter().enumerate() {
        assert!(
            ver.logits(0, j) == &row[..],
            "draft 0 row {j} differs from a single step"
        );
    }
    // The other drafts, row by row, against single steps.
    for (di, d) in drafts.iter().enumerate().skip(1) {
        let mut dec_rows = Vec::new();
        dec.truncate(n).unwrap();
        dec_rows.push(dec.step(root).unwrap().to_vec());
        for &t in d {
            dec_rows.push(dec.step(t).unwrap().to_vec());
        }
        for (j, row) in dec_rows.iter().enumerate() {
            assert!(ver.logits(di, j) == &row[..], "draft {di} row {j} differs");
        }
    }
    // Accept draft 1's root + 2 tokens, then the next step must match.
    dec.truncate(n).unwrap();
    let ver = dec.verify(root, &refs).unwrap();
    let want_next = ver.logits(1, 2).to_vec();
    dec.accept(1, 2).unwrap();
    assert_eq!(dec.len(), n + 3);
    assert_eq!(&dec.tokens()[n..], &[root, drafts[1][0], drafts[1][1]]);
    let t = argmax(&want_next);
    let after = dec.step(t).unwrap().to_vec();
    let mut fresh = ours_fresh_like(dec);
    let mut seq = prompt.to_vec();
    seq.extend([root, drafts[1][0], drafts[1][1], t]);
    assert!(
        fresh.prefill(&seq).unwrap() == &after[..],
        "accepted path + step != fresh prefill"
    );
}

fn ours_fresh_like(dec: &Decoder) -> Decoder {
    Decoder::new(dec.model().clone())
}

/// Truncation then re-extension gives the fresh prefill's logits, bitwise
/// (also across different prompt chunkings).
fn truncate_reextend(dec: &mut Decoder, a: &[u32], b: &[u32]) {
    dec.truncate(0).unwrap();
    let mut all = a.to_vec();
    all.extend_from_slice(b);
    let fresh = dec.prefill(&all).unwrap().to_vec();
    dec.truncate(a.len()).unwrap();
    assert!(
        dec.prefill(b).unwrap() == &fresh[..],
        "re-extension differs"
    );
    dec.truncate(0).unwrap();
    dec.set_chunk(5);
    assert!(
        dec.prefill(&all).unwrap() == &fresh[..],
        "chunk size changed the logits"
    );
    dec.set_chunk(workloads::decoder::model::DEFAULT_CHUNK);
}

#[test]
fn tiny_truncate_then_reextend() {
    let mut dec = ours(&tiny_gguf(&QWEN2, GgmlDType::Q8_0, 8));
    truncate_reextend(
        &mut dec,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        &[12, 13, 14, 15],
    );
}

// ---------------------------------------------------------------------------
// Real models.

fn real(asset: &assets::Asset) -> Option<(Arc<Model>, std::path::PathBuf)> {
    match assets::path(asset) {
        Ok(p) => Some((Arc::new(Model::load(&p).unwrap()), p)),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// `ln softmax(logits)[t]`, in float64.
fn log_prob(logits: &[f32], t: usize) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    (logits[t] as f64 - m - z.ln()) as f32
}

/// Our decoder against candle-transformers' quantized llama on the same
/// GGUF, teacher-forced on candle's greedy continuation: at every step
/// where candle's best token leads its second by at least `DECISIVE` nats,
/// ours picks the same token, and every step's log-probability of candle's
/// token is within `LOGP_TOL` of candle's. The two are different arithmetic on
/// 8-bit activations through 30 layers (each quantizes its activations in
/// its own blocks), so their log-probabilities differ by up to about 0.35
/// (measured 2026-11-29, teacher-forced: 0.30 with our scalar attention,
/// 0.35 with the vector one, at a step where candle's token leads by 0.49
/// and ours trails by 0.08; free-running, that step had decided the old
/// token-for-token version of this test by a margin of 0.003). A wrong
/// tokenizer, RoPE or attention is off by whole nats and still fails.
#[test]
fn smollm2_greedy_matches_candle_transformers() {
    const DECISIVE: f32 = 1.0;
    const LOGP_TOL: f32 = 0.5;
    let Some((model, path)) = real(&assets::SMOLLM2_135M) else {
        return;
    };
    let tk = model.tokenizer();
    let prompt_text = tk
        .chat_template()
        .unwrap()
        .format(None, "What is the capital of France?");
    let prompt = tk.encode(&prompt_text).unwrap();
    let n_new = 24;

    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let mut forward = |tokens: &[u32], pos: usize| {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        reference
            .forward(&x, pos)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mut theirs_logits = vec![forward(&prompt, 0)];
    let mut theirs = vec![argmax(&theirs_logits[0])];
    while theirs.len() < n_new {
        let pos = prompt.len() + theirs.len() - 1;
        let logits = forward(&[*theirs.last().unwrap()], pos);
        theirs.push(argmax(&logits));
        theirs_logits.push(logits);
    }

    let mut dec = Decoder::new(model.clone());
    let mut ours = vec![dec.prefill(&prompt).unwrap().to_vec()];
    for &t in &theirs[..n_new - 1] {
        ours.push(dec.step(t).unwrap().to_vec());
    }
    let mut decisive = 0;
    for (i, (o, c)) in ours.iter().zip(&theirs_logits).enumerate() {
        let best = theirs[i] as usize;
        let second = c
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != best)
            .map(|(_, &x)| x)
            .fold(f32::NEG_INFINITY, f32::max);
        let (lo, lc) = (log_prob(o, best), log_prob(c, best));
        let diff = (lo - lc).abs();
        eprintln!(
            "step {i}: candle's token {best} leads by {:.3}; its log-probability {lo:.4} here, {lc:.4} in candle; our best {}",
            c[best] - second,
            argmax(o)
        );
        assert!(
            diff <= LOGP_TOL,
            "step {i}: log-probabilities {lo} and {lc} differ by {diff}"
        );
        if c[best] - second >= DECISIVE {
            decisive += 1;
            assert_eq!(argmax(o), theirs[i], "step {i}: a decisive token differs");
        }
    }
    assert!(
        decisive >= n_new / 3,
        "only {decisive} of {n_new} steps decisive"
    );
    let text = tk.decode(&theirs).unwrap();
    eprintln!("candle: {text:?}");
    // A weak check that still catches garbage (wrong tokenizer or RoPE gives
    // byte soup or a repeated token): several distinct alphabetic words.
    let words: std::collections::BTreeSet<&str> = text
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| w.len() > 1)
        .collect();
    assert!(words.len() >= 5, "{text}");
}

#[test]
fn smollm2_batched_verification_is_bitwise_single_steps() {
    let Some((model, _)) = real(&assets::SMOLLM2_135M) else {
        return;
    };
    let prompt = model
        .tokenizer()
        .encode("The quick brown fox jumps over the lazy dog. Then it")
        .unwrap();
    let mut dec = Decoder::new(model);
    batched_equals_single(&mut dec, &prompt, 3, 8);
    truncate_reextend(&mut dec, &prompt[..6], &prompt[6..]);
}

#[test]
fn qwen_0_5b_batched_verification_is_bitwise_single_steps() {
    let Some((model, _)) = real(&assets::QWEN_CODER_0_5B) else {
        return;
    };
    let tk = model.tokenizer();
    let text = tk
        .chat_template()
        .unwrap()
        .format(None, "Write a Python function that reverses a string.");
    let prompt = tk.encode(&text).unwrap();
    let mut dec = Decoder::new(model.clone());
    batched_equals_single(&mut dec, &prompt, 3, 8);
    truncate_reextend(&mut dec, &prompt[..10], &prompt[10..]);
    // Coherent: the greedy answer is Python.
    dec.truncate(0).unwrap();
    let mut out = vec![argmax(dec.prefill(&prompt).unwrap())];
    for _ in 0..20 {
        let t = *out.last().unwrap();
        out.push(argmax(dec.step(t).unwrap()));
    }
    let answer = tk.decode(&out).unwrap();
    eprintln!("qwen 0.5b: {answer:?}");
    assert!(answer.contains("def "), "{answer}");
}

/// Ids from the `tokenizers` Python package given each model's upstream
/// `tokenizer.json` pre-tokenizer spec and the GGUF's vocab and merges
/// (script in the decoder's report); "Hello world" -> [9707, 1879] is also
/// Qwen2.5's published encoding.
#[test]
fn tokenizers_match_python_reference_and_round_trip() {
    type Cases<'a> = [(&'a assets::Asset, &'a [(&'a str, &'a [u32])]); 2];
    let cases: Cases = [
        (
            &assets::SMOLLM2_135M,
            &[
                ("Hello world", &[19556, 905]),
                (
                    "The year 2024 had 366 days.",
                    &[
                        504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
                    ],
                ),
                (
                    "  leading spaces and\ttabs\n\nnewlines",
                    &[216, 2899, 5600, 284, 197, 100, 7366, 198, 198, 2241, 5110],
                ),
                (
                    "Café naïve 日本語 🙂",
                    &[
                        51, 1939, 2756, 15486, 46494, 17097, 241, 115, 40993, 179, 120, 248, 47526,
                    ],
                ),
                (
                    "<|im_start|>user\nWhat is 12345+678?<|im_end|>\n<|im_start|>assistant\n",
                    &[
                        1, 4093, 198, 1780, 314, 216, 33, 34, 35, 36, 37, 27, 38, 39, 40, 47, 2,
                        198, 1, 520, 9531, 198,
                    ],
                ),
                ("don't You'LL", &[12420, 982, 1206, 23, 16421]),
            ],
        ),
        (
            &assets::QWEN_CODER_0_5B,
            &[
                ("Hello world", &[9707, 1879]),
                (
                    "The year 2024 had 366 days.",
                    &[
                        785, 1042, 220, 17, 15, 17, 19, 1030, 220, 18, 21, 21, 2849, 13,
                    ],
                ),
                (
                    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
                    &[
                        750, 15801, 1445, 982, 262, 470, 308, 421, 308, 366, 220, 17, 770, 15801,
                        1445, 12, 16, 8, 488, 15801, 1445, 12, 17, 340,
                    ],
                ),
                (
                    "  leading spaces and\ttabs\n\nnewlines",
                    &[220, 6388, 12621, 323, 3244, 3435, 271, 931, 7969],
                ),
                (
                    "Café naïve 日本語 🙂",
                    &[34, 2577, 963, 94880, 586, 75402, 21894, 102819, 27484],
                ),
                (
                    "<|im_start|>user\nWhat is 12345+678?<|im_end|>\n<|im_start|>assistant\n",
                    &[
                        151644, 872, 198, 3838, 374, 220, 16, 17, 18, 19, 20, 10, 21, 22, 23, 30,
                        151645, 198, 151644, 77091, 198,
                    ],
                ),
                ("don't You'LL", &[15007, 944, 1446, 6, 4086]),
            ],
        ),
    ];
    for (asset, expected) in cases {
        let Ok(p) = assets::path(asset) else {
            eprintln!("skipped: {} not fetched", asset.file);
            continue;
        };
        let mut f = std::fs::File::open(p).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let tk = workloads::decoder::Tokenizer::from_gguf(&ct).unwrap();
        for (text, ids) in expected {
            let got = tk.encode(text).unwrap();
            assert_eq!(&got[..], *ids, "{} {text:?}", asset.name);
            assert_eq!(tk.decode(&got).unwrap(), *text, "{} round trip", asset.name);
        }
        for text in [
            "",
            " ",
            "a\r\nb",
            "x = [1, 22, 333]  # comment",
            "\u{1F600}\u{200D}",
            "ÆØÅ façade",
        ] {
            let ids = tk.encode(text).unwrap();
            assert_eq!(tk.decode(&ids).unwrap(), text, "{} round trip", asset.name);
        }
    }
}

/// `prefill_logits` gives every row a step per token gives, bitwise, also
/// when the rows asked for start inside a later prompt chunk.
#[test]
fn tiny_prefill_logits_equal_single_steps() {
    let mut dec = ours(&tiny_gguf(&QWEN2, GgmlDType::Q4K, 9));
    let tokens: Vec<u32> = (0..13u32).map(|i| (i * 17 + 3) % 64).collect();
    let steps: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| dec.step(t).unwrap().to_vec())
        .collect();
    let vocab = dec.vocab_size();
    for (chunk, from) in [(64, 0), (5, 0), (5, 7), (4, 12)] {
        dec.truncate(0).unwrap();
        dec.set_chunk(chunk);
        let rows = dec.prefill_logits(&tokens, from).unwrap();
        assert_eq!(rows.len(), (tokens.len() - from) * vocab);
        for (i, row) in rows.chunks_exact(vocab).enumerate() {
            assert!(
                row == &steps[from + i][..],
                "chunk {chunk}, row {}",
                from + i
            );
        }
        assert_eq!(dec.tokens(), &tokens[..]);
    }
    assert!(dec.prefill_logits(&tokens, tokens.len()).is_err());
}

// ---------------------------------------------------------------------------
// The GPU decoder's candle graph (`decoder::cuda`): on candle's CPU backend
// in every build, so CI checks its masks, RoPE, cache writes and gathers;
// with feature `gpu-decoder` also on GPU 0 (then it needs a GPU).

mod gpu {
    use super::*;
    use workloads::decoder::cuda::{Boundaries, CudaDecoder, CudaModel, ReadRule};
    use workloads::decoder::Engine;

    /// Where the graph runs: "cpu" (candle's CPU backend), "gpu" (GPU 0).
    fn backends() -> &'static [&'static str] {
        if cfg!(feature = "gpu-decoder") {
            &["cpu", "gpu"]
        } else {
            &["cpu"]
        }
    }

    fn graph(cpu: &Decoder, backend: &str) -> Arc<CudaModel> {
        Arc::new(match backend {
            "gpu" => CudaModel::new(cpu.model(), 0).expect("a CUDA device"),
            _ => CudaModel::on_cpu(cpu.model()).unwrap(),
        })
    }

    fn both(bytes: &[u8], backend: &str) -> (Decoder, CudaDecoder) {
        let cpu = ours(bytes);
        let graph = graph(&cpu, backend);
        (cpu, CudaDecoder::new(graph))
    }

    /// Every entry point once, each logits row recorded: a prompt, single
    /// steps, a verification of three drafts (two share a prefix) then an
    /// accepted branch and a step after it, a truncation and re-extension
    /// with `prefill_logits`, and a long prompt (two GPU chunks).
    fn scenario(e: &mut dyn Engine, vocab: usize) -> Vec<Vec<f32>> {
        let v = vocab as u32;
        let mut rows = Vec::new();
        let prompt: Vec<u32> = (0..7u32).map(|i| (i * 37 + 5) % v).collect();
        rows.push(e.prefill(&prompt).unwrap().to_vec());
        for s in 0..3u32 {
            rows.push(e.prefill(&[(s * 11 + 3) % v]).unwrap().to_vec());
        }
        let drafts: [Vec<u32>; 3] = [vec![4, 8, 15, 16], vec![4, 8, 23, 42], vec![7, 1, 2, 3]];
        let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
        let ver = e.verify(9, &refs).unwrap();
        assert_eq!(ver.tree_nodes(), 1 + 4 + 2 + 4);
        for d in 0..3 {
            for j in 0..=4 {
                rows.push(ver.logits(d, j).to_vec());
            }
        }
        let n = e.tokens().len();
        e.accept(1, 3).unwrap();
        assert_eq!(&e.tokens()[n..], &[9, 4, 8, 23]);
        rows.push(e.prefill(&[11]).unwrap().to_vec());
        e.truncate(4).unwrap();
        let more: Vec<u32> = (0..5u32).map(|i| (i * 13 + 1) % v).collect();
        let r = e.prefill_logits(&more, 1).unwrap();
        rows.extend(r.chunks_exact(vocab).map(<[f32]>::to_vec));
        e.truncate(0).unwrap();
        let long: Vec<u32> = (0..450u32).map(|i| (i * 7919 + 3) % v).collect();
        rows.push(e.prefill(&long).unwrap().to_vec());
        rows.push(e.prefill(&[2]).unwrap().to_vec());
        rows
    }

    /// The graph against the CPU decoder on the same random weights. F32
    /// weights: both compute the same function in f32 (cuBLAS f32 GEMMs,
    /// no TF32, or candle's CPU GEMM), differing only in summation order:
    /// 1e-4 of the logit scale as in `f32_weights_match_candle_transformers`.
    /// Quantized weights: the GPU quantizes activations to 8 bits per 32
    /// values for every format where the CPU uses per 256 for some (Q4_K,
    /// Q6_K), and a rounding flip of one 8-bit activation moves a logit by
    /// ~1e-2 of the scale after 3 random layers, so 1e-1 as for candle's CPU
    /// kernels; a wrong RoPE, mask, cache position or gather moves logits by
    /// O(1).
    #[test]
    fn gpu_matches_cpu_decoder() {
        for backend in backends() {
            for (t, dtype, tol) in [
                (&LLAMA, GgmlDType::F32, 1e-4),
                (&QWEN2, GgmlDType::F32, 1e-4),
                (&QWEN2, GgmlDType::Q4K, 1e-1),
                (&QWEN2, GgmlDType::Q6K, 1e-1),
                (&LLAMA, GgmlDType::Q8_0, 1e-1),
            ] {
                let (mut cpu, mut graph) = both(&tiny_gguf(t, dtype, 21), backend);
                let vocab = t.vocab;
                let a = scenario(&mut cpu, vocab);
                let b = scenario(&mut graph, vocab);
                assert_eq!(a.len(), b.len());
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| rel_max_diff(y, x))
                    .fold(0f32, f32::max);
                eprintln!(
                    "{} {dtype:?}: graph on {backend} vs CPU decoder max rel diff {worst:.2e}",
                    t.arch
                );
                assert!(worst < tol, "{} {dtype:?} on {backend}: {worst}", t.arch);
            }
        }
    }

    /// `CudaModel::warm_up` (set-up of the long-context decoder variants)
    /// runs on every backend and leaves the model as it was: a decoder
    /// started after it computes the rows a decoder started before it did.
    #[test]
    fn warm_up_changes_nothing() {
        for backend in backends() {
            let model = graph(&ours(&tiny_gguf(&QWEN2, GgmlDType::Q4K, 5)), backend);
            let a = scenario(&mut CudaDecoder::new(model.clone()), QWEN2.vocab);
            model.warm_up().unwrap();
            let b = scenario(&mut CudaDecoder::new(model), QWEN2.vocab);
            assert_eq!(a, b, "on {backend}");
        }
    }

    /// The comparison above must see a single misplaced cache row: here
    /// the graph decoder's last committed row is overwritten (it is told it
    /// holds one token fewer), and the next step's logits must then differ
    /// from the CPU decoder's by far more than that comparison's tolerance.
    #[test]
    fn a_misplaced_cache_row_is_caught() {
        let t = &QWEN2;
        let (mut cpu, mut graph) = both(&tiny_gguf(t, GgmlDType::F32, 23), "cpu");
        let prompt = [5u32, 9, 13, 2, 77, 31];
        cpu.prefill(&prompt).unwrap();
        graph.prefill(&prompt).unwrap();
        // The next row is written over position 5 and sees 6 rows, not 7.
        graph.truncate(prompt.len() - 1).unwrap();
        let a = cpu.prefill(&[40]).unwrap().to_vec();
        let b = graph.prefill(&[40]).unwrap().to_vec();
        let diff = rel_max_diff(&b, &a);
        eprintln!("misplaced row: max rel diff {diff:.2e}");
        assert!(diff > 1e-2, "a wrong cache position went unnoticed: {diff}");
    }

    /// A CPU decoder and the graph on `backend`, both after the same dense
    /// prefill of `len` tokens of model `t`, and that prompt.
    fn prefilled(
        t: &Tiny,
        dtype: GgmlDType,
        seed: u64,
        backend: &str,
        len: u32,
    ) -> (Decoder, CudaDecoder, Vec<u32>) {
        let (mut dense, mut graph) = both(&tiny_gguf(t, dtype, seed), backend);
        let prompt: Vec<u32> = (0..len).map(|i| (i * 37 + 5) % t.vocab as u32).collect();
        dense.prefill(&prompt).unwrap();
        graph.prefill(&prompt).unwrap();
        (dense, graph, prompt)
    }

    /// Single steps through `tokens` of the CPU decoder over a sparse cache
    /// (`cpu`), the graph under the matching read rule and the dense
    /// decoder; raises `worst` to the graph's largest relative difference
    /// from `cpu`, and lowers `from_dense` to dense's smallest.
    fn step_three(
        (cpu, graph, dense): (&mut Decoder, &mut CudaDecoder, &mut Decoder),
        tokens: impl Iterator<Item = u32>,
        worst: &mut f32,
        from_dense: &mut f32,
    ) {
        for x in tokens {
            let a = cpu.prefill(&[x]).unwrap().to_vec();
            let b = graph.prefill(&[x]).unwrap().to_vec();
            *worst = worst.max(rel_max_diff(&b, &a));
            *from_dense = from_dense.min(rel_max_diff(dense.prefill(&[x]).unwrap(), &a));
        }
    }

    /// The end of a selecting rule's comparison with its CPU cache: a
    /// block prefill under the rule is refused, naming `what`; then, except
    /// for quantized weights on the GPU (whose activations are quantized in
    /// other blocks than the CPU's, so a near tie may be selected the other
    /// way: see `top_pages_reads_match_the_cpu_cache`), the graph's largest
    /// difference from the CPU cache, `worst`, is below `tol`, and the
    /// selection moved the logits from dense's by clearly more (`moved`).
    fn selection_verdict(
        graph: &mut CudaDecoder,
        what: &str,
        (backend, dtype): (&str, GgmlDType),
        (worst, moved, tol): (f32, f32, f32),
    ) {
        let err = graph.prefill(&[1, 2]).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
        if backend == "gpu" && dtype != GgmlDType::F32 {
            return;
        }
        assert!(worst < tol, "{dtype:?} on {backend}: {worst}");
        assert!(
            moved > 10.0 * worst,
            "{dtype:?}: the selection moved the logits by {moved}, not clearly more than the decoders differ ({worst})"
        );
    }

    /// StreamingLLM's read rule on the graph (`ReadRule::SinkWindow`) against the
    /// CPU decoder over `SinkWindowKv`, both after the same dense prefill
    /// of 40 tokens with a budget of 12 (4 sinks, 8 recent): single steps
    /// (the window rolls; the graph evicts at the first and again 8 steps
    /// later), a teacher-forced block of 4, a verification tree with an
    /// accepted branch after the evictions, the rows the graph holds, and
    /// a truncation into evicted positions refused by both. Tolerances as
    /// in `gpu_matches_cpu_decoder`.
    /// The dense decoder's rows must differ from the CPU cache's by at least
    /// 5x the tolerance, or the comparison could not see a wrong window.
    #[test]
    fn sink_window_reads_match_the_cpu_cache() {
        use workloads::longctx::sink_window::{SinkWindowKv, SINKS};
        let budget = 12;
        for backend in backends() {
            for (dtype, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::Q4K, 1e-1)] {
                let (mut dense, mut graph, prompt) = prefilled(&QWEN2, dtype, 24, backend, 40);
                let v = QWEN2.vocab as u32;
                let cut = SinkWindowKv::from_dense(dense.cache().as_dense().unwrap(), budget);
                let mut cpu =
                    Decoder::resume(dense.model().clone(), Box::new(cut), prompt).unwrap();
                graph.set_read_rule(ReadRule::SinkWindow {
                    sinks: SINKS,
                    budget,
                });
                let (mut worst, mut from_dense) = (0f32, f32::INFINITY);
                step_three(
                    (&mut cpu, &mut graph, &mut dense),
                    (0..5u32).map(|s| (s * 11 + 3) % v),
                    &mut worst,
                    &mut from_dense,
                );
                let mut compare = |a: &[f32], b: &[f32], d: &[f32]| {
                    worst = worst.max(rel_max_diff(b, a));
                    from_dense = from_dense.min(rel_max_diff(d, a));
                };
                let block = [7u32, 70, 140, 210];
                let a = cpu.prefill_logits(&block, 1).unwrap();
                let b = graph.prefill_logits(&block, 1).unwrap();
                let d = dense.prefill_logits(&block, 1).unwrap();
                compare(&a, &b, &d);
                // On past a second eviction (every 8 steps here); the check
                // that the window matters stays on the steps above.
                let mut unused = f32::INFINITY;
                step_three(
                    (&mut cpu, &mut graph, &mut dense),
                    (0..12u32).map(|s| (s * 5 + 2) % v),
                    &mut worst,
                    &mut unused,
                );
                // A verification tree and an accepted branch after the
                // evictions: the graph keeps its rows in their own order.
                let drafts: [Vec<u32>; 2] = [vec![4, 8, 15, 16], vec![4, 8, 23, 42]];
                let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
                let (va, vb) = (
                    cpu.verify(9, &refs).unwrap(),
                    graph.verify(9, &refs).unwrap(),
                );
                for d in 0..2 {
                    for j in 0..=4 {
                        worst = worst.max(rel_max_diff(vb.logits(d, j), va.logits(d, j)));
                    }
                }
                cpu.accept(1, 3).unwrap();
                graph.accept(1, 3).unwrap();
                dense.prefill(&[9, 4, 8, 23]).unwrap();
                step_three(
                    (&mut cpu, &mut graph, &mut dense),
                    [3u32, 1].into_iter(),
                    &mut worst,
                    &mut unused,
                );
                // The graph holds the budget and at most a window more.
                let row = graph.kv_bytes() / graph.tokens().len().max(1);
                let per_row = QWEN2.layers * QWEN2.kv_heads * (QWEN2.d / QWEN2.heads) * 2 * 4;
                let held = graph.kv_bytes() / per_row;
                assert!(
                    (budget..=budget + budget - SINKS).contains(&held),
                    "{held} rows held ({row} bytes a position)"
                );
                // Neither cache can take back what it evicted.
                let n = cpu.len() - 10;
                assert!(cpu.truncate(n).is_err());
                let err = Engine::truncate(&mut graph, n).unwrap_err().to_string();
                assert!(err.contains("evicted"), "{err}");
                eprintln!(
                    "{dtype:?} on {backend}: sink-window graph vs CPU cache {worst:.2e}, dense vs window at least {from_dense:.2e}, {held} rows held"
                );
                assert!(worst < tol, "{dtype:?} on {backend}: {worst}");
                assert!(
                    from_dense > 5.0 * tol,
                    "{dtype:?}: the window changed nothing ({from_dense})"
                );
            }
        }
    }

    /// Quest's page selection on the graph (`ReadRule::TopPages`) against
    /// the CPU decoder over `QuestKv` after the same dense prefill, on a
    /// model of 4 layers (2 dense, 2 selecting) and 2 KV heads of 4 query
    /// heads each, so the KV heads select different pages. The steps cross
    /// a page boundary and include fills where the budget leaves no whole
    /// page (only the page in flight is read), then truncate into a page
    /// and step on across the next boundary. Tolerances as for the sink
    /// window; the selection must move the logits against dense by ten
    /// times the decoders' difference, and the rows read must be the CPU
    /// cache's exactly. A block of several rows
    /// is refused while the selection is active. On the GPU the logit bound
    /// holds for f32 weights only: with Q4_K, the GPU quantizes activations
    /// in blocks of 32 and the CPU in blocks of 256, so a near-tied page can
    /// be chosen differently, which moves the logits as much as the
    /// selection itself does (H200, 2026-11-28: 0.263, dense against the
    /// selection 0.231; `results/runs/2026-11-28-h200-long-context-gpu-evict`).
    /// There the rows read must still match, and the selection's logic is
    /// the one checked in the f32 case and on the CPU backend.
    #[test]
    fn top_pages_reads_match_the_cpu_cache() {
        use workloads::longctx::quest::{QuestKv, DENSE_LAYERS, PAGE};
        let budget = 40;
        for backend in backends() {
            for (dtype, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::Q4K, 1e-1)] {
                let (mut dense, mut graph, prompt) = prefilled(&GQA, dtype, 25, backend, 70);
                let v = GQA.vocab as u32;
                let quest = QuestKv::from_dense(dense.cache().as_dense().unwrap(), budget, 32);
                let mut cpu =
                    Decoder::resume(dense.model().clone(), Box::new(quest), prompt).unwrap();
                graph.set_read_rule(ReadRule::TopPages {
                    page: PAGE,
                    dense_layers: DENSE_LAYERS,
                    budget,
                });
                let before = graph.reads();
                let (mut worst, mut from_dense) = (0f32, f32::INFINITY);
                step_three(
                    (&mut cpu, &mut graph, &mut dense),
                    (0..14u32).map(|s| (s * 11 + 3) % v),
                    &mut worst,
                    &mut from_dense,
                );
                // Back into a page (its bounds dropped) and on again.
                let n = cpu.len() - 9;
                cpu.truncate(n).unwrap();
                Engine::truncate(&mut graph, n).unwrap();
                dense.truncate(n).unwrap();
                step_three(
                    (&mut cpu, &mut graph, &mut dense),
                    (0..12u32).map(|s| (s * 7 + 1) % v),
                    &mut worst,
                    &mut from_dense,
                );
                let (g, c) = (graph.reads(), cpu.cache().reads());
                assert_eq!(g.rows_read - before.rows_read, c.rows_read, "{backend}");
                assert_eq!(g.rows_visible - before.rows_visible, c.rows_visible);
                eprintln!(
                    "{dtype:?} on {backend}: top pages graph vs CPU cache {worst:.2e}, dense vs selection at least {from_dense:.2e}, read share {:.3}",
                    c.share()
                );
                selection_verdict(
                    &mut graph,
                    "page selection",
                    (backend, dtype),
                    (worst, from_dense, tol),
                );
            }
        }
    }

    /// ChunkLLM's training-free chunk selection on the graph
    /// (`ReadRule::ChunkSelect`) against the CPU decoder over
    /// `ChunkSelectKv` after the same dense prefill, per (layer, KV head)
    /// and with the layers' vote, on the model of the Quest test (4 layers,
    /// 2 KV heads of 4 query heads, so the KV heads choose differently).
    /// A prompt of 70 tokens, a budget of 40 (chunks of at most 10), and
    /// every token below 60 that is a multiple of 7 ending a chunk: the
    /// steps pass boundary tokens and the cap, so they both select and
    /// read a choice, then truncate past two selections and step on. The
    /// logits agree within the Quest test's tolerances, the selection
    /// moves them against dense by ten times the decoders' difference, the
    /// rows read are the CPU cache's exactly and so are the bytes held (the
    /// metadata counted alike). A block of several rows is refused. On the
    /// GPU with Q4_K weights the logits are not compared, for the reason
    /// the Quest test gives, and the rows read and bytes held only within
    /// 1%: the chunks differ in length, so a near-tie that goes the other
    /// way changes them.
    #[test]
    fn chunk_select_reads_match_the_cpu_cache() {
        use workloads::longctx::chunk_select::{chunk_cap, ChunkSelectKv};
        use workloads::longctx::policy::Plan;
        let budget = 40;
        let table: Vec<bool> = (0..GQA.vocab).map(|t| t < 60 && t % 7 == 0).collect();
        // Boundary tokens, the cap's run of ten without one, and more.
        let steps: Vec<u32> = [3, 14, 5, 9, 21, 2, 4, 6, 8, 10, 12, 15, 16, 17, 18, 28]
            .into_iter()
            .chain((0..10u32).map(|s| (s * 11 + 3) % GQA.vocab as u32))
            .collect();
        for backend in backends() {
            for vote in [false, true] {
                for (dtype, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::Q4K, 1e-1)] {
                    let (mut dense, mut graph, prompt) = prefilled(&GQA, dtype, 26, backend, 70);
                    let plan = Plan {
                        shape: dense.model().kv_shape(),
                        context: prompt.len(),
                        budget,
                        prompt: &prompt,
                        boundary: &table,
                        max_new: 64,
                        whole_heads: &[],
                        window: None,
                    };
                    let kv = dense.cache().as_dense().unwrap();
                    let cache = match vote {
                        false => ChunkSelectKv::from_dense(kv, &plan),
                        true => ChunkSelectKv::voting(kv, &plan),
                    };
                    let mut cpu =
                        Decoder::resume(dense.model().clone(), Box::new(cache), prompt.clone())
                            .unwrap();
                    graph.set_read_rule(ReadRule::ChunkSelect {
                        budget,
                        cap: chunk_cap(budget),
                        vote,
                        boundary: Boundaries(table.clone().into()),
                    });
                    let before = graph.reads();
                    // Selection steps read everything, so the move against
                    // dense is the largest over the steps, not the least.
                    let (mut worst, mut moved) = (0f32, 0f32);
                    let mut three = |cpu: &mut Decoder,
                                     graph: &mut CudaDecoder,
                                     dense: &mut Decoder,
                                     xs: &[u32]| {
                        for &x in xs {
                            let a = cpu.prefill(&[x]).unwrap().to_vec();
                            worst = worst.max(rel_max_diff(graph.prefill(&[x]).unwrap(), &a));
                            moved = moved.max(rel_max_diff(dense.prefill(&[x]).unwrap(), &a));
                        }
                    };
                    three(&mut cpu, &mut graph, &mut dense, &steps[..20]);
                    // Back past two selections (the chunks they closed
                    // reopen) and on again.
                    let n = cpu.len() - 7;
                    cpu.truncate(n).unwrap();
                    Engine::truncate(&mut graph, n).unwrap();
                    dense.truncate(n).unwrap();
                    three(&mut cpu, &mut graph, &mut dense, &steps[9..]);
                    let (g, c) = (graph.reads(), cpu.cache().reads());
                    let (read, held) = (g.rows_read - before.rows_read, graph.kv_bytes());
                    assert_eq!(g.rows_visible - before.rows_visible, c.rows_visible);
                    assert!(
                        c.share() < 0.95,
                        "the choice read everything: {}",
                        c.share()
                    );
                    if *backend == "gpu" && dtype != GgmlDType::F32 {
                        // A near-tie between chunks of different lengths
                        // may go the other way (H200, 2026-11-29: 13,521
                        // rows read against 13,528).
                        let near = |a: usize, b: usize| a.abs_diff(b) * 100 <= b;
                        assert!(
                            near(read as usize, c.rows_read as usize),
                            "{read} rows read"
                        );
                        assert!(near(held, cpu.cache().bytes()), "{held} bytes held");
                    } else {
                        assert_eq!(read, c.rows_read, "{backend} {vote}");
                        assert_eq!(held, cpu.cache().bytes(), "{backend} {vote}");
                    }
                    eprintln!(
                        "{dtype:?} on {backend}, vote {vote}: chunk selection graph vs CPU cache {worst:.2e}, dense vs selection up to {moved:.2e}, read share {:.3}",
                        c.share()
                    );
                    selection_verdict(
                        &mut graph,
                        "chunk selection",
                        (backend, dtype),
                        (worst, moved, tol),
                    );
                }
            }
        }
    }

    /// Not bitwise (see `decoder::cuda`), but a verification row on the GPU
    /// equals the same position stepped alone within rounding: 1e-5 for
    /// f32 weights; for quantized ones an 8-bit activation may round the
    /// other way (1e-1, as above). Prints the largest difference.
    #[test]
    fn gpu_verification_close_to_single_steps() {
        for (backend, (t, dtype, tol)) in backends().iter().flat_map(|b| {
            [
                (&QWEN2, GgmlDType::F32, 1e-5),
                (&QWEN2, GgmlDType::Q4K, 1e-1),
            ]
            .map(|c| (b, c))
        }) {
            let (_, mut gpu) = both(&tiny_gguf(t, dtype, 22), backend);
            let prompt = [5u32, 9, 13, 2, 77, 31];
            gpu.prefill(&prompt).unwrap();
            let n = gpu.tokens().len();
            let draft = [3u32, 1, 4, 1, 5, 9, 2, 6];
            let mut single = vec![gpu.prefill(&[7]).unwrap().to_vec()];
            for &x in &draft {
                single.push(gpu.prefill(&[x]).unwrap().to_vec());
            }
            gpu.truncate(n).unwrap();
            let other = [3u32, 1, 4, 2, 2, 2, 2, 2];
            let ver = gpu.verify(7, &[&draft, &other]).unwrap();
            let worst = single
                .iter()
                .enumerate()
                .map(|(j, row)| rel_max_diff(ver.logits(0, j), row))
                .fold(0f32, f32::max);
            eprintln!("{dtype:?}: verification vs single steps on {backend} {worst:.2e}");
            assert!(worst < tol, "{dtype:?} on {backend}: {worst}");
        }
    }
}

#[cfg(feature = "gpu-decoder")]
mod gpu_real {
    use super::*;
    use workloads::decoder::cuda::{CudaDecoder, CudaModel};
    use workloads::decoder::split_attn::SplitAttn;
    use workloads::decoder::Engine;

    /// Attention in float64 of query head `g` of KV head `h` over `rows`
    /// of a `[kv_heads, cap, hd]` cache.
    fn attention_f64(
        (q, k, v): (&[f32], &[f32], &[f32]),
        (cap, hd, group): (usize, usize, usize),
        (h, g): (usize, usize),
        rows: &[usize],
    ) -> Vec<f64> {
        let qi = &q[(h * group + g) * hd..][..hd];
        let at = |r: usize| (h * cap + r) * hd;
        let s: Vec<f64> = rows
            .iter()
            .map(|&r| (0..hd).map(|d| qi[d] as f64 * k[at(r) + d] as f64).sum())
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        (0..hd)
            .map(|d| {
                rows.iter()
                    .zip(&w)
                    .map(|(&r, w)| w * v[at(r) + d] as f64)
                    .sum::<f64>()
                    / l
            })
            .collect()
    }

    /// Random values in [-scale, scale).
    fn uniform(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
        use rand::Rng;
        (0..n)
            .map(|_| rng.random_range(-1.0..1.0f32) * scale)
            .collect()
    }

    /// The split-K attention kernel (`decoder::split_attn`) against a
    /// float64 reference on random inputs: query heads per KV head from 1
    /// to 8, head dimensions 32 to 128, one run or two (narrowed views of a
    /// cache with spare capacity, as the decoder passes them), row counts
    /// from 1 to past the point where a split takes more than 64 rows, and
    /// splits that do not divide the rows; then the same kernel reading
    /// pages through a list (each KV head its own pages, in no order) and a
    /// run after them, as Quest's rule does, and Quest's page scores.
    /// Bound: 2e-5 of the largest output (f32 sums of at most 20k terms).
    #[test]
    fn split_attention_matches_float64() {
        use rand::{seq::SliceRandom, SeedableRng};
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let attn = SplitAttn::new(dev.as_cuda_device().unwrap()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let check = |what: &str, got: &[f32], want: &[f64]| {
            let top = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            let worst = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (&x, y)| m.max((x as f64 - y).abs()));
            eprintln!(
                "{what}: max error {:.2e} of the largest output",
                worst / top
            );
            assert!(worst / top < 2e-5, "{what}: {}", worst / top);
        };
        for (group, hd, kv_heads, runs) in [
            (7, 64, 2, vec![(0, 1000)]),
            (7, 64, 2, vec![(0, 4), (300, 813)]),
            (1, 32, 3, vec![(5, 65)]),
            (3, 64, 3, vec![(0, 1)]),
            (8, 128, 1, vec![(0, 3000), (4000, 2000)]),
            (6, 128, 2, vec![(0, 20_000)]),
        ] {
            let cap = runs.iter().map(|&(a, n)| a + n).max().unwrap() + 17;
            // Keys spread widely enough that the softmax is not flat.
            let k = uniform(&mut rng, kv_heads * cap * hd, 3.0);
            let v = uniform(&mut rng, kv_heads * cap * hd, 1.0);
            let q = uniform(&mut rng, kv_heads * group * hd, 1.0 / (hd as f32).sqrt());
            let kt = Tensor::from_slice(&k, (1, kv_heads, cap, hd), &dev).unwrap();
            let vt = Tensor::from_slice(&v, (1, kv_heads, cap, hd), &dev).unwrap();
            let qt = Tensor::from_slice(&q, (1, kv_heads, group, hd), &dev).unwrap();
            let views: Vec<(Tensor, Tensor)> = runs
                .iter()
                .map(|&(a, n)| (kt.narrow(2, a, n).unwrap(), vt.narrow(2, a, n).unwrap()))
                .collect();
            let got = attn.attend(&qt, &views).unwrap();
            assert_eq!(got.dims(), &[1, kv_heads * group * hd]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rows: Vec<usize> = runs.iter().flat_map(|&(a, n)| a..a + n).collect();
            let want: Vec<f64> = (0..kv_heads)
                .flat_map(|h| (0..group).map(move |g| (h, g)))
                .flat_map(|hg| attention_f64((&q, &k, &v), (cap, hd, group), hg, &rows))
                .collect();
            check(
                &format!("group {group}, head_dim {hd}, runs {runs:?}"),
                &got,
                &want,
            );
        }
        // Pages (Quest's rule): 12 of the first 60 pages of 16 rows per KV
        // head, then the 7 rows of the page in flight.
        let (group, hd, kv_heads, page, cap) = (7, 64, 2, 16, 1024);
        let k = uniform(&mut rng, kv_heads * cap * hd, 3.0);
        let v = uniform(&mut rng, kv_heads * cap * hd, 1.0);
        let q = uniform(&mut rng, kv_heads * group * hd, 1.0 / (hd as f32).sqrt());
        let lists: Vec<Vec<u32>> = (0..kv_heads)
            .map(|_| {
                let mut p: Vec<u32> = (0..60).collect();
                p.shuffle(&mut rng);
                p.truncate(12);
                p
            })
            .collect();
        let kt = Tensor::from_slice(&k, (1, kv_heads, cap, hd), &dev).unwrap();
        let vt = Tensor::from_slice(&v, (1, kv_heads, cap, hd), &dev).unwrap();
        let qt = Tensor::from_slice(&q, (1, kv_heads, group, hd), &dev).unwrap();
        let flat: Vec<u32> = lists.concat();
        let pt = Tensor::from_slice(&flat, (1, kv_heads, 12), &dev).unwrap();
        let flight = (kt.narrow(2, 960, 7).unwrap(), vt.narrow(2, 960, 7).unwrap());
        let got = attn
            .attend_pages(&qt, &(kt.clone(), vt.clone()), (&pt, page), &flight)
            .unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f64> = (0..kv_heads)
            .flat_map(|h| {
                let rows: Vec<usize> = lists[h]
                    .iter()
                    .flat_map(|&p| p as usize * page..(p as usize + 1) * page)
                    .chain(960..967)
                    .collect();
                (0..group)
                    .flat_map(|g| attention_f64((&q, &k, &v), (cap, hd, group), (h, g), &rows))
                    .collect::<Vec<_>>()
            })
            .collect();
        check("12 pages of 16 rows and 7 rows in flight", &got, &want);
        // Rows per KV head (ChunkLLM's chosen chunks): lists padded to one
        // length, each head reading its own count (700 rows and none:
        // every split of the second head past its rows is empty), then the
        // 9 newest rows.
        let counts = [700u32, 0];
        let mut padded = vec![0u32; kv_heads * 700];
        for (h, &c) in counts.iter().enumerate() {
            let mut r: Vec<u32> = (0..1000).collect();
            r.shuffle(&mut rng);
            padded[h * 700..h * 700 + c as usize].copy_from_slice(&r[..c as usize]);
        }
        let lt = Tensor::from_slice(&padded, (1, kv_heads, 700), &dev).unwrap();
        let ct = Tensor::from_slice(&counts, kv_heads, &dev).unwrap();
        let newest = (
            kt.narrow(2, 1000, 9).unwrap(),
            vt.narrow(2, 1000, 9).unwrap(),
        );
        let got = attn
            .attend_rows(&qt, &(kt.clone(), vt.clone()), (&lt, &ct), &newest)
            .unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f64> = (0..kv_heads)
            .flat_map(|h| {
                let rows: Vec<usize> = padded[h * 700..h * 700 + counts[h] as usize]
                    .iter()
                    .map(|&r| r as usize)
                    .chain(1000..1009)
                    .collect();
                (0..group)
                    .flat_map(|g| attention_f64((&q, &k, &v), (cap, hd, group), (h, g), &rows))
                    .collect::<Vec<_>>()
            })
            .collect();
        check("rows per KV head (700 and 0) and 9 newest", &got, &want);
        // Quest's criticality, over bounds narrowed from a larger buffer.
        let pages = 50;
        let lo = uniform(&mut rng, kv_heads * 64 * hd, 1.0);
        let hi: Vec<f32> = lo.iter().map(|x| x + 0.5).collect();
        // The first `pages` of 64 pages' bounds, as the decoder narrows them.
        let bounds = |lo: &[f32], hi: &[f32]| {
            let t = |x: &[f32]| {
                Tensor::from_slice(x, (1, kv_heads, 64, hd), &dev)
                    .and_then(|t| t.narrow(2, 0, pages))
                    .unwrap()
            };
            (t(lo), t(hi))
        };
        let (lt, ht) = bounds(&lo, &hi);
        let got = attn.quest_scores(&qt, &lt, &ht).unwrap();
        assert_eq!(got.dims(), &[1, kv_heads, pages]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f64> = (0..kv_heads)
            .flat_map(|h| (0..pages).map(move |p| (h, p)))
            .map(|(h, p)| {
                let at = (h * 64 + p) * hd;
                (0..group * hd)
                    .map(|i| {
                        let x = q[h * group * hd + i] as f64;
                        let d = i % hd;
                        (x * lo[at + d] as f64).max(x * hi[at + d] as f64)
                    })
                    .sum::<f64>()
            })
            .collect();
        check("Quest's page scores", &got, &want);
        // Quest's selection in one launch: the pages of the CPU cache's
        // order (higher score first, ties to the lower page) over the
        // scores above, with pages 20-24 copies of page 7 (exact ties).
        let (mut lo2, mut hi2) = (lo.clone(), hi.clone());
        for h in 0..kv_heads {
            for p in 20..25 {
                let (from, to) = ((h * 64 + 7) * hd, (h * 64 + p) * hd);
                lo2.copy_within(from..from + hd, to);
                hi2.copy_within(from..from + hd, to);
            }
        }
        let (lt, ht) = bounds(&lo2, &hi2);
        let scores = attn.quest_scores(&qt, &lt, &ht).unwrap();
        let scores = scores.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for want in [1, 9, 22, pages] {
            let got = attn.quest_top_pages(&qt, &lt, &ht, want).unwrap();
            assert_eq!(got.dims(), &[1, kv_heads, want]);
            let got = got.flatten_all().unwrap().to_vec1::<u32>().unwrap();
            for h in 0..kv_heads {
                let s = &scores[h * pages..(h + 1) * pages];
                let mut order: Vec<u32> = (0..pages as u32).collect();
                order.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
                assert_eq!(
                    &got[h * want..(h + 1) * want],
                    &order[..want],
                    "head {h}, {want} pages"
                );
            }
        }
        eprintln!("Quest's one-launch selection: the CPU order for 1, 9, 22 and {pages} of {pages} pages, with exact ties");
    }

    fn max_abs(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// On Qwen2.5-Coder-1.5B (skips without the asset): a verification
    /// tree's rows against the same positions stepped one at a time on the
    /// GPU, and the GPU's single steps against the CPU decoder's, as the
    /// largest absolute logit difference. The first bounds the near-tie
    /// margin of the SpecTr greedy check (`spectr::GREEDY_TIE_NATS`, which
    /// must stay at least twice it); the second shows both decoders compute
    /// the same model (logits span about 30 here).
    #[test]
    fn gpu_qwen_rows_close() {
        let Some((model, _)) = real(&assets::QWEN_CODER_1_5B) else {
            return;
        };
        let gpu = Arc::new(CudaModel::new(&model, 0).unwrap());
        let mut g = CudaDecoder::new(gpu);
        let mut c = Decoder::new(model.clone());
        let prompt = model
            .tokenizer()
            .encode("Write a Rust function that returns the n-th Fibonacci number, iteratively.")
            .unwrap();
        let gp = g.prefill(&prompt).unwrap().to_vec();
        let cp = c.prefill(&prompt).unwrap().to_vec();
        let mut cpu_gpu = max_abs(&gp, &cp);
        let root = argmax(&gp);
        let n = prompt.len();
        let mut single = vec![g.prefill(&[root]).unwrap().to_vec()];
        cpu_gpu = cpu_gpu.max(max_abs(&single[0], c.prefill(&[root]).unwrap()));
        let mut draft = Vec::new();
        for _ in 0..8 {
            let t = argmax(single.last().unwrap());
            draft.push(t);
            let row = g.prefill(&[t]).unwrap().to_vec();
            cpu_gpu = cpu_gpu.max(max_abs(&row, c.prefill(&[t]).unwrap()));
            single.push(row);
        }
        let mut drafts = vec![draft.clone()];
        for j in 1..8u32 {
            let mut d = draft.clone();
            d[(j as usize * 3) % 8] = (d[0] + 100 * j) % 150_000;
            drafts.push(d);
        }
        let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
        g.truncate(n).unwrap();
        let ver = g.verify(root, &refs).unwrap();
        let batched = single
            .iter()
            .enumerate()
            .map(|(j, row)| max_abs(ver.logits(0, j), row))
            .fold(0f32, f32::max);
        let span =
            cp.iter().fold(f32::MIN, |m, &x| m.max(x)) - cp.iter().fold(f32::MAX, |m, &x| m.min(x));
        eprintln!(
            "Qwen 1.5B: logit span {span:.1}; GPU tree ({} nodes) vs GPU single steps: max |diff| {batched:.4}; GPU vs CPU single steps: {cpu_gpu:.4}",
            ver.tree_nodes()
        );
        assert!(
            (batched as f64) * 2.0 < workloads::spectr::GREEDY_TIE_NATS,
            "batched rows differ by {batched}, more than half the near-tie margin"
        );
        assert!(
            cpu_gpu < 0.05 * span,
            "GPU and CPU differ by {cpu_gpu} of {span}"
        );
    }

    /// Median wall milliseconds of `reps` runs of `f` (each ends with the
    /// logits on the host, which synchronises the GPU).
    fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
        f();
        let t: Vec<f64> = (0..reps)
            .map(|_| {
                let s = std::time::Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        workloads::stats::median(&t)
    }

    /// The GPU decoder's call costs on both Qwen models at the SpecTr run's
    /// shapes (a 120-token context): one decode step, verification trees of
    /// `1 + k L` nodes (the target's call for k drafts of length L), and an
    /// accept that moves a non-first path (its cache gather). Prints a
    /// table; a timing, not a check, so ignored: run it on the GPU machine
    /// with `--ignored --nocapture gpu_call_costs`.
    #[test]
    #[ignore]
    fn gpu_call_costs() {
        for asset in [&assets::QWEN_CODER_0_5B, &assets::QWEN_CODER_1_5B] {
            let Some((model, _)) = real(asset) else {
                continue;
            };
            let mut g = CudaDecoder::new(Arc::new(CudaModel::new(&model, 0).unwrap()));
            let text = "Summarise the following passage in two sentences. ".repeat(12);
            let mut prompt = model.tokenizer().encode(&text).unwrap();
            prompt.truncate(120);
            let n = prompt.len();
            g.prefill(&prompt).unwrap();
            let step = median_ms(40, || {
                g.truncate(n).unwrap();
                g.prefill(&[42]).unwrap();
            });
            println!("{}: context {n}; step {step:.2} ms", asset.file);
            println!("  k  L  nodes  verify ms  x step");
            for (k, l) in [
                (1, 2),
                (1, 4),
                (1, 8),
                (2, 4),
                (4, 4),
                (8, 2),
                (8, 4),
                (8, 8),
            ] {
                let drafts: Vec<Vec<u32>> = (0..k)
                    .map(|i| (0..l).map(|j| (1000 + 37 * i + 5 * j) as u32).collect())
                    .collect();
                let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
                g.truncate(n).unwrap();
                let mut nodes = 0;
                let ms = median_ms(20, || nodes = g.verify(42, &refs).unwrap().tree_nodes());
                println!("  {k}  {l}  {nodes:5}  {ms:9.2}  {:6.2}", ms / step);
            }
            // Accept of draft 3 of 4 (its nodes are not the first after the
            // root, so every layer's cache is gathered), then one step.
            let drafts: Vec<Vec<u32>> = (0..4)
                .map(|i| (0..4).map(|j| (2000 + 41 * i + 3 * j) as u32).collect())
                .collect();
            let refs: Vec<&[u32]> = drafts.iter().map(|d| &d[..]).collect();
            let mut total = 0.0;
            let reps = 20;
            for _ in 0..reps {
                g.truncate(n).unwrap();
                g.verify(42, &refs).unwrap();
                let s = std::time::Instant::now();
                g.accept(3, 4).unwrap();
                g.prefill(&[7]).unwrap();
                total += s.elapsed().as_secs_f64() * 1e3;
            }
            let gather = total / reps as f64 - step;
            println!("  accept with a gather: {gather:.2} ms (accept + step, less a step; mean)");
        }
    }
}
