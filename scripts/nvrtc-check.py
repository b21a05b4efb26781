#!/usr/bin/env python3
"""Compiles the project's CUDA sources with NVRTC, as the harness does at run
time, on a machine without a GPU: NVRTC needs no driver. nvcc accepts code
that NVRTC rejects (NVRTC treats unannotated functions, generic lambdas
among them, as host code), so a kernel that builds with nvcc can still fail
on the GPU machine. Run it after `eval "$(bash scripts/cuda-toolchain.sh
--env)"` (which puts libnvrtc on LD_LIBRARY_PATH):

    python3 scripts/nvrtc-check.py            # every source, as the harness compiles it
    python3 scripts/nvrtc-check.py FILE.cu    # one file, with the options of decode_attn.cu

Exits non-zero, with NVRTC's log, if any source fails to compile.
"""
import ctypes
import ctypes.util
import os
import sys

# The sources and the options the harness passes (cuda.rs, split_attn.rs).
SOURCES = [
    ("workloads/src/longctx/decode_attn.cu", ["--gpu-architecture=compute_90"]),
    ("workloads/src/pointcloud/kernels.cu", ["--gpu-architecture=compute_90", "-DHEAD_DIM=32"]),
    ("workloads/src/decoder/split_attn.cu", []),
]


def load_nvrtc():
    for name in ["libnvrtc.so", "libnvrtc.so.13", ctypes.util.find_library("nvrtc")]:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    sys.exit(
        "nvrtc-check: libnvrtc not found. Fix: run "
        '`eval "$(bash scripts/cuda-toolchain.sh --env)"` first (it installs the CUDA toolchain).'
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
    lib = load_nvrtc()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    todo = [(a, SOURCES[0][1]) for a in sys.argv[1:]] or [(os.path.join(root, p), o) for p, o in SOURCES]
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
