/*
Fused CUDA kernels for the PESC MoE layer (moe.py), forward and backward.

  1. route            fp32 router logits (N, E) -> top-k weights (N, k), top-k indices (N, k) int64,
                      full softmax probabilities (N, E), assignments per expert (E,) int64, in one pass.
                      PyTorch reference: moe.route(). Backward: d logits from d weights and d probs.
  2. gate_gelu_mask   the step between the two matmuls of the dense-masked path: pre-activations
                      P (N, E*r) -> s * g_e * GELU(P) in each selected expert's r-block, zeros elsewhere.
                      PyTorch reference: moe.gate_gelu_mask(). Backward: dP and d weights.

kernels.py compiles this file on first CUDA use with torch.utils.cpp_extension.load (build/kernels/),
probes it once on the GPU, and wraps each forward/backward pair in a torch.autograd.Function. Layout per op, as in llm.c dev/cuda:
the math (what the PyTorch reference computes), the kernel, the launcher with its argument checks.

Every output element is written by exactly one thread, and each reduction runs in a fixed order,
so two runs give bitwise equal results. The only atomics are integer adds into the expert counts.
GELU is the exact erf form (F.gelu's default); build without --use_fast_math so erf and exp stay exact.
*/

#include <torch/extension.h>
#include <ATen/OpMathType.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h: the latter pulls in the cuSPARSE, cuBLAS and
// cuSOLVER headers, which a minimal CUDA toolkit lacks. at::cuda::getCurrentCUDAStream is c10's function.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

// -----------------------------------------------------------------------------
// small helpers

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got one on ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")
#define CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must be ", (t), ", got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, y) \
    TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
                (x).device(), " and ", (y).device())
#define CHECK_SHAPE(x, ...) \
    TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ", \
                at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

constexpr int WARP = 32;
constexpr int64_t MAX_EXPERTS = 1024;  // kernels.py's MAX_EXPERTS: see the shared-memory notes below

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float erf_(float x) { return erff(x); }
__device__ __forceinline__ double erf_(double x) { return erf(x); }

// Phi(x) = 0.5 * (1 + erf(x / sqrt 2)), so GELU(x) = x * Phi(x) and GELU'(x) = Phi(x) + x * phi(x)
template <typename T>
__device__ __forceinline__ T normal_cdf(T x) {
    return T(0.5) * (T(1) + erf_(x * T(M_SQRT1_2)));
}
template <typename T>
__device__ __forceinline__ T normal_pdf(T x) {
    return exp_(T(-0.5) * x * x) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);  // exp(-x^2/2) / sqrt(2 pi)
}

// sum over the 32 lanes of a warp; the butterfly order is fixed, so the result is deterministic
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// =============================================================================
// 1. fused router
//
// Reference (moe.route):
//   probs   = softmax(logits)                          (N, E)   P in Eq. 10
//   top, idx = topk(logits, k)                         (N, k)   ties -> lower expert index
//   weights = softmax(top)                             (N, k)   Eq. 9
//   counts[e] = #{(n, j) : idx[n, j] == e}             (E,)
// With m = max_e logits[n, e] (which is also the first kept logit):
//   probs[n, e]   = exp(l_e - m) / sum_e' exp(l_e' - m)
//   weights[n, j] = exp(l_idx_j - m) / sum_j' exp(l_idx_j' - m)
//
// One thread per token: E is small (the paper uses 4 to 16), so a row fits one thread's loops and
// the repeated passes over it hit L1. The top-k is found by k selection passes in the total order
// "larger logit first, then lower index", each pass taking the best expert that comes after the
// previous pick in that order; no per-row scratch, no limit on E. Counts go to a shared per-block
// histogram (integer atomics), then one global atomic add per expert per block.

__global__ void route_forward_kernel(const float* __restrict__ logits, int N, int E, int k,
                                     float* __restrict__ weights, int64_t* __restrict__ indices,
                                     float* __restrict__ probs, int64_t* __restrict__ counts) {
    extern __shared__ int block_counts[];  // (E,)
    for (int e = threadIdx.x; e < E; e += blockDim.x) block_counts[e] = 0;
    __syncthreads();

    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // 64-bit: no overflow near INT32_MAX rows
    if (n < N) {
        const float* l = logits + (int64_t)n * E;
        float* p = probs + (int64_t)n * E;
        float* w = weights + (int64_t)n * k;
        int64_t* idx = indices + (int64_t)n * k;

        // full softmax, max-subtracted
        float m = -INFINITY;
        for (int e = 0; e < E; e++) m = fmaxf(m, l[e]);
        float z = 0.0f;
        for (int e = 0; e < E; e++) z += expf(l[e] - m);
        for (int e = 0; e < E; e++) p[e] = expf(l[e] - m) / z;

        // top-k by k selection passes; a NaN logit is ranked as -inf so every index stays valid
        float prev_v = INFINITY;
        int prev_e = -1;
        float kept = 0.0f;  // sum over the kept experts of exp(l - m)
        for (int j = 0; j < k; j++) {
            int best = -1;
            float best_v = 0.0f;
            for (int e = 0; e < E; e++) {
                float v = isnan(l[e]) ? -INFINITY : l[e];
                bool after_prev = v < prev_v || (v == prev_v && e > prev_e);
                if (after_prev && (best < 0 || v > best_v)) {  // strict '>': a tie keeps the lower index
                    best = e;
                    best_v = v;
                }
            }
            idx[j] = best;
            kept += expf(l[best] - m);
            prev_v = best_v;
            prev_e = best;
            atomicAdd(&block_counts[best], 1);
        }
        for (int j = 0; j < k; j++) w[j] = expf(l[idx[j]] - m) / kept;
    }

    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        if (block_counts[e] > 0) {
            atomicAdd(reinterpret_cast<unsigned long long*>(counts + e), (unsigned long long)block_counts[e]);
        }
    }
}

// Backward. Both outputs are softmaxes of (parts of) the same row, so
//   d l_e        = p_e * (gp_e - sum_e' gp_e' p_e')                     (through probs)
//   d l_{idx_j} += w_j * (gw_j - sum_j' gw_j' w_j')                     (through weights)
// The top-k choice itself is piecewise constant and has no gradient. One thread per token.

__global__ void route_backward_kernel(const float* __restrict__ grad_weights, const float* __restrict__ grad_probs,
                                      const float* __restrict__ weights, const int64_t* __restrict__ indices,
                                      const float* __restrict__ probs, int N, int E, int k,
                                      float* __restrict__ grad_logits) {
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* gp = grad_probs + (int64_t)n * E;
    const float* p = probs + (int64_t)n * E;
    const float* gw = grad_weights + (int64_t)n * k;
    const float* w = weights + (int64_t)n * k;
    const int64_t* idx = indices + (int64_t)n * k;
    float* gl = grad_logits + (int64_t)n * E;

    float dot_p = 0.0f;
    for (int e = 0; e < E; e++) dot_p += gp[e] * p[e];
    float dot_w = 0.0f;
    for (int j = 0; j < k; j++) dot_w += gw[j] * w[j];
    for (int e = 0; e < E; e++) gl[e] = p[e] * (gp[e] - dot_p);
    for (int j = 0; j < k; j++) gl[idx[j]] += w[j] * (gw[j] - dot_w);  // the k indices are distinct
}

constexpr int ROUTE_THREADS = 128;  // tokens per block

std::vector<torch::Tensor> route_forward(torch::Tensor logits, int64_t top_k) {
    CHECK_CUDA(logits);
    CHECK_DTYPE(logits, torch::kFloat32);
    TORCH_CHECK(logits.dim() == 2, "logits must be 2-D (N, E), got shape ", logits.sizes());
    CHECK_CONTIGUOUS(logits);
    const int64_t N = logits.size(0), E = logits.size(1);
    TORCH_CHECK(E >= 1, "logits must have at least one expert column, got shape ", logits.sizes());
    TORCH_CHECK(top_k >= 1 && top_k <= E, "top_k must be in [1, E=", E, "], got ", top_k);
    // the per-block histogram takes E ints of shared memory: E <= MAX_EXPERTS keeps it far below 48 KB
    TORCH_CHECK(N <= INT32_MAX && E <= MAX_EXPERTS, "route: at most ", INT32_MAX, " tokens and ", MAX_EXPERTS,
                " experts, got shape ", logits.sizes());

    const c10::cuda::CUDAGuard guard(logits.device());
    auto f32 = logits.options();
    auto weights = torch::empty({N, top_k}, f32);
    auto indices = torch::empty({N, top_k}, f32.dtype(torch::kInt64));
    auto probs = torch::empty({N, E}, f32);
    auto counts = torch::zeros({E}, f32.dtype(torch::kInt64));
    if (N == 0) return {weights, indices, probs, counts};

    const int blocks = (int)((N + ROUTE_THREADS - 1) / ROUTE_THREADS);
    const size_t smem = E * sizeof(int);
    route_forward_kernel<<<blocks, ROUTE_THREADS, smem, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<float>(), (int)N, (int)E, (int)top_k, weights.data_ptr<float>(),
        indices.data_ptr<int64_t>(), probs.data_ptr<float>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {weights, indices, probs, counts};
}

torch::Tensor route_backward(torch::Tensor grad_weights, torch::Tensor grad_probs, torch::Tensor weights,
                             torch::Tensor indices, torch::Tensor probs) {
    for (auto* t : {&grad_weights, &grad_probs, &weights, &indices, &probs}) {
        TORCH_CHECK(t->is_cuda(), "route_backward: every argument must be a CUDA tensor, got one on ", t->device());
        TORCH_CHECK(t->is_contiguous(), "route_backward: every argument must be contiguous");
        TORCH_CHECK(t->device() == probs.device(), "route_backward: arguments on different devices");
        TORCH_CHECK(t->dim() == 2, "route_backward: arguments must be 2-D, got shape ", t->sizes());
    }
    CHECK_DTYPE(grad_weights, torch::kFloat32);
    CHECK_DTYPE(grad_probs, torch::kFloat32);
    CHECK_DTYPE(weights, torch::kFloat32);
    CHECK_DTYPE(indices, torch::kInt64);
    CHECK_DTYPE(probs, torch::kFloat32);
    const int64_t N = probs.size(0), E = probs.size(1), k = weights.size(1);
    CHECK_SHAPE(grad_probs, N, E);
    CHECK_SHAPE(weights, N, k);
    CHECK_SHAPE(grad_weights, N, k);
    CHECK_SHAPE(indices, N, k);
    TORCH_CHECK(k >= 1 && k <= E, "route_backward: k must be in [1, E=", E, "], got ", k);

    const c10::cuda::CUDAGuard guard(probs.device());
    auto grad_logits = torch::empty_like(probs);
    if (N == 0) return grad_logits;
    const int blocks = (int)((N + ROUTE_THREADS - 1) / ROUTE_THREADS);
    route_backward_kernel<<<blocks, ROUTE_THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_weights.data_ptr<float>(), grad_probs.data_ptr<float>(), weights.data_ptr<float>(),
        indices.data_ptr<int64_t>(), probs.data_ptr<float>(), (int)N, (int)E, (int)k,
        grad_logits.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return grad_logits;
}

// =============================================================================
// 2. fused gate-GELU-mask
//
// Reference (moe.gate_gelu_mask), with P viewed as (N, E, r):
//   A[n, e, :] = s * g[n, e] * GELU(P[n, e, :])    g[n, e] = weights[n, j] if idx[n, j] == e, else 0
// so A is zero in the E - k blocks that were not selected, and P is only read in the k that were.
//
// One warp per token row. The warp first writes slot_of[e] (the slot j that chose expert e, or -1)
// into its own slice of shared memory, then its lanes walk the row's E*r columns with a stride of 32:
// consecutive lanes touch consecutive elements, so loads and stores are coalesced.

constexpr int GATE_WARPS = 8;  // rows per block: 256 threads

// slot_of[e] = j if idx[j] == e, else -1; written by the warp that owns the row
__device__ __forceinline__ void fill_slots(int* slot_of, const int64_t* idx, int E, int k, int lane) {
    for (int e = lane; e < E; e += WARP) slot_of[e] = -1;
    __syncwarp();
    for (int j = lane; j < k; j += WARP) {
        int64_t e = idx[j];
        CUDA_KERNEL_ASSERT_MSG(e >= 0 && e < E, "gate_gelu_mask: expert index out of range [0, E)");
        slot_of[e] = j;
    }
    __syncwarp();
}

template <typename scalar_t>
__global__ void gate_gelu_mask_forward_kernel(const scalar_t* __restrict__ P, const int64_t* __restrict__ indices,
                                              const float* __restrict__ weights, int N, int E, int r, int k,
                                              double scale, scalar_t* __restrict__ A) {
    using acc_t = at::opmath_type<scalar_t>;  // float for bf16/half/float, double for double
    extern __shared__ int smem[];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int64_t n = (int64_t)blockIdx.x * GATE_WARPS + warp;  // 64-bit: no overflow near INT32_MAX rows
    if (n >= N) return;  // the whole warp leaves together; only __syncwarp is used below
    int* slot_of = smem + warp * E;
    fill_slots(slot_of, indices + (int64_t)n * k, E, k, lane);

    const int64_t row = (int64_t)n * E * r;
    const float* w = weights + (int64_t)n * k;
    for (int c = lane; c < E * r; c += WARP) {
        const int j = slot_of[c / r];
        acc_t out = acc_t(0);
        if (j >= 0) {
            const acc_t x = static_cast<acc_t>(P[row + c]);
            out = acc_t(scale) * acc_t(w[j]) * x * normal_cdf(x);
        }
        A[row + c] = static_cast<scalar_t>(out);
    }
}

// Backward, for a selected block (expert e in slot j, gate g = w_j) and dA = dL/dA:
//   dP[n, e, c] = dA[n, e, c] * s * g * GELU'(P[n, e, c])
//   dw[n, j]    = s * sum_c dA[n, e, c] * GELU(P[n, e, c])          (a reduction over the r-block)
// and dP = 0 in the blocks that were not selected. The warp of row n does its k blocks one after the
// other: each lane sums its strided share of the block, then warp_sum adds the 32 partial sums in a
// fixed order and lane 0 writes dw[n, j]. A last pass writes the zeros of the other blocks.

template <typename scalar_t>
__global__ void gate_gelu_mask_backward_kernel(const scalar_t* __restrict__ dA, const scalar_t* __restrict__ P,
                                               const int64_t* __restrict__ indices,
                                               const float* __restrict__ weights, int N, int E, int r, int k,
                                               double scale, scalar_t* __restrict__ dP,
                                               float* __restrict__ dweights) {
    using acc_t = at::opmath_type<scalar_t>;
    extern __shared__ int smem[];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int64_t n = (int64_t)blockIdx.x * GATE_WARPS + warp;  // 64-bit: no overflow near INT32_MAX rows
    if (n >= N) return;
    int* slot_of = smem + warp * E;
    const int64_t* idx = indices + (int64_t)n * k;
    fill_slots(slot_of, idx, E, k, lane);

    const int64_t row = (int64_t)n * E * r;
    for (int j = 0; j < k; j++) {
        const int64_t block = row + idx[j] * r;
        const acc_t sg = acc_t(scale) * acc_t(weights[(int64_t)n * k + j]);
        acc_t dot = acc_t(0);  // this lane's share of sum_c dA * GELU(P)
        for (int c = lane; c < r; c += WARP) {
            const acc_t x = static_cast<acc_t>(P[block + c]);
            const acc_t dy = static_cast<acc_t>(dA[block + c]);
            const acc_t cdf = normal_cdf(x);
            dot += dy * x * cdf;
            dP[block + c] = static_cast<scalar_t>(sg * dy * (cdf + x * normal_pdf(x)));
        }
        dot = warp_sum(dot);
        if (lane == 0) dweights[(int64_t)n * k + j] = static_cast<float>(acc_t(scale) * dot);
    }
    for (int c = lane; c < E * r; c += WARP) {
        if (slot_of[c / r] < 0) dP[row + c] = static_cast<scalar_t>(0);
    }
}

// shared checks of the gate-GELU-mask entry points; returns r
static int64_t check_gate_args(const char* fn, const torch::Tensor& p, const torch::Tensor& indices,
                               const torch::Tensor& weights, int64_t n_experts) {
    CHECK_CUDA(p);
    CHECK_CUDA(indices);
    CHECK_CUDA(weights);
    CHECK_SAME_DEVICE(p, indices);
    CHECK_SAME_DEVICE(p, weights);
    auto dt = p.scalar_type();
    TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16 || dt == torch::kFloat64,
                fn, ": p must be float32 or bfloat16 (float16 and float64 also work), got ", dt);
    CHECK_DTYPE(indices, torch::kInt64);
    CHECK_DTYPE(weights, torch::kFloat32);
    TORCH_CHECK(p.dim() == 2, fn, ": p must be 2-D (N, E*r), got shape ", p.sizes());
    TORCH_CHECK(indices.dim() == 2, fn, ": indices must be 2-D (N, k), got shape ", indices.sizes());
    CHECK_CONTIGUOUS(p);
    CHECK_CONTIGUOUS(indices);
    CHECK_CONTIGUOUS(weights);
    const int64_t N = p.size(0), k = indices.size(1);
    TORCH_CHECK(n_experts >= 1, fn, ": n_experts must be positive, got ", n_experts);
    TORCH_CHECK(p.size(1) % n_experts == 0 && p.size(1) > 0, fn, ": p's width ", p.size(1),
                " is not a positive multiple of n_experts=", n_experts);
    TORCH_CHECK(indices.size(0) == N, fn, ": indices must have N=", N, " rows like p, got shape ", indices.sizes());
    TORCH_CHECK(k >= 1 && k <= n_experts, fn, ": k must be in [1, n_experts=", n_experts, "], got ", k);
    CHECK_SHAPE(weights, N, k);
    // GATE_WARPS * E ints of shared memory per block: E <= MAX_EXPERTS keeps it at 32 KB, under the 48 KB
    // a launch gets without the opt-in (cudaFuncSetAttribute)
    TORCH_CHECK(N <= INT32_MAX && p.size(1) <= INT32_MAX && n_experts <= MAX_EXPERTS, fn, ": at most ",
                MAX_EXPERTS, " experts and ", INT32_MAX, " rows and columns, got p ", p.sizes(), " and n_experts ",
                n_experts);
    return p.size(1) / n_experts;
}

torch::Tensor gate_gelu_mask_forward(torch::Tensor p, torch::Tensor indices, torch::Tensor weights,
                                     int64_t n_experts, double scale) {
    const int64_t r = check_gate_args("gate_gelu_mask_forward", p, indices, weights, n_experts);
    const int64_t N = p.size(0), k = indices.size(1);
    const c10::cuda::CUDAGuard guard(p.device());
    auto a = torch::empty_like(p);
    if (N == 0) return a;
    const int blocks = (int)((N + GATE_WARPS - 1) / GATE_WARPS);
    const size_t smem = GATE_WARPS * n_experts * sizeof(int);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, p.scalar_type(),
                                    "gate_gelu_mask_forward", [&] {
        gate_gelu_mask_forward_kernel<scalar_t><<<blocks, GATE_WARPS * WARP, smem,
                                                  at::cuda::getCurrentCUDAStream()>>>(
            p.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), weights.data_ptr<float>(), (int)N,
            (int)n_experts, (int)r, (int)k, scale, a.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return a;
}

std::vector<torch::Tensor> gate_gelu_mask_backward(torch::Tensor grad_a, torch::Tensor p, torch::Tensor indices,
                                                   torch::Tensor weights, int64_t n_experts, double scale) {
    const int64_t r = check_gate_args("gate_gelu_mask_backward", p, indices, weights, n_experts);
    CHECK_CUDA(grad_a);
    CHECK_SAME_DEVICE(grad_a, p);
    TORCH_CHECK(grad_a.scalar_type() == p.scalar_type(), "grad_a must have p's dtype ", p.scalar_type(),
                ", got ", grad_a.scalar_type());
    TORCH_CHECK(grad_a.sizes() == p.sizes(), "grad_a must have p's shape ", p.sizes(), ", got ", grad_a.sizes());
    CHECK_CONTIGUOUS(grad_a);
    const int64_t N = p.size(0), k = indices.size(1);
    const c10::cuda::CUDAGuard guard(p.device());
    auto grad_p = torch::empty_like(p);
    auto grad_weights = torch::empty_like(weights);
    if (N == 0) return {grad_p, grad_weights};
    const int blocks = (int)((N + GATE_WARPS - 1) / GATE_WARPS);
    const size_t smem = GATE_WARPS * n_experts * sizeof(int);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, p.scalar_type(),
                                    "gate_gelu_mask_backward", [&] {
        gate_gelu_mask_backward_kernel<scalar_t><<<blocks, GATE_WARPS * WARP, smem,
                                                   at::cuda::getCurrentCUDAStream()>>>(
            grad_a.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
            weights.data_ptr<float>(), (int)N, (int)n_experts, (int)r, (int)k, scale,
            grad_p.data_ptr<scalar_t>(), grad_weights.data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {grad_p, grad_weights};
}

// -----------------------------------------------------------------------------

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("route_forward", &route_forward,
          "fused router: logits (N, E) fp32, k -> [weights (N, k), indices (N, k), probs (N, E), counts (E,)]",
          py::arg("logits"), py::arg("top_k"));
    m.def("route_backward", &route_backward,
          "fused router backward -> grad_logits (N, E)", py::arg("grad_weights"), py::arg("grad_probs"),
          py::arg("weights"), py::arg("indices"), py::arg("probs"));
    m.def("gate_gelu_mask_forward", &gate_gelu_mask_forward,
          "s * g_e * GELU(p) in the selected experts' r-blocks of p (N, E*r), zeros elsewhere",
          py::arg("p"), py::arg("indices"), py::arg("weights"), py::arg("n_experts"), py::arg("scale"));
    m.def("gate_gelu_mask_backward", &gate_gelu_mask_backward,
          "gate-GELU-mask backward -> [grad_p (N, E*r), grad_weights (N, k)]", py::arg("grad_a"), py::arg("p"),
          py::arg("indices"), py::arg("weights"), py::arg("n_experts"), py::arg("scale"));
}
