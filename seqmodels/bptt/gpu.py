"""Backpropagation through time on CUDA: the time loops as Triton kernels (``kernels.py``).

``RNNTriton`` and ``LSTMTriton`` have the inputs, outputs and formulas of ``fast.RNNFunction``
and ``fast.LSTMFunction``, ``GRUTriton`` those of ``reference.GRUReference`` (docs/bptt.md),
and all are checked against ``reference.py``. Around the
kernels, the once-per-call work runs in cuBLAS, as on the CPU: the input projection before the
loop; dX, dW_ih, dW_hh, the biases and the peephole gradients from dZ of all steps after it.

Experimental: they run only under ``impl: triton`` and have not yet run on a GPU (docs/bptt.md,
"Status"). ``why_not(x, B, G)`` says why they cannot run a layer, or None;
``seqmodels.backends`` then says so in one line and runs the proven path. The reasons: not a
CUDA tensor, compiled code turned off (``SEQMODELS_COMPILED=0``), Triton missing, a GPU before
compute capability 8.0, float64, and a (B, G) step slice of 2³¹ elements or more (offsets inside
a step are int32).

The kernels also run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before the first import of ``kernels.py``): that is how the CPU-only test suite checks them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqmodels import fused
from seqmodels.bptt.fast import _contiguous, _lstm_grads, _Slots

# Offsets within one step's (B, G) slice are int32 in the kernels.
MAX_STEP_ELEMENTS = 2**31 - 1
# Polls of the grid barrier before a persistent launch gives up (~0.1 s; then: one launch per step).
SPIN = 1 << 17


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_missing() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # the CUDA wheels of torch ship it; a CPU build does not
        return f"Triton is not installed ({exc}); `pip install triton`"
    return None


def triton_kernels():
    """The module of Triton kernels (imported on first use: it imports triton, and its jit
    decisions read TRITON_INTERPRET)."""
    from seqmodels.bptt import kernels as module

    return module


def why_not(x: Tensor, batch: int, gates: int) -> Optional[str]:
    """None when the Triton kernels can run a layer with input x and (batch, gates) steps, else
    the reason in a few words. CPU tensors run only in Triton's interpreter (the tests)."""
    if x.device.type != "cuda" and not interpreted():
        return f"the tensors are on {x.device.type}, not a CUDA GPU"
    if not fused.compiled_code_enabled():
        return "SEQMODELS_COMPILED=0 turns compiled code off"
    missing = _triton_missing()
    if missing:
        return missing
    capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else (9, 0)
    return why_not_on(capability, x.dtype, batch, gates)


def why_not_on(capability: tuple[int, int], dtype: torch.dtype, batch: int, gates: int) -> Optional[str]:
    """``why_not`` for a CUDA device of this compute capability."""
    if capability < (8, 0):
        return f"the GPU has compute capability {capability[0]}.{capability[1]}; the kernels need 8.0 or newer"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the kernels run float32, bfloat16 and float16, not {dtype}"
    if batch * gates > MAX_STEP_ELEMENTS:
        return (f"a step of batch {batch} x {gates} gate units is over the kernels' limit of "
                f"{MAX_STEP_ELEMENTS} elements; use a smaller batch")
    return None


@dataclass(frozen=True)
class Plan:
    """Blocks of the kernels' grid: BB batch rows x BH hidden units per program, BK the GEMM's
    inner step, ``warps`` per program; persistent: one launch for all steps (grid <= SMs) or
    one launch per step."""
    BB: int
    BH: int
    BK: int
    persistent: bool
    warps: int = 4

    def grid(self, B: int, H: int) -> tuple[int, int]:
        return _cdiv(B, self.BB), _cdiv(H, self.BH)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int, low: int, high: int) -> int:
    p = low
    while p < n and p < high:
        p *= 2
    return p


def persistent_plans(B: int, H: int, sms: int) -> list[Plan]:
    """Every persistent plan for a (B, H) layer on a GPU with ``sms`` multiprocessors: blocks of
    16 to 128 rows and 16 to 64 units (tl.dot wants every dimension >= 16; rows and units past B
    and H are masked off), no bigger than B and H need, at most ``sms`` programs (all resident at
    once), 4 or 8 warps. ``benchmarks/triton_plans.py`` times them all."""
    plans = []
    for BB in (16, 32, 64, 128):
        for BH in (16, 32, 64):
            if BB > _pow2_at_least(B, 16, 128) or BH > _pow2_at_least(H, 16, 64):
                continue
            if _cdiv(B, BB) * _cdiv(H, BH) <= sms:
                plans += [Plan(BB, BH, 32, persistent=True, warps=w) for w in (4, 8)]
    return plans


def warps_for(BB: int, BH: int) -> int:
    """8 warps for blocks of 2048 (BB x BH) elements or more, else 4. Each gate's tile spreads
    over the threads; at 4 warps a 2048-element block leaves 16 elements per thread per tile,
    and the LSTM and GRU kernels spill registers (sm_90, (B, H) = (256, 1024): up to 304 stack
    bytes for the plain LSTM, 1008 with every option); at 8 warps the plain cells fit
    (docs/bptt.md, tests/helpers/compile_kernels.py)."""
    return 8 if BB * BH >= 2048 else 4


def plan(B: int, H: int, sms: int) -> Plan:
    """The plan for a (B, H) layer: among ``persistent_plans``, the most programs (parallelism:
    the GEMM of one step is small), then the taller batch block (each batch block reads all of
    W_hh once per step), with ``warps_for`` its block; with none (more blocks than SMs even at
    the biggest), one launch per step with blocks of up to 64 x 32."""
    plans = [p for p in persistent_plans(B, H, sms) if p.warps == warps_for(p.BB, p.BH)]
    if not plans:
        BB, BH = _pow2_at_least(B, 16, 64), _pow2_at_least(H, 16, 32)
        return Plan(BB, BH, 32, persistent=False, warps=warps_for(BB, BH))
    return max(plans, key=lambda p: (p.grid(B, H)[0] * p.grid(B, H)[1], p.BB))


def _multiprocessors(x: Tensor) -> int:
    if x.device.type == "cuda":
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1  # the interpreter: one program per launch keeps the persistent loop meaningful


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's float32 mode: TF32 where torch's float32 matmuls may use it (what the reference
    loop, a chain of cuBLAS matmuls, would do), else exact float32."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the kernels accumulate and keep the cell state: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_triton(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _step_notice(reason: str) -> None:
    warnings.warn(f"seqmodels: the GPU bptt kernels run one launch per time step (slower): {reason}", stacklevel=5)


def _launch(kernel, plan_: Plan, B: int, H: int, T: int, args: tuple, flags: dict, backward: bool) -> None:
    """All T steps: one persistent launch, or one launch per step (and again that way if the
    persistent launch's barrier timed out, since its results are then unusable)."""
    grid = plan_.grid(B, H)
    consts = dict(BB=plan_.BB, BH=plan_.BH, BK=plan_.BK, SPIN=SPIN, num_warps=plan_.warps, **flags)
    first = args[0]
    if plan_.persistent:
        sync = torch.zeros(2, dtype=torch.int32, device=first.device)
        span = (T, 0) if backward else (0, T)
        kernel[grid](*args, sync, *_span_args(B, H, T, span, backward), SYNC=True, **consts)
        if not int(sync[1]):
            return
        _step_notice("the persistent kernel's grid barrier timed out (is the GPU shared with other work?)")
        raise _BarrierTimeout
    sync = torch.zeros(2, dtype=torch.int32, device=first.device)
    steps = range(T - 1, -1, -1) if backward else range(T)
    for t in steps:
        span = (t + 1, t) if backward else (t, t + 1)
        kernel[grid](*args, sync, *_span_args(B, H, T, span, backward), SYNC=False, **consts)


class _BarrierTimeout(Exception):
    pass


def _span_args(B: int, H: int, T: int, span: tuple[int, int], backward: bool) -> tuple:
    return (B, H, T, span[1], span[0]) if backward else (B, H, span[0], span[1])


def _run(kernel, B: int, H: int, T: int, x: Tensor, make_args, flags: dict, backward: bool = False) -> None:
    """``_launch`` with a plan for this GPU. ``make_args(retry)`` gives the argument tensors; after
    a persistent launch timed out (its results unusable) it is called with retry=True and must
    restore what the launch overwrote, and the layer runs again one launch per step."""
    plan_ = plan(B, H, _multiprocessors(x))
    if not plan_.persistent and x.device.type == "cuda":
        _step_notice(f"batch {B} x hidden {H} needs more blocks than the GPU has multiprocessors")
    flags = dict(flags, PRECISION=_precision(x.dtype), ACC=_acc_triton(x.dtype),
                 UPCAST=interpreted() and x.dtype == torch.bfloat16)
    # Triton launches on the current device: with several GPUs (DDP), make it x's
    on_device = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        try:
            _launch(kernel, plan_, B, H, T, make_args(False), flags, backward)
        except _BarrierTimeout:
            _launch(kernel, dataclasses.replace(plan_, persistent=False), B, H, T, make_args(True), flags,
                    backward)


def _dummy(x: Tensor, t: Optional[Tensor]) -> Tensor:
    """A pointer for an optional input that is off (the kernel never reads it)."""
    return x if t is None else t


def _lengths(lengths: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(device=x.device, dtype=torch.int32).contiguous()


def _first_backward(ctx) -> None:
    """The backward overwrites the saved activations with δz (no second T·B·G buffer), so a
    second backward through the same forward (retain_graph=True) must fail loudly."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError("impl triton cannot backward twice through the same forward "
                           "(retain_graph=True); use impl: autograd for that")
    ctx.consumed = True


# ---------------------------------------------------------------------------------------
# Vanilla RNN
# ---------------------------------------------------------------------------------------
class RNNTriton(torch.autograd.Function):
    """One Elman layer, its time loops in Triton: the formulas of ``reference.RNNReference``."""

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                bias_hh: Tensor, lengths: Optional[Tensor], nonlinearity: str, save: bool,
                rho: Optional[Tensor] = None, d_h: Optional[Tensor] = None):
        T, B, I = x.shape
        H = weight_hh.shape[0]
        x2 = x.reshape(T * B, I)
        w_t = weight_hh.t().contiguous()
        rho, d_h, lens = _contiguous(rho, x), _contiguous(d_h, x), _lengths(lengths, x)
        flags = dict(TANH=nonlinearity == "tanh", HAS_RHO=rho is not None, HAS_DH=d_h is not None,
                     HAS_LEN=lens is not None)
        state = {}

        def make_args(retry: bool):
            state["xz"] = F.linear(x2, weight_ih, bias_ih + bias_hh).view(T, B, H)  # -> h̃_t
            state["hs"] = x.new_empty(T + 1, B, H)
            state["hs"][0] = h0
            return (state["xz"], state["hs"], w_t, _dummy(x, rho), _dummy(x, d_h), _dummy(x, lens))

        _run(triton_kernels().rnn_forward, B, H, T, x, make_args, flags)
        hs, acts = state["hs"], state["xz"]
        if save:
            ctx.save_for_backward(x2, hs, acts, weight_ih, weight_hh)
            ctx.bias = (bias_ih + bias_hh).detach()
            ctx.flags, ctx.rho, ctx.d_h, ctx.lens = flags, rho, d_h, lens
        return _Slots(lengths, T).masked_output(hs), hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor):
        _first_backward(ctx)
        x2, hs, acts, weight_ih, weight_hh = ctx.saved_tensors
        T, B, H = acts.shape
        dy = d_out.to(hs.dtype).contiguous()
        rho = ctx.rho
        state = {}

        def make_args(retry: bool):
            if retry:  # the timed-out launch overwrote part of the activations
                acts.copy_(_rnn_activations(x2, hs, weight_ih, weight_hh, ctx.bias, rho, ctx.flags["TANH"]))
            state["carry"] = d_hT.to(acc_dtype(hs.dtype)).contiguous().clone()
            return (acts, dy, weight_hh.contiguous(), state["carry"], _dummy(dy, rho), _dummy(dy, ctx.d_h),
                    _dummy(dy, ctx.lens))

        _run(triton_kernels().rnn_backward, B, H, T, hs, make_args, ctx.flags, backward=True)
        dz = acts  # now δz_t of every step
        back = dz[0] @ weight_hh
        d_h0 = state["carry"] + (back if rho is None else rho * back)
        dz2 = dz.view(T * B, H)
        need = ctx.needs_input_grad
        d_x = (dz2 @ weight_ih).view(T, B, -1) if need[0] else None
        h_prev = hs[:-1] if rho is None else hs[:-1] * rho
        d_w_ih = dz2.t() @ x2 if need[2] else None
        d_w_hh = dz2.t() @ h_prev.reshape(T * B, H) if need[3] else None
        d_b = dz2.sum(0) if (need[4] or need[5]) else None
        return (d_x, d_h0 if need[1] else None, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.clone(),
                None, None, None, None, None)


def _rnn_activations(x2: Tensor, hs: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor,
                     rho: Optional[Tensor], tanh: bool) -> Tensor:
    """h̃_t of every step at once from the saved states (no time loop: hs holds every h_{t-1})."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    h_prev = hs[:-1] if rho is None else hs[:-1] * rho
    z = F.linear(x2, weight_ih, bias).view(T, B, H) + h_prev @ weight_hh.t()
    return torch.tanh(z) if tanh else torch.relu(z)


def _lstm_activations(x2: Tensor, hs: Tensor, cs: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor,
                      peep: Optional[tuple], rho: Optional[Tensor]) -> Tensor:
    """i, f, g, o of every step at once from the saved states h_{t-1}, c_{t-1} (slots 0..T-1)."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    h_prev = hs[:-1] if rho is None else hs[:-1] * rho
    z = (F.linear(x2, weight_ih, bias).view(T, B, 4 * H) + h_prev @ weight_hh.t()).to(cs.dtype)
    z_i, z_f, z_g, z_o = z.chunk(4, -1)
    c_prev = cs[:-1]
    if peep is not None:
        z_i, z_f = z_i + peep[0] * c_prev, z_f + peep[1] * c_prev
    i, f, g = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g)
    c_til = f * c_prev + i * g
    o = torch.sigmoid(z_o + peep[2] * c_til if peep is not None else z_o)
    return torch.cat((i, f, g, o), -1)


# ---------------------------------------------------------------------------------------
# LSTM (optional peepholes)
# ---------------------------------------------------------------------------------------
class LSTMTriton(torch.autograd.Function):
    """One LSTM layer, its time loops in Triton: the formulas of ``reference.LSTMReference``;
    inputs and outputs as ``fast.LSTMFunction``."""

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, weight_ci: Optional[Tensor], weight_cf: Optional[Tensor],
                weight_co: Optional[Tensor], lengths: Optional[Tensor], save: bool, rho: Optional[Tensor] = None,
                d_h: Optional[Tensor] = None, d_c: Optional[Tensor] = None):
        T, B, I = x.shape
        H = weight_hh.shape[1]
        x2 = x.reshape(T * B, I)
        w_t = weight_hh.t().contiguous()
        peep = None if weight_ci is None else tuple(p.contiguous() for p in (weight_ci, weight_cf, weight_co))
        rho, d_h, d_c, lens = _contiguous(rho, x), _contiguous(d_h, x), _contiguous(d_c, x), _lengths(lengths, x)
        flags = dict(PEEP=peep is not None, HAS_RHO=rho is not None, HAS_DH=d_h is not None, HAS_DC=d_c is not None,
                     HAS_LEN=lens is not None)
        state = {}

        def make_args(retry: bool):
            state["xz"] = F.linear(x2, weight_ih, bias_ih + bias_hh).view(T, B, 4 * H)  # -> i, f, g, o
            state["hs"] = x.new_empty(T + 1, B, H)
            state["hs"][0] = h0
            state["cs"] = torch.empty(T + 1, B, H, dtype=acc_dtype(x.dtype), device=x.device)
            state["cs"][0] = c0
            return (state["xz"], state["hs"], state["cs"], w_t, _dummy(x, rho), _dummy(x, d_h), _dummy(x, d_c),
                    _dummy(x, lens), *(peep or (x, x, x)))

        _run(triton_kernels().lstm_forward, B, H, T, x, make_args, flags)
        hs, cs, acts = state["hs"], state["cs"], state["xz"]
        if save:
            ctx.save_for_backward(x2, hs, cs, acts, weight_ih, weight_hh)
            ctx.bias = (bias_ih + bias_hh).detach()
            ctx.flags, ctx.peep, ctx.rho, ctx.d_h, ctx.d_c, ctx.lens = flags, peep, rho, d_h, d_c, lens
        return _Slots(lengths, T).masked_output(hs), hs[T].clone(), cs[T].to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Tensor):
        _first_backward(ctx)
        x2, hs, cs, acts, weight_ih, weight_hh = ctx.saved_tensors
        T, B, H4 = acts.shape
        H = H4 // 4
        dy = d_out.to(hs.dtype).contiguous()
        rho, peep = ctx.rho, ctx.peep
        c_new = None
        if peep is not None and ctx.d_c is not None:  # p_o saw c̃_t = f c_{t-1} + i g, not the zoned-out c_t
            c_new = acts[..., H:2 * H] * cs[:-1] + acts[..., :H] * acts[..., 2 * H:3 * H]
        state = {}

        def make_args(retry: bool):
            if retry:  # the timed-out launch overwrote part of the activations
                acts.copy_(_lstm_activations(x2, hs, cs, weight_ih, weight_hh, ctx.bias, peep, rho))
            state["h"] = d_hT.to(acc_dtype(hs.dtype)).contiguous().clone()
            state["c"] = d_cT.to(acc_dtype(hs.dtype)).contiguous().clone()
            return (acts, cs, dy, weight_hh.contiguous(), state["h"], state["c"], _dummy(dy, rho), _dummy(dy, ctx.d_h),
                    _dummy(dy, ctx.d_c), _dummy(dy, ctx.lens), *(peep or (dy, dy, dy)))

        _run(triton_kernels().lstm_backward, B, H, T, hs, make_args, ctx.flags, backward=True)
        dz = acts  # now δz_t of every step, gates (i, f, g, o)
        back = dz[0] @ weight_hh
        d_h0 = state["h"] + (back if rho is None else rho * back)
        h_prev = hs[:-1] if rho is None else hs[:-1] * rho
        grads = _lstm_grads(ctx.needs_input_grad, dz, dy, x2, h_prev, None if peep is None else cs[:-1],
                            cs[1:] if c_new is None else c_new, weight_ih, d_h0.to(hs.dtype), state["c"].to(hs.dtype))
        return (*grads, None, None, None)


# ---------------------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------------------
def _gru_activations(x2: Tensor, hs: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                     bias_hh: Tensor, rho: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(r, z, n) and b^n of every step at once from the saved states s_{t-1} (slots 0..T-1)."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    s_in = hs[:-1] if rho is None else hs[:-1] * rho
    a_r, a_z, a_n = F.linear(x2, weight_ih, bias_ih).view(T, B, 3 * H).chunk(3, -1)
    b_r, b_z, b_n = (s_in @ weight_hh.t() + bias_hh).chunk(3, -1)
    r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
    return torch.cat((r, z, torch.tanh(a_n + r * b_n)), -1), b_n


class GRUTriton(torch.autograd.Function):
    """One GRU layer, its time loops in Triton: the formulas of ``reference.GRUReference``."""

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                bias_hh: Tensor, lengths: Optional[Tensor], save: bool, rho: Optional[Tensor] = None,
                d_h: Optional[Tensor] = None):
        T, B, I = x.shape
        H = weight_hh.shape[1]
        x2 = x.reshape(T * B, I)
        w_t = weight_hh.t().contiguous()
        rho, d_h, lens = _contiguous(rho, x), _contiguous(d_h, x), _lengths(lengths, x)
        flags = dict(HAS_RHO=rho is not None, HAS_DH=d_h is not None, HAS_LEN=lens is not None)
        state = {}

        def make_args(retry: bool):
            state["xz"] = F.linear(x2, weight_ih, bias_ih).view(T, B, 3 * H)  # -> r, z, n
            state["b_n"] = x.new_empty(T, B, H)
            state["hs"] = x.new_empty(T + 1, B, H)
            state["hs"][0] = h0
            return (state["xz"], state["hs"], state["b_n"], w_t, bias_hh.contiguous(), _dummy(x, rho), _dummy(x, d_h),
                    _dummy(x, lens))

        _run(triton_kernels().gru_forward, B, H, T, x, make_args, flags)
        hs, acts, b_n = state["hs"], state["xz"], state["b_n"]
        if save:
            ctx.save_for_backward(x2, hs, acts, b_n, weight_ih, weight_hh, bias_ih, bias_hh)
            ctx.flags, ctx.rho, ctx.d_h, ctx.lens = flags, rho, d_h, lens
        return _Slots(lengths, T).masked_output(hs), hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor):
        _first_backward(ctx)
        x2, hs, acts, b_n, weight_ih, weight_hh, bias_ih, bias_hh = ctx.saved_tensors
        T, B, H3 = acts.shape
        H = H3 // 3
        dy = d_out.to(hs.dtype).contiguous()
        rho = ctx.rho
        state = {}

        def make_args(retry: bool):
            if retry:  # the timed-out launch overwrote part of the activations and b^n
                gates, b = _gru_activations(x2, hs, weight_ih, weight_hh, bias_ih, bias_hh, rho)
                acts.copy_(gates)
                b_n.copy_(b)
            state["carry"] = d_hT.to(acc_dtype(hs.dtype)).contiguous().clone()
            return (acts, b_n, hs, dy, weight_hh.contiguous(), state["carry"], _dummy(dy, rho), _dummy(dy, ctx.d_h),
                    _dummy(dy, ctx.lens))

        _run(triton_kernels().gru_backward, B, H, T, hs, make_args, ctx.flags, backward=True)
        d_b = acts  # now δb_t of every step; b_n holds δa^n
        back = d_b[0] @ weight_hh
        d_h0 = state["carry"] + (back if rho is None else rho * back)
        need = ctx.needs_input_grad
        db2 = d_b.view(T * B, 3 * H)
        s_prev = hs[:-1] if rho is None else hs[:-1] * rho
        d_w_hh = db2.t() @ s_prev.reshape(T * B, H) if need[3] else None
        d_b_hh = db2.sum(0) if need[5] else None
        d_b[..., 2 * H:] = b_n  # δa = δb but in the n block
        d_w_ih = db2.t() @ x2 if need[2] else None
        d_b_ih = db2.sum(0) if need[4] else None
        d_x = (db2 @ weight_ih).view(T, B, -1) if need[0] else None
        return (d_x, d_h0.to(hs.dtype) if need[1] else None, d_w_ih, d_w_hh, d_b_ih, d_b_hh, None, None, None, None)
