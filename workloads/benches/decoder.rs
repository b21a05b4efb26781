//! Decoder throughput on the real GGUF models, measured the way
//! `scripts/peer_llama_cpp.py` measures llama.cpp, so the two can be set
//! side by side (`scripts/peer-llama-cpp.sh` runs both in one go):
//! prompt processing of one 512-token prompt, greedy decode of 64 tokens
//! after a short prompt, and the cost of one batched verification call of
//! 5 and 9 positions (logits at every position) on a 256-token cached
//! prefix, relative to one position. Prompt text: the same 20,000
//! characters of the Jargon File the peer script uses.
//!
//! With `--long=N,...`, also long prompts (the attention's share grows
//! with the square of the length): one prefill of each `N` tokens of the
//! Jargon File (from the same place, longer) and 16 greedy decode steps
//! after it, medians of `reps`.
//!
//! `cargo bench -p workloads --bench decoder [-- [--reps=N] [--json=PATH] [--long=N,...] MODEL...]`
//! with MODEL one of `smollm2-135m`, `qwen2.5-coder-0.5b`,
//! `qwen2.5-coder-1.5b` (default: all three). Threads: `CANDLE_NUM_THREADS`
//! (default: physical cores). Prints one line per measurement; `--json`
//! also writes them in the peer script's layout. Models not fetched are
//! skipped.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use workloads::assets;
use workloads::decoder::{Decoder, Model};

const DECODE_PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";
const DECODE_TOKENS: usize = 64;
const PP_TOKENS: usize = 512;
const VERIFY_PREFIX: usize = 256;
const VERIFY_SIZES: [usize; 3] = [1, 5, 9];
/// Greedy decode steps after each long prompt (`--long`).
const LONG_DECODE: usize = 16;
/// Verification calls are a few ms; take this many more of them.
const VERIFY_REPS_FACTOR: usize = 4;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() {
    let mut reps = 5usize;
    let mut json_out: Option<String> = None;
    let mut long: Vec<usize> = Vec::new();
    let mut names = Vec::new();
    for a in std::env::args().skip(1) {
        if let Some(v) = a.strip_prefix("--reps=") {
            reps = v.parse().expect("--reps=N takes a positive integer");
            assert!(reps > 0, "--reps=N takes a positive integer");
        } else if let Some(v) = a.strip_prefix("--long=") {
            long = v
                .split(',')
                .map(|x| x.trim().parse().expect("--long=N,... takes token counts"))
                .collect();
        } else if let Some(v) = a.strip_prefix("--json=") {
            json_out = Some(v.to_string());
        } else if !a.starts_with('-') {
            names.push(a);
        }
    }
    let wanted: Vec<&assets::Asset> = if names.is_empty() {
        vec![
            &assets::SMOLLM2_135M,
            &assets::QWEN_CODER_0_5B,
            &assets::QWEN_CODER_1_5B,
        ]
    } else {
        names
            .iter()
            .map(|a| assets::find(a).unwrap_or_else(|| panic!("unknown model {a}")))
            .collect()
    };
    let text = assets::jargon_text().expect("the Jargon File text; run scripts/fetch-assets.sh");
    // The peer script's slice: 20,000 characters from a third of the way in.
    let chars: Vec<char> = text.chars().collect();
    let start = chars.len() / 3;
    let text: String = chars[start..(start + 20_000).min(chars.len())]
        .iter()
        .collect();
    // About four characters a token, with room to spare.
    let long_chars = long.iter().max().map_or(0, |&n| 6 * n + 1000);
    let long_text: String = chars[start..(start + long_chars).min(chars.len())]
        .iter()
        .collect();
    let threads = candle_core::utils::get_num_threads();
    let mut models = serde_json::Map::new();
    for asset in wanted {
        let path = match assets::path(asset) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped {}: {e}", asset.name);
                continue;
            }
        };
        let t0 = Instant::now();
        let model = Arc::new(Model::load(&path).unwrap());
        let load_s = t0.elapsed().as_secs_f64();
        let tk = model.tokenizer();
        let ids = tk.encode(&text).unwrap();
        assert!(ids.len() >= PP_TOKENS + 16, "prompt text too short");
        let decode_prompt = tk.encode(DECODE_PROMPT).unwrap();
        let mut dec = Decoder::new(model.clone());

        // Warm-up, untimed: page the weights in, start the thread pool.
        dec.prefill(&ids[..128]).unwrap();
        dec.truncate(0).unwrap();

        let mut dc = Vec::new();
        for _ in 0..reps {
            dec.truncate(0).unwrap();
            let mut next = argmax(dec.prefill(&decode_prompt).unwrap());
            let t = Instant::now();
            for _ in 0..DECODE_TOKENS {
                next = argmax(dec.step(next).unwrap());
            }
            dc.push(DECODE_TOKENS as f64 / t.elapsed().as_secs_f64());
        }

        let mut pp = Vec::new();
        for _ in 0..reps {
            dec.truncate(0).unwrap();
            let t = Instant::now();
            dec.prefill(&ids[..PP_TOKENS]).unwrap();
            pp.push(PP_TOKENS as f64 / t.elapsed().as_secs_f64());
        }

        // Verification: the root and 0, 4 or 8 draft tokens after it, on a
        // cached prefix; sizes interleaved so drift hits all alike.
        dec.truncate(0).unwrap();
        dec.prefill(&ids[..VERIFY_PREFIX - 1]).unwrap();
        let n = dec.len();
        let root = ids[VERIFY_PREFIX - 1];
        let draft = &ids[VERIFY_PREFIX..VERIFY_PREFIX + 8];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); VERIFY_SIZES.len()];
        for rep in 0..=reps * VERIFY_REPS_FACTOR {
            for (s, &size) in VERIFY_SIZES.iter().enumerate() {
                dec.truncate(n).unwrap();
                let t = Instant::now();
                dec.verify(root, &[&draft[..size - 1]]).unwrap();
                if rep > 0 {
                    times[s].push(t.elapsed().as_secs_f64());
                }
            }
        }
        let ms: Vec<f64> = times.iter().map(|t| median(t) * 1e3).collect();

        let long_ids = tk.encode(&long_text).unwrap();
        let mut long_rows = Vec::new();
        for &n in &long {
            assert!(
                long_ids.len() >= n + LONG_DECODE,
                "long prompt text too short for {n}"
            );
            let (mut pp, mut dc) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                dec.truncate(0).unwrap();
                let t = Instant::now();
                let mut next = argmax(dec.prefill(&long_ids[..n]).unwrap());
                pp.push(n as f64 / t.elapsed().as_secs_f64());
                let t = Instant::now();
                for _ in 0..LONG_DECODE {
                    next = argmax(dec.step(next).unwrap());
                }
                dc.push(LONG_DECODE as f64 / t.elapsed().as_secs_f64());
            }
            println!(
                "{}: {n}-token prompt: prefill {:.1} tokens/s, then decode {:.1} tokens/s (medians of {reps})",
                asset.name,
                median(&pp),
                median(&dc)
            );
            long_rows.push(json!({
                "prompt_tokens": n,
                "prefill_tokens_per_s": round2(median(&pp)),
                "decode_tokens_per_s": round2(median(&dc)),
                "decode_tokens": LONG_DECODE,
            }));
        }

        println!(
            "{}: loaded in {load_s:.2} s; {threads} threads; {} kernels",
            asset.name,
            workloads::decoder::kernels::kernel_path()
        );
        println!(
            "{}: prompt processing {PP_TOKENS} tokens: {:.1} tokens/s (median of {reps})",
            asset.name,
            median(&pp)
        );
        println!(
            "{}: decode: {:.1} tokens/s (median of {reps})",
            asset.name,
            median(&dc)
        );
        println!(
            "{}: verify: 1 pos {:.2} ms, 5 pos {:.2} ms ({:.2}x), 9 pos {:.2} ms ({:.2}x)",
            asset.name,
            ms[0],
            ms[1],
            ms[1] / ms[0],
            ms[2],
            ms[2] / ms[0]
        );
        let per_size = |f: &dyn Fn(usize) -> f64| {
            serde_json::Value::Object(
                VERIFY_SIZES
                    .iter()
                    .enumerate()
                    .map(|(s, size)| (size.to_string(), json!(round2(f(s)))))
                    .collect(),
            )
        };
        models.insert(
            asset.name.to_string(),
            json!({
                "model_file": path.file_name().map(|f| f.to_string_lossy().into_owned()),
                "load_s": round2(load_s),
                "decode": {
                    "prompt_tokens": decode_prompt.len(),
                    "tokens": DECODE_TOKENS,
                    "tokens_per_s": round2(median(&dc)),
                    "all_tokens_per_s": dc.iter().map(|&x| round2(x)).collect::<Vec<_>>(),
                },
                "prompt_processing": {
                    "tokens": PP_TOKENS,
                    "tokens_per_s": round2(median(&pp)),
                    "all_tokens_per_s": pp.iter().map(|&x| round2(x)).collect::<Vec<_>>(),
                },
                "long_prompts": long_rows,
                "batched_verify": {
                    "prefix_tokens": VERIFY_PREFIX,
                    "reps": reps * VERIFY_REPS_FACTOR,
                    "median_ms": per_size(&|s| ms[s]),
                    "cost_relative_to_1_token": per_size(&|s| ms[s] / ms[0]),
                },
            }),
        );
    }
    if let Some(path) = json_out {
        let doc = json!({
            "tool": "bench-suite decoder (workloads/benches/decoder.rs)",
            "threads": threads,
            "kernels": workloads::decoder::kernels::kernel_path(),
            "reps": reps,
            "statistic": "median",
            "models": models,
        });
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eprintln!("wrote {path}");
    }
}
