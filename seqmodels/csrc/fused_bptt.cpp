// The time loops of seqmodels/bptt.py in C++, each step's elementwise math fused into one pass.
//
// Same equations, same buffers and same conventions as the Python loops in bptt.py (time-major,
// state buffers with T+1 slots, torch's gate order i, f, g, o); see the docstrings there and
// docs/bptt.md for the derivations. What changes is the cost of a step: one GEMM
// (at::addmm_out into a preallocated buffer) and one pass over the B x H units that reads the
// GEMM's output once and writes every activation, instead of 8-13 separate torch kernels called
// from Python. Built at first use by seqmodels/fused.py (torch.utils.cpp_extension), for the
// machine it runs on (-O3 -march=native: the math loops below vectorize).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cell_steps.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using namespace seqmodels_fused;

// rows [0, B) of a step in chunks of at least ~8k units: small steps stay on one thread
template <typename F> void for_rows(int64_t B, int64_t units_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, units_per_row));
  at::parallel_for(0, B, grain, f);
}

// "row b is past its end at step t" (1-based t), or never without lengths
inline bool padded(const int64_t* len, int64_t b, int64_t t) { return len && t > len[b]; }

// ------------------------------------------------------------------------------------------
// Vanilla RNN
// ------------------------------------------------------------------------------------------
// Forward: hs (T+1, B, H), slot 0 = h0, filled in place; xz (T, B, H) = W_ih x_t + b_ih + b_hh.
//   z_t = xz_t + s_{t-1} W_hhᵀ,  h̃_t = f(z_t),  s_t = m_t h̃_t + (1 - m_t) s_{t-1}
template <typename S>
void rnn_forward_impl(const at::Tensor& xz, at::Tensor& hs, const at::Tensor& w_hh_t,
                      const int64_t* len, bool tanh) {
  const int64_t T = xz.size(0), B = xz.size(1), H = xz.size(2);
  at::Tensor z = at::empty({B, H}, xz.options());
  for (int64_t t = 1; t <= T; ++t) {
    at::addmm_out(z, xz[t - 1], hs[t - 1], w_hh_t);
    const S* zp = z.data_ptr<S>();
    S* h = hs[t].data_ptr<S>();
    const S* h_prev = hs[t - 1].data_ptr<S>();
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * H;
        if (padded(len, b, t))  // the state stops changing
          std::memcpy(h + o, h_prev + o, H * sizeof(S));
        else
          rnn_row_forward(zp + o, h + o, H, tanh);
      }
    });
  }
}

// Backward: dy (T+1, B, H) holds ∂L/∂y_t (+ ∂L/∂s_T at slot n_b), as bptt.py prepares it.
//   δz_t = δs_t ⊙ f'(z_t),  δs_{t-1} = δz_t W_hh + ∂L/∂y_{t-1};  writes dz (T, B, H), returns δs_0.
template <typename S>
at::Tensor rnn_backward_impl(const at::Tensor& hs, const at::Tensor& dy, const at::Tensor& w_hh,
                             at::Tensor& dz, bool tanh) {
  const int64_t T = dz.size(0), B = dz.size(1), H = dz.size(2);
  at::Tensor ds = dy[T].clone();
  for (int64_t t = T; t >= 1; --t) {
    const S* d = ds.data_ptr<S>();
    const S* h = hs[t].data_ptr<S>();
    S* g = dz[t - 1].data_ptr<S>();
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      rnn_row_backward(d + b0 * H, h + b0 * H, g + b0 * H, (b1 - b0) * H, tanh);
    });
    at::addmm_out(ds, dy[t - 1], dz[t - 1], w_hh);
  }
  return ds;
}

// ------------------------------------------------------------------------------------------
// LSTM (optional peepholes)
// ------------------------------------------------------------------------------------------
// Forward. xz (T, B, 4H) holds W_ih x_t + b_ih + b_hh, gates i, f, g, o; step t's
// activations i, f, g, o are written over xz[t-1] and tanh(c̃_t) into tcs[t-1] when tcs is
// (T, B, H) (what the backward needs; a (1, B, H) tcs is scratch). hs, cs (T+1, B, H), slot 0 =
// the initial state.
//   z = xz_t + h_{t-1} W_hhᵀ;  i = σ(z^i + p_i c_{t-1}), f = σ(z^f + p_f c_{t-1}), g = tanh(z^g)
//   c̃ = f c_{t-1} + i g;  o = σ(z^o + p_o c̃);  h̃ = o tanh(c̃);  masked as the RNN
template <typename S>
void lstm_forward_impl(at::Tensor& xz, at::Tensor& hs, at::Tensor& cs, const at::Tensor& w_hh_t,
                       const S* peep, const int64_t* len, at::Tensor& tcs) {
  const int64_t T = xz.size(0), B = xz.size(1), H = hs.size(2), G = 4 * H;
  at::Tensor z = at::empty({B, G}, xz.options());
  for (int64_t t = 1; t <= T; ++t) {
    at::addmm_out(z, xz[t - 1], hs[t - 1], w_hh_t);
    const S* zp = z.data_ptr<S>();
    S* act = xz[t - 1].data_ptr<S>();
    S* h = hs[t].data_ptr<S>();
    S* c = cs[t].data_ptr<S>();
    const S* h_prev = hs[t - 1].data_ptr<S>();
    const S* c_prev = cs[t - 1].data_ptr<S>();
    S* tc = tcs.data_ptr<S>() + (tcs.size(0) == T ? (t - 1) * B * H : 0);  // or one scratch
    for_rows(B, G, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = b * H;
        lstm_row_forward(zp + 4 * r, c_prev + r, peep, act + 4 * r, c + r, h + r, tc + r, H);
        if (padded(len, b, t)) {  // the state stops changing (c̃ in tcs/acts is not used)
          std::memcpy(h + r, h_prev + r, H * sizeof(S));
          std::memcpy(c + r, c_prev + r, H * sizeof(S));
        }
      }
    });
  }
}

// Backward. acts (T, B, 4H), tcs (T, B, H), cs (T+1, B, H) from the forward; dy (T+1, B, H) as
// for the RNN; dc_T (B, H) enters at step n_b of each row. With δh_t from step t+1 and y_t:
//   δz^o = δh ⊙ tanh(c̃) ⊙ o(1 - o);   δc̃ = δc + δh ⊙ o(1 - tanh²(c̃)) + p_o ⊙ δz^o
//   δz^i = δc̃ ⊙ g ⊙ i(1 - i);  δz^f = δc̃ ⊙ c_{t-1} ⊙ f(1 - f);  δz^g = δc̃ ⊙ i ⊙ (1 - g²)
//   δc_{t-1} = δc̃ ⊙ f + p_i ⊙ δz^i + p_f ⊙ δz^f;   δh_{t-1} = δz_t W_hh + ∂L/∂y_{t-1}
// Rows past their end have δh = δc = 0 there, and zeros propagate (bptt.py, "Masks").
// Writes dz (T, B, 4H); returns δh_0, δc_0.
template <typename S>
std::tuple<at::Tensor, at::Tensor> lstm_backward_impl(
    const at::Tensor& acts, const at::Tensor& tcs, const at::Tensor& cs, const at::Tensor& dy,
    const at::Tensor& dc_T, const at::Tensor& w_hh, const S* peep, const int64_t* len,
    at::Tensor& dz) {
  const int64_t T = acts.size(0), B = acts.size(1), H = cs.size(2), G = 4 * H;
  at::Tensor dh = dy[T].clone();
  at::Tensor dc = len ? at::zeros_like(dc_T) : dc_T.clone();
  const S* dcT = dc_T.data_ptr<S>();
  S* dcp = dc.data_ptr<S>();
  for (int64_t t = T; t >= 1; --t) {
    const S* dhp = dh.data_ptr<S>();
    const S* act = acts[t - 1].data_ptr<S>();
    const S* tc = tcs[t - 1].data_ptr<S>();
    const S* c_prev = cs[t - 1].data_ptr<S>();
    S* dzp = dz[t - 1].data_ptr<S>();
    for_rows(B, G, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = b * H;
        if (len && len[b] == t)  // the final cell state's gradient enters at step n_b
          for (int64_t j = 0; j < H; ++j) dcp[r + j] += dcT[r + j];
        lstm_row_backward(act + 4 * r, tc + r, c_prev + r, dhp + r, peep, dcp + r, dzp + 4 * r, H);
      }
    });
    at::addmm_out(dh, dy[t - 1], dz[t - 1], w_hh);
  }
  if (len) {  // sequences of length 0: their final state is the initial one
    for (int64_t b = 0; b < B; ++b)
      if (len[b] == 0)
        for (int64_t j = 0; j < H; ++j) dcp[b * H + j] += dcT[b * H + j];
  }
  return {dh, dc};
}

const int64_t* lengths_ptr(const std::optional<at::Tensor>& lengths) {
  if (!lengths.has_value()) return nullptr;
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->is_contiguous() &&
              lengths->device().is_cpu(), "lengths must be a contiguous CPU int64 tensor");
  return lengths->data_ptr<int64_t>();
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

void rnn_forward(const at::Tensor& xz, at::Tensor hs, const at::Tensor& w_hh_t,
                 const std::optional<at::Tensor>& lengths, bool tanh) {
  check(xz, "xz"); check(hs, "hs");
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnn_forward", [&] {
    rnn_forward_impl<scalar_t>(xz, hs, w_hh_t, lengths_ptr(lengths), tanh);
  });
}

at::Tensor rnn_backward(const at::Tensor& hs, const at::Tensor& dy, const at::Tensor& w_hh,
                        at::Tensor dz, bool tanh) {
  check(hs, "hs"); check(dy, "dy"); check(dz, "dz");
  at::Tensor ds;
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnn_backward", [&] {
    ds = rnn_backward_impl<scalar_t>(hs, dy, w_hh, dz, tanh);
  });
  return ds;
}

void lstm_forward(at::Tensor xz, at::Tensor hs, at::Tensor cs, const at::Tensor& w_hh_t,
                  const std::optional<at::Tensor>& peep, const std::optional<at::Tensor>& lengths,
                  at::Tensor tcs) {
  check(xz, "xz"); check(hs, "hs"); check(cs, "cs"); check(tcs, "tcs");
  const at::Tensor p_ = peep.has_value() ? peep->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "lstm_forward", [&] {
    const scalar_t* p = p_.defined() ? p_.data_ptr<scalar_t>() : nullptr;
    lstm_forward_impl<scalar_t>(xz, hs, cs, w_hh_t, p, lengths_ptr(lengths), tcs);
  });
}

std::tuple<at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& acts, const at::Tensor& tcs, const at::Tensor& cs, const at::Tensor& dy,
    const at::Tensor& dc_T, const at::Tensor& w_hh, const std::optional<at::Tensor>& peep,
    const std::optional<at::Tensor>& lengths, at::Tensor dz) {
  check(acts, "acts"); check(tcs, "tcs"); check(cs, "cs"); check(dy, "dy"); check(dz, "dz");
  std::tuple<at::Tensor, at::Tensor> out;
  at::Tensor dcT = dc_T.contiguous();
  const at::Tensor p_ = peep.has_value() ? peep->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_backward", [&] {
    const scalar_t* p = p_.defined() ? p_.data_ptr<scalar_t>() : nullptr;
    out = lstm_backward_impl<scalar_t>(acts, tcs, cs, dy, dcT, w_hh, p, lengths_ptr(lengths), dz);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(seqmodels_fused, m) {
  m.def("rnn_forward(Tensor xz, Tensor(a!) hs, Tensor w_hh_t, Tensor? lengths, bool tanh) -> ()",
        &rnn_forward);
  m.def("rnn_backward(Tensor hs, Tensor dy, Tensor w_hh, Tensor(a!) dz, bool tanh) -> Tensor",
        &rnn_backward);
  m.def("lstm_forward(Tensor(a!) xz, Tensor(b!) hs, Tensor(c!) cs, Tensor w_hh_t, Tensor? peep, "
        "Tensor? lengths, Tensor(d!) tcs) -> ()", &lstm_forward);
  m.def("lstm_backward(Tensor acts, Tensor tcs, Tensor cs, Tensor dy, Tensor dc_T, Tensor w_hh, "
        "Tensor? peep, Tensor? lengths, Tensor(a!) dz) -> (Tensor, Tensor)", &lstm_backward);
}
