"""Backpropagation through time, the fast path: the time loops in C++ (``csrc/fused_bptt.cpp``,
built by ``fused.py``) for CPU float32/float64, the formulas of ``reference.py`` (docs/bptt.md)
written for speed. Tested against ``reference.py`` and autograd.

Each Function runs the recurrence of ONE layer over the whole sequence. Its forward keeps only
what the backward needs; its backward walks the sequence from the end to the start.

Conventions inside this module (the stack converts):
    time-major tensors: x (T, B, I), outputs (T, B, H); per-step slices ``buf[t]`` are then
    contiguous (B, ·) blocks, and ``buf.view(T * B, ·)`` is a free reshape for the big GEMMs.
    State buffers have T+1 slots: slot 0 is the initial state, slot t the state after step t.
    lengths (B,) int64 in [0, T], or None (every sequence is T long).
    reverse=True runs the reverse direction of a bidirectional layer on x as it is, each sequence
    from its own last step (n_b - 1) to its first; its state buffers hold the state after time t
    in slot t and the initial state in slot T (``_Slots``).

Variable lengths follow torch's PackedSequence semantics (docs/bptt.md, "Masks"): the padding is
a suffix, so in the backward the masks disappear from the time loop: ∂L/∂y_t is zeroed at
padded steps and the final state's gradient is added at step n_b (not at T).

Cost model, the point of this module: per time step only the recurrent GEMM (B, H) @ (H, G)
and one fused elementwise pass run. Everything that does not depend on the previous step is
done once for all T steps:
    input projection   X (T·B, I) @ W_ihᵀ + b             one GEMM in the forward
    weight gradients   dW_ih = dZᵀ X, dW_hh = dZᵀ H_prev   one GEMM each in the backward
    input gradient     dX = dZ W_ih                       one GEMM in the backward
where dZ (T·B, G) holds ∂L/∂(pre-activation) of every step. On CPU in float32 these GEMMs run
in oneDNN on AVX-512 (``_linear``), and the big buffers come from a pool (``_BufferPool``).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqmodels import compat, fused


class _Slots:
    """Where a direction keeps its states in the (T+1)-slot buffers (the C++ loops' ``Order``),
    and what the loops need to know about the lengths (None: all sequences are T long).
    Forward: [initial, after time 0, ..., after T-1]; reverse: [after 0, ..., after T-1,
    initial], so that in both the outputs are in time order and the final state of every row is
    in one slot (forward: T, the padded times carry it there; reverse: 0)."""

    def __init__(self, lengths: Optional[Tensor], T: int, reverse: bool = False) -> None:
        self.lengths, self.reverse = lengths, reverse
        self.initial, self.final = (T, 0) if reverse else (0, T)
        if lengths is None:
            self.mask = None
            return
        steps = torch.arange(T, device=lengths.device).unsqueeze(1)
        self.mask = (steps < lengths.unsqueeze(0)).unsqueeze(-1)  # (T, B, 1) bool

    def new(self, buf: Tensor) -> Tensor:
        """The states after each time t, (T, B, ·), from a buffer of T+1 slots."""
        return buf[:-1] if self.reverse else buf[1:]

    def prev(self, buf: Tensor) -> Tensor:
        """The states each time t starts from, (T, B, ·)."""
        return buf[1:] if self.reverse else buf[:-1]

    def masked_output(self, hs: Tensor) -> Tensor:
        """y_t = m_t h̃_t from the state buffer (T+1, B, H)."""
        return self.new(hs) if self.mask is None else self.new(hs) * self.mask

    def grad_in_slots(self, d_out: Tensor, d_final: Tensor, slots: Tensor) -> None:
        """slots (T+1, B, H) <- ∂L/∂y_t at valid times (the slot of the state after t), plus the
        final state's gradient where each row's final state is computed: forward at its last
        valid time's slot n_b (the padded times carry it on to slot T), reverse at slot 0."""
        slots[self.initial].zero_()
        if self.mask is None:
            self.new(slots).copy_(d_out)
        else:
            torch.mul(d_out, self.mask, out=self.new(slots))
        if self.mask is None or self.reverse:
            slots[self.final] += d_final
        else:
            batch = torch.arange(d_final.shape[0], device=d_final.device)
            slots.index_put_((self.lengths, batch), d_final, accumulate=True)


class _BufferPool:
    """Big buffers reused across calls, so that their memory pages are not faulted in again.

    On CPU torch allocates with malloc, and glibc serves allocations above 32 MB with mmap and
    returns them to the OS on free: every training step then pays page faults for hundreds of
    MB, a large share of a step at the bigger sizes (docs/bptt.md, "Buffer pool"). Buffers
    that never leave a Function (the LSTM's backward factors and cell states, the gradient
    buffers of the backward) come back here when no longer needed and are handed out again;
    buffers smaller than ``min_bytes`` or not on the CPU bypass the pool, at most ``max_bytes``
    are kept. ``clear_buffer_pool()`` empties it.
    """

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 2 << 30) -> None:
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self._free: dict[tuple, list[Tensor]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def _key(self, numel: int, like: Tensor, inference: bool):
        nbytes = numel * like.element_size()
        if like.device.type != "cpu" or nbytes < self.min_bytes:
            return None
        # a buffer made under torch.inference_mode (Lightning's test and predict) is an inference
        # tensor, which no in-place op may write outside that mode: each mode has its own buffers
        return numel, like.dtype, inference

    def empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device."""
        numel = 1
        for n in shape:
            numel *= n
        key = self._key(numel, like, torch.is_inference_mode_enabled())
        if key is not None:
            with self._lock:
                free = self._free.get(key)
                if free:
                    self._bytes -= numel * like.element_size()
                    return free.pop().view(shape)
        return like.new_empty(shape)

    def release(self, *tensors: Optional[Tensor]) -> None:
        """Give buffers back; the caller must hold no other reference to their memory."""
        for t in tensors:
            key = None if t is None else self._key(t.numel(), t, t.is_inference())
            if key is None or not t.is_contiguous() or t.storage_offset() != 0:
                continue
            nbytes = t.numel() * t.element_size()
            with self._lock:
                if self._bytes + nbytes <= self.max_bytes:
                    self._free.setdefault(key, []).append(t.detach().view(-1))
                    self._bytes += nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


_POOL = _BufferPool()


def clear_buffer_pool() -> None:
    """Free the buffers kept for reuse by the bptt Functions."""
    _POOL.clear()


def _use_onednn(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and _HAS_MKLDNN_LINEAR
            and _AVX512)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weightᵀ + bias`` for the big, once-per-call GEMMs (input projection, dX).

    On an AVX-512 CPU in float32 this calls oneDNN's GEMM: torch's own float32 GEMM is MKL,
    which on AVX-512 AMD CPUs takes a non-AVX-512 path; on AVX2, and elsewhere,
    ``torch.nn.functional.linear`` (the measurements: docs/bptt.md, "Implementation details").
    """
    if _use_onednn(x):
        return compat.onednn_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _linear_pooled(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``_linear`` into a buffer of the pool (give it back with ``_POOL.release``)."""
    if _use_onednn(x):
        return _linear(x, weight, bias)
    out = _POOL.empty((x.shape[0], weight.shape[0]), x)
    return torch.addmm(bias, x, weight.t(), out=out)


def _grad_weight(dz: Tensor, inputs: Tensor) -> Tensor:
    """dW = dZᵀ @ inputs, summed over all T·B rows at once: dz (T·B, G), inputs (T·B, K).

    oneDNN wants the summed dimension contiguous in both operands: the smaller one, inputs,
    is transposed into (K, T·B) and dZ is passed as a transposed weight, which gives dWᵀ
    (AVX-512 only; elsewhere MKL's ``dz.t() @ inputs``, see ``_linear``).
    """
    if _use_onednn(dz):
        inputs_t = _POOL.empty(inputs.shape[::-1], inputs).copy_(inputs.t())
        grad_t = compat.onednn_linear(inputs_t, dz.t())
        _POOL.release(inputs_t)
        return grad_t.t()
    return dz.t() @ inputs


DTYPES = (torch.float32, torch.float64)  # what the C++ loops are compiled for


def runs(x: Tensor) -> bool:
    """Whether the C++ loops can run a layer with input x: a CPU float32/float64 tensor, the
    loops built (the first call builds them) and compiled code not turned off."""
    return x.device.type == "cpu" and x.dtype in DTYPES and fused.loops() is not None


def _contiguous(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if t is None else t.to(like.dtype).contiguous()


def _gemm_input(h0: Tensor, rho: Optional[Tensor]) -> Optional[Tensor]:
    """The loop's buffer of h_{t-1} ⊙ ρ (two alternating slots), slot 0 = h_0 ⊙ ρ; None without ρ."""
    if rho is None:
        return None
    hin = h0.new_empty(2, *h0.shape)
    torch.mul(h0, rho, out=hin[0])
    return hin


_HAS_MKLDNN_LINEAR = compat.has_onednn_linear()
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# ---------------------------------------------------------------------------------------
# Vanilla RNN
# ---------------------------------------------------------------------------------------
class RNNFunction(torch.autograd.Function):
    """One Elman layer, forward and hand-written backward through time.

    Forward, for t = 1..T (z_t the pre-activation, f = tanh or relu, s_0 = h0):
        z_t = W_ih x_t + b_ih + b_hh + W_hh s_{t-1}
        h̃_t = f(z_t),   s_t = m_t h̃_t + (1 - m_t) s_{t-1},   y_t = m_t h̃_t
    The x-part of every z_t is one GEMM, X (T·B, I) @ W_ihᵀ, before the loop; each step of the
    C++ loop adds W_hh s_{t-1} (one GEMM) and applies f in one vectorized pass. The states
    ``hs`` are all the backward needs: tanh'(z) = 1 - h̃², relu'(z) = [h̃ > 0].

    Backward, for t = T..1, with δs_t = ∂L/∂s_t (from later steps, the output y_t and, at
    t = n_b, the final state):
        δz_t     = δs_t ⊙ f'(z_t)
        δs_{t-1} = δz_t W_hh + ∂L/∂y_{t-1}        (row vectors; W_hhᵀ δz_t as columns)
    i.e. the textbook δh_{t-1} = W_hhᵀ(δh_t ⊙ f'(z_t)) + ∂L/∂h_{t-1}: one pass and one GEMM
    per step. Then, with dZ (T·B, H) the δz_t of all steps and S_prev (T·B, H) the states
    s_0..s_{T-1}:
        dW_hh = dZᵀ S_prev,  dW_ih = dZᵀ X,  db_ih = db_hh = Σ_rows dZ,  dX = dZ W_ih,
        dh0 = δs_0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, lengths: Optional[Tensor],
                nonlinearity: str, save: bool, rho: Optional[Tensor] = None, d_h: Optional[Tensor] = None,
                reverse: bool = False):
        """``ρ`` (B, H), ``d_h`` (T, B, H): recurrent dropout and zoneout (docs/bptt.md,
        "Regularizers"), None when off; with zoneout the loop leaves h̃_t in xz for the backward.
        ``reverse``: the reverse direction (module docstring)."""
        T, B, I = x.shape
        H = weight_hh.shape[0]
        loops = fused.loops()
        lens = _Slots(lengths, T, reverse)
        tanh = nonlinearity == "tanh"
        hs = x.new_empty(T + 1, B, H)  # the initial state and s_t (_Slots)
        hs[lens.initial] = h0
        x2 = x.reshape(T * B, I)
        xz = _linear_pooled(x2, weight_ih, bias_ih + bias_hh).view(T, B, H)
        rho, d_h = _contiguous(rho, x), _contiguous(d_h, x)
        hin = _gemm_input(h0, rho)
        loops.rnn_forward(xz, hs, weight_hh.contiguous(), lengths, tanh, rho, d_h, hin, reverse)
        htil = xz if d_h is not None and save else None  # h̃_t of every step
        if htil is None:
            _POOL.release(xz)
        if save:
            ctx.save_for_backward(x2, hs, weight_ih, weight_hh)
            ctx.tanh, ctx.lens, ctx.loops, ctx.rho, ctx.d_h, ctx.htil = tanh, lens, loops, rho, d_h, htil
            if htil is not None:
                weakref.finalize(ctx, _POOL.release, htil)
        return lens.masked_output(hs), hs[lens.final].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor):
        x2, hs, weight_ih, weight_hh = ctx.saved_tensors
        T1, B, H = hs.shape
        T = T1 - 1
        # dy: ∂L/∂y_t in the slot of s_t, plus the final state's gradient (_Slots)
        lens = ctx.lens
        dy = _POOL.empty((T + 1, B, H), hs)
        lens.grad_in_slots(d_out, d_hT, dy)
        dz = _POOL.empty((T, B, H), hs)
        ctx.loops.rnn_backward(hs, dy, weight_hh.contiguous(), dz, lens.lengths, ctx.tanh, ctx.rho, ctx.d_h,
                               ctx.htil, lens.reverse)  # leaves δs_t in s_t's slot
        ds = dy[lens.initial].clone()
        dz = dz.view(T * B, H)
        need = ctx.needs_input_grad
        d_x = _linear(dz, weight_ih.t()).view(T, B, -1) if need[0] else None
        d_h0 = ds if need[1] else None
        d_w_ih = _grad_weight(dz, x2) if need[2] else None  # dZᵀ X
        s_prev = lens.prev(hs) if ctx.rho is None else lens.prev(hs) * ctx.rho  # what the GEMMs multiplied W_hh with
        d_w_hh = _grad_weight(dz, s_prev.reshape(T * B, H)) if need[3] else None  # dZᵀ S_prev
        d_b = dz.sum(0) if (need[4] or need[5]) else None
        _POOL.release(dy, dz)
        return (d_x, d_h0, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.clone(), None, None, None, None, None,
                None)


# ---------------------------------------------------------------------------------------
# LSTM (with optional peepholes)
# ---------------------------------------------------------------------------------------
class LSTMFunction(torch.autograd.Function):
    """One LSTM layer (PyTorch's equations, optional peepholes), its time loops in C++: the
    formulas of ``reference.LSTMReference`` (docs/bptt.md, section 3). The forward keeps the
    activations of every step; the backward's C++ loop forms from them the factors that
    multiply δh_t and δĉ_t (docs/bptt.md, "Factoring the backward step"), then the weight,
    bias, input and peephole gradients come from dZ of all steps at once (``_lstm_grads``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, weight_ci: Optional[Tensor],
                weight_cf: Optional[Tensor], weight_co: Optional[Tensor],
                lengths: Optional[Tensor], save: bool, rho: Optional[Tensor] = None,
                d_h: Optional[Tensor] = None, d_c: Optional[Tensor] = None, reverse: bool = False):
        """torch's gate order (i, f, g, o), one fused kernel per step. It keeps the activations
        i, f, g, o and tanh(c̃) of every step, from which the backward's kernel forms the factors."""
        loops = fused.loops()
        T, B, I = x.shape
        H = weight_hh.shape[1]
        x2 = x.reshape(T * B, I)
        acts = _linear_pooled(x2, weight_ih, bias_ih + bias_hh).view(T, B, 4 * H)  # -> gates
        lens = _Slots(lengths, T, reverse)
        hs, cs = x.new_empty(T + 1, B, H), _POOL.empty((T + 1, B, H), x)
        hs[lens.initial], cs[lens.initial] = h0, c0
        tcs = _POOL.empty((T, B, H), x) if save else x.new_empty(1, B, H)  # tanh(c̃_t)
        peep = None if weight_ci is None else torch.stack((weight_ci, weight_cf, weight_co))
        rho, d_h, d_c = _contiguous(rho, x), _contiguous(d_h, x), _contiguous(d_c, x)
        loops.lstm_forward(acts, hs, cs, weight_hh.contiguous(), peep, lengths, tcs, rho, d_h, d_c,
                           _gemm_input(h0, rho), reverse)
        c_T = cs[lens.final].clone()
        if save:
            ctx.save_for_backward(x2, hs, cs, acts, tcs, weight_ih, weight_hh, peep)
            ctx.lengths, ctx.lens, ctx.loops = lengths, lens, loops
            ctx.rho, ctx.d_h, ctx.d_c = rho, d_h, d_c
            weakref.finalize(ctx, _POOL.release, cs, tcs, acts)
        else:
            _POOL.release(cs, acts)
        return lens.masked_output(hs), hs[lens.final].clone(), c_T

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Tensor):
        """Its time loop in C++, gates in torch's order (i, f, g, o)."""
        x2, hs, cs, acts, tcs, weight_ih, weight_hh, peep = ctx.saved_tensors
        T, B, H4 = acts.shape
        H = H4 // 4
        lens = ctx.lens
        dy = _POOL.empty((T + 1, B, H), hs)
        lens.grad_in_slots(d_out, d_hT, dy)
        dz = _POOL.empty((T, B, 4 * H), hs)  # δz_t, gates (i, f, g, o)
        d_c0 = ctx.loops.lstm_backward(acts, tcs, cs, dy, d_cT, weight_hh.contiguous(), peep,
                                       ctx.lengths, dz, ctx.rho, ctx.d_h, ctx.d_c, lens.reverse)
        d_h0 = dy[lens.initial].clone()  # the loop leaves δh_t in h_t's slot
        h_prev = lens.prev(hs) if ctx.rho is None else lens.prev(hs) * ctx.rho  # what the GEMMs multiplied W_hh with
        c_prev, c_new = lens.prev(cs), lens.new(cs)
        if peep is not None and ctx.d_c is not None:  # zoned-out c: p_o saw c̃_t = f c_{t-1} + i g
            c_new = acts[..., H:2 * H] * c_prev + acts[..., :H] * acts[..., 2 * H:3 * H]
        grads = _lstm_grads(ctx.needs_input_grad, dz, dy, x2, h_prev, c_prev if peep is not None else None,
                            c_new, weight_ih, d_h0, d_c0)
        return (*grads, None, None, None, None)


def _lstm_grads(need, dz: Tensor, dy: Tensor, x2: Tensor, h_prev: Tensor, c_prev: Optional[Tensor],
                c_new: Tensor, weight_ih: Tensor, d_h0: Tensor, d_c0: Tensor) -> tuple:
    """What ``LSTMFunction.backward`` returns, from dZ (T, B, 4H) of all steps at once:
        dX = dZ W_ih,  dW_ih = dZᵀ X,  dW_hh = dZᵀ H_prev,  db = Σ_rows dZ,
        dp_i = Σ δz^i ⊙ c_{t-1},  dp_f = Σ δz^f ⊙ c_{t-1},  dp_o = Σ δz^o ⊙ c̃_t  (c_prev given:
        peepholes; c_new (T, B, H) is c̃_t).
    dZ's gates are in torch's order (i, f, g, o). Gives the buffers dy and dz back to the pool."""
    T, B, H4 = dz.shape
    H = H4 // 4
    dz2 = dz.view(T * B, 4 * H)
    d_x = _linear(dz2, weight_ih.t()).view(T, B, -1) if need[0] else None
    d_w_ih = _grad_weight(dz2, x2) if need[3] else None
    d_w_hh = _grad_weight(dz2, h_prev.reshape(T * B, H)) if need[4] else None
    d_b = dz2.sum(0) if (need[5] or need[6]) else None
    d_ci = d_cf = d_co = None
    if c_prev is not None:
        gate = lambda k: dz[..., k * H:(k + 1) * H]  # noqa: E731
        d_ci = (gate(0) * c_prev).sum((0, 1))
        d_cf = (gate(1) * c_prev).sum((0, 1))
        d_co = (gate(3) * c_new).sum((0, 1))
    _POOL.release(dy, dz)
    return (d_x, d_h0 if need[1] else None, d_c0 if need[2] else None, d_w_ih, d_w_hh, d_b,
            None if d_b is None else d_b.clone(), d_ci, d_cf, d_co, None, None)
