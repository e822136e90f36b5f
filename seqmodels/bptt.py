"""Backpropagation through time written by hand: one ``torch.autograd.Function`` per cell kind.

Each Function runs the recurrence of ONE layer over the whole sequence. Its forward runs under
no_grad (no autograd graph: one node for the whole layer) and keeps only what the backward
needs; its backward walks the sequence from the end to the start and applies the chain rule by
hand. ``RecurrentStack(impl="bptt")`` calls the Function once per layer and keeps the dropout
between layers outside, as ordinary autograd ops. The derivations, step by step, are in
``docs/bptt.md``.

Conventions inside this module (the stack converts):
    time-major tensors: x (T, B, I), outputs (T, B, H); per-step slices ``buf[t]`` are then
    contiguous (B, ·) blocks, and ``buf.view(T * B, ·)`` is a free reshape for the big GEMMs.
    State buffers have T+1 slots: slot 0 is the initial state, slot t the state after step t.
    lengths (B,) int64 in [0, T], or None (every sequence is T long).

Variable lengths follow torch's PackedSequence semantics. With m_t = [t <= n_b] for sequence b
of length n_b and h̃_t the cell's update:
    s_t = m_t h̃_t + (1 - m_t) s_{t-1}     (the state stops changing past the end)
    y_t = m_t h̃_t                         (outputs are 0 at padded steps)
so the final state is s_{n_b}. In the backward the padding is a suffix, which makes the
masks disappear from the time loop: ∂L/∂y_t is zeroed at padded steps, the final state's
gradient is added at step n_b (not at T), and the gradients of padded rows are then exactly 0
at every step t > n_b; zeros propagate through every formula below (every factor is finite:
the frozen states are), so no per-step mask op is needed. See docs/bptt.md, "Masks".

Cost model, the point of this module: per time step only the recurrent GEMM (B, H) @ (H, G)
and a handful of elementwise kernels writing into preallocated buffers run. Everything that
does not depend on the previous step is done once for all T steps:
    input projection   X (T·B, I) @ W_ihᵀ + b             one GEMM in the forward
    weight gradients   dW_ih = dZᵀ X, dW_hh = dZᵀ H_prev   one GEMM each in the backward
    input gradient     dX = dZ W_ih                       one GEMM in the backward
where dZ (T·B, G) holds ∂L/∂(pre-activation) of every step. The LSTM's backward step is
reduced to four elementwise kernels by factors the forward computes (``LSTMFunction``).
On CPU in float32 the GEMMs run in oneDNN (``_RecurrentMatmul``, ``_linear``).

On CPU (float32, float64) the two time loops run in C++ when ``fused.py`` could build
``csrc/``: the same recursions, one BLAS GEMM and one fused elementwise pass per step
(``_forward_fused`` / ``_backward_fused`` for the LSTM, a branch in the RNN's methods). The
Python loops below remain the reference, the GPU path and the fallback.

Autocast: the Functions compute in float32. ``rnn_layer`` / ``lstm_layer`` cast floating
inputs to float32 and switch autocast off when it is on (what ``torch.amp.custom_fwd(...,
cast_inputs=torch.float32)`` does, but for whatever device type x lives on); autograd casts the
float32 gradients back to the inputs' dtypes.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqmodels import compat, fused

_aten = torch.ops.aten
_sigmoid_backward = _aten.sigmoid_backward  # (grad, y) -> grad ⊙ y(1 - y)
_tanh_backward = _aten.tanh_backward  # (grad, y) -> grad ⊙ (1 - y²)


class _Lengths:
    """What the time loops need to know about the lengths (None: all sequences are T long)."""

    def __init__(self, lengths: Optional[Tensor], T: int, like: Tensor) -> None:
        self.lengths = lengths
        if lengths is None:
            self.first_partial, self.ends, self.mask = T, {T}, None
            return
        self.first_partial = int(lengths.min())  # steps s < this (0-based) have no padding
        self.ends = set(lengths.tolist())  # state slots where some sequence ends
        steps = torch.arange(T, device=lengths.device).unsqueeze(1)
        self.mask = (steps < lengths.unsqueeze(0)).unsqueeze(-1)  # (T, B, 1) bool

    def masked_output(self, hs: Tensor) -> Tensor:
        """y_t = m_t h̃_t from the state buffer (T+1, B, H)."""
        return hs[1:] if self.mask is None else hs[1:] * self.mask

    def grad_in_slots(self, d_out: Tensor, d_final: Tensor, slots: Tensor) -> None:
        """slots (T+1, B, H) <- ∂L/∂y_t at valid steps (slot t), plus ∂L/∂s_T at slot n_b."""
        slots[0].zero_()
        if self.mask is None:
            slots[1:].copy_(d_out)
            slots[-1] += d_final
        else:
            torch.mul(d_out, self.mask, out=slots[1:])
            batch = torch.arange(d_final.shape[0], device=d_final.device)
            slots.index_put_((self.lengths, batch), d_final, accumulate=True)


class _RecurrentMatmul:
    """``h -> h @ Wᵀ + add`` for a weight W (N, K) that stays fixed for the whole sequence.

    On CPU in float32, for weights of at least ``PACKED_GEMM_MIN_NUMEL`` entries (2^16 with
    AVX-512, 2^18 without), W is reordered ONCE per call into
    oneDNN's blocked layout (``compat.onednn_pack_weight``) and each step runs
    oneDNN's JIT GEMM with the addition fused (``_linear_pointwise.binary(..., "add")``).
    What pays depends on the CPU. On an AVX-512 AMD host oneDNN was 2x-2.6x faster than MKL's
    ``addmm`` for (B, H) @ (H, 4H) at H = 256 / 512. On this project's AVX2 AMD host it is
    ~10% faster for (64, 512) @ (512, 2048), ~5% for (32, 256) @ (256, 1024), even for
    (64, 512) @ (512, 512), and 1.7x-4x SLOWER for weights of 2^16 entries and fewer (plus
    ~0.1 ms per reorder); with AVX-512 it was ~10% faster at 2^16 and 2x slower for a 128 x 128
    weight. Smaller weights keep ``addmm``, as does every other device and dtype (float64 in
    gradcheck).
    """

    def __init__(self, weight: Tensor, batch_size: int) -> None:
        self.packed = None
        if (weight.device.type == "cpu" and weight.dtype == torch.float32
                and weight.numel() >= PACKED_GEMM_MIN_NUMEL and _HAS_MKLDNN_LINEAR):
            self.packed = compat.onednn_pack_weight(weight, batch_size)
        else:
            self.weight_t = weight.t()

    def __call__(self, h: Tensor, add: Tensor) -> Tensor:
        if self.packed is not None:
            return compat.onednn_linear_add(h, add, self.packed)
        return torch.addmm(add, h, self.weight_t)


class _BufferPool:
    """Big buffers reused across calls, so that their memory pages are not faulted in again.

    On CPU torch allocates with malloc, and glibc serves allocations above 32 MB with mmap and
    returns them to the OS on free: every training step then pays page faults for hundreds of
    MB. Measured at (B, T, I, H) = (64, 256, 64, 512) on one core: ~300 ms of system time per
    training step, for torch.nn.LSTM as for this module, against ~650 ms of compute. Buffers
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

    def _key(self, numel: int, like: Tensor):
        nbytes = numel * like.element_size()
        if like.device.type != "cpu" or nbytes < self.min_bytes:
            return None
        return numel, like.dtype

    def empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device."""
        numel = 1
        for n in shape:
            numel *= n
        key = self._key(numel, like)
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
            key = None if t is None else self._key(t.numel(), t)
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
    which on an AVX-512 AMD CPU takes a non-AVX-512 path and ran at about half of oneDNN's
    speed. On AVX2 the two were measured equal, and MKL 10-35% faster for ``_grad_weight``:
    there, and elsewhere, ``torch.nn.functional.linear``.
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
    (1.7-2x faster than MKL's ``dz.t() @ inputs`` on an AVX-512 AMD CPU, copy included; on
    AVX2 MKL is faster and is used, as on every other device).
    """
    if _use_onednn(dz):
        inputs_t = _POOL.empty(inputs.shape[::-1], inputs).copy_(inputs.t())
        grad_t = compat.onednn_linear(inputs_t, dz.t())
        _POOL.release(inputs_t)
        return grad_t.t()
    return dz.t() @ inputs


def _fused_kernels(x: Tensor):
    """The C++ time loops (``fused.py``) for a CPU float32/float64 x, else None (Python loops)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return fused.kernels()


_HAS_MKLDNN_LINEAR = compat.has_onednn_linear()
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# _RecurrentMatmul: oneDNN's packed GEMM from this weight size (measured per ISA, see there)
PACKED_GEMM_MIN_NUMEL = 1 << 16 if _AVX512 else 1 << 18
BATCHED_FACTORS_MAX_BH = 1 << 14  # LSTMFunction: up to this B·H, backward factors after the loop


# ---------------------------------------------------------------------------------------
# Vanilla RNN
# ---------------------------------------------------------------------------------------
class RNNFunction(torch.autograd.Function):
    """One Elman layer, forward and hand-written backward through time.

    Forward, for t = 1..T (z_t the pre-activation, f = tanh or relu, s_0 = h0):
        z_t = W_ih x_t + b_ih + b_hh + W_hh s_{t-1}
        h̃_t = f(z_t),   s_t = m_t h̃_t + (1 - m_t) s_{t-1},   y_t = m_t h̃_t
    The x-part of every z_t is one GEMM, X (T·B, I) @ W_ihᵀ, before the loop; each step adds
    W_hh s_{t-1} (one GEMM with the addition fused, see ``_RecurrentMatmul``) and applies f.
    torch's tanh kernel is ~5x slower than its sigmoid on CPU, so tanh(z) = 1 - 2σ(-2z), the
    factor -2 folded into the weights once: three kernels per step. The states ``hs`` are all
    the backward needs: tanh'(z) = 1 - h̃², relu'(z) = [h̃ > 0].

    Backward, for t = T..1, with δs_t = ∂L/∂s_t (from later steps, the output y_t and, at
    t = n_b, the final state):
        δz_t     = δs_t ⊙ f'(z_t)
        δs_{t-1} = δz_t W_hh + ∂L/∂y_{t-1}        (row vectors; W_hhᵀ δz_t as columns)
    i.e. the textbook δh_{t-1} = W_hhᵀ(δh_t ⊙ f'(z_t)) + ∂L/∂h_{t-1}: two kernels per step
    (``tanh_backward`` / ``threshold_backward``, then the GEMM with ∂L/∂y_{t-1} added). Then,
    with dZ (T·B, H) the δz_t of all steps and S_prev (T·B, H) the states s_0..s_{T-1}:
        dW_hh = dZᵀ S_prev,  dW_ih = dZᵀ X,  db_ih = db_hh = Σ_rows dZ,  dX = dZ W_ih,
        dh0 = δs_0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, lengths: Optional[Tensor],
                nonlinearity: str, save: bool):
        T, B, I = x.shape
        H = weight_hh.shape[0]
        lens = _Lengths(lengths, T, x)
        tanh = nonlinearity == "tanh"
        hs = x.new_empty(T + 1, B, H)  # hs[0] = s_0, hs[t] = s_t
        hs[0] = h0
        x2 = x.reshape(T * B, I)
        kernels = _fused_kernels(x)
        if kernels is not None:  # this loop in C++, one fused kernel per step (fused_bptt.cpp)
            xz = _linear_pooled(x2, weight_ih, bias_ih + bias_hh).view(T, B, H)
            kernels.rnn_forward(xz, hs, weight_hh.contiguous(), lengths, tanh)
            _POOL.release(xz)
        else:
            k = -2.0 if tanh else 1.0  # tanh(z) = 1 - 2σ(-2z): compute -2z directly
            one = x.new_ones(())
            # k·(W_ih x_t + b) for all T steps, both biases folded in: one GEMM
            xz = _linear(x2, weight_ih * k, (bias_ih + bias_hh) * k).view(T, B, H).unbind(0)
            recurrent = _RecurrentMatmul(weight_hh * k, B)
            states = hs.unbind(0)
            for t in range(1, T + 1):
                z = recurrent(states[t - 1], xz[t - 1])  # k z_t (a new tensor)
                if tanh:  # h̃_t = tanh(z_t) = 1 - 2σ(-2z_t)
                    torch.add(one, torch.sigmoid(z, out=states[t]), alpha=-2, out=states[t])
                else:
                    torch.clamp_min(z, 0, out=states[t])  # h̃_t = relu(z_t)
                if t > lens.first_partial:
                    torch.where(lens.mask[t - 1], states[t], states[t - 1], out=states[t])
        if save:
            ctx.save_for_backward(x2, hs, weight_ih, weight_hh)
            ctx.tanh, ctx.lens, ctx.kernels = tanh, lens, kernels
        return lens.masked_output(hs), hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor):
        x2, hs, weight_ih, weight_hh = ctx.saved_tensors
        T1, B, H = hs.shape
        T = T1 - 1
        # dy[t]: ∂L/∂y_t (+ ∂L/∂s_T at t = n_b); dy[0] is 0 (or ∂L/∂s_T where n_b = 0)
        dy = _POOL.empty((T + 1, B, H), hs)
        ctx.lens.grad_in_slots(d_out, d_hT, dy)
        dz = _POOL.empty((T, B, H), hs)
        if ctx.kernels is not None:  # the loop below in C++; it leaves δs_t in dy[t]
            ctx.kernels.rnn_backward(hs, dy, weight_hh.contiguous(), dz, ctx.tanh)
            ds = dy[0].clone()
        else:
            recurrent = _RecurrentMatmul(weight_hh.t(), B)  # δz -> δz W_hh
            DY, DZ, states = dy.unbind(0), dz.unbind(0), hs.unbind(0)
            ds = DY[T]  # δs_T
            for t in range(T, 0, -1):
                if ctx.tanh:
                    _tanh_backward.grad_input(ds, states[t], grad_input=DZ[t - 1])  # δz_t
                else:
                    _aten.threshold_backward.grad_input(ds, states[t], 0, grad_input=DZ[t - 1])
                ds = recurrent(DZ[t - 1], DY[t - 1])  # δs_{t-1} = δz_t W_hh + ∂L/∂y_{t-1}
        dz = dz.view(T * B, H)
        need = ctx.needs_input_grad
        d_x = _linear(dz, weight_ih.t()).view(T, B, -1) if need[0] else None
        d_h0 = ds if need[1] else None
        d_w_ih = _grad_weight(dz, x2) if need[2] else None  # dZᵀ X
        d_w_hh = _grad_weight(dz, hs[:-1].view(T * B, H)) if need[3] else None  # dZᵀ S_prev
        d_b = dz.sum(0) if (need[4] or need[5]) else None
        _POOL.release(dy, dz)
        return d_x, d_h0, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.clone(), None, None, None


# ---------------------------------------------------------------------------------------
# LSTM (with optional peepholes)
# ---------------------------------------------------------------------------------------
def _to_ofig(w: Tensor) -> Tensor:
    """Gate blocks along dim 0 from torch's order (i, f, g, o) to the order used inside, (o, i, f, g).

    With o first, the three products of the backward that multiply δc̃ (for i, f, g) land in
    one contiguous block. Done once per call on the weights, never per step.
    """
    H = w.shape[0] // 4
    return torch.cat((w[3 * H:], w[: 3 * H]))


def _from_ofig(w: Tensor) -> Tensor:
    """(o, i, f, g) -> (i, f, g, o) along dim 0: the gradients back in torch's order."""
    H = w.shape[0] // 4
    return torch.cat((w[H:], w[:H]))


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer (PyTorch's equations, optional peepholes), hand-written BPTT.

    Forward, for t = 1..T (σ the logistic sigmoid, ⊙ elementwise, p_i, p_f, p_o the peephole
    vectors, whose terms vanish without peepholes):
        z_t = W_ih x_t + b_ih + b_hh + W_hh h_{t-1}           (4H pre-activations)
        i = σ(z^i + p_i ⊙ c_{t-1}),  f = σ(z^f + p_f ⊙ c_{t-1}),  g = tanh(z^g)
        c̃_t = f ⊙ c_{t-1} + i ⊙ g
        o = σ(z^o + p_o ⊙ c̃_t),  h̃_t = o ⊙ tanh(c̃_t)
        (h_t, c_t) = m_t (h̃_t, c̃_t) + (1 - m_t)(h_{t-1}, c_{t-1}),   y_t = m_t h̃_t
    Inside, the gates are ordered (o, i, f, g), and tanh is computed with sigmoids (torch's
    CPU tanh is ~5x slower than its sigmoid): the g rows of the weights are doubled once, so
    one sigmoid covers all four gates, g = 2σ(2z^g) - 1, and tanh(c̃) = 1 - 2σ(-2c̃). A step
    is the recurrent GEMM plus seven small elementwise kernels (no Python scalars: they cost a
    tensor copy each), and, when a backward will follow, six more for the factors below.

    Backward. With δh_t, δc_t the gradients reaching h_t, c_t (from step t+1, the output y_t
    and, at t = n_b, the final state), the chain rule through one step is
        δz^o     = δh_t ⊙ tanh(c̃_t) ⊙ o(1 - o)
        δc̃_t     = δc_t + δh_t ⊙ o ⊙ (1 - tanh²(c̃_t)) + p_o ⊙ δz^o
        δz^i     = δc̃_t ⊙ g ⊙ i(1 - i)
        δz^f     = δc̃_t ⊙ c_{t-1} ⊙ f(1 - f)
        δz^g     = δc̃_t ⊙ i ⊙ (1 - g²)
        δc_{t-1} = δc̃_t ⊙ f + p_i ⊙ δz^i + p_f ⊙ δz^f
        δh_{t-1} = δz_t W_hh + ∂L/∂y_{t-1}
    Every factor that multiplies δh_t or δc̃_t depends on the forward only, so the forward
    computes them at each step, while the step's activations are still in cache:
        K^o = tanh(c̃) ⊙ o(1 - o),     K^c = o ⊙ (1 - tanh²(c̃)) + p_o ⊙ K^o,
        Q   = [g ⊙ i(1 - i),  c_{t-1} ⊙ f(1 - f),  i ⊙ (1 - g²)],   Q^c = f + p_i ⊙ Q^i + p_f ⊙ Q^f
    and a backward step is five kernels, peepholes or not:
        δz^o = δh_t ⊙ K^o;   δc̃ = δc_t + δh_t ⊙ K^c;   [δz^i, δz^f, δz^g] = δc̃ ⊙ Q (one
        broadcast mul);   δc_{t-1} = δc̃ ⊙ Q^c;   δh_{t-1} = δz_t W_hh + ∂L/∂y_{t-1} (one GEMM)
    Then, over all steps at once, with dZ (T·B, 4H):
        dW_hh = dZᵀ H_prev,  dW_ih = dZᵀ X,  db = Σ_rows dZ,  dX = dZ W_ih,
        dp_i = Σ δz^i ⊙ c_{t-1},  dp_f = Σ δz^f ⊙ c_{t-1},  dp_o = Σ δz^o ⊙ c_t,
        dh0 = δh_0,  dc0 = δc_0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, weight_ci: Optional[Tensor],
                weight_cf: Optional[Tensor], weight_co: Optional[Tensor],
                lengths: Optional[Tensor], save: bool):
        kernels = _fused_kernels(x)
        if kernels is not None:
            return LSTMFunction._forward_fused(ctx, kernels, x, h0, c0, weight_ih, weight_hh,
                                               bias_ih, bias_hh, weight_ci, weight_cf, weight_co,
                                               lengths, save)
        T, B, I = x.shape
        H = weight_hh.shape[1]
        peephole = weight_ci is not None
        lens = _Lengths(lengths, T, x)
        # (o, i, f, g) order, g rows doubled: σ of the doubled pre-activation is (g + 1)/2
        k = x.new_ones(4 * H, 1)
        k[3 * H:] = 2.0
        x2 = x.reshape(T * B, I)
        acts = _linear(x2, _to_ofig(weight_ih) * k, _to_ofig(bias_ih + bias_hh) * k[:, 0]
                       ).view(T, B, 4 * H)
        recurrent = _RecurrentMatmul(_to_ofig(weight_hh) * k, B)
        hs, cs = x.new_empty(T + 1, B, H), _POOL.empty((T + 1, B, H), x)
        hs[0], cs[0] = h0, c0
        # Small steps (B·H ≤ 2^14) are dominated by per-kernel overhead: their backward factors
        # are computed after the loop, six kernels over all T steps instead of six per step.
        batched = save and B * H <= BATCHED_FACTORS_MAX_BH
        tcs = _POOL.empty((T, B, H), x) if batched else None  # tanh(c̃_t), all steps
        TC = tcs.unbind(0) if batched else (x.new_empty(B, H),) * T  # or one scratch
        one, minus_one, minus_two = x.new_full((), 1.0), x.new_full((), -1.0), x.new_full((), -2.0)
        # per-step views, made once (slicing inside the loop costs Python time)
        A, Hs, Cs = acts.unbind(0), hs.unbind(0), cs.unbind(0)
        O, I_, F, G = (acts[..., j * H:(j + 1) * H].unbind(0) for j in range(4))
        if save:  # the backward's factors, per step: K^o, K^c, Q^c | Q^i, Q^f, Q^g
            kq = _POOL.empty((T, B, 6 * H), x)
            K_o, K_c, Q_c, Q_i, Q_f, Q_g = (kq[..., j * H:(j + 1) * H].unbind(0) for j in range(6))
        if peephole:
            p_if = torch.stack((weight_ci, weight_cf))  # (2, H)
        for t in range(1, T + 1):
            s, c_prev, c = t - 1, Cs[t - 1], Cs[t]
            z = recurrent(Hs[s], A[s])  # pre-activations (a new tensor); A[s] held the x-part
            if peephole:
                z[:, H:3 * H].unflatten(1, (2, H)).addcmul_(p_if, c_prev.unsqueeze(1))
            torch.sigmoid(z, out=A[s])  # o, i, f and (g + 1)/2: one kernel
            torch.add(minus_one, G[s], alpha=2, out=G[s])  # g
            torch.mul(F[s], c_prev, out=c).addcmul_(I_[s], G[s])  # c̃ = f c + i g
            if peephole:
                torch.sigmoid(z[:, :H].addcmul_(weight_co, c), out=O[s])
            tc = TC[s]
            torch.mul(c, minus_two, out=tc).sigmoid_()
            torch.add(one, tc, alpha=-2, out=tc)  # tanh(c̃) = 1 - 2σ(-2c̃)
            torch.mul(O[s], tc, out=Hs[t])  # h̃ = o tanh(c̃)
            if save and not batched:
                _sigmoid_backward.grad_input(tc, O[s], grad_input=K_o[s])  # tanh(c̃) o(1 - o)
                _tanh_backward.grad_input(O[s], tc, grad_input=K_c[s])  # o (1 - tanh²(c̃))
                _sigmoid_backward.grad_input(G[s], I_[s], grad_input=Q_i[s])  # g i(1 - i)
                _sigmoid_backward.grad_input(c_prev, F[s], grad_input=Q_f[s])  # c f(1 - f)
                _tanh_backward.grad_input(I_[s], G[s], grad_input=Q_g[s])  # i (1 - g²)
                if peephole:
                    K_c[s].addcmul_(K_o[s], weight_co)
                    torch.addcmul(F[s], Q_i[s], weight_ci, out=Q_c[s]).addcmul_(Q_f[s], weight_cf)
                else:
                    Q_c[s].copy_(F[s])
            if t > lens.first_partial:
                m = lens.mask[s]
                torch.where(m, c, c_prev, out=c)
                torch.where(m, Hs[t], Hs[t - 1], out=Hs[t])
        if batched:  # the same factors as in the loop, for all steps at once
            gate = [acts[..., j * H:(j + 1) * H] for j in range(4)]  # o, i, f, g
            k_o, k_c, q_c, q_i, q_f, q_g = (kq[..., j * H:(j + 1) * H] for j in range(6))
            _sigmoid_backward.grad_input(tcs, gate[0], grad_input=k_o)
            _tanh_backward.grad_input(gate[0], tcs, grad_input=k_c)
            _sigmoid_backward.grad_input(gate[3], gate[1], grad_input=q_i)
            _sigmoid_backward.grad_input(cs[:-1], gate[2], grad_input=q_f)
            _tanh_backward.grad_input(gate[1], gate[3], grad_input=q_g)
            if peephole:
                k_c.addcmul_(k_o, weight_co)
                torch.addcmul(gate[2], q_i, weight_ci, out=q_c).addcmul_(q_f, weight_cf)
            else:
                q_c.copy_(gate[2])
            _POOL.release(tcs)
        c_T = cs[T].clone()
        if save:
            ctx.save_for_backward(x2, hs, cs if peephole else None, kq, weight_ih, weight_hh)
            ctx.lens, ctx.peephole, ctx.kernels = lens, peephole, None
            # back to the pool once the graph node (and with it the saved tensors) is gone
            weakref.finalize(ctx, _POOL.release, kq, cs if peephole else None)
        if not (save and peephole):
            _POOL.release(cs)
        return lens.masked_output(hs), hs[T].clone(), c_T

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Tensor):
        if ctx.kernels is not None:
            return LSTMFunction._backward_fused(ctx, d_out, d_hT, d_cT)
        x2, hs, cs, kq, weight_ih, weight_hh = ctx.saved_tensors
        lens = ctx.lens
        T, B, H6 = kq.shape
        H = H6 // 6
        # dy[t]: ∂L/∂y_t (+ ∂L/∂h_T at t = n_b); dy[0] is 0 (or ∂L/∂h_T where n_b = 0)
        dy = _POOL.empty((T + 1, B, H), hs)
        lens.grad_in_slots(d_out, d_hT, dy)
        # the final cell state's gradient enters at step n_b of each sequence
        dc_final = None
        if lens.mask is not None:
            dc_final = torch.zeros_like(dy)
            dc_final.index_put_((lens.lengths, torch.arange(B, device=d_cT.device)), d_cT)
        dc, dc_next = (d_cT if dc_final is None else dc_final[T]).clone(), hs.new_empty(B, H)
        dz = _POOL.empty((T, B, 4 * H), hs)  # δz_t, gates (o, i, f, g)
        recurrent = _RecurrentMatmul(_to_ofig(weight_hh).t(), B)  # δz -> δz W_hh
        DZ, DZ_o = dz.unbind(0), dz[..., :H].unbind(0)
        DZ_ifg = dz[..., H:].unflatten(-1, (3, H)).unbind(0)
        K_o, K_c, Q_c = (kq[..., j * H:(j + 1) * H].unbind(0) for j in range(3))
        Q, DY = kq[..., 3 * H:].unflatten(-1, (3, H)).unbind(0), dy.unbind(0)
        dh = DY[T]  # δh_T
        for t in range(T, 0, -1):
            s = t - 1
            torch.mul(dh, K_o[s], out=DZ_o[s])  # δz^o
            dc.addcmul_(dh, K_c[s])  # δc̃_t
            torch.mul(dc.unsqueeze(1), Q[s], out=DZ_ifg[s])  # δz^i, δz^f, δz^g
            dc, dc_next = torch.mul(dc, Q_c[s], out=dc_next), dc  # δc_{t-1}
            dh = recurrent(DZ[s], DY[s])  # δh_{t-1} = δz_t W_hh + ∂L/∂y_{t-1}
            if dc_final is not None and s in lens.ends:
                dc.add_(dc_final[s])
        return _lstm_grads(ctx.needs_input_grad, dz, dy, x2, hs, cs if ctx.peephole else None,
                           weight_ih, dh, dc, torch_order=False)

    @staticmethod
    def _forward_fused(ctx, kernels, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                       weight_ci, weight_cf, weight_co, lengths, save):
        """The forward above with its time loop in C++ (``fused_bptt.cpp``): torch's gate order
        (i, f, g, o), one fused kernel per step. It keeps the activations i, f, g, o and
        tanh(c̃) of every step, from which the backward's fused kernel forms the factors."""
        T, B, I = x.shape
        H = weight_hh.shape[1]
        x2 = x.reshape(T * B, I)
        acts = _linear_pooled(x2, weight_ih, bias_ih + bias_hh).view(T, B, 4 * H)  # -> gates
        hs, cs = x.new_empty(T + 1, B, H), _POOL.empty((T + 1, B, H), x)
        hs[0], cs[0] = h0, c0
        tcs = _POOL.empty((T, B, H), x) if save else x.new_empty(1, B, H)  # tanh(c̃_t)
        peep = None if weight_ci is None else torch.stack((weight_ci, weight_cf, weight_co))
        kernels.lstm_forward(acts, hs, cs, weight_hh.contiguous(), peep, lengths, tcs)
        c_T, lens = cs[T].clone(), _Lengths(lengths, T, x)
        if save:
            ctx.save_for_backward(x2, hs, cs, acts, tcs, weight_ih, weight_hh, peep)
            ctx.lengths, ctx.lens, ctx.kernels = lengths, lens, kernels
            weakref.finalize(ctx, _POOL.release, cs, tcs, acts)
        else:
            _POOL.release(cs, acts)
        return lens.masked_output(hs), hs[T].clone(), c_T

    @staticmethod
    def _backward_fused(ctx, d_out, d_hT, d_cT):
        """The backward above, its time loop in C++, gates in torch's order (i, f, g, o)."""
        x2, hs, cs, acts, tcs, weight_ih, weight_hh, peep = ctx.saved_tensors
        T, B, H4 = acts.shape
        H = H4 // 4
        dy = _POOL.empty((T + 1, B, H), hs)
        ctx.lens.grad_in_slots(d_out, d_hT, dy)
        dz = _POOL.empty((T, B, 4 * H), hs)  # δz_t, gates (i, f, g, o)
        d_c0 = ctx.kernels.lstm_backward(acts, tcs, cs, dy, d_cT, weight_hh.contiguous(), peep,
                                         ctx.lengths, dz)
        d_h0 = dy[0].clone()  # the loop leaves δh_t in dy[t]
        return _lstm_grads(ctx.needs_input_grad, dz, dy, x2, hs, None if peep is None else cs,
                           weight_ih, d_h0, d_c0, torch_order=True)


def _lstm_grads(need, dz: Tensor, dy: Tensor, x2: Tensor, hs: Tensor, cs: Optional[Tensor],
                weight_ih: Tensor, d_h0: Tensor, d_c0: Tensor, torch_order: bool) -> tuple:
    """What ``LSTMFunction.backward`` returns, from dZ (T, B, 4H) of all steps at once:
        dX = dZ W_ih,  dW_ih = dZᵀ X,  dW_hh = dZᵀ H_prev,  db = Σ_rows dZ,
        dp_i = Σ δz^i ⊙ c_{t-1},  dp_f = Σ δz^f ⊙ c_{t-1},  dp_o = Σ δz^o ⊙ c̃_t  (cs given).
    dZ's gates are in torch's order (i, f, g, o), or in the Python loop's (o, i, f, g). Gives the
    buffers dy and dz back to the pool."""
    T, B, H4 = dz.shape
    H = H4 // 4
    inner, back = (lambda w: w, lambda w: w) if torch_order else (_to_ofig, _from_ofig)
    gate_i, gate_f, gate_o = (0, 1, 3) if torch_order else (1, 2, 0)  # blocks of H in dz
    dz2 = dz.view(T * B, 4 * H)
    d_x = _linear(dz2, inner(weight_ih).t()).view(T, B, -1) if need[0] else None
    d_w_ih = back(_grad_weight(dz2, x2)) if need[3] else None
    d_w_hh = back(_grad_weight(dz2, hs[:-1].view(T * B, H))) if need[4] else None
    d_b = back(dz2.sum(0)) if (need[5] or need[6]) else None
    d_ci = d_cf = d_co = None
    if cs is not None:
        gate = lambda k: dz[..., k * H:(k + 1) * H]  # noqa: E731
        d_ci = (gate(gate_i) * cs[:-1]).sum((0, 1))
        d_cf = (gate(gate_f) * cs[:-1]).sum((0, 1))
        d_co = (gate(gate_o) * cs[1:]).sum((0, 1))
    _POOL.release(dy, dz)
    return (d_x, d_h0 if need[1] else None, d_c0 if need[2] else None, d_w_ih, d_w_hh, d_b,
            None if d_b is None else d_b.clone(), d_ci, d_cf, d_co, None, None)


# ---------------------------------------------------------------------------------------
# Entry points used by RecurrentStack(impl="bptt")
# ---------------------------------------------------------------------------------------
def _float32(*tensors):
    return tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rnn_layer(x: Tensor, state: tuple[Tensor], cell, lengths: Optional[Tensor] = None
              ) -> tuple[Tensor, tuple[Tensor]]:
    """One RNN layer through ``RNNFunction``: x (T, B, I), state (h0,) each (B, H) ->
    (T, B, H), (h_T,).

    lengths (B,) int64 in [0, T] or None. Under autocast the Function runs in float32 with
    autocast off (outputs are float32).
    """
    args = (x, state[0], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, lengths)
    save = _needs_graph(*args)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            out, h = RNNFunction.apply(*_float32(*args), cell.nonlinearity, save)
    else:
        out, h = RNNFunction.apply(*args, cell.nonlinearity, save)
    return out, (h,)


def lstm_layer(x: Tensor, state: tuple[Tensor, Tensor], cell, lengths: Optional[Tensor] = None
               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer through ``LSTMFunction``: x (T, B, I), state (h0, c0) ->
    (T, B, H), (h_T, c_T) each (B, H)."""
    peep = (cell.weight_ci, cell.weight_cf, cell.weight_co) if cell.peephole else (None,) * 3
    args = (x, *state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, *peep, lengths)
    save = _needs_graph(*args)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            out, h, c = LSTMFunction.apply(*_float32(*args), save)
    else:
        out, h, c = LSTMFunction.apply(*args, save)
    return out, (h, c)
