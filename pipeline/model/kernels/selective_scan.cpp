// Mamba-1 selective scan on CPU, forward and backward, fused: one pass over time per (batch row,
// channel) with the channel's N-wide state in registers, instead of the blocked tensor-op scan whose
// (B, T, E, N) intermediates stream through memory several times per pass.
//   h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t;   y_t = C_t . h_t
// u, delta: (B, T, E); A: (E, N); Bm, Cm: (B, T, N); h0: (B, E, N) or an empty tensor; all contiguous,
// one floating dtype.  The backward recomputes the channel's states (T x N, cache-resident) instead of
// keeping the (B, T, E, N) states alive between forward and backward.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp for the inner loops over the state dimension, written so the compiler vectorises it (a call
// to std::exp keeps the loop scalar unless the whole file is built with -ffast-math, which would
// also drop NaN semantics that the NaN-skipping guard relies on).  Cephes' expf: |rel err| < 2e-7.
inline float fast_exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  const float xc = x > hi ? hi : (x < lo ? lo : x);
  // Round x / ln2 to the nearest integer by adding 1.5 * 2^23 (std::floor does not vectorise here).
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float fx = shifted - 12582912.0f;
  const int32_t k = __builtin_bit_cast(int32_t, shifted) - 0x4B400000;
  float r = xc - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float out = p * __builtin_bit_cast(float, (k + 127) << 23);
  out = x < lo ? 0.0f : out;           // underflow to 0 like std::exp
  out = x > hi ? INFINITY : out;
  return x != x ? x : out;             // NaN in, NaN out
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
struct Views {
  const T *u, *delta, *At, *Bm, *Cm, *h0;  // At: A transposed to (N, E), so channels are contiguous
  int64_t B, L, E, N;
};

// Channels are the vector lanes: one 64-byte register of them per block, the N states of each lane
// in cache, and B_t[n], C_t[n] broadcast.  (Vectorising over the state dimension instead needs a
// horizontal sum for every y_t and a stride-E load for every u_t, and measured ~4x slower.)
template <typename T>
constexpr int64_t lanes() { return 64 / sizeof(T); }

template <typename T>
void load_lanes(const T* src, int64_t n, T* dst) {
  constexpr int64_t W = lanes<T>();
  for (int64_t w = 0; w < W; ++w) dst[w] = w < n ? src[w] : T(0);
}

template <typename T>
void forward_kernel(const Views<T>& v, T* y, T* h_last) {
  constexpr int64_t W = lanes<T>();
  const int64_t L = v.L, E = v.E, N = v.N, blocks = (E + W - 1) / W;
  at::parallel_for(0, v.B * blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> h(N * W), A(N * W);
    T d[W], du[W], acc[W];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, e0 = (i % blocks) * W, nw = std::min(W, E - e0);
      for (int64_t n = 0; n < N; ++n) {
        load_lanes(v.At + n * E + e0, nw, A.data() + n * W);
        for (int64_t w = 0; w < W; ++w) h[n * W + w] = (v.h0 && w < nw) ? v.h0[(b * E + e0 + w) * N + n] : T(0);
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * E + e0;
        load_lanes(v.delta + row, nw, d);
        load_lanes(v.u + row, nw, du);
        const T* Bt = v.Bm + (b * L + t) * N;
        const T* Ct = v.Cm + (b * L + t) * N;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) { du[w] *= d[w]; acc[w] = 0; }
        for (int64_t n = 0; n < N; ++n) {
          T* hn = h.data() + n * W;
          const T* An = A.data() + n * W;
          const T bn = Bt[n], cn = Ct[n];
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            hn[w] = fast_exp(d[w] * An[w]) * hn[w] + du[w] * bn;
            acc[w] += cn * hn[w];
          }
        }
        for (int64_t w = 0; w < nw; ++w) y[row + w] = acc[w];
      }
      for (int64_t w = 0; w < nw; ++w)
        for (int64_t n = 0; n < N; ++n) h_last[(b * E + e0 + w) * N + n] = h[n * W + w];
    }
  });
}

template <typename T>
void backward_kernel(const Views<T>& v, const T* gy, const T* gh_last, T* g_u, T* g_delta, T* g_A,
                     T* g_B, T* g_C, T* g_h0) {
  constexpr int64_t W = lanes<T>();
  const int64_t B = v.B, L = v.L, E = v.E, N = v.N, blocks = (E + W - 1) / W;
  // dB, dC and dA sum over channels (and dA over batch rows too), which different threads own:
  // each thread accumulates into its own slice, summed at the end.
  const int threads = at::get_num_threads();
  const size_t bc = static_cast<size_t>(B * L * N);
  std::vector<T> part_BC(static_cast<size_t>(threads) * 2 * bc, T(0));
  std::vector<T> part_A(static_cast<size_t>(threads) * N * E, T(0));  // (N, E) per thread
  at::parallel_for(0, B * blocks, 1, [&](int64_t i0, int64_t i1) {
    const int tid = at::get_thread_num();
    T* pB = part_BC.data() + static_cast<size_t>(tid) * 2 * bc;
    T* pC = pB + bc;
    T* pA = part_A.data() + static_cast<size_t>(tid) * N * E;
    // States of every step of the block, recomputed: (L + 1) x N x W, the first row the initial state;
    // and the decays, kept from the recomputation (an exp costs more than a store and a load).
    std::vector<T> H((L + 1) * N * W), DA(L * N * W), A(N * W), G(N * W), gA(N * W);
    T d[W], uu[W], du[W], gyt[W], gdu[W], gdl[W];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, e0 = (i % blocks) * W, nw = std::min(W, E - e0);
      for (int64_t n = 0; n < N; ++n) {
        load_lanes(v.At + n * E + e0, nw, A.data() + n * W);
        for (int64_t w = 0; w < W; ++w) {
          const int64_t idx = (b * E + e0 + w) * N + n;
          H[n * W + w] = (v.h0 && w < nw) ? v.h0[idx] : T(0);
          G[n * W + w] = (gh_last && w < nw) ? gh_last[idx] : T(0);
          gA[n * W + w] = 0;
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * E + e0;
        load_lanes(v.delta + row, nw, d);
        load_lanes(v.u + row, nw, du);
        const T* Bt = v.Bm + (b * L + t) * N;
        const T* prev = H.data() + t * N * W;
        T* cur = H.data() + (t + 1) * N * W;
        T* dAt = DA.data() + t * N * W;
        for (int64_t n = 0; n < N; ++n) {
          const T bn = Bt[n];
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            dAt[n * W + w] = fast_exp(d[w] * A[n * W + w]);
            cur[n * W + w] = dAt[n * W + w] * prev[n * W + w] + d[w] * du[w] * bn;
          }
        }
      }
      // Reverse: G = dL/dh_t arriving from step t+1 (through the recurrence).
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t bt = b * L + t, row = bt * E + e0;
        load_lanes(v.delta + row, nw, d);
        load_lanes(v.u + row, nw, uu);
        load_lanes(gy + row, nw, gyt);
        const T* Bt = v.Bm + bt * N;
        const T* Ct = v.Cm + bt * N;
        const T* Ht = H.data() + (t + 1) * N * W;
        const T* Hp = H.data() + t * N * W;
        const T* dAt = DA.data() + t * N * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) { du[w] = d[w] * uu[w]; gdu[w] = 0; gdl[w] = 0; }
        for (int64_t n = 0; n < N; ++n) {
          const T bn = Bt[n], cn = Ct[n];
          T* Gn = G.data() + n * W;
          const T* An = A.data() + n * W;
          T* gAn = gA.data() + n * W;
          T sB = 0, sC = 0;
#pragma omp simd reduction(+ : sB, sC)
          for (int64_t w = 0; w < W; ++w) {
            const T g = Gn[w] + gyt[w] * cn;             // dL/dh_t
            sC += gyt[w] * Ht[n * W + w];
            sB += du[w] * g;
            gdu[w] += g * bn;
            const T dA = dAt[n * W + w];
            const T x = g * dA * Hp[n * W + w];            // dL/d(delta_t A[n])
            gdl[w] += x * An[w];
            gAn[w] += x * d[w];
            Gn[w] = g * dA;
          }
          pB[bt * N + n] += sB;
          pC[bt * N + n] += sC;
        }
        for (int64_t w = 0; w < nw; ++w) {
          g_u[row + w] = gdu[w] * d[w];
          g_delta[row + w] = gdu[w] * uu[w] + gdl[w];
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t w = 0; w < nw; ++w) {
          pA[n * E + e0 + w] += gA[n * W + w];
          if (g_h0) g_h0[(b * E + e0 + w) * N + n] = G[n * W + w];
        }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(2 * bc), 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T s = 0;
      for (int k = 0; k < threads; ++k) s += part_BC[static_cast<size_t>(k) * 2 * bc + j];
      (j < static_cast<int64_t>(bc) ? g_B[j] : g_C[j - bc]) = s;
    }
  });
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n) {
      T s = 0;
      for (int k = 0; k < threads; ++k) s += part_A[static_cast<size_t>(k) * N * E + n * E + e];
      g_A[e * N + n] = s;
    }
}

void check(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bm,
           const torch::Tensor& Cm, const torch::Tensor& h0) {
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "selective_scan: u and delta must be (B, T, E)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(2), "selective_scan: A must be (E, N)");
  TORCH_CHECK(Bm.dim() == 3 && Bm.size(0) == u.size(0) && Bm.size(1) == u.size(1) && Bm.size(2) == A.size(1) &&
              Cm.sizes() == Bm.sizes(), "selective_scan: B and C must be (B, T, N)");
  TORCH_CHECK(h0.numel() == 0 || (h0.dim() == 3 && h0.size(0) == u.size(0) && h0.size(1) == u.size(2) &&
              h0.size(2) == A.size(1)), "selective_scan: h0 must be (B, E, N)");
  for (const auto* t : {&u, &delta, &A, &Bm, &Cm, &h0}) {
    TORCH_CHECK(t->is_contiguous() && !t->is_cuda() && t->scalar_type() == u.scalar_type(),
                "selective_scan: inputs must be contiguous CPU tensors of one dtype");
  }
}

template <typename T>
Views<T> views(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& At,
               const torch::Tensor& Bm, const torch::Tensor& Cm, const torch::Tensor& h0) {
  return {u.data_ptr<T>(), delta.data_ptr<T>(), At.data_ptr<T>(), Bm.data_ptr<T>(), Cm.data_ptr<T>(),
          h0.numel() ? h0.data_ptr<T>() : nullptr, u.size(0), u.size(1), u.size(2), At.size(0)};
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                   torch::Tensor Cm, torch::Tensor h0) {
  check(u, delta, A, Bm, Cm, h0);
  const auto At = A.t().contiguous();
  auto y = torch::empty_like(u);
  auto h_last = torch::empty({u.size(0), u.size(2), A.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    forward_kernel<scalar_t>(views<scalar_t>(u, delta, At, Bm, Cm, h0), y.data_ptr<scalar_t>(),
                             h_last.data_ptr<scalar_t>());
  });
  return {y, h_last};
}

// gh_last may be empty (no gradient reached the final state).  Returns g_u, g_delta, g_A, g_B, g_C,
// g_h0 (g_h0 empty when h0 is).
std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                    torch::Tensor Cm, torch::Tensor h0, torch::Tensor gy, torch::Tensor gh_last) {
  check(u, delta, A, Bm, Cm, h0);
  TORCH_CHECK(gy.sizes() == u.sizes() && gy.is_contiguous() && gy.scalar_type() == u.scalar_type(),
              "selective_scan: bad gy");
  TORCH_CHECK(gh_last.numel() == 0 || (gh_last.is_contiguous() && gh_last.scalar_type() == u.scalar_type() &&
              gh_last.numel() == u.size(0) * u.size(2) * A.size(1)), "selective_scan: bad gh_last");
  const auto At = A.t().contiguous();
  auto g_u = torch::empty_like(u), g_delta = torch::empty_like(u), g_A = torch::empty_like(A);
  auto g_B = torch::empty_like(Bm), g_C = torch::empty_like(Cm);
  auto g_h0 = h0.numel() ? torch::empty_like(h0) : torch::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    backward_kernel<scalar_t>(views<scalar_t>(u, delta, At, Bm, Cm, h0), gy.data_ptr<scalar_t>(),
                              gh_last.numel() ? gh_last.data_ptr<scalar_t>() : nullptr,
                              g_u.data_ptr<scalar_t>(), g_delta.data_ptr<scalar_t>(), g_A.data_ptr<scalar_t>(),
                              g_B.data_ptr<scalar_t>(), g_C.data_ptr<scalar_t>(),
                              h0.numel() ? g_h0.data_ptr<scalar_t>() : nullptr);
  });
  return {g_u, g_delta, g_A, g_B, g_C, g_h0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused selective scan forward (CPU)");
  m.def("backward", &backward, "fused selective scan backward (CPU)");
}
