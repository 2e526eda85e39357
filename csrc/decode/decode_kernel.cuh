// The FIREATTN decode kernel: split-KV paged attention for decode and spec-verification rows,
// built to stream the KV cache at the memory-bandwidth limit.
//
// Work split. A "row" is a (query token, query head of one KV head's group) pair; 8 rows form a
// row tile (the N=8 side of one tensor-core MMA), so a GQA group shares every K/V byte loaded.
// One CTA = (split, row tile, KV head, sequence); its 4 warps stream disjoint stages of the
// split's key range, each with its own online softmax, and merge through shared memory at the
// end. A sequence's key range is cut into at most `num_splits` splits (>= kMinSplitKeys keys
// each, derived in-kernel from seq_len), so the grid depends only on static shapes and a CUDA
// graph replays with any seq_lens; a second kernel merges the splits' partial results.
//
// Tensor cores with keys on the M side. S^T[16 keys x 8 rows] = K[16 x D] . Q^T and
// O^T[D x 8 rows] += V^T[D x 16 keys] . P^T, both m16n8k16 with FP32 accumulators. Each lane
// loads K/V straight from global memory into registers in the exact fragment order (no shared
// memory staging): QK^T permutes the head dim (Q is stored in the same permuted order), PV
// permutes nothing but transposes V in registers with byte permutes, and P^T comes from the S^T
// accumulator through movmatrix.trans.
//
// Numerics. FP8 (e4m3) K/V are widened exactly to FP16 in registers (K by cvt.f16x2.e4m3x2, V by
// integer bit moves that also transpose it, as value * 2^-8, undone by the output scale); the
// query stays 16-bit: BF16 queries are rescaled per row by a power of two into FP16 range, which
// is exact. So the only quantization is the cache's own; K/V scales are applied to the FP32
// scores and output. P is rounded to the MMA type (FP16, or BF16 for BF16 caches).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/attention_params.h"
#include "common/pdl.cuh"

namespace fireattn {

struct DecodeParams {
  AttentionParams a;
  float* part_out;  // [num_seqs, Hkv, row_tiles, num_splits, 8, D] split outputs (normalized, v-scaled)
  float* part_lse;  // [num_seqs, Hkv, row_tiles, num_splits, 8] split log2-sum-exp
  int num_splits;   // splits per sequence at most (static: the grid depends on it)
  int row_tiles;    // ceil(group * max_query_len / 8)
  int group;        // query heads per KV head
  int block_shift;  // log2(block_size) when it is a power of two, else -1
};

// Tuning knobs (overridable with -D for experiments; the defaults are the measured choice).
#ifndef FIREATTN_DECODE_STAGE_BYTES
#define FIREATTN_DECODE_STAGE_BYTES 2048
#endif
#ifndef FIREATTN_DECODE_MIN_BLOCKS  // FP8 caches at head_dim 64 / 128 and 16-bit caches at 64
#define FIREATTN_DECODE_MIN_BLOCKS 4
#endif
#ifndef FIREATTN_DECODE_MIN_BLOCKS_D256_FP8
#define FIREATTN_DECODE_MIN_BLOCKS_D256_FP8 3
#endif
#ifndef FIREATTN_DECODE_BT_AHEAD  // 0: block-table entries always read in line (see kBtAhead)
#define FIREATTN_DECODE_BT_AHEAD 1
#endif
// L2 prefetch hint of the cache loads, bytes: 256, 128, or 0 (none). H200, one call, us,
// tools/decode_latency.py --random-blocks, 8-layer graphs. FP8, 128 / 256 / none: head_dim 128
// 8 x 32k 139.8 / 142.1 / 140.3, 1 x 128k 74.2 / 76.0 / 74.7; head_dim 256 8 x 32k 143.2 /
// 147.3 / 144.0; head_dim 64 8 x 32k 78.1 / 79.2 / 78.9. 16-bit caches, none / 256: head_dim
// 64 8 x 32k 135.6 / 146.2, 64 x 4k 130.1 / 142.1; head_dim 128 8 x 32k 265.7 / 277.8, 1 x
// 128k 136.6 / 142.7; head_dim 256 level (within 1%).
#ifndef FIREATTN_DECODE_L2_PREFETCH  // FP8 caches
#define FIREATTN_DECODE_L2_PREFETCH 128
#endif
#ifndef FIREATTN_DECODE_L2_PREFETCH_16BIT  // 16-bit caches
#define FIREATTN_DECODE_L2_PREFETCH_16BIT 0
#endif

// Split sizes: up to kDecodeShortSplits splits of >= 64 keys, then splits of >= 256 keys. Short
// contexts at small batch are latency bound: short splits shorten each CTA's chain of dependent
// loads. Since the combine runs one CTA per row (its 8 warps over the splits), more splits cost
// little there (H200, batch 1, one CUDA graph of 16 layers, us per layer, both trees in one run;
// vs the earlier 128 / 512 keys): FP8 16k head_dim 64 / 128 / 256 15.0 / 18.7 / 27.5 vs 16.3 /
// 22.2 / 30.7, head_dim 256 32k 35.3 vs 37.5; BF16 16k head_dim 256 31.6 vs 40.1; other contexts
// (1k-64k) and batch 8 / 32 within the run-to-run noise (up to 4%).
#ifndef FIREATTN_DECODE_SHORT_SPLIT_KEYS
#define FIREATTN_DECODE_SHORT_SPLIT_KEYS 64
#endif
#ifndef FIREATTN_DECODE_MIN_SPLIT_KEYS
#define FIREATTN_DECODE_MIN_SPLIT_KEYS 256
#endif
constexpr int kDecodeShortSplitKeys = FIREATTN_DECODE_SHORT_SPLIT_KEYS;
constexpr int kDecodeShortSplits = 32;
constexpr int kDecodeMinSplitKeys = FIREATTN_DECODE_MIN_SPLIT_KEYS;
constexpr int kDecodeMaxSplits = 256;

// A sequence's key range [begin, end) (begin aligned down to 16) and its split count.
struct SplitRange {
  int begin, end, splits, chunk;
};

__device__ __forceinline__ SplitRange decode_split_range(int seq_len, int q_len, int window_left, int num_splits) {
  SplitRange r;
  r.end = seq_len;
  const int first_pos = seq_len - q_len;
  r.begin = (window_left >= 0 && first_pos - window_left > 0) ? ((first_pos - window_left) & ~15) : 0;
  const int len = r.end > r.begin ? r.end - r.begin : 0;
  const int short_splits = min(kDecodeShortSplits, (len + kDecodeShortSplitKeys - 1) / kDecodeShortSplitKeys);
  const int by_size = max(short_splits, (len + kDecodeMinSplitKeys - 1) / kDecodeMinSplitKeys);
  r.splits = max(1, min(num_splits, by_size));
  r.chunk = ((len + r.splits - 1) / r.splits + 15) & ~15;
  // Rounding the chunk up to 16 keys can leave the last splits empty (32768 keys over 66 splits:
  // 64 chunks of 512): count only the non-empty ones, so no CTA runs for nothing.
  if (len > 0) r.splits = (len + r.chunk - 1) / r.chunk;
  return r;
}

template <typename QT, bool kFp8, int D>
struct DecodeConfig {
  // MMA operand type: FP16 for FP8 caches (exact widening) and FP16 models, else BF16.
  using MT = std::conditional_t<kFp8 || std::is_same_v<QT, __half>, __half, __nv_bfloat16>;
  static constexpr int kElem = kFp8 ? 1 : 2;  // cache bytes per element
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 8;
  static constexpr int kRowBytes = D * kElem;
  // One stage = kStageBytes of K (and of V) per warp: enough bytes in flight, bounded registers.
  static constexpr int kStageBytes = FIREATTN_DECODE_STAGE_BYTES;
  static constexpr int kStageKeys = (kStageBytes / kRowBytes) < 16 ? 16 : kStageBytes / kRowBytes;
  static constexpr int kSubs = kStageKeys / 16;  // 16-key sub-tiles per stage
  static constexpr int kKSteps = D / 16;         // QK^T k-steps (head dim)
  static constexpr int kMTiles = D / 16;         // PV m-tiles (head dim)
  // K: a lane holds rows g and g+8 of a sub-tile, kKChunks 16-byte chunks of each.
  static constexpr int kKChunks = kRowBytes / 64;
  static constexpr int kKWords = kKChunks * 4;
  static constexpr int kPairsPerChunk = 8 / kElem;  // 16-bit pairs per chunk once widened
  // V: a lane holds keys 2t, 2t+1, 2t+8, 2t+9 of a sub-tile, D/8 dims (kVBytes) of each.
  static constexpr int kVBytes = kRowBytes / 8;
  static constexpr int kVWords = kVBytes / 4;
  // CTAs per SM the register cap (__launch_bounds__) guarantees; the scheduler asks the runtime
  // for the actual occupancy (fireattn::decode_ctas_per_sm) and plans one wave. 16-bit caches at
  // head_dim 128 take 3: capped at 4 (128 registers) ptxas spilled 124 bytes, and the kernel ran
  // 14-16% slower (H200, one call, BF16 cache, tools/decode_latency.py, us: 1 x 128k 143.9 vs
  // 172.1, 8 x 32k 281.7 vs 327.7, 8 x 8k 79.0 vs 90.5). FP8 caches with 3 instead of 4 (more
  // registers, or 4 KB stages) were level or up to 5% slower at head_dim 64 / 128.
  static constexpr int kMinBlocks = D == 256 ? (kFp8 ? FIREATTN_DECODE_MIN_BLOCKS_D256_FP8 : 2)
                                             : (kFp8 || D == 64 ? FIREATTN_DECODE_MIN_BLOCKS : 3);
  // Per head dim, as measured (H200, one call each, us; tools/decode_latency.py): V widened by
  // cvt at head_dim 64 only (7-9% faster there; head_dim 256 up to 7% slower at 32k). Load
  // addresses with the compile-time row size (immediate offsets, ~50 fewer loop instructions)
  // at head_dim 64 / 128; head_dim 256 keeps the runtime row stride (3-4% slower at 8 x 32k
  // and 1 x 128k with immediates). This combination vs the previous kernel: head_dim 64 5-8%
  // faster at batch >= 8 and 1 x 128k, head_dim 128 1.5-3% faster, head_dim 256 unchanged.
  // Widening every other V tile by cvt (pipe balancing) was no faster at 128 and slower at 256.
  static constexpr bool kVCvt = D == 64;
  // Block-table entries one warp iteration ahead: where a stage spans two sub-tiles (FP8 at
  // head_dim 64), 5-9% faster at batch >= 8 and 1 x 128k; at one sub-tile per stage (every other
  // config) level to 4% slower (H200, tools/decode_latency.py, one call, us, ahead / in line: D64
  // 1 x 128k 43.4 / 46.2, 8 x 32k 77.8 / 83.4, 64 x 4k 72.0 / 78.9; D128 8 x 32k 144.1 / 142.4;
  // D256 64 x 4k 174.1 / 167.0).
  static constexpr bool kBtAhead = FIREATTN_DECODE_BT_AHEAD && kSubs > 1;
  static constexpr int kL2Prefetch = kFp8 ? FIREATTN_DECODE_L2_PREFETCH : FIREATTN_DECODE_L2_PREFETCH_16BIT;
  static constexpr bool kImmRows = D < 256;
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64");
  static_assert(kVBytes % 8 == 0, "V loads are 8 or 16 bytes wide");
};

// ---- PTX helpers -------------------------------------------------------------------------

// Streaming loads of the cache (read once): no L1 allocation, an L2 prefetch hint of kHint
// bytes (256, 128, or 0 = none; DecodeConfig::kL2Prefetch).
#define FIREATTN_LD16(hint)                                                                          \
  asm volatile("ld.global.nc.L1::no_allocate" hint ".v4.u32 {%0,%1,%2,%3}, [%4];"                    \
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p))
#define FIREATTN_LD8(hint) \
  asm volatile("ld.global.nc.L1::no_allocate" hint ".v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p))
template <int kHint>
__device__ __forceinline__ uint4 ld_stream16(const uint8_t* p) {
  static_assert(kHint == 256 || kHint == 128 || kHint == 0, "L2 prefetch hint: 256, 128 or 0 bytes");
  uint4 r;
  if constexpr (kHint == 256) FIREATTN_LD16(".L2::256B");
  else if constexpr (kHint == 128) FIREATTN_LD16(".L2::128B");
  else FIREATTN_LD16("");
  return r;
}

template <int kHint>
__device__ __forceinline__ uint2 ld_stream8(const uint8_t* p) {
  static_assert(kHint == 256 || kHint == 128 || kHint == 0, "L2 prefetch hint: 256, 128 or 0 bytes");
  uint2 r;
  if constexpr (kHint == 256) FIREATTN_LD8(".L2::256B");
  else if constexpr (kHint == 128) FIREATTN_LD8(".L2::128B");
  else FIREATTN_LD8("");
  return r;
}
#undef FIREATTN_LD16
#undef FIREATTN_LD8

// Programmatic dependent launch (common/pdl.cuh): the host launches the split kernel and the
// combine as dependents of the kernel before each, and both call pdl_wait() before their first
// global-memory read, so nothing they read can be stale whatever ran before
// (tests/test_decode.py captures a cache write + decode step in a CUDA graph: without the wait
// the decode misses the token just written). fireattn.cache_write calls pdl_launch_dependents()
// at its start, as a decode step's KV write precedes its decode. H200, CUDA graph of 8 layers of
// (cache write + decode), batch 1, FP8 cache, us per layer, PDL / plain launches, same call:
// head_dim 128 1k 10.96 / 12.34, 4k 14.02 / 15.14, 32k 28.58 / 30.02; head_dim 64 8k 13.13 /
// 14.45; head_dim 256 1k 14.60 / 15.60, 8k 23.70 / 24.98 (BF16 caches alike); batch 8 x 4k
// decode alone 28.19 / 28.62. FIREATTN_DECODE_PDL=0 launches both kernels the ordinary way.

__device__ __forceinline__ void unpack4(uint32_t* words, uint4 x) {
  words[0] = x.x;
  words[1] = x.y;
  words[2] = x.z;
  words[3] = x.w;
}

template <typename MT>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<MT, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// 2^x on the special-function unit (2 ulp; -inf -> 0), as flash attention kernels use it.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Transposes an 8x8 16-bit matrix held one row-pair per lane (the MMA fragment layout).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// Four e4m3 bytes -> two FP16x2 (bytes 0,1 and bytes 2,3), exactly (conversion pipe).
__device__ __forceinline__ void e4m3x4_to_f16x2x2(uint32_t x, uint32_t& lo, uint32_t& hi) {
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
}

// Byte `kByte` of a and of b -> FP16x2 {a's, b's}, the V^T operand pair (the byte permute that
// gathers them also transposes V). kCvt: exactly, by cvt.f16x2.e4m3x2 (2 instructions, one on
// the conversion pipe). Else equal to the e4m3 values times 2^-8, on the integer pipes alone (4
// instructions): an e4m3 byte s.eeee.mmm placed at bits 15..8 becomes the FP16
// s.0eeee.mmm0000000 by one shift (subnormals included).
template <int kByte, bool kCvt>
__device__ __forceinline__ uint32_t e4m3_pair_to_f16x2(uint32_t a, uint32_t b) {
  if constexpr (kCvt) {
    const uint32_t y = __byte_perm(a, b, kByte | ((4 + kByte) << 4));  // {a's byte, b's byte} in the low half
    uint32_t r;
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %1;\ncvt.rn.f16x2.e4m3x2 %0, l;\n}" : "=r"(r) : "r"(y));
    return r;
  }
  constexpr uint32_t kSel = kByte | (kByte << 4) | ((4 + kByte) << 8) | ((4 + kByte) << 12);
  const uint32_t y = __byte_perm(a, b, kSel);  // bytes 1 and 3 matter; 0 and 2 are masked off
  return (y & 0x80008000u) | ((y >> 1) & 0x3F803F80u);
}

template <typename MT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<MT, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename QT>
__device__ __forceinline__ float load_float(const QT* p) {
  if constexpr (std::is_same_v<QT, __half>) {
    return __half2float(*p);
  } else {
    return __bfloat162float(*p);
  }
}

template <typename QT>
__device__ __forceinline__ QT store_type(float x) {
  if constexpr (std::is_same_v<QT, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Physical head-dim index of 16-bit pair j (of D/8) held by quad lane t in the QK^T operands:
// lane t loads 16-byte chunks t, t+4, t+8, ... of a key row, and its pairs are taken in order.
template <typename Cfg>
__device__ __forceinline__ int qk_pair_dim(int t, int j) {
  return (t + 4 * (j / Cfg::kPairsPerChunk)) * (2 * Cfg::kPairsPerChunk) + 2 * (j % Cfg::kPairsPerChunk);
}

// ---- the split-KV kernel -----------------------------------------------------------------

template <typename QT, bool kFp8, int D>
__global__ void __launch_bounds__(DecodeConfig<QT, kFp8, D>::kThreads, DecodeConfig<QT, kFp8, D>::kMinBlocks)
    decode_kernel(const DecodeParams dp) {
  using Cfg = DecodeConfig<QT, kFp8, D>;
  using MT = typename Cfg::MT;
  constexpr int kRows = Cfg::kRows, kSubs = Cfg::kSubs, kStageKeys = Cfg::kStageKeys;
  const AttentionParams& p = dp.a;

  // Split index slowest in launch order: every sequence's first splits are dispatched before any
  // CTA past a short sequence's split count, which exits after reading seq_len (a global-memory
  // round trip holding an SM slot) and would otherwise queue in front of real work. H200, batch
  // 1, CUDA graph of 16 layers, us per layer, FP8 cache: head_dim 128 1k / 4k 10.65 / 17.36 vs
  // 12.61 / 18.94 with the split index fastest, head_dim 64 9.08 / 13.81 vs 10.30 / 15.00; BF16
  // cache head_dim 128 1k 11.83 vs 15.41; batch 8 unchanged.
  const int seq = blockIdx.y, split = blockIdx.z;
  const int kvh = blockIdx.x / dp.row_tiles, rt = blockIdx.x % dp.row_tiles;
  pdl_wait();
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int seq_len = p.seq_lens[seq];
  const int rows_total = q_len * dp.group;
  if (rt * kRows >= rows_total) return;  // padded rows or a short spec-verify row
  const SplitRange range = decode_split_range(seq_len, q_len, p.window_left, dp.num_splits);
  if (split >= range.splits) return;
  const int k_begin = range.begin + split * range.chunk;
  const int k_end = min(range.end, k_begin + range.chunk);
  const int num_stages = k_end > k_begin ? (k_end - k_begin + kStageKeys - 1) / kStageKeys : 0;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  __shared__ __align__(16) uint32_t q_frag[Cfg::kKSteps][32][2];
  __shared__ float row_mult[kRows];
  __shared__ __align__(16) float merge_o[Cfg::kWarps][kRows][D];
  __shared__ float merge_m[Cfg::kWarps][kRows], merge_l[Cfg::kWarps][kRows];

  // ---- Q: 8 rows to 16-bit MMA fragments in shared memory (per-row power-of-two prescale) ----
  const float k_scale = kFp8 ? p.k_scale[kvh * p.k_scale_stride] : 1.f;
  // FP8 V widened on the integer pipes is value * 2^-8 (e4m3_pair_to_f16x2); the output scale undoes it.
  const float v_scale = kFp8 ? p.v_scale[kvh * p.v_scale_stride] * (Cfg::kVCvt ? 1.f : 256.f) : 1.f;
  auto row_q = [&](int r) -> const QT* {
    const int row = rt * kRows + r;
    const int token = q_begin + row / dp.group, head = kvh * dp.group + row % dp.group;
    return static_cast<const QT*>(p.q) + token * p.q_tok_stride + head * p.q_head_stride;
  };
  for (int r = warp; r < kRows; r += Cfg::kWarps) {
    float amax = 0.f;
    if (rt * kRows + r < rows_total) {
      const QT* q = row_q(r);
      for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(load_float(q + d)));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) {
      // FP16 MMA: bring the row's max into [2^14, 2^15) by a power of two (exact for BF16 input).
      float mult = 1.f;
      if (std::is_same_v<MT, __half> && amax > 0.f && isfinite(amax)) mult = exp2f(static_cast<float>(14 - ilogbf(amax)));
      row_mult[r] = mult;
    }
  }
  __syncthreads();
  for (int e = tid; e < Cfg::kKSteps * 32; e += Cfg::kThreads) {
    const int ks = e / 32, ln = e % 32, fg = ln / 4, ft = ln % 4;
    uint32_t regs[2] = {0u, 0u};
    if (rt * kRows + fg < rows_total) {
      const QT* q = row_q(fg);
      const float mult = row_mult[fg];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int d = qk_pair_dim<Cfg>(ft, 2 * ks + h);
        regs[h] = pack2<MT>(load_float(q + d) * mult, load_float(q + d + 1) * mult);
      }
    }
    q_frag[ks][ln][0] = regs[0];
    q_frag[ks][ln][1] = regs[1];
  }
  __syncthreads();

  // ---- per-lane score scale and visible-key window for its two rows (columns 2t, 2t+1) ----
  constexpr float kLog2e = 1.4426950408889634f;
  float score_mult[2];
  int key_lo[2], key_hi[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int r = 2 * t + c, row = rt * kRows + r;
    const float base = p.softmax_scale * k_scale / row_mult[r];
    score_mult[c] = p.softcap > 0.f ? base / p.softcap : base * kLog2e;
    if (row < rows_total) {
      const int pos = seq_len - q_len + row / dp.group;  // bottom-right aligned
      key_hi[c] = p.causal ? min(k_end, pos + 1) : k_end;
      key_lo[c] = p.window_left >= 0 ? max(k_begin, pos - p.window_left) : k_begin;
    } else {  // a padding row: never written, so it may see everything (keeps interior stages mask-free)
      key_lo[c] = k_begin;
      key_hi[c] = k_end;
    }
  }
  // Stages inside [mask_lo, mask_hi) need no per-key masks (warp-uniform bounds).
  int mask_lo = max(key_lo[0], key_lo[1]), mask_hi = min(key_hi[0], key_hi[1]);
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    mask_lo = max(mask_lo, __shfl_xor_sync(0xffffffffu, mask_lo, o));
    mask_hi = min(mask_hi, __shfl_xor_sync(0xffffffffu, mask_hi, o));
  }
  const float softcap_log2 = p.softcap * kLog2e;

  // ---- stream the stages of this warp; K and V of the next stage load during this one ----
  const PagedKV& kv = p.kv;
  const int64_t bt_row = static_cast<int64_t>(seq) * kv.block_table_stride;
  const uint8_t* kv_head_base = kv.base + kvh * kv.head_stride;
  // Rows are kRowBytes apart (check_kv_cache requires compact inner dims); kImmRows makes that a
  // compile-time constant, so each load's offset past the per-lane base is an immediate.
  const int64_t row_stride = Cfg::kImmRows ? int64_t{Cfg::kRowBytes} : kv.token_stride;
  // kBtAhead: block-table entries are read one warp iteration before the K loads that need them
  // (read in line, each stage's K loads wait a global-memory round trip for their addresses).
  auto block_entry = [&](int key0) -> int {
    return kv.block_table[bt_row + (dp.block_shift >= 0 ? key0 >> dp.block_shift : key0 / kv.block_size)];
  };
  int blk_next[kSubs];  // kBtAhead: entries of the stage whose K loads issue next
  auto load_entries = [&](int stage) {
    if constexpr (Cfg::kBtAhead) {
#pragma unroll
      for (int u = 0; u < kSubs; ++u) {
        const int key0 = k_begin + stage * kStageKeys + u * 16;
        if (key0 < k_end) blk_next[u] = block_entry(key0);
      }
    }
  };
  auto sub_base = [&](int key0, int block) -> const uint8_t* {  // key0: first key of a 16-key sub-tile
    const int off = dp.block_shift >= 0 ? key0 & (kv.block_size - 1) : key0 % kv.block_size;
    return kv_head_base + static_cast<int64_t>(block) * kv.block_stride + off * row_stride;
  };

  uint32_t kraw[kSubs][2][Cfg::kKWords];
  uint32_t vraw[kSubs][4][Cfg::kVWords];
  float o_acc[Cfg::kMTiles][4];
#pragma unroll
  for (int j = 0; j < Cfg::kMTiles; ++j) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.f, 0.f};

  const uint8_t* sub_ptr[kSubs];  // K sub-tiles of the stage being loaded; V is kv_stride further
  auto load_k = [&](int stage) {
#pragma unroll
    for (int u = 0; u < kSubs; ++u) {
      const int key0 = k_begin + stage * kStageKeys + u * 16;
      if (key0 < k_end) {
        const uint8_t* base = sub_base(key0, Cfg::kBtAhead ? blk_next[u] : block_entry(key0));
        sub_ptr[u] = base;
        const uint8_t* lane_base = base + g * row_stride + t * 16;  // K row g, chunk t
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int c = 0; c < Cfg::kKChunks; ++c) {
            unpack4(&kraw[u][h][4 * c], ld_stream16<Cfg::kL2Prefetch>(lane_base + 8 * h * row_stride + 64 * c));
          }
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int w = 0; w < Cfg::kKWords; ++w) kraw[u][h][w] = 0u;
      }
    }
  };
  auto load_v = [&](int stage) {
#pragma unroll
    for (int u = 0; u < kSubs; ++u) {
      const int key0 = k_begin + stage * kStageKeys + u * 16;
      if (key0 < k_end) {
        const uint8_t* base = sub_ptr[u] + kv.kv_stride + 2 * t * row_stride + g * Cfg::kVBytes;  // V key 2t
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {  // keys 2t + (kk & 1) + 8 (kk >> 1)
          const uint8_t* src = base + ((kk & 1) + 8 * (kk >> 1)) * row_stride;
          if constexpr (Cfg::kVBytes == 8) {
            const uint2 x = ld_stream8<Cfg::kL2Prefetch>(src);
            vraw[u][kk][0] = x.x;
            vraw[u][kk][1] = x.y;
          } else {
#pragma unroll
            for (int c = 0; c < Cfg::kVBytes / 16; ++c) {
              unpack4(&vraw[u][kk][4 * c], ld_stream16<Cfg::kL2Prefetch>(src + 16 * c));
            }
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int w = 0; w < Cfg::kVWords; ++w) vraw[u][kk][w] = 0u;
      }
    }
  };

  int stage = warp;
  if (stage < num_stages) {
    load_entries(stage);
    load_k(stage);
    load_v(stage);
    load_entries(stage + Cfg::kWarps);
  }
  for (; stage < num_stages; stage += Cfg::kWarps) {
    const int stage_key0 = k_begin + stage * kStageKeys;

    // S^T = K . Q^T for each 16-key sub-tile; lane holds keys g, g+8 x rows 2t, 2t+1.
    float s[kSubs][4];
#pragma unroll
    for (int u = 0; u < kSubs; ++u) {
      s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
        const uint2 b = *reinterpret_cast<const uint2*>(q_frag[ks][lane]);
        uint32_t a0, a1, a2, a3;  // (row g, pairs 2ks / 2ks+1), (row g+8, ...)
        if constexpr (kFp8) {
          e4m3x4_to_f16x2x2(kraw[u][0][ks], a0, a2);
          e4m3x4_to_f16x2x2(kraw[u][1][ks], a1, a3);
        } else {
          a0 = kraw[u][0][2 * ks], a2 = kraw[u][0][2 * ks + 1];
          a1 = kraw[u][1][2 * ks], a3 = kraw[u][1][2 * ks + 1];
        }
        mma_16816<MT>(s[u], a0, a1, a2, a3, b.x, b.y);
      }
    }
    if (stage + Cfg::kWarps < num_stages) {
      load_k(stage + Cfg::kWarps);
      load_entries(stage + 2 * Cfg::kWarps);
    }

    // Scale (log2 domain), soft cap, mask (boundary stages only); the stage max per row.
    const bool boundary = stage_key0 < mask_lo || stage_key0 + kStageKeys > mask_hi;
    float smax[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
    for (int u = 0; u < kSubs; ++u) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = e & 1, key = stage_key0 + u * 16 + g + 8 * (e >> 1);
        float x = s[u][e] * score_mult[c];
        if (p.softcap > 0.f) x = softcap_log2 * tanhf(x);
        if (boundary) x = (key >= key_lo[c] && key < key_hi[c]) ? x : -CUDART_INF_F;
        s[u][e] = x;
        smax[c] = fmaxf(smax[c], x);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) smax[c] = fmaxf(smax[c], __shfl_xor_sync(0xffffffffu, smax[c], o));
      const float m_new = fmaxf(m_run[c], smax[c]);
      m_use[c] = m_new == -CUDART_INF_F ? 0.f : m_new;
      alpha[c] = fast_exp2(m_run[c] - m_use[c]);
      m_run[c] = m_new;
      l_run[c] *= alpha[c];
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < Cfg::kMTiles; ++j) {
        o_acc[j][0] *= alpha[0];
        o_acc[j][1] *= alpha[1];
        o_acc[j][2] *= alpha[0];
        o_acc[j][3] *= alpha[1];
      }
    }

    // P, then O^T += V^T . P^T per sub-tile.
#pragma unroll
    for (int u = 0; u < kSubs; ++u) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[e] = fast_exp2(s[u][e] - m_use[e & 1]);
        l_run[e & 1] += pr[e];
      }
      const uint32_t b0 = movmatrix_trans(pack2<MT>(pr[0], pr[1]));
      const uint32_t b1 = movmatrix_trans(pack2<MT>(pr[2], pr[3]));
      // Keys past the split's end may hold garbage (NaN bytes); P is 0 there but 0 * NaN is not.
      const int key0 = stage_key0 + u * 16;
      if (key0 + 16 > k_end) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (key0 + 2 * t + (kk & 1) + 8 * (kk >> 1) >= k_end) {
#pragma unroll
            for (int w = 0; w < Cfg::kVWords; ++w) vraw[u][kk][w] = 0u;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < Cfg::kMTiles; ++j) {
        // A = V^T: (dim 2j | 2j+1) x (keys 2t, 2t+1 | 2t+8, 2t+9), as FP16/BF16 pairs.
        uint32_t a0, a1, a2, a3;
        if constexpr (kFp8) {
          const int w = j / 2;
          if (j % 2 == 0) {
            a0 = e4m3_pair_to_f16x2<0, Cfg::kVCvt>(vraw[u][0][w], vraw[u][1][w]);
            a1 = e4m3_pair_to_f16x2<1, Cfg::kVCvt>(vraw[u][0][w], vraw[u][1][w]);
            a2 = e4m3_pair_to_f16x2<0, Cfg::kVCvt>(vraw[u][2][w], vraw[u][3][w]);
            a3 = e4m3_pair_to_f16x2<1, Cfg::kVCvt>(vraw[u][2][w], vraw[u][3][w]);
          } else {
            a0 = e4m3_pair_to_f16x2<2, Cfg::kVCvt>(vraw[u][0][w], vraw[u][1][w]);
            a1 = e4m3_pair_to_f16x2<3, Cfg::kVCvt>(vraw[u][0][w], vraw[u][1][w]);
            a2 = e4m3_pair_to_f16x2<2, Cfg::kVCvt>(vraw[u][2][w], vraw[u][3][w]);
            a3 = e4m3_pair_to_f16x2<3, Cfg::kVCvt>(vraw[u][2][w], vraw[u][3][w]);
          }
        } else {
          const uint32_t v0 = vraw[u][0][j], v1 = vraw[u][1][j], v2 = vraw[u][2][j], v3 = vraw[u][3][j];
          a0 = __byte_perm(v0, v1, 0x5410), a1 = __byte_perm(v0, v1, 0x7632);
          a2 = __byte_perm(v2, v3, 0x5410), a3 = __byte_perm(v2, v3, 0x7632);
        }
        mma_16816<MT>(o_acc[j], a0, a1, a2, a3, b0, b1);
      }
    }
    if (stage + Cfg::kWarps < num_stages) load_v(stage + Cfg::kWarps);
  }

  // The combine may be scheduled now (it waits for this grid's end before reading): triggered at
  // the kernel's start instead, its waiting CTAs cost up to 9% (head_dim 64, 1 x 8k).
  pdl_launch_dependents();
  // ---- merge the 4 warps ----
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) l_run[c] += __shfl_xor_sync(0xffffffffu, l_run[c], o);
  }
  if (g == 0) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      merge_m[warp][2 * t + c] = m_run[c];
      merge_l[warp][2 * t + c] = l_run[c];
    }
  }
#pragma unroll
  for (int j = 0; j < Cfg::kMTiles; ++j) {
    const int d = g * (D / 8) + 2 * j;
    merge_o[warp][2 * t][d] = o_acc[j][0];
    merge_o[warp][2 * t + 1][d] = o_acc[j][1];
    merge_o[warp][2 * t][d + 1] = o_acc[j][2];
    merge_o[warp][2 * t + 1][d + 1] = o_acc[j][3];
  }
  __syncthreads();

  // Thread -> (row r, D/16 contiguous dims).
  constexpr int kDimsPerThread = D / 16;
  const int r = tid / 16, d0 = (tid % 16) * kDimsPerThread;
  const int row = rt * kRows + r;
  if (row >= rows_total) return;
  float m_tot = -CUDART_INF_F;
#pragma unroll
  for (int w = 0; w < Cfg::kWarps; ++w) m_tot = fmaxf(m_tot, merge_m[w][r]);
  float wscale[Cfg::kWarps], l_tot = 0.f;
#pragma unroll
  for (int w = 0; w < Cfg::kWarps; ++w) {
    wscale[w] = m_tot == -CUDART_INF_F ? 0.f : exp2f(merge_m[w][r] - m_tot);
    l_tot += wscale[w] * merge_l[w][r];
  }
  float o[kDimsPerThread];
#pragma unroll
  for (int i = 0; i < kDimsPerThread; ++i) {
    float x = 0.f;
#pragma unroll
    for (int w = 0; w < Cfg::kWarps; ++w) x += wscale[w] * merge_o[w][r][d0 + i];
    o[i] = x;
  }

  if (range.splits == 1) {
    const int token = q_begin + row / dp.group, head = kvh * dp.group + row % dp.group;
    const float sink = p.sinks ? p.sinks[head] * kLog2e : -CUDART_INF_F;
    const float m_fin = fmaxf(m_tot, sink);
    float denom = 0.f, o_mult = 0.f;
    if (m_fin != -CUDART_INF_F) {
      const float a = l_tot > 0.f ? exp2f(m_tot - m_fin) : 0.f;
      denom = l_tot * a + (p.sinks ? exp2f(sink - m_fin) : 0.f);
      o_mult = denom > 0.f ? a * v_scale / denom : 0.f;
    }
    QT* dst = static_cast<QT*>(p.out) + token * p.o_tok_stride + head * p.o_head_stride + d0;
#pragma unroll
    for (int i = 0; i < kDimsPerThread; ++i) dst[i] = store_type<QT>(o[i] * o_mult);
    if (p.lse != nullptr && (tid % 16) == 0)
      p.lse[head * p.lse_head_stride + token] = denom > 0.f ? (m_fin + log2f(denom)) / kLog2e : -CUDART_INF_F;
  } else {
    const int64_t slot = ((static_cast<int64_t>(seq) * p.num_kv_heads + kvh) * dp.row_tiles + rt) * dp.num_splits + split;
    float* dst = dp.part_out + (slot * kRows + r) * D + d0;
    const float o_mult = l_tot > 0.f ? v_scale / l_tot : 0.f;
#pragma unroll
    for (int i = 0; i < kDimsPerThread; ++i) dst[i] = o[i] * o_mult;
    if ((tid % 16) == 0) dp.part_lse[slot * kRows + r] = l_tot > 0.f ? m_tot + log2f(l_tot) : -CUDART_INF_F;
  }
}

// kN consecutive floats of a split partial (8-byte aligned at least: lane * kN floats).
template <int kN>
__device__ __forceinline__ void load_floats(float (&dst)[kN], const float* src) {
  static_assert(kN % 2 == 0, "pairs");
  if constexpr (kN % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kN / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      dst[4 * i] = v.x, dst[4 * i + 1] = v.y, dst[4 * i + 2] = v.z, dst[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      const float2 v = reinterpret_cast<const float2*>(src)[i];
      dst[2 * i] = v.x, dst[2 * i + 1] = v.y;
    }
  }
}

// Merges the splits of every sequence that has more than one. One CTA per row; its 8 warps
// take every 8th split each and add their partial sums through shared memory. Every warp reads
// all the splits' LSEs side by side (one per lane: one round trip) for the max and the
// denominator, and its partial outputs in one batch of up to 8 whose loads do not wait on each
// other. The previous combine (one warp per row, a loop of dependent load -> use steps over the
// splits) was two chains of `splits` cache round trips: ncu, batch 1, 64 splits at head_dim 64:
// 18.6 us against 18.3 us for the split kernel itself.
constexpr int kCombineWarps = 8, kCombineBatch = 8;
template <typename QT, int D>
__global__ void __launch_bounds__(kCombineWarps * 32) decode_combine_kernel(const DecodeParams dp) {
  const AttentionParams& p = dp.a;
  constexpr int kLseRegs = kDecodeMaxSplits / 32;
  constexpr int kPerLane = D / 32;
  __shared__ float weight[kCombineWarps][kDecodeMaxSplits];
  __shared__ __align__(16) float partial[kCombineWarps][D];
  const int seq = blockIdx.z, kvh = blockIdx.y, row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  pdl_wait();  // the split kernel's partials
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  if (row >= q_len * dp.group) return;  // the whole CTA
  const SplitRange range = decode_split_range(p.seq_lens[seq], q_len, p.window_left, dp.num_splits);
  const int ns = range.splits;
  if (ns == 1) return;  // the split kernel wrote the output itself
  constexpr float kLog2e = 1.4426950408889634f;
  const int token = q_begin + row / dp.group, head = kvh * dp.group + row % dp.group;
  const int rt = row / 8, r = row % 8;  // the split kernel's 8-row tile and row inside it
  const int64_t slot0 = ((static_cast<int64_t>(seq) * p.num_kv_heads + kvh) * dp.row_tiles + rt) * dp.num_splits;
  float lse[kLseRegs];
  float m = -CUDART_INF_F;
#pragma unroll
  for (int i = 0; i < kLseRegs; ++i) {
    const int s = 32 * i + lane;
    lse[i] = s < ns ? dp.part_lse[(slot0 + s) * 8 + r] : -CUDART_INF_F;
    m = fmaxf(m, lse[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (p.sinks) m = fmaxf(m, p.sinks[head] * kLog2e);
  float denom = 0.f;
#pragma unroll
  for (int i = 0; i < kLseRegs; ++i) {
    const float w = m == -CUDART_INF_F ? 0.f : exp2f(lse[i] - m);  // 0 for splits past ns
    denom += w;
    if (32 * i < ns) weight[warp][32 * i + lane] = w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) denom += __shfl_xor_sync(0xffffffffu, denom, o);
  if (p.sinks && m != -CUDART_INF_F) denom += exp2f(p.sinks[head] * kLog2e - m);
  __syncwarp();
  float acc[kPerLane] = {};
  const float* src0 = dp.part_out + (slot0 * 8 + r) * D + lane * kPerLane;
  for (int s0 = warp; s0 < ns; s0 += kCombineWarps * kCombineBatch) {
    float v[kCombineBatch][kPerLane];
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u)  // past ns: re-read split s0, weighted 0
      load_floats(v[u], src0 + static_cast<int64_t>(s0 + kCombineWarps * u < ns ? s0 + kCombineWarps * u : s0) * 8 * D);
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u) {
      const int s = s0 + kCombineWarps * u;
      const float w = s < ns ? weight[warp][s] : 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += w * v[u][i];
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) partial[warp][lane * kPerLane + i] = acc[i];
  __syncthreads();
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  QT* dst = static_cast<QT*>(p.out) + token * p.o_tok_stride + head * p.o_head_stride;
  for (int d = threadIdx.x; d < D; d += kCombineWarps * 32) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) o += partial[w][d];
    dst[d] = store_type<QT>(o * inv);
  }
  if (p.lse != nullptr && threadIdx.x == 0)
    p.lse[head * p.lse_head_stride + token] = denom > 0.f ? (m + log2f(denom)) / kLog2e : -CUDART_INF_F;
}

template <typename QT, bool kFp8, int D>
int decode_ctas_per_sm() {
  int blocks = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_kernel<QT, kFp8, D>,
                                                DecodeConfig<QT, kFp8, D>::kThreads, 0);
  return blocks;
}

inline bool decode_pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FIREATTN_DECODE_PDL");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
}

template <typename Kernel>
void launch_pdl(Kernel kernel, dim3 grid, int threads, cudaStream_t stream, const DecodeParams& dp) {
  if (!decode_pdl_enabled()) {
    kernel<<<grid, threads, 0, stream>>>(dp);
    return;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, dp);
}

template <typename QT, bool kFp8, int D>
void launch_decode(const DecodeParams& dp, cudaStream_t stream) {
  using Cfg = DecodeConfig<QT, kFp8, D>;
  const dim3 grid(dp.row_tiles * dp.a.num_kv_heads, dp.a.num_seqs, dp.num_splits);  // split slowest
  launch_pdl(decode_kernel<QT, kFp8, D>, grid, Cfg::kThreads, stream, dp);
  if (dp.num_splits > 1) {
    const dim3 cgrid(dp.row_tiles * 8, dp.a.num_kv_heads, dp.a.num_seqs);  // one CTA per row
    launch_pdl(decode_combine_kernel<QT, D>, cgrid, kCombineWarps * 32, stream, dp);
  }
}

}  // namespace fireattn
