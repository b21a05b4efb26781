#!/usr/bin/env python3
"""Compiles the project's CUDA sources with NVRTC, as the harness does at run
time, on a machine without a GPU: NVRTC needs no driver. nvcc accepts code
that NVRTC rejects (NVRTC treats unannotated functions, generic lambdas
among them, as host code), so a kernel that builds with nvcc can still fail
on the GPU machine. CI runs it.

    python3 scripts/nvrtc-check.py            # every source, as the harness compiles it
    python3 scripts/nvrtc-check.py FILE.cu    # one file, with the options of decode_attn.cu

It loads libnvrtc from the library path, else from <repo>/.cuda-toolchain
(where scripts/cuda-toolchain.sh puts it); if neither has it, it installs
the pinned NVRTC wheel there (pip, PyPI, 90 MB). Exits non-zero, with
NVRTC's log, if any source fails to compile.
"""
import ctypes
import os
import subprocess
import sys

# The sources and the options the harness passes (cuda.rs, split_attn.rs).
SOURCES = [
    ("workloads/src/longctx/decode_attn.cu", ["--gpu-architecture=compute_90"]),
    ("workloads/src/pointcloud/kernels.cu", ["--gpu-architecture=compute_90", "-DHEAD_DIM=32"]),
    ("workloads/src/decoder/split_attn.cu", []),
]


NVRTC_WHEEL = "nvidia-cuda-nvrtc==13.0.88"  # as scripts/cuda-toolchain.sh pins it


def load_nvrtc(root):
    toolchain = os.path.join(root, ".cuda-toolchain")
    lib = os.path.join(toolchain, "nvidia", "cu13", "lib")
    local = os.path.join(lib, "libnvrtc.so.13")

    def load_local():
        # NVRTC opens its builtins library by soname: loaded first, it is found.
        ctypes.CDLL(os.path.join(lib, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(local)

    for name in ["libnvrtc.so", "libnvrtc.so.13"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    try:
        return load_local()
    except OSError:
        pass
    print(f"nvrtc-check: installing {NVRTC_WHEEL} into {toolchain}", file=sys.stderr)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", toolchain, NVRTC_WHEEL]
    )
    try:
        return load_local()
    except OSError as e:
        sys.exit(
            f"nvrtc-check: cannot load {local} ({e}; pip exited {r.returncode}). Fix: make PyPI reachable, "
            "or run scripts/cuda-toolchain.sh, which installs the CUDA toolchain there."
        )


def compile_source(lib, path, options):
    with open(path, "rb") as f:
        src = f.read()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None)
    if rc != 0:
        return f"nvrtcCreateProgram returned {rc}"
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return None if rc == 0 else log.value.decode(errors="replace")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    todo = [(a, SOURCES[0][1]) for a in sys.argv[1:]] or [(os.path.join(root, p), o) for p, o in SOURCES]
    for path, _ in todo:
        if not os.path.isfile(path):
            sys.exit(f"nvrtc-check: {path}: no such file. Give CUDA source files, or no argument for the project's own.")
    lib = load_nvrtc(root)
    failed = 0
    for path, options in todo:
        err = compile_source(lib, path, options)
        print(f"{'ok    ' if err is None else 'FAILED'} {os.path.relpath(path, root)} {' '.join(options)}")
        if err is not None:
            failed += 1
            print(err)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
