// Hopper (sm_90a) prefill for every cache dtype, warp-specialized, QK^T and PV on tensor cores
// (wgmma): paged FP8 K/V with FP8 MMAs (kFp8), or paged BF16/FP16 K/V with 16-bit MMAs.
//
// Numerics, FP8 cache (the reference's precision="fp8_mma", vllm_fireattn/reference/attention.py):
//   q8 = sat_rne(q / q_scale[h_kv])       in registers, once per CTA, into shared memory
//   s  = (q8 . k8) * q_scale * k_scale * softmax_scale   (FP32 wgmma accumulator)
//   p  = exp(s - m_ref) (FP32 online softmax; m_ref = the key tile's row max, or the running max
//        / 2^8 where the tile's is lower: see softmax_tile)
//   p8 = sat_rne(p * 256)                 x256 keeps small weights out of e4m3's subnormals
//   O  = sum p8 . v8 on FP8 tensor cores, promoted into an FP32 register accumulator every
//        `promote_every` KV tiles (two-level accumulation; 0 = only at the end), because the
//        tensor-core accumulator keeps ~13 mantissa bits and long contexts would drift.
//   l  = sum p8, as one more column of O (head_dim 64 / 128 promoting every tile: V^T's extra
//        row of ones, so the weights of V sum to exactly 1; PrefillConfig::kSumRows), else
//        sum p * 256 in FP32
//   out = O * v_scale / l
// BF16/FP16 cache (the same precision="fp8_mma" with P rounded to the model dtype): Q, K and V
// as stored, no scales; S on 16-bit tensor cores (k16, FP32 accumulator); P * 256 rounded to the
// model dtype; PV on 16-bit tensor cores straight into the FP32 output accumulator. Key tiles:
// 128 keys (FP8 head_dim 256: 64; 16-bit head_dim 256: 32, to fit the ring in shared memory).
// FP8 head_dim 64 also has a 256-key loop (kWide) that keeps each 128-key half its own P
// reference and accumulator: the same numerics, less per-tile overhead (see PrefillConfig).
//
// Work split: a CTA (3 warpgroups, 128 rows) computes one (row tile, sequence, kv head) item at a
// time: one item per CTA, or, with more items than SMs, a persistent grid (PrefillSchedule). A row is a
// (query token, query head of this kv head's group) pair, so a GQA group shares every K/V
// byte. Warpgroup 0 is the producer: K into a swizzled K-major tile and V into a staging tile
// (by TMA, see "TMA producer" below), a 4-stage mbarrier ring (16-bit caches: 3 at head_dim 128
// or without TMA) ahead of the consumers. FP8 V is then transposed into the K-major V^T tile FP8
// wgmma needs (it has no transposed-B mode): with TMA, warp 0 only issues loads and warps 1-3
// only transpose (ldmatrix / stmatrix); otherwise all four do both in one loop (LDS / STS
// transpose). 16-bit caches in the TMA layout transpose nothing: PV reads V from the staging
// tile as an MN-major operand (wgmma's transposed-B mode; H200, BF16 cache, 1 x 16k / 4 x 4k
// causal, same run: 408 / 324, 454 / 401, 435 / 391 TFLOP/s at head_dim 64 / 128 / 256 against
// 371 / 296, 415 / 361, 395 / 340 with the transpose).
// Warpgroups 1 and 2 each own 64 rows: QK^T, online softmax, PV, promotion, epilogue.
//
// P goes to the PV wgmma straight from the QK accumulator registers: the FP8 A-fragment wants
// four consecutive k per register where the accumulator holds pairs, so instead of shuffling
// P between threads, V^T's key order inside each 32-key step is permuted to match (sum over
// keys does not care about their order). The 16-bit A fragment takes the accumulator's pairs as
// they are, so 16-bit V^T keeps the natural key order.
//
// FIREATTN_PREFILL_TMA (default 1): 0 builds the cp.async producer only (for A/B timing).
// H200, 1 x 16k / 4 x 4k causal, same run, before the producer's roles were split: TMA 589 / 455
// TFLOP/s at head_dim 128 and 600 / 488 at 256 against cp.async 461 / 385 and 459 / 394; at
// head_dim 64 TMA measured 363 / 290 against cp.async 408 / 315 then; with split roles and the
// transpose's lane offsets following the 64-byte swizzle, FP8 head_dim 64 TMA is 422 / 326 /
// 252 against cp.async 413 / 321 / 249 (1 x 16k / 4 x 4k / 8 x 2k, H200, same run). 16-bit
// caches (BF16, 1 x 16k / 4 x 4k): TMA + split roles 349 / 287, 402 / 351 and 364 / 333 at
// head_dim 64 / 128 / 256 against cp.async 234 / 201, 241 / 220 and 233 / 219.
#pragma once
#ifndef FIREATTN_PREFILL_TMA
#define FIREATTN_PREFILL_TMA 1
#endif
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

#include "common/attention_params.h"
#include "common/fp8.cuh"
#if FIREATTN_PREFILL_TMA
#include <cuda.h>  // CUtensorMap

#include <cstring>

#include "common/tma_host.h"
#endif
#include "common/row_tile.cuh"
#include "generated/wgmma_fp8.h"

namespace fireattn {

// Development timing experiment only (wrong results; never set in a normal build): 1 = the
// producer skips the V transpose, 2 = it also issues no K/V copies, so the consumers run on
// whatever shared memory holds. Set through FIREATTN_NVCC_FLAGS=-DFIREATTN_PREFILL_PRODUCER_EXPERIMENT=N;
// the difference to 0 is what the producer's work costs when it is on the critical path.
#ifndef FIREATTN_PREFILL_PRODUCER_EXPERIMENT
#define FIREATTN_PREFILL_PRODUCER_EXPERIMENT 0
#endif
constexpr int kProducerExperiment = FIREATTN_PREFILL_PRODUCER_EXPERIMENT;
// PrefillConfig::kSumRows: FP8 row sums of P on the tensor cores (0: in the softmax, FP32).
#ifndef FIREATTN_PREFILL_SUM_ON_TC
#define FIREATTN_PREFILL_SUM_ON_TC 1
#endif
// FIREATTN_PREFILL_PERSISTENT (default 1): one CTA per SM taking work items from an atomic
// counter (PrefillSchedule); 0: one CTA per item (for A/B timing).
#ifndef FIREATTN_PREFILL_PERSISTENT
#define FIREATTN_PREFILL_PERSISTENT 1
#endif
// K / V ring depth of FP8 caches (16-bit caches: PrefillConfig::kStages). 4: H200, same run,
// 1-2% faster than 3 at head_dim 128/256 (D128 1x16k 677 vs 670 TFLOP/s), equal at 64.
#ifndef FIREATTN_PREFILL_STAGES
#define FIREATTN_PREFILL_STAGES 4
#endif

// TMA producer (every cache and head_dim; FIREATTN_PREFILL_TMA=0 compiles it out).
// One tensor map views the cache as [num_blocks][2 * Hkv * block_size rows][row bytes] (the
// inner dims are compact, so (K/V, head, key) is one row index; the block stride stays a
// runtime stride). Per tile, lanes of producer warp 0 each take one box = one page slice of
// min(block_size, kBlockN) keys (block_size >= 16, a power of two), read its block-table entry
// and issue K and V (rows over 128 bytes: one box per 128-byte column) on the stage's `landed` barrier,
// whose expected bytes lane 0 posts first. K lands in the K tile: TMA SWIZZLE_128B / 64B is
// the same XOR of 16-byte chunk bits 4-6 / 4-5 with address bits 7-9 / 7-8 that KMajorTile
// and the wgmma descriptor use (every box starts 1024-byte aligned). V lands in the same
// layout in the staging tile, which the transpose reads instead of v_staging_offset.
// Edge tiles: boxes cover only pages with keys in [kv_begin, kv_end), but whole pages, and a
// tile's other rows keep stale bytes. K rows there only reach S columns that the mask replaces
// by -inf (a select, so NaN garbage cannot leak); V rows would meet P = 0 in the MMA (0 * NaN
// = NaN), so the producer zeroes the staging rows outside [kv_begin, kv_end) before it
// transposes such a tile. The host falls back to the cp.async loads at run time (same staging
// layout, zero-fill as before) when the map cannot be made: block_size not a power of two or
// < 16, misaligned base or block stride, no driver entry point, or FIREATTN_DISABLE_TMA=1.
constexpr bool kPrefillTma = FIREATTN_PREFILL_TMA != 0;

// Rows per work item (row tile) of every configuration: the launch, the persistent-grid choice and
// the op's int-range check count items with it.
constexpr int kPrefillRowTile = 128;
inline int64_t prefill_row_tiles(int64_t rows) { return (rows + kPrefillRowTile - 1) / kPrefillRowTile; }

// kElem: cache bytes per element (1: FP8 e4m3 with FP8 MMAs; 2: a BF16/FP16 cache with 16-bit MMAs).
template <int D, int kElem = 1, bool kWide = false>
struct PrefillConfig {
  static_assert(!kWide || (kElem == 1 && D == 64), "256-key tiles: FP8 head_dim 64 only");
  // Warpgroup 0 loads K and V and transposes V; warpgroups 1 and 2 compute 64 rows each.
  static constexpr int kThreads = 384;
  static constexpr int kProducerThreads = 128;
  static constexpr int kBlockM = kPrefillRowTile;
  static constexpr int kProducerRegs = 56, kConsumerRegs = 224;
  // setmaxnreg.inc blocks until the CTA's own pool (168 regs x 384 threads at launch) has the
  // registers, so the split must fit it or the consumers wait forever.
  static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 168 * 384, "register split exceeds the launch pool");
  // K/V by TMA into the K tile's layout (the cp.async fallback fills the same layout).
  static constexpr bool kTmaLayout = kPrefillTma;
  // 16-bit caches in the TMA layout keep no V^T tile (PV reads the staging tile) and accumulate
  // PV straight into o_main (16-bit wgmma accumulates in FP32, so the FP8 path's two-level
  // promotion buys nothing there). That frees the shared memory and registers for 128-key tiles
  // at head_dim 128 and a 4-stage ring at 64 and 256: H200, same run, BF16 cache, 1 x 16k / 4 x 4k
  // / 8 x 2k causal TFLOP/s, D128 521 / 441 / 363 vs 456 / 396 / 324 with 64-key tiles, a V^T-sized
  // hole and two-level PV; D256 461 / 408 / 347 vs 417 / 381 / 326; D64 395 / 321 / 257 vs 389 / 318 / 253.
  static constexpr bool kDirect16 = kElem == 2 && kTmaLayout;
  // head_dim 256 takes 64-key tiles (32 for 16-bit caches, to fit the ring in shared memory) and
  // 64-wide PV slices so that the 128-register output accumulator, its promotion slice, S and P
  // fit in a consumer's registers. Without the TMA layout 16-bit caches halve the tile at D >= 128.
  // kWide (FP8 head_dim 64, long cached contexts; prefill.cu picks): 256-key tiles share the
  // per-tile overhead (row max / sum shuffles, wgmma waits, ring barriers) between two 128-key
  // halves, each its own P reference and PV accumulator, so the numerics stay the 128-key
  // tiles' (400 instead of 432 consumer instructions per 128 keys; S 128 registers, no spill;
  // ring 4 x 48 KB). Timings in prefill.cu.
  static constexpr int kBlockN = kWide ? 256
                                 : kDirect16 ? (D == 256 ? 32 : 128)
                                             : (D == 256 ? 64 : 128) / (kElem == 2 && D >= 128 ? 2 : 1);
  // kSumRows (FP8 head_dim 64 / 128): the V^T tile has 8 more rows, row D all e4m3 1.0 and rows
  // D+1..D+7 zero (written once per ring stage at the kernel's start, never overwritten). Where
  // the kernel promotes every tile (its kSumOnTc), the PV wgmma takes N = D + 8 and so also
  // accumulates each row's sum of P8 in output column D: the softmax adds no row sums, and l is
  // the sum of the same rounded P that weighs V, promoted and rescaled with O. Other promotion
  // intervals keep FP32 row sums (PV N = D): a positive sum growing over many tiles in the
  // ~13-bit tensor-core accumulator stops absorbing small P (never promoted: relative L2 1.9 at
  // 128k keys). head_dim 256 (64-column PV slices) and 16-bit caches (no V^T tile) sum in FP32.
  static constexpr bool kSumRows = kElem == 1 && D != 256 && FIREATTN_PREFILL_SUM_ON_TC;
  static constexpr int kVtRows = D + (kSumRows ? 8 : 0);  // V^T tile rows: dims (+ the sum rows)
  static constexpr int kOutN = D == 256 ? 64 : D;         // output columns per PV wgmma
  static constexpr int kPvSlices = D / kOutN;
  static constexpr int kStages = kElem == 1 ? FIREATTN_PREFILL_STAGES : (kDirect16 && D != 128 ? 4 : 3);  // K / V ring depth
  static constexpr int kRowBytes = D * kElem;
  static constexpr int kKeysPerStep = 32 / kElem;  // keys of one PV k-step (32 bytes of V^T)
  static constexpr int kQBytes = kBlockM * kRowBytes;
  static constexpr int kKBytes = kBlockN * kRowBytes;
  static constexpr int kVStageBytes = kBlockN * kRowBytes;
  static constexpr int kVtBytes = kDirect16 ? 0 : kVtRows * kBlockN * kElem;  // V^T tile of the transposing paths
  static constexpr int kStageBytes = kKBytes + kVStageBytes + kVtBytes;
  // landed / ready / empty per stage, item_full / item_empty per item slot, then 16-byte aligned
  // the 2 item slots of 64 bytes (prefill_kernel's Item: the item's number and row tile).
  static constexpr int kItemSlotsOffset = (3 * kStages * 8 + 4 * 8 + 15) / 16 * 16;
  static constexpr int kBarrierBytes = kItemSlotsOffset + 2 * 64;
  static constexpr int kSmemBytes = 1024 + kQBytes + kStages * kStageBytes + kBarrierBytes;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm_90");
  static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVtBytes % 1024 == 0, "tiles must stay 1024-aligned");

  // V staging: key rows of D bytes, 16-byte chunk c of row r stored at chunk c ^ swizzle(r), so
  // that the 8 rows one transpose phase reads ({2u, 2u+16} + delta, u < 4) hit 8 distinct bank
  // groups (4 for head_dim 64, whose rows have only 4 chunks).
  __device__ __forceinline__ static int v_staging_offset(int row, int chunk) {
    const int sw = kRowBytes >= 128 ? ((row >> 1) & 3) | ((row >> 2) & 4) : (row >> 1) & 3;
    return row * kRowBytes + ((chunk ^ sw) << 4);
  }
};

// wgmma shared-memory matrix descriptor: start address, leading / stride byte offsets (each
// stored >> 4) and the swizzle mode (bits 62-63: 1 = 128 B, 2 = 64 B).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, uint64_t swizzle_mode) {
  return static_cast<uint64_t>(addr >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (swizzle_mode << 62);
}

// A K-major FP8 operand tile of R rows x KB bytes, as wgmma reads it: split into column chunks
// of CW = min(KB, 128) bytes, each an R x CW block with the CW-byte swizzle (128 or 64).
template <int R, int KB>
struct KMajorTile {
  static constexpr int CW = KB < 128 ? KB : 128;
  static_assert(CW == 128 || CW == 64, "row chunks are 64 or 128 bytes");
  static constexpr uint64_t kSwizzleMode = CW == 128 ? 1 : 2;  // descriptor bits 62-63
  static_assert(R % 8 == 0, "R * CW must be a multiple of 1024 (whole swizzle atoms)");

  // Byte offset of (row, byte) inside the tile; `byte` multiple of 4 (stays inside a 16 B unit).
  // The swizzle XORs 16-byte chunk bits 4-6 (4-5 for 64-byte rows) with address bits 7-9 (7-8),
  // i.e. with the row (R * CW is a multiple of 1024, so the column chunk does not touch it);
  // written on the row so that a row known at compile time modulo 8 folds into an immediate.
  __device__ __forceinline__ static uint32_t offset(int row, int byte) {
    const uint32_t sw = CW == 128 ? (row & 7) << 4 : (row & 6) << 3;
    return (byte / CW) * (R * CW) + row * CW + ((byte % CW) ^ sw);
  }
  // wgmma descriptor of rows [row0, row0 + 64 or N) at k-step `kstep` (32 bytes each) =
  // desc_base(tile) + desc_step(row0, kstep): the start-address field holds address >> 4 and
  // shared addresses stay below 2^18, so byte offsets / 16 add to it without carrying into the
  // LBO / SBO fields. The consumers build the bases once and add steps per tile.
  __device__ __forceinline__ static uint64_t desc_base(uint32_t tile_smem) {
    return smem_desc(tile_smem, 16, 8 * CW, kSwizzleMode);
  }
  __host__ __device__ static constexpr uint32_t desc_step(int row0, int kstep) {
    return ((kstep * 32 / CW) * (R * CW) + row0 * CW + (kstep * 32) % CW) >> 4;
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Explicit shared-space accesses on 32-bit addresses: through a generic pointer the compiler
// emitted 64-bit generic LD/ST (address arithmetic per access) for the V transpose.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void sts128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
// Four 8 x 8 16-bit matrices: ldmatrix gives lane l row l / 4, columns 2 (l % 4), +1 of each;
// stmatrix.trans writes that fragment element (r, c) to row c, column r. Lanes 8m..8m+7 give
// the row addresses of matrix m.
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void stsm_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async) visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Hides a value's origin, so the compiler keeps it in a register instead of recomputing it
// from the shared window base inside the tile loop.
__device__ __forceinline__ void opaque(uint32_t& x) { asm volatile("" : "+r"(x)); }
__device__ __forceinline__ void opaque(uint64_t& x) { asm volatile("" : "+l"(x)); }
// Keeps the compiler from moving accumulator reads/writes across wgmma issue and wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// mbarriers (shared::cta) for the producer/consumer ring.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once all of this thread's earlier cp.async copies have landed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// A wait that cannot finish is a kernel bug: trap after 2^28 polls (each try_wait suspends
// for a while; seconds in all) instead of hanging the process. One asm block, so the spin
// loop costs the surrounding code no registers.
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done, stuck;\n.reg .u32 polls;\nmov.u32 polls, 0;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@done bra.uni DONE_%=;\n"
      "add.u32 polls, polls, 1;\nsetp.eq.u32 stuck, polls, 268435456;\n@stuck trap;\n"
      "bra.uni WAIT_%=;\nDONE_%=:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
#if FIREATTN_PREFILL_TMA
// Arrives on `bar` and adds `bytes` to the transaction count the phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// TMA tile load of the box at coordinates (c0, c1, c2) of `map` into shared memory `dst`;
// completes `bytes` (the whole box, out-of-bounds parts zero-filled) on `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
#endif
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
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

// Online softmax of one S tile in place: S (raw QK^T accumulator) -> P * 256 (the x256 is
// folded into the exponent, so it costs nothing). m: running row max in log2 units; l: this
// thread's share of the row sums of P * 256; alpha: the rescale of earlier tiles.
// kMask: the tile crosses a causal / window / end edge; kSoftcap: cap * tanh(s / cap) first.
struct TileMask {
  int key0;    // key of this thread's first S column
  int kv_end;  // keys >= kv_end are invisible
  int pos[2];  // positions of the thread's two rows
  bool causal;
  int window_left;
};

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// P of a tile is taken against that tile's own row max (m_ref), not the running max m, unless the
// tile's max lies more than kPRefSpan (log2 units) below m. Every tile's largest P is then exactly
// 1 (256 in e4m3), and the largest weights are where P's rounding error weighs most. H200, random
// normal data, 64 queries at the end of 4k-128k keys, relative L2 vs FP64 (test_prefill): 0.0212-
// 0.0226 at head_dim 128 and 0.0199-0.0211 at 256, where the running max gave 0.0243-0.0272 and
// 0.0247-0.0264 and FA3 FP8 gives 0.0225-0.0258 and 0.0224-0.0247 (probably because FA3's
// split-KV rounds each split against its own max: the CPU emulation of 16 splits lands at FA3's
// level). Cost: one FP32 op per row and tile on the max -> exp chain, ~2% at head_dim 128 (same
// run: 672 / 500 vs 686 / 511 TFLOP/s, 1 x 16k / 4 x 4k); head_dim 256 measured 734 / 589
// against 732 / 586 in an earlier call. O and l are kept in units of m_ref, so alpha (the
// rescale between tiles) may exceed 1, by at most 2^kPRefSpan; the span only bounds that growth.
// FIREATTN_P_REF_SPAN=0 gives the running max (accuracy experiments only; the reference's
// P_REF_SPAN_LOG2 must match for the tests).
#ifndef FIREATTN_P_REF_SPAN
#define FIREATTN_P_REF_SPAN 8.f
#endif
constexpr float kPRefSpan = FIREATTN_P_REF_SPAN;

// The row max and row sum run as kChains independent partial chains per row, both rows
// interleaved: a single fmaxf / += chain over a row's 32 values (128-key tile) was 64 dependent
// ALU ops per tile (row 1's chain started after row 0's), and the exps waited on all of it
// (ncu, head_dim 128 1 x 16k: 'wait' the top stall, 1.65 of 6.3 cycles per issue). H200, same
// run, causal TFLOP/s: FP8 with 2 chains head_dim 64 1 x 16k / 4 x 4k 451 / 343 vs 426 / 334,
// 128 688 / 525 vs 679 / 523, 256 749 / 625 vs 738 / 605; 4 chains gained nothing; 16-bit
// caches lost ~2.5% at head_dim 64 with 2 or 4 chains and keep one (rows still interleaved).
// kParts = 2 (256-key tiles): each 128-key half of the tile is its own P reference, exactly as two
// consecutive 128-key tiles would be (half 2's span check sees half 1's max): P of half 1 is
// relative to r1, of half 2 to r2 = the new m_ref, and beta = 2^(r1 - r2) rescales half 1's PV
// and row sum into m_ref units. So the numerics are the 128-key tiles' (the reference emulates
// block_n 128); only the loop's per-tile overhead is shared by 256 keys.
template <int kSRegs, bool kMask, bool kSoftcap, int kChainsWanted, int kParts = 1, bool kRowSums = true>
__device__ __forceinline__ void softmax_tile(float (&s)[kSRegs], float (&m)[2], float (&m_ref)[2], float (&l)[2],
                                             float (&alpha)[2], float (&beta)[2],
                                             float scale_log2, float score_scale, float softcap,
                                             const TileMask& tm) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kSteps = kSRegs / 4;  // i-steps of 8 keys; 2 values per row each
  static_assert(kParts == 1 || kParts == 2, "one or two P references per tile");
  constexpr int kPartSteps = kSteps / kParts;
  constexpr int kChains = kPartSteps >= kChainsWanted ? kChainsWanted : kPartSteps;  // per part
  static_assert(kChains > 0 && (kChains & (kChains - 1)) == 0, "the chains merge as a binary tree");
  // With a soft cap the scores are transformed into log2 units here; otherwise the scale is
  // folded into the exponent's FFMA (it is positive, so the max commutes with it).
  const float exp_scale = kSoftcap ? 1.f : scale_log2;
  float mx[2][kParts][kChains];  // each part's first kChains i-steps start its chains (no -inf seed op)
#pragma unroll
  for (int i = 0; i < kSteps; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = i / kPartSteps, j = i % kPartSteps;
        float x = s[4 * i + 2 * h + e];
        if constexpr (kSoftcap) x = softcap * kLog2e * tanhf(x * score_scale / softcap);
        if constexpr (kMask) {
          const int key = tm.key0 + 8 * i + e;
          bool visible = key < tm.kv_end;
          if (tm.causal) visible = visible && key <= tm.pos[h];
          if (tm.window_left >= 0) visible = visible && key >= tm.pos[h] - tm.window_left;
          x = visible ? x : -CUDART_INF_F;
        }
        s[4 * i + 2 * h + e] = x;
        if (j < kChains && e == 0) mx[h][q][j] = x;
        else mx[h][q][j % kChains] = fmaxf(mx[h][q][j % kChains], x);
      }
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int q = 0; q < kParts; ++q)
#pragma unroll
      for (int w = kChains / 2; w >= 1; w /= 2)
#pragma unroll
        for (int c = 0; c < w; ++c) mx[h][q][c] = fmaxf(mx[h][q][c], mx[h][q][c + w]);
#pragma unroll
  for (int o = 1; o <= 2; o *= 2)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < kParts; ++q) mx[h][q][0] = fmaxf(mx[h][q][0], __shfl_xor_sync(0xffffffffu, mx[h][q][0], o));
  float offset[2][kParts];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m_cur = m[h], r[kParts], r_use = 0.f;
#pragma unroll
    for (int q = 0; q < kParts; ++q) {
      const float t_max = mx[h][q][0] * exp_scale;
      // = fmaxf(t_max, max(m_cur, t_max) - kPRefSpan), with one dependent op after t_max instead of three.
      r[q] = fmaxf(t_max, m_cur - kPRefSpan);
      m_cur = fmaxf(m_cur, t_max);
      r_use = r[q] == -CUDART_INF_F ? 0.f : r[q];  // nothing visible yet: keep exps at 0
      offset[h][q] = 8.f - r_use;                  // P * 256 = 2^(x - r + 8)
    }
    alpha[h] = fast_exp2(m_ref[h] - r_use);
    beta[h] = kParts == 2 ? fast_exp2(r[0] - r_use) : 1.f;  // r[0] = -inf (half 1 empty so far): 0
    m[h] = m_cur;
    m_ref[h] = r[kParts - 1];
  }
  float sum[2][kParts][kChains];
#pragma unroll
  for (int i = 0; i < kSteps; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = i / kPartSteps, j = i % kPartSteps;
        const float pr = fast_exp2(fmaf(s[4 * i + 2 * h + e], exp_scale, offset[h][q]));
        s[4 * i + 2 * h + e] = pr;
        if constexpr (kRowSums) {
          if (j < kChains && e == 0) sum[h][q][j] = pr;
          else sum[h][q][j % kChains] += pr;
        }
      }
  if constexpr (!kRowSums) return;  // the PV wgmma sums P (PrefillConfig::kSumRows)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int q = 0; q < kParts; ++q)
#pragma unroll
      for (int w = kChains / 2; w >= 1; w /= 2)
#pragma unroll
        for (int c = 0; c < w; ++c) sum[h][q][c] += sum[h][q][c + w];
    if constexpr (kParts == 2) l[h] = l[h] * alpha[h] + fmaf(beta[h], sum[h][0][0], sum[h][1][0]);
    else l[h] = l[h] * alpha[h] + sum[h][0][0];
  }
}

// kEveryTile: promote_every == 1, the default. Other intervals keep a second accumulator alive
// across tiles, which costs head_dim / 2 registers (and spills at head_dim 128), so they get
// their own instantiation. head_dim 256 promotes per 64-column slice and takes 0 or 1 at runtime.
// 16-bit caches get only the kEveryTile instantiation below head_dim 256 (launch_prefill), and in
// the TMA layout (kDirect16) accumulate PV into o_main directly, so promote_every does not change them.
template <typename QT, bool kFp8, int N>
using WgmmaFor = std::conditional_t<kFp8, WgmmaFp8<N>,
                                    std::conditional_t<std::is_same_v<QT, __nv_bfloat16>, WgmmaBf16<N>, WgmmaF16<N>>>;

// Work items are (row tile, sequence, kv head), numbered row tile fastest, from the last row tile
// down (the latest causal rows see the most keys: heaviest first), then sequence, then kv head:
// the order in which the hardware dispatched the one-CTA-per-item grid, so the CTAs running at
// once share a kv head's pages in L2 (ordering by row tile first, all heads' heaviest first,
// lost 4-9% on 16k-token chunks of 64k / 128k keys at head_dim 128, H200).
// Persistent launches (counters != nullptr; prefill_persistent_ctas): one CTA per SM; warp 0 of
// each takes item blockIdx.x first, then the next from an atomic counter (dynamic: the heaviest
// items go first and the CTA that frees up takes the next), and passes it to the other warps
// through shared memory. A CTA's next item then starts loading (and transposing V) while its
// current one computes, since the ring's stage count runs on across items; no CTA launch,
// prologue, pipeline fill or epilogue sits between items. H200, same call, TFLOP/s against one
// CTA per item (causal): head_dim 64 1 x 4k / 4 x 4k / 8 x 4k / 1 x 16k 353 / 362 / 365 / 464 vs
// 338 / 346 / 348 / 452, head_dim 128 524 / 545 / 549 / 692 vs 511 / 525 / 533 / 679, head_dim 256
// 602 / 633 / 635 / 732 vs 598 / 620 / 621 / 732. counters[0]: items taken past the grid's first
// ones, counters[1]: CTAs done; the last CTA done puts both back to 0, so a launch needs no reset
// (a slot of 64 per launch, rotated on the host, keeps concurrent launches apart). Otherwise
// (few items, a mostly empty varlen grid, the 256-key loop) the grid is (row tiles, sequences,
// kv heads), one item per CTA.
struct PrefillSchedule {
  int* counters;
  int num_items, m_tiles;
};
constexpr int kPrefillCounterSlots = 64;
static __device__ int prefill_counters[kPrefillCounterSlots][2];

template <typename QT, bool kFp8, int D, bool kEveryTile, bool kWide>
__global__ void __launch_bounds__(PrefillConfig<D, kFp8 ? 1 : 2, kWide>::kThreads, 1) prefill_kernel(const AttentionParams p, const int promote_every,
                                                          const PrefillSchedule sched
#if FIREATTN_PREFILL_TMA
                                                          ,
                                                          const __grid_constant__ CUtensorMap kv_map, const int use_tma
#endif
) {
  constexpr int kElem = kFp8 ? 1 : 2;
  // kTmaLayout: V staging in the K tile's layout (TMA's swizzle), read by the TMA transpose;
  // tma: the loads are TMA (else cp.async into that layout, the host's run-time fallback).
  constexpr bool kTmaLayout = PrefillConfig<D, kElem, kWide>::kTmaLayout;
#if FIREATTN_PREFILL_TMA
  const bool tma = kTmaLayout && kProducerExperiment < 2 && use_tma != 0;  // experiment 2 issues no loads
#else
  constexpr bool tma = false;
#endif
  using Cfg = PrefillConfig<D, kElem, kWide>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  // kSumOnTc: row sums of P8 by the PV wgmma (PrefillConfig::kSumRows), when promoting every tile.
  constexpr bool kSumOnTc = Cfg::kSumRows && kEveryTile;
  constexpr int kPvN = D == 256 ? 64 : (kSumOnTc ? Cfg::kVtRows : D);  // accumulator columns per PV wgmma
  constexpr int kPvSlices = Cfg::kPvSlices;
  constexpr int kRowBytes = Cfg::kRowBytes;
  using QTile = KMajorTile<kBlockM, kRowBytes>;
  using KTile = KMajorTile<kBlockN, kRowBytes>;
  using VtTile = KMajorTile<Cfg::kVtRows, kBlockN * kElem>;
  using QK = WgmmaFor<QT, kFp8, kBlockN>;
  using PV = WgmmaFor<QT, kFp8, kPvN>;
  constexpr int kSRegs = QK::kRegs;                      // S accumulator: kBlockN / 2 floats per thread
  constexpr int kPvRegs = PV::kRegs;                     // one PV slice
  constexpr int kPSteps = kBlockN / Cfg::kKeysPerStep;   // PV k-steps; 4 A registers each
  constexpr int kQkSteps = kRowBytes / 32;               // QK^T k-steps (32 bytes of a row each)

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* q_s = smem;
  uint8_t* stages = q_s + Cfg::kQBytes;  // per stage: K tile, V staging, V^T tile
  uint32_t bars = smem_addr(stages + kStages * Cfg::kStageBytes);
  opaque(bars);
  // landed[s]: the stage's cp.async copies are in; ready[s]: K and V^T usable by wgmma;
  // empty[s]: both consumer warpgroups are done with the stage.
  auto landed = [&](int st) { return bars + 8 * st; };
  auto ready = [&](int st) { return bars + 8 * (kStages + st); };
  auto empty = [&](int st) { return bars + 8 * (2 * kStages + st); };
  auto k_tile = [&](int st) { return stages + st * Cfg::kStageBytes; };
  auto v_staging = [&](int st) { return stages + st * Cfg::kStageBytes + Cfg::kKBytes; };
  auto vt_tile = [&](int st) { return stages + st * Cfg::kStageBytes + Cfg::kKBytes + Cfg::kVStageBytes; };

  // Item slots: warp 0 takes the CTA's items and publishes each, with its row tile, one at a time
  // (item_full); the 11 other warps (transposers and consumers) each read an item from shared
  // memory, so none waits on the sequence lengths in global memory, and release its slot
  // (item_empty).
  constexpr int kItemReaders = 3 + 8;
  auto item_full = [&](int sl) { return bars + 8 * (3 * kStages + sl); };
  auto item_empty = [&](int sl) { return bars + 8 * (3 * kStages + 2 + sl); };
  const uint32_t item_slots = bars + Cfg::kItemSlotsOffset;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = p.num_q_heads / p.num_kv_heads;
  // An item's row tile and sequence, and whether the row tile starts inside the sequence's rows
  // (the longest query sets the row tile count of every sequence, so varlen batches have empty items).
  auto m_block_of = [&](int idx) { return sched.m_tiles - 1 - idx % sched.m_tiles; };
  auto seq_of = [&](int idx) { return idx / sched.m_tiles % p.num_seqs; };
  auto has_rows = [&](int idx) {
    const int seq = seq_of(idx);
    return m_block_of(idx) * kBlockM < (p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq]) * group;
  };
  // This CTA's first item: its grid position (x row tile, y sequence, z kv head; a persistent grid
  // is (CTAs, 1, 1), so item blockIdx.x).
  const int grid_item = (blockIdx.z * p.num_seqs + blockIdx.y) * sched.m_tiles + blockIdx.x;
  // The item's row tile and the keys it sees (idx -1: no item).
  struct Item {
    int idx, seq, kv_head, row0;
    int q_begin, num_rows, context, first_pos, last_pos, kv_begin, kv_end, tile0, num_tiles, pad[3];
  };
  static_assert(sizeof(Item) == 64, "an item slot is 64 bytes");
  auto item_of = [&](int idx) {
    Item it{};
    it.idx = idx;
    if (idx < 0) return it;
    it.seq = seq_of(idx);
    it.kv_head = idx / sched.m_tiles / p.num_seqs;
    it.row0 = m_block_of(idx) * kBlockM;
    const RowTile rt(p, it.seq, it.row0, kBlockM);
    it.q_begin = rt.q_begin, it.num_rows = rt.num_rows, it.context = rt.context;
    it.first_pos = rt.first_pos, it.last_pos = rt.last_pos, it.kv_end = rt.kv_end, it.kv_begin = rt.kv_begin;
    it.tile0 = it.kv_begin / kBlockN * kBlockN;
    it.num_tiles = it.kv_end > it.tile0 ? (it.kv_end - it.tile0 + kBlockN - 1) / kBlockN : 0;
    return it;
  };
  auto load_item = [&](uint32_t addr) {  // the 64-byte slot at addr
    Item it;
    uint4* w = reinterpret_cast<uint4*>(&it);
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = lds128(addr + 16 * i);
    return it;
  };
  // Item k of this CTA (lane 0 of warp 0), -1 when there is none; empty items are skipped here.
  auto take_item = [&](int k) -> int {
    for (int n = k;; ++n) {
      const int idx = n == 0 ? grid_item : sched.counters == nullptr ? -1 : atomicAdd(sched.counters, 1) + gridDim.x;
      if (idx < 0 || idx >= sched.num_items) return -1;
      if (has_rows(idx)) return idx;
    }
  };
  auto publish_item = [&](int k) -> Item {  // warp 0; every lane gets the item
    const int sl = k & 1;
    const uint32_t slot = item_slots + 64 * sl;
    if (k >= 2) mbar_wait(item_empty(sl), ((k >> 1) - 1) & 1);
    if (lane == 0) {
      const int idx = take_item(k);
      const Item it = item_of(idx);
      const uint4* w = reinterpret_cast<const uint4*>(&it);
#pragma unroll
      for (int i = 0; i < 4; ++i) sts128(slot + 16 * i, w[i]);
      mbar_arrive(item_full(sl));
      if (idx < 0 && sched.counters != nullptr) {
        __threadfence();  // this CTA's counter increments before its done count
        if (atomicAdd(sched.counters + 1, 1) == static_cast<int>(gridDim.x) - 1) {
          atomicExch(sched.counters, 0);
          atomicExch(sched.counters + 1, 0);
        }
      }
    }
    __syncwarp();
    return load_item(slot);
  };
  auto read_item = [&](int k) -> Item {  // the other warps
    const int sl = k & 1;
    mbar_wait(item_full(sl), (k >> 1) & 1);
    const Item it = load_item(item_slots + 64 * sl);
    __syncwarp();
    if (lane == 0) mbar_arrive(item_empty(sl));
    return it;
  };
  // kItemLoop false (the 256-key loop, which prefill.cu takes for long cached contexts, where a
  // CTA's item is hundreds of tiles long): one item per CTA from blockIdx, no item slots. Through
  // the slots, persistent or not, that loop ran 3-4% slower (H200, 1 x 16k chunks of 64k / 128k
  // keys, head_dim 64: 545 / 550 TFLOP/s vs 560 / 568 before the item loop existed; with the V
  // transposes left out both ran alike, so the transposers took the loss); this way 550 / 559.
  constexpr bool kItemLoop = !kWide;
  // publisher: warp 0 (the consumers must not even see publish_item's divergent code: ptxas then
  // serialized every wgmma of the head_dim 256 kernel).
  auto next_item = [&](int k, bool publisher) -> Item {
    if constexpr (kItemLoop) {
      return publisher ? publish_item(k) : read_item(k);
    } else {
      return item_of(k == 0 && has_rows(grid_item) ? grid_item : -1);
    }
  };

  if (threadIdx.x == 0) {
    for (int st = 0; st < kStages; ++st) {
      if constexpr (kTmaLayout) {
        mbar_init(landed(st), tma ? 1 : Cfg::kProducerThreads);  // TMA: lane 0's arrive.expect_tx only
      } else {
        mbar_init(landed(st), Cfg::kProducerThreads);
      }
      mbar_init(ready(st), tma ? Cfg::kProducerThreads - 32 : Cfg::kProducerThreads);  // TMA: warps 1-3 transpose
      mbar_init(empty(st), Cfg::kThreads - Cfg::kProducerThreads);
    }
    for (int sl = 0; sl < 2; ++sl) {
      mbar_init(item_full(sl), 1);
      mbar_init(item_empty(sl), kItemReaders);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (Cfg::kSumRows) {  // V^T rows D..D+7 of every stage: 1.0 (e4m3 0x38) in row D, 0 below
    constexpr int kWordsPerRow = kBlockN / 4;
    for (int i = threadIdx.x; i < kStages * 8 * kWordsPerRow; i += Cfg::kThreads) {
      const int st = i / (8 * kWordsPerRow), r = (i / kWordsPerRow) % 8, w = i % kWordsPerRow;
      sts32(smem_addr(vt_tile(st)) + VtTile::offset(D + r, 4 * w), r == 0 ? 0x38383838u : 0u);
    }
    fence_proxy_async();
  }
  __syncthreads();

  if (warp < 4) {
    // ======== Producer warpgroup: K and V of the item's tile t into stage ct % kStages (ct: the
    // CTA's tile count over all its items; TMA or cp.async), then V -> V^T.
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int tid = threadIdx.x;
    constexpr int kParts = kRowBytes / 16;
    constexpr int kLoadIters = kBlockN * kParts / Cfg::kProducerThreads;
    static_assert(kBlockN * kParts % Cfg::kProducerThreads == 0, "whole load iterations");
    const int bs = p.kv.block_size;
    const int block_shift = (bs & (bs - 1)) == 0 ? __ffs(bs) - 1 : -1;
    // The current item's keys and pages (set_item).
    int kv_head = 0, tile0 = 0, kv_begin = 0, kv_end = 0, num_tiles = 0;
    const int32_t* btab = nullptr;
    const uint8_t* head_base = nullptr;
    auto set_item = [&](const Item& it) {
      kv_head = it.kv_head, tile0 = it.tile0, kv_begin = it.kv_begin, kv_end = it.kv_end, num_tiles = it.num_tiles;
      btab = p.kv.block_table + it.seq * p.kv.block_table_stride;
      head_base = p.kv.base + kv_head * p.kv.head_stride;
    };
#if FIREATTN_PREFILL_TMA
    if constexpr (kTmaLayout) {
      if (tma && tid == 0) prefetch_tensormap(&kv_map);
    }
#endif
    auto issue = [&](unsigned ct, int t) {  // ct: the CTA's tile count, t: the item's
      const int st = ct % kStages;
      const int k0 = tile0 + t * kBlockN;
      const uint32_t k_dst = smem_addr(k_tile(st));
      const uint32_t v_dst = smem_addr(v_staging(st));
#if FIREATTN_PREFILL_TMA
      if constexpr (kTmaLayout) {
        if (tma) {
          // Boxes of min(block_size, kBlockN) keys (aligned, so one never crosses a page or the
          // tile) overlapping [kv_begin, kv_end), one lane each (block_size >= 16: n <= kBlockN / 16 <= 16 lanes).
          if (warp == 0) {
            constexpr int kTileShift = kBlockN == 256 ? 8 : kBlockN == 128 ? 7 : kBlockN == 64 ? 6 : 5;
            static_assert((1 << kTileShift) == kBlockN, "kBlockN is 32, 64, 128 or 256");
            const int box_shift = min(block_shift, kTileShift);
            const int lo = max(k0, kv_begin), hi = min(k0 + kBlockN, kv_end);
            const int first = lo >> box_shift, n = ((hi - 1) >> box_shift) - first + 1;
            if (lane == 0) mbar_arrive_expect_tx(landed(st), static_cast<uint32_t>((n * 2 * kRowBytes) << box_shift));
            __syncwarp();  // expected bytes posted before any copy can complete
            if (lane < n) {
              const int tok = (first + lane) << box_shift;
              const int blk = btab[tok >> block_shift];
              const int row = tok & (bs - 1);
              const uint32_t key_off = static_cast<uint32_t>(tok - k0) * KTile::CW;
              const int k_row = kv_head * bs + row, v_row = (p.num_kv_heads + kv_head) * bs + row;
#pragma unroll
              for (int c = 0; c < kRowBytes / KTile::CW; ++c) {
                const uint32_t off = c * (kBlockN * KTile::CW) + key_off;
                tma_load_3d(k_dst + off, &kv_map, landed(st), c * KTile::CW, k_row, blk);
                tma_load_3d(v_dst + off, &kv_map, landed(st), c * KTile::CW, v_row, blk);
              }
            }
            __syncwarp();
          }
          return;
        }
      }
#endif
      // cp.async, also the TMA layout's run-time fallback (V then lands in the K tile's layout).
      // That one is not unrolled: the unrolled loop's hoisted offsets spilled at the producer's
      // 56 registers (head_dim 64).
#pragma unroll(kTmaLayout ? 1 : 4)
      for (int i = 0; i < (kProducerExperiment >= 2 ? 0 : kLoadIters); ++i) {
        const int c = tid + i * Cfg::kProducerThreads;
        const int key = c / kParts, part = c % kParts;
        const int token = k0 + key;
        // Zero-fill outside [kv_begin, kv_end): those keys are masked for every row, but their V
        // would still meet P = 0 in the MMA, and 0 * NaN garbage is NaN. Past the end the cache
        // holds whatever the allocator left; before a sliding window vLLM may have replaced the
        // blocks (the tile starts up to kBlockN - 1 keys early).
        const bool valid = token >= kv_begin && token < kv_end;
        const uint8_t* src = p.kv.base;
        if (valid) {
          const int blk = block_shift >= 0 ? token >> block_shift : token / bs;
          const int off = block_shift >= 0 ? token & (bs - 1) : token % bs;
          src = head_base + btab[blk] * p.kv.block_stride + off * p.kv.token_stride + part * 16;
        }
        const uint32_t k_off = KTile::offset(key, part * 16);
        cp_async16(k_dst + k_off, src, valid);
        cp_async16(v_dst + (kTmaLayout ? k_off : Cfg::v_staging_offset(key, part)), valid ? src + p.kv.kv_stride : src,
                   valid);
      }
      mbar_arrive_cp_async(landed(st));
    };
    // V staging [key][D] -> V^T tile [D][kBlockN] (K-major, keys permuted per 32-key step):
    // word w of a V^T row holds k-positions 4w..4w+3, which in the P fragment are the keys
    // {2u, 2u+1, 2u+8, 2u+9} (+16 for the upper half) of the step, u = (w % 8) % 4.
    constexpr int kWords = kBlockN * kElem / 4;  // 32-bit words per V^T row
    // TMA mode splits the roles: warp 0 waits for free stages and issues the loads, warps 1-3
    // transpose (ready counts their 96 threads), so a stage's V^T never waits behind the next
    // stage's `empty` (the slower consumer warpgroup): with one loop doing both, the leading
    // warpgroup stalled on `ready` whenever the two drifted apart (ncu: 8% of consumer time).
    const int tr_warp0 = tma ? 1 : 0, tr_warps = tma ? 3 : 4;
    const int tr_tid = tid - 32 * tr_warp0, tr_threads = 32 * tr_warps;
    auto transpose = [&](unsigned ct, int t) {
      const int st = ct % kStages;
      mbar_wait(landed(st), (ct / kStages) & 1);
      const uint32_t src = smem_addr(v_staging(st));
      const uint32_t dst = smem_addr(vt_tile(st));
      if constexpr (kTmaLayout) {
        // TMA brought whole pages (or nothing) for an edge tile's rows outside [kv_begin, kv_end).
        const int k0 = tile0 + t * kBlockN;
        const int lo = kv_begin - k0, hi = kv_end - k0;
        if (tma && (lo > 0 || hi < kBlockN)) {
          constexpr int kParts = kRowBytes / 16;
#pragma unroll 1
          for (int c = tr_tid; c < kBlockN * kParts; c += tr_threads) {
            const int key = c / kParts, part = c % kParts;
            if (key < lo || key >= hi)
              sts128(src + KTile::offset(key, part * 16), make_uint4(0u, 0u, 0u, 0u));
          }
          named_barrier(3, tr_threads);  // ids 1, 2: consumer warpgroups
        }
      }
      if constexpr (kProducerExperiment >= 1 || Cfg::kDirect16) {
        (void)src, (void)dst;  // kDirect16: nothing to transpose, the consumers read the staging tile
      } else if constexpr (kTmaLayout) {
        // ldmatrix / stmatrix transpose (mirrored and checked offline by
        // tools/tma_layout_check.py). A warp-wide unit moves 16 keys x 32 dims: ldmatrix.x4
        // matrix m (row addresses from lanes 8m..8m+7) is 8 key rows x 16 dims, keys
        // {0,9,2,11,4,13,6,15} (m even) or {1,8,3,10,5,12,7,14} (m odd) of the group, dims
        // 16 (m / 2)..+15; lane l receives row l / 4, dims 4 (l % 4)..+3. prmt pairs the bytes
        // into 16-bit elements (key a, key a + 1) of one dim, a = 0, 8, 2, 10, ... by fragment
        // row (the P fragment's key order: word u = keys 2u, 2u+1, 2u+8, 2u+9), and
        // stmatrix.x4.trans writes element (row r, col c) to V^T row c at 16-bit position r.
        // The key sets and the X / Y dim split make every 8-row phase hit 8 distinct bank groups.
        // Lane constants (hoisted out of the tile loop). Units u = (key group kg, 32-dim group
        // dg) go round-robin over the transposing warps (32 units per tile at head_dim 128 and
        // 256, so 3 warps get 11 / 11 / 10).
        constexpr int kGroups = kBlockN / 16, kUnits = kGroups * (D / 32);
        const int r8 = lane % 8, q = lane % 4;
        const int ld_key = (lane / 8) % 2 == 0 ? (r8 % 2 ? r8 + 8 : r8) : (r8 % 2 ? r8 + 7 : r8 + 1);
        // K-tile layout (128-byte rows or column chunks, swizzle (row % 8) << 4; 64-byte rows at
        // head_dim 64, swizzle (row & 6) << 3): (group kg, dims 32 dg..) of the lane sits at
        // (kg * 16 + ld_key) * CW + column chunk + ((32 dg % CW) ^ ld_x), as the dims and the
        // lane's 16-byte half have disjoint bits.
        const uint32_t ld_x = (lane / 16) * 16 ^ (KTile::CW == 128 ? (ld_key % 8) << 4 : (ld_key & 6) << 3);
        const uint32_t a = (lane / 4) % 2 == 0 ? 0u : 4u, b = 4u - a;
        auto sel = [&](uint32_t i, uint32_t i2) { return (a + i) | (b + i) << 4 | (a + i2) << 8 | (b + i2) << 12; };
        const uint32_t sel_x = q < 2 ? sel(0, 1) : sel(2, 3), sel_y = q < 2 ? sel(2, 3) : sel(0, 1);
        const int sq = r8 / 2, is_x = (lane / 8) % 2 == 0;
        const int st_dim = (lane / 16) * 16 + 4 * sq + ((sq < 2) == is_x ? 0 : 2) + r8 % 2;
        // V^T rows (dims) of VtTile::CW bytes, swizzled by the dim, whose value mod 8 is st_dim's.
        const uint32_t st_sw = VtTile::offset(st_dim, 0) - st_dim * VtTile::CW;
        const uint32_t ld_lane = src + ld_key * KTile::CW, st_lane = dst + st_dim * VtTile::CW;
#pragma unroll 2
        for (int u = warp - tr_warp0; u < kUnits; u += tr_warps) {
          const int kg = u % kGroups, dg = u / kGroups;
          uint32_t r[4];
          ldsm_x4(ld_lane + kg * 16 * KTile::CW + (dg * 32 / KTile::CW) * (kBlockN * KTile::CW) + ((dg * 32 % KTile::CW) ^ ld_x), r);
          // Keys past VtTile::CW bytes (256-key tiles) sit in the tile's next column chunk.
          const uint32_t st_key =
              (kg * 16 / VtTile::CW) * (Cfg::kVtRows * VtTile::CW) + ((kg * 16 % VtTile::CW) ^ st_sw);
          stsm_x4_trans(st_lane + dg * 32 * VtTile::CW + st_key, prmt(r[0], r[1], sel_x), prmt(r[0], r[1], sel_y),
                        prmt(r[2], r[3], sel_x), prmt(r[2], r[3], sel_y));
        }
      } else if constexpr (kFp8) {
        // Word w of a V^T row holds k-positions 4w..4w+3, which in the P fragment are the keys
        // {2u, 2u+1, 2u+8, 2u+9} (+16 for the upper half) of the step, u = (w % 8) % 4.
        constexpr int kVtTasks = kWords * (D / 16);  // a task: one V^T word column x 16 dims
#pragma unroll 1
        for (int task = tid; task < kVtTasks; task += Cfg::kProducerThreads) {
          const int w = task % kWords, dg = task / kWords;  // dims 16dg..16dg+15
          const int step = w / 8, tt = w % 8, u = tt % 4;
          const int kbase = step * 32 + (tt >= 4 ? 16 : 0) + 2 * u;
          const uint4 r0 = lds128(src + Cfg::v_staging_offset(kbase, dg));
          const uint4 r1 = lds128(src + Cfg::v_staging_offset(kbase + 1, dg));
          const uint4 r2 = lds128(src + Cfg::v_staging_offset(kbase + 8, dg));
          const uint4 r3 = lds128(src + Cfg::v_staging_offset(kbase + 9, dg));
          const uint32_t x0[4] = {r0.x, r0.y, r0.z, r0.w}, x1[4] = {r1.x, r1.y, r1.z, r1.w};
          const uint32_t x2[4] = {r2.x, r2.y, r2.z, r2.w}, x3[4] = {r3.x, r3.y, r3.z, r3.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // 4x4 byte transpose: dims 16dg + 4j .. +3 of the 4 keys
            const uint32_t t0 = prmt(x0[j], x1[j], 0x5140), t1 = prmt(x0[j], x1[j], 0x7362);
            const uint32_t t2 = prmt(x2[j], x3[j], 0x5140), t3 = prmt(x2[j], x3[j], 0x7362);
            const int d = dg * 16 + 4 * j;
            sts32(dst + VtTile::offset(d + 0, 4 * w), prmt(t0, t2, 0x5410));
            sts32(dst + VtTile::offset(d + 1, 4 * w), prmt(t0, t2, 0x7632));
            sts32(dst + VtTile::offset(d + 2, 4 * w), prmt(t1, t3, 0x5410));
            sts32(dst + VtTile::offset(d + 3, 4 * w), prmt(t1, t3, 0x7632));
          }
        }
      } else {
        // 16-bit: word w of a V^T row holds keys 2w and 2w+1 (the natural order: the 16-bit A
        // fragment takes the accumulator's pairs as they are). A task: 2 keys x 8 dims.
        constexpr int kVtTasks = kWords * (D / 8);
#pragma unroll 1
        for (int task = tid; task < kVtTasks; task += Cfg::kProducerThreads) {
          const int w = task % kWords, dg = task / kWords;  // dims 8dg..8dg+7
          const uint4 r0 = lds128(src + Cfg::v_staging_offset(2 * w, dg));
          const uint4 r1 = lds128(src + Cfg::v_staging_offset(2 * w + 1, dg));
          const uint32_t x0[4] = {r0.x, r0.y, r0.z, r0.w}, x1[4] = {r1.x, r1.y, r1.z, r1.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // dims 8dg + 2j, +1
            const int d = dg * 8 + 2 * j;
            sts32(dst + VtTile::offset(d + 0, 4 * w), prmt(x0[j], x1[j], 0x5410));
            sts32(dst + VtTile::offset(d + 1, 4 * w), prmt(x0[j], x1[j], 0x7632));
          }
        }
      }
      fence_proxy_async();  // K (cp.async) and V^T (st.shared) -> visible to wgmma
      mbar_arrive(ready(st));
    };
    unsigned ct = 0;  // unsigned: the stage and phase divisions by kStages are shifts and masks
    for (int k = 0;; ++k, ct += num_tiles) {
      const Item item = next_item(k, warp == 0);
      if (item.idx < 0) return;
      set_item(item);
      if (tma) {
        if (warp == 0) {
          for (int t = 0; t < num_tiles; ++t) {
            if (ct + t >= kStages) mbar_wait(empty((ct + t) % kStages), ((ct + t) / kStages - 1) & 1);
            issue(ct + t, t);
          }
        } else {
          for (int t = 0; t < num_tiles; ++t) transpose(ct + t, t);
        }
        continue;
      }
      for (int t = 0; t < num_tiles; ++t) {
        if (ct + t >= kStages) mbar_wait(empty((ct + t) % kStages), ((ct + t) / kStages - 1) & 1);
        issue(ct + t, t);
        if (t >= 1) transpose(ct + t - 1, t - 1);  // keeps one more tile's copies in flight
      }
      if (num_tiles > 0) transpose(ct + num_tiles - 1, num_tiles - 1);
    }
  }

  // ======== Consumer warpgroups: 64 rows each.
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int wg = warp / 4 - 1;
  const int ctid = threadIdx.x - Cfg::kProducerThreads - wg * 128;  // 0..127 inside the warpgroup

  // wgmma descriptors, built once for all items: per tile only the stage and k-step offsets are added (the
  // compiler rebuilt every descriptor from the shared window base on each tile, ~60 uniform
  // and integer instructions per tile in issue-bound warps).
  uint64_t q_desc = QTile::desc_base(smem_addr(q_s)) + QTile::desc_step(wg * 64, 0);
  uint64_t k_desc0 = KTile::desc_base(smem_addr(k_tile(0)));
  // kDirect16: V staging as an MN-major SWIZZLE_128B operand (CUTLASS's canonical ((8 x 16 B, m),
  // (8 rows, k)) : ((16 B, LBO), (128 B, SBO))): 64 dims per 128-byte column chunk, chunks
  // kBlockN * 128 bytes apart (LBO), 8-key row groups 1024 bytes apart (SBO), 16 keys a k-step.
  uint64_t vt_desc0 = Cfg::kDirect16 ? smem_desc(smem_addr(v_staging(0)), kBlockN * 128, 1024, 1)
                                     : VtTile::desc_base(smem_addr(vt_tile(0)));
  // PV's B operand of output columns [sl * kOutN, +kPvN) at k-step c, and the MMA that reads it.
  auto pv_step = [&](int sl, int c) -> uint32_t {
    if constexpr (Cfg::kDirect16) return (sl * (kPvN / 64) * (kBlockN * 128) + c * 16 * 128) >> 4;
    else return VtTile::desc_step(sl * Cfg::kOutN, c);
  };
  auto pv_mma = [&](float(&acc)[kPvRegs], const uint32_t(&a)[4], uint64_t desc, int scale_d) {
    if constexpr (Cfg::kDirect16) PV::rs_t(acc, a, desc, scale_d);
    else PV::rs(acc, a, desc, scale_d);
  };
  opaque(q_desc);
  opaque(k_desc0);
  opaque(vt_desc0);
  int stage = 0, phase = 0;  // of the ring, running on across items
  // The query's pieces: this thread's share of a warpgroup's 64 rows x D, kQBatch pieces (32 bytes
  // each) at a time. load_q issues one batch's global loads (pad rows load zeros).
  constexpr int kPieces = D / 16;
  // (2 at a time in the promote-interval kernels, which spilled with 4.)
  constexpr int kQBatchMax = kEveryTile ? 4 : 2;
  constexpr int kQIters = 64 * kPieces / 128, kQBatch = kQIters < kQBatchMax ? kQIters : kQBatchMax;
  static_assert(64 * kPieces % 128 == 0 && kQIters % kQBatch == 0, "whole Q load iterations");
  auto load_q = [&](const Item& item, int j0, uint4(&raw)[kQBatch][2]) {
    const QT* q = static_cast<const QT*>(p.q);
#pragma unroll
    for (int j = 0; j < kQBatch; ++j) {
      const int i = ctid + 128 * (j0 + j);
      const int row = item.row0 + wg * 64 + i / kPieces, piece = i % kPieces;
      raw[j][0] = raw[j][1] = make_uint4(0u, 0u, 0u, 0u);
      if (row < item.num_rows) {
        const int tok = item.q_begin + row / group, head = item.kv_head * group + row % group;
        const uint4* src = reinterpret_cast<const uint4*>(q + tok * p.q_tok_stride + head * p.q_head_stride + piece * 16);
        raw[j][0] = src[0];
        raw[j][1] = src[1];
      }
    }
  };
  // kEarlyQ: the next item and its first Q batch are read before the current item's epilogue, so
  // the global round trip of those loads overlaps the epilogue. H200, same call, causal 1 / 4 / 8 x
  // 4k TFLOP/s: head_dim 64 367 / 375 / 379 vs 361 / 370 / 373, 128 563 / 590 / 596 vs 553 / 579 /
  // 586, 16k rows level; head_dim 256 lost 4-5% on every shape (long chunks too: 48 bytes of
  // spills with it), so it reads each item at its start, and so do the promote-interval kernels
  // (576 bytes of spills with it).
  constexpr bool kEarlyQ = D < 256 && kEveryTile;
  Item it = next_item(0, false);
  uint4 q_first[kQBatch][2];
  if (kEarlyQ && it.idx >= 0) load_q(it, 0, q_first);
  for (int k = 0;; ++k) {
    if (it.idx < 0) return;
    const int kv_head = it.kv_head, row0 = it.row0, q_begin = it.q_begin, num_rows = it.num_rows;
    const int context = it.context, first_pos = it.first_pos, last_pos = it.last_pos, kv_end = it.kv_end;
    const int tile0 = it.tile0, num_tiles = it.num_tiles;
    const float q_scale = kFp8 ? p.q_scale[kv_head * p.q_scale_stride] : 1.f;
    const float k_scale = kFp8 ? p.k_scale[kv_head * p.k_scale_stride] : 1.f;
    const float v_scale = kFp8 ? p.v_scale[kv_head * p.v_scale_stride] : 1.f;
    constexpr float kLog2e = 1.4426950408889634f;
    const float score_scale = p.softmax_scale * q_scale * k_scale;  // natural-log units
    const float scale_log2 = score_scale * kLog2e;

    // ---- Q: this warpgroup's 64 rows, quantized in registers, stored swizzled (after the
    // warpgroup's last QK^T of its previous item has read them).
    if (k > 0) named_barrier(1 + wg, 128);
    {
      // x / q_scale as RN(1 / q_scale) and two FMA remainder corrections (Markstein): the
      // correctly rounded quotient without __fdiv_rn's per-element reciprocal refinement, range
      // check and slow-path branch (~1.4k prologue instructions per thread, serial before the first
      // QK^T; it weighs most on short sequences). |x| is first clamped to 1024 * q_scale (both sides
      // saturate e4m3 beyond 448 * q_scale), so nothing overflows. Checked against exact rational
      // arithmetic (tools/q_div_check.py): equal to RN(x / s), signed zeros included (a NaN query
      // saturates instead of staying NaN).
      // H200, same run, FP8 cache, causal TFLOP/s 4 x 4k / 8 x 2k / 1 x 1k: head_dim 128 524 / 401 /
      // 193 against 501 / 377 / 181 with __fdiv_rn, head_dim 256 603 / 472 / 212 against 582 / 445 / 198.
      const float q_rcp = __frcp_rn(q_scale), q_lim = 1024.f * q_scale;
      auto q_div = [&](float x) {
        x = fminf(fmaxf(x, -q_lim), q_lim);
        float y = __fmul_rn(x, q_rcp);
        y = fmaf(fmaf(-q_scale, y, x), q_rcp, y);
        return copysignf(fmaf(fmaf(-q_scale, y, x), q_rcp, y), x);  // -0 / s stays -0 (the FMAs give +0)
      };
      // The thread's global loads first (up to 4 pieces, 32 registers, at a time), then the stores:
      // the shared stores' memory clobber kept the compiler from lifting a piece's loads above the
      // previous piece's stores, so each piece waited out its own global round trip (D / 32 in a
      // row). H200, same call, causal TFLOP/s 1 / 4 / 8 x 4k: head_dim 64 361 / 370 / 374 vs 352 /
      // 358 / 362, 128 556 / 581 / 586 vs 533 / 559 / 563; 256 in two batches of 4 628 / 664 / 656
      // vs 608 / 641 / 640 (all 8 at once 613 / 660 / 655). 16k rows within +-0.6%, but 1 x 16k
      // causal +2.2% at head_dim 64. An L2 prefetch of the next item's rows by warp 0 on top of
      // this added nothing. kEarlyQ: the first batch came in before the previous item's epilogue.
#pragma unroll 1
      for (int j0 = 0; j0 < kQIters; j0 += kQBatch) {
        uint4 raw[kQBatch][2];
        if (kEarlyQ && j0 == 0) {
#pragma unroll
          for (int j = 0; j < kQBatch; ++j) raw[j][0] = q_first[j][0], raw[j][1] = q_first[j][1];
        } else {
          load_q(it, j0, raw);
        }
#pragma unroll
        for (int j = 0; j < kQBatch; ++j) {
          const int i = ctid + 128 * (j0 + j);
          const int r = wg * 64 + i / kPieces, piece = i % kPieces;
          if constexpr (kFp8) {
            const QT* h = reinterpret_cast<const QT*>(raw[j]);
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e)
              w[e] = pack_e4m3x4(q_div(to_float(h[4 * e])), q_div(to_float(h[4 * e + 1])),
                                 q_div(to_float(h[4 * e + 2])), q_div(to_float(h[4 * e + 3])));
            sts128(smem_addr(q_s) + QTile::offset(r, piece * 16), make_uint4(w[0], w[1], w[2], w[3]));
          } else {  // 16-bit: the query as it is, 16 elements = 32 bytes
            sts128(smem_addr(q_s) + QTile::offset(r, piece * 32), raw[j][0]);
            sts128(smem_addr(q_s) + QTile::offset(r, piece * 32 + 16), raw[j][1]);
          }
        }
      }
      fence_proxy_async();
      named_barrier(1 + wg, 128);
    }

    // ---- This thread's two rows (accumulator rows g and g + 8 of its warp).
    const int g = lane / 4, tq = lane % 4;
    int pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row0 + wg * 64 + (warp % 4) * 16 + g + 8 * h, num_rows - 1);  // pad rows: any valid pos
      pos[h] = context + row / group;
    }

    float o_main[kPvSlices][kPvRegs];
    float o_part[kPvRegs];  // tensor-core accumulator between promotions
#pragma unroll
    for (int sl = 0; sl < kPvSlices; ++sl)
#pragma unroll
      for (int i = 0; i < kPvRegs; ++i) o_main[sl][i] = 0.f;
#pragma unroll
    for (int i = 0; i < kPvRegs; ++i) o_part[i] = 0.f;
    float m[2] = {-CUDART_INF_F, -CUDART_INF_F};  // running max, log2 units
    float m_ref[2] = {-CUDART_INF_F, -CUDART_INF_F};  // what O and l are relative to (softmax_tile)
    float l[2] = {0.f, 0.f};                      // this thread's share of the row sums of P * 256
    float part_alpha[2] = {1.f, 1.f};             // o_main's rescale owed since the last promotion
    bool part_empty = true;

    // Online softmax of the key tile at k0; masks only on tiles that cross an edge.
    // beta: half 1's rescale into m_ref units (256-key tiles, kParts 2; see softmax_tile).
    auto online_softmax = [&](float(&s)[kSRegs], int k0, float(&alpha)[2], float(&beta)[2]) {
      const bool need_mask = k0 + kBlockN > kv_end || (p.causal && k0 + kBlockN - 1 > first_pos) ||
                             (p.window_left >= 0 && k0 < last_pos - p.window_left);
      const TileMask tm{k0 + 2 * tq, kv_end, {pos[0], pos[1]}, p.causal, p.window_left};
      constexpr int kSoftmaxChains = kFp8 ? 2 : 1;  // see softmax_tile
      constexpr int kParts = kWide ? 2 : 1;
      constexpr bool kRowSums = !kSumOnTc;
      if (p.softcap > 0.f)
        softmax_tile<kSRegs, true, true, kSoftmaxChains, kParts, kRowSums>(s, m, m_ref, l, alpha, beta, scale_log2,
                                                                           score_scale, p.softcap, tm);
      else if (need_mask)
        softmax_tile<kSRegs, true, false, kSoftmaxChains, kParts, kRowSums>(s, m, m_ref, l, alpha, beta, scale_log2,
                                                                            score_scale, p.softcap, tm);
      else
        softmax_tile<kSRegs, false, false, kSoftmaxChains, kParts, kRowSums>(s, m, m_ref, l, alpha, beta, scale_log2,
                                                                             score_scale, p.softcap, tm);
    };

    for (int t = 0; t < num_tiles; ++t) {
      const int st = stage;
      const int k0 = tile0 + t * kBlockN;
      mbar_wait(ready(st), phase);
      if (++stage == kStages) stage = 0, phase ^= 1;

      // S = Q K^T (64 rows x kBlockN keys per warpgroup).
      float s[kSRegs];
      {
        const uint64_t k_desc = k_desc0 + st * (Cfg::kStageBytes >> 4);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kQkSteps; ++ks)
          QK::ss(s, q_desc + QTile::desc_step(0, ks), k_desc + KTile::desc_step(0, ks), ks > 0 ? 1 : 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
      }

      float alpha[2], beta[2];
      online_softmax(s, k0, alpha, beta);

      // P -> e4m3 A fragments (see the header comment for the key order).
      uint32_t pa[kPSteps][4];
#pragma unroll
      for (int c = 0; c < kPSteps; ++c) {
        if constexpr (kFp8) {
          const float* x = s + 16 * c;
          pa[c][0] = pack_e4m3x4(x[0], x[1], x[4], x[5]);
          pa[c][1] = pack_e4m3x4(x[2], x[3], x[6], x[7]);
          pa[c][2] = pack_e4m3x4(x[8], x[9], x[12], x[13]);
          pa[c][3] = pack_e4m3x4(x[10], x[11], x[14], x[15]);
        } else {  // 16-bit A fragment = the accumulator's two n8 chunks of this k16 step, as they are
          const float* x = s + 8 * c;
          pa[c][0] = pack2<QT>(x[0], x[1]);
          pa[c][1] = pack2<QT>(x[2], x[3]);
          pa[c][2] = pack2<QT>(x[4], x[5]);
          pa[c][3] = pack2<QT>(x[6], x[7]);
        }
      }

      const uint64_t vt_desc = vt_desc0 + st * (Cfg::kStageBytes >> 4);
      const bool last = t + 1 == num_tiles;
      // Every slice rescaled, then PV accumulated on the tensor cores in o_main itself, as one
      // group: 16-bit caches (their wgmma accumulates in FP32) and FP8 head_dim 256 never promoted.
      auto pv_into_main = [&] {
#pragma unroll
        for (int sl = 0; sl < kPvSlices; ++sl)
#pragma unroll
          for (int i = 0; i < kPvRegs; ++i) o_main[sl][i] *= alpha[(i / 2) % 2];
        wgmma_fence();
#pragma unroll
        for (int sl = 0; sl < kPvSlices; ++sl) {
          fence_regs(o_main[sl]);
#pragma unroll
          for (int c = 0; c < kPSteps; ++c) pv_mma(o_main[sl], pa[c], vt_desc + pv_step(sl, c), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int sl = 0; sl < kPvSlices; ++sl) fence_regs(o_main[sl]);
      };
      if constexpr (Cfg::kDirect16) {
        pv_into_main();
        mbar_arrive(empty(st));
      } else if constexpr (kPvSlices == 1 && kWide) {
        // 256-key tiles: each 128-key half accumulates on the tensor cores in its own register set
        // against its own P reference (softmax_tile's kParts), half 1 rescaled by beta, as two
        // 128-key tiles would. One P reference and one accumulator for all 256 keys measured ~5%
        // more error, 2% above FA3 FP8's at 4k (H200, 64 queries at the end of 4k-128k keys,
        // relative L2 vs FP64: 0.0217 / 0.0232 / 0.0216 / 0.0228 against 0.0207 / 0.0220 / 0.0205 /
        // 0.0216 with 128-key tiles; FA3 FP8 0.0212 / 0.0233 / 0.0227 / 0.0246).
        static_assert(kEveryTile, "256-key tiles promote every tile (prefill.cu takes them only then)");
        float o_half[kPvRegs];
        wgmma_fence();
        fence_regs(o_part);
        fence_regs(o_half);
#pragma unroll
        for (int c = 0; c < kPSteps / 2; ++c) pv_mma(o_part, pa[c], vt_desc + pv_step(0, c), c > 0 ? 1 : 0);
#pragma unroll
        for (int c = kPSteps / 2; c < kPSteps; ++c) pv_mma(o_half, pa[c], vt_desc + pv_step(0, c), c > kPSteps / 2 ? 1 : 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o_part);
        fence_regs(o_half);
        mbar_arrive(empty(st));
#pragma unroll
        for (int i = 0; i < kPvRegs; ++i)
          o_main[0][i] = fmaf(o_main[0][i], alpha[(i / 2) % 2], fmaf(o_part[i], beta[(i / 2) % 2], o_half[i]));
      } else if constexpr (kPvSlices == 1 && kEveryTile) {
        wgmma_fence();
        fence_regs(o_part);
#pragma unroll
        for (int c = 0; c < kPSteps; ++c) pv_mma(o_part, pa[c], vt_desc + pv_step(0, c), c > 0 ? 1 : 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o_part);
        mbar_arrive(empty(st));
#pragma unroll
        for (int i = 0; i < kPvRegs; ++i) o_main[0][i] = o_main[0][i] * alpha[(i / 2) % 2] + o_part[i];
      } else if constexpr (kPvSlices == 1) {
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
        for (int c = 0; c < kPSteps; ++c)
          pv_mma(o_part, pa[c], vt_desc + pv_step(0, c), (c > 0 || !part_empty) ? 1 : 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o_part);
        mbar_arrive(empty(st));
        part_empty = false;
        if (last || (promote_every > 0 && (t + 1) % promote_every == 0)) {
#pragma unroll
          for (int i = 0; i < kPvRegs; ++i) o_main[0][i] = o_main[0][i] * part_alpha[(i / 2) % 2] + o_part[i];
          part_alpha[0] = part_alpha[1] = 1.f;
          part_empty = true;
        }
      } else {
        // FP8 head_dim 256: 64-column slices. promote_every 0: pv_into_main. Every tile: one slice
        // at a time into o_part, promoted at once (a second slice accumulator to overlap the
        // promotion with the next slice's MMA made ptxas serialize every wgmma of the kernel for
        // lack of registers).
        static_assert(kPvSlices == 4, "head_dim 256: four 64-column slices");
        if (promote_every == 0) {
          pv_into_main();
        } else {
#pragma unroll
          for (int sl = 0; sl < kPvSlices; ++sl) {
            wgmma_fence();
            fence_regs(o_part);
#pragma unroll
            for (int c = 0; c < kPSteps; ++c) pv_mma(o_part, pa[c], vt_desc + pv_step(sl, c), c > 0 ? 1 : 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(o_part);
#pragma unroll
            for (int i = 0; i < kPvRegs; ++i) o_main[sl][i] = o_main[sl][i] * alpha[(i / 2) % 2] + o_part[i];
          }
        }
        mbar_arrive(empty(st));
      }
    }

    Item next{};
    if constexpr (kEarlyQ) {
      next = next_item(k + 1, false);
      if (next.idx >= 0) load_q(next, 0, q_first);
    }

    // ---- Epilogue: row sums across the quad, sinks, normalization, output and LSE.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // The quad's four shares of the row sum (kSumOnTc: column D of O, held by tq == 0; the other
      // lanes hold the zero columns D + 2 tq).
      float lsum = kSumOnTc ? o_main[0][4 * (D / 8) + 2 * h] : l[h];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const int row = row0 + wg * 64 + (warp % 4) * 16 + g + 8 * h;
      const int head = kv_head * group + row % group;
      float m_fin = m_ref[h];
      float scale_out = 1.f;
      if (p.sinks != nullptr && row < num_rows) {
        const float sink = p.sinks[head] * kLog2e;
        const float m_new = fmaxf(m_fin, sink);
        scale_out = exp2f(m_fin - m_new);  // m_fin = -inf (no keys) gives 0
        lsum = lsum * scale_out + exp2f(sink - m_new + 8.f);
        m_fin = m_new;
      }
      if (row >= num_rows) continue;
      const float inv = lsum > 0.f ? scale_out * v_scale / lsum : 0.f;  // the x256 of P cancels
      const int tok = q_begin + row / group;
      QT* o = static_cast<QT*>(p.out) + tok * p.o_tok_stride + head * p.o_head_stride;
#pragma unroll
      for (int sl = 0; sl < kPvSlices; ++sl)
#pragma unroll
        for (int i = 0; i < Cfg::kOutN / 8; ++i) {
          const int col = sl * Cfg::kOutN + 8 * i + 2 * tq;
          *reinterpret_cast<uint32_t*>(o + col) =
              pack2<QT>(o_main[sl][4 * i + 2 * h] * inv, o_main[sl][4 * i + 2 * h + 1] * inv);
        }
      if (p.lse != nullptr && tq == 0)
        p.lse[head * p.lse_head_stride + tok] = lsum > 0.f ? (m_fin + log2f(lsum) - 8.f) / kLog2e : -CUDART_INF_F;
    }
    it = kEarlyQ ? next : next_item(k + 1, false);
  }
}

// value(device) for the current device, kept per device in `cache` (devices past its 64 slots
// ask every time).
template <typename T, typename F>
T for_current_device(T (&cache)[64], F value) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return value(dev);
  if (cache[dev] == T{}) cache[dev] = value(dev);
  return cache[dev];
}

inline int prefill_sm_count() {
  static int counts[64] = {};
  return for_current_device(counts, [](int dev) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n;
  });
}

// CTAs of a persistent launch (one per SM), or 0 for one CTA per item. Persistent when there are
// more items than SMs and most items hold rows: a varlen batch whose longest query sets the row
// tile count of every sequence leaves many items empty, which the item loop would skip one
// atomic at a time (the one-CTA-per-item grid skips them for free).
inline int prefill_persistent_ctas(int64_t max_query_len, int64_t num_tokens, int64_t num_seqs, int64_t num_q_heads,
                                   int64_t num_kv_heads) {
  if (!FIREATTN_PREFILL_PERSISTENT || num_kv_heads <= 0 || num_seqs <= 0) return 0;
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t items = prefill_row_tiles(max_query_len * group) * num_seqs * num_kv_heads;
  const int64_t nonempty_upper = (prefill_row_tiles(num_tokens * group) + num_seqs) * num_kv_heads;
  const int sms = prefill_sm_count();
  return items > sms && 2 * nonempty_upper >= items ? sms : 0;
}

template <typename QT, bool kFp8, int D, bool kWide>
void launch_prefill_tiles(const AttentionParams& p, int max_query_len, int num_tokens, int promote_every,
                          cudaStream_t stream) {
  using Cfg = PrefillConfig<D, kFp8 ? 1 : 2, kWide>;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int tiles = static_cast<int>(prefill_row_tiles(static_cast<int64_t>(max_query_len) * group));
  if (tiles == 0 || p.num_seqs == 0) return;
  auto kernel = prefill_kernel<QT, kFp8, D, true, kWide>;
  if constexpr (kFp8 && D != 256 && !kWide) {  // the wide loop runs only with promote_every 1
    if (promote_every != 1) kernel = prefill_kernel<QT, kFp8, D, false, kWide>;
  }
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  // (prefill.cu checks that the items fit an int)
  PrefillSchedule sched{nullptr, tiles * p.num_seqs * p.num_kv_heads, tiles};
  dim3 grid(tiles, p.num_seqs, p.num_kv_heads);
  const int ctas = prefill_persistent_ctas(max_query_len, num_tokens, p.num_seqs, p.num_q_heads, p.num_kv_heads);
  if (ctas > 0 && !kWide) {  // the 256-key loop takes one CTA per item (kItemLoop)
    static std::atomic<unsigned> launches{0};
    static int* counter_base[64] = {};  // this file's prefill_counters on each device
    int* counters = for_current_device(counter_base, [](int) {
      void* a = nullptr;
      cudaGetSymbolAddress(&a, prefill_counters);
      return static_cast<int*>(a);
    });
    sched.counters = counters + 2 * (launches.fetch_add(1) % kPrefillCounterSlots);
    grid = dim3(ctas, 1, 1);
  }
#if FIREATTN_PREFILL_TMA
  CUtensorMap kv_map;
  std::memset(&kv_map, 0, sizeof(kv_map));
  int use_tma = 0;
  if constexpr (Cfg::kTmaLayout) {  // box = one K-tile column chunk (CW bytes) x min(block_size, kBlockN) keys
    using KTile = KMajorTile<Cfg::kBlockN, Cfg::kRowBytes>;
    use_tma = encode_kv_tensor_map(&kv_map, p, Cfg::kRowBytes, KTile::CW, Cfg::kBlockN) ? 1 : 0;
  }
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, promote_every, sched, kv_map, use_tma);
#else
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, promote_every, sched);
#endif
}

// wide: 256-key tiles (FP8 head_dim 64 only; the caller decides, prefill.cu's prefill_wide_tiles).
// num_tokens: query rows of the batch (all sequences).
template <typename QT, bool kFp8, int D>
void launch_prefill(const AttentionParams& p, int max_query_len, int num_tokens, int promote_every, bool wide,
                    cudaStream_t stream) {
  if constexpr (kFp8 && D == 64) {
    if (wide) {
      launch_prefill_tiles<QT, kFp8, D, true>(p, max_query_len, num_tokens, promote_every, stream);
      return;
    }
  }
  launch_prefill_tiles<QT, kFp8, D, false>(p, max_query_len, num_tokens, promote_every, stream);
}

}  // namespace fireattn
