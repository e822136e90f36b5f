// The elementwise math of one step of one sequence (a "row"), for the loops in fused_bptt.cpp.
//
// Plain C++ without torch headers, in its own translation unit: compiled with them, GCC 12 left
// the LSTM loops below scalar. With -O3 -march=native -fopenmp-simd -fno-trapping-math every j
// loop here is vectorized (check: -fopt-info-vec). S is float or double (gradcheck).
#pragma once
#include <cstdint>

namespace seqmodels_fused {

// RNN forward: h = tanh(z) or relu(z), n units
template <typename S> void rnn_row_forward(const S* z, S* h, int64_t n, bool tanh);
// RNN backward: δz = δs ⊙ f'(z), with f' from the output h: 1 - h² (tanh) or [h > 0] (relu)
template <typename S> void rnn_row_backward(const S* ds, const S* h, S* dz, int64_t n, bool tanh);

// LSTM forward, H units: za (4H) holds the pre-activations of i, f, g, o on entry and their
// activations on return; writes c̃, h̃ = o tanh(c̃) and tanh(c̃). peep (3H: p_i, p_f, p_o) or
// nullptr.
template <typename S>
void lstm_row_forward(S* za, const S* c_prev, const S* peep, S* c, S* h, S* tc, int64_t H);
// LSTM backward, H units: from δh and δc (in place -> δc_{t-1}) writes dz (4H: i, f, g, o).
template <typename S>
void lstm_row_backward(const S* act, const S* tc, const S* c_prev, const S* dh, const S* peep,
                       S* dc, S* dz, int64_t H);

}  // namespace seqmodels_fused
