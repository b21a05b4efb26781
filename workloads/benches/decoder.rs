//! Decoder throughput on the real GGUF models, measured the way the
//! llama.cpp peer numbers in ASSETS.md were: prompt processing of one
//! 512-token prompt, greedy decode after a short prompt, and the cost of a
//! batched verification of 5 and 9 positions relative to one step.
//!
//! `cargo bench -p workloads --bench decoder [-- MODEL...]` with MODEL one of
//! `smollm2-135m`, `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b` (default: the
//! first two). Threads: `CANDLE_NUM_THREADS` (default: physical cores).
//! Prints one line per measurement; models not fetched are skipped.

use std::sync::Arc;
use std::time::Instant;

use workloads::assets;
use workloads::decoder::{Decoder, Model};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
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

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted: Vec<&assets::Asset> = if args.is_empty() {
        vec![&assets::SMOLLM2_135M, &assets::QWEN_CODER_0_5B]
    } else {
        args.iter()
            .map(|a| assets::find(a).unwrap_or_else(|| panic!("unknown model {a}")))
            .collect()
    };
    let text = assets::jargon_text()
        .unwrap_or_else(|_| "The quick brown fox jumps over the lazy dog. ".repeat(400));
    let reps = 3;
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
        println!(
            "{}: loaded in {:.2} s",
            asset.name,
            t0.elapsed().as_secs_f64()
        );
        let tk = model.tokenizer();
        let mut cut = 40_000.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let ids = tk.encode(&text[..cut]).unwrap();
        let prompt512 = &ids[..512];
        let mut dec = Decoder::new(model.clone());

        // Prompt processing: 512 tokens in one call.
        let mut pp = Vec::new();
        for _ in 0..reps {
            dec.truncate(0).unwrap();
            let t = Instant::now();
            dec.prefill(prompt512).unwrap();
            pp.push(512.0 / t.elapsed().as_secs_f64());
        }
        println!(
            "{}: prompt processing 512 tokens: {:.1} tokens/s (median of {reps})",
            asset.name,
            median(pp)
        );

        // Decode: 64 greedy tokens after a 16-token prompt.
        let mut dc = Vec::new();
        for _ in 0..reps {
            dec.truncate(0).unwrap();
            let mut next = argmax(dec.prefill(&ids[..16]).unwrap());
            let n = 64;
            let t = Instant::now();
            for _ in 0..n {
                next = argmax(dec.step(next).unwrap());
            }
            dc.push(n as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "{}: decode: {:.1} tokens/s (median of {reps})",
            asset.name,
            median(dc)
        );

        // Verification cost: 1 position (a step) vs 5 and 9 (one draft of
        // 4 or 8 tokens after the root), on a 128-token cached prefix.
        dec.truncate(0).unwrap();
        let root = argmax(dec.prefill(&ids[..128]).unwrap());
        let n = dec.len();
        let draft: Vec<u32> = ids[128..136].to_vec();
        let time = |dec: &mut Decoder, l: Option<usize>| {
            let mut v = Vec::new();
            for _ in 0..9 {
                dec.truncate(n).unwrap();
                let t = Instant::now();
                match l {
                    None => {
                        dec.step(root).unwrap();
                    }
                    Some(l) => {
                        dec.verify(root, &[&draft[..l]]).unwrap();
                    }
                }
                v.push(t.elapsed().as_secs_f64());
            }
            median(v)
        };
        let one = time(&mut dec, None);
        let five = time(&mut dec, Some(4));
        let nine = time(&mut dec, Some(8));
        println!(
            "{}: verify: 1 pos {:.2} ms, 5 pos {:.2} ms ({:.2}x), 9 pos {:.2} ms ({:.2}x)",
            asset.name,
            one * 1e3,
            five * 1e3,
            five / one,
            nine * 1e3,
            nine / one
        );
    }
}
