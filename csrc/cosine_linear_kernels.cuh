// Kernels of mnemonics_fast::cosine_linear (host glue: cosine_linear.cu). out = sigma * normalize(x) @ normalize(w).T.
//
// Notation: x [B, D], weight w [C, D], sigma a 0-dim tensor, g = dL/dout [B, C].
//   inv_x[b] = 1 / max(|x_b|, eps), xn = x * inv_x (likewise inv_w, wn); cos = xn @ wn.T; out = sigma * cos.
// Backward (derivation in docs/kernels.md):
//   h = g @ wn [B, D],  k = g.T @ xn [C, D]
//   R[b] = sum_c g[b,c] * out[b,c]  (= <sigma h_b, xn_b>),  S[c] = sum_b g[b,c] * out[b,c]
//   dx[b] = inv_x[b] * (sigma h_b - xn_b R[b])   (R[b] := 0 where |x_b| < eps: F.normalize's clamp has no gradient)
//   dw[c] = inv_w[c] * (sigma k_c - wn_c S[c])
//   dsigma = sum_b R[b] / sigma  (= sum g * cos) for float32 inputs and |sigma| >= 1e-20, else sum_b <h_b, xn_b>
//   (the same quantity; the first sums products of g with the output, as autograd does, and is about as accurate as
//   PyTorch in fp32, the second sums over an h that accumulated over K = C and loses ~sqrt(C) ulps, but needs no
//   division and, from fp32 accumulators, beats the first for half inputs whose output was rounded to 8-11 bits)
//
// Launch shapes and path choice: cosine_linear.cu. The kernels use only CUDA built-ins and common.cuh, so that
// tests can also run them on a CPU (csrc/emulation/).

#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace mnemonics_fast {

// Same epsilon as F.normalize (mnemonics_fast/ops/reference.py: NORM_EPS).
constexpr float kNormEps = 1e-12f;
// grad_sigma from sum(g * out) / sigma (float32 inputs only) while |sigma| is at least this.
constexpr float kMinSigmaForRatio = 1e-20f;

template <typename T>
constexpr bool kSigmaGradFromOutput = std::is_same<T, float>::value;

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
  // backward only, when non-null: r_all[b] = sum_c grad[b,c] * out[b,c] (for grad_sigma)
  const T* grad;
  const T* out_saved;
  double* r_all;
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
  double* r_all;  // [B] R[b] unmasked, for grad_sigma; nullptr unless kSigmaGradFromOutput<T> (both paths)
  // blas-path inputs: h = g @ wn and k = g.T @ xn
  const T* h;  // [B, D]
  const T* k;  // [C, D]
  float* partials;        // per-block dsigma partials
  unsigned int* counter;  // finish_grad_sigma ticket, zeroed by the kernel before
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

// acc += this k step's products. They are summed apart first (blocked summation): with K up to thousands (dx: K = C,
// dw: K = B) one running fp32 sum would lose ~sqrt(K) ulps of its final size, about twice cuBLAS's error.
__device__ __forceinline__ void mma_tile(const SmemTile& As, const SmemTile& Bs, float (&acc)[kTM][kTN], int tx,
                                         int ty) {
  float t[kTM][kTN] = {};
#pragma unroll
  for (int k = 0; k < kBK; ++k) {
    const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * kTM]);
    const float2 b = *reinterpret_cast<const float2*>(&Bs[k][tx * kTN]);
    t[0][0] += a.x * b.x;
    t[0][1] += a.x * b.y;
    t[1][0] += a.y * b.x;
    t[1][1] += a.y * b.y;
    t[2][0] += a.z * b.x;
    t[2][1] += a.z * b.y;
    t[3][0] += a.w * b.x;
    t[3][1] += a.w * b.y;
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] += t[i][j];
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
    float ss = 0.f;
    double r = 0.0;  // R[b] feeds grad_sigma, a sum over all of g * out: kept in double until then
    for (int64_t d = lane; d < p.D; d += 32) {
      const float v = to_float(xr[d]);
      ss += v * v;
    }
    for (int64_t c = lane; c < p.C; c += 32) r += static_cast<double>(to_float(gr[c]) * to_float(orow[c]));
    ss = warp_sum(ss);
    r = warp_sum(r);
    if (lane == 0) {
      const float norm = sqrtf(ss);
      p.inv_x[b] = 1.f / fmaxf(norm, kNormEps);
      p.r_x[b] = norm >= kNormEps ? static_cast<float>(r) : 0.f;
      if (p.r_all != nullptr) p.r_all[b] = r;
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

// grad_sigma, finished by the last block to arrive: each of `n_parts` blocks calls this once with its partial
// sum_b <h_b, xn_b> (valid in thread 0); the last one adds the partials in index order (and r_all, if present) and
// stores the result. One launch, deterministic, no float atomics. p.counter must be zero before the launch (the
// kernel that precedes this one zeroes it).
template <typename T>
__device__ __forceinline__ void finish_grad_sigma(const CosineLinearBackwardParams<T>& p, float part, int index,
                                                  int n_parts) {
  __shared__ bool is_last;
  __shared__ double scratch[32];
  if (threadIdx.x == 0) {
    p.partials[index] = part;
    __threadfence();  // publish the partial before taking a ticket
    is_last = atomicAdd(p.counter, 1u) == static_cast<unsigned int>(n_parts - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // Double accumulators: these sums have up to thousands of terms of either sign and one block to do them in.
  double from_h = 0.0, from_out = 0.0;
  for (int i = threadIdx.x; i < n_parts; i += blockDim.x) from_h += __ldcg(p.partials + i);  // L2, not stale L1
  from_h = block_sum(from_h, scratch);
  if (p.r_all != nullptr) {
    for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) from_out += __ldcg(p.r_all + b);
    from_out = block_sum(from_out, scratch);
  }
  if (threadIdx.x == 0) {
    const float sigma = load_scalar(p.sigma, p.sigma_kind);
    const bool ratio = p.r_all != nullptr && fabsf(sigma) >= kMinSigmaForRatio;
    store_scalar(p.grad_sigma, p.sigma_kind, static_cast<float>(ratio ? from_out / sigma : from_h));
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
    finish_grad_sigma(p, part, tile, p.n_dx_tiles);
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
// w_scaled = w * inv_w, rounded once to T. In the backward it also zeroes p.counter (the grad_sigma ticket) and,
// when p.r_all is set, writes R[b] = sum_c g[b,c] out[b,c] for the x rows.
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
  if (is_x && p.r_all != nullptr) {  // backward, for grad_sigma: R[b] = sum_c g[b,c] out[b,c]
    const T* gr = p.grad + row * p.C;
    const T* orow = p.out_saved + row * p.C;
    double r = 0.0;
    for (int64_t c = lane; c < p.C; c += 32) r += static_cast<double>(to_float(gr[c]) * to_float(orow[c]));
    r = warp_sum(r);
    if (lane == 0) p.r_all[row] = r;
  }
}

// One warp per row: dx rows from h (rows [0, B)), dw rows from k (rows [B, B + C)):
//   dx_b = sigma * inv_b * (h_b - x_b * inv_b^2 <h_b, x_b>)   (projection term dropped where |x_b| < eps)
// and the grad_sigma partials sum_b inv_b <h_b, x_b>, finished by the last block.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) cosine_linear_bwd_epilogue_kernel(
    const CosineLinearBackwardParams<T> p) {
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
  finish_grad_sigma(p, block_part, blockIdx.x, gridDim.x);
}

// ---- launch shapes (shared by the host glue and the CPU emulation) -----------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fused backward: grid of kernel 1 (prep) and kernel 2, and its fp32 workspace
// r_all[B] (doubles, first for alignment) inv_x[B] inv_w[C] r_x[B] r_w[C] partials[n_dx_tiles] counter[1].
struct FusedBackwardLayout {
  int tiles_d;
  int n_dx_tiles;
  int64_t n_dw_tiles;
  int64_t prep_blocks;
  int64_t workspace_floats;
};

inline FusedBackwardLayout fused_backward_layout(int64_t B, int64_t C, int64_t D) {
  FusedBackwardLayout l{};
  l.tiles_d = static_cast<int>(ceil_div(D, kTile));
  l.n_dx_tiles = static_cast<int>(ceil_div(B, kTile) * l.tiles_d);
  l.n_dw_tiles = ceil_div(C, kTile) * l.tiles_d;
  l.prep_blocks = ceil_div(B, kPrepThreads / 32) + ceil_div(C, 32);
  l.workspace_floats = 4 * B + 2 * C + l.n_dx_tiles + 1;
  return l;
}

template <typename T>
void assign_fused_workspace(CosineLinearBackwardParams<T>& p, const FusedBackwardLayout& l, float* base) {
  p.tiles_d = l.tiles_d;
  p.n_dx_tiles = l.n_dx_tiles;
  p.r_all = kSigmaGradFromOutput<T> ? reinterpret_cast<double*>(base) : nullptr;
  base += 2 * p.B;
  p.inv_x = base;
  p.inv_w = base + p.B;
  p.r_x = base + p.B + p.C;
  p.r_w = base + 2 * p.B + p.C;
  p.partials = base + 2 * (p.B + p.C);
  p.counter = reinterpret_cast<unsigned int*>(p.partials + l.n_dx_tiles);
}

// Blas path: one warp per row of x and w; workspace r_all[B] (doubles) partials[row_blocks] counter[1].
inline int64_t row_blocks(int64_t B, int64_t C) { return ceil_div(B + C, kRowWarps); }
inline int64_t blas_backward_workspace_floats(int64_t B, int64_t C) { return 2 * B + row_blocks(B, C) + 1; }

// Points the backward params p and the normalise-kernel params np (which fills r_all and zeroes the counter) at the
// workspace. p.grad / p.out must be set.
template <typename T>
void assign_blas_workspace(CosineLinearBackwardParams<T>& p, CosineLinearParams<T>& np, float* base) {
  const int64_t n = row_blocks(p.B, p.C);
  p.r_all = kSigmaGradFromOutput<T> ? reinterpret_cast<double*>(base) : nullptr;
  p.partials = base + 2 * p.B;
  p.counter = reinterpret_cast<unsigned int*>(p.partials + n);
  np.counter = p.counter;
  np.r_all = p.r_all;
  np.grad = p.grad;
  np.out_saved = p.out;
}

}  // namespace mnemonics_fast
