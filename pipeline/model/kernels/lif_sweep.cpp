// Hard-spike decision of a LIF population over a whole sequence, fused: one pass per (batch row)
// over time with the membranes in registers/cache, instead of three tensor ops per time step.
//   U_n = beta * V_{n-1} + I_n;  S_n = [U_n >= thr];  V_n = reset(U_n, S_n)
// I: (B, N, S) contiguous; v0: (B, S); mode 0 subtract, 1 zero, 2 none.  No gradient flows here:
// the caller recomputes the membrane differentiably with a linear scan given these spikes.
#include <torch/extension.h>
#include <vector>

torch::Tensor lif_sweep(torch::Tensor I, torch::Tensor v0, double beta_d, double thr_d, int64_t mode) {
  TORCH_CHECK(I.dim() == 3 && I.is_contiguous() && !I.is_cuda(), "lif_sweep: I must be a contiguous CPU (B, N, S) tensor");
  TORCH_CHECK(v0.dim() == 2 && v0.is_contiguous() && v0.scalar_type() == I.scalar_type(), "lif_sweep: bad v0");
  auto out = torch::empty_like(I);
  const int64_t B = I.size(0), N = I.size(1), S = I.size(2);
  AT_DISPATCH_FLOATING_TYPES(I.scalar_type(), "lif_sweep", [&] {
    // The same rounding as the tensor-op reference: parameters in the tensor's own precision.
    const scalar_t beta = static_cast<scalar_t>(beta_d), thr = static_cast<scalar_t>(thr_d);
    const scalar_t* in = I.data_ptr<scalar_t>();
    const scalar_t* init = v0.data_ptr<scalar_t>();
    scalar_t* spikes = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> v(S);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t s = 0; s < S; ++s) v[s] = init[b * S + s];
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* current = in + (b * N + n) * S;
          scalar_t* fired = spikes + (b * N + n) * S;
          for (int64_t s = 0; s < S; ++s) {
            const scalar_t u = beta * v[s] + current[s];
            const scalar_t spike = u >= thr ? scalar_t(1) : scalar_t(0);
            fired[s] = spike;
            v[s] = mode == 0 ? u - thr * spike : (mode == 1 ? u * (scalar_t(1) - spike) : u);
          }
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lif_sweep", &lif_sweep, "fused LIF hard-spike sweep (CPU)"); }
