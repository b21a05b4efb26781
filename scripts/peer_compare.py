"""Set our decoder's figures beside llama.cpp's, from one side-by-side run.

Reads the round files that scripts/peer-llama-cpp.sh writes into its output
directory (llama-cpp-round*.json from scripts/peer_llama_cpp.py, ours-round*.json
from workloads/benches/decoder.rs), pools the repetitions of every round, and
writes comparison.json and comparison.md: per model, decode and prompt-processing
tokens/s (median over all repetitions of all rounds), our share of llama.cpp's
figure, whether it meets the goal of two thirds, and the cost of a batched
verification call of 5 and 9 positions relative to one (median of the round
medians). Plain Python 3, no third-party packages.

Usage: python3 scripts/peer_compare.py DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

GOAL = 2 / 3


def load_rounds(d: Path, prefix: str) -> list[dict]:
    files = sorted(d.glob(f"{prefix}-round*.json"))
    if not files:
        raise SystemExit(f"peer_compare: no {prefix}-round*.json in {d}; run scripts/peer-llama-cpp.sh first")
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise SystemExit(f"peer_compare: {f} is not valid JSON ({e}); rerun scripts/peer-llama-cpp.sh")
    return out


def pooled(rounds: list[dict], model: str, section: str) -> float | None:
    xs = [x for r in rounds if model in r["models"] for x in r["models"][model][section]["all_tokens_per_s"]]
    return statistics.median(xs) if xs else None


def verify_cost(rounds: list[dict], model: str, size: str) -> float | None:
    xs = [r["models"][model]["batched_verify"]["cost_relative_to_1_token"][size] for r in rounds if model in r["models"]]
    return statistics.median(xs) if xs else None


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    d = Path(sys.argv[1])
    peer, ours = load_rounds(d, "llama-cpp"), load_rounds(d, "ours")
    models = [m for m in peer[0]["models"] if any(m in r["models"] for r in ours)]
    rows = []
    for m in models:
        row = {"model": m}
        for section, key in (("decode", "decode"), ("prompt_processing", "pp512")):
            a, b = pooled(ours, m, section), pooled(peer, m, section)
            row[f"{key}_ours"], row[f"{key}_llama_cpp"] = a, b
            row[f"{key}_ratio"] = round(a / b, 3) if a and b else None
            row[f"{key}_goal_met"] = bool(a and b and a / b >= GOAL)
        for size in ("5", "9"):
            row[f"verify{size}_ours"] = verify_cost(ours, m, size)
            row[f"verify{size}_llama_cpp"] = verify_cost(peer, m, size)
        rows.append(row)
    meta = {
        "rounds": len(peer),
        "llama_cpp_python_version": peer[0].get("llama_cpp_python_version"),
        "llama_cpp_commit": peer[0].get("llama_cpp_commit"),
        "threads": {"llama_cpp": peer[0].get("threads"), "ours": ours[0].get("threads")},
        "reps_per_round": {"llama_cpp": peer[0].get("reps"), "ours": ours[0].get("reps")},
        "cpu_model": peer[0].get("cpu_model"),
        "goal": "ours >= 2/3 of llama.cpp (issue 3)",
    }
    (d / "comparison.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=2) + "\n")

    def f(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [
        "| model | decode tok/s: ours | llama.cpp | ratio | pp512 tok/s: ours | llama.cpp | ratio "
        "| verify 5 / 1: ours | llama.cpp | verify 9 / 1: ours | llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = lambda k: f"{f(r[k + '_ratio'], 2)}{'' if r[k + '_goal_met'] else ' (below 2/3)'}"
        lines.append(
            f"| {r['model']} | {f(r['decode_ours'])} | {f(r['decode_llama_cpp'])} | {mark('decode')} "
            f"| {f(r['pp512_ours'])} | {f(r['pp512_llama_cpp'])} | {mark('pp512')} "
            f"| {f(r['verify5_ours'], 2)}x | {f(r['verify5_llama_cpp'], 2)}x "
            f"| {f(r['verify9_ours'], 2)}x | {f(r['verify9_llama_cpp'], 2)}x |"
        )
    lines += [
        "",
        f"{meta['rounds']} rounds, llama.cpp then ours in each; tokens/s are medians over every "
        f"repetition of every round, verification costs medians of the round medians. "
        f"Threads: llama.cpp {meta['threads']['llama_cpp']}, ours {meta['threads']['ours']}. "
        f"llama-cpp-python {meta['llama_cpp_python_version']} (llama.cpp {meta['llama_cpp_commit']}).",
    ]
    (d / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
