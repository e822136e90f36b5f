"""Compile the Triton kernels of impl bptt for a GPU architecture without a GPU (Triton ships
ptxas): ``python tests/helpers/compile_kernels.py 90 float32`` prints one JSON line per kernel
with what its PTX holds. Run with TRITON_INTERPRET unset (tests/test_triton_kernels.py does)."""
from __future__ import annotations

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqmodels.bptt import kernels

ACC_BUFFERS = {"cs", "carry", "carry_h", "carry_c"}  # float32 whatever the model's dtype
INT_BUFFERS = {"lengths", "sync"}
TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def compile_kernel(name: str, arch: int, dtype: str) -> dict:
    fn = getattr(kernels, name)
    flags = dict(SYNC=True, BB=64, BH=32, BK=32, PRECISION="tf32" if dtype == "float32" else "ieee", SPIN=1 << 17,
                 ACC=tl.float32, UPCAST=False, HAS_R=True, HAS_DH=True, HAS_LEN=True)
    flags.update({"rnn": dict(TANH=True), "lstm": dict(PEEP=True, HAS_DC=True), "gru": {}}[name.split("_")[0]])
    pointers = fn.arg_names[:fn.arg_names.index("B")]
    signature = {}
    for arg in fn.arg_names:
        if arg in flags:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*i32" if arg in INT_BUFFERS else "*fp32" if arg in ACC_BUFFERS else "*" + TYPES[dtype]
        else:
            signature[arg] = "i32"
    constexprs = {(fn.arg_names.index(k),): v for k, v in flags.items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    ptx = compiled.asm["ptx"]
    return {"kernel": name, "arch": arch, "dtype": dtype, "cubin_bytes": len(compiled.asm["cubin"]),
            "mma": "mma" in ptx, "release_add": "release.add" in ptx,
            "acquire_load": "ld.global.gpu.acquire" in ptx or "acquire.add" in ptx,
            "arrive_once": arrives_once(ptx), "shared_bytes": compiled.metadata.shared}


def arrives_once(ptx: str) -> bool:
    """Whether every arrival at the grid barrier (the release add on the counter) is predicated
    on thread 0 of the program: the target counts programs, so one add per thread would open
    the barrier before the step is done everywhere."""
    thread = set(re.findall(r"mov\.u32\s+(%r\d+),\s*%tid\.x;", ptx))
    first = {p for p, r in re.findall(r"setp\.eq\.[bsu]32\s+(%p\d+),\s*(%r\d+),\s*0;", ptx) if r in thread}
    guards = re.findall(r"(?m)^\s*(?:@(%p\d+))?\s*(?:red|atom)\.global\.gpu\.release\.add", ptx)
    return bool(guards) and all(g in first for g in guards)


if __name__ == "__main__":
    arch, dtype = int(sys.argv[1]), sys.argv[2]
    for name in [f"{cell}_{direction}" for cell in ("rnn", "lstm", "gru") for direction in ("forward", "backward")]:
        print(json.dumps(compile_kernel(name, arch, dtype)), flush=True)
