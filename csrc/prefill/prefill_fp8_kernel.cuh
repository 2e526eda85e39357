// Hopper (sm_90a) FP8 prefill: paged FP8 K/V, QK^T and PV on FP8 tensor cores (wgmma).
//
// Numerics (the reference's precision="fp8_mma", vllm_fireattn/reference/attention.py):
//   q8 = sat_rne(q / q_scale[h_kv])       in registers, once per CTA, into shared memory
//   s  = (q8 . k8) * q_scale * k_scale * softmax_scale   (FP32 wgmma accumulator)
//   p  = exp(s - m) (FP32 online softmax); l = sum p in FP32
//   p8 = sat_rne(p * 256)                 x256 keeps small weights out of e4m3's subnormals
//   O  = sum p8 . v8 on FP8 tensor cores, promoted into an FP32 register accumulator every
//        `promote_every` KV tiles (two-level accumulation; 0 = only at the end), because the
//        tensor-core accumulator keeps ~13 mantissa bits and long contexts would drift.
//   out = O * v_scale / (256 * l)
//
// Work split: one CTA (2 warpgroups, 128 rows) per (row tile, sequence, kv head). A row is a
// (query token, query head of this kv head's group) pair, so a GQA group shares every K/V
// byte. Each warpgroup owns 64 rows. All 8 warps load: K by cp.async into a swizzled
// K-major tile; V by cp.async into a staging tile, then transposed in registers into the
// K-major V^T tile FP8 wgmma needs (FP8 wgmma has no transposed-B mode). The transpose of
// tile t+1 runs while the PV wgmma of tile t is in flight.
//
// P goes to the PV wgmma straight from the QK accumulator registers: the FP8 A-fragment wants
// four consecutive k per register where the accumulator holds pairs, so instead of shuffling
// P between threads, V^T's key order inside each 32-key step is permuted to match (sum over
// keys does not care about their order).
#pragma once
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "common/attention_params.h"
#include "common/fp8.cuh"
#include "generated/wgmma_fp8.h"

namespace fireattn {

template <int D>
struct PrefillFp8Config {
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kBlockM = 128;   // rows per CTA, 64 per warpgroup
  // head_dim 256 takes 64-key tiles and 64-wide PV slices so that the 128-register output
  // accumulator, its promotion slice, S and P fit in one thread's 255 registers.
  static constexpr int kBlockN = D == 256 ? 64 : 128;
  static constexpr int kPvN = D == 256 ? 64 : D;  // output columns per PV wgmma
  static constexpr int kPvSlices = D / kPvN;
  static constexpr int kStages = 3;  // K / V staging ring depth (tiles in flight)
  static constexpr int kVPitch = D + 16;  // staging row pitch: +16 B spreads the transpose's reads over banks
  static constexpr int kQBytes = kBlockM * D;
  static constexpr int kKBytes = kBlockN * D;
  static constexpr int kVStageBytes = kBlockN * kVPitch;
  static constexpr int kVtBytes = D * kBlockN;
  static constexpr int kSmemBytes =
      1024 + kQBytes + kStages * kKBytes + kStages * ((kVStageBytes + 1023) / 1024 * 1024) + 2 * kVtBytes;
  static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVtBytes % 1024 == 0, "tiles must stay 1024-aligned");
};

// A K-major FP8 operand tile of R rows x KB bytes, as wgmma reads it: split into column chunks
// of CW = min(KB, 128) bytes, each an R x CW block with the CW-byte swizzle (128 or 64).
template <int R, int KB>
struct KMajorTile {
  static constexpr int CW = KB < 128 ? KB : 128;
  static_assert(CW == 128 || CW == 64, "row chunks are 64 or 128 bytes");
  static constexpr uint32_t kSwizzleMask = CW == 128 ? 0x70 : 0x30;
  static constexpr uint64_t kSwizzleMode = CW == 128 ? 1 : 2;  // descriptor bits 62-63

  // Byte offset of (row, byte) inside the tile; `byte` multiple of 4 (stays inside a 16 B unit).
  __device__ __forceinline__ static uint32_t offset(int row, int byte) {
    const uint32_t off = (byte / CW) * (R * CW) + row * CW + (byte % CW);
    return off ^ ((off >> 3) & kSwizzleMask);
  }
  // Descriptor of rows [row0, row0 + 64 or N) at k-step `kstep` (32 bytes each).
  __device__ __forceinline__ static uint64_t desc(uint32_t tile_smem, int row0, int kstep) {
    const uint32_t addr = tile_smem + (kstep * 32 / CW) * (R * CW) + row0 * CW + (kstep * 32) % CW;
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
           (static_cast<uint64_t>((8 * CW) >> 4) << 32) | (kSwizzleMode << 62);
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async) visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator reads/writes across wgmma issue and wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ uint32_t pack_e4m3x4(float lo0, float lo1, float hi0, float hi1) {
  uint16_t a, b;  // cvt puts its first source in the upper byte
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(a) : "f"(lo1), "f"(lo0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(b) : "f"(hi1), "f"(hi0));
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

template <typename QT>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename QT, int D>
__global__ void __launch_bounds__(256, 1) prefill_fp8_kernel(const AttentionParams p, const int promote_every) {
  using Cfg = PrefillFp8Config<D>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kPvN = Cfg::kPvN, kPvSlices = Cfg::kPvSlices;
  using QTile = KMajorTile<kBlockM, D>;
  using KTile = KMajorTile<kBlockN, D>;
  using VtTile = KMajorTile<D, kBlockN>;
  using QK = WgmmaFp8<kBlockN>;
  using PV = WgmmaFp8<kPvN>;
  constexpr int kSRegs = QK::kRegs;      // S accumulator: kBlockN / 2 floats per thread
  constexpr int kPvRegs = PV::kRegs;     // one PV slice
  constexpr int kPSteps = kBlockN / 32;  // PV k-steps; 4 A registers each

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* q_s = smem;
  uint8_t* k_s = q_s + Cfg::kQBytes;
  uint8_t* v_stage = k_s + kStages * Cfg::kKBytes;
  constexpr int kVStageAligned = (Cfg::kVStageBytes + 1023) / 1024 * 1024;
  uint8_t* vt_s = v_stage + kStages * kVStageAligned;

  // Heavy (late, causal) row tiles first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int seq = blockIdx.y, kv_head = blockIdx.z;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int seq_len = p.seq_lens[seq];
  const int num_rows = q_len * group;
  const int row0 = m_block * kBlockM;
  if (row0 >= num_rows) return;
  const int context = seq_len - q_len;

  const float q_scale = p.q_scale[kv_head * p.q_scale_stride];
  const float k_scale = p.k_scale[kv_head * p.k_scale_stride];
  const float v_scale = p.v_scale[kv_head * p.v_scale_stride];
  constexpr float kLog2e = 1.4426950408889634f;
  const float score_scale = p.softmax_scale * q_scale * k_scale;  // natural-log units

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = warp / 4;

  // Key range of this CTA's rows.
  const int last_row = min(row0 + kBlockM, num_rows) - 1;
  const int first_pos = context + row0 / group, last_pos = context + last_row / group;
  const int kv_end = p.causal ? min(seq_len, last_pos + 1) : seq_len;
  const int kv_begin = p.window_left >= 0 ? max(0, first_pos - p.window_left) : 0;
  const int tile0 = kv_begin / kBlockN * kBlockN;
  const int num_tiles = kv_end > tile0 ? (kv_end - tile0 + kBlockN - 1) / kBlockN : 0;

  // ---- Q: load, quantize in registers, store swizzled (16 elements per step).
  {
    constexpr int kPieces = D / 16;
    const QT* q = static_cast<const QT*>(p.q);
    for (int i = tid; i < kBlockM * kPieces; i += Cfg::kThreads) {
      const int r = i / kPieces, piece = i % kPieces;
      const int row = row0 + r;
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (row < num_rows) {
        const int tok = q_begin + row / group, head = kv_head * group + row % group;
        const uint4* src = reinterpret_cast<const uint4*>(q + tok * p.q_tok_stride + head * p.q_head_stride + piece * 16);
        uint4 raw[2] = {src[0], src[1]};
        const QT* h = reinterpret_cast<const QT*>(raw);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          w[j] = pack_e4m3x4(__fdiv_rn(to_float(h[4 * j]), q_scale), __fdiv_rn(to_float(h[4 * j + 1]), q_scale),
                             __fdiv_rn(to_float(h[4 * j + 2]), q_scale), __fdiv_rn(to_float(h[4 * j + 3]), q_scale));
      }
      *reinterpret_cast<uint4*>(q_s + QTile::offset(r, piece * 16)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }

  // ---- K/V tile loads (cp.async). A thread always copies the same (key, 16-byte part) slots.
  constexpr int kParts = D / 16;
  constexpr int kLoadIters = kBlockN * kParts / Cfg::kThreads;
  static_assert(kBlockN * kParts % Cfg::kThreads == 0, "whole load iterations");
  auto load_tile = [&](int t) {
    const int stage = t % kStages;
    const int k0 = tile0 + t * kBlockN;
    const uint32_t k_dst = smem_addr(k_s + stage * Cfg::kKBytes);
    const uint32_t v_dst = smem_addr(v_stage + stage * kVStageAligned);
#pragma unroll
    for (int i = 0; i < kLoadIters; ++i) {
      const int c = tid + i * Cfg::kThreads;
      const int key = c / kParts, part = c % kParts;
      const int token = k0 + key;
      const bool valid = token < kv_end;  // zero-fill past the end: V garbage must not reach PV
      const uint8_t* src = valid ? p.kv.key_ptr(seq, kv_head, token) + part * 16 : p.kv.base;
      cp_async16(k_dst + KTile::offset(key, part * 16), src, valid);
      cp_async16(v_dst + key * Cfg::kVPitch + part * 16, valid ? src + p.kv.kv_stride : src, valid);
    }
  };

  // ---- V staging [key][D] -> V^T tile [D][kBlockN] (K-major, keys permuted per 32-key step).
  // Word w of a V^T row holds k-positions 4w..4w+3; in the P fragment those are the keys
  // {2u, 2u+1, 2u+8, 2u+9} (+16 for the upper half) of the step, u = (w % 8) % 4.
  constexpr int kWords = kBlockN / 4;
  constexpr int kVtTasks = kWords * (D / 16);
  auto transpose_v = [&](int t) {
    const uint8_t* src = v_stage + (t % kStages) * kVStageAligned;
    uint8_t* dst = vt_s + (t % 2) * Cfg::kVtBytes;
    for (int task = tid; task < kVtTasks; task += Cfg::kThreads) {
      const int w = task % kWords, dg = task / kWords;
      const int step = w / 8, tt = w % 8, u = tt % 4;
      const int kbase = step * 32 + (tt >= 4 ? 16 : 0) + 2 * u;
      const uint4 r0 = *reinterpret_cast<const uint4*>(src + (kbase + 0) * Cfg::kVPitch + dg * 16);
      const uint4 r1 = *reinterpret_cast<const uint4*>(src + (kbase + 1) * Cfg::kVPitch + dg * 16);
      const uint4 r2 = *reinterpret_cast<const uint4*>(src + (kbase + 8) * Cfg::kVPitch + dg * 16);
      const uint4 r3 = *reinterpret_cast<const uint4*>(src + (kbase + 9) * Cfg::kVPitch + dg * 16);
      const uint32_t x0[4] = {r0.x, r0.y, r0.z, r0.w}, x1[4] = {r1.x, r1.y, r1.z, r1.w};
      const uint32_t x2[4] = {r2.x, r2.y, r2.z, r2.w}, x3[4] = {r3.x, r3.y, r3.z, r3.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // 4x4 byte transpose: dims 4j..4j+3 of the 4 keys
        const uint32_t t0 = prmt(x0[j], x1[j], 0x5140), t1 = prmt(x0[j], x1[j], 0x7362);
        const uint32_t t2 = prmt(x2[j], x3[j], 0x5140), t3 = prmt(x2[j], x3[j], 0x7362);
        const int d = dg * 16 + 4 * j;
        *reinterpret_cast<uint32_t*>(dst + VtTile::offset(d + 0, 4 * w)) = prmt(t0, t2, 0x5410);
        *reinterpret_cast<uint32_t*>(dst + VtTile::offset(d + 1, 4 * w)) = prmt(t0, t2, 0x7632);
        *reinterpret_cast<uint32_t*>(dst + VtTile::offset(d + 2, 4 * w)) = prmt(t1, t3, 0x5410);
        *reinterpret_cast<uint32_t*>(dst + VtTile::offset(d + 3, 4 * w)) = prmt(t1, t3, 0x7632);
      }
    }
  };

  // ---- This thread's two rows (accumulator rows g and g + 8 of its warp).
  const int g = lane / 4, tq = lane % 4;
  int pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = min(row0 + wg * 64 + (warp % 4) * 16 + g + 8 * h, num_rows - 1);  // pad rows: any valid pos
    pos[h] = context + row / group;
  }

  float o_main[kPvSlices][kPvRegs];
  float o_part[kPvRegs];  // tensor-core accumulator between promotions (head_dim <= 128)
#pragma unroll
  for (int s = 0; s < kPvSlices; ++s)
#pragma unroll
    for (int i = 0; i < kPvRegs; ++i) o_main[s][i] = 0.f;
#pragma unroll
  for (int i = 0; i < kPvRegs; ++i) o_part[i] = 0.f;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F};  // running max, log2 units
  float l[2] = {0.f, 0.f};                      // this thread's share of the row sums
  float part_alpha[2] = {1.f, 1.f};             // o_main's rescale owed since the last promotion
  bool part_empty = true;

  // ---- Prologue: first kStages - 1 tiles in flight, tile 0 transposed.
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < num_tiles) load_tile(t);
    cp_async_commit();
  }
  if (num_tiles > 0) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    transpose_v(0);
  }
  fence_proxy_async();  // Q, K tile 0 (cp.async) and V^T tile 0 -> visible to wgmma
  __syncthreads();

  const uint32_t q_smem = smem_addr(q_s);
  for (int t = 0; t < num_tiles; ++t) {
    if (t + kStages - 1 < num_tiles) load_tile(t + kStages - 1);
    cp_async_commit();
    const int k0 = tile0 + t * kBlockN;

    // S = Q K^T (64 rows x kBlockN keys per warpgroup).
    float s[kSRegs];
    {
      const uint32_t k_smem = smem_addr(k_s + (t % kStages) * Cfg::kKBytes);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 32; ++ks)
        QK::ss(s, QTile::desc(q_smem, wg * 64, ks), KTile::desc(k_smem, 0, ks), ks > 0 ? 1 : 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
    }

    // Online softmax in log2 units; masks only on tiles that cross an edge.
    const bool need_mask = k0 + kBlockN > kv_end || (p.causal && k0 + kBlockN - 1 > first_pos) ||
                           (p.window_left >= 0 && k0 < last_pos - p.window_left);
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int i = 0; i < kSRegs / 4; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[4 * i + 2 * h + e] * score_scale;
          if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
          x *= kLog2e;
          if (need_mask) {
            const int key = k0 + 8 * i + 2 * tq + e;
            bool visible = key < kv_end;
            if (p.causal) visible = visible && key <= pos[h];
            if (p.window_left >= 0) visible = visible && key >= pos[h] - p.window_left;
            x = visible ? x : -CUDART_INF_F;
          }
          s[4 * i + 2 * h + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;  // nothing visible yet: keep exps at 0
      alpha[h] = exp2f(m[h] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kSRegs / 4; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = exp2f(s[4 * i + 2 * h + e] - m_use);
          s[4 * i + 2 * h + e] = pr * 256.f;
          sum += pr;
        }
      l[h] = l[h] * alpha[h] + sum;
      m[h] = m_new;
    }

    // P -> e4m3 A fragments (see the header comment for the key order).
    uint32_t pa[kPSteps][4];
#pragma unroll
    for (int c = 0; c < kPSteps; ++c) {
      const float* x = s + 16 * c;
      pa[c][0] = pack_e4m3x4(x[0], x[1], x[4], x[5]);
      pa[c][1] = pack_e4m3x4(x[2], x[3], x[6], x[7]);
      pa[c][2] = pack_e4m3x4(x[8], x[9], x[12], x[13]);
      pa[c][3] = pack_e4m3x4(x[10], x[11], x[14], x[15]);
    }

    const uint32_t vt_smem = smem_addr(vt_s + (t % 2) * Cfg::kVtBytes);
    const bool last = t + 1 == num_tiles;
    if constexpr (kPvSlices == 1) {
      // o_part accumulates on the tensor cores; o_main gets it every promote_every tiles.
      if (!part_empty) {
#pragma unroll
        for (int i = 0; i < kPvRegs; ++i) o_part[i] *= alpha[(i / 2) % 2];
      }
      part_alpha[0] *= alpha[0];
      part_alpha[1] *= alpha[1];
      wgmma_fence();
      fence_regs(o_part);
#pragma unroll
      for (int c = 0; c < kPSteps; ++c) PV::rs(o_part, pa[c], VtTile::desc(vt_smem, 0, c), (c > 0 || !part_empty) ? 1 : 0);
      wgmma_commit();
      part_empty = false;
    }

    // Next tile's V^T, while the PV wgmma runs.
    if (t + 1 < num_tiles) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // every thread's copies of tile t + 1 have landed
      transpose_v(t + 1);
    }
    fence_proxy_async();

    if constexpr (kPvSlices == 1) {
      wgmma_wait<0>();
      fence_regs(o_part);
      if (last || (promote_every > 0 && (t + 1) % promote_every == 0)) {
#pragma unroll
        for (int i = 0; i < kPvRegs; ++i) o_main[0][i] = o_main[0][i] * part_alpha[(i / 2) % 2] + o_part[i];
        part_alpha[0] = part_alpha[1] = 1.f;
        part_empty = true;
      }
    } else {
      // head_dim 256: one 64-column slice at a time, promoted at once (or, with promote_every
      // 0, accumulated on the tensor cores in o_main itself).
#pragma unroll
      for (int sl = 0; sl < kPvSlices; ++sl) {
        if (promote_every == 0) {
#pragma unroll
          for (int i = 0; i < kPvRegs; ++i) o_main[sl][i] *= alpha[(i / 2) % 2];
          wgmma_fence();
          fence_regs(o_main[sl]);
#pragma unroll
          for (int c = 0; c < kPSteps; ++c) PV::rs(o_main[sl], pa[c], VtTile::desc(vt_smem, sl * kPvN, c), 1);
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(o_main[sl]);
        } else {
          wgmma_fence();
          fence_regs(o_part);
#pragma unroll
          for (int c = 0; c < kPSteps; ++c) PV::rs(o_part, pa[c], VtTile::desc(vt_smem, sl * kPvN, c), c > 0 ? 1 : 0);
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(o_part);
#pragma unroll
          for (int i = 0; i < kPvRegs; ++i) o_main[sl][i] = o_main[sl][i] * alpha[(i / 2) % 2] + o_part[i];
        }
      }
    }
    __syncthreads();  // V^T t + 1 complete; K stage t and V^T t free for reuse
  }
  cp_async_wait<0>();

  // ---- Epilogue: row sums across the quad, sinks, normalization, output and LSE.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lsum = l[h];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    const int row = row0 + wg * 64 + (warp % 4) * 16 + g + 8 * h;
    const int head = kv_head * group + row % group;
    float m_fin = m[h];
    float scale_out = 1.f;
    if (p.sinks != nullptr && row < num_rows) {
      const float sink = p.sinks[head] * kLog2e;
      const float m_new = fmaxf(m_fin, sink);
      scale_out = exp2f(m_fin - m_new);  // m_fin = -inf (no keys) gives 0
      lsum = lsum * scale_out + exp2f(sink - m_new);
      m_fin = m_new;
    }
    if (row >= num_rows) continue;
    const float inv = lsum > 0.f ? scale_out * v_scale / (256.f * lsum) : 0.f;
    const int tok = q_begin + row / group;
    QT* o = static_cast<QT*>(p.out) + tok * p.o_tok_stride + head * p.o_head_stride;
#pragma unroll
    for (int sl = 0; sl < kPvSlices; ++sl)
#pragma unroll
      for (int i = 0; i < kPvRegs / 4; ++i) {
        const int col = sl * kPvN + 8 * i + 2 * tq;
        *reinterpret_cast<uint32_t*>(o + col) =
            pack2<QT>(o_main[sl][4 * i + 2 * h] * inv, o_main[sl][4 * i + 2 * h + 1] * inv);
      }
    if (p.lse != nullptr && tq == 0)
      p.lse[head * p.lse_head_stride + tok] = lsum > 0.f ? (m_fin + log2f(lsum)) / kLog2e : -CUDART_INF_F;
  }
}

template <typename QT, int D>
void launch_prefill_fp8(const AttentionParams& p, int max_query_len, int promote_every, cudaStream_t stream) {
  using Cfg = PrefillFp8Config<D>;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int tiles = (max_query_len * group + Cfg::kBlockM - 1) / Cfg::kBlockM;
  if (tiles == 0 || p.num_seqs == 0) return;
  auto kernel = prefill_fp8_kernel<QT, D>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  const dim3 grid(tiles, p.num_seqs, p.num_kv_heads);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, promote_every);
}

}  // namespace fireattn
