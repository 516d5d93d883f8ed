// RMSNorm over the last dimension on CPU, forward and backward, one pass over each row per direction.
// The model has ~60 norms per step, and the tensor-op form (pow, mean, add, rsqrt, two muls, then as
// many backward ops) streams each (B, T, H) activation through memory about a dozen times.
//   y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)
// x: (R, H) contiguous; w: (H).  The forward also returns r (R) for the backward.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
void forward_kernel(const T* x, const T* w, T* y, T* rstd, int64_t R, int64_t H, double eps) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * H;
      T* yr = y + r * H;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
      const T inv = T(1) / std::sqrt(ss / T(H) + T(eps));
      rstd[r] = inv;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) yr[i] = xr[i] * inv * w[i];
    }
  });
}

// gx = r * (gy w) - x r^3 mean(gy w x);  gw = sum over rows of gy x r.
template <typename T>
void backward_kernel(const T* x, const T* w, const T* rstd, const T* gy, T* gx, T* gw, int64_t R, int64_t H) {
  const int threads = at::get_num_threads();
  std::vector<T> partial(static_cast<size_t>(threads) * H, T(0));
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    T* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * H;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * H;
      const T* gr = gy + r * H;
      T* gxr = gx + r * H;
      const T inv = rstd[r];
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < H; ++i) dot += gr[i] * w[i] * xr[i];
      const T coef = dot * inv * inv * inv / T(H);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        gxr[i] = inv * gr[i] * w[i] - xr[i] * coef;
        acc[i] += gr[i] * xr[i] * inv;
      }
    }
  });
  for (int64_t i = 0; i < H; ++i) {
    T s = 0;
    for (int k = 0; k < threads; ++k) s += partial[static_cast<size_t>(k) * H + i];
    gw[i] = s;
  }
}

void check(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && !x.is_cuda(), "rms_norm: x must be a contiguous CPU (R, H) tensor");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm: w must be (H) of x's dtype");
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor w, double eps) {
  check(x, w);
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                             rstd.data_ptr<scalar_t>(), x.size(0), x.size(1), eps);
  });
  return {y, rstd};
}

std::vector<torch::Tensor> backward(torch::Tensor x, torch::Tensor w, torch::Tensor rstd, torch::Tensor gy) {
  check(x, w);
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == x.scalar_type(), "rms_norm: bad gy");
  auto gx = torch::empty_like(x);
  auto gw = torch::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward", [&] {
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                              gy.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
                              x.size(0), x.size(1));
  });
  return {gx, gw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "RMSNorm forward (CPU)");
  m.def("backward", &backward, "RMSNorm backward (CPU)");
}
