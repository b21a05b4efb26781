"""Tests for scripts/peer_sla.py and scripts/fetch-scatterformer.sh.

    python3 scripts/test_peer_sla.py        (needs numpy and torch; skips without torch)

Runs the peer script end to end on small random scenes on the CPU and checks
its outputs against a float64 reference written here independently: the
naive per-window O(n^2) linear attention with hand-derived gradients, which
never forms KV or s, so it shares no formulation with the peers. Also checks
the loader of the authors' kernels (ScatterFormer, arXiv 2401.00912) on the
fetched file, the refusal of an altered file by both the loader and the fetch
script, and the CLI's bad-input paths. Where Triton is installed, the
authors' kernels also run on the CPU under Triton's interpreter
(TRITON_INTERPRET=1) and are held to the same reference.

Ends with the line `N passed, N failed, N skipped`; exits 1 on any failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
PEER = SCRIPTS / "peer_sla.py"
FETCH = SCRIPTS / "fetch-scatterformer.sh"
MIRROR = Path("/work/.mirror/skyhehe123+ScatterFormer/repo")

try:
    import numpy as np
    import torch  # the peer needs it; without it there is nothing to test
except ImportError as e:
    print(f"SKIP: {e.name} is not installed; run this in an environment with torch and numpy")
    print("0 passed, 0 failed, 1 skipped")
    sys.exit(0)

sys.path.insert(0, str(SCRIPTS))
import peer_sla  # after the path insert: it lives beside this file

try:
    import triton
except ImportError:
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

EPS = 1e-6
# fp32 computations of sums of at most ~100 terms of O(1) products against a
# float64 reference: rounding errors are a few 1e-7 relative to the largest
# entry; 1e-5 leaves a margin of ~30x while a wrong formula (a missing
# ReLU, a wrong window, a dropped eps) is off by 1e-2 or far more.
TOL_F32 = 1e-5
# bf16 runs: inputs are rounded to bf16 in the reference too, so what is
# left is the rounding of the outputs and of the grads at the bf16 leaves,
# a few units of 2^-9 ~ 2e-3.
TOL_BF16 = 1e-2
# Window sizes: single voxels, an empty window, sizes on both sides of the
# authors' 32-voxel tile.
COUNTS = [1, 5, 40, 1, 33, 0, 70, 2, 1, 17, 32, 1]


class Skip(Exception):
    pass


# ---------------------------------------------------------------------------
# Scenes and the reference


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), back in float32."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def write_scene(
    path: Path, seed: int, heads: int = 2, dim: int = 16, dtype: str = "f32", counts=COUNTS
) -> dict:
    """Writes a scene in the harness's format and returns its arrays."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts, dtype=np.uint32)
    offsets = (np.cumsum(counts) - counts).astype(np.uint32)
    n = int(counts.sum())
    win = np.repeat(np.arange(len(counts), dtype=np.uint32), counts)
    arrays = {
        name: rng.standard_normal((n, heads, dim)).astype(np.float32) for name in ("q", "k", "v", "dout")
    }
    path.mkdir(parents=True, exist_ok=True)
    meta = {"n": n, "heads": heads, "dim": dim, "windows": len(counts), "dtype": dtype}
    (path / "meta.json").write_text(json.dumps(meta))
    for name, arr in (("offsets", offsets), ("counts", counts), ("win", win)):
        arr.astype("<u4").tofile(path / f"{name}.bin")
    for name, arr in arrays.items():
        arr.astype("<f4").tofile(path / f"{name}.bin")
    return dict(arrays, offsets=offsets, counts=counts, meta=meta)


def reference(scene: dict, round_bf16: bool = False) -> dict:
    """float64 SLA and its gradients, window by window through the n x n
    attention matrix A_ij = phi(q_i).phi(k_j):
        out_i = sum_j A_ij v_j / (sum_j A_ij + eps)
    Backward of sum(out * dout), derived by hand:
        dnum_i = g_i / den_i,  dden_i = -(g_i . out_i) / den_i
        dA_ij = dnum_i . v_j + dden_i
        dv_j = sum_i A_ij dnum_i
        dphi(q_i) = sum_j dA_ij phi(k_j),  dphi(k_j) = sum_i dA_ij phi(q_i)
    and ReLU passes the gradient where its input is positive."""
    q, k, v, g = (
        (bf16_round(scene[name]) if round_bf16 else scene[name]).astype(np.float64)
        for name in ("q", "k", "v", "dout")
    )
    res = {name: np.zeros_like(q) for name in ("out", "dq", "dk", "dv")}
    for off, cnt in zip(scene["offsets"], scene["counts"]):
        if cnt == 0:
            continue
        sl = slice(int(off), int(off + cnt))
        pq, pk, vv, gg = np.maximum(q[sl], 0), np.maximum(k[sl], 0), v[sl], g[sl]
        a = np.einsum("ihd,jhd->hij", pq, pk)
        den = a.sum(-1).T[:, :, None] + EPS
        out = np.einsum("hij,jhe->ihe", a, vv) / den
        dnum = gg / den
        dden = -(gg * out).sum(-1, keepdims=True) / den
        da = np.einsum("ihe,jhe->hij", dnum, vv) + dden[:, :, 0].T[:, :, None]
        res["out"][sl] = out
        res["dv"][sl] = np.einsum("hij,ihe->jhe", a, dnum)
        res["dq"][sl] = np.einsum("hij,jhd->ihd", da, pk) * (q[sl] > 0)
        res["dk"][sl] = np.einsum("hij,ihd->jhd", da, pq) * (k[sl] > 0)
    return res


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def run_peer(
    scene_dir: Path, out_dir: Path, impl: str, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PEER), "--scene", str(scene_dir), "--impl", impl, "--out", str(out_dir)]
    cmd += ["--device", "cpu", "--repeats", "3", "--warmup", "1", *extra]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)


def check_against_reference(scene: dict, out_dir: Path, ref: dict, tol: float, impl: str) -> None:
    res = json.loads((out_dir / "result.json").read_text())
    assert res["status"] == "ok", res
    assert res["impl"] == impl and res["dtype"] == scene["meta"]["dtype"], res
    assert len(res["fwd_ms"]) == 3 and len(res["fwdbwd_ms"]) == 3, res
    assert all(x > 0 for x in res["fwd_ms"] + res["fwdbwd_ms"]), res
    assert len(res["fwd_launch_ms"]) == 3 and len(res["fwdbwd_launch_ms"]) == 3, res
    assert res["torch"] and res["device"].startswith("cpu"), res
    shape = ref["out"].shape
    for name in ("out", "dq", "dk", "dv"):
        got = np.fromfile(out_dir / f"{name}.bin", dtype="<f4")
        assert got.size == ref[name].size, f"{name}.bin: {got.size} values, expected {ref[name].size}"
        err = rel_err(got.reshape(shape).astype(np.float64), ref[name])
        assert err < tol, f"{impl} {name}: relative error {err:.3g} >= {tol}"
        print(f"    {impl} {scene['meta']['dtype']} {name}: relative error {err:.2e}")


def expect_failure(proc: subprocess.CompletedProcess, out_dir: Path, pattern: str) -> None:
    assert proc.returncode != 0, f"expected a failure, got exit 0; stderr: {proc.stderr}"
    assert re.search(pattern, proc.stderr), f"stderr does not match {pattern!r}: {proc.stderr}"
    assert not (out_dir / "result.json").exists(), "a failed run left a result.json"


def authors_file() -> Path:
    path = peer_sla.default_authors_src()
    if not path.exists():
        raise Skip(f"{path} missing: run scripts/fetch-scatterformer.sh first")
    return path


# ---------------------------------------------------------------------------
# Tests


def test_reference_matches_autograd(tmp: Path) -> None:
    """The hand-derived reference gradients agree with float64 autograd on a
    plain per-window formula, so the reference itself is not the weak link."""
    scene = write_scene(tmp / "s", seed=1)
    ref = reference(scene)
    t = {
        name: torch.tensor(scene[name], dtype=torch.float64, requires_grad=name != "dout")
        for name in ("q", "k", "v", "dout")
    }
    outs = []
    for off, cnt in zip(scene["offsets"], scene["counts"]):
        sl = slice(int(off), int(off + cnt))
        pq, pk = torch.relu(t["q"][sl]), torch.relu(t["k"][sl])
        a = torch.einsum("ihd,jhd->hij", pq, pk)
        outs.append(torch.einsum("hij,jhe->ihe", a, t["v"][sl]) / (a.sum(-1).T[:, :, None] + EPS))
    out = torch.cat(outs)
    out.backward(t["dout"])
    for name, got in (("out", out), ("dq", t["q"].grad), ("dk", t["k"].grad), ("dv", t["v"].grad)):
        err = rel_err(got.detach().numpy(), ref[name])
        assert err < 1e-12, f"reference {name} vs autograd: {err}"


def test_pytorch_scatter_f32(tmp: Path) -> None:
    scene = write_scene(tmp / "scene", seed=2)
    proc = run_peer(tmp / "scene", tmp / "out", "pytorch-scatter")
    assert proc.returncode == 0, proc.stderr
    check_against_reference(scene, tmp / "out", reference(scene), TOL_F32, "pytorch-scatter")
    res = json.loads((tmp / "out" / "result.json").read_text())
    assert res["peak_bytes_fwd"] is None and res["extra"] == [], res


def test_pytorch_scatter_bf16(tmp: Path) -> None:
    scene = write_scene(tmp / "scene", seed=3, heads=3, dim=8, dtype="bf16")
    proc = run_peer(tmp / "scene", tmp / "out", "pytorch-scatter")
    assert proc.returncode == 0, proc.stderr
    check_against_reference(
        scene, tmp / "out", reference(scene, round_bf16=True), TOL_BF16, "pytorch-scatter"
    )


def test_pytorch_scatter_catches_wrong_window(tmp: Path) -> None:
    """The tolerance is meaningful: moving one voxel to the next window in
    the reference's view (not the peer's) breaks the comparison."""
    scene = write_scene(tmp / "scene", seed=4)
    proc = run_peer(tmp / "scene", tmp / "out", "pytorch-scatter")
    assert proc.returncode == 0, proc.stderr
    wrong = dict(scene, counts=scene["counts"].copy(), offsets=scene["offsets"].copy())
    wrong["counts"][2] -= 1
    wrong["counts"][3] += 1
    wrong["offsets"][3] -= 1
    try:
        check_against_reference(scene, tmp / "out", reference(wrong), TOL_F32, "pytorch-scatter")
    except AssertionError:
        return
    raise AssertionError("a reference with one voxel in the wrong window still passed")


def test_authors_loader_finds_definitions(tmp: Path) -> None:
    path = authors_file()
    module, found = peer_sla.select_authors_definitions(path.read_text(), str(path))
    for name in peer_sla.AUTHORS_REQUIRED + ("BLOCK_SIZE", "scatter_matmul_kv", "scatter_matmul_qc"):
        assert name in found, f"{name} not selected from {path}"
    # Nothing from the spconv / pcdet half of their module comes along.
    assert "SparseDwConv" not in found and "ScatterAttention" not in found, found
    provided = {"torch", "triton", "tl", "F", "nn"}
    assert peer_sla.unresolved_names(module, provided) == [], peer_sla.unresolved_names(module, provided)
    if not HAVE_TRITON:
        raise Skip("triton not installed: definitions found, not executed")
    ops = peer_sla.load_authors_ops(path)
    for name in peer_sla.AUTHORS_KERNELS:
        assert isinstance(ops[name], triton.runtime.jit.JITFunction), (name, type(ops[name]))
    for name in peer_sla.AUTHORS_FUNCTIONS:
        assert issubclass(ops[name], torch.autograd.Function), name
    assert ops["BLOCK_SIZE"] == 32, ops["BLOCK_SIZE"]


def test_authors_loader_reports_missing_definition(tmp: Path) -> None:
    source = authors_file().read_text()
    cut = source.replace("def _scatter_qc_bwd_kernel(", "def _renamed_kernel(")
    assert cut != source
    try:
        peer_sla.select_authors_definitions(cut, "cut.py")
    except peer_sla.PeerError as e:
        assert "_scatter_qc_bwd_kernel" in str(e), e
        return
    raise AssertionError("a file without _scatter_qc_bwd_kernel was accepted")


def test_altered_authors_file_refused(tmp: Path) -> None:
    """A one-byte change is refused by the loader, by the CLI before anything
    runs, and by the fetch script, which then installs nothing."""
    genuine = authors_file()
    altered = tmp / "scatterformer_utils.py"
    altered.write_bytes(genuine.read_bytes().replace(b"BLOCK_SIZE=32", b"BLOCK_SIZE=16"))
    try:
        peer_sla.check_authors_file(altered)
    except peer_sla.PeerError as e:
        assert "sha256" in str(e) and "fetch-scatterformer.sh" in str(e), e
    else:
        raise AssertionError("the loader accepted an altered file")

    write_scene(tmp / "scene", seed=5)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = run_peer(tmp / "scene", tmp / "out", "authors-triton", "--authors-src", str(altered), env=env)
    expect_failure(proc, tmp / "out", r"sha256 .* is not the pinned")

    assets = tmp / "assets"
    env = dict(os.environ, BENCH_SUITE_ASSETS=str(assets), SCATTERFORMER_SRC=str(altered))
    proc = subprocess.run(
        ["bash", str(FETCH)], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0, proc
    assert "sha256 mismatch" in proc.stderr, proc.stderr
    assert list((assets / "scatterformer").iterdir()) == [], "the fetch script left a file behind"


def test_fetch_script(tmp: Path) -> None:
    """Pins agree; a genuine copy installs (then is cached); the local git
    mirror path works where the mirror exists."""
    pinned = re.search(r"^sha256=([0-9a-f]{64})$", FETCH.read_text(), re.MULTILINE)
    assert pinned and pinned.group(1) == peer_sla.PINNED_SHA256, (
        "fetch script and peer_sla.py pin different sha256"
    )
    commit = re.search(r"^commit=([0-9a-f]{40})$", FETCH.read_text(), re.MULTILINE)
    assert commit and commit.group(1) == peer_sla.AUTHORS_COMMIT
    genuine = authors_file()
    assets = tmp / "assets"
    env = dict(os.environ, BENCH_SUITE_ASSETS=str(assets), SCATTERFORMER_SRC=str(genuine))
    for expect in ("fetched", "cached"):
        proc = subprocess.run(
            ["bash", str(FETCH)], check=False, capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 0 and proc.stdout.startswith(expect), proc
    dest = assets / "scatterformer" / "scatterformer_utils.py"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == peer_sla.PINNED_SHA256
    if not MIRROR.exists():
        raise Skip(f"{MIRROR} not here: the SCATTERFORMER_GIT path was not exercised")
    dest.unlink()
    env = dict(os.environ, BENCH_SUITE_ASSETS=str(assets), SCATTERFORMER_GIT=str(MIRROR))
    proc = subprocess.run(
        ["bash", str(FETCH)], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("fetched"), proc
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == peer_sla.PINNED_SHA256


def test_authors_triton_interpreted(tmp: Path) -> None:
    """The authors' kernels, run by Triton's CPU interpreter, through the
    whole peer path (loader, SLALayer composition, autograd, outputs)."""
    if not HAVE_TRITON:
        raise Skip("triton not installed")
    path = authors_file()
    scene = write_scene(tmp / "scene", seed=6)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = run_peer(tmp / "scene", tmp / "out", "authors-triton", "--authors-src", str(path), env=env)
    if proc.returncode != 0 and "only 0-dimensional arrays can be converted" in proc.stderr:
        # Triton's interpreter calls int() on a one-element array for the
        # loop bound the kernels load (`count`); NumPy 2.4 made that an error.
        raise Skip(
            f"Triton {triton.__version__}'s interpreter cannot run on NumPy {np.__version__}; use numpy<2.4"
        )
    assert proc.returncode == 0, proc.stderr
    check_against_reference(scene, tmp / "out", reference(scene), TOL_F32, "authors-triton")
    res = json.loads((tmp / "out" / "result.json").read_text())
    assert [e["impl"] for e in res["extra"]] == ["authors-triton-kernels"], res["extra"]
    assert len(res["extra"][0]["fwd_ms"]) == 3 and len(res["extra"][0]["fwdbwd_ms"]) == 3


def test_authors_triton_unsupported_dim(tmp: Path) -> None:
    """Head dim 8 is below tl.dot's 16: recorded as unsupported, not a crash."""
    if not HAVE_TRITON:
        raise Skip("triton not installed")
    write_scene(tmp / "scene", seed=7, dim=8)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = run_peer(
        tmp / "scene", tmp / "out", "authors-triton", "--authors-src", str(authors_file()), env=env
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp / "out" / "result.json").read_text())
    assert res["status"] == "unsupported" and "power of two >= 16" in res["note"], res
    assert res["fwd_ms"] == [] and not (tmp / "out" / "out.bin").exists()


def test_timer_protocols_on_cuda(tmp: Path) -> None:
    """The device protocol keeps the host's time out of a sample and the
    launch protocol keeps it in: a call that sleeps 0.5 ms on the host
    before one tiny kernel. (Only where torch sees a CUDA device.)"""
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    timer = peer_sla.Timer("cuda")
    x = torch.zeros(1024, device="cuda")

    def call() -> None:
        time.sleep(5e-4)
        x.add_(1.0)

    device = sorted(timer.samples_ms(call, 1, 9, "device"))[4]
    launch = sorted(timer.samples_ms(call, 0, 9, "launch"))[4]
    assert launch >= 0.5 and device < 0.1, (device, launch)


def test_bad_input(tmp: Path) -> None:
    write_scene(tmp / "good", seed=8)

    def broken(name: str, change) -> Path:
        path = tmp / name
        shutil.copytree(tmp / "good", path)
        change(path)
        return path

    cases = [
        (broken("no_k", lambda p: (p / "k.bin").unlink()), r"k\.bin: not found"),
        (
            broken("short_v", lambda p: (p / "v.bin").write_bytes((p / "v.bin").read_bytes()[:-4])),
            r"v\.bin: expected \d+ values",
        ),
        (
            broken(
                "bad_dtype",
                lambda p: (p / "meta.json").write_text(
                    json.dumps(dict(json.loads((p / "meta.json").read_text()), dtype="f16"))
                ),
            ),
            r"'dtype' must be",
        ),
        (
            broken("bad_json", lambda p: (p / "meta.json").write_text("{")),
            r"meta\.json: cannot read it as JSON",
        ),
        (
            broken("bad_win", lambda p: np.roll(np.fromfile(p / "win.bin", "<u4"), 1).tofile(p / "win.bin")),
            r"win\.bin: row \d+ lies in window",
        ),
        (tmp / "absent", r"meta\.json: not found"),
    ]
    for scene_dir, pattern in cases:
        out = tmp / f"out_{scene_dir.name}"
        expect_failure(run_peer(scene_dir, out, "pytorch-scatter"), out, pattern)

    out = tmp / "out_no_src"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = run_peer(tmp / "good", out, "authors-triton", "--authors-src", str(tmp / "nowhere.py"), env=env)
    expect_failure(proc, out, r"run scripts/fetch-scatterformer\.sh")

    # A stale result.json of an earlier run is removed even when this run fails.
    out = tmp / "out_stale"
    out.mkdir()
    (out / "result.json").write_text("{}")
    expect_failure(run_peer(tmp / "absent", out, "pytorch-scatter"), out, r"not found")

    if not torch.cuda.is_available():
        out = tmp / "out_cuda"
        cmd = [
            sys.executable,
            str(PEER),
            "--scene",
            str(tmp / "good"),
            "--impl",
            "pytorch-scatter",
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        expect_failure(proc, out, r"--device cuda: torch .* sees no CUDA device")


TESTS = [obj for name, obj in list(globals().items()) if name.startswith("test_") and callable(obj)]


def main() -> int:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for test in TESTS:
        with tempfile.TemporaryDirectory(prefix="peer-sla-test-") as tmp:
            try:
                test(Path(tmp))
            except Skip as e:
                counts["skipped"] += 1
                print(f"skip {test.__name__}: {e}")
            except Exception:  # noqa: BLE001 - report every failure, then go on
                counts["failed"] += 1
                print(f"FAIL {test.__name__}")
                traceback.print_exc()
            else:
                counts["passed"] += 1
                print(f"ok   {test.__name__}")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
