"""The tables of a `long-context` decode-step run's README, formatted from
its records.jsonl: `python3 scripts/decode_step_tables.py RUN_DIR`.

Per cell: the median over the trials of ms per step, and in brackets the
median of the trials' time over the step's own floor (`floor_ratio`: the
bytes the step must read divided by the copy bandwidth measured in the
run). Below the table: dense / method, the median of per-trial ratios."""
import collections
import json
import statistics as st
import sys
from pathlib import Path

if len(sys.argv) != 2:
    sys.exit("usage: python3 scripts/decode_step_tables.py RUN_DIR (a decode-step run with records.jsonl)")
here = Path(sys.argv[1])
if not (here / "records.jsonl").is_file():
    sys.exit(f"{here}: no records.jsonl here; give a decode-step run directory")
by = collections.defaultdict(dict)
for line in open(here / "records.jsonl"):
    r = json.loads(line)
    by[(r["entry"], r["params"])][r["trial"]] = r

CONTEXTS = [4096, 16384, 65536, 131072, 524288]
COLUMNS = [
    ("dense", 1, "dense"),
    ("sink-window", 0.1, "sink-window 10%"),
    ("kv-cluster", 0.1, "kv-cluster 10%"),
    ("block-topk", 0.1, "block-topk 10%"),
    ("sdpa-gqa", 1, "cuDNN SDPA (GQA)"),
    ("hf-repeat-kv", 1, "HF repeat-KV"),
    ("quest-torch", 0.1, "Quest from torch ops 10%"),
]


def cell(entry, ctx, budget):
    return by.get((entry, f"context={ctx},budget={budget}"), {})


def label(ctx):
    return f"{ctx // 1024}k"


print("| context | " + " | ".join(c[2] for c in COLUMNS) + " |")
print("|---|" + "---|" * len(COLUMNS))
for ctx in CONTEXTS:
    row = [label(ctx)]
    for entry, budget, _ in COLUMNS:
        c = cell(entry, ctx, budget)
        if not c:
            row.append("not run")
            continue
        t = st.median(r["time_to_result_s"] for r in c.values()) * 1e3
        f = st.median(r["figures"]["floor_ratio"] for r in c.values())
        row.append(f"{t:.3g} ({f:.2f}x)")
    print("| " + " | ".join(row) + " |")

print("\ndense / method, per-trial ratios' median:\n")
print("| context | " + " | ".join(f"{e} {int(b * 100)}%" for e in ("sink-window", "kv-cluster", "block-topk", "quest-torch") for b in (0.1, 0.25, 0.5)) + " |")
print("|---|" + "---|" * 12)
for ctx in CONTEXTS:
    d = cell("dense", ctx, 1)
    row = [label(ctx)]
    for e in ("sink-window", "kv-cluster", "block-topk", "quest-torch"):
        for b in (0.1, 0.25, 0.5):
            c = cell(e, ctx, b)
            ratios = [d[k]["time_to_result_s"] / c[k]["time_to_result_s"] for k in c if k in d]
            row.append(f"{st.median(ratios):.2f}x")
    print("| " + " | ".join(row) + " |")
