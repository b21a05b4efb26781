#!/usr/bin/env python3
"""Pairs the trials of two runs of one workload variant (the same entry,
params, trial and seed, so the same prompts) and prints, as Markdown, each
pair's quality figures side by side: a check that two devices or builds
compute the same thing, and what each costs.

    scripts/compare_runs.py A_DIR B_DIR [--label-a gpu --label-b cpu]

Reads only each run's records.jsonl. Trials present in one run only are
listed, not compared. Exits non-zero, naming the problem, on a missing or
unreadable records file, or when the two runs share no trial.
"""
import argparse
import json
import math
import sys
from pathlib import Path

# Figures compared per trial, where a record has them.
FIGURES = ["accuracy", "answer_logp", "drop_mean", "ppl", "prefill_s", "decode_tokens_per_s"]


def load(run_dir):
    path = Path(run_dir) / "records.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        sys.exit(f"compare_runs: cannot read {path} ({e}); pass a run directory holding records.jsonl")
    out = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"compare_runs: {path} line {n} is not JSON ({e}); is the file a bench-suite records file?")
        key = (r["variant"], r["entry"], r["params"], r["trial"], r["seed"])
        out[key] = r
    return out


def cells(r):
    """The per-cell exact-match string of a needle record (grid order)."""
    f = r["figures"]
    keys = sorted(k for k in f if k.startswith("acc_c"))
    return "".join(str(int(f[k])) for k in keys)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    args = p.parse_args()
    a, b = load(args.a), load(args.b)
    shared = sorted(set(a) & set(b))
    if not shared:
        sys.exit("compare_runs: the two runs share no (variant, entry, params, trial, seed); were they run with the same --seed and --profile?")
    la, lb = args.label_a, args.label_b
    print(f"Pairs: {len(shared)} trials in both; only in {la}: {len(set(a) - set(b))}, only in {lb}: {len(set(b) - set(a))}.\n")
    figs = [f for f in FIGURES if any(f in a[k]["figures"] for k in shared)]
    head = ["variant", "entry", "params", "trial", f"quality {la}", f"quality {lb}"]
    for f in figs:
        head += [f"{f} {la}", f"{f} {lb}"]
    needle = any(cells(a[k]) for k in shared)
    if needle:
        head += [f"cells {la}", f"cells {lb}", "cells differing"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    worst = {}
    flips = total = 0
    for k in shared:
        ra, rb = a[k], b[k]
        row = [k[0], k[1], k[2], str(k[3]), f"{ra['quality']:.4g}", f"{rb['quality']:.4g}"]
        for f in figs:
            xa, xb = ra["figures"].get(f, math.nan), rb["figures"].get(f, math.nan)
            row += [f"{xa:.4g}", f"{xb:.4g}"]
            if f in ("answer_logp", "drop_mean"):
                worst[f] = max(worst.get(f, 0.0), abs(xa - xb))
            if f == "ppl":
                worst["ppl (relative)"] = max(worst.get("ppl (relative)", 0.0), abs(xa / xb - 1))
        if needle:
            ca, cb = cells(ra), cells(rb)
            d = sum(x != y for x, y in zip(ca, cb))
            flips += d
            total += len(ca)
            row += [ca, cb, str(d)]
        print("| " + " | ".join(row) + " |")
    print()
    for f, w in worst.items():
        print(f"- largest |{la} - {lb}| of {f}: {w:.4g}")
    if needle:
        print(f"- exact-match cells differing: {flips} of {total}")


if __name__ == "__main__":
    main()
