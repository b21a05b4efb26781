"""Peer implementations of ScatterFormer's Scattered Linear Attention (SLA).

ScatterFormer (He et al., "ScatterFormer: Efficient Voxel Transformer with
Scattered Linear Attention", ECCV 2024, arXiv 2401.00912) attends over the
voxels of each window with linear attention, without padding windows to a
common size. Per window and head, with phi = ReLU and no scaling:

    KV = sum_j phi(k_j)^T v_j   (d x d)      s = sum_j phi(k_j)
    out_i = (phi(q_i) KV) / (phi(q_i) . s + 1e-6)

The `point-cloud-sla` workload times our Rust/CUDA operator in the harness;
in the same run the harness calls this script to time two peers on the same
scene and reads back their timings and outputs, which it checks against its
own float64 reference. The peers:

  pytorch-scatter  the operator as a PyTorch user writes it: index_add_ and
                   gathers, no custom kernels, backward by autograd.
  authors-triton   the authors' own Triton kernels (ScatterMatmulKV,
                   ScatterMatmulQC) loaded from their repository at a pinned
                   commit (scripts/fetch-scatterformer.sh), composed exactly
                   as their SLALayer.forward does. Also timed: their two
                   kernels alone (`authors-triton-kernels`, in "extra").

Usage:

    python3 scripts/peer_sla.py --scene DIR --impl {pytorch-scatter,authors-triton}
        --out DIR [--authors-src FILE] [--repeats N] [--warmup N]
        [--device cuda|cpu]

Scene directory (written by the harness): meta.json {"n", "heads", "dim",
"windows", "dtype": "f32"|"bf16"}; little-endian raw offsets.bin, counts.bin
(u32, one per window), win.bin (u32, window of each voxel), q.bin, k.bin,
v.bin, dout.bin (f32, [n, heads, dim] row-major). Voxels are
window-contiguous: window w holds rows offsets[w] .. offsets[w]+counts[w].
For bf16 the f32 inputs are cast on the device, outside the timed region.

Output directory: result.json (see `write_result`) and out.bin, dq.bin,
dk.bin, dv.bin (f32 LE, [n, heads, dim]) from one untimed forward+backward
with the scene's dout. result.json is written last, under a temporary name
then renamed, so its presence means the run finished. Bad input, a missing
device or a missing authors' file exit non-zero with the reason on stderr
and leave no result.json. A peer that cannot run this scene (the authors'
kernels' shape limits) or runs out of device memory is a measured outcome,
not an error: result.json then says "status": "unsupported" or "oom".

`--device cpu` exists for tests: pytorch-scatter runs on the CPU as is;
authors-triton needs TRITON_INTERPRET=1 (Triton's CPU interpreter; slow).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import gc
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The authors' file, as fetched by scripts/fetch-scatterformer.sh (which pins
# the same sha256; scripts/test_peer_sla.py checks the two agree).
AUTHORS_REPO = "https://github.com/skyhehe123/ScatterFormer"
AUTHORS_COMMIT = "a23f434f8fd1f0f2913532e75a614c91f49dc7eb"
AUTHORS_PATH = "pcdet/models/model_utils/scatterformer_utils.py"
PINNED_SHA256 = "85e4b6c24ed9823b080b78a56698501eabb675e3b10c5dbcf7125b6fcd1d96d8"

# What the peer needs from the authors' file. Their module also imports
# spconv, torch_scatter, einops and pcdet's CUDA extension at the top, none of
# which the GPU machine has and none of which these definitions use, so we
# execute only these definitions instead of importing the module.
AUTHORS_KERNELS = (
    "_scatter_kv_fwd_kernel",
    "_scatter_kv_bwd_kernel",
    "_scatter_qc_fwd_kernel",
    "_scatter_qc_bwd_kernel",
)
AUTHORS_FUNCTIONS = ("ScatterMatmulKV", "ScatterMatmulQC")
AUTHORS_REQUIRED = AUTHORS_KERNELS + AUTHORS_FUNCTIONS
# Module-level constants the definitions read (BLOCK_SIZE is the voxel tile,
# `g` in the kernels); taken when present.
AUTHORS_CONSTANTS = ("BLOCK_SIZE", "GROUP_SIZE")
# `scatter_matmul_kv = ScatterMatmulKV.apply`; rebuilt here when absent.
AUTHORS_ALIASES = {"scatter_matmul_kv": "ScatterMatmulKV", "scatter_matmul_qc": "ScatterMatmulQC"}

EPS = 1e-6
SCENE_FLOAT_FILES = ("q", "k", "v", "dout")
OUTPUT_FILES = ("out.bin", "dq.bin", "dk.bin", "dv.bin")
INT32_MAX = 2**31 - 1


class PeerError(Exception):
    """Bad input or environment: reported on stderr, exit status 2."""


class Unsupported(Exception):
    """The peer cannot run this scene; recorded as status "unsupported"."""


def default_authors_src() -> Path:
    # Same place as scripts/fetch-scatterformer.sh writes to.
    repo = Path(__file__).resolve().parent.parent
    assets = Path(os.environ.get("BENCH_SUITE_ASSETS", repo / ".assets"))
    return assets / "scatterformer" / "scatterformer_utils.py"


# ---------------------------------------------------------------------------
# Scene


def load_scene(scene_dir: Path) -> dict:
    """Reads and validates a scene; every problem names the file at fault."""
    meta_path = scene_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise PeerError(f"{meta_path}: not found (is --scene a scene directory written by the harness?)")
    except (OSError, ValueError) as e:
        raise PeerError(f"{meta_path}: cannot read it as JSON: {e}")
    if not isinstance(meta, dict):
        raise PeerError(f"{meta_path}: expected a JSON object")
    dims = {}
    for key in ("n", "heads", "dim", "windows"):
        val = meta.get(key)
        # bool is an int in Python; a `true` here is a bug in the writer.
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise PeerError(f"{meta_path}: '{key}' must be a positive integer, got {val!r}")
        dims[key] = val
    if meta.get("dtype") not in ("f32", "bf16"):
        raise PeerError(f'{meta_path}: \'dtype\' must be "f32" or "bf16", got {meta.get("dtype")!r}')
    n, h, d, w = dims["n"], dims["heads"], dims["dim"], dims["windows"]

    def read(name: str, dtype: str, count: int) -> np.ndarray:
        path = scene_dir / f"{name}.bin"
        try:
            arr = np.fromfile(path, dtype=dtype)
        except FileNotFoundError:
            raise PeerError(f"{path}: not found")
        except OSError as e:
            raise PeerError(f"{path}: {e}")
        if arr.size != count:
            raise PeerError(
                f"{path}: expected {count} values ({count * arr.itemsize} bytes) from meta.json, "
                f"found {arr.size} ({path.stat().st_size} bytes)"
            )
        return arr

    offsets = read("offsets", "<u4", w).astype(np.int64)
    counts = read("counts", "<u4", w).astype(np.int64)
    win = read("win", "<u4", n).astype(np.int64)
    scene = {"meta": meta, "n": n, "heads": h, "dim": d, "windows": w, "dtype": meta["dtype"]}
    scene.update(offsets=offsets, counts=counts, win=win)
    for name in SCENE_FLOAT_FILES:
        arr = read(name, "<f4", n * h * d).reshape(n, h, d)
        if not np.isfinite(arr).all():
            raise PeerError(f"{scene_dir / (name + '.bin')}: contains NaN or infinity")
        scene[name] = arr
    check_windows(scene_dir, offsets, counts, win, n)
    return scene


def check_windows(scene_dir: Path, offsets: np.ndarray, counts: np.ndarray, win: np.ndarray, n: int) -> None:
    """Both peers rely on the layout the harness promises: every window's
    voxels are the contiguous rows offsets[w] .. offsets[w]+counts[w], and
    win[] agrees. The authors' kernels read exactly those rows and the
    scatter sums use win[], so a scene where the two disagree would give
    the peers different operators; refuse it."""
    if int(counts.sum()) != n:
        raise PeerError(f"{scene_dir}/counts.bin: counts sum to {int(counts.sum())}, meta.json says n = {n}")
    if (offsets + counts > n).any():
        w = int(np.argmax(offsets + counts > n))
        raise PeerError(
            f"{scene_dir}/offsets.bin: window {w} spans rows {offsets[w]}..{offsets[w] + counts[w]}, past n = {n}"
        )
    owner = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(offsets, counts)
    rank = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = first + rank
    # Rows of different windows cannot overlap here (a row holds one window
    # id), and the counts sum to n, so passing this means a partition.
    bad = win[rows] != owner
    if bad.any():
        i = int(np.argmax(bad))
        raise PeerError(
            f"{scene_dir}/win.bin: row {rows[i]} lies in window {owner[i]} by offsets/counts "
            f"but win.bin says {win[rows[i]]} (voxels must be window-contiguous)"
        )


# ---------------------------------------------------------------------------
# The authors' kernels


def _rearrange(x, pattern: str, **sizes):
    """The two einops patterns ScatterFormer uses ("n (h c) -> n h c" and its
    inverse), for the case that their kernels' file calls `rearrange`; einops
    is not on the GPU machine."""
    compact = pattern.replace(" ", "")
    if compact == "n(hc)->nhc":
        return x.reshape(x.shape[0], sizes["h"], -1)
    if compact == "nhc->n(hc)":
        return x.reshape(x.shape[0], -1)
    raise NotImplementedError(f"rearrange shim: pattern {pattern!r}")


def select_authors_definitions(source: str, filename: str) -> tuple[ast.Module, list[str]]:
    """Picks from the authors' module the top-level statements the peer needs
    (see AUTHORS_*), keeping their line numbers: Triton reads a kernel's
    source back from the file by line (inspect.getsource), so the compiled
    subset must point into the real file. Returns the subset and the names it
    defines; raises PeerError naming what is missing."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise PeerError(f"{filename}: not valid Python: {e}")
    keep: list[ast.stmt] = []
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in AUTHORS_REQUIRED:
            keep.append(node)
            found.append(node.name)
        elif (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            name = node.targets[0].id
            if name in AUTHORS_CONSTANTS and isinstance(node.value, ast.Constant):
                keep.append(node)
                found.append(name)
            elif (
                name in AUTHORS_ALIASES
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "apply"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == AUTHORS_ALIASES[name]
            ):
                keep.append(node)
                found.append(name)
    missing = [name for name in AUTHORS_REQUIRED + ("BLOCK_SIZE",) if name not in found]
    if missing:
        raise PeerError(
            f"{filename}: the authors' definitions {', '.join(missing)} were not found "
            f"(is this {AUTHORS_PATH} at commit {AUTHORS_COMMIT}?)"
        )
    for name in AUTHORS_REQUIRED:
        if found.count(name) > 1:
            raise PeerError(f"{filename}: {name} is defined more than once; refusing to guess which one runs")
    return ast.Module(body=keep, type_ignores=[]), found


def unresolved_names(module: ast.Module, provided: set[str]) -> list[str]:
    """Names the selected definitions read but nobody defines. A kernel's
    globals are looked up only when Triton compiles it, on the GPU; checking
    here turns a late NameError there into an early, clear refusal. Any name
    bound anywhere in the subset counts as defined: coarse, but a miss would
    still fail loudly at run time."""
    loads, bound = set(), set()
    for node in ast.walk(module):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return sorted(loads - bound - provided - set(dir(builtins)))


def check_authors_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PeerError(
            f"{path}: the authors' ScatterFormer kernels are not there; run scripts/fetch-scatterformer.sh "
            "(offline: SCATTERFORMER_GIT=/path/to/ScatterFormer.git scripts/fetch-scatterformer.sh), "
            "or pass --authors-src"
        )
    except OSError as e:
        raise PeerError(f"{path}: {e}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != PINNED_SHA256:
        raise PeerError(
            f"{path}: sha256 {digest} is not the pinned {PINNED_SHA256} "
            f"({AUTHORS_PATH} at {AUTHORS_COMMIT}); the file was altered or is another version: "
            "delete it and run scripts/fetch-scatterformer.sh"
        )
    return data.decode("utf-8")


def load_authors_ops(path: Path) -> dict:
    """Executes the authors' kernels and autograd functions (nothing else of
    their module) and returns them by name."""
    source = check_authors_file(path)
    module, _ = select_authors_definitions(source, str(path))
    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl
    from torch import nn

    namespace = {
        "__name__": "scatterformer_utils",
        "torch": torch,
        "triton": triton,
        "tl": tl,
        "F": F,
        "nn": nn,
    }
    if "rearrange" in unresolved_names(module, set(namespace)):
        namespace["rearrange"] = _rearrange
    missing = unresolved_names(module, set(namespace))
    if missing:
        raise PeerError(
            f"{path}: the authors' definitions use {', '.join(missing)}, which this loader does not provide"
        )
    # exec of the pinned, sha256-checked file's own definitions: this is the
    # point of the peer (their code, not a copy of it).
    exec(compile(module, str(path), "exec"), namespace)
    for alias, cls in AUTHORS_ALIASES.items():
        namespace.setdefault(alias, namespace[cls].apply)
    return namespace


def authors_limits(scene: dict, ops: dict) -> None:
    """Raises Unsupported where the authors' kernels cannot run the scene as
    written (read off their code at the pinned commit)."""
    h, d, w = scene["heads"], scene["dim"], scene["windows"]
    g = ops["BLOCK_SIZE"]
    # tl.arange(0, d) needs a power of two; tl.dot needs every dimension of
    # its operands >= 16 (the [d, g] x [g, d] products).
    if d < 16 or d & (d - 1):
        raise Unsupported(f"head dim {d}: the authors' kernels need a power of two >= 16 (tl.arange, tl.dot)")
    if g < 16:
        raise Unsupported(f"BLOCK_SIZE {g} < 16: tl.dot cannot run")
    # They index the [windows, heads, d, d] KV tensor with
    # `pid * d * d * h` where pid is tl.program_id (int32): past 2^31
    # elements it wraps and the kernels write out of bounds.
    if w * h * d * d > INT32_MAX:
        raise Unsupported(
            f"windows*heads*dim*dim = {w * h * d * d} > 2^31-1: the authors' kernels index KV with "
            "int32 program ids (pid * d * d * h) and would overflow"
        )


# ---------------------------------------------------------------------------
# The two operators


def pytorch_scatter_op(win, windows: int) -> Callable:
    """SLA as a PyTorch user writes it. bf16 inputs: q, k, v are upcast, KV,
    s, numerator and denominator are computed in fp32 and the output is cast
    back to bf16 (the spec's fp32 accumulation; what autocast-free user code
    that cares about accuracy does)."""
    import torch
    import torch.nn.functional as F

    def op(q, k, v):
        _, h, d = q.shape
        acc = torch.float32
        pq, pk, v32 = F.relu(q).to(acc), F.relu(k).to(acc), v.to(acc)
        kv = torch.zeros(windows, h, d, d, dtype=acc, device=q.device)
        kv.index_add_(0, win, pk.unsqueeze(-1) * v32.unsqueeze(-2))
        s = torch.zeros(windows, h, d, dtype=acc, device=q.device)
        s.index_add_(0, win, pk)
        num = torch.einsum("nhd,nhde->nhe", pq, kv[win])
        den = (pq * s[win]).sum(-1, keepdim=True) + EPS
        return (num / den).to(q.dtype)

    return op


def authors_op(ops: dict, offsets, counts, win, windows: int) -> Callable:
    """SLALayer.forward (pcdet/models/backbones_3d/scatterformer.py at the
    pinned commit) between its qkv projection and its output projection.
    The one change: torch_scatter.scatter_add(k, win, dim=0) becomes
    zeros(windows, h, d).index_add_(0, win, k), the same sum by index
    (torch_scatter is not on the GPU machine; both use atomic adds, so only
    the order of the additions may differ). Everything stays in the input
    dtype, as in their code: in bf16 their KV is stored in bf16 and s is
    summed in bf16."""
    import torch
    import torch.nn.functional as F

    kv_fn, qc_fn = ops["scatter_matmul_kv"], ops["scatter_matmul_qc"]

    def op(q, k, v):
        q = F.relu(q)
        k = F.relu(k)
        kv = kv_fn(k, v, offsets, counts)
        s = torch.zeros(windows, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device).index_add_(0, win, k)
        y = qc_fn(q, kv, offsets, counts)
        z = torch.sum(s[win, ...] * q, -1, keepdim=True)
        return y / (z + EPS)

    return op


def authors_kernels_op(ops: dict, offsets, counts) -> Callable:
    """Their two kernels alone, on inputs already through ReLU: the
    unnormalised y = phi(q) KV. Not the operator; timed only."""
    kv_fn, qc_fn = ops["scatter_matmul_kv"], ops["scatter_matmul_qc"]

    def op(q, k, v):
        return qc_fn(q, kv_fn(k, v, offsets, counts), offsets, counts)

    return op


# ---------------------------------------------------------------------------
# Measurement


class Timer:
    """Times one call with a fresh pair of CUDA events per sample, in one of
    two protocols (perf_counter on the CPU, where they are the same):

    - "device" (the published time): before the start event the L2 is
      flushed (256 MiB zeroed, as triton.testing.do_bench does) and the
      stream is held by a spin of about 1 ms (torch.cuda._sleep, as
      nvbench's blocking kernel does), so Python has queued the whole call
      before the device reaches the start event: the sample is the call's
      device time from a cold L2, gaps between its kernels included.
    - "launch": events recorded on an idle, synchronised device, so the
      sample also holds Python's submission of every kernel and reads what
      the previous sample left in L2 (the protocol of runs r1-r6).

    The harness times its own kernels the same two ways
    (workloads/src/device.rs, `Timing`)."""

    FLUSH_BYTES = 256 << 20
    HOLD_CYCLES = 2_000_000  # about 1 ms at the H100's 1.98 GHz

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.flush = torch.empty(self.FLUSH_BYTES, dtype=torch.uint8, device="cuda") if self.cuda else None

    def sample_ms(self, fn: Callable[[], None], protocol: str = "device") -> float:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            if protocol == "device":
                self.flush.zero_()
                torch.cuda._sleep(self.HOLD_CYCLES)
            elif protocol != "launch":
                raise ValueError(f"unknown timing protocol {protocol!r}")
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def samples_ms(
        self, fn: Callable[[], None], warmup: int, repeats: int, protocol: str = "device"
    ) -> list[float]:
        for _ in range(warmup):
            fn()
        return [self.sample_ms(fn, protocol) for _ in range(repeats)]

    def peak_bytes(self, fn: Callable[[], None]) -> int | None:
        """Peak device memory of one call above what was allocated before it
        (the inputs, and nothing else: callers drop earlier outputs and
        grads first). None on the CPU, where torch keeps no such count."""
        torch = self.torch
        if not self.cuda:
            fn()
            return None
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)


def measure(
    op: Callable, inputs: tuple, dout, timer: Timer, warmup: int, repeats: int, keep_outputs: bool
) -> dict:
    """Forward-only and forward+backward samples and peaks for `op` on
    `inputs` (q, k, v on the device, in the run dtype). With keep_outputs,
    also one untimed forward+backward whose output and grads are returned
    as float32 numpy arrays."""
    torch = timer.torch
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)

    def fwd():
        with torch.no_grad():
            op(*inputs)

    def fwdbwd():
        for t in leaves:
            t.grad = None
        op(*leaves).backward(dout)

    res: dict = {}
    if keep_outputs:
        # Also the first call, where Triton compiles: outside any timing.
        out = op(*leaves)
        out.backward(dout)
        res["arrays"] = {
            name: t.detach().float().cpu().numpy()
            for name, t in (
                ("out", out),
                ("dq", leaves[0].grad),
                ("dk", leaves[1].grad),
                ("dv", leaves[2].grad),
            )
        }
        del out
    res["fwd_ms"] = timer.samples_ms(fwd, warmup, repeats)
    res["fwdbwd_ms"] = timer.samples_ms(fwdbwd, warmup, repeats)
    res["fwd_launch_ms"] = timer.samples_ms(fwd, 0, repeats, "launch")
    res["fwdbwd_launch_ms"] = timer.samples_ms(fwdbwd, 0, repeats, "launch")
    for t in leaves:
        t.grad = None
    res["peak_bytes_fwd"] = timer.peak_bytes(fwd)
    res["peak_bytes_fwdbwd"] = timer.peak_bytes(fwdbwd)
    for t in leaves:
        t.grad = None
    return res


# ---------------------------------------------------------------------------
# Driver


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError)


def run(args: argparse.Namespace) -> dict:
    try:
        import torch
    except ImportError:
        raise PeerError("PyTorch is not installed in this Python (" + sys.executable + ")")

    scene = load_scene(args.scene)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PeerError(
            f"--device cuda: torch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda}); use a GPU machine, or --device cpu for a test"
        )
    ops = None
    if args.impl == "authors-triton":
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise PeerError(
                "authors-triton on --device cpu runs only under Triton's interpreter: set TRITON_INTERPRET=1"
            )
        # Loaded before anything is timed, so a missing or altered file is an
        # error even for scenes the kernels would not support.
        ops = load_authors_ops(args.authors_src)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if scene["dtype"] == "bf16" else torch.float32
    result = {
        "impl": args.impl,
        "device": device_name(args.device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "dtype": scene["dtype"],
        "shape": {k: scene[k] for k in ("n", "heads", "dim", "windows")},
        "warmup": args.warmup,
        "repeats": args.repeats,
    }

    # Index tensors in int64, as ScatterFormer's own pipeline makes them
    # (torch.bincount / cumsum / unique): their kernels then compute voxel
    # offsets (start * d * h) in 64 bits.
    win = torch.from_numpy(scene["win"]).to(device)
    offsets = torch.from_numpy(scene["offsets"]).to(device)
    counts = torch.from_numpy(scene["counts"]).to(device)
    q, k, v, dout = (
        torch.from_numpy(scene[name]).to(device).to(dtype).contiguous() for name in SCENE_FLOAT_FILES
    )
    del scene["q"], scene["k"], scene["v"], scene["dout"]
    timer = Timer(args.device)

    def outcome(status: str, note: str) -> dict:
        result.update(
            status=status, fwd_ms=[], fwdbwd_ms=[], peak_bytes_fwd=None, peak_bytes_fwdbwd=None, note=note
        )
        return result

    if args.impl == "pytorch-scatter":
        op = pytorch_scatter_op(win, scene["windows"])
        note = (
            "index_add_ into zeros [windows, heads, d, d] of the per-voxel outer products phi(k)^T v, "
            "and of phi(k); gathers kv[win], s[win]; einsum; backward by autograd. "
            + (
                "bf16 inputs: upcast to fp32, KV/s/num/den in fp32, output cast to bf16. "
                if dtype == torch.bfloat16
                else ""
            )
            + "CUDA index_add_ adds with atomics (summation order not fixed)."
        )
    else:
        try:
            authors_limits(scene, ops)
        except Unsupported as e:
            return outcome("unsupported", str(e))
        op = authors_op(ops, offsets, counts, win, scene["windows"])
        note = (
            f"{AUTHORS_REPO} @ {AUTHORS_COMMIT[:12]}, {AUTHORS_PATH}: ScatterMatmulKV/ScatterMatmulQC "
            f"(Triton, grid (windows, heads), {ops['BLOCK_SIZE']} voxels a step, tl.dot with allow_tf32=False), "
            "composed as SLALayer.forward; torch_scatter.scatter_add replaced by index_add_ (same sum); "
            "offsets/counts/win as int64, as their pipeline makes them. "
            + (
                "bf16: run in bf16 as their code is written (KV stored in bf16, s summed in bf16; "
                "their backward kernels write fp32 grads, cast to bf16 by autograd). "
                if dtype == torch.bfloat16
                else ""
            )
        ).strip()

    try:
        main = measure(op, (q, k, v), dout, timer, args.warmup, args.repeats, keep_outputs=True)
        extra = []
        if ops is not None:
            # Inputs already through ReLU, outside the timed region.
            rq, rk = torch.relu(q).contiguous(), torch.relu(k).contiguous()
            kern = measure(
                authors_kernels_op(ops, offsets, counts),
                (rq, rk, v),
                dout,
                timer,
                args.warmup,
                args.repeats,
                keep_outputs=False,
            )
            extra.append(
                {
                    "impl": "authors-triton-kernels",
                    "fwd_ms": kern["fwd_ms"],
                    "fwdbwd_ms": kern["fwdbwd_ms"],
                    "fwd_launch_ms": kern["fwd_launch_ms"],
                    "fwdbwd_launch_ms": kern["fwdbwd_launch_ms"],
                    "peak_bytes_fwd": kern["peak_bytes_fwd"],
                    "peak_bytes_fwdbwd": kern["peak_bytes_fwdbwd"],
                    "note": "ScatterMatmulKV then ScatterMatmulQC on ReLU'd q, k: the unnormalised phi(q) KV, "
                    "without s, the denominator and the ReLUs; backward of y with the scene's dout. Output not checked.",
                }
            )
    except Exception as e:  # only two kinds are outcomes; the rest re-raise
        first_line = str(e).split("\n", 1)[0]
        if is_oom(e):
            return outcome("oom", f"out of device memory: {first_line}")
        if ops is not None and type(e).__name__ in ("OutOfResources", "CompilationError"):
            why = f"the authors' kernels do not compile for this shape: {type(e).__name__}: {first_line}"
            return outcome("unsupported", why)
        raise

    result.update(
        status="ok",
        fwd_ms=main["fwd_ms"],
        fwdbwd_ms=main["fwdbwd_ms"],
        fwd_launch_ms=main["fwd_launch_ms"],
        fwdbwd_launch_ms=main["fwdbwd_launch_ms"],
        peak_bytes_fwd=main["peak_bytes_fwd"],
        peak_bytes_fwdbwd=main["peak_bytes_fwdbwd"],
        note=note
        + (
            " Peak bytes: not measured on the CPU."
            if args.device == "cpu"
            else " Peak bytes: above the resident inputs."
        ),
        arrays=main["arrays"],
        extra=extra,
    )
    return result


def write_result(out_dir: Path, result: dict) -> None:
    """result.json:
        {"impl", "device", "torch", "triton" (version or null), "dtype",
         "shape": {"n","heads","dim","windows"}, "warmup", "repeats",
         "status": "ok" | "unsupported" | "oom",
         "fwd_ms": [..], "fwdbwd_ms": [..]        (device protocol; empty unless ok),
         "fwd_launch_ms": [..], "fwdbwd_launch_ms": [..]  (launch protocol; absent unless ok),
         "peak_bytes_fwd", "peak_bytes_fwdbwd"    (int; null on CPU or unless ok),
         "note": "...",
         "extra": [{"impl", "fwd_ms", "fwdbwd_ms", "fwd_launch_ms",
                    "fwdbwd_launch_ms", "peak_bytes_fwd",
                    "peak_bytes_fwdbwd", "note"}]   (authors-triton-kernels)}
    plus, when ok, out.bin dq.bin dk.bin dv.bin (f32 LE, [n, heads, dim])."""
    arrays = result.pop("arrays", None)
    result.setdefault("extra", [])
    if arrays is not None:
        for name, arr in arrays.items():
            tmp = out_dir / f".{name}.bin.tmp"
            arr.astype("<f4").tofile(tmp)
            os.replace(tmp, out_dir / f"{name}.bin")
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out_dir / "result.json")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", type=Path, required=True, help="scene directory written by the harness")
    p.add_argument("--impl", choices=("pytorch-scatter", "authors-triton"), required=True)
    p.add_argument("--out", type=Path, required=True, help="directory for result.json and the .bin outputs")
    p.add_argument(
        "--authors-src",
        type=Path,
        default=default_authors_src(),
        help="the authors' scatterformer_utils.py (scripts/fetch-scatterformer.sh)",
    )
    p.add_argument("--repeats", type=int, default=50, help="timed calls (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        # A stale result.json from an earlier run must not pass for this one.
        for name in ("result.json",) + OUTPUT_FILES:
            (args.out / name).unlink(missing_ok=True)
        result = run(args)
        write_result(args.out, result)
    except PeerError as e:
        print(f"peer_sla: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"peer_sla: error: {e}", file=sys.stderr)
        return 2
    print(f"peer_sla: {result['impl']} {result['status']}: {args.out / 'result.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
