"""Backpropagation through time by hand, the readable way: one ``torch.autograd.Function`` per
cell kind, written line by line as docs/bptt.md derives it (sections 2-4). Plain torch: no
buffers, no reordered gates, no fused kernels. It is the reference that the fast path (the C++
loops of ``fast.py``) is checked against, and what runs where that cannot (a GPU, a machine
without a C++ compiler).

Conventions: time-major x (T, B, I); masks m (T, B, 1) with m_t = [t ≤ n_b] for a sequence of
length n_b, or None when every sequence is T long (docs/bptt.md, section 4). The forward keeps
every state and activation; the backward walks from t = T down to t = 1. Python lists index
the steps from 0: ``x[t]`` is x_{t+1}, ``s[t]`` is s_t (s[0] the initial state).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def step_mask(lengths: Optional[Tensor], T: int, like: Tensor) -> Optional[Tensor]:
    """m (T, B, 1): 1 where step t (1-based) is within its sequence, t ≤ n_b; None without lengths."""
    if lengths is None:
        return None
    t = torch.arange(1, T + 1, device=like.device).view(T, 1, 1)
    return (t <= lengths.to(like.device).view(1, -1, 1)).to(like.dtype)


class RNNReference(torch.autograd.Function):
    """One Elman layer (docs/bptt.md, section 2), masks as in section 4.

    Forward:   z_t = x_t W_ihᵀ + b_ih + b_hh + s_{t-1} W_hhᵀ,   h̃_t = f(z_t)
               s_t = m_t h̃_t + (1 − m_t) s_{t-1},   y_t = m_t h̃_t
    Backward, δs_t the gradient reaching s_t from later steps (δs_T = ∂L/∂s_T):
               δh̃_t = m_t (δs_t + ∂L/∂y_t),   δz_t = δh̃_t ⊙ f'(z_t)
               δs_{t-1} = (1 − m_t) δs_t + δz_t W_hh
    and, stacking the steps as rows: dW_hh = dZᵀ S_prev, dW_ih = dZᵀ X, db_ih = db_hh =
    Σ_rows dZ, dX = dZ W_ih, ds_0 = δs_0.

    With recurrent dropout ρ (B, H) and zoneout d_t (T, B, H) (docs/bptt.md, "Regularizers"):
               z_t = ... + (s_{t-1} ⊙ ρ) W_hhᵀ,   ĥ_t = d_t s_{t-1} + (1 − d_t) h̃_t  (replaces h̃_t in s_t, y_t)
               G_t = m_t (δs_t + ∂L/∂y_t),   δh̃_t = (1 − d_t) G_t,   δz_t = δh̃_t ⊙ f'(z_t)
               δs_{t-1} = (1 − m_t) δs_t + d_t G_t + ρ ⊙ (δz_t W_hh),   dW_hh = dZᵀ (S_prev ⊙ ρ)
    """

    @staticmethod
    def forward(ctx, x: Tensor, s0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                bias_hh: Tensor, mask: Optional[Tensor], nonlinearity: str, rho: Optional[Tensor] = None,
                d: Optional[Tensor] = None):
        f = torch.tanh if nonlinearity == "tanh" else torch.relu
        s, h, y = [s0], [], []
        for t in range(x.shape[0]):
            s_in = s[t] if rho is None else s[t] * rho
            h.append(f(x[t] @ weight_ih.T + bias_ih + bias_hh + s_in @ weight_hh.T))
            h_out = h[t] if d is None else d[t] * s[t] + (1 - d[t]) * h[t]
            m = 1 if mask is None else mask[t]
            s.append(m * h_out + (1 - m) * s[t])
            y.append(m * h_out)
        ctx.save_for_backward(x, torch.stack(s), torch.stack(h), weight_ih, weight_hh, mask, rho, d)
        ctx.nonlinearity = nonlinearity
        return torch.stack(y), s[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y: Tensor, d_sT: Tensor):
        x, s, h, weight_ih, weight_hh, mask, rho, d = ctx.saved_tensors
        T = x.shape[0]
        ds, dz = d_sT, [None] * T
        for t in reversed(range(T)):
            m = 1 if mask is None else mask[t]
            g = m * (ds + d_y[t])
            dh = g if d is None else (1 - d[t]) * g
            f_prime = 1 - h[t] ** 2 if ctx.nonlinearity == "tanh" else (h[t] > 0).to(h.dtype)
            dz[t] = dh * f_prime
            back = dz[t] @ weight_hh
            ds = (1 - m) * ds + (back if rho is None else rho * back) + (0 if d is None else d[t] * g)
        dZ = torch.stack(dz).flatten(0, 1)  # (T·B, H): the rows of every step
        d_b = dZ.sum(0)
        s_prev = s[:-1] if rho is None else s[:-1] * rho
        return ((dZ @ weight_ih).view_as(x), ds, dZ.T @ x.flatten(0, 1), dZ.T @ s_prev.flatten(0, 1),
                d_b, d_b.clone(), None, None, None, None)


class LSTMReference(torch.autograd.Function):
    """One LSTM layer (docs/bptt.md, section 3), optional peepholes p_i, p_f, p_o (None: no
    peepholes), masks as in section 4.

    Forward:   z_t = x_t W_ihᵀ + b_ih + b_hh + h_{t-1} W_hhᵀ     (gates i, f, g, o)
               i = σ(z^i + p_i c_{t-1}),  f = σ(z^f + p_f c_{t-1}),  g = tanh(z^g)
               c̃_t = f c_{t-1} + i g,  o = σ(z^o + p_o c̃_t),  h̃_t = o tanh(c̃_t)
               (h_t, c_t) = m_t (h̃_t, c̃_t) + (1 − m_t)(h_{t-1}, c_{t-1}),  y_t = m_t h̃_t
    Backward, δh_t, δc_t the gradients reaching h_t, c_t from later steps:
               δh̃ = m_t (δh_t + ∂L/∂y_t),   δĉ = m_t δc_t
               δz^o = δh̃ tanh(c̃_t) o(1 − o)
               δĉ += δh̃ o (1 − tanh²(c̃_t)) + p_o δz^o
               δz^i = δĉ g i(1 − i),  δz^f = δĉ c_{t-1} f(1 − f),  δz^g = δĉ i (1 − g²)
               δc_{t-1} = (1 − m_t) δc_t + δĉ f + p_i δz^i + p_f δz^f
               δh_{t-1} = (1 − m_t) δh_t + δz_t W_hh
    and over all steps: dW_hh = dZᵀ H_prev, dW_ih = dZᵀ X, db = Σ_rows dZ, dX = dZ W_ih,
    dp_i = Σ δz^i c_{t-1}, dp_f = Σ δz^f c_{t-1}, dp_o = Σ δz^o c̃_t.

    With recurrent dropout ρ (B, H) and zoneout d^h_t, d^c_t (T, B, H) each (docs/bptt.md,
    "Regularizers"): z_t uses h_{t-1} ⊙ ρ, and the step's state is zoned out,
               ĥ_t = d^h_t h_{t-1} + (1 − d^h_t) h̃_t,  ĉ_t = d^c_t c_{t-1} + (1 − d^c_t) c̃_t
    (ĥ, ĉ replace h̃, c̃ in h_t, c_t and y_t). Backward, G^h = m_t (δh_t + ∂L/∂y_t), G^c = m_t δc_t:
               δh̃ = (1 − d^h) G^h,   δĉ = (1 − d^c) G^c,   then the gates as above, and
               δc_{t-1} = (1 − m_t) δc_t + d^c G^c + δĉ f + p_i δz^i + p_f δz^f
               δh_{t-1} = (1 − m_t) δh_t + d^h G^h + ρ ⊙ (δz_t W_hh),   dW_hh = dZᵀ (H_prev ⊙ ρ).
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor, bias_hh: Tensor, p_i: Optional[Tensor], p_f: Optional[Tensor],
                p_o: Optional[Tensor], mask: Optional[Tensor], rho: Optional[Tensor] = None,
                d_h: Optional[Tensor] = None, d_c: Optional[Tensor] = None):
        peep = p_i is not None
        h, c, gates, c_new, y = [h0], [c0], [], [], []
        for t in range(x.shape[0]):
            h_in = h[t] if rho is None else h[t] * rho
            z_i, z_f, z_g, z_o = (x[t] @ weight_ih.T + bias_ih + bias_hh + h_in @ weight_hh.T).chunk(4, 1)
            i = torch.sigmoid(z_i + p_i * c[t] if peep else z_i)
            f = torch.sigmoid(z_f + p_f * c[t] if peep else z_f)
            g = torch.tanh(z_g)
            c_tilde = f * c[t] + i * g
            o = torch.sigmoid(z_o + p_o * c_tilde if peep else z_o)
            h_tilde = o * torch.tanh(c_tilde)
            h_out = h_tilde if d_h is None else d_h[t] * h[t] + (1 - d_h[t]) * h_tilde
            c_out = c_tilde if d_c is None else d_c[t] * c[t] + (1 - d_c[t]) * c_tilde
            m = 1 if mask is None else mask[t]
            h.append(m * h_out + (1 - m) * h[t])
            c.append(m * c_out + (1 - m) * c[t])
            gates.append(torch.stack((i, f, g, o)))
            c_new.append(c_tilde)
            y.append(m * h_out)
        ctx.save_for_backward(x, torch.stack(h), torch.stack(c), torch.stack(gates), torch.stack(c_new),
                              weight_ih, weight_hh, p_i, p_f, p_o, mask, rho, d_h, d_c)
        return torch.stack(y), h[-1], c[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y: Tensor, d_hT: Tensor, d_cT: Tensor):
        x, h, c, gates, c_new, weight_ih, weight_hh, p_i, p_f, p_o, mask, rho, d_h, d_c = ctx.saved_tensors
        peep = p_i is not None
        T = x.shape[0]
        dh, dc, dz = d_hT, d_cT, [None] * T
        for t in reversed(range(T)):
            i, f, g, o = gates[t]
            tanh_c = torch.tanh(c_new[t])
            m = 1 if mask is None else mask[t]
            g_h, g_c = m * (dh + d_y[t]), m * dc
            dh_tilde = g_h if d_h is None else (1 - d_h[t]) * g_h
            dc_tilde = g_c if d_c is None else (1 - d_c[t]) * g_c
            dz_o = dh_tilde * tanh_c * o * (1 - o)
            dc_tilde = dc_tilde + dh_tilde * o * (1 - tanh_c ** 2) + (p_o * dz_o if peep else 0)
            dz_i = dc_tilde * g * i * (1 - i)
            dz_f = dc_tilde * c[t] * f * (1 - f)
            dz_g = dc_tilde * i * (1 - g ** 2)
            dc = (1 - m) * dc + dc_tilde * f + (p_i * dz_i + p_f * dz_f if peep else 0) + \
                (0 if d_c is None else d_c[t] * g_c)
            dz[t] = torch.cat((dz_i, dz_f, dz_g, dz_o), 1)
            back = dz[t] @ weight_hh
            dh = (1 - m) * dh + (back if rho is None else rho * back) + (0 if d_h is None else d_h[t] * g_h)
        dZ = torch.stack(dz)  # (T, B, 4H)
        rows = dZ.flatten(0, 1)
        d_b = rows.sum(0)
        d_p = (None,) * 3
        if peep:
            dz_i, dz_f, _, dz_o = dZ.chunk(4, -1)
            d_p = ((dz_i * c[:-1]).sum((0, 1)), (dz_f * c[:-1]).sum((0, 1)), (dz_o * c_new).sum((0, 1)))
        h_prev = h[:-1] if rho is None else h[:-1] * rho
        return ((rows @ weight_ih).view_as(x), dh, dc, rows.T @ x.flatten(0, 1), rows.T @ h_prev.flatten(0, 1),
                d_b, d_b.clone(), *d_p, None, None, None, None)


class GRUReference(torch.autograd.Function):
    """One GRU layer (PyTorch's formulation, ``cells.GRUCell``; docs/bptt.md, "GRU"), masks as
    in section 4, gates stacked (r, z, n).

    Forward, with s_{t-1} the state and ρ the recurrent dropout mask (all ones when off):
               a_t = x_t W_ihᵀ + b_ih,   b_t = (s_{t-1} ⊙ ρ) W_hhᵀ + b_hh     (blocks r, z, n)
               r = σ(a^r + b^r),  z = σ(a^z + b^z),  n = tanh(a^n + ρ ⊙ b^n)
               h̃_t = (1 − z) n + z s_{t-1},   ĥ_t = d_t s_{t-1} + (1 − d_t) h̃_t   (zoneout d)
               s_t = m_t ĥ_t + (1 − m_t) s_{t-1},   y_t = m_t ĥ_t
    Backward, δs_t the gradient reaching s_t from later steps, G = m_t (δs_t + ∂L/∂y_t):
               δh̃ = (1 − d_t) G
               δa^n = δh̃ (1 − z)(1 − n²),   δb^n = δa^n ⊙ ρ
               δa^z = δb^z = δh̃ (s_{t-1} − n) z (1 − z)
               δa^r = δb^r = δa^n ⊙ b^n ⊙ ρ (1 − r)
               δs_{t-1} = (1 − m_t) δs_t + d_t G + δh̃ ⊙ z + ρ ⊙ (δb_t W_hh)
    and over all steps, dA and dB (T·B, 3H) the rows δa_t and δb_t (they differ in the n block):
               dW_ih = dAᵀ X, db_ih = Σ_rows dA, dX = dA W_ih, dW_hh = dBᵀ (S_prev ⊙ ρ), db_hh = Σ_rows dB.
    """

    @staticmethod
    def forward(ctx, x: Tensor, s0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                bias_hh: Tensor, mask: Optional[Tensor], rho: Optional[Tensor] = None, d: Optional[Tensor] = None):
        s, gates, b_n, y = [s0], [], [], []
        for t in range(x.shape[0]):
            s_in = s[t] if rho is None else s[t] * rho
            a_r, a_z, a_n = (x[t] @ weight_ih.T + bias_ih).chunk(3, 1)
            h_r, h_z, h_n = (s_in @ weight_hh.T + bias_hh).chunk(3, 1)
            r, z = torch.sigmoid(a_r + h_r), torch.sigmoid(a_z + h_z)
            n = torch.tanh(a_n + r * h_n)
            h_tilde = (1 - z) * n + z * s[t]
            h_out = h_tilde if d is None else d[t] * s[t] + (1 - d[t]) * h_tilde
            m = 1 if mask is None else mask[t]
            s.append(m * h_out + (1 - m) * s[t])
            y.append(m * h_out)
            gates.append(torch.stack((r, z, n)))
            b_n.append(h_n)
        ctx.save_for_backward(x, torch.stack(s), torch.stack(gates), torch.stack(b_n), weight_ih, weight_hh,
                              mask, rho, d)
        return torch.stack(y), s[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y: Tensor, d_sT: Tensor):
        x, s, gates, b_n, weight_ih, weight_hh, mask, rho, d = ctx.saved_tensors
        T = x.shape[0]
        ds, d_a, d_b = d_sT, [None] * T, [None] * T
        for t in reversed(range(T)):
            r, z, n = gates[t]
            m = 1 if mask is None else mask[t]
            g = m * (ds + d_y[t])
            dh = g if d is None else (1 - d[t]) * g
            da_n = dh * (1 - z) * (1 - n ** 2)
            da_z = dh * (s[t] - n) * z * (1 - z)
            da_r = da_n * b_n[t] * r * (1 - r)
            d_a[t] = torch.cat((da_r, da_z, da_n), 1)
            d_b[t] = torch.cat((da_r, da_z, da_n * r), 1)
            back = d_b[t] @ weight_hh
            ds = (1 - m) * ds + dh * z + (back if rho is None else rho * back) + (0 if d is None else d[t] * g)
        dA, dB = torch.stack(d_a).flatten(0, 1), torch.stack(d_b).flatten(0, 1)  # (T·B, 3H)
        s_prev = s[:-1] if rho is None else s[:-1] * rho
        return ((dA @ weight_ih).view_as(x), ds, dA.T @ x.flatten(0, 1), dB.T @ s_prev.flatten(0, 1),
                dA.sum(0), dB.sum(0), None, None, None)
