"""Backpropagation through time written by hand: one ``torch.autograd.Function`` per cell kind.

Each Function runs the recurrence of ONE layer over the whole sequence. Its forward runs under
no_grad (no autograd graph, one node for the whole layer) and keeps only what the backward
needs; its backward walks the sequence from the end to the start and applies the chain rule by
hand. ``RecurrentStack(impl="bptt")`` calls the Function once per layer and keeps the dropout
between layers outside, as ordinary autograd ops. The derivations, step by step, are in
``docs/bptt.md``.

Conventions inside this module (the stack converts):
    time-major tensors: x (T, B, I), outputs (T, B, H); per-step slices ``buf[t]`` are then
    contiguous (B, ·) blocks, and ``buf.view(T * B, ·)`` is a free reshape for the big GEMMs.
    mask (T, B, 1) in x's dtype, 1 at valid steps, 0 at padding, or None (all valid).

Masks (variable lengths) follow torch's PackedSequence semantics. With h̃_t the cell's update,
    s_t = m_t h̃_t + (1 - m_t) s_{t-1}        (the state stops changing past the end)
    y_t = m_t h̃_t                            (outputs are 0 at padded steps)
so in the backward, with δs_t = ∂L/∂s_t (everything that reaches s_t from later steps and from
the final state),
    δh̃_t    = m_t (δs_t + ∂L/∂y_t)
    δs_{t-1} = (1 - m_t) δs_t + [what flows through h̃_t into s_{t-1}].

Cost model, the point of this module: per time step only the recurrent GEMM (B, H) @ (H, G)
and a handful of fused elementwise ops run; everything that does not depend on the previous
step is done once for all T steps at once:
    input projection   X (T·B, I) @ W_ihᵀ              one GEMM in the forward
    weight gradients   dW_ih = dZᵀ X, dW_hh = dZᵀ H_prev  one GEMM each in the backward
    input gradient     dX = dZ W_ih                    one GEMM in the backward
where dZ (T·B, G) holds ∂L/∂(pre-activation) of every step.

Autocast: the Functions compute in float32. ``rnn_layer`` / ``lstm_layer`` cast floating
inputs to float32 and switch autocast off when it is on (what ``torch.amp.custom_fwd(...,
cast_inputs=torch.float32)`` does, but for whatever device type x lives on); autograd casts the
float32 gradients back to the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_aten = torch.ops.aten


def _full_steps(mask: Optional[Tensor], T: int) -> list[bool]:
    """For each step, True when no sequence of the batch is padded there (mask ops skipped)."""
    if mask is None:
        return [True] * T
    return mask.flatten(1).bool().all(1).tolist()


# ---------------------------------------------------------------------------------------
# Vanilla RNN
# ---------------------------------------------------------------------------------------
class RNNFunction(torch.autograd.Function):
    """One Elman layer, forward and hand-written backward through time.

    Forward, for t = 1..T (z_t is the pre-activation, f = tanh or relu):
        z_t = W_ih x_t + b_ih + b_hh + W_hh s_{t-1}
        h̃_t = f(z_t),   s_t = m_t h̃_t + (1 - m_t) s_{t-1},   y_t = m_t h̃_t,   s_0 = h0
    The x-part of every z_t is one GEMM, X (T·B, I) @ W_ihᵀ, written straight into the state
    buffer ``hs`` (T+1, B, H); each step then adds W_hh s_{t-1} in place (addmm_) and applies
    f in place, so a step is two kernels. ``hs`` (with s_0 in front) is all the backward needs:
    tanh'(z) = 1 - h̃², relu'(z) = [h̃ > 0].

    Backward, for t = T..1, with δs_T = ∂L/∂s_T (the final state's gradient):
        δz_t     = m_t (δs_t + ∂L/∂y_t) ⊙ f'(z_t)
        δs_{t-1} = W_hhᵀ δz_t + (1 - m_t) δs_t        (row vectors: δz_t @ W_hh)
    which, without masks, is the textbook δh_{t-1} = W_hhᵀ(δh_t ⊙ f'(z_t)) + ∂L/∂h_{t-1}.
    ∂L/∂y_{t-1} is added into the same buffer slot beforehand, so a step is two kernels
    (``tanh_backward`` in place, ``addmm_`` into the previous slot). Then, with dZ (T·B, H)
    the δz_t of all steps and S_prev (T·B, H) the states s_0..s_{T-1}:
        dW_hh = dZᵀ S_prev,  dW_ih = dZᵀ X,  db_ih = db_hh = Σ_rows dZ,  dX = dZ W_ih,
        dh0 = δs_0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, mask: Optional[Tensor], nonlinearity: str):
        T, B, I = x.shape
        H = weight_hh.shape[0]
        full = _full_steps(mask, T)
        hs = x.new_empty(T + 1, B, H)  # hs[0] = s_0, hs[t] = s_t
        hs[0] = h0
        x2 = x.reshape(T * B, I)
        # the input projection of all T steps, both biases folded in: one GEMM
        torch.addmm(bias_ih + bias_hh, x2, weight_ih.t(), out=hs[1:].view(T * B, H))
        w_hh_t = weight_hh.t()
        act_ = torch.tanh_ if nonlinearity == "tanh" else torch.relu_
        for t in range(T):
            z = hs[t + 1]
            z.addmm_(hs[t], w_hh_t)  # z_t = (W_ih x_t + b) + W_hh s_{t-1}
            act_(z)  # h̃_t = f(z_t), in place
            if not full[t]:
                torch.where(mask[t].bool(), z, hs[t], out=z)  # s_t = h̃_t or s_{t-1}
        out = hs[1:] if mask is None else hs[1:] * mask
        ctx.save_for_backward(x2, hs, weight_ih, weight_hh, mask)
        ctx.nonlinearity, ctx.full = nonlinearity, full
        return out, hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor):
        x2, hs, weight_ih, weight_hh, mask = ctx.saved_tensors
        full = ctx.full
        T1, B, H = hs.shape
        T = T1 - 1
        # g[t] (t = 1..T) accumulates δs_t + ∂L/∂y_t; after step t it holds δz_t. g[0] = δs_0.
        g = hs.new_empty(T + 1, B, H)
        g[0].zero_()
        if mask is None:
            g[1:].copy_(d_out)
        else:
            torch.mul(d_out, mask, out=g[1:])  # y_t = m_t h̃_t: padded outputs get no gradient
        g[T] += d_hT
        if ctx.nonlinearity == "tanh":
            def act_backward_(grad: Tensor, h: Tensor) -> None:  # grad ⊙ (1 - h²), in place
                _aten.tanh_backward.grad_input(grad, h, grad_input=grad)
        else:
            def act_backward_(grad: Tensor, h: Tensor) -> None:  # grad ⊙ [h > 0], in place
                _aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)
        for t in range(T, 0, -1):
            gt = g[t]
            if full[t - 1]:
                act_backward_(gt, hs[t])  # δz_t
                g[t - 1].addmm_(gt, weight_hh)  # δs_{t-1} += δz_t W_hh
            else:
                m = mask[t - 1]
                carry = gt * (1 - m)  # (1 - m_t) δs_t: padded rows pass δs_t through
                act_backward_(gt, hs[t])
                gt.mul_(m)  # δz_t = 0 on padded rows
                g[t - 1].addmm_(gt, weight_hh).add_(carry)
        dz = g[1:].view(T * B, H)
        need = ctx.needs_input_grad
        d_x = (dz @ weight_ih).view(T, B, -1) if need[0] else None
        d_h0 = g[0] if need[1] else None
        d_w_ih = dz.t() @ x2 if need[2] else None
        d_w_hh = dz.t() @ hs[:-1].view(T * B, H) if need[3] else None
        d_b = dz.sum(0) if (need[4] or need[5]) else None
        return d_x, d_h0, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.clone(), None, None


# ---------------------------------------------------------------------------------------
# LSTM (with optional peepholes)
# ---------------------------------------------------------------------------------------
def _swap_go(w: Tensor) -> Tensor:
    """Reorder gate blocks (i, f, g, o) <-> (i, f, o, g) along dim 0 (its own inverse).

    Inside the Function the gates are kept as (i, f, o, g), so one sigmoid (and one
    sigmoid_backward) covers the three sigmoid gates. Done once per call on the weights and
    once on their gradients, never per step.
    """
    H = w.shape[0] // 4
    return torch.cat((w[: 2 * H], w[3 * H:], w[2 * H: 3 * H]))


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer (PyTorch's equations, optional peepholes), hand-written BPTT.

    Forward, for t = 1..T (σ the logistic sigmoid, ⊙ elementwise, p_* the peephole vectors,
    zero terms when there are no peepholes):
        z_t = W_ih x_t + b_ih + b_hh + W_hh h_{t-1}           (4H pre-activations)
        i_t = σ(z^i_t + p_i ⊙ c_{t-1}),  f_t = σ(z^f_t + p_f ⊙ c_{t-1}),  g_t = tanh(z^g_t)
        c̃_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        o_t = σ(z^o_t + p_o ⊙ c̃_t),  h̃_t = o_t ⊙ tanh(c̃_t)
        (h_t, c_t) = m_t (h̃_t, c̃_t) + (1 - m_t)(h_{t-1}, c_{t-1}),   y_t = m_t h̃_t
    Saved: the gate activations (T, B, 4H), h and c of every step with the initial state in
    front (T+1, B, H) each, and tanh(c̃_t) (T, B, H).

    Backward, for t = T..1. δh_t, δc_t are the gradients reaching h_t, c_t from later steps
    and the final state; â = a(1 - a) for a sigmoid gate a:
        δh̃    = m_t (δh_t + ∂L/∂y_t)
        δz^o  = δh̃ ⊙ tanh(c̃_t) ⊙ o_t(1 - o_t)
        δc̃    = m_t δc_t + δh̃ ⊙ o_t ⊙ (1 - tanh²(c̃_t)) + p_o ⊙ δz^o
        δz^i  = δc̃ ⊙ g_t ⊙ i_t(1 - i_t)
        δz^f  = δc̃ ⊙ c_{t-1} ⊙ f_t(1 - f_t)
        δz^g  = δc̃ ⊙ i_t ⊙ (1 - g_t²)
        δc_{t-1} = δc̃ ⊙ f_t + p_i ⊙ δz^i + p_f ⊙ δz^f + (1 - m_t) δc_t
        δh_{t-1} = δz_t W_hh + (1 - m_t) δh_t    (+ ∂L/∂y_{t-1}, added beforehand)
    Then, over all steps at once, with dZ (T·B, 4H):
        dW_hh = dZᵀ H_prev,  dW_ih = dZᵀ X,  db = Σ_rows dZ,  dX = dZ W_ih,
        dp_i = Σ δz^i ⊙ c_{t-1},  dp_f = Σ δz^f ⊙ c_{t-1},  dp_o = Σ δz^o ⊙ c̃_t,
        dh0 = δh_0,  dc0 = δc_0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, weight_ci: Optional[Tensor],
                weight_cf: Optional[Tensor], weight_co: Optional[Tensor],
                mask: Optional[Tensor]):
        T, B, I = x.shape
        H = weight_hh.shape[1]
        peephole = weight_ci is not None
        full = _full_steps(mask, T)
        w_ih = _swap_go(weight_ih)  # gates (i, f, o, g) inside
        w_hh_t = _swap_go(weight_hh).t()
        x2 = x.reshape(T * B, I)
        # all input projections at once; after step t, acts[t] holds (i, f, o, g) activations
        acts = torch.addmm(_swap_go(bias_ih + bias_hh), x2, w_ih.t()).view(T, B, 4 * H)
        hs = x.new_empty(T + 1, B, H)
        cs = x.new_empty(T + 1, B, H)
        tcs = x.new_empty(T, B, H)  # tanh(c̃_t)
        hs[0], cs[0] = h0, c0
        if peephole:
            p_if = torch.stack((weight_ci, weight_cf))  # (2, H)
        for t in range(T):
            a, c_prev, c = acts[t], cs[t], cs[t + 1]
            a.addmm_(hs[t], w_hh_t)
            i, f, o, g = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            if peephole:
                a[:, :2 * H].view(B, 2, H).addcmul_(p_if, c_prev.unsqueeze(1))
                a[:, :2 * H].sigmoid_()
            else:
                a[:, :3 * H].sigmoid_()  # i, f, o in one kernel
            g.tanh_()
            torch.mul(f, c_prev, out=c).addcmul_(i, g)  # c̃ = f c + i g
            if peephole:
                o.addcmul_(weight_co, c).sigmoid_()
            tc = torch.tanh(c, out=tcs[t])
            torch.mul(o, tc, out=hs[t + 1])
            if not full[t]:
                m = mask[t].bool()
                torch.where(m, c, c_prev, out=c)
                torch.where(m, hs[t + 1], hs[t], out=hs[t + 1])
        out = hs[1:] if mask is None else hs[1:] * mask
        ctx.save_for_backward(x2, acts, hs, cs, tcs, weight_ih, weight_hh,
                              weight_ci, weight_cf, weight_co, mask)
        ctx.full = full
        return out, hs[T].clone(), cs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Tensor):
        (x2, acts, hs, cs, tcs, weight_ih, weight_hh,
         weight_ci, weight_cf, weight_co, mask) = ctx.saved_tensors
        full = ctx.full
        T, B, H4 = acts.shape
        H = H4 // 4
        peephole = weight_ci is not None
        w_hh = _swap_go(weight_hh)
        # dh[t] (t = 1..T) accumulates δh_t + ∂L/∂y_t; dh[0] ends as δh_0
        dh = hs.new_empty(T + 1, B, H)
        dh[0].zero_()
        if mask is None:
            dh[1:].copy_(d_out)
        else:
            torch.mul(d_out, mask, out=dh[1:])
        dh[T] += d_hT
        dc = d_cT.clone()  # δc_t, carried backwards
        dz = torch.empty_like(acts)  # δz_t of every step, gates (i, f, o, g)
        tmp = hs.new_empty(B, H)
        for t in range(T, 0, -1):
            s = t - 1  # 0-based index into acts / tcs / dz
            a, d, tc, dht = acts[s], dz[s], tcs[s], dh[t]
            i, f, o, g = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            di, df, do, dg = d[:, :H], d[:, H:2 * H], d[:, 2 * H:3 * H], d[:, 3 * H:]
            if not full[s]:
                m = mask[s]
                keep_h, keep_c = dht * (1 - m), dc * (1 - m)  # padded rows pass through
            torch.mul(dht, tc, out=do)  # ∂L/∂o
            # δc̃ += δh ⊙ o ⊙ (1 - tanh²(c̃))
            dc.add_(_aten.tanh_backward.grad_input(torch.mul(dht, o, out=tmp), tc, grad_input=tmp))
            if peephole:
                _aten.sigmoid_backward.grad_input(do, o, grad_input=do)  # δz^o
                dc.addcmul_(do, weight_co)
            torch.mul(dc, g, out=di)
            torch.mul(dc, cs[s], out=df)
            torch.mul(dc, i, out=dg)
            n_sig = 2 * H if peephole else 3 * H
            _aten.sigmoid_backward.grad_input(d[:, :n_sig], a[:, :n_sig], grad_input=d[:, :n_sig])
            _aten.tanh_backward.grad_input(dg, g, grad_input=dg)
            dc.mul_(f)  # δc_{t-1} = δc̃ ⊙ f (+ peepholes)
            if peephole:
                dc.addcmul_(di, weight_ci).addcmul_(df, weight_cf)
            if not full[s]:
                d.mul_(m)
                dc.mul_(m).add_(keep_c)
            dh[t - 1].addmm_(d, w_hh)  # δh_{t-1} += δz_t W_hh
            if not full[s]:
                dh[t - 1].add_(keep_h)
        dz2 = dz.view(T * B, H4)
        need = ctx.needs_input_grad
        d_x = (dz2 @ _swap_go(weight_ih)).view(T, B, -1) if need[0] else None
        d_h0 = dh[0] if need[1] else None
        d_c0 = dc if need[2] else None
        d_w_ih = _swap_go(dz2.t() @ x2) if need[3] else None
        d_w_hh = _swap_go(dz2.t() @ hs[:-1].view(T * B, H)) if need[4] else None
        d_b = _swap_go(dz2.sum(0)) if (need[5] or need[6]) else None
        d_ci = d_cf = d_co = None
        if peephole:
            d_ci = (dz[..., :H] * cs[:-1]).sum((0, 1))
            d_cf = (dz[..., H:2 * H] * cs[:-1]).sum((0, 1))
            d_co = (dz[..., 2 * H:3 * H] * cs[1:]).sum((0, 1))
        return d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b, None if d_b is None else d_b.clone(), d_ci, d_cf, d_co, None


# ---------------------------------------------------------------------------------------
# Entry points used by RecurrentStack(impl="bptt")
# ---------------------------------------------------------------------------------------
def _float32(*tensors):
    return tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)


def rnn_layer(x: Tensor, h0: Tensor, cell, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One RNN layer through ``RNNFunction``: x (T, B, I), h0 (B, H) -> (T, B, H), (B, H).

    Under autocast the Function runs in float32 with autocast off (outputs are float32).
    """
    args = (x, h0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, mask)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return RNNFunction.apply(*_float32(*args), cell.nonlinearity)
    return RNNFunction.apply(*args, cell.nonlinearity)


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, cell, mask: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer through ``LSTMFunction``: x (T, B, I) -> (T, B, H), h_T, c_T (B, H)."""
    peep = (cell.weight_ci, cell.weight_cf, cell.weight_co) if cell.peephole else (None,) * 3
    args = (x, h0, c0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, *peep, mask)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return LSTMFunction.apply(*_float32(*args))
    return LSTMFunction.apply(*args)
