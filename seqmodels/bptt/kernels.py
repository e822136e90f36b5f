"""The recurrent time loops as Triton kernels, for ``impl: triton`` on CUDA (experimental) (``gpu.py`` launches them).

The formulas are those of ``reference.py`` (docs/bptt.md): these kernels only change where the
work happens. Everything that does not depend on the previous step stays outside, in one big
cuBLAS GEMM each (the input projection before the loop; dX, dW_ih, dW_hh and the biases after
it), exactly as on the CPU. What runs here is the part that must step through time:

    forward, step t     z_t = xz_t + (h_{t-1} ⊙ ρ) W_hhᵀ        (xz_t = x_t W_ihᵀ + b, given)
                        gates, c_t, h_t, zoneout, length mask   (fused, in registers)
    backward, step t    δh_t = carry_h + ρ ⊙ (δz_{t+1} W_hh)    (the recurrent GEMM)
                        δz_t and the carries of δh, δc          (fused, in registers)

Each program owns a block of batch rows × hidden units (BB × BH) and all the gates of those
units, so the elementwise part of a step needs nothing from other programs; only
the GEMM input (h_{t-1} in the forward, δz_{t+1} in the backward, all columns of the program's
rows) comes from the others.

Two ways to step (``SYNC``):
    persistent (SYNC=True)  one launch runs all T steps; after each step the programs meet at a
                            grid barrier in global memory. It needs every program resident at
                            once, so the grid is at most one program per SM (``gpu.plan``);
                            the wait is bounded, and a timeout raises a flag that the host
                            checks (it then reruns the layer one launch per step).
    per step (SYNC=False)   one launch per time step; any grid size. The fallback, and how the
                            Triton interpreter (TRITON_INTERPRET=1, which runs programs one after
                            another) checks multi-program grids on a CPU.

Buffers (time-major, contiguous; offsets in int64 from the time index on):
    xz / acts (T, B, G)   in: x W_ihᵀ + b_ih + b_hh (GRU: + b_ih only); the forward overwrites
                          each step with the activations (RNN: h̃; LSTM: i, f, g, o; GRU: r, z, n),
                          the backward with δz_t (GRU: δb_t, its recurrent part)
    hs (T+1, B, H)        slot 0 = h_0, slot t = h_t (masked: carried through padding)
    cs (T+1, B, H) ACC    the same for the LSTM's cell state
The GEMM operands (h, W, δz) are in the model's dtype (float32, bfloat16 or float16); products
accumulate, and the elementwise math and the cell state run, in ``ACC``: float32 (float64 for
float64 inputs, which only the interpreter runs: the CPU tests check the formulas to ~1e-12).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The step range changes with every per-step launch: one compiled kernel for all of them.
_STEP_ARGS = ["t_start", "t_stop"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # (1 - e^{-2|x|}) / (1 + e^{-2|x|}) with the sign of x: no overflow, no cancellation near 0
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: in float32, for the Triton interpreter, whose bfloat16 arithmetic is
    wrong (conversions are right); on a GPU bfloat16 tiles go to the tensor cores as they are."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _grid_sync(sync, target, SPIN: tl.constexpr):
    """Wait until ``target`` arrivals are counted in sync[0] (all programs, this step); after
    SPIN polls give up and set sync[1] (the host then reruns the layer step by step).
    The atomics on a scalar run in one thread of the program (thread 0; Triton broadcasts the
    result), so each program arrives once; the slow compile test checks that in the PTX."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    tl.atomic_add(sync, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(sync, 0, sem="acquire", scope="gpu")
    failed = tl.atomic_add(sync + 1, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (failed == 0) & (spins < SPIN):
        seen = tl.atomic_add(sync, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.atomic_xchg(sync + 1, 1, sem="release", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gemm_input(h, rho, rows, row_ok, ks, k_ok, H, HAS_RHO: tl.constexpr, ACC: tl.constexpr):
    """The (BB, BK) tile of h_{t-1} ⊙ ρ that the step's GEMM multiplies: columns ks of the
    program's rows, written by other programs last step. That these loads see those writes is
    the barrier's doing (release add, acquire load, then a CTA barrier: PTX's memory model
    orders every thread's later loads after the other programs' stores); ``.cg`` (skip L1)
    is only a hint, which Triton's pipeliner drops when it turns the load into a ``cp.async``."""
    offsets = rows[:, None] * H + ks[None, :]
    both = row_ok[:, None] & k_ok[None, :]
    h_k = tl.load(h + offsets, mask=both, other=0.0, cache_modifier=".cg")
    if HAS_RHO:
        rho_k = tl.load(rho + offsets, mask=both, other=0.0)
        h_k = (h_k.to(ACC) * rho_k.to(ACC)).to(h_k.dtype)
    return h_k


@triton.jit
def _back_through_w_hh(dz_next, w, rho, rows, row_ok, cols, col_ok, H, G, BB: tl.constexpr, BH: tl.constexpr,
                       BK: tl.constexpr, HAS_RHO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       ACC: tl.constexpr):
    """ρ ⊙ (δz_{t+1} W_hh) for the program's (rows, cols): δz_{t+1} (B, G) of all programs, so
    past L1 (``.cg``), times W_hh (G, H), summed over the G gate columns."""
    back = tl.zeros((BB, BH), ACC)
    for k0 in range(0, G, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < G
        dz_k = tl.load(dz_next + rows[:, None] * G + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                       cache_modifier=".cg")
        w_k = tl.load(w + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        back = _dot(dz_k, w_k, back, PRECISION, UPCAST)
    if HAS_RHO:
        back = back * tl.load(rho + rows[:, None] * H + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                              other=0.0).to(ACC)
    return back


@triton.jit
def _row_live(lengths, rows, row_ok, t, HAS_LEN: tl.constexpr, ACC: tl.constexpr):
    """m_t per row (BB, 1): 1 while t (0-based) < n_b, else 0."""
    if HAS_LEN:
        n = tl.load(lengths + rows, mask=row_ok, other=0)
        return tl.where(t < n, 1.0, 0.0).to(ACC)[:, None]
    else:
        return tl.full((rows.shape[0], 1), 1.0, ACC)


# ---------------------------------------------------------------------------------------
# Vanilla RNN:  z_t = xz_t + (h_{t-1} ⊙ ρ) W_hhᵀ,  h̃_t = f(z_t),  ĥ = d h_{t-1} + (1 − d) h̃,
#               h_t = m ĥ + (1 − m) h_{t-1}
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_STEP_ARGS)
def rnn_forward(xz, hs, w_t, rho, d_h, lengths, sync, B, H, t_start, t_stop,
                TANH: tl.constexpr, HAS_RHO: tl.constexpr, HAS_DH: tl.constexpr, HAS_LEN: tl.constexpr,
                SYNC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                PRECISION: tl.constexpr, SPIN: tl.constexpr, ACC: tl.constexpr,
                UPCAST: tl.constexpr):
    """w_t = W_hhᵀ (H, H); xz (T, B, H) gets h̃_t (f' comes from it in the backward)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok, col_ok = rows < B, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]
    programs = tl.num_programs(0) * tl.num_programs(1)
    for t in range(t_start, t_stop):
        slot = tl.cast(t, tl.int64) * B * H  # slot t of hs, step t of xz / d_h
        acc = tl.zeros((BB, BH), ACC)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < H
            h_k = _gemm_input(hs + slot, rho, rows, row_ok, ks, k_ok, H, HAS_RHO, ACC)
            w_k = tl.load(w_t + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(h_k, w_k, acc, PRECISION, UPCAST)
        z = acc + tl.load(xz + slot + own, mask=ok, other=0.0).to(ACC)
        h_til = _tanh(z) if TANH else tl.maximum(z, 0.0)
        h_prev = tl.load(hs + slot + own, mask=ok, other=0.0, cache_modifier=".cg").to(ACC)
        h_out = h_til
        if HAS_DH:
            d = tl.load(d_h + slot + own, mask=ok, other=0.0).to(ACC)
            h_out = d * h_prev + (1.0 - d) * h_til
        m = _row_live(lengths, rows, row_ok, t, HAS_LEN, ACC)
        h_new = m * h_out + (1.0 - m) * h_prev
        tl.store(hs + slot + B * H + own, h_new.to(hs.dtype.element_ty), mask=ok)
        tl.store(xz + slot + own, h_til.to(xz.dtype.element_ty), mask=ok)
        if SYNC:
            _grid_sync(sync, (t - t_start + 1) * programs, SPIN)


@triton.jit(do_not_specialize=_STEP_ARGS)
def rnn_backward(acts, dy, w, carry, rho, d_h, lengths, sync, B, H, T, t_stop, t_start,
                 TANH: tl.constexpr, HAS_RHO: tl.constexpr, HAS_DH: tl.constexpr, HAS_LEN: tl.constexpr,
                 SYNC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr, SPIN: tl.constexpr, ACC: tl.constexpr,
                UPCAST: tl.constexpr):
    """Steps t = t_start − 1 down to t_stop. acts (T, B, H): h̃_t in, δz_t out (in place);
    w = W_hh (H, H); carry (B, H) ACC: the part of δh_t that is not ρ ⊙ δz_{t+1} W_hh
    (in: ∂L/∂h_T at t_start = T; out: after step t_stop)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok, col_ok = rows < B, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]
    programs = tl.num_programs(0) * tl.num_programs(1)
    for step in range(t_stop, t_start):
        t = t_start - 1 - (step - t_stop)
        slot = tl.cast(t, tl.int64) * B * H
        dh = tl.load(carry + own, mask=ok, other=0.0)
        if t + 1 < T:  # + ρ ⊙ (δz_{t+1} W_hh)
            back = _back_through_w_hh(acts + slot + B * H, w, rho, rows, row_ok, cols, col_ok, H, H, BB, BH, BK,
                                      HAS_RHO, PRECISION, UPCAST, ACC)
            dh += back
        m = _row_live(lengths, rows, row_ok, t, HAS_LEN, ACC)
        g = m * (dh + tl.load(dy + slot + own, mask=ok, other=0.0).to(ACC))
        dh_til = g
        keep = (1.0 - m) * dh
        if HAS_DH:
            d = tl.load(d_h + slot + own, mask=ok, other=0.0).to(ACC)
            dh_til = (1.0 - d) * g
            keep += d * g
        h_til = tl.load(acts + slot + own, mask=ok, other=0.0).to(ACC)
        f_prime = 1.0 - h_til * h_til if TANH else tl.where(h_til > 0, 1.0, 0.0)
        tl.store(acts + slot + own, (dh_til * f_prime).to(acts.dtype.element_ty), mask=ok)
        tl.store(carry + own, keep, mask=ok)
        if SYNC:
            _grid_sync(sync, (step - t_stop + 1) * programs, SPIN)


# ---------------------------------------------------------------------------------------
# LSTM, gates in torch's order (i, f, g, o), optional peepholes p_i, p_f, p_o
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_STEP_ARGS)
def lstm_forward(xz, hs, cs, w_t, rho, d_h, d_c, lengths, p_i, p_f, p_o, sync, B, H, t_start, t_stop,
                 PEEP: tl.constexpr, HAS_RHO: tl.constexpr, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr,
                 HAS_LEN: tl.constexpr, SYNC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
                 BK: tl.constexpr, PRECISION: tl.constexpr, SPIN: tl.constexpr, ACC: tl.constexpr,
                UPCAST: tl.constexpr):
    """w_t = W_hhᵀ (H, 4H); xz (T, B, 4H) gets the activations i, f, g, o."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok, col_ok = rows < B, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]  # this program's units in a (B, H) slice
    gate = rows[:, None] * (4 * H) + cols[None, :]  # its gate i in a (B, 4H) slice; f, g, o at +H, +2H, +3H
    programs = tl.num_programs(0) * tl.num_programs(1)
    if PEEP:
        pi = tl.load(p_i + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        pf = tl.load(p_f + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        po = tl.load(p_o + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    for t in range(t_start, t_stop):
        slot = tl.cast(t, tl.int64) * B * H
        zslot = tl.cast(t, tl.int64) * B * (4 * H)
        acc_i = tl.zeros((BB, BH), ACC)
        acc_f = tl.zeros((BB, BH), ACC)
        acc_g = tl.zeros((BB, BH), ACC)
        acc_o = tl.zeros((BB, BH), ACC)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < H
            h_k = _gemm_input(hs + slot, rho, rows, row_ok, ks, k_ok, H, HAS_RHO, ACC)
            w_k = w_t + ks[:, None] * (4 * H) + cols[None, :]
            w_ok = k_ok[:, None] & col_ok[None, :]
            acc_i = _dot(h_k, tl.load(w_k, mask=w_ok, other=0.0), acc_i, PRECISION, UPCAST)
            acc_f = _dot(h_k, tl.load(w_k + H, mask=w_ok, other=0.0), acc_f, PRECISION, UPCAST)
            acc_g = _dot(h_k, tl.load(w_k + 2 * H, mask=w_ok, other=0.0), acc_g, PRECISION, UPCAST)
            acc_o = _dot(h_k, tl.load(w_k + 3 * H, mask=w_ok, other=0.0), acc_o, PRECISION, UPCAST)
        z = xz + zslot + gate
        z_i = acc_i + tl.load(z, mask=ok, other=0.0).to(ACC)
        z_f = acc_f + tl.load(z + H, mask=ok, other=0.0).to(ACC)
        z_g = acc_g + tl.load(z + 2 * H, mask=ok, other=0.0).to(ACC)
        z_o = acc_o + tl.load(z + 3 * H, mask=ok, other=0.0).to(ACC)
        c_prev = tl.load(cs + slot + own, mask=ok, other=0.0)
        h_prev = tl.load(hs + slot + own, mask=ok, other=0.0, cache_modifier=".cg").to(ACC)
        if PEEP:
            z_i += pi * c_prev
            z_f += pf * c_prev
        i = _sigmoid(z_i)
        f = _sigmoid(z_f)
        g = _tanh(z_g)
        c_til = f * c_prev + i * g
        if PEEP:
            z_o += po * c_til
        o = _sigmoid(z_o)
        h_out = o * _tanh(c_til)
        c_out = c_til
        if HAS_DH:
            d = tl.load(d_h + slot + own, mask=ok, other=0.0).to(ACC)
            h_out = d * h_prev + (1.0 - d) * h_out
        if HAS_DC:
            d = tl.load(d_c + slot + own, mask=ok, other=0.0).to(ACC)
            c_out = d * c_prev + (1.0 - d) * c_til
        m = _row_live(lengths, rows, row_ok, t, HAS_LEN, ACC)
        tl.store(hs + slot + B * H + own, (m * h_out + (1.0 - m) * h_prev).to(hs.dtype.element_ty), mask=ok)
        tl.store(cs + slot + B * H + own, m * c_out + (1.0 - m) * c_prev, mask=ok)
        tl.store(z, i.to(xz.dtype.element_ty), mask=ok)
        tl.store(z + H, f.to(xz.dtype.element_ty), mask=ok)
        tl.store(z + 2 * H, g.to(xz.dtype.element_ty), mask=ok)
        tl.store(z + 3 * H, o.to(xz.dtype.element_ty), mask=ok)
        if SYNC:
            _grid_sync(sync, (t - t_start + 1) * programs, SPIN)


@triton.jit(do_not_specialize=_STEP_ARGS)
def lstm_backward(acts, cs, dy, w, carry_h, carry_c, rho, d_h, d_c, lengths, p_i, p_f, p_o, sync,
                  B, H, T, t_stop, t_start,
                  PEEP: tl.constexpr, HAS_RHO: tl.constexpr, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr,
                  HAS_LEN: tl.constexpr, SYNC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
                  BK: tl.constexpr, PRECISION: tl.constexpr, SPIN: tl.constexpr, ACC: tl.constexpr,
                UPCAST: tl.constexpr):
    """Steps t = t_start − 1 down to t_stop. acts (T, B, 4H): i, f, g, o in, δz_t out (in
    place); w = W_hh (4H, H); carry_h, carry_c (B, H) ACC: in ∂L/∂h_T, ∂L/∂c_T (at t_start =
    T), out what reaches h, c from the steps done, except ρ ⊙ δz W_hh for h."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok, col_ok = rows < B, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * (4 * H) + cols[None, :]
    programs = tl.num_programs(0) * tl.num_programs(1)
    if PEEP:
        pi = tl.load(p_i + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        pf = tl.load(p_f + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        po = tl.load(p_o + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    for step in range(t_stop, t_start):
        t = t_start - 1 - (step - t_stop)
        slot = tl.cast(t, tl.int64) * B * H
        zslot = tl.cast(t, tl.int64) * B * (4 * H)
        dh = tl.load(carry_h + own, mask=ok, other=0.0)
        dc = tl.load(carry_c + own, mask=ok, other=0.0)
        if t + 1 < T:  # + ρ ⊙ (δz_{t+1} W_hh), summed over the 4H gate columns
            back = _back_through_w_hh(acts + zslot + B * (4 * H), w, rho, rows, row_ok, cols, col_ok, H, 4 * H, BB, BH,
                                      BK, HAS_RHO, PRECISION, UPCAST, ACC)
            dh += back
        m = _row_live(lengths, rows, row_ok, t, HAS_LEN, ACC)
        g_h = m * (dh + tl.load(dy + slot + own, mask=ok, other=0.0).to(ACC))
        g_c = m * dc
        keep_h = (1.0 - m) * dh
        keep_c = (1.0 - m) * dc
        dh_til = g_h
        dc_til = g_c
        if HAS_DH:
            d = tl.load(d_h + slot + own, mask=ok, other=0.0).to(ACC)
            dh_til = (1.0 - d) * g_h
            keep_h += d * g_h
        if HAS_DC:
            d = tl.load(d_c + slot + own, mask=ok, other=0.0).to(ACC)
            dc_til = (1.0 - d) * g_c
            keep_c += d * g_c
        a = acts + zslot + gate
        i = tl.load(a, mask=ok, other=0.0).to(ACC)
        f = tl.load(a + H, mask=ok, other=0.0).to(ACC)
        g = tl.load(a + 2 * H, mask=ok, other=0.0).to(ACC)
        o = tl.load(a + 3 * H, mask=ok, other=0.0).to(ACC)
        c_prev = tl.load(cs + slot + own, mask=ok, other=0.0)
        tanh_c = _tanh(f * c_prev + i * g)  # c̃_t, recomputed: cs holds the zoned-out, masked c_t
        dz_o = dh_til * tanh_c * o * (1.0 - o)
        dc_til += dh_til * o * (1.0 - tanh_c * tanh_c)
        if PEEP:
            dc_til += po * dz_o
        dz_i = dc_til * g * i * (1.0 - i)
        dz_f = dc_til * c_prev * f * (1.0 - f)
        dz_g = dc_til * i * (1.0 - g * g)
        keep_c += dc_til * f
        if PEEP:
            keep_c += pi * dz_i + pf * dz_f
        tl.store(a, dz_i.to(acts.dtype.element_ty), mask=ok)
        tl.store(a + H, dz_f.to(acts.dtype.element_ty), mask=ok)
        tl.store(a + 2 * H, dz_g.to(acts.dtype.element_ty), mask=ok)
        tl.store(a + 3 * H, dz_o.to(acts.dtype.element_ty), mask=ok)
        tl.store(carry_h + own, keep_h, mask=ok)
        tl.store(carry_c + own, keep_c, mask=ok)
        if SYNC:
            _grid_sync(sync, (step - t_stop + 1) * programs, SPIN)


# ---------------------------------------------------------------------------------------
# GRU, gates in torch's order (r, z, n):  a = x W_ihᵀ + b_ih (given),  b = (s ⊙ ρ) W_hhᵀ + b_hh,
#   r = σ(a^r + b^r),  z = σ(a^z + b^z),  n = tanh(a^n + r b^n),  h̃ = (1 − z) n + z s
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_STEP_ARGS)
def gru_forward(xz, hs, b_n, w_t, b_hh, rho, d_h, lengths, sync, B, H, t_start, t_stop,
                HAS_RHO: tl.constexpr, HAS_DH: tl.constexpr, HAS_LEN: tl.constexpr, SYNC: tl.constexpr,
                BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, SPIN: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr):
    """w_t = W_hhᵀ (H, 3H); b_hh (3H); xz (T, B, 3H) gets r, z, n; b_n (T, B, H) gets b^n, which
    the backward needs (δa^r = δa^n ⊙ b^n ⊙ r(1 − r)) and the input projection cannot hold."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok, col_ok = rows < B, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * (3 * H) + cols[None, :]  # gate r in a (B, 3H) slice; z, n at +H, +2H
    programs = tl.num_programs(0) * tl.num_programs(1)
    br = tl.load(b_hh + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    bz = tl.load(b_hh + H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    bn = tl.load(b_hh + 2 * H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    for t in range(t_start, t_stop):
        slot = tl.cast(t, tl.int64) * B * H
        zslot = tl.cast(t, tl.int64) * B * (3 * H)
        acc_r = tl.zeros((BB, BH), ACC)
        acc_z = tl.zeros((BB, BH), ACC)
        acc_n = tl.zeros((BB, BH), ACC)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < H
            h_k = _gemm_input(hs + slot, rho, rows, row_ok, ks, k_ok, H, HAS_RHO, ACC)
            w_k = w_t + ks[:, None] * (3 * H) + cols[None, :]
            w_ok = k_ok[:, None] & col_ok[None, :]
            acc_r = _dot(h_k, tl.load(w_k, mask=w_ok, other=0.0), acc_r, PRECISION, UPCAST)
            acc_z = _dot(h_k, tl.load(w_k + H, mask=w_ok, other=0.0), acc_z, PRECISION, UPCAST)
            acc_n = _dot(h_k, tl.load(w_k + 2 * H, mask=w_ok, other=0.0), acc_n, PRECISION, UPCAST)
        a = xz + zslot + gate
        rg = _sigmoid(tl.load(a, mask=ok, other=0.0).to(ACC) + acc_r + br)
        zg = _sigmoid(tl.load(a + H, mask=ok, other=0.0).to(ACC) + acc_z + bz)
        b = acc_n + bn
        n = _tanh(tl.load(a + 2 * H, mask=ok, other=0.0).to(ACC) + rg * b)
        s_prev = tl.load(hs + slot + own, mask=ok, other=0.0, cache_modifier=".cg").to(ACC)
        h_out = (1.0 - zg) * n + zg * s_prev
        if HAS_DH:
            d = tl.load(d_h + slot + own, mask=ok, other=0.0).to(ACC)
            h_out = d * s_prev + (1.0 - d) * h_out
        m = _row_live(lengths, rows, row_ok, t, HAS_LEN, ACC)
        tl.store(hs + slot + B * H + own, (m * h_out + (1.0 - m) * s_prev).to(hs.dtype.element_ty), mask=ok)
        tl.store(a, rg.to(xz.dtype.element_ty), mask=ok)
        tl.store(a + H, zg.to(xz.dtype.element_ty), mask=ok)
        tl.store(a + 2 * H, n.to(xz.dtype.element_ty), mask=ok)
        tl.store(b_n + slot + own, b.to(b_n.dtype.element_ty), mask=ok)
        if SYNC:
            _grid_sync(sync, (t - t_start + 1) * programs, SPIN)


@triton.jit(do_not_specialize=_STEP_ARGS)
def gru_backward(acts, b_n, hs, dy, w, carry, rho, d_h, lengths, sync, B, H, T, t_stop, t_start,
                 HAS_RHO: tl.constexpr, HAS_DH: tl.constexpr, HAS_LEN: tl.constexpr, SYNC: tl.constexpr,
                 BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
                 SPIN: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Steps t = t_start − 1 down to t_stop. acts (T, B, 3H): r, z, n in, δb_t out (in place);
    b_n (T, B, H): b^n in, δa^n out (the n block of δa_t, where δa and δb differ); w = W_hh
    (3H, H); carry (B, H) ACC as for the RNN."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok, col_ok = rows < B, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * (3 * H) + cols[None, :]
    programs = tl.num_programs(0) * tl.num_programs(1)
    for step in range(t_stop, t_start):
        t = t_start - 1 - (step - t_stop)
        slot = tl.cast(t, tl.int64) * B * H
        zslot = tl.cast(t, tl.int64) * B * (3 * H)
        dh = tl.load(carry + own, mask=ok, other=0.0)
        if t + 1 < T:  # + ρ ⊙ (δb_{t+1} W_hh)
            dh += _back_through_w_hh(acts + zslot + B * (3 * H), w, rho, rows, row_ok, cols, col_ok, H, 3 * H, BB, BH,
                                     BK, HAS_RHO, PRECISION, UPCAST, ACC)
        m = _row_live(lengths, rows, row_ok, t, HAS_LEN, ACC)
        g = m * (dh + tl.load(dy + slot + own, mask=ok, other=0.0).to(ACC))
        dh_til = g
        keep = (1.0 - m) * dh
        if HAS_DH:
            d = tl.load(d_h + slot + own, mask=ok, other=0.0).to(ACC)
            dh_til = (1.0 - d) * g
            keep += d * g
        a = acts + zslot + gate
        rg = tl.load(a, mask=ok, other=0.0).to(ACC)
        zg = tl.load(a + H, mask=ok, other=0.0).to(ACC)
        n = tl.load(a + 2 * H, mask=ok, other=0.0).to(ACC)
        s_prev = tl.load(hs + slot + own, mask=ok, other=0.0).to(ACC)
        b = tl.load(b_n + slot + own, mask=ok, other=0.0).to(ACC)
        da_n = dh_til * (1.0 - zg) * (1.0 - n * n)
        da_z = dh_til * (s_prev - n) * zg * (1.0 - zg)
        da_r = da_n * b * rg * (1.0 - rg)
        keep += dh_til * zg
        tl.store(a, da_r.to(acts.dtype.element_ty), mask=ok)
        tl.store(a + H, da_z.to(acts.dtype.element_ty), mask=ok)
        tl.store(a + 2 * H, (da_n * rg).to(acts.dtype.element_ty), mask=ok)
        tl.store(b_n + slot + own, da_n.to(b_n.dtype.element_ty), mask=ok)
        tl.store(carry + own, keep, mask=ok)
        if SYNC:
            _grid_sync(sync, (step - t_stop + 1) * programs, SPIN)
