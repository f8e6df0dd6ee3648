#!/usr/bin/env python3
"""Compile cuda/*.cu with NVRTC for a given architecture, without a GPU.

    pip install nvidia-cuda-nvrtc-cu12
    python3 scripts/gpu/nvrtc-check.py cuda/decode.cu [sm_90]

Prints the compiler log (with ptxas register and spill counts) and fails on errors.
"""
import ctypes, glob, os, sys

import nvidia.cuda_nvrtc as m

libdir = os.path.join(list(m.__path__)[0], "lib")
lib = ctypes.CDLL(sorted(glob.glob(libdir + "/libnvrtc.so*"))[0])
src = open(sys.argv[1], "rb").read()
arch = sys.argv[2] if len(sys.argv) > 2 else "sm_90"
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(sys.argv[1]).encode(), 0, None, None) == 0
opts = [f"--gpu-architecture={arch}".encode(), b"-default-device", b"--std=c++17", b"-lineinfo", b"--ptxas-options=-v"]
r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
print(log.value.decode())
sys.exit(0 if r == 0 else 1)
