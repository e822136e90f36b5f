// The elementwise math of one step of one sequence (a "row"), for the loops in fused_bptt.cpp.
//
// Plain C++ without torch headers, in its own translation unit: compiled with them, GCC 12 left
// the LSTM loops below scalar. With -O3 -march=native -fopenmp -fno-trapping-math every j
// loop here is vectorized (check: -fopt-info-vec). S is float or double (gradcheck).
#pragma once
#include <cstdint>

namespace seqmodels_fused {

// RNN forward: h = tanh(z) or relu(z), n units
template <typename S> void rnn_row_forward(const S* z, S* h, int64_t n, bool tanh);
// RNN backward: δz = δs ⊙ f'(z), with f' from the output h: 1 - h² (tanh) or [h > 0] (relu)
template <typename S> void rnn_row_backward(const S* ds, const S* h, S* dz, int64_t n, bool tanh);

// LSTM forward, n units of a row whose gates lie `stride` apart (stride = H, the row's units;
// n < H when threads share the row): za (gates i, f, g, o at za, za + stride, ...) holds the
// pre-activations on entry and the activations on return; writes c̃, h̃ = o tanh(c̃) and
// tanh(c̃). peep (p_i, p_f, p_o, `stride` apart) or nullptr.
template <typename S>
void lstm_row_forward(S* za, const S* c_prev, const S* peep, S* c, S* h, S* tc, int64_t n,
                      int64_t stride);
// LSTM backward, n units as above: from δh and δc (in place -> δc_{t-1}) writes dz (i, f, g, o).
template <typename S>
void lstm_row_backward(const S* act, const S* tc, const S* c_prev, const S* dh, const S* peep,
                       S* dc, S* dz, int64_t n, int64_t stride);

}  // namespace seqmodels_fused
