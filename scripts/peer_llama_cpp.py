"""Measure llama.cpp through llama-cpp-python: the peer numbers for the suite.

Run by scripts/peer-llama-cpp.sh inside its virtualenv; see that script for
what is measured and why. Only `Llama` is used to load a model and tokenize;
every timed call is a raw `llama_decode` on a batch built here, so the numbers
are llama.cpp's, not the Python wrapper's (no sampler chain, no copies of
logits into numpy arrays inside the timed region, except the one argmax that
greedy decoding needs).
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import llama_cpp
from llama_cpp import Llama
from llama_cpp._internals import LlamaBatch

DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
DECODE_TOKENS = 64
PP_TOKENS = 512
# Prefix already in the KV cache when the verification batch is evaluated: a
# prompt of realistic length, as in speculative decoding after a few rounds.
VERIFY_PREFIX = 256
VERIFY_SIZES = (1, 5, 9)
# Single llama_decode calls for verification are a few ms; take more of them.
VERIFY_REPS_FACTOR = 4
N_CTX = 1024
_QUIET_LOG = None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def llama_version_string() -> str | None:
    """What the library says its version is (`llama_version`, where this
    llama-cpp-python binds it). The commit itself comes from the install step,
    which reads it from the git metadata the sdist carries."""
    fn = getattr(llama_cpp, "llama_version", None)
    if fn is None:
        return None
    try:
        v = fn()
    except Exception:  # noqa: BLE001 - optional metadata; a missing symbol is not fatal
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


class Runner:
    """One model, one context; all timings go through `decode`."""

    def __init__(self, path: str, threads: int):
        self.llm = Llama(
            model_path=path,
            n_ctx=N_CTX,
            n_batch=PP_TOKENS,
            n_ubatch=PP_TOKENS,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=0,
            verbose=False,
        )
        self.ctx = self.llm._ctx
        self.n_vocab = self.llm.n_vocab()
        self.batch = LlamaBatch(n_tokens=PP_TOKENS, embd=0, n_seq_max=1, verbose=False)

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=bos, special=False)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx.ctx), True)

    def truncate(self, n_past: int) -> None:
        """Drop every cached position >= n_past (rewind after a trial)."""
        ok = self.ctx.kv_cache_seq_rm(0, n_past, -1)
        if not ok:
            raise RuntimeError(f"llama_memory_seq_rm(0, {n_past}, -1) failed")

    def decode(self, tokens: list[int], n_past: int, logits_all: bool) -> float:
        """One llama_decode of `tokens` at positions n_past..; returns seconds."""
        b = self.batch.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits_all
        b.logits[len(tokens) - 1] = True
        t0 = time.perf_counter()
        self.ctx.decode(self.batch)
        # llama_decode may return before the CPU backend finishes; reading the
        # logits synchronises (llama_get_logits calls llama_synchronize).
        self.ctx.get_logits()
        return time.perf_counter() - t0

    def argmax_last(self) -> int:
        ptr = self.ctx.get_logits_ith(-1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    # -- measurements -------------------------------------------------------

    def greedy(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        """Greedy decode of n tokens after prompt. Returns (seconds in
        llama_decode, seconds including argmax and Python, tokens)."""
        self.clear()
        self.decode(prompt, 0, logits_all=False)
        out: list[int] = []
        tok = self.argmax_last()
        pos = len(prompt)
        in_decode = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            out.append(tok)
            in_decode += self.decode([tok], pos, logits_all=False)
            pos += 1
            tok = self.argmax_last()
        return in_decode, time.perf_counter() - t0, out

    def prompt_processing(self, tokens: list[int]) -> float:
        self.clear()
        return self.decode(tokens, 0, logits_all=False)

    def verify_costs(self, prefix: list[int], cont: list[int], reps: int) -> dict[int, list[float]]:
        """Time one batch of k tokens (logits at every position, as verification
        needs) on top of the cached prefix, rewinding after each trial. Sizes
        are interleaved so drift (thermal, neighbours) hits all alike."""
        self.clear()
        self.decode(prefix, 0, logits_all=False)
        n = len(prefix)
        times: dict[int, list[float]] = {k: [] for k in VERIFY_SIZES}
        for k in VERIFY_SIZES:  # warm-up, untimed
            self.decode(cont[:k], n, logits_all=True)
            self.truncate(n)
        for _ in range(reps):
            for k in VERIFY_SIZES:
                times[k].append(self.decode(cont[:k], n, logits_all=True))
                self.truncate(n)
        return times

    def close(self) -> None:
        self.batch.close()
        self.llm.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_model(name: str, path: str, threads: int, reps: int, text: str) -> dict:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = Runner(path, threads)
    load_s = time.perf_counter() - t0
    try:
        text_tokens = r.tokenize(text)
        if len(text_tokens) < PP_TOKENS + 16:
            raise SystemExit(f"prompt text too short: {len(text_tokens)} tokens < {PP_TOKENS + 16}")
        pp_prompt = text_tokens[:PP_TOKENS]
        decode_prompt = r.tokenize(DECODE_PROMPT)

        # Warm-up: page the weights in and let the thread pool settle.
        r.greedy(decode_prompt, 8)
        r.prompt_processing(pp_prompt[:128])

        dec_eval, dec_wall, sample = [], [], []
        for _ in range(reps):
            e, w, toks = r.greedy(decode_prompt, DECODE_TOKENS)
            dec_eval.append(e)
            dec_wall.append(w)
            if sample and toks != sample:
                # Greedy on the CPU backend should be deterministic; say so if not.
                print(f"[{name}] warning: greedy output differs between repetitions", file=sys.stderr)
            sample = toks

        pp = [r.prompt_processing(pp_prompt) for _ in range(reps)]

        prefix = text_tokens[:VERIFY_PREFIX]
        cont = text_tokens[VERIFY_PREFIX : VERIFY_PREFIX + max(VERIFY_SIZES)]
        vt = r.verify_costs(prefix, cont, reps * VERIFY_REPS_FACTOR)

        t1 = median(vt[1])
        res = {
            "model_file": os.path.basename(path),
            "model_bytes": os.path.getsize(path),
            "n_vocab": r.n_vocab,
            "load_s": round(load_s, 3),
            # Other work on the machine slows llama.cpp's spinning thread pool
            # far more than its share of the CPU; a 1-minute load average
            # well above 0 means these numbers are pessimistic.
            "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "decode": {
                "prompt_tokens": len(decode_prompt),
                "tokens": DECODE_TOKENS,
                "tokens_per_s": round(DECODE_TOKENS / median(dec_eval), 2),
                "tokens_per_s_with_greedy_argmax": round(DECODE_TOKENS / median(dec_wall), 2),
                # Interference only ever adds time, so on a shared machine the
                # best repetition is the better estimate of the uncontended rate.
                "best_tokens_per_s": round(DECODE_TOKENS / min(dec_eval), 2),
                "all_tokens_per_s": [round(DECODE_TOKENS / x, 2) for x in dec_eval],
                "sample_text": r.llm.detokenize(sample).decode("utf-8", "replace"),
            },
            "prompt_processing": {
                "tokens": PP_TOKENS,
                "tokens_per_s": round(PP_TOKENS / median(pp), 2),
                "best_tokens_per_s": round(PP_TOKENS / min(pp), 2),
                "all_tokens_per_s": [round(PP_TOKENS / x, 2) for x in pp],
            },
            "batched_verify": {
                "prefix_tokens": VERIFY_PREFIX,
                "logits_at_every_position": True,
                "reps": reps * VERIFY_REPS_FACTOR,
                "median_ms": {str(k): round(1e3 * median(v), 3) for k, v in vt.items()},
                "cost_relative_to_1_token": {str(k): round(median(v) / t1, 3) for k, v in vt.items()},
                "min_ms": {str(k): round(1e3 * min(v), 3) for k, v in vt.items()},
                "cost_relative_to_1_token_from_min": {
                    str(k): round(min(v) / min(vt[1]), 3) for k, v in vt.items()
                },
            },
        }
        print(
            f"[{name}] decode {res['decode']['tokens_per_s']} tok/s "
            f"(best {res['decode']['best_tokens_per_s']}), "
            f"pp{PP_TOKENS} {res['prompt_processing']['tokens_per_s']} tok/s "
            f"(best {res['prompt_processing']['best_tokens_per_s']}), "
            f"verify x{res['batched_verify']['cost_relative_to_1_token']}",
            file=sys.stderr,
        )
        return res
    finally:
        r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--text", required=True, help="gzip'd English text for the long prompts")
    ap.add_argument("--install-info", help="JSON written by the install step, copied into the output")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    args = ap.parse_args()

    # Silence llama.cpp's per-load logging (verbose=False only covers part).
    # The callback must outlive every call into the library, hence the global.
    global _QUIET_LOG
    _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))

    # Skip the Jargon File's front matter; any plain English prose will do.
    text = gzip.open(args.text, "rt", encoding="utf-8", errors="replace").read()
    text = text[len(text) // 3 : len(text) // 3 + 20000]

    install = None
    if args.install_info and os.path.exists(args.install_info):
        install = json.load(open(args.install_info))

    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"warning: 1-minute load average is {busy:.2f} before starting; "
              "other work on this machine will depress the numbers", file=sys.stderr)

    models = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path or not os.path.isfile(path):
            raise SystemExit(f"--model {spec!r}: expected NAME=PATH to an existing GGUF file")
        models[name] = bench_model(name, path, args.threads, args.reps, text)

    record = {
        "tool": "llama-cpp-python",
        "llama_cpp_python_version": llama_cpp.__version__,
        # Read from the sdist's git metadata at install time (None for a wheel).
        "llama_cpp_commit": (install or {}).get("llama_cpp_commit"),
        "llama_cpp_version_string": llama_version_string(),
        "install": install,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "threads": args.threads,
        "reps": args.reps,
        "statistic": "median over reps after one untimed warm-up; best_* and *_from_min: best repetition",
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "host": platform.node(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": models,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
