"""Tests for scripts/compare_runs.py (no dependencies beyond Python 3).

    python3 scripts/test_compare_runs.py

Builds small runs in a temporary folder and checks the pairing (by variant,
entry, params, trial and seed), the figures and differences it reports, and
its bad-input paths. Ends with `N passed, N failed`; exits 1 on a failure.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).with_name("compare_runs.py")


def record(entry, trial, seed, quality, **figures):
    return {
        "variant": "needle",
        "entry": entry,
        "params": "budget=1" if entry == "dense" else "budget=0.5",
        "trial": trial,
        "seed": seed,
        "quality": quality,
        "figures": figures,
    }


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_pairs_by_trial_and_seed(tmp):
    a = [
        record("dense", 0, 11, 0.0, answer_logp=-0.30, drop_mean=0.0, acc_c1024_d50=1.0, acc_c2048_d50=0.0),
        record("block-topk", 0, 11, 0.04, answer_logp=-0.31, drop_mean=0.01, acc_c1024_d50=1.0, acc_c2048_d50=1.0),
        record("dense", 1, 12, 0.0, answer_logp=-0.20, drop_mean=0.0, acc_c1024_d50=1.0, acc_c2048_d50=1.0),
    ]
    b = [
        record("dense", 0, 11, 0.0, answer_logp=-0.25, drop_mean=0.0, acc_c1024_d50=1.0, acc_c2048_d50=0.0),
        record("block-topk", 0, 11, 0.05, answer_logp=-0.33, drop_mean=0.03, acc_c1024_d50=0.0, acc_c2048_d50=1.0),
        # Another seed: not the same prompts, so not paired.
        record("dense", 1, 99, 0.0, answer_logp=-0.90, drop_mean=0.0, acc_c1024_d50=0.0, acc_c2048_d50=0.0),
    ]
    write_run(tmp / "a", a)
    write_run(tmp / "b", b)
    out = run(tmp / "a", tmp / "b", "--label-a", "gpu", "--label-b", "cpu")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Pairs: 2 trials in both; only in gpu: 1, only in cpu: 1." in text, text
    assert "largest |gpu - cpu| of answer_logp: 0.05" in text, text
    assert "largest |gpu - cpu| of drop_mean: 0.02" in text, text
    assert "exact-match cells differing: 1 of 4" in text, text
    assert "| needle | block-topk | budget=0.5 | 0 | 0.04 | 0.05 |" in text, text


def test_no_shared_trial_is_an_error(tmp):
    write_run(tmp / "a", [record("dense", 0, 1, 0.0, ppl=10.0)])
    write_run(tmp / "b", [record("dense", 0, 2, 0.0, ppl=10.0)])
    out = run(tmp / "a", tmp / "b")
    assert out.returncode != 0 and "share no" in out.stderr, out


def test_missing_and_corrupt_files_are_named(tmp):
    out = run(tmp / "nowhere", tmp / "nowhere")
    assert out.returncode != 0 and "records.jsonl" in out.stderr and "cannot read" in out.stderr, out
    (tmp / "bad").mkdir()
    (tmp / "bad" / "records.jsonl").write_text('{"variant": "needle"\n')
    write_run(tmp / "good", [record("dense", 0, 1, 0.0, ppl=10.0)])
    out = run(tmp / "bad", tmp / "good")
    assert out.returncode != 0 and "line 1 is not JSON" in out.stderr, out


def main():
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    failed = 0
    for t in tests:
        with tempfile.TemporaryDirectory() as d:
            try:
                t(Path(d))
                print(f"ok     {t.__name__}")
            except AssertionError as e:
                failed += 1
                print(f"FAILED {t.__name__}: {e}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
