// The elementwise step math declared in cell_steps.h; the equations are in fused_bptt.cpp.
#include "cell_steps.h"

#include <cmath>
#include <cstring>

namespace seqmodels_fused {
namespace {

// exp for float, vectorizable (no calls, no branches): Cody-Waite reduction x = n ln2 + r,
// e^r by the degree-6 polynomial of Cephes' expf (max error ~1 ulp), 2^n by building the
// exponent bits. NaN stays NaN (the comparisons below are false for NaN).
inline float exp_(float x) {
  x = x < -88.3762626647949f ? -88.3762626647949f : x;
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  float fx = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double exp_(double x) { return std::exp(x); }

// 1/x for x in [1, 2^116], without a divide: vdivps is the slowest instruction of the step
// (an LSTM forward step has five), and three Newton steps r <- r (2 - x r) from a guess built
// from the exponent bits (~3 correct bits, each step doubling them) come within 1.5e-7 relative
// (checked over [1, 5.6e34]) in six FMAs. NaN stays NaN (x r is NaN).
inline float rcp_(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = 0x7EF311C7 - bits;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  r = r * (2.0f - x * r);
  r = r * (2.0f - x * r);
  r = r * (2.0f - x * r);
  return r;
}
inline double rcp_(double x) { return 1.0 / x; }

// σ(x) = 1 / (1 + e^-x); in float, x below -80 counts as -80 (σ(-80) = 1.8e-35), which keeps
// 1 + e^-x within rcp_'s range.
inline float sigmoid_(float x) { return rcp_(1.0f + exp_(-(x < -80.0f ? -80.0f : x))); }
inline double sigmoid_(double x) { return 1.0 / (1.0 + exp_(-x)); }
// tanh(x) = 2σ(2x) - 1; exact std::tanh in float64 (gradcheck)
inline float tanh_(float x) { return 2.0f * sigmoid_(2.0f * x) - 1.0f; }
inline double tanh_(double x) { return std::tanh(x); }

// One row (one sequence) of an LSTM forward step: gates, c̃, h̃ and tanh(c̃) from the
// pre-activations z (4H: i, f, g, o) and c_{t-1}.
template <typename S, bool kPeep>
void lstm_row_forward_(S* __restrict za, const S* __restrict c_prev,
                             const S* __restrict peep, S* __restrict c,
                             S* __restrict h, S* __restrict tc_out, int64_t n, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const S cp = c_prev[j];
    const S i = sigmoid_(za[j] + (kPeep ? peep[j] * cp : S(0)));
    const S f = sigmoid_(za[H + j] + (kPeep ? peep[H + j] * cp : S(0)));
    const S g = tanh_(za[2 * H + j]);
    const S cn = f * cp + i * g;
    const S o = sigmoid_(za[3 * H + j] + (kPeep ? peep[2 * H + j] * cn : S(0)));
    const S tc = tanh_(cn);
    za[j] = i; za[H + j] = f; za[2 * H + j] = g; za[3 * H + j] = o;
    c[j] = cn;
    h[j] = o * tc;
    tc_out[j] = tc;
  }
}

// One row of an LSTM backward step: dz (4H: i, f, g, o) and δc_{t-1} (over δc, in place).
template <typename S, bool kPeep>
void lstm_row_backward_(const S* __restrict act, const S* __restrict tc_t,
                              const S* __restrict c_prev, const S* __restrict dh,
                              const S* __restrict peep, S* __restrict dc, S* __restrict dz,
                              int64_t n, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const S i = act[j], f = act[H + j], g = act[2 * H + j], o = act[3 * H + j];
    const S tc = tc_t[j], d = dh[j];
    const S dzo = d * tc * o * (S(1) - o);
    const S dct = dc[j] + d * o * (S(1) - tc * tc) + (kPeep ? peep[2 * H + j] * dzo : S(0));
    const S dzi = dct * g * i * (S(1) - i);
    const S dzf = dct * c_prev[j] * f * (S(1) - f);
    const S dzg = dct * i * (S(1) - g * g);
    dz[j] = dzi; dz[H + j] = dzf; dz[2 * H + j] = dzg; dz[3 * H + j] = dzo;
    dc[j] = dct * f + (kPeep ? peep[j] * dzi + peep[H + j] * dzf : S(0));
  }
}

}  // namespace

template <typename S> void rnn_row_forward(const S* __restrict z, S* __restrict h, int64_t n,
                                           bool tanh) {
  if (tanh) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] = tanh_(z[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] = z[j] > S(0) ? z[j] : S(0);
  }
}

template <typename S> void rnn_row_backward(const S* __restrict ds, const S* __restrict h,
                                            S* __restrict dz, int64_t n, bool tanh) {
  if (tanh) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dz[j] = ds[j] * (S(1) - h[j] * h[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dz[j] = h[j] > S(0) ? ds[j] : S(0);
  }
}

template <typename S>
void lstm_row_forward(S* za, const S* c_prev, const S* peep, S* c, S* h, S* tc, int64_t n,
                      int64_t stride) {
  if (peep) lstm_row_forward_<S, true>(za, c_prev, peep, c, h, tc, n, stride);
  else lstm_row_forward_<S, false>(za, c_prev, peep, c, h, tc, n, stride);
}

template <typename S>
void lstm_row_backward(const S* act, const S* tc, const S* c_prev, const S* dh, const S* peep,
                       S* dc, S* dz, int64_t n, int64_t stride) {
  if (peep) lstm_row_backward_<S, true>(act, tc, c_prev, dh, peep, dc, dz, n, stride);
  else lstm_row_backward_<S, false>(act, tc, c_prev, dh, peep, dc, dz, n, stride);
}

#define SEQMODELS_INSTANTIATE(S)                                                              \
  template void rnn_row_forward<S>(const S*, S*, int64_t, bool);                            \
  template void rnn_row_backward<S>(const S*, const S*, S*, int64_t, bool);                 \
  template void lstm_row_forward<S>(S*, const S*, const S*, S*, S*, S*, int64_t, int64_t);    \
  template void lstm_row_backward<S>(const S*, const S*, const S*, const S*, const S*, S*, S*, \
                                     int64_t, int64_t);
SEQMODELS_INSTANTIATE(float)
SEQMODELS_INSTANTIATE(double)

}  // namespace seqmodels_fused
