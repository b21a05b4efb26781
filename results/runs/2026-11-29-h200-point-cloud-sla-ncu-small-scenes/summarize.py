#!/usr/bin/env python3
"""Summarises the SASS-level warp stall samples of ncu.sh's two profiles
(`*-sass.csv.xz`, from `ncu --page source --csv --print-source sass`):
the stall reasons over the whole kernel, the instructions with the most
samples, and the samples per 40 instructions of the kernel's code, with the
memory, tensor-core and barrier instructions each stretch holds."""
import csv, io, lzma, sys
from collections import Counter

for name in sys.argv[1:] or ["s10k", "nusc"]:
    rows = list(csv.reader(io.TextIOWrapper(lzma.open(f"{name}-sass.csv.xz"), encoding="utf-8")))
    heads = [i for i, r in enumerate(rows) if r and r[0] == "Address"]
    hdr = rows[heads[0]]
    end = heads[1] - 1 if len(heads) > 1 else len(rows)  # the first profiled launch
    data = [r for r in rows[heads[0] + 1:end] if len(r) == len(hdr)]
    col = {h: j for j, h in enumerate(hdr)}
    samples = col["Warp Stall Sampling (All Samples)"]
    n = lambda r, c: int(r[c] or 0)
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(n(r, samples) for r in data)
    print(f"## {name}: {len(data)} instructions, {total} samples")
    for s, v in Counter({s: sum(n(r, col[s]) for r in data) for s in stalls}).most_common(8):
        print(f"  {s:24s} {v:6d} {100 * v / total:5.1f}%")
    print("  top instructions (index, samples, SASS, leading reasons):")
    for r in sorted(data, key=lambda r: -n(r, samples))[:12]:
        why = Counter({s: n(r, col[s]) for s in stalls}).most_common(2)
        print(f"  {data.index(r):5d} {n(r, samples):5d}  {r[1].strip()[:56]:56s} {why}")
    print("  per 40 instructions (first index, samples, notable instructions):")
    for b in range(0, len(data), 40):
        seg = data[b:b + 40]
        ops = Counter(
            w for r in seg
            for w in [r[1].split()[1] if r[1].strip().startswith("@") else r[1].split()[0]]
            if w.startswith(("LDG", "STG", "HMMA", "BAR", "LDS", "STS", "LDL", "STL", "UCGA", "MUFU"))
        )
        print(f"  {b:5d} {sum(n(r, samples) for r in seg):5d}  {dict(ops)}")
