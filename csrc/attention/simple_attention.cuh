// The first FIREATTN attention kernel: correct before fast. CUDA cores, FP32 math.
// It serves prefill (varlen, cached context, bottom-right causal) and decode alike; the
// Hopper tensor-core kernels of later issues replace it behind the same op signatures.
//
// Numerics (the reference's precision="kernel", vllm_fireattn/reference/attention.py):
//   FP8 cache:  q8 = sat_rne(q / q_scale[h_kv]); s = (q8 . k8) * q_scale * k_scale * softmax_scale;
//               out = (sum_j p_j v8_j / l) * v_scale, with p, l, and the accumulator in FP32.
//   BF16/FP16 cache: the same without quantization or scales.
//   Then optional soft cap s = cap * tanh(s / cap), masks, and sinks (an extra logit per query
//   head that joins the softmax denominator only).
//
// Work split: one CTA per (32-row tile, sequence, kv head). A row is a (query token, query
// head of this kv head's group) pair, so GQA groups share every K/V tile the CTA loads.
// 4 warps x 8 rows; a tile holds 32 keys, one per lane for QK^T; for PV each lane owns
// head_dim/32 contiguous output columns.
#pragma once
#include <cuda_runtime.h>
#include <math_constants.h>

#include "common/attention_params.h"
#include "common/fp8.cuh"
#include "common/row_tile.cuh"

namespace fireattn {


template <int D>
struct SimpleTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 8;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr int kKeys = 32;
  static constexpr int kKStride = D + 4;  // floats; the pad keeps lane-per-key reads conflict-free
  static constexpr int kCols = D / 32;    // output columns per lane
  static constexpr size_t kSmemBytes =
      sizeof(float) * (kRows * D + kKeys * kKStride + kKeys * D + kWarps * kRowsPerWarp * kKeys);
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Loads `n` bytes-per-chunk (16) of one key/value row from the cache and widens them to floats.
template <typename QT, bool kFp8>
__device__ __forceinline__ void widen16(const uint8_t* src, float* dst) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  if constexpr (kFp8) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 16; j += 4)
      *reinterpret_cast<float4*>(dst + j) =
          make_float4(e4m3_to_float(b[j]), e4m3_to_float(b[j + 1]), e4m3_to_float(b[j + 2]), e4m3_to_float(b[j + 3]));
  } else {
    const QT* h = reinterpret_cast<const QT*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; j += 4)
      *reinterpret_cast<float4*>(dst + j) =
          make_float4(to_float(h[j]), to_float(h[j + 1]), to_float(h[j + 2]), to_float(h[j + 3]));
  }
}

template <typename QT, bool kFp8, int D>
__global__ void __launch_bounds__(SimpleTile<D>::kThreads) simple_attention_kernel(const AttentionParams p) {
  using Tile = SimpleTile<D>;
  constexpr int kRows = Tile::kRows, kKeys = Tile::kKeys, kKStride = Tile::kKStride, kCols = Tile::kCols;
  constexpr int kElemsPer16B = kFp8 ? 16 : 8;
  constexpr int kChunksPerRow = D / kElemsPer16B;

  extern __shared__ float smem[];
  float* q_s = smem;                          // [kRows][D]
  float* k_s = q_s + kRows * D;               // [kKeys][kKStride]
  float* v_s = k_s + kKeys * kKStride;        // [kKeys][D]
  float* p_s = v_s + kKeys * D;               // [kWarps][kRowsPerWarp][kKeys]

  const int seq = blockIdx.y, kv_head = blockIdx.z;
  const int row0 = blockIdx.x * kRows;
  const RowTile rt(p, seq, row0, kRows);
  if (rt.empty) return;
  const int group = rt.group, q_begin = rt.q_begin, num_rows = rt.num_rows, context = rt.context;

  const float q_scale = kFp8 ? p.q_scale[kv_head * p.q_scale_stride] : 1.f;
  const float k_scale = kFp8 ? p.k_scale[kv_head * p.k_scale_stride] : 1.f;
  const float v_scale = kFp8 ? p.v_scale[kv_head * p.v_scale_stride] : 1.f;
  const float score_scale = p.softmax_scale * q_scale * k_scale;

  // Q rows -> shared memory, quantized to e4m3 in registers when the cache is FP8.
  for (int i = threadIdx.x; i < kRows * D; i += Tile::kThreads) {
    const int r = row0 + i / D, d = i % D;
    float x = 0.f;
    if (r < num_rows) {
      const int tok = q_begin + r / group, head = kv_head * group + r % group;
      x = to_float(static_cast<const QT*>(p.q)[tok * p.q_tok_stride + head * p.q_head_stride + d]);
      if constexpr (kFp8) x = round_through_e4m3(x / q_scale);
    }
    q_s[i] = x;
  }

  const int kv_end = rt.kv_end, kv_begin = rt.kv_begin;  // keys this tile can see

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int pos[Tile::kRowsPerWarp];
  bool valid[Tile::kRowsPerWarp];
  float m[Tile::kRowsPerWarp], l[Tile::kRowsPerWarp], acc[Tile::kRowsPerWarp][kCols];
#pragma unroll
  for (int r = 0; r < Tile::kRowsPerWarp; ++r) {
    const int row = row0 + warp * Tile::kRowsPerWarp + r;
    valid[r] = row < num_rows;
    pos[r] = context + row / group;
    m[r] = -CUDART_INF_F;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }
  float* p_warp = p_s + warp * Tile::kRowsPerWarp * kKeys;

  for (int kv0 = kv_begin; kv0 < kv_end; kv0 += kKeys) {
    __syncthreads();  // previous tile fully consumed (and q_s written, first time round)
    for (int c = threadIdx.x; c < 2 * kKeys * kChunksPerRow; c += Tile::kThreads) {
      const int is_v = c / (kKeys * kChunksPerRow);
      const int key = (c / kChunksPerRow) % kKeys, part = c % kChunksPerRow;
      float* dst = is_v ? v_s + key * D + part * kElemsPer16B : k_s + key * kKStride + part * kElemsPer16B;
      const int token = kv0 + key;
      if (token < kv_end) {
        const uint8_t* src = p.kv.key_ptr(seq, kv_head, token) + is_v * p.kv.kv_stride + part * 16;
        widen16<QT, kFp8>(src, dst);
      } else {
#pragma unroll
        for (int j = 0; j < kElemsPer16B; ++j) dst[j] = 0.f;
      }
    }
    __syncthreads();

    // S = Q K^T: lane = key.
    float s[Tile::kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < Tile::kRowsPerWarp; ++r) s[r] = 0.f;
    const float* krow = k_s + lane * kKStride;
    const float* qrows = q_s + warp * Tile::kRowsPerWarp * D;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float4 k4 = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
      for (int r = 0; r < Tile::kRowsPerWarp; ++r) {
        const float4 q4 = *reinterpret_cast<const float4*>(qrows + r * D + d);
        s[r] = fmaf(q4.x, k4.x, fmaf(q4.y, k4.y, fmaf(q4.z, k4.z, fmaf(q4.w, k4.w, s[r]))));
      }
    }

    const int key = kv0 + lane;
#pragma unroll
    for (int r = 0; r < Tile::kRowsPerWarp; ++r) {
      float x = s[r] * score_scale;
      if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
      bool visible = valid[r] && key < kv_end;
      if (p.causal) visible = visible && key <= pos[r];
      if (p.window_left >= 0) visible = visible && key >= pos[r] - p.window_left;
      x = visible ? x : -CUDART_INF_F;
      const float m_new = fmaxf(m[r], warp_max(x));
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;  // fully masked so far: keep exps at 0
      const float alpha = expf(m[r] - m_use);
      const float pr = expf(x - m_use);
      l[r] = l[r] * alpha + pr;  // per-lane partial; reduced once at the end
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] *= alpha;
      p_warp[r * kKeys + lane] = pr;
    }
    __syncwarp();

    // O += P V: lane owns columns [lane*kCols, lane*kCols + kCols).
#pragma unroll 2
    for (int j = 0; j < kKeys; ++j) {
      float v[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) v[c] = v_s[j * D + lane * kCols + c];
#pragma unroll
      for (int r = 0; r < Tile::kRowsPerWarp; ++r) {
        const float pj = p_warp[r * kKeys + j];
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] = fmaf(pj, v[c], acc[r][c]);
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < Tile::kRowsPerWarp; ++r) {
    const int row = row0 + warp * Tile::kRowsPerWarp + r;
    if (row >= num_rows) continue;  // warp-uniform
    const int tok = q_begin + row / group, head = kv_head * group + row % group;
    float l_sum = warp_sum(l[r]);
    float m_fin = m[r];
    if (p.sinks != nullptr) {
      const float sink = p.sinks[head];
      const float m_new = fmaxf(m_fin, sink);
      const float alpha = expf(m_fin - m_new);  // m_fin = -inf (no keys) gives 0
      l_sum = l_sum * alpha + expf(sink - m_new);
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] *= alpha;
      m_fin = m_new;
    }
    const float inv = l_sum > 0.f ? v_scale / l_sum : 0.f;
    QT* o = static_cast<QT*>(p.out) + tok * p.o_tok_stride + head * p.o_head_stride + lane * kCols;
#pragma unroll
    for (int c = 0; c < kCols; ++c) o[c] = from_float<QT>(acc[r][c] * inv);
    if (p.lse != nullptr && lane == 0)
      p.lse[head * p.lse_head_stride + tok] = l_sum > 0.f ? m_fin + logf(l_sum) : -CUDART_INF_F;
  }
}

template <typename QT, bool kFp8, int D>
void launch_simple_attention(const AttentionParams& p, int max_query_len, cudaStream_t stream) {
  using Tile = SimpleTile<D>;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int tiles = (max_query_len * group + Tile::kRows - 1) / Tile::kRows;
  if (tiles == 0 || p.num_seqs == 0) return;
  auto kernel = simple_attention_kernel<QT, kFp8, D>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Tile::kSmemBytes));
  const dim3 grid(tiles, p.num_seqs, p.num_kv_heads);
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
}

}  // namespace fireattn
