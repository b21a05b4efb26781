#!/usr/bin/env python3
"""Per-call cost of the SpecTr workload's draft and target on a GPU.

Issue 3 asks for the Qwen2.5-Coder pair on the GPU; our decoder runs on the
CPU only, so this script measures what decides whether k drafts pay there:
the latency of one forward call of each model as a function of the rows it
scores (1 for a decode step, up to 1 + k*L for a SpecTr verification), over a
KV cache already holding a prefix. `bench-suite predict-spectr` combines
these costs with the block efficiency and rows per call measured by a CPU
run of the `qwen2.5-coder-0.5b-1.5b` variant into a *predicted* speedup.

What is measured, and how it differs from the real models:
  - The real shapes of Qwen2.5-Coder-0.5B and -1.5B (read from their GGUF
    metadata: layers, widths, heads, KV heads, FFN, vocabulary, q/k/v
    biases, untied output head), one transformer forward per call: RMSNorm,
    q/k/v projections, rotary embedding, new keys and values written into a
    static KV cache, attention over prefix + new rows under a tree mask
    (each row sees the prefix and the rows before it, which costs what a
    draft tree's own mask costs), SwiGLU FFN, final norm and the logits of
    every row.
  - Random weights: a call's time does not depend on the values.
  - Weight formats: `bf16`, and `int4` (4-bit weights in groups of 32 with
    bf16 scale and zero point, PyTorch's tinygemm kernel), which is the
    nearest kernel PyTorch ships to the GGUF files' Q4_K_M (4-bit groups of
    32, 6-bit scales; some tensors Q5_0/Q6_K/Q8_0). llama.cpp's own CUDA
    kernels are not measured here (no llama.cpp build on the GPU machine).
  - q/k/v and gate/up are one matmul each, as serving stacks fuse them.
  - Modes: `graph` replays the eager ops from a CUDA graph, as a serving
    stack would; `compiled` lets torch.compile (Inductor, dynamic row
    count) fuse the element-wise work first, then replays a CUDA graph;
    `eager` is plain PyTorch, launch-bound, for a few row counts. These
    small models are bound by kernel count rather than bytes, so how well
    a stack fuses decides the draft's cost relative to the target's; the
    JSON also records the weight bytes per call and the measured copy
    bandwidth, for the bandwidth-bound limit.
  - Times are medians over `--reps` replays, measured with CUDA events after
    warm-up, one replay per event pair.

Output: CSV rows `model,format,mode,context,rows,median_ms,p10_ms,p90_ms` and
a JSON file with the device and software versions.

Usage: python3 scripts/spectr_gpu_costs.py --out DIR [--context 320]
       [--max-rows 73] [--reps 50] [--formats bf16,int4]
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

# From the GGUF metadata of the files the suite verifies (assets.rs):
# qwen2.block_count, embedding_length, attention.head_count(_kv),
# feed_forward_length, and the token_embd / output tensor shapes.
MODELS = {
    "qwen2.5-coder-0.5b": dict(layers=24, d=896, heads=14, kv_heads=2, ff=4864, vocab=151936),
    "qwen2.5-coder-1.5b": dict(layers=28, d=1536, heads=12, kv_heads=2, ff=8960, vocab=151936),
}
GROUP = 32
# Row counts measured in the slower modes (compiling or launch-bound).
SPARSE_ROWS = (1, 2, 4, 8, 9, 17, 33, 65)


class Linear:
    """y = x W^T (+ b) in one of the weight formats."""

    def __init__(self, n_out, n_in, fmt, bias, dev):
        self.fmt = fmt
        self.bias = torch.randn(n_out, device=dev, dtype=torch.bfloat16) * 0.02 if bias else None
        w = torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) * (n_in ** -0.5)
        if fmt == "bf16":
            self.w = w
        elif fmt == "int4":
            self.w, self.sz = int4_pack(w)
        else:
            raise ValueError(fmt)

    def __call__(self, x):
        if self.fmt == "bf16":
            if self.bias is not None:
                return torch.addmm(self.bias, x, self.w.t())
            y = x @ self.w.t()
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.w, GROUP, self.sz)
        return y if self.bias is None else y + self.bias


def int4_pack(w):
    """Asymmetric 4-bit quantization in groups of GROUP along the input
    dimension, packed for PyTorch's tinygemm kernel."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-6) / 15.0)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8.0 * scale  # tinygemm dequantizes (q - 8) * scale + zero
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    except (RuntimeError, TypeError):
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)  # torch < 2.5 took int32
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)  # [n, k/G, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [k/G, n, 2]
    return packed, sz


class Model:
    def __init__(self, cfg, fmt, ctx_max, dev):
        self.cfg = cfg
        d, h, kvh = cfg["d"], cfg["heads"], cfg["kv_heads"]
        self.hd = d // h
        self.layers = []
        for _ in range(cfg["layers"]):
            # q/k/v and gate/up as one matmul each, as serving stacks fuse them.
            self.layers.append(dict(
                n1=torch.ones(d, device=dev, dtype=torch.bfloat16),
                qkv=Linear(d + 2 * kvh * self.hd, d, fmt, True, dev),
                o=Linear(d, d, fmt, False, dev),
                n2=torch.ones(d, device=dev, dtype=torch.bfloat16),
                gate_up=Linear(2 * cfg["ff"], d, fmt, False, dev),
                down=Linear(d, cfg["ff"], fmt, False, dev),
                kc=torch.zeros(kvh, ctx_max, self.hd, device=dev, dtype=torch.bfloat16),
                vc=torch.zeros(kvh, ctx_max, self.hd, device=dev, dtype=torch.bfloat16),
            ))
        self.embed = torch.randn(cfg["vocab"], d, device=dev, dtype=torch.bfloat16) * 0.02
        self.norm = torch.ones(d, device=dev, dtype=torch.bfloat16)
        self.head = Linear(cfg["vocab"], d, fmt, False, dev)
        inv = 1.0 / (1e6 ** (torch.arange(0, self.hd, 2, device=dev).float() / self.hd))
        pos = torch.arange(ctx_max, device=dev).float()
        ang = torch.outer(pos, inv)
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)

    def rope(self, x, p0, n):
        # NeoX style (Qwen2): rotate the two halves of each head.
        c, s = self.cos[p0:p0 + n], self.sin[p0:p0 + n]
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def forward(self, ids, p0, mask):
        """ids [n] new tokens at positions p0..p0+n; mask [h/kvh*n, p0+n]."""
        cfg, hd = self.cfg, self.hd
        n = ids.shape[0]
        h, kvh = cfg["heads"], cfg["kv_heads"]
        x = self.embed[ids]
        for L in self.layers:
            y = F.rms_norm(x, (cfg["d"],), L["n1"], 1e-6)
            q, k, v = L["qkv"](y).split([h * hd, kvh * hd, kvh * hd], dim=-1)
            q = q.reshape(n, h, hd).transpose(0, 1)
            k = k.reshape(n, kvh, hd).transpose(0, 1)
            v = v.reshape(n, kvh, hd).transpose(0, 1)
            q, k = self.rope(q, p0, n), self.rope(k, p0, n)
            L["kc"][:, p0:p0 + n] = k
            L["vc"][:, p0:p0 + n] = v
            # Grouped-query attention without copying the cache: each KV head
            # serves its h/kvh query heads as extra query rows.
            qg = q.reshape(kvh, (h // kvh) * n, hd)
            a = F.scaled_dot_product_attention(
                qg.unsqueeze(0), L["kc"][:, : p0 + n].unsqueeze(0),
                L["vc"][:, : p0 + n].unsqueeze(0), attn_mask=mask)
            a = a.squeeze(0).reshape(h, n, hd).transpose(0, 1).reshape(n, cfg["d"])
            x = x + L["o"](a)
            y = F.rms_norm(x, (cfg["d"],), L["n2"], 1e-6)
            gate, up = L["gate_up"](y).chunk(2, dim=-1)
            x = x + L["down"](F.silu(gate) * up)
        return self.head(F.rms_norm(x, (cfg["d"],), self.norm, 1e-6))


def tree_mask(n, p0, groups, dev):
    """Causal mask over prefix + n new rows, repeated for the query heads
    that share a KV head: a chain, which costs what a tree mask costs."""
    m = torch.ones(n, p0 + n, dtype=torch.bool, device=dev)
    m[:, p0:] = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
    return m.repeat(groups, 1)


def time_call(fn, reps, graph):
    """Median, p10 and p90 of `reps` calls in ms, CUDA events around each."""
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 10], ts[(9 * len(ts)) // 10]


def write_row(path, r):
    with open(path, "a") as f:
        f.write(",".join(f"{v:.5f}" if isinstance(v, float) else str(v) for v in r) + "\n")


def row_counts(top):
    """Every count up to 17, then a coarser grid (the cost model interpolates)."""
    dense = list(range(1, min(top, 17) + 1))
    return dense + [n for n in (19, 21, 25, 29, 33, 37, 41, 49, 57, 65, 73) if 17 < n <= top]


def copy_bandwidth(dev):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    med, _, _ = time_call(lambda: b.copy_(a), 20, False)
    return 2 * a.numel() / (med * 1e-3)


def weight_bytes(cfg, fmt):
    """Bytes of weights one call must read (the embedding row gather aside)."""
    d, hd = cfg["d"], cfg["d"] // cfg["heads"]
    per_layer = d * (d + 2 * cfg["kv_heads"] * hd) + d * d + 3 * d * cfg["ff"]
    params = cfg["layers"] * per_layer + cfg["vocab"] * d
    return params * (2 if fmt == "bf16" else 0.5 + 4 / GROUP)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=320,
                    help="tokens already in the KV cache (the prompt plus what was decoded)")
    ap.add_argument("--max-rows", type=int, default=73, help="target rows 1..N (1 + k*L <= 65 for k, L <= 8)")
    ap.add_argument("--draft-rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--formats", default="bf16,int4")
    ap.add_argument("--modes", default="graph,compiled,eager",
                    help="graph: eager ops replayed from a CUDA graph; compiled: torch.compile "
                         "(dynamic shapes), then a CUDA graph; eager: plain PyTorch (few row counts)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("spectr_gpu_costs: no CUDA device visible to PyTorch; run this on the GPU machine")
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    meta = dict(copy_bandwidth_bytes_per_s=bw,
                weight_bytes={f"{m}/{f}": weight_bytes(c, f) for m, c in MODELS.items()
                              for f in args.formats.split(",")},
                device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, context=args.context, reps=args.reps,
                formats={}, note=__doc__.split("\n\n")[1].strip())
    with open(os.path.join(args.out, "gpu-costs.json"), "w") as f:
        json.dump(meta, f, indent=2)
    # Rows are written as they are measured, so a run cut short keeps them.
    csv_path = os.path.join(args.out, "gpu-costs.csv")
    with open(csv_path, "w") as f:
        f.write("model,format,mode,context,rows,median_ms,p10_ms,p90_ms\n")
    for fmt in args.formats.split(","):
        for name, cfg in MODELS.items():
            try:
                model = Model(cfg, fmt, args.context + args.max_rows + 1, dev)
                model.forward(torch.zeros(1, dtype=torch.long, device=dev), args.context,
                              tree_mask(1, args.context, cfg["heads"] // cfg["kv_heads"], dev))
            except (RuntimeError, TypeError, AttributeError) as e:
                meta["formats"][f"{name}/{fmt}"] = f"unavailable: {e}".splitlines()[0][:300]
                print(f"{name} {fmt}: unavailable ({e})", file=sys.stderr)
                continue
            meta["formats"][f"{name}/{fmt}"] = "measured"
            top = args.max_rows if "1.5b" in name else args.draft_rows
            for mode in args.modes.split(","):
                fwd = model.forward
                if mode == "compiled":
                    torch._dynamo.reset()
                    fwd = torch.compile(model.forward, dynamic=True)
                for n in row_counts(top):
                    if mode != "graph" and n not in SPARSE_ROWS:
                        continue
                    ids = torch.randint(0, cfg["vocab"], (n,), device=dev)
                    mask = tree_mask(n, args.context, cfg["heads"] // cfg["kv_heads"], dev)
                    try:
                        with torch.inference_mode():
                            med, p10, p90 = time_call(lambda: fwd(ids, args.context, mask),
                                                      args.reps, mode != "eager")
                    except Exception as e:  # a compile failure must not lose the other modes
                        meta["formats"][f"{name}/{fmt}/{mode}"] = f"failed: {e}".splitlines()[0][:300]
                        print(f"{name} {fmt} {mode}: failed ({e})", file=sys.stderr)
                        break
                    write_row(csv_path, (name, fmt, mode, args.context, n, med, p10, p90))
                    print(f"{name} {fmt} {mode} rows={n}: {med:.3f} ms", file=sys.stderr)
            del model
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu-costs.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta["formats"], indent=2))


if __name__ == "__main__":
    main()
