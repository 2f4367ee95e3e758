// mnemonics_fast::cosine_linear on CUDA: out = sigma * normalize(x) @ normalize(weight).T, forward and backward.
//
// Notation: x [B, D], weight w [C, D], sigma a 0-dim tensor, g = dL/dout [B, C].
//   inv_x[b] = 1 / max(|x_b|, eps), xn = x * inv_x (likewise inv_w, wn); cos = xn @ wn.T; out = sigma * cos.
// Backward (derivation in docs/kernels.md):
//   h = g @ wn [B, D],  k = g.T @ xn [C, D]
//   R[b] = sum_c g[b,c] * out[b,c]  (= <sigma h_b, xn_b>),  S[c] = sum_b g[b,c] * out[b,c]
//   dx[b] = inv_x[b] * (sigma h_b - xn_b R[b])   (R[b] := 0 where |x_b| < eps: F.normalize's clamp has no gradient)
//   dw[c] = inv_w[c] * (sigma k_c - wn_c S[c])
//   dsigma = sum_b <h_b, xn_b>  (= sum g * cos, without dividing by sigma)
//
// Two implementations, same math, chosen per call by problem size (or forced from Python):
//   fused: forward is ONE kernel (tiled SIMT GEMM that also accumulates the row norms of its tiles and scales in the
//          epilogue); backward is TWO kernels (row/column statistics, then both GEMMs + epilogues + dsigma in one
//          launch). fp32 accumulation for every input dtype. Wins where launch count dominates (small problems).
//   blas:  forward = normalise kernel (writes sigma*xn and wn) + cuBLAS GEMM; backward = normalise + 2 cuBLAS GEMMs
//          + one row-wise epilogue kernel. Tensor cores for bf16/fp16 (and TF32 for fp32 only if the user enabled
//          torch.backends.cuda.matmul.allow_tf32, exactly like eager PyTorch). Wins for large problems.

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"
#include "mnemonics_fast.h"

namespace mnemonics_fast {
namespace {

// Same epsilon as F.normalize (mnemonics_fast/ops/reference.py: NORM_EPS).
constexpr float kNormEps = 1e-12f;

// ---- path selection ------------------------------------------------------------------------------------------------
std::atomic<int> g_cosine_path{0};
// The fused kernels loop over K = C (dx) and K = B (dw) inside one block and use 32x32 tiles, so they are only
// chosen while both are short and the GEMM is small; above this cuBLAS's tiling and tensor cores win. Rough first
// guess, to be re-tuned from bench/bench_cosine_linear.py (it times both paths at every size).
constexpr int64_t kFusedMaxRows = 1024;
constexpr int64_t kFusedMaxMacs = int64_t{1} << 24;  // B * C * D

bool use_fused_path(int64_t B, int64_t C, int64_t D) {
  const int path = g_cosine_path.load(std::memory_order_relaxed);
  if (path == 1) return true;
  if (path == 2) return false;
  return B <= kFusedMaxRows && C <= kFusedMaxRows && B * C * D <= kFusedMaxMacs;
}

// ---- parameter structs ---------------------------------------------------------------------------------------------
template <typename T>
struct CosineLinearParams {
  const T* x;       // [B, D]
  const T* weight;  // [C, D]
  const void* sigma;
  int sigma_kind;
  T* out;  // [B, C]
  // blas path only: normalised copies (x scaled by sigma * inv_x or inv_x alone, weight by inv_w).
  T* x_scaled;  // [B, D]
  T* w_scaled;  // [C, D]
  bool scale_x_by_sigma;
  unsigned int* counter;  // zeroed by the normalise kernel when non-null (backward)
  int64_t B, C, D;
};

template <typename T>
struct CosineLinearBackwardParams {
  const T* grad;  // [B, C]
  const T* out;   // [B, C]
  const T* x;     // [B, D]
  const T* weight;
  const void* sigma;
  int sigma_kind;
  T* grad_x;       // [B, D]
  T* grad_weight;  // [C, D]
  void* grad_sigma;
  // fused-path workspace
  float* inv_x;  // [B]
  float* inv_w;  // [C]
  float* r_x;    // [B] R[b], already 0 where |x_b| < eps
  float* r_w;    // [C] S[c], likewise
  // blas-path inputs: h = g @ wn and k = g.T @ xn
  const T* h;  // [B, D]
  const T* k;  // [C, D]
  float* partials;        // per-block dsigma partials
  unsigned int* counter;  // finish_sum_last_block ticket, zeroed by the kernel before
  int64_t B, C, D;
  int tiles_d;     // fused: tiles along D
  int n_dx_tiles;  // fused: tiles of dx (first blocks of the grid); the rest are dw tiles
};

// ---- fused path: tiled SIMT GEMM ------------------------------------------------------------------------------------
// A block computes a kTile x kTile output tile with kThreads threads, each owning kTM x kTN outputs; K advances in
// steps of kBK through shared memory, stored k-major (tile[k][row]) so the inner loop reads a float4 and a float2.
constexpr int kTile = 32, kBK = 32, kThreads = 128, kTM = 4, kTN = 2, kPad = 4;
static_assert((kTile / kTM) * (kTile / kTN) == kThreads, "thread layout must cover the tile");
static_assert(kThreads == 2 * (kTile + kTile), "forward norm accumulation assumes two threads per tile row");

using SmemTile = float[kBK][kTile + kPad];

// Loads rows [r0, r0 + kTile) x k [k0, k0 + kBK) of an operand into tile[k][row] as fp32, zero-padding outside
// [0, rows) x [0, K). kKContig: element (r, k) is base[r * ld + k]; otherwise base[k * ld + r]. The fastest-varying
// thread index walks the contiguous dimension, so global loads coalesce either way. k_scale (optional) multiplies
// element (r, k) by k_scale[k].
template <bool kKContig, typename T>
__device__ __forceinline__ void load_tile(SmemTile& tile, const T* __restrict__ base, int64_t ld, int64_t r0,
                                          int64_t rows, int64_t k0, int64_t K, const float* __restrict__ k_scale) {
#pragma unroll
  for (int i = 0; i < (kTile * kBK) / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = kKContig ? idx / kBK : idx % kTile;
    const int k = kKContig ? idx % kBK : idx / kTile;
    const int64_t gr = r0 + r, gk = k0 + k;
    float v = 0.f;
    if (gr < rows && gk < K) {
      v = to_float(kKContig ? base[gr * ld + gk] : base[gk * ld + gr]);
      if (k_scale != nullptr) v *= k_scale[gk];
    }
    tile[k][r] = v;
  }
}

__device__ __forceinline__ void mma_tile(const SmemTile& As, const SmemTile& Bs, float (&acc)[kTM][kTN], int tx,
                                         int ty) {
#pragma unroll
  for (int k = 0; k < kBK; ++k) {
    const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * kTM]);
    const float2 b = *reinterpret_cast<const float2*>(&Bs[k][tx * kTN]);
    acc[0][0] += a.x * b.x;
    acc[0][1] += a.x * b.y;
    acc[1][0] += a.y * b.x;
    acc[1][1] += a.y * b.y;
    acc[2][0] += a.z * b.x;
    acc[2][1] += a.z * b.y;
    acc[3][0] += a.w * b.x;
    acc[3][1] += a.w * b.y;
  }
}

// acc[m][n] = sum_k A(m0 + m, k) * b_scale[k] * B(k, n0 + n): A rows are the output rows, B "rows" the output columns.
template <bool kAKContig, bool kBKContig, typename T>
__device__ __forceinline__ void gemm_tile(SmemTile& As, SmemTile& Bs, float (&acc)[kTM][kTN], const T* A,
                                          int64_t lda, int64_t a_rows, const T* Bm, int64_t ldb, int64_t b_rows,
                                          int64_t K, int64_t m0, int64_t n0, const float* b_scale) {
  const int tx = threadIdx.x % (kTile / kTN), ty = threadIdx.x / (kTile / kTN);
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    load_tile<kAKContig>(As, A, lda, m0, a_rows, k0, K, nullptr);
    load_tile<kBKContig>(Bs, Bm, ldb, n0, b_rows, k0, K, b_scale);
    __syncthreads();
    mma_tile(As, Bs, acc, tx, ty);
    __syncthreads();
  }
}

// Forward, fused: one block per 32x32 tile of out. The block reads full rows of its x and w tiles along D anyway, so
// it also accumulates their sums of squares and applies sigma * inv_x * inv_w in the epilogue (no second pass).
template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_linear_fwd_fused_kernel(const CosineLinearParams<T> p) {
  __shared__ __align__(16) SmemTile As;
  __shared__ __align__(16) SmemTile Bs;
  __shared__ float ss_part[2][2 * kTile];
  __shared__ float inv_s[2 * kTile];
  const int tid = threadIdx.x, tx = tid % (kTile / kTN), ty = tid / (kTile / kTN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;  // rows of x
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;  // rows of w
  // Sum-of-squares duty: tile row ss_row (0..31 rows of As, 32..63 rows of Bs), half ss_half of each k step.
  const int ss_row = tid % (2 * kTile), ss_half = tid / (2 * kTile);
  float acc[kTM][kTN] = {};
  float ss = 0.f;
  for (int64_t k0 = 0; k0 < p.D; k0 += kBK) {
    load_tile<true>(As, p.x, p.D, m0, p.B, k0, p.D, nullptr);
    load_tile<true>(Bs, p.weight, p.D, n0, p.C, k0, p.D, nullptr);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK / 2; ++kk) {
      const int k = ss_half * (kBK / 2) + kk;
      const float v = ss_row < kTile ? As[k][ss_row] : Bs[k][ss_row - kTile];  // warp-uniform branch
      ss += v * v;
    }
    mma_tile(As, Bs, acc, tx, ty);
    __syncthreads();
  }
  ss_part[ss_half][ss_row] = ss;
  __syncthreads();
  if (tid < 2 * kTile) inv_s[tid] = 1.f / fmaxf(sqrtf(ss_part[0][tid] + ss_part[1][tid]), kNormEps);
  __syncthreads();
  const float sigma = load_scalar(p.sigma, p.sigma_kind);
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty * kTM + i;
    if (m >= p.B) continue;
    const float row_scale = sigma * inv_s[ty * kTM + i];
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t n = n0 + tx * kTN + j;
      if (n < p.C) p.out[m * p.C + n] = static_cast<T>(row_scale * inv_s[kTile + tx * kTN + j] * acc[i][j]);
    }
  }
}

// Backward, fused, kernel 1 of 2: per-row statistics.
//   blocks [0, ceil(B/8)):        one warp per x row b: inv_x[b], R[b] = sum_c g*out (0 where |x_b| < eps)
//   blocks [ceil(B/8), + C/32):   32 w rows per block: inv_w[c] (warp per row), S[c] = column sums of g*out
// Also zeroes the dsigma ticket counter for kernel 2.
constexpr int kPrepThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) cosine_linear_bwd_prep_kernel(const CosineLinearBackwardParams<T> p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kPrepThreads / 32;
  const int64_t n_x_blocks = (p.B + kWarps - 1) / kWarps;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.counter = 0u;
  if (blockIdx.x < n_x_blocks) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    if (b >= p.B) return;
    const T* xr = p.x + b * p.D;
    const T* gr = p.grad + b * p.C;
    const T* orow = p.out + b * p.C;
    float ss = 0.f, r = 0.f;
    for (int64_t d = lane; d < p.D; d += 32) {
      const float v = to_float(xr[d]);
      ss += v * v;
    }
    for (int64_t c = lane; c < p.C; c += 32) r += to_float(gr[c]) * to_float(orow[c]);
    ss = warp_sum(ss);
    r = warp_sum(r);
    if (lane == 0) {
      const float norm = sqrtf(ss);
      p.inv_x[b] = 1.f / fmaxf(norm, kNormEps);
      p.r_x[b] = norm >= kNormEps ? r : 0.f;
    }
    return;
  }
  // w rows c0 .. c0 + 31
  __shared__ float col[kWarps][32];
  __shared__ bool norm_ok[32];
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) - n_x_blocks) * 32;
  for (int j = warp; j < 32; j += kWarps) {
    const int64_t c = c0 + j;
    if (c >= p.C) break;
    const T* wr = p.weight + c * p.D;
    float ss = 0.f;
    for (int64_t d = lane; d < p.D; d += 32) {
      const float v = to_float(wr[d]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      const float norm = sqrtf(ss);
      p.inv_w[c] = 1.f / fmaxf(norm, kNormEps);
      norm_ok[j] = norm >= kNormEps;
    }
  }
  // column sums: lane -> column, warp -> every kWarps-th row of g
  const int64_t c = c0 + lane;
  float s = 0.f;
  if (c < p.C) {
    for (int64_t b = warp; b < p.B; b += kWarps) s += to_float(p.grad[b * p.C + c]) * to_float(p.out[b * p.C + c]);
  }
  col[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && c < p.C) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += col[w][lane];
    p.r_w[c] = norm_ok[lane] ? t : 0.f;
  }
}

// Backward, fused, kernel 2 of 2: both GEMMs with their epilogues in one launch, plus dsigma.
//   blocks [0, n_dx_tiles):  a 32x32 tile of dx: acc = g @ (inv_w * w)  (= h), K = C
//   remaining blocks:        a 32x32 tile of dw: acc = g.T @ (inv_x * x) (= k), K = B
// dx blocks also sum acc * xn over their tile (dsigma = sum <h, xn>) and the last of them adds up the partials.
template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_linear_bwd_fused_kernel(const CosineLinearBackwardParams<T> p) {
  __shared__ __align__(16) SmemTile As;
  __shared__ __align__(16) SmemTile Bs;
  __shared__ float scratch[32];
  const int tx = threadIdx.x % (kTile / kTN), ty = threadIdx.x / (kTile / kTN);
  const float sigma = load_scalar(p.sigma, p.sigma_kind);
  float acc[kTM][kTN] = {};
  const bool is_dx = static_cast<int>(blockIdx.x) < p.n_dx_tiles;
  const int tile = is_dx ? blockIdx.x : blockIdx.x - p.n_dx_tiles;
  const int64_t m0 = static_cast<int64_t>(tile / p.tiles_d) * kTile;  // rows of dx (b) or dw (c)
  const int64_t n0 = static_cast<int64_t>(tile % p.tiles_d) * kTile;  // columns (d)
  if (is_dx) {
    // A(m=b, k=c) = g[b*C + c];  B(k=c, n=d) = w[c*D + d] * inv_w[c]
    gemm_tile<true, false>(As, Bs, acc, p.grad, p.C, p.B, p.weight, p.D, p.D, p.C, m0, n0, p.inv_w);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t m = m0 + ty * kTM + i;
      if (m >= p.B) continue;
      const float ix = p.inv_x[m], rx = p.r_x[m];
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t n = n0 + tx * kTN + j;
        if (n >= p.D) continue;
        const float xn = to_float(p.x[m * p.D + n]) * ix;
        p.grad_x[m * p.D + n] = static_cast<T>(ix * (sigma * acc[i][j] - xn * rx));
        part += acc[i][j] * xn;
      }
    }
    part = block_sum(part, scratch);
    finish_sum_last_block(part, tile, p.n_dx_tiles, p.partials, p.counter, p.grad_sigma, p.sigma_kind, scratch);
  } else {
    // A(m=c, k=b) = g[b*C + c];  B(k=b, n=d) = x[b*D + d] * inv_x[b]
    gemm_tile<false, false>(As, Bs, acc, p.grad, p.C, p.C, p.x, p.D, p.D, p.B, m0, n0, p.inv_x);
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t m = m0 + ty * kTM + i;
      if (m >= p.C) continue;
      const float iw = p.inv_w[m], rw = p.r_w[m];
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t n = n0 + tx * kTN + j;
        if (n >= p.D) continue;
        const float wn = to_float(p.weight[m * p.D + n]) * iw;
        p.grad_weight[m * p.D + n] = static_cast<T>(iw * (sigma * acc[i][j] - wn * rw));
      }
    }
  }
}

// ---- blas path -----------------------------------------------------------------------------------------------------
constexpr int kRowThreads = 256, kRowWarps = kRowThreads / 32;

// One warp per row of x (rows [0, B)) and of w (rows [B, B + C)): x_scaled = x * inv_x (* sigma in the forward),
// w_scaled = w * inv_w, rounded once to T. Zeroes p.counter (backward's dsigma ticket) when given.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) cosine_linear_normalize_kernel(const CosineLinearParams<T> p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (p.counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *p.counter = 0u;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;
  if (row >= p.B + p.C) return;
  const bool is_x = row < p.B;
  const T* src = is_x ? p.x + row * p.D : p.weight + (row - p.B) * p.D;
  T* dst = is_x ? p.x_scaled + row * p.D : p.w_scaled + (row - p.B) * p.D;
  float ss = 0.f;
  for (int64_t d = lane; d < p.D; d += 32) {
    const float v = to_float(src[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  float scale = 1.f / fmaxf(sqrtf(ss), kNormEps);
  if (is_x && p.scale_x_by_sigma) scale *= load_scalar(p.sigma, p.sigma_kind);
  for (int64_t d = lane; d < p.D; d += 32) dst[d] = static_cast<T>(to_float(src[d]) * scale);
}

// One warp per row: dx rows from h (rows [0, B)), dw rows from k (rows [B, B + C)):
//   dx_b = sigma * inv_b * (h_b - x_b * inv_b^2 <h_b, x_b>)   (projection term dropped where |x_b| < eps)
// and dsigma = sum_b inv_b <h_b, x_b>, reduced by the last block.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) cosine_linear_bwd_epilogue_kernel(
    const CosineLinearBackwardParams<T> p) {
  __shared__ float scratch[32];
  __shared__ float warp_part[kRowWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;
  float part = 0.f;
  if (row < p.B + p.C) {
    const bool is_x = row < p.B;
    const int64_t r = is_x ? row : row - p.B;
    const T* src = (is_x ? p.x : p.weight) + r * p.D;
    const T* hr = (is_x ? p.h : p.k) + r * p.D;
    T* dst = (is_x ? p.grad_x : p.grad_weight) + r * p.D;
    float ss = 0.f, dot = 0.f;
    for (int64_t d = lane; d < p.D; d += 32) {
      const float v = to_float(src[d]);
      ss += v * v;
      dot += to_float(hr[d]) * v;
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float norm = sqrtf(ss);
    const float inv = 1.f / fmaxf(norm, kNormEps);
    const float coef = norm >= kNormEps ? dot * inv * inv : 0.f;
    const float scale = load_scalar(p.sigma, p.sigma_kind) * inv;
    for (int64_t d = lane; d < p.D; d += 32) {
      dst[d] = static_cast<T>(scale * (to_float(hr[d]) - to_float(src[d]) * coef));
    }
    if (is_x) part = dot * inv;  // <h_b, xn_b>
  }
  if (lane == 0) warp_part[warp] = part;
  __syncthreads();
  float block_part = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kRowWarps; ++w) block_part += warp_part[w];
  }
  finish_sum_last_block(block_part, blockIdx.x, gridDim.x, p.partials, p.counter, p.grad_sigma, p.sigma_kind,
                        scratch);
}

// ---- host side -----------------------------------------------------------------------------------------------------
void check_cosine_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& sigma) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, D], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be [C, D] with D = x.size(1) = ",
              x.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(sigma.dim() == 0, op, ": sigma must be a 0-dim tensor, got shape ", sigma.sizes());
  TORCH_CHECK(x.is_cuda() && weight.is_cuda() && sigma.is_cuda(), op,
              ": x, weight and sigma must all be CUDA tensors, got ", x.device(), ", ", weight.device(), ", ",
              sigma.device());
  TORCH_CHECK(weight.device() == x.device() && sigma.device() == x.device(), op,
              ": x, weight and sigma must be on one device, got ", x.device(), ", ", weight.device(), ", ",
              sigma.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16 (float64 runs the reference), got ", t);
  TORCH_CHECK(weight.scalar_type() == t, op, ": x and weight must have the same dtype, got ", t, " and ",
              weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), op, ": sigma must be a floating-point tensor, got ",
              sigma.scalar_type());
}

template <typename T>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sigma, at::Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1), C = w.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  CosineLinearParams<T> p{};
  p.x = x.const_data_ptr<T>();
  p.weight = w.const_data_ptr<T>();
  p.sigma = sigma.const_data_ptr();
  p.sigma_kind = scalar_kind(sigma.scalar_type());
  p.out = out.mutable_data_ptr<T>();
  p.B = B;
  p.C = C;
  p.D = D;
  if (use_fused_path(B, C, D)) {
    const int64_t row_tiles = (B + kTile - 1) / kTile, col_tiles = (C + kTile - 1) / kTile;
    TORCH_CHECK(row_tiles <= 65535 && col_tiles < (int64_t{1} << 31),
                "cosine_linear: problem too large for the fused path (B = ", B, ", C = ", C, ")");
    const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(row_tiles));
    cosine_linear_fwd_fused_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor xs = at::empty({B, D}, x.options());
  at::Tensor ws = at::empty({C, D}, w.options());
  p.x_scaled = xs.mutable_data_ptr<T>();
  p.w_scaled = ws.mutable_data_ptr<T>();
  p.scale_x_by_sigma = true;
  const int64_t blocks = (B + C + kRowWarps - 1) / kRowWarps;
  cosine_linear_normalize_kernel<T><<<blocks, kRowThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::mm_out(out, xs, ws.t());  // cuBLAS on the current stream
}

template <typename T>
void launch_backward(const at::Tensor& g, const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& sigma, at::Tensor& gx, at::Tensor& gw, at::Tensor& gs) {
  const int64_t B = x.size(0), D = x.size(1), C = w.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  CosineLinearBackwardParams<T> p{};
  p.grad = g.const_data_ptr<T>();
  p.out = out.const_data_ptr<T>();
  p.x = x.const_data_ptr<T>();
  p.weight = w.const_data_ptr<T>();
  p.sigma = sigma.const_data_ptr();
  p.sigma_kind = scalar_kind(sigma.scalar_type());
  p.grad_x = gx.mutable_data_ptr<T>();
  p.grad_weight = gw.mutable_data_ptr<T>();
  p.grad_sigma = gs.mutable_data_ptr();
  p.B = B;
  p.C = C;
  p.D = D;
  if (use_fused_path(B, C, D)) {
    p.tiles_d = static_cast<int>((D + kTile - 1) / kTile);
    p.n_dx_tiles = static_cast<int>(((B + kTile - 1) / kTile) * p.tiles_d);
    const int64_t n_dw_tiles = ((C + kTile - 1) / kTile) * p.tiles_d;
    // workspace: inv_x[B] inv_w[C] r_x[B] r_w[C] partials[n_dx_tiles] counter[1]
    at::Tensor ws = at::empty({2 * (B + C) + p.n_dx_tiles + 1}, f32);
    float* base = ws.mutable_data_ptr<float>();
    p.inv_x = base;
    p.inv_w = base + B;
    p.r_x = base + B + C;
    p.r_w = base + 2 * B + C;
    p.partials = base + 2 * (B + C);
    p.counter = reinterpret_cast<unsigned int*>(p.partials + p.n_dx_tiles);
    const int64_t prep_blocks = (B + kPrepThreads / 32 - 1) / (kPrepThreads / 32) + (C + 31) / 32;
    cosine_linear_bwd_prep_kernel<T><<<prep_blocks, kPrepThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cosine_linear_bwd_fused_kernel<T><<<p.n_dx_tiles + n_dw_tiles, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // blas: normalise (unscaled) -> h = g @ wn, k = g.T @ xn -> row-wise epilogue
  at::Tensor xn = at::empty({B, D}, x.options());
  at::Tensor wn = at::empty({C, D}, w.options());
  const int64_t row_blocks = (B + C + kRowWarps - 1) / kRowWarps;
  at::Tensor ws = at::empty({row_blocks + 1}, f32);
  p.partials = ws.mutable_data_ptr<float>();
  p.counter = reinterpret_cast<unsigned int*>(p.partials + row_blocks);
  CosineLinearParams<T> np{};
  np.x = p.x;
  np.weight = p.weight;
  np.sigma = p.sigma;
  np.sigma_kind = p.sigma_kind;
  np.x_scaled = xn.mutable_data_ptr<T>();
  np.w_scaled = wn.mutable_data_ptr<T>();
  np.scale_x_by_sigma = false;
  np.counter = p.counter;
  np.B = B;
  np.C = C;
  np.D = D;
  cosine_linear_normalize_kernel<T><<<row_blocks, kRowThreads, 0, stream>>>(np);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor h = at::mm(g, wn);      // [B, D]
  const at::Tensor k = at::mm(g.t(), xn);  // [C, D]
  p.h = h.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  cosine_linear_bwd_epilogue_kernel<T><<<row_blocks, kRowThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void set_cosine_linear_path(int path) {
  TORCH_CHECK(path >= 0 && path <= 2, "cosine_linear path must be 0 (auto), 1 (fused) or 2 (blas), got ", path);
  g_cosine_path.store(path, std::memory_order_relaxed);
}

int get_cosine_linear_path() { return g_cosine_path.load(std::memory_order_relaxed); }

int cuda_runtime_version_built() { return CUDART_VERSION; }

at::Tensor cosine_linear_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& sigma) {
  check_cosine_inputs("cosine_linear", x_in, weight_in, sigma);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (out.numel() == 0) return out;
  MNEMONICS_FAST_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "cosine_linear_cuda",
                                          [&] { launch_forward<scalar_t>(x, w, sigma, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_linear_backward_cuda(const at::Tensor& grad_out,
                                                                           const at::Tensor& out_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& weight_in,
                                                                           const at::Tensor& sigma) {
  check_cosine_inputs("cosine_linear_backward", x_in, weight_in, sigma);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = weight_in.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == C,
              "cosine_linear_backward: grad_out must be [B, C] = [", B, ", ", C, "], got ", grad_out.sizes());
  TORCH_CHECK(out_in.dim() == 2 && out_in.size(0) == B && out_in.size(1) == C,
              "cosine_linear_backward: out must be [B, C] = [", B, ", ", C, "], got ", out_in.sizes());
  TORCH_CHECK(grad_out.device() == x_in.device() && out_in.device() == x_in.device(),
              "cosine_linear_backward: grad_out and out must be on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto t = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  // Autograd may hand over an expanded (stride-0) or differently typed gradient: make it dense, in x's dtype.
  const at::Tensor g = grad_out.to(t).contiguous();
  const at::Tensor out = out_in.to(t).contiguous();
  at::Tensor gx = at::empty({B, D}, x.options());
  at::Tensor gw = at::empty({C, D}, w.options());
  at::Tensor gs = at::empty(sigma.sizes(), sigma.options());
  if (B == 0 || C == 0 || D == 0) {  // nothing flows: all-zero gradients
    gx.zero_();
    gw.zero_();
    gs.zero_();
    return {gx, gw, gs};
  }
  MNEMONICS_FAST_DISPATCH_FLOAT_HALF_BF16(t, "cosine_linear_backward_cuda",
                                          [&] { launch_backward<scalar_t>(g, out, x, w, sigma, gx, gw, gs); });
  return {gx, gw, gs};
}

TORCH_LIBRARY_IMPL(mnemonics_fast, CUDA, m) {
  m.impl("cosine_linear", &cosine_linear_cuda);
  m.impl("cosine_linear_backward", &cosine_linear_backward_cuda);
}

}  // namespace mnemonics_fast
