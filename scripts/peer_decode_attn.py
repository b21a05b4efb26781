"""PyTorch peers of the `long-context` decode-attention step.

The harness times our own CUDA kernels for one decoding step of one
attention layer (workloads/src/longctx/cuda.rs); in the same run this script
times what a PyTorch user would write for the same step, at the same shapes
and data sizes, in the same way, and checks each peer's output against a
float64 reference. The layer is Llama-3-8B-like: 32 query heads, 8 KV heads,
head dimension 128, batch 1, one query token, bf16 cache of `n` rows.

Peers (`--impls`):

  sdpa-gqa            torch.nn.functional.scaled_dot_product_attention with
                      native grouped-query attention (enable_gqa=True), the
                      dispatcher's own choice of backend.
  sdpa-gqa-cudnn      the same, forced to one backend (sdpa_kernel); a
  sdpa-gqa-flash      backend that refuses the inputs is reported as
  sdpa-gqa-efficient  "unsupported".
  hf-repeat-kv        the Hugging Face step: repeat_kv (expand + reshape,
                      which copies K and V four times) then SDPA.
  quest-torch         Quest (arXiv 2406.10774) from torch ops: page scores
                      over per-page channel-wise min/max key metadata
                      (sum_i max(q_i M_i, q_i m_i) = M . relu(q) + m . min(q, 0),
                      summed over the 4 query heads of a KV head: two bf16
                      batched mat-vecs), topk of ceil(frac * pages) pages per
                      KV head, a gather of their rows, SDPA (enable_gqa).

Timing matches the harness (see cuda.rs): a CUDA graph of `layers` steps,
each over its own copy of the cache (at least the modelled decoder's 32
layers, and enough copies that one replay reads at least 4 times the L2
cache; fewer where they would not fit in 60% of free device memory),
replayed back to back with CUDA events around
each replay after warm-up; a step is a replay over `layers`; the figure is
the median. The floor is the bytes the step must move (the same count as
kernel.rs: K and V rows read, Quest metadata, q, and a float32 output) over
the copy bandwidth, measured here as a device-to-device copy of 1 GiB
(bytes read plus written).

Data: seeded, generated on the device, spread as the harness's are (keys
with channel offsets and four outlier channels, correlated query heads of a
group, planted keys aligned with the group's queries, a strong first and
last row), not bitwise the harness's data: timings do not depend on the
values, and each peer is checked against its own float64 reference.

Usage:

    python3 scripts/peer_decode_attn.py [--contexts 4096,16384,...]
        [--fracs 0.1] [--impls sdpa-gqa,hf-repeat-kv,quest-torch]
        [--repeats 30] [--warmup 3] [--seed 1] [--device cuda|cpu]
        [--out FILE]

Prints one JSON object on stdout (also written to --out):
    {"device", "torch", "cuda", "copy_bw_bytes_per_s", "l2_bytes",
     "results": [{"impl", "context", "frac", "status": "ok" | "unsupported"
                  | "oom", "median_ms", "samples_ms", "layers", "bytes",
                  "floor_ms", "ratio_to_floor", "rel_err", "selection_overlap",
                  "backend", "note"}]}
`rel_err` is max |out - ref| / max |ref| against float64 over the peer's
own selection; outputs are bf16, so about 4e-3 is expected; "check_ok" is
rel_err <= 1e-2. `selection_overlap` (quest-torch) is the share of its pages
that the float64 top-k also picks (bf16 scores reorder near ties).
`--device cpu` (tests only): no graphs, no copy bandwidth, perf_counter.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
GROUP = Q_HEADS // KV_HEADS
L2_MULTIPLE, MODEL_LAYERS, MAX_LAYERS, MEMORY_SHARE = 4, 32, 64, 0.6
CHECK_TOL = 1e-2
IMPLS = ("sdpa-gqa", "sdpa-gqa-cudnn", "sdpa-gqa-flash", "sdpa-gqa-efficient", "hf-repeat-kv", "quest-torch")


class PeerError(Exception):
    """Bad arguments or environment: reported on stderr, exit status 2."""


def budget(frac: float, count: int) -> int:
    """ceil(frac * count) in float64, clamped to [1, count] (as kernel.rs)."""
    return min(max(math.ceil(frac * count), 1), count)


def step_bytes(n: int, impl: str, frac: float) -> int:
    """Bytes the step must move, counted as kernel.rs's Step::bytes does."""
    row = 2 * HEAD_DIM * 2  # one K row and one V row, bf16
    q_out = Q_HEADS * HEAD_DIM * 2 + Q_HEADS * HEAD_DIM * 4
    if impl == "quest-torch":
        pages = n // PAGE
        kept = budget(frac, pages)
        return KV_HEADS * (kept * PAGE * row + pages * 2 * HEAD_DIM * 2) + q_out
    return KV_HEADS * n * row + q_out


def generate(torch, n: int, seed: int, device):
    """q [1, 32, 1, 128], k and v [1, 8, n, 128], bf16 (see the module docs)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    d = HEAD_DIM

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    base = randn(KV_HEADS, d)
    q = (base.repeat_interleave(GROUP, 0) + 0.5 * randn(Q_HEADS, d)).to(torch.bfloat16)
    mu = 0.3 * randn(KV_HEADS, d)
    sigma = torch.full((KV_HEADS, d), 0.5, device=device)
    for h in range(KV_HEADS):
        chans = torch.randperm(d, generator=g, device=device)[:4]
        signs = torch.where(randn(4) > 0, 4.0, -4.0)
        mu[h, chans] = signs
        sigma[h, chans] = 1.0
    k = torch.empty(KV_HEADS, n, d, dtype=torch.bfloat16, device=device)
    v = torch.empty(KV_HEADS, n, d, dtype=torch.bfloat16, device=device)
    chunk = 1 << 16
    for h in range(KV_HEADS):
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            k[h, s:e] = (mu[h] + sigma[h] * randn(e - s, d)).to(torch.bfloat16)
            v[h, s:e] = randn(e - s, d).to(torch.bfloat16)
        count = max(2, n // 1024)
        rows = torch.cat(
            [torch.tensor([0, n - 1], device=device), torch.randint(0, n, (count,), generator=g, device=device)]
        )
        strength = torch.cat(
            [torch.tensor([8.0, 6.0], device=device), 4.0 + 5.0 * torch.rand(count, generator=g, device=device)]
        )
        b = base[h]
        alpha = strength * math.sqrt(d) / float((b * b).sum())
        planted = mu[h] + 0.5 * sigma[h] * randn(rows.numel(), d) + alpha[:, None] * b
        k[h, rows] = planted.to(torch.bfloat16)
    return q.view(1, Q_HEADS, 1, d), k.view(1, KV_HEADS, n, d), v.view(1, KV_HEADS, n, d)


# ---------------------------------------------------------------------------
# The peers: each returns a function of one layer's tensors giving the
# output [1, 32, 1, 128] (and, for Quest, the selected pages).


def sdpa_step(torch, backend):
    F = torch.nn.functional

    def step(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True), None
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True), None

    return step


def hf_step(torch):
    F = torch.nn.functional

    def repeat_kv(x):  # transformers.models.llama.modeling_llama.repeat_kv
        b, h, n, d = x.shape
        return x[:, :, None, :, :].expand(b, h, GROUP, n, d).reshape(b, h * GROUP, n, d)

    def step(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v)), None

    return step


def quest_meta(torch, k):
    """[8, pages, 128] channel-wise min and max of each page's keys."""
    kp = k.view(KV_HEADS, -1, PAGE, HEAD_DIM)
    return kp.amin(dim=2).contiguous(), kp.amax(dim=2).contiguous()


def quest_step(torch, kept: int):
    F = torch.nn.functional

    def step(q, k, v, kmin, kmax):
        qg = q.view(KV_HEADS, GROUP, HEAD_DIM).float()
        qpos = qg.clamp(min=0).sum(1).to(torch.bfloat16)
        qneg = qg.clamp(max=0).sum(1).to(torch.bfloat16)
        scores = torch.bmm(kmax, qpos[:, :, None]) + torch.bmm(kmin, qneg[:, :, None])
        idx = scores.squeeze(-1).topk(kept, dim=-1, sorted=False).indices
        heads = torch.arange(KV_HEADS, device=q.device)[:, None]
        ks = k.view(KV_HEADS, -1, PAGE, HEAD_DIM)[heads, idx].view(1, KV_HEADS, kept * PAGE, HEAD_DIM)
        vs = v.view(KV_HEADS, -1, PAGE, HEAD_DIM)[heads, idx].view(1, KV_HEADS, kept * PAGE, HEAD_DIM)
        return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True), idx

    return step


# ---------------------------------------------------------------------------
# Reference and checks


def reference_f64(torch, q, k, v, pages=None):
    """Attention in float64, per KV head, over all rows or the given pages."""
    d = HEAD_DIM
    out = torch.empty(Q_HEADS, d, dtype=torch.float64, device=q.device)
    for h in range(KV_HEADS):
        kh, vh = k[0, h], v[0, h]
        if pages is not None:
            rows = (pages[h].long()[:, None] * PAGE + torch.arange(PAGE, device=q.device)).reshape(-1)
            kh, vh = kh[rows], vh[rows]
        qh = q[0, h * GROUP : (h + 1) * GROUP, 0].double()
        logits = qh @ kh.double().T / math.sqrt(d)
        out[h * GROUP : (h + 1) * GROUP] = torch.softmax(logits, dim=-1) @ vh.double()
    return out


def rel_err(got, want) -> float:
    scale = want.abs().max().item()
    diff = (got.double().reshape(want.shape) - want).abs().max().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def quest_overlap(torch, q, kmin, kmax, idx, kept: int) -> float:
    """Share of the peer's pages that the float64 top-k also selects."""
    qg = q.view(KV_HEADS, GROUP, HEAD_DIM).double()
    s = (
        (torch.maximum(qg[:, :, None, :] * kmin[:, None].double(), qg[:, :, None, :] * kmax[:, None].double()))
        .sum(-1)
        .sum(1)
    )
    want = s.topk(kept, dim=-1).indices
    hits = 0
    for h in range(KV_HEADS):
        hits += len(set(want[h].tolist()) & set(idx[h].tolist()))
    return hits / (KV_HEADS * kept)


# ---------------------------------------------------------------------------
# Measurement


def copy_bandwidth(torch) -> float:
    n = 1 << 28
    src = torch.zeros(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    times.sort()
    return 2.0 * n * 4 / times[len(times) // 2]


def n_layers(torch, read_bytes: int, stored_bytes: int, cuda: bool) -> int:
    if not cuda:
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    free, _ = torch.cuda.mem_get_info()
    fit = max(1, int(free * MEMORY_SHARE / stored_bytes) + 1)
    return min(max(MODEL_LAYERS, -(-L2_MULTIPLE * l2 // read_bytes)), MAX_LAYERS, fit)


def time_graph(torch, fns, warmup: int, repeats: int, cuda: bool):
    """Captures fns (one step per layer) into one CUDA graph and times
    replays; returns (seconds per step of each replay, outputs of the last
    replay). On the CPU: eager calls and perf_counter."""
    if not cuda:
        outs = None
        samples = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            outs = [f() for f in fns]
            if i >= warmup:
                samples.append((time.perf_counter() - t0) / len(fns))
        return samples, outs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            [f() for f in fns]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [f() for f in fns]
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    samples = [a.elapsed_time(b) / 1e3 / len(fns) for a, b in events]
    return samples, outs


def is_oom(torch, e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def run_one(torch, impl: str, n: int, frac: float, args, copy_bw) -> dict:
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    res = {"impl": impl, "context": n, "frac": frac if impl == "quest-torch" else 1.0}
    if impl == "quest-torch" and n % PAGE:
        raise PeerError(f"quest-torch: context {n} is not a whole number of {PAGE}-row pages")
    q, k, v = generate(torch, n, args.seed, device)
    bytes_ = step_bytes(n, impl, frac)
    stored = 2 * k.numel() * 2
    kept = budget(frac, n // PAGE) if impl == "quest-torch" else 0
    if impl == "quest-torch":
        kmin, kmax = quest_meta(torch, k[0])
        stored += 2 * kmin.numel() * 2
    layers = n_layers(torch, bytes_, stored, cuda)
    copies = [(k, v)] + [(k.clone(), v.clone()) for _ in range(layers - 1)]
    backend = None
    if impl.startswith("sdpa-gqa-"):
        from torch.nn.attention import SDPBackend

        backend = {
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[impl.rsplit("-", 1)[1]]
    if impl.startswith("sdpa-gqa"):
        step = sdpa_step(torch, backend)
        fns = [lambda kk=kk, vv=vv: step(q, kk, vv) for kk, vv in copies]
    elif impl == "hf-repeat-kv":
        step = hf_step(torch)
        fns = [lambda kk=kk, vv=vv: step(q, kk, vv) for kk, vv in copies]
    else:
        step = quest_step(torch, kept)
        metas = [(kmin, kmax)] + [(kmin.clone(), kmax.clone()) for _ in range(layers - 1)]
        fns = [lambda kk=kk, vv=vv, mm=mm: step(q, kk[0], vv[0], mm[0], mm[1]) for (kk, vv), mm in zip(copies, metas)]
    try:
        samples, outs = time_graph(torch, fns, args.warmup, args.repeats, cuda)
    except Exception as e:  # a backend refusing the inputs, or memory, is an outcome
        first = str(e).split("\n", 1)[0]
        if is_oom(torch, e):
            res.update(status="oom", note=f"out of device memory: {first}")
        elif backend is not None:
            res.update(status="unsupported", note=f"{type(e).__name__}: {first}")
        else:
            raise
        return res
    out, idx = outs[0]
    if impl == "quest-torch":
        want = reference_f64(torch, q, k, v, pages=idx)
        res["selection_overlap"] = quest_overlap(torch, q, kmin, kmax, idx, kept)
    else:
        want = reference_f64(torch, q, k, v)
    err = rel_err(out[0, :, 0].float(), want)
    med = sorted(samples)[len(samples) // 2]
    res.update(
        status="ok",
        median_ms=med * 1e3,
        samples_ms=[s * 1e3 for s in samples],
        layers=layers,
        bytes=bytes_,
        floor_ms=(bytes_ / copy_bw * 1e3) if copy_bw else None,
        ratio_to_floor=(med / (bytes_ / copy_bw)) if copy_bw else None,
        rel_err=err,
        check_ok=err <= CHECK_TOL,
        backend="dispatcher" if backend is None else str(backend),
    )
    return res


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="4096,16384,65536,131072,524288")
    p.add_argument("--fracs", default="0.1", help="Quest page fractions (quest-torch only)")
    p.add_argument(
        "--impls", default="sdpa-gqa,sdpa-gqa-cudnn,sdpa-gqa-flash,sdpa-gqa-efficient,hf-repeat-kv,quest-torch"
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        a.contexts = [int(x) for x in a.contexts.split(",") if x]
        a.fracs = [float(x) for x in a.fracs.split(",") if x]
    except ValueError as e:
        p.error(f"--contexts and --fracs are comma-separated numbers: {e}")
    a.impls = [x for x in a.impls.split(",") if x]
    for impl in a.impls:
        if impl not in IMPLS:
            p.error(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")
    if any(n < 1 for n in a.contexts) or any(not (0 < f <= 1) for f in a.fracs):
        p.error("contexts must be positive and fractions in (0, 1]")
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    return a


def main(argv) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print(f"peer_decode_attn: error: PyTorch is not installed in {sys.executable}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("peer_decode_attn: error: torch sees no CUDA device; use --device cpu for a test", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    copy_bw = copy_bandwidth(torch) if cuda else None
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_bw_bytes_per_s": copy_bw,
        "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size if cuda else None,
        "results": [],
    }
    try:
        for n in args.contexts:
            for impl in args.impls:
                for frac in args.fracs if impl == "quest-torch" else [1.0]:
                    r = run_one(torch, impl, n, frac, args, copy_bw)
                    out["results"].append(r)
                    brief = {
                        k: r.get(k)
                        for k in (
                            "impl",
                            "context",
                            "frac",
                            "status",
                            "median_ms",
                            "ratio_to_floor",
                            "rel_err",
                            "layers",
                        )
                    }
                    print(json.dumps(brief), file=sys.stderr, flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
    except PeerError as e:
        print(f"peer_decode_attn: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
