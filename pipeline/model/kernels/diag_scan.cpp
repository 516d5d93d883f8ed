// The diagonal linear recurrence h_t = a_t * h_{t-1} + b_t on CPU, forward and backward, in one pass
// over time per batch row with the features innermost (contiguous, vectorised): the blocked tensor-op
// scan it replaces makes about ten passes over (B, T, F) tensors, with layout copies, per direction.
// b: (B, T, F) contiguous; a: the same shape, or one element (a constant decay, never expanded);
// h0: (B, F) or empty.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

// Features are split into blocks so a batch of one row still uses every thread.
constexpr int64_t kBlock = 256;

template <typename T>
void forward_kernel(const T* a, bool scalar_a, const T* b, const T* h0, T* h, int64_t B, int64_t L, int64_t F) {
  const int64_t nblk = (F + kBlock - 1) / kBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> state(kBlock);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / nblk, f0 = (i % nblk) * kBlock, n = std::min(kBlock, F - f0);
      T* s = state.data();
      for (int64_t f = 0; f < n; ++f) s[f] = h0 ? h0[row * F + f0 + f] : T(0);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t off = (row * L + t) * F + f0;
        const T* bt = b + off;
        T* ht = h + off;
        if (scalar_a) {
          const T at = a[0];
#pragma omp simd
          for (int64_t f = 0; f < n; ++f) ht[f] = s[f] = at * s[f] + bt[f];
        } else {
          const T* at = a + off;
#pragma omp simd
          for (int64_t f = 0; f < n; ++f) ht[f] = s[f] = at[f] * s[f] + bt[f];
        }
      }
    }
  });
}

// g_t = dL/dh_t in total = gh_t + a_{t+1} g_{t+1} (the returned gradient of b); ga_t = g_t h_{t-1};
// gh0 = a_0 g_0.
template <typename T>
void backward_kernel(const T* a, bool scalar_a, const T* h, const T* h0, const T* gh, T* g, T* ga, T* gh0,
                     int64_t B, int64_t L, int64_t F) {
  const int64_t nblk = (F + kBlock - 1) / kBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> carry(kBlock);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / nblk, f0 = (i % nblk) * kBlock, n = std::min(kBlock, F - f0);
      T* c = carry.data();
      std::fill(c, c + n, T(0));
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t off = (row * L + t) * F + f0;
        const T* ght = gh + off;
        T* gt = g + off;
        if (ga) {
          T* gat = ga + off;
          const T* hp = t > 0 ? h + off - F : (h0 ? h0 + row * F + f0 : nullptr);
#pragma omp simd
          for (int64_t f = 0; f < n; ++f) {
            const T gv = ght[f] + c[f];
            gt[f] = gv;
            gat[f] = hp ? gv * hp[f] : T(0);
          }
        } else {
#pragma omp simd
          for (int64_t f = 0; f < n; ++f) gt[f] = ght[f] + c[f];
        }
        if (scalar_a) {
          const T at = a[0];
#pragma omp simd
          for (int64_t f = 0; f < n; ++f) c[f] = at * gt[f];
        } else {
          const T* at = a + off;
#pragma omp simd
          for (int64_t f = 0; f < n; ++f) c[f] = at[f] * gt[f];
        }
      }
      if (gh0) for (int64_t f = 0; f < n; ++f) gh0[row * F + f0 + f] = c[f];
    }
  });
}

void check(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& h0) {
  TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && !b.is_cuda(), "diag_scan: b must be a contiguous CPU (B, T, F) tensor");
  TORCH_CHECK(a.is_contiguous() && a.scalar_type() == b.scalar_type() && (a.numel() == 1 || a.sizes() == b.sizes()),
              "diag_scan: a must have b's shape or one element, contiguous, of b's dtype");
  TORCH_CHECK(h0.numel() == 0 || (h0.is_contiguous() && h0.scalar_type() == b.scalar_type() &&
              h0.numel() == b.size(0) * b.size(2)), "diag_scan: h0 must be (B, F)");
}

}  // namespace

torch::Tensor forward(torch::Tensor a, torch::Tensor b, torch::Tensor h0) {
  check(a, b, h0);
  auto h = torch::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "diag_scan_forward", [&] {
    forward_kernel<scalar_t>(a.data_ptr<scalar_t>(), a.numel() == 1 && b.numel() != 1, b.data_ptr<scalar_t>(),
                             h0.numel() ? h0.data_ptr<scalar_t>() : nullptr, h.data_ptr<scalar_t>(),
                             b.size(0), b.size(1), b.size(2));
  });
  return h;
}

// Returns (g, ga, gh0); ga is empty unless need_ga, gh0 empty when h0 is.
std::vector<torch::Tensor> backward(torch::Tensor a, torch::Tensor h, torch::Tensor h0, torch::Tensor gh, bool need_ga) {
  check(a, h, h0);
  TORCH_CHECK(gh.sizes() == h.sizes() && gh.is_contiguous() && gh.scalar_type() == h.scalar_type(), "diag_scan: bad gh");
  auto g = torch::empty_like(h);
  auto ga = need_ga ? torch::empty_like(h) : torch::empty({0}, h.options());
  auto gh0 = h0.numel() ? torch::empty_like(h0) : torch::empty({0}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "diag_scan_backward", [&] {
    backward_kernel<scalar_t>(a.data_ptr<scalar_t>(), a.numel() == 1 && h.numel() != 1, h.data_ptr<scalar_t>(),
                              h0.numel() ? h0.data_ptr<scalar_t>() : nullptr, gh.data_ptr<scalar_t>(),
                              g.data_ptr<scalar_t>(), need_ga ? ga.data_ptr<scalar_t>() : nullptr,
                              h0.numel() ? gh0.data_ptr<scalar_t>() : nullptr, h.size(0), h.size(1), h.size(2));
  });
  return {g, ga, gh0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "diagonal linear recurrence forward (CPU)");
  m.def("backward", &backward, "diagonal linear recurrence backward (CPU)");
}
