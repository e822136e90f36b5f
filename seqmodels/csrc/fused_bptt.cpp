// The time loops of seqmodels/bptt/fast.py in C++, each step's elementwise math fused into one pass.
//
// The equations of seqmodels/bptt/reference.py (docs/bptt.md derives them), with the conventions
// of bptt/fast.py (time-major, state buffers with T+1 slots, torch's gate order i, f, g, o). What changes is the cost of a step: one BLAS GEMM that
// accumulates straight into the step's pre-activation (forward) or gradient (backward) slot,
// and one vectorized pass over the B x H units (cell_steps.cpp) that reads the GEMM's output
// once and writes every activation, instead of 8-13 torch kernels called from Python.
// Built at first use by seqmodels/fused.py (torch.utils.cpp_extension) for the machine it runs
// on (-O3 -march=native).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cell_steps.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// The BLAS that torch links (MKL in the x86 wheels, OpenBLAS elsewhere) exports the Fortran
// GEMMs; called directly they skip ATen's per-call tensor bookkeeping, which at small sizes
// (a 16 x 128 by 128 x 512 GEMM takes ~25 us) is a real share of a step. Weak: where torch's
// BLAS does not export them, or where they disagree with at::mm (checked once, e.g. 64-bit
// integer BLAS), the loops call at::addmm_ instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
// MKL's packed GEMM (the enums passed as ints: CblasRowMajor 101, CblasNoTrans 111, CblasTrans
// 112, CblasPacked 151, CblasBMatrix 162). A plain GEMM copies its weight operand into the
// kernel's blocked layout on every call; in a time loop that is the same W_hh slice T times, and
// at batch sizes of 16-64 rows the copy costs about as much as the multiply (docs/bptt.md).
std::size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*)
    __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int, float,
                         float*, int) __attribute__((weak));
}

namespace {

using namespace seqmodels_fused;

inline void blas_gemm(const char* ta, int m, int n, int k, const float* a, int lda,
                      const float* b, int ldb, float* c, int ldc) {
  const float one = 1.0f;
  sgemm_(ta, "N", &m, &n, &k, &one, a, &lda, b, &ldb, &one, c, &ldc);
}
inline void blas_gemm(const char* ta, int m, int n, int k, const double* a, int lda,
                      const double* b, int ldb, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(ta, "N", &m, &n, &k, &one, a, &lda, b, &ldb, &one, c, &ldc);
}

template <typename S> bool blas_exported() {
  return std::is_same_v<S, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// c (rows x n) += a (rows x k) @ op(w), row-major with row strides lda, ldw, ldc, where
// op(w) = wᵀ for w (n x k) (w_t) or w for w (k x n). In BLAS's column-major terms:
// cᵀ += op(w)ᵀ aᵀ.
template <typename S>
void gemm_acc(bool w_t, int64_t rows, int64_t n, int64_t k, const S* a, int64_t lda, const S* w,
              int64_t ldw, S* c, int64_t ldc, bool use_blas) {
  if (use_blas) {
    blas_gemm(w_t ? "T" : "N", int(n), int(rows), int(k), w, int(ldw), a, int(lda), c, int(ldc));
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  auto view = [&](const S* p, int64_t r, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<S*>(p), {r, cols}, {ld, 1}, opt);
  };
  at::Tensor wt = w_t ? view(w, n, k, ldw).t() : view(w, k, n, ldw);
  view(c, rows, n, ldc).addmm_(view(a, rows, k, lda), wt);
}

// Whether the exported BLAS computes what at::mm computes (once per process and type).
template <typename S> bool use_blas() {
  static const bool ok = [] {
    if (!blas_exported<S>()) return false;
    // fixed inputs: drawing random ones would move torch's global RNG (and so dropout masks)
    const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
    at::Tensor a = at::arange(15, opt).reshape({3, 5}).sin(), w = at::arange(20, opt).reshape({4, 5}).cos();
    at::Tensor v = w.t().contiguous().mul(0.5);
    at::Tensor c1 = at::zeros({3, 4}, opt), c2 = at::zeros({3, 4}, opt);
    gemm_acc<S>(true, 3, 4, 5, a.data_ptr<S>(), 5, w.data_ptr<S>(), 5, c1.data_ptr<S>(), 4, true);
    gemm_acc<S>(false, 3, 4, 5, a.data_ptr<S>(), 5, v.data_ptr<S>(), 4, c2.data_ptr<S>(), 4, true);
    return at::allclose(c1, at::mm(a, w.t()), 1e-4, 1e-5) && at::allclose(c2, at::mm(a, v), 1e-4, 1e-5);
  }();
  return ok;
}

// MKL's packed operand: op(w) of c (rows x n) += a (rows x k) @ op(w), in the GEMM kernel's own
// layout (row-major, "B" operand); nullptr where the buffer cannot be had.
struct FreeFloats { void operator()(float* p) const { std::free(p); } };
using PackedFloats = std::unique_ptr<float, FreeFloats>;

PackedFloats pack_weight(bool w_t, int64_t rows, int64_t n, int64_t k, const float* w, int64_t ldw) {
  const std::size_t bytes = (cblas_sgemm_pack_get_size(162, int(rows), int(n), int(k)) + 63) / 64 * 64;
  PackedFloats packed(static_cast<float*>(std::aligned_alloc(64, bytes)));
  if (packed) cblas_sgemm_pack(101, 162, w_t ? 112 : 111, int(rows), int(n), int(k), 1.0f, w, int(ldw), packed.get());
  return packed;
}

void packed_acc(const float* packed, int64_t rows, int64_t n, int64_t k, const float* a, int64_t lda, float* c,
                int64_t ldc) {
  cblas_sgemm_compute(101, 111, 151, int(rows), int(n), int(k), a, int(lda), packed, int(n), 1.0f, c, int(ldc));
}

// Whether MKL's packed GEMM is exported and computes what at::mm computes (once per process).
bool use_packed() {
  static const bool ok = [] {
    if (!cblas_sgemm_pack_get_size || !cblas_sgemm_pack || !cblas_sgemm_compute || !use_blas<float>())
      return false;
    const auto opt = at::TensorOptions().dtype(at::kFloat);
    at::Tensor a = at::arange(15, opt).reshape({3, 5}).sin(), w = at::arange(20, opt).reshape({4, 5}).cos();
    at::Tensor v = w.t().contiguous().mul(0.5);
    at::Tensor c1 = at::zeros({3, 4}, opt), c2 = at::ones({3, 4}, opt);
    PackedFloats p1 = pack_weight(true, 3, 4, 5, w.data_ptr<float>(), 5);
    PackedFloats p2 = pack_weight(false, 3, 4, 5, v.data_ptr<float>(), 4);
    if (!p1 || !p2) return false;
    packed_acc(p1.get(), 3, 4, 5, a.data_ptr<float>(), 5, c1.data_ptr<float>(), 4);
    packed_acc(p2.get(), 3, 4, 5, a.data_ptr<float>(), 5, c2.data_ptr<float>(), 4);
    return at::allclose(c1, at::mm(a, w.t()), 1e-4, 1e-5) && at::allclose(c2, at::mm(a, v) + 1, 1e-4, 1e-5);
  }();
  return ok;
}

// c (rows x n) += a (rows x k) @ op(w), as gemm_acc, for the T calls of a time loop with the
// same weight slice: packed once where use_packed() (float32), else gemm_acc on every call.
// Each thread builds its own, so its packed slice lives in memory it touched first.
template <typename S>
class WeightOperand {
 public:
  WeightOperand(bool w_t, int64_t rows, int64_t n, int64_t k, const S* w, int64_t ldw, bool blas)
      : w_t_(w_t), rows_(rows), n_(n), k_(k), w_(w), ldw_(ldw), blas_(blas) {
    if constexpr (std::is_same_v<S, float>)
      if (blas && use_packed()) packed_ = pack_weight(w_t, rows, n, k, w, ldw);
  }
  void acc(const S* a, int64_t lda, S* c, int64_t ldc) const {
    if constexpr (std::is_same_v<S, float>)
      if (packed_) return packed_acc(packed_.get(), rows_, n_, k_, a, lda, c, ldc);
    gemm_acc(w_t_, rows_, n_, k_, a, lda, w_, ldw_, c, ldc, blas_);
  }

 private:
  bool w_t_;
  int64_t rows_, n_, k_;
  const S* w_;
  int64_t ldw_;
  bool blas_;
  PackedFloats packed_;
};

// Threads share each step by units: thread p of P owns units [u_p, u_{p+1}) of every row (their
// columns of z, h, c and of each gate), computes those columns' GEMM with a single-threaded BLAS
// call (BLAS runs sequentially inside an OpenMP region) and their elementwise math, then waits
// at a barrier, because the next step's GEMM reads every column. One team for the whole loop,
// one barrier per step: no per-step fork/join, and each thread reads only its slice of W_hh
// (which stays in its core's cache when small enough). docs/bptt.md has the measurements.
class Barrier {
 public:
  void wait(int n) {  // generation counting: the last of n to arrive releases the others
    const int gen = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      arrived_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins)
      if (spins > 4096) std::this_thread::yield();  // a descheduled peer: do not burn its core
  }

 private:
  std::atomic<int> arrived_{0}, gen_{0};
};

constexpr int64_t kMinUnitsPerThread = 32;
constexpr int64_t kMinStepFlops = 1 << 18;  // below this a step is too short to share

// How many threads share a step of B rows, H units and G gate columns: up to torch's thread
// count, at least kMinUnitsPerThread units each; one when the step is small or when the GEMM
// is at::addmm_ (which threads itself).
inline int team_size(int64_t B, int64_t H, int64_t G, bool blas) {
  if (!blas || 2 * B * G * H < kMinStepFlops) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H / kMinUnitsPerThread)));
}

// A thread's share of every step: rows [b0, b1) (sequences) and units [u0, u1).
struct Share {
  int64_t b0, b1, u0, u1;
  int64_t rows() const { return b1 - b0; }
  int64_t units() const { return u1 - u0; }
};

// Sharing by rows when each thread gets at least this many rows and the whole W_hh (read by
// every thread every step) fits in its core's cache: the sequences are independent, so the
// threads never wait for each other (no barrier), and each step is one GEMM per thread.
constexpr int64_t kMinRowsPerThread = 8;
constexpr int64_t kRowsMaxWeightBytes = 1 << 20;

// body(share, sync) on each of the team's threads; sync() is the per-step barrier (a no-op when
// sharing by rows). Unit bounds are multiples of 16 (whole cache lines of floats).
template <typename S, typename F>
void over_team(int64_t B, int64_t H, int64_t G, bool blas, const F& body) {
#ifdef _OPENMP  // (fused.py builds without OpenMP where the compiler has none: one thread)
  if (const int P = team_size(B, H, G, blas); P > 1) {
    const bool by_rows = B >= kMinRowsPerThread * P && G * H * int64_t(sizeof(S)) <= kRowsMaxWeightBytes;
    Barrier barrier;
#pragma omp parallel num_threads(P)
    {
      const int n = omp_get_num_threads(), p = omp_get_thread_num();
      if (by_rows) {
        body(Share{B * p / n, B * (p + 1) / n, 0, H}, [] {});
      } else {
        auto bound = [&](int q) { return q == n ? H : H * q / n / 16 * 16; };
        body(Share{0, B, bound(p), bound(p + 1)}, [&] { barrier.wait(n); });
      }
    }
    return;
  }
#endif
  body(Share{0, B, 0, H}, [] {});
}

// The regularizers inside the recurrence (seqmodels/recurrent.py, docs/bptt.md "Regularizers"),
// all optional (nullptr: off): r (B, H) the recurrent-dropout factors, d_h / d_c (T, B, H) the
// zoneout masks (or p at evaluation), hin (2, B, H) the GEMM's input h ⊙ r, alternating slots
// (slot 0 = h_0 ⊙ r on entry). Weight drop needs nothing here: the loops get W_hh ⊙ M / (1 - p).
template <typename S> struct Regs {
  const S* r = nullptr;
  const S* d_h = nullptr;
  const S* d_c = nullptr;
  S* hin = nullptr;
};

// v = d ⊙ prev + (1 - d) ⊙ v over n units (zoneout of a freshly computed state)
template <typename S> inline void zone_out(S* v, const S* prev, const S* d, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) v[j] = d[j] * prev[j] + (S(1) - d[j]) * v[j];
}

// zoneout's backward on the gradient g reaching the zoned state: carry d ⊙ g to the previous
// state's gradient, keep (1 - d) ⊙ g for the new state's
template <typename S> inline void zone_out_grad(S* g, S* prev_grad, const S* d, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    prev_grad[j] += d[j] * g[j];
    g[j] *= S(1) - d[j];
  }
}

// δh_{t-1} (this thread's rows and units of the dy slot) += (δz_t W_hh) ⊙ r, or + δz_t W_hh without
// recurrent dropout (then straight into the slot); back is the thread's scratch for the product.
template <typename S>
void back_through_w_hh(const WeightOperand<S>& w, const S* dz, int64_t ldz, S* dy_prev, const Share& sh,
                       int64_t H, const S* r, std::vector<S>& back) {
  const int64_t n = sh.units();
  if (!r) return w.acc(dz, ldz, dy_prev + sh.b0 * H + sh.u0, H);
  std::fill(back.begin(), back.end(), S(0));
  w.acc(dz, ldz, back.data(), n);
  for (int64_t b = sh.b0; b < sh.b1; ++b) {
    S* out = dy_prev + b * H + sh.u0;
    const S* rr = r + b * H + sh.u0;
    const S* in = back.data() + (b - sh.b0) * n;
    for (int64_t j = 0; j < n; ++j) out[j] += rr[j] * in[j];
  }
}

// "row b is past its end at time tau" (0-based), or never without lengths
inline bool padded(const int64_t* len, int64_t b, int64_t tau) { return len && tau >= len[b]; }

// The order of a direction. The loops take step k = 0..T-1 at time tau(k): forward tau = k,
// reverse tau = T-1-k. Per-time buffers (xz / acts, tcs, dz, the zoneout masks, y) are indexed by
// tau, so both directions read x and write y in the caller's time order. The state buffers have
// T+1 slots, the state after time tau in slot state(tau) and its input in prev(tau): forward
// [s_0 = initial, after 0, ..., after T-1], reverse [after 0, ..., after T-1, initial]. Padded
// times (tau >= n_b) carry the state: forward they come after a row's end, reverse before its
// start, so the reverse direction starts each row from the initial state at time n_b - 1.
struct Order {
  int64_t T;
  bool reverse;
  int64_t tau(int64_t k) const { return reverse ? T - 1 - k : k; }
  int64_t state(int64_t tau) const { return reverse ? tau : tau + 1; }
  int64_t prev(int64_t tau) const { return reverse ? tau + 1 : tau; }
};

// ------------------------------------------------------------------------------------------
// Vanilla RNN
// ------------------------------------------------------------------------------------------
// Forward: hs (T+1, B, H), slot 0 = h0, filled in place; xz (T, B, H) = W_ih x_t + b_ih + b_hh
// on entry, the pre-activations z_t on return.
//   z_t = xz_t + s_{t-1} W_hhᵀ,  h̃_t = f(z_t),  s_t = m_t h̃_t + (1 - m_t) s_{t-1}
// With zoneout, h̃_t goes back into xz's slot t (the backward's f' needs it; z is not needed),
// and s_t = d_t s_{t-1} + (1 - d_t) h̃_t; with recurrent dropout the GEMM reads s_{t-1} ⊙ r.
template <typename S>
void rnn_forward_impl(S* xz, S* hs, const S* w_hh, int64_t T, int64_t B, int64_t H,
                      const int64_t* len, bool tanh, const Regs<S>& reg, Order order) {
  const bool blas = use_blas<S>();
  const int64_t step = B * H;
  over_team<S>(B, H, H, blas, [&](const Share& sh, auto&& sync) {
    const int64_t n = sh.units(), u0 = sh.u0;
    const WeightOperand<S> w(true, sh.rows(), n, H, w_hh + u0 * H, H, blas);  // this thread's rows of W_hh
    for (int64_t k = 0; k < T; ++k) {
      const int64_t tau = order.tau(k);
      S* z = xz + tau * step + u0;
      const S* h_prev = hs + order.prev(tau) * step;
      const S* gemm_in = reg.hin ? reg.hin + (k & 1) * step : h_prev;
      S* h = hs + order.state(tau) * step + u0;
      w.acc(gemm_in + sh.b0 * H, H, z + sh.b0 * H, H);
      for (int64_t b = sh.b0; b < sh.b1; ++b) {
        const int64_t r = b * H;
        if (padded(len, b, tau)) {  // the state does not change
          std::memcpy(h + r, h_prev + u0 + r, n * sizeof(S));
        } else {
          rnn_row_forward(z + r, h + r, n, tanh);
          if (reg.d_h) {
            std::memcpy(z + r, h + r, n * sizeof(S));  // h̃_t, for the backward
            zone_out(h + r, h_prev + u0 + r, reg.d_h + tau * step + u0 + r, n);
          }
        }
        if (reg.hin) {
          S* in = reg.hin + ((k + 1) & 1) * step + u0 + r;
          const S* rr = reg.r + u0 + r;
          for (int64_t j = 0; j < n; ++j) in[j] = h[r + j] * rr[j];
        }
      }
      sync();  // step t+1's GEMM reads all of h_t
    }
  });
}

// Backward: dy (T+1, B, H), in the state buffers' slots (Order), holds ∂L/∂y_t (+ the final
// state's gradient at the final state's slot), as bptt/fast.py prepares it; the loop turns each
// prev slot into δs_{t-1} in place. A padded time passes δs on unchanged, with δz = 0.
//   δz_t = δs_t ⊙ f'(z_t),  δs_{t-1} = ∂L/∂y_{t-1} + δz_t W_hh;  writes dz (T, B, H); δs_0 in dy[0].
// With zoneout (d_h, and h̃ in htil (T, B, H)): δs_{t-1} += d_t ⊙ δs_t and δh̃_t = (1 - d_t) ⊙ δs_t
// before f'; with recurrent dropout δs_{t-1} gets r ⊙ (δz_t W_hh) (docs/bptt.md, "Regularizers").
template <typename S>
void rnn_backward_impl(const S* hs, S* dy, const S* w_hh, S* dz, int64_t T, int64_t B,
                       int64_t H, const int64_t* len, bool tanh, const Regs<S>& reg, const S* htil,
                       Order order) {
  const bool blas = use_blas<S>();
  const int64_t step = B * H;
  over_team<S>(B, H, H, blas, [&](const Share& sh, auto&& sync) {
    const int64_t n = sh.units(), u0 = sh.u0;
    const WeightOperand<S> w(false, sh.rows(), n, H, w_hh + u0, H, blas);  // this thread's columns of W_hh
    std::vector<S> back(reg.r ? sh.rows() * n : 0);  // δz_t W_hh before r
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t tau = order.tau(k);
      S* ds = dy + order.state(tau) * step + u0;
      S* ds_prev = dy + order.prev(tau) * step + u0;
      const S* h = (htil ? htil + tau * step : hs + order.state(tau) * step) + u0;  // h̃_t for f'
      S* g = dz + tau * step + u0;
      for (int64_t b = sh.b0; b < sh.b1; ++b) {
        const int64_t r = b * H;
        if (padded(len, b, tau)) {  // s_t = s_{t-1}
          std::fill(g + r, g + r + n, S(0));
          for (int64_t j = 0; j < n; ++j) ds_prev[r + j] += ds[r + j];
          continue;
        }
        if (reg.d_h) zone_out_grad(ds + r, ds_prev + r, reg.d_h + tau * step + u0 + r, n);
        rnn_row_backward(ds + r, h + r, g + r, n, tanh);
      }
      sync();  // the GEMM reads all of δz_t
      back_through_w_hh(w, g - u0 + sh.b0 * H, H, ds_prev - u0, sh, H, reg.r, back);
    }
  });
}

// ------------------------------------------------------------------------------------------
// LSTM (optional peepholes)
// ------------------------------------------------------------------------------------------
// Forward. xz (T, B, 4H) holds W_ih x_t + b_ih + b_hh, gates i, f, g, o; step t adds
// h_{t-1} W_hhᵀ there and replaces it by the activations i, f, g, o (what the backward
// needs), and writes tanh(c̃_t) into tcs[t-1] when tcs has T slots (one slot: scratch).
// hs, cs (T+1, B, H), slot 0 = the initial state.
//   z = xz_t + h_{t-1} W_hhᵀ;  i = σ(z^i + p_i c_{t-1}), f = σ(z^f + p_f c_{t-1}), g = tanh(z^g)
//   c̃ = f c_{t-1} + i g;  o = σ(z^o + p_o c̃);  h̃ = o tanh(c̃);  masked as the RNN
template <typename S>
void lstm_forward_impl(S* xz, S* hs, S* cs, const S* w_hh, const S* peep, const int64_t* len,
                       S* tcs, bool tcs_per_step, int64_t T, int64_t B, int64_t H, const Regs<S>& reg,
                       Order order) {
  const bool blas = use_blas<S>();
  const int64_t step = B * H, G = 4 * H;
  over_team<S>(B, H, G, blas, [&](const Share& sh, auto&& sync) {
    const int64_t n = sh.units(), u0 = sh.u0, rows = sh.rows();
    const S* p = peep ? peep + u0 : nullptr;  // this thread's units of p_i (p_f, p_o H apart)
    std::vector<WeightOperand<S>> w;  // the four gates' rows of W_hh in one block, or one per gate
    if (n == H) w.emplace_back(true, rows, G, H, w_hh, H, blas);
    else for (int64_t q = 0; q < 4; ++q) w.emplace_back(true, rows, n, H, w_hh + (q * H + u0) * H, H, blas);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t tau = order.tau(k);
      S* za = xz + tau * B * G + u0;  // pre-activations in, activations out
      const S* h_prev = hs + order.prev(tau) * step;
      const S* c_prev = cs + order.prev(tau) * step + u0;
      S* h = hs + order.state(tau) * step + u0;
      S* c = cs + order.state(tau) * step + u0;
      S* tc = tcs + (tcs_per_step ? tau * step : 0) + u0;
      const S* gemm_in = reg.hin ? reg.hin + (k & 1) * step : h_prev;  // h_{t-1} ⊙ r
      for (std::size_t q = 0; q < w.size(); ++q) w[q].acc(gemm_in + sh.b0 * H, H, za + sh.b0 * G + q * H, G);
      for (int64_t b = sh.b0; b < sh.b1; ++b) {
        const int64_t r = b * H;
        lstm_row_forward(za + b * G, c_prev + r, p, c + r, h + r, tc + r, n, H);
        if (padded(len, b, tau)) {  // the state does not change (c̃ in tcs/acts is not used)
          std::memcpy(h + r, h_prev + u0 + r, n * sizeof(S));
          std::memcpy(c + r, c_prev + r, n * sizeof(S));
        } else {  // zoneout: the gates keep c̃ (acts, tcs); the state is zoned out
          if (reg.d_h) zone_out(h + r, h_prev + u0 + r, reg.d_h + tau * step + u0 + r, n);
          if (reg.d_c) zone_out(c + r, c_prev + r, reg.d_c + tau * step + u0 + r, n);
        }
        if (reg.hin) {
          S* in = reg.hin + ((k + 1) & 1) * step + u0 + r;
          const S* rr = reg.r + u0 + r;
          for (int64_t j = 0; j < n; ++j) in[j] = h[r + j] * rr[j];
        }
      }
      sync();  // step t+1's GEMM reads all of h_t
    }
  });
}

// Backward. acts (T, B, 4H), tcs (T, B, H), cs (T+1, B, H) from the forward; dy (T+1, B, H) as
// for the RNN (each prev slot becomes δh_{t-1} in place); dc_T (B, H) enters at the final state
// (forward: time n_b - 1 of each row; reverse: time 0); dc (B, H) ends as δc_0. With δh_t from step t+1 and y_t:
//   δz^o = δh ⊙ tanh(c̃) ⊙ o(1 - o);   δc̃ = δc + δh ⊙ o(1 - tanh²(c̃)) + p_o ⊙ δz^o
//   δz^i = δc̃ ⊙ g ⊙ i(1 - i);  δz^f = δc̃ ⊙ c_{t-1} ⊙ f(1 - f);  δz^g = δc̃ ⊙ i ⊙ (1 - g²)
//   δc_{t-1} = δc̃ ⊙ f + p_i ⊙ δz^i + p_f ⊙ δz^f;   δh_{t-1} = ∂L/∂y_{t-1} + δz_t W_hh
// Rows past their end have δh = δc = 0 there, and zeros propagate (docs/bptt.md, "Masks").
template <typename S>
void lstm_backward_impl(const S* acts, const S* tcs, const S* cs, S* dy, const S* dcT, S* dc,
                        const S* w_hh, const S* peep, const int64_t* len, S* dz, int64_t T,
                        int64_t B, int64_t H, const Regs<S>& reg, Order order) {
  const bool blas = use_blas<S>();
  const int64_t step = B * H, G = 4 * H;
  const int64_t* ends = order.reverse ? nullptr : len;  // where the final state's gradient enters per row
  if (!ends) std::memcpy(dc, dcT, step * sizeof(S));
  else std::fill(dc, dc + step, S(0));
  over_team<S>(B, H, G, blas, [&](const Share& sh, auto&& sync) {
    const int64_t n = sh.units(), u0 = sh.u0, u1 = sh.u1;
    const S* p = peep ? peep + u0 : nullptr;
    const WeightOperand<S> w(false, sh.rows(), n, G, w_hh + u0, H, blas);  // this thread's columns of W_hh
    std::vector<S> back(reg.r ? sh.rows() * n : 0);  // δz_t W_hh before r
    std::vector<S> carry(reg.d_c ? n : 0);           // d^c ⊙ δc_t, for δc_{t-1}
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t tau = order.tau(k);
      S* dh = dy + order.state(tau) * step + u0;
      S* dh_prev = dy + order.prev(tau) * step + u0;
      const S* act = acts + tau * B * G + u0;
      const S* tc = tcs + tau * step + u0;
      const S* c_prev = cs + order.prev(tau) * step + u0;
      S* g = dz + tau * B * G;
      for (int64_t b = sh.b0; b < sh.b1; ++b) {
        const int64_t r = b * H;
        if (ends && ends[b] == tau + 1)  // the final cell state's gradient enters at time n_b - 1
          for (int64_t j = u0; j < u1; ++j) dc[r + j] += dcT[r + j];
        if (padded(len, b, tau)) {  // h and c carried: δh, δc pass on, δz = 0
          for (int64_t q = 0; q < 4; ++q) std::fill(g + b * G + q * H + u0, g + b * G + q * H + u1, S(0));
          for (int64_t j = 0; j < n; ++j) dh_prev[r + j] += dh[r + j];
          continue;
        }
        if (reg.d_h) zone_out_grad(dh + r, dh_prev + r, reg.d_h + tau * step + u0 + r, n);
        if (reg.d_c) {
          const S* d = reg.d_c + tau * step + u0 + r;
          S* dcr = dc + u0 + r;
          for (int64_t j = 0; j < n; ++j) {
            carry[j] = d[j] * dcr[j];
            dcr[j] *= S(1) - d[j];
          }
        }
        lstm_row_backward(act + b * G, tc + r, c_prev + r, dh + r, p, dc + u0 + r, g + u0 + b * G,
                          n, H);
        if (reg.d_c)
          for (int64_t j = 0; j < n; ++j) dc[u0 + r + j] += carry[j];
      }
      sync();  // the GEMM reads all of δz_t
      back_through_w_hh(w, g + sh.b0 * G, G, dh_prev - u0, sh, H, reg.r, back);
    }
  });
  if (ends)  // sequences of length 0: their final state is the initial one
    for (int64_t b = 0; b < B; ++b)
      if (len[b] == 0)
        for (int64_t j = 0; j < H; ++j) dc[b * H + j] += dcT[b * H + j];
}

const int64_t* lengths_ptr(const std::optional<at::Tensor>& lengths) {
  if (!lengths.has_value()) return nullptr;
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->is_contiguous() &&
              lengths->device().is_cpu(), "lengths must be a contiguous CPU int64 tensor");
  return lengths->data_ptr<int64_t>();
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              name, " must be a contiguous CPU tensor of the input's dtype");
}

template <typename S>
Regs<S> regs_of(const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& d_h,
                const std::optional<at::Tensor>& d_c, const std::optional<at::Tensor>& hin,
                const at::Tensor& like) {
  Regs<S> reg;
  auto ptr = [&](const std::optional<at::Tensor>& t, const char* name) -> S* {
    if (!t.has_value()) return nullptr;
    check(*t, like, name);
    return t->data_ptr<S>();
  };
  reg.r = ptr(r, "r");
  reg.d_h = ptr(d_h, "d_h");
  reg.d_c = ptr(d_c, "d_c");
  reg.hin = ptr(hin, "hin");
  return reg;
}

void rnn_forward(at::Tensor xz, at::Tensor hs, const at::Tensor& w_hh,
                 const std::optional<at::Tensor>& lengths, bool tanh, const std::optional<at::Tensor>& r,
                 const std::optional<at::Tensor>& d_h, const std::optional<at::Tensor>& hin, bool reverse) {
  check(xz, xz, "xz"); check(hs, xz, "hs"); check(w_hh, xz, "w_hh");
  TORCH_CHECK(r.has_value() == hin.has_value(), "r and hin come together");
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnn_forward", [&] {
    rnn_forward_impl<scalar_t>(xz.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                               w_hh.data_ptr<scalar_t>(), xz.size(0), xz.size(1), xz.size(2),
                               lengths_ptr(lengths), tanh, regs_of<scalar_t>(r, d_h, std::nullopt, hin, xz),
                               Order{xz.size(0), reverse});
  });
}

void rnn_backward(const at::Tensor& hs, at::Tensor dy, const at::Tensor& w_hh, at::Tensor dz,
                  const std::optional<at::Tensor>& lengths, bool tanh, const std::optional<at::Tensor>& r,
                  const std::optional<at::Tensor>& d_h, const std::optional<at::Tensor>& htil, bool reverse) {
  check(hs, hs, "hs"); check(dy, hs, "dy"); check(w_hh, hs, "w_hh"); check(dz, hs, "dz");
  if (htil.has_value()) check(*htil, hs, "htil");
  TORCH_CHECK(!d_h.has_value() || htil.has_value(), "zoneout needs h̃ (htil)");
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnn_backward", [&] {
    Regs<scalar_t> reg = regs_of<scalar_t>(r, d_h, std::nullopt, std::nullopt, hs);
    rnn_backward_impl<scalar_t>(hs.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                                w_hh.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), dz.size(0),
                                dz.size(1), dz.size(2), lengths_ptr(lengths), tanh, reg,
                                htil.has_value() ? htil->data_ptr<scalar_t>() : nullptr,
                                Order{dz.size(0), reverse});
  });
}

void lstm_forward(at::Tensor xz, at::Tensor hs, at::Tensor cs, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& peep, const std::optional<at::Tensor>& lengths,
                  at::Tensor tcs, const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& d_h,
                  const std::optional<at::Tensor>& d_c, const std::optional<at::Tensor>& hin, bool reverse) {
  check(xz, xz, "xz"); check(hs, xz, "hs"); check(cs, xz, "cs"); check(w_hh, xz, "w_hh");
  check(tcs, xz, "tcs");
  if (peep.has_value()) check(*peep, xz, "peep");
  TORCH_CHECK(r.has_value() == hin.has_value(), "r and hin come together");
  const int64_t T = xz.size(0);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "lstm_forward", [&] {
    lstm_forward_impl<scalar_t>(
        xz.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
        w_hh.data_ptr<scalar_t>(), peep.has_value() ? peep->data_ptr<scalar_t>() : nullptr,
        lengths_ptr(lengths), tcs.data_ptr<scalar_t>(), tcs.size(0) == T, T, xz.size(1),
        hs.size(2), regs_of<scalar_t>(r, d_h, d_c, hin, xz), Order{T, reverse});
  });
}

at::Tensor lstm_backward(const at::Tensor& acts, const at::Tensor& tcs, const at::Tensor& cs,
                         at::Tensor dy, const at::Tensor& dc_T, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& peep,
                         const std::optional<at::Tensor>& lengths, at::Tensor dz,
                         const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& d_h,
                         const std::optional<at::Tensor>& d_c, bool reverse) {
  check(acts, acts, "acts"); check(tcs, acts, "tcs"); check(cs, acts, "cs");
  check(dy, acts, "dy"); check(w_hh, acts, "w_hh"); check(dz, acts, "dz");
  if (peep.has_value()) check(*peep, acts, "peep");
  const at::Tensor dcT = dc_T.contiguous();
  at::Tensor dc = at::empty_like(dcT);
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_backward", [&] {
    lstm_backward_impl<scalar_t>(
        acts.data_ptr<scalar_t>(), tcs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
        dy.data_ptr<scalar_t>(), dcT.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
        w_hh.data_ptr<scalar_t>(), peep.has_value() ? peep->data_ptr<scalar_t>() : nullptr,
        lengths_ptr(lengths), dz.data_ptr<scalar_t>(), acts.size(0), acts.size(1), cs.size(2),
        regs_of<scalar_t>(r, d_h, d_c, std::nullopt, acts), Order{acts.size(0), reverse});
  });
  return dc;
}

}  // namespace

// In-place arguments are marked (a!): xz and dy are overwritten (see the loops above). reverse:
// the direction (Order).
TORCH_LIBRARY(seqmodels_fused, m) {
  // r, d_h, d_c: the regularizers (Regs above), None when off; hin (e!) the forward's GEMM input
  // h ⊙ r; htil the RNN's h̃ (its xz after a forward with zoneout)
  m.def("rnn_forward(Tensor(a!) xz, Tensor(b!) hs, Tensor w_hh, Tensor? lengths, bool tanh, Tensor? r, "
        "Tensor? d_h, Tensor(e!)? hin, bool reverse) -> ()", &rnn_forward);
  m.def("rnn_backward(Tensor hs, Tensor(a!) dy, Tensor w_hh, Tensor(b!) dz, Tensor? lengths, bool tanh, "
        "Tensor? r, Tensor? d_h, Tensor? htil, bool reverse) -> ()", &rnn_backward);
  m.def("lstm_forward(Tensor(a!) xz, Tensor(b!) hs, Tensor(c!) cs, Tensor w_hh, Tensor? peep, "
        "Tensor? lengths, Tensor(d!) tcs, Tensor? r, Tensor? d_h, Tensor? d_c, Tensor(e!)? hin, bool reverse) -> ()",
        &lstm_forward);
  m.def("lstm_backward(Tensor acts, Tensor tcs, Tensor cs, Tensor(a!) dy, Tensor dc_T, "
        "Tensor w_hh, Tensor? peep, Tensor? lengths, Tensor(b!) dz, Tensor? r, Tensor? d_h, "
        "Tensor? d_c, bool reverse) -> Tensor", &lstm_backward);
}
