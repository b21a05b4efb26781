"""The README's tables, formatted from records.jsonl (python3 tables.py).

Medians over the trials; a ratio is the median of per-trial ratios (paired
by trial); a missed target counts as infinity ("miss")."""
import collections
import json
import math
import statistics as st
import sys
from pathlib import Path

recs = [json.loads(l) for l in open(Path(__file__).with_name("records.jsonl"))]
by = collections.defaultdict(dict)
for r in recs:
    by[(r["entry"], r["variant"], r["params"])][r["trial"]] = r

SCENES = [("waymo-like", ""), ("nuscenes-like", ""), ("stereo-middlebury", "")] + [
    ("scaling", f"voxels={n}") for n in (10000, 30000, 100000, 300000, 1000000)
]
PEERS = [
    ("padded-linear-attention", "padded-linear"),
    ("padded-window-attention", "padded softmax"),
    ("pytorch-scatter", "PyTorch index_add_"),
    ("authors-triton-kernels", "authors' kernels"),
    ("authors-triton", "authors' path"),
]


def params(scene, backward, bits):
    p = f"backward={backward},bits={bits}"
    return f"{scene[1]},{p}" if scene[1] else p


def t(r):
    return r["time_to_result_s"] if r["status"] == "reached" else math.inf


def ms(x):
    return "miss" if math.isinf(x) else f"{x * 1e3:.4g}"


def table(backward, bits):
    head = ["scene", "voxels", "`sla` (ms)", "`sla` / floor", "`sla` launch_s (ms)"]
    head += [f"{name} / `sla`" for _, name in PEERS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scene in SCENES:
        p = params(scene, backward, bits)
        sla = by.get(("sla", scene[0], p), {})
        if not sla:
            continue
        trials = sorted(sla)
        label = scene[0] if not scene[1] else f"scaling {scene[1].split('=')[1]}"
        vox = " / ".join(f"{int(sla[k]['figures']['voxels']):,}" for k in trials)
        if len({sla[k]["figures"]["voxels"] for k in trials}) == 1:
            vox = f"{int(sla[trials[0]]['figures']['voxels']):,}"
        row = [label, vox, ms(st.median(t(sla[k]) for k in trials))]
        row.append(f"{st.median(sla[k]['figures']['floor_ratio'] for k in trials):.2f}x")
        row.append(ms(st.median(sla[k]["figures"]["launch_s"] for k in trials)))
        for entry, _ in PEERS:
            peer = by.get((entry, scene[0], p), {})
            ratios = [t(peer[k]) / t(sla[k]) for k in trials if k in peer]
            if not ratios:
                row.append("not run")
            else:
                m = st.median(ratios)
                row.append("miss" if math.isinf(m) else f"{m:.2f}x" + ("" if len(ratios) == len(trials) else f" ({len(ratios)} trial)"))
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


for backward, bits in ((0, 32), (0, 16), (1, 32), (1, 16)):
    print(f"\n### {'Forward + backward' if backward else 'Forward'}, {'f32' if bits == 32 else 'bf16'}\n")
    print(table(backward, bits))

# Device time against idle-device time (launch_s), every entry that has it.
print("\n### Device time against the idle-device protocol (`launch_s` / time-to-result, median over configurations)\n")
print("| entry | scenes under 40k voxels | 40k and over |")
print("|---|---|---|")
for entry in ["sla"] + [e for e, _ in PEERS]:
    small, big = [], []
    for (e, v, p), tr in by.items():
        if e != entry:
            continue
        for r in tr.values():
            if r["status"] != "reached" or "launch_s" not in r["figures"]:
                continue
            (small if r["figures"]["voxels"] < 40000 else big).append(r["figures"]["launch_s"] / r["time_to_result_s"])
    f = lambda xs: f"{st.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"
    print(f"| {entry} | {f(small)} | {f(big)} |")
