"""Compile the Triton kernels of impl triton for a GPU architecture without a GPU (Triton ships
ptxas and cuobjdump): ``python tests/helpers/compile_kernels.py 90:float32:all 80:bfloat16:none``
prints one JSON line per kernel and spec (arch:dtype:options) with what its PTX holds and what
its cubin uses (registers; stack bytes, where spilled registers live). The kernels are compiled
as a launch of ``gpu.plan`` at (B, H) = (256, 1024) on a GPU with 132 multiprocessors (an
H100/H200) would compile them: pointers and B, H, T divisible by 16, its blocks and warps;
``all`` turns on every option (recurrent dropout, zoneout, lengths, peepholes), ``none``
compiles the plain cells. Run with TRITON_INTERPRET unset (tests/test_triton_kernels.py does)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqmodels.bptt import gpu, kernels

ACC_BUFFERS = {"cs", "carry", "carry_h", "carry_c"}  # float32 whatever the model's dtype
INT_BUFFERS = {"lengths", "sync"}
TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
B, H, T, SMS = 256, 1024, 256, 132


def compile_kernel(name: str, arch: int, dtype: str, options: str) -> dict:
    fn = getattr(kernels, name)
    plan = gpu.plan(B, H, SMS)
    every = options == "all"
    flags = dict(SYNC=True, BB=plan.BB, BH=plan.BH, BK=plan.BK, PRECISION="tf32" if dtype == "float32" else "ieee",
                 SPIN=gpu.SPIN, ACC=tl.float32, UPCAST=False, HAS_RHO=every, HAS_DH=every, HAS_LEN=every)
    flags.update({"rnn": dict(TANH=True), "lstm": dict(PEEP=every, HAS_DC=every), "gru": {}}[name.split("_")[0]])
    pointers = fn.arg_names[:fn.arg_names.index("B")]
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in flags:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*i32" if arg in INT_BUFFERS else "*fp32" if arg in ACC_BUFFERS else "*" + TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton specializes for torch's allocations
        else:
            signature[arg] = "i32"
            if arg in ("B", "H", "T"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(k),): v for k, v in flags.items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": plan.warps})
    ptx = compiled.asm["ptx"]
    return {"kernel": name, "arch": arch, "dtype": dtype, "options": options, "BB": plan.BB, "BH": plan.BH,
            "warps": plan.warps, "cubin_bytes": len(compiled.asm["cubin"]),
            "mma": "mma" in ptx, "release_add": "release.add" in ptx,
            "acquire_load": "ld.global.gpu.acquire" in ptx or "acquire.add" in ptx,
            "arrive_once": arrives_once(ptx, 32 * plan.warps), "shared_bytes": compiled.metadata.shared,
            **resources(compiled.asm["cubin"])}


def arrives_once(ptx: str, threads: int) -> bool:
    """Whether every arrival at the grid barrier (the release add on the counter) is guarded by
    a predicate that holds for exactly one of the program's ``threads`` (thread 0): the target
    counts programs, so one add per thread would open the barrier before the step is done
    everywhere. The predicate's integer arithmetic on %tid.x is evaluated for every thread."""
    defs: dict[str, list[tuple[str, list[str]]]] = {}
    for op, dst, args in re.findall(r"(?m)^\s*(mov|shr|shl|and|or|bfe|setp\.eq|setp\.ne)\.\w+\s+(%\w+),\s*([^;]+);",
                                    ptx):
        defs.setdefault(dst, []).append((op, [a.strip() for a in args.split(",")]))

    def value(operand: str, tid: int) -> int:
        if operand == "%tid.x":
            return tid
        if not operand.startswith("%"):
            return int(operand, 0)
        if len(defs.get(operand, [])) != 1:
            raise LookupError(operand)  # not defined once, unconditionally: cannot tell
        op, args = defs[operand][0]
        v = [value(a, tid) for a in args]
        return {"mov": lambda: v[0], "shr": lambda: v[0] >> v[1], "shl": lambda: (v[0] << v[1]) & 0xFFFFFFFF,
                "and": lambda: v[0] & v[1], "or": lambda: v[0] | v[1],
                "bfe": lambda: (v[0] >> v[1]) & ((1 << v[2]) - 1),
                "setp.eq": lambda: int(v[0] == v[1]), "setp.ne": lambda: int(v[0] != v[1])}[op]()

    guards = re.findall(r"(?m)^\s*(?:@(%p\d+))?\s*(?:red|atom)\.global\.gpu\.release\.add", ptx)
    try:
        return bool(guards) and all(g and [tid for tid in range(threads) if value(g, tid)] == [0] for g in guards)
    except LookupError:
        return False


def resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (where ptxas puts the registers it spills) of the
    cubin Triton built, from ``cuobjdump -res-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2))}


if __name__ == "__main__":
    for spec in sys.argv[1:]:  # arch:dtype:options, e.g. 90:float32:none
        arch, dtype, options = spec.split(":")
        for name in [f"{cell}_{direction}" for cell in ("rnn", "lstm", "gru") for direction in ("forward", "backward")]:
            print(json.dumps(compile_kernel(name, int(arch), dtype, options)), flush=True)
