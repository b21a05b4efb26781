"""The README's tables, formatted from records.jsonl (python3 tables.py).

Medians over the trials; a ratio is the median of per-trial ratios (paired
by trial); a missed target counts as infinity ("miss")."""
import collections
import json
import math
import statistics as st
from pathlib import Path

here = Path(__file__).parent
recs = [json.loads(l) for l in open(here / "records.jsonl")]
by = collections.defaultdict(dict)
for r in recs:
    by[(r["entry"], r["variant"], r["params"])][r["trial"]] = r

SCENES = [("waymo-like", ""), ("nuscenes-like", ""), ("stereo-middlebury", "")] + [
    ("scaling", f"voxels={n}") for n in (10000, 30000, 100000, 300000, 1000000)
]
PEERS = [
    ("padded-linear-attention", "padded-linear"),
    ("authors-triton-kernels", "authors' kernels"),
    ("authors-triton", "authors' path"),
]


def params(scene, backward, bits):
    p = f"backward={backward},bits={bits}"
    return f"{scene[1]},{p}" if scene[1] else p


def label(scene):
    return scene[0] if not scene[1] else f"scaling {scene[1].split('=')[1]}"


def t(r):
    return r["time_to_result_s"] if r["status"] == "reached" else math.inf


def ms(x):
    return "miss" if math.isinf(x) else f"{x * 1e3:.4g}"


def schedule(r):
    f = r["figures"]
    if "forward_voxels_per_warp" not in f:
        return "-"
    return ("c" if f.get("forward_cluster") == 1 else "g") + str(int(f["forward_voxels_per_warp"]))


def table(backward, bits):
    head = ["scene", "voxels", "`sla` (ms)", "`sla` / floor", "schedule (trials)"]
    head += [f"{name} / `sla`" for _, name in PEERS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scene in SCENES:
        p = params(scene, backward, bits)
        sla = by.get(("sla", scene[0], p), {})
        if not sla:
            continue
        trials = sorted(sla)
        vox = " / ".join(f"{int(sla[k]['figures']['voxels']):,}" for k in trials)
        if len({sla[k]["figures"]["voxels"] for k in trials}) == 1:
            vox = f"{int(sla[trials[0]]['figures']['voxels']):,}"
        row = [label(scene), vox, ms(st.median(t(sla[k]) for k in trials))]
        row.append(f"{st.median(sla[k]['figures']['floor_ratio'] for k in trials):.2f}x")
        row.append(" / ".join(schedule(sla[k]) for k in trials))
        for entry, _ in PEERS:
            peer = by.get((entry, scene[0], p), {})
            ratios = [t(peer[k]) / t(sla[k]) for k in trials if k in peer]
            if not ratios:
                row.append("not run")
            else:
                m = st.median(ratios)
                row.append("miss" if math.isinf(m) else f"{m:.2f}x")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


for backward, bits in ((0, 32), (0, 16), (1, 32), (1, 16)):
    print(f"\n### {'Forward + backward' if backward else 'Forward'}, {'f32' if bits == 32 else 'bf16'}\n")
    print(table(backward, bits))
