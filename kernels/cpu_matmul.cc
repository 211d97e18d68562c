// Small-M matmul for CPU: out[M, N] = x[M, K] @ w[K, N] in fp32, with w packed in column
// panels: panels[N / 64, K, 64], panel j holding columns 64j..64j+63 of every row of w
// (models.layout.Panels), in fp32 or in bf16 (half the bytes to stream; each weight is widened
// to fp32 exactly as it is loaded, so the products and sums are fp32 either way), or as GGUF
// blocks (Q4_1, Q8_0, Q4_K, Q6_K, Q8_DM) dequantized as they are read (quant_rows,
// dequant_panel).
// Built and loaded by cpu_matmul.py; XLA calls it through its FFI (custom calls
// "jaxspec_small_m_matmul" and "jaxspec_small_m_matmul_indexed").
//
// Decoding reads every weight once per step, and verifying gamma + 1 tokens should cost about
// the same. XLA:CPU streams one row at copy bandwidth but takes a slower path for 2-16 rows.
// Here each panel is one contiguous stream: for a block of up to kMaxRows rows, the 64 columns'
// partial sums stay in vector registers while k runs through the panel (one broadcast of
// x[m, k] per row and k), so w is read once per block of rows and in address order, each
// weight vector loaded into a register once (not folded into every row's FMA) and prefetched
// kPrefetch weights ahead. AVX2's 16 registers hold one row's 64 sums, not several rows':
// there, up to kStreamRows rows take turns over short blocks of the panel (stream256).
//
// Every output element accumulates its K products with fused multiply-adds in k order, whatever
// M, the row block or the thread, so a row's result is bit-identical whether it is computed
// alone or with other rows: a verify of gamma + 1 tokens computes exactly what gamma + 1
// single-token steps through this kernel compute.
//
// ISA: AVX-512F or AVX2 + FMA, chosen at run time (jaxspec_small_m_isa says which; Python falls
// back to XLA's dot when it is 0). Panels are shared between the caller and XLA's intra-op
// thread pool (cpu_threads.h: at most jaxspec_small_m_set_threads threads in all).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;  // columns per panel (models.layout.PANEL)
constexpr int kMaxRows = 6;     // rows per register block
// Prefetch distance in weights (32 rows of a panel ahead: 8 KB of fp32, 4 KB of bf16). Without
// it, streaming the weights from memory and the FMAs did not overlap on an Intel Xeon: the
// 49,152-column output layer took 26% longer for 3 rows than for 1 and 2.4x for 5; with it,
// about the same.
constexpr int64_t kPrefetch = 2048;

// How the panels hold the weights: fp32, bf16 (widened to fp32 as they are loaded), or GGUF
// blocks (dequantized to fp32 as gguf's numpy code does, see quant_rows).
enum Format { kF32, kBF16, kQ4_1, kQ8_0, kQ4_K, kQ6_K, kQ8_DM };

struct Problem {
  const float* x;       // [M, K]
  const void* panels;   // [N / kPanel, K, kPanel] fp32 or bf16, or [N / kPanel, K / 32, bytes]
  float* out;           // [M, N]
  int64_t M, K, N;
  Format format;
};

// bf16 -> fp32 is exact: the 16 bits are the top half of the fp32 pattern.
__attribute__((target("avx512f"))) inline __m512 load_bf16x16(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
__attribute__((target("avx2,fma"))) inline __m256 load_bf16x8(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// out[m0 : m0 + MR, columns of panel j] = x[m0 : m0 + MR] @ that panel (at `panel`), its weights
// of type WT loaded by LOADW. NV vectors of LANES floats cover kPanel / STRIPS columns; STRIPS passes
// cover the panel.
#define JAXSPEC_BLOCK(NAME, TARGET, VEC, LANES, ZERO, WT, LOADW, STORE, FMA, SET1)             \
  template <int MR>                                                                          \
  __attribute__((target(TARGET))) void NAME(const Problem& p, const void* panel, int64_t m0,   \
                                            int64_t j) {                                     \
    constexpr int NV = LANES == 16 ? 4 : 2;                                                  \
    constexpr int STRIPS = kPanel / (NV * LANES);                                            \
    constexpr int LINES = (NV * LANES * int(sizeof(WT)) + 63) / 64; /* lines a strip reads */\
    const float* x = p.x + m0 * p.K;                                                         \
    for (int s = 0; s < STRIPS; ++s) {                                                       \
      VEC acc[MR][NV];                                                                       \
      for (int r = 0; r < MR; ++r)                                                           \
        for (int v = 0; v < NV; ++v) acc[r][v] = ZERO;                                       \
      const WT* w = static_cast<const WT*>(panel) + s * NV * LANES;                          \
      for (int64_t k = 0; k < p.K; ++k, w += kPanel) {                                       \
        VEC wv[NV];                                                                          \
        for (int l = 0; l < LINES; ++l)                                                      \
          _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch) + 64 * l, _MM_HINT_T0);  \
        for (int v = 0; v < NV; ++v) {                                                       \
          wv[v] = LOADW(w + LANES * v);                                                      \
          __asm__("" : "+v"(wv[v])); /* a register: one load, not one per row's FMA */       \
        }                                                                                    \
        for (int r = 0; r < MR; ++r) {                                                       \
          VEC b = SET1(x[r * p.K + k]);                                                      \
          for (int v = 0; v < NV; ++v) acc[r][v] = FMA(b, wv[v], acc[r][v]);                 \
        }                                                                                    \
      }                                                                                      \
      float* out = p.out + m0 * p.N + j * kPanel + s * NV * LANES;                           \
      for (int r = 0; r < MR; ++r)                                                           \
        for (int v = 0; v < NV; ++v) STORE(out + r * p.N + LANES * v, acc[r][v]);            \
    }                                                                                        \
  }

JAXSPEC_BLOCK(block512, "avx512f", __m512, 16, _mm512_setzero_ps(), float, _mm512_loadu_ps,
              _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_set1_ps)
JAXSPEC_BLOCK(block256, "avx2,fma", __m256, 8, _mm256_setzero_ps(), float, _mm256_loadu_ps,
              _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_set1_ps)
JAXSPEC_BLOCK(block512_bf16, "avx512f", __m512, 16, _mm512_setzero_ps(), uint16_t, load_bf16x16,
              _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_set1_ps)
JAXSPEC_BLOCK(block256_bf16, "avx2,fma", __m256, 8, _mm256_setzero_ps(), uint16_t, load_bf16x8,
              _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_set1_ps)

// Up to kStreamRows rows on AVX2, panel j: the rows take turns over blocks of kStreamBlock panel
// rows (8 KB of fp32), each row's 64 sums in 8 registers while it runs through the block and in
// memory between blocks, so the first row reads the block from memory in address order and
// the others read it from L1. The register blocks above would hold a quarter of the panel's
// columns for up to 6 rows and read the panel in four strided passes: on an AMD EPYC without
// AVX-512 (2 threads, the 113 MB output layer, a standalone benchmark) they streamed 8-11
// GB/s for 1 to 9 rows where this order streams 18-20 GB/s for 1 row, 15-17 for 3, 13-14 for
// 5 and 10-11 for 9 (a read-only pass: 20-22). For more rows the register blocks do more
// arithmetic per load and are faster. Each sum still accumulates its K products in k order:
// the same bits. bf16 blocks are widened once, by the first row, for the others.
constexpr int kStreamRows = 9;
constexpr int64_t kStreamBlock = 32;

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  return load_bf16x8(p);
}

// acc[0..7] (one row's 64 sums) += x[k] * w[k, :] for the n panel rows of a block. The first row
// through a block reads it from memory (prefetching kPrefetch weights ahead) and, given `wide`,
// stores the weights widened to fp32 there, so that the other rows of bf16 panels do not widen
// them again.
template <typename WT, bool kFirst>
__attribute__((target("avx2,fma"))) inline void row_pass(__m256* acc, const float* x, const WT* w,
                                                         int64_t n, float* wide) {
  constexpr int kLines = kPanel * int(sizeof(WT)) / 64;  // cache lines per panel row
  for (int64_t k = 0; k < n; ++k, w += kPanel) {
    if constexpr (kFirst)
      for (int l = 0; l < kLines; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch) + 64 * l, _MM_HINT_T0);
    const __m256 b = _mm256_set1_ps(x[k]);
    for (int v = 0; v < kPanel / 8; ++v) {
      const __m256 wv = load8(w + 8 * v);
      if constexpr (kFirst && sizeof(WT) == 2)
        if (wide) _mm256_store_ps(wide + k * kPanel + 8 * v, wv);
      acc[v] = _mm256_fmadd_ps(b, wv, acc[v]);
    }
  }
}

template <typename WT>
__attribute__((target("avx2,fma"))) void stream256(const Problem& p, int64_t j) {
  constexpr bool kWiden = sizeof(WT) == 2;  // bf16: widen each block once, for all rows
  alignas(32) float sums[kStreamRows][kPanel] = {};
  alignas(32) float wide[kWiden ? kStreamBlock : 1][kPanel];
  const WT* panel = static_cast<const WT*>(p.panels) + j * p.K * kPanel;
  for (int64_t k0 = 0; k0 < p.K; k0 += kStreamBlock) {
    const int64_t n = std::min(p.K, k0 + kStreamBlock) - k0;
    for (int64_t r = 0; r < p.M; ++r) {
      __m256 acc[kPanel / 8];
      for (int v = 0; v < kPanel / 8; ++v) acc[v] = _mm256_load_ps(sums[r] + 8 * v);
      const float* x = p.x + r * p.K + k0;
      if (r == 0)
        row_pass<WT, true>(acc, x, panel + k0 * kPanel, n, p.M > 1 ? &wide[0][0] : nullptr);
      else if (kWiden)
        row_pass<float, false>(acc, x, &wide[0][0], n, nullptr);
      else
        row_pass<WT, false>(acc, x, panel + k0 * kPanel, n, nullptr);
      for (int v = 0; v < kPanel / 8; ++v) _mm256_store_ps(sums[r] + 8 * v, acc[v]);
    }
  }
  for (int64_t r = 0; r < p.M; ++r)
    std::memcpy(p.out + r * p.N + j * kPanel, sums[r], sizeof sums[r]);
}

// GGUF quantized panels (AVX2 + F16C, on AVX-512 CPUs too): panel j of a [K, N] weight is
// K / 32 blocks of 32 panel rows, each block a header of per-column scales (and offsets) then
// the quants, row by row (models.quantized packs them; 4-bit quants: byte 8g + l of a row holds
// column 16g + l in its low nibble and column 16g + 8 + l in its high one):
//   Q4_1 (uint8, 1280 bytes): d[64] fp16, m[64] fp16, 32 bytes per row (GGUF Q4_1 and Q4_0);
//   Q8_0 (int8, 2176 bytes):  d[64] fp16, 64 int8 per row (GGUF Q8_0 and Q5_0);
//   Q4_K (uint8, 1536 bytes): d[64] fp32, m[64] fp32, 32 bytes per row (GGUF Q4_K);
//   Q6_K (int8, 2560 bytes):  d[64] fp32 for rows 0-15, d[64] for rows 16-31, 64 int8 per row
//        (GGUF Q6_K's quants q - 32 and its sub-blocks' scales d * sc);
//   Q8_DM (int8, 3072 bytes): d[2][64] fp32, m[2][64] fp32 (rows 0-15, 16-31), 64 int8 per row
//        (any of the others exactly, for a fused weight whose parts differ in kind, and
//        GGUF Q5_1 and Q5_K).
// A weight is dequantized exactly as gguf's numpy code does (d * q, then + m; or q * d): d * q is
// exact in fp32 (at most 23 significant bits), so only + m rounds and one FMA rounds the same,
// and the products and sums are those of the fp32 panels of the dequantized weights, bit for
// bit; 0.625 to 1.5 bytes per weight are read instead of 4.
// Up to kWideRows rows (decode steps, verifies, small batches): quant_rows dequantizes 16
// columns of a panel row at a time into two registers and up to kFusedRows rows multiply them
// there, so a verify's extra rows cost little more than their FMAs (the default model's
// projections, AMD EPYC, 2 threads: 1 row 3.9 ms, 2 rows 5.2, 3 6.3, 4 7.2, 5 8.1, 6 9.6,
// against 4.0 / 5.7 / 7.0 / 8.3 / 9.7 / 11.3 when the first row dequantized each block into a
// buffer that the other rows read). More rows (prefill): dequant_panel widens the whole panel
// once into an fp32 buffer and the fp32 row blocks run on it (912 rows: 1.27 s against 1.69).
constexpr int64_t kQBlock = 32;    // panel rows per block (GGUF's block size)
constexpr int64_t kQPrefetch = 4;  // blocks ahead
constexpr int kFusedRows = 6;      // rows quant_rows takes at once (AVX2's 16 registers)
constexpr int64_t kWideRows = 9;   // more rows: an fp32 copy of the panel (measured crossover)

template <Format F>
struct Quant {
  static constexpr bool kNibbles = F == kQ4_1 || F == kQ4_K;  // 4-bit quants, else int8
  static constexpr bool kOffsets = F != kQ8_0 && F != kQ6_K;  // d * q + m, else q * d
  static constexpr int64_t kScaleBytes = F == kQ4_1 || F == kQ8_0 ? 2 : 4;  // fp16 or fp32
  static constexpr int64_t kGroups = F == kQ6_K || F == kQ8_DM ? 2 : 1;  // scale groups
  static constexpr int64_t kGroupRows = kQBlock / kGroups;  // panel rows per scale
  static constexpr int64_t kScales = kGroups * kPanel * kScaleBytes;  // bytes of d (and of m)
  static constexpr int64_t kHeader = (kOffsets ? 2 : 1) * kScales;
  static constexpr int64_t kRowBytes = kNibbles ? kPanel / 2 : kPanel;  // per panel row
  static constexpr int64_t kBytes = kHeader + kQBlock * kRowBytes;      // per block
};

// The block's 64 scales (and offsets) of scale group `group`, as fp32 in buffer[0..63] (and
// buffer[64..127]): copied, or widened from fp16.
template <Format F>
__attribute__((target("avx2,fma,f16c"))) inline void scales(const uint8_t* block, int64_t group,
                                                             float* buffer) {
  using Q = Quant<F>;
  const uint8_t* at = block + group * kPanel * Q::kScaleBytes;  // d, then (m) kScales later
  for (int part = 0; part < (Q::kOffsets ? 2 : 1); ++part)
    for (int v = 0; v < kPanel / 8; ++v) {
      const uint8_t* from = at + part * Q::kScales + v * 8 * Q::kScaleBytes;
      __m256 scale;
      if constexpr (Q::kScaleBytes == 4)
        scale = _mm256_loadu_ps(reinterpret_cast<const float*>(from));
      else
        scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
      _mm256_store_ps(buffer + part * kPanel + 8 * v, scale);
    }
}

// Columns 16g..16g+15 of one panel row (its quants at q) -> w[0], w[1], given the scales d[64]
// and offsets m[64] of the row's group as fp32.
template <Format F>
__attribute__((target("avx2,fma,f16c"))) inline void dequant16(const uint8_t* q, int g,
                                                                const float* d, const float* m,
                                                                __m256 w[2]) {
  if constexpr (Quant<F>::kNibbles) {
    const __m256i bytes =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * g)));
    const __m256i nibbles[2] = {_mm256_and_si256(bytes, _mm256_set1_epi32(15)),
                                _mm256_srli_epi32(bytes, 4)};
    for (int h = 0; h < 2; ++h)  // d * q is exact, so one FMA rounds as d * q, then + m
      w[h] = _mm256_fmadd_ps(_mm256_load_ps(d + 16 * g + 8 * h), _mm256_cvtepi32_ps(nibbles[h]),
                             _mm256_load_ps(m + 16 * g + 8 * h));
  } else {
    for (int h = 0; h < 2; ++h) {
      const __m256 qv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16 * g + 8 * h))));
      const __m256 dv = _mm256_load_ps(d + 16 * g + 8 * h);
      if constexpr (Quant<F>::kOffsets)
        w[h] = _mm256_fmadd_ps(dv, qv, _mm256_load_ps(m + 16 * g + 8 * h));
      else
        w[h] = _mm256_mul_ps(qv, dv);
    }
  }
}

// Groups of 16 columns quant_rows takes at once for MR rows: 2·MR·groups independent sums
// (FMA chains) in flight, at least 6, in at most 8 registers.
constexpr int fused_groups(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }

// out[m0 : m0 + MR, columns of panel j] for MR <= kFusedRows rows: NG groups of 16 columns at
// a time, their MR x 2NG sums in registers through all of K, each weight dequantized once into
// a register for all MR rows (a Block: the panel pointer is unused).
template <Format F, int MR>
__attribute__((target("avx2,fma,f16c"))) void quant_rows(const Problem& p, const void* /*unused*/,
                                                         int64_t m0, int64_t j) {
  using Q = Quant<F>;
  constexpr int NG = fused_groups(MR);
  alignas(32) float buffer[2 * kPanel];
  const int64_t blocks = p.K / kQBlock;
  const uint8_t* panel = static_cast<const uint8_t*>(p.panels) + j * blocks * Q::kBytes;
  for (int g0 = 0; g0 < kPanel / 16; g0 += NG) {
    __m256 acc[MR][2 * NG];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2 * NG; ++v) acc[r][v] = _mm256_setzero_ps();
    const uint8_t* block = panel;
    const float* x = p.x + m0 * p.K;
    for (int64_t b = 0; b < blocks; ++b, block += Q::kBytes, x += kQBlock) {
      const uint8_t* quants = block + Q::kHeader;
      for (int64_t s = 0; s < Q::kGroups; ++s) {
        scales<F>(block, s, buffer);
        for (int64_t k = s * Q::kGroupRows; k < (s + 1) * Q::kGroupRows; ++k) {
          if (g0 == 0)  // the first pass: the block kQPrefetch ahead, 40 to 96 bytes per row
            _mm_prefetch(reinterpret_cast<const char*>(block) + kQPrefetch * Q::kBytes +
                             k * Q::kBytes / kQBlock, _MM_HINT_T0);
          for (int g = 0; g < NG; ++g) {
            __m256 w[2];
            dequant16<F>(quants + k * Q::kRowBytes, g0 + g, buffer, buffer + kPanel, w);
            for (int r = 0; r < MR; ++r) {
              const __m256 xk = _mm256_set1_ps(x[r * p.K + k]);
              for (int h = 0; h < 2; ++h)
                acc[r][2 * g + h] = _mm256_fmadd_ps(xk, w[h], acc[r][2 * g + h]);
            }
          }
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2 * NG; ++v)
        _mm256_storeu_ps(p.out + (m0 + r) * p.N + j * kPanel + 16 * g0 + 8 * v, acc[r][v]);
  }
}

// Panel j dequantized into wide[K, 64] (fp32, the layout of an fp32 panel).
template <Format F>
__attribute__((target("avx2,fma,f16c"))) void dequant_panel(const Problem& p, int64_t j,
                                                            float* wide) {
  using Q = Quant<F>;
  alignas(32) float buffer[2 * kPanel];
  const int64_t blocks = p.K / kQBlock;
  const uint8_t* block = static_cast<const uint8_t*>(p.panels) + j * blocks * Q::kBytes;
  for (int64_t b = 0; b < blocks; ++b, block += Q::kBytes) {
    for (int64_t s = 0; s < Q::kGroups; ++s) {
      scales<F>(block, s, buffer);
      for (int64_t k = s * Q::kGroupRows; k < (s + 1) * Q::kGroupRows; ++k) {
        float* row = wide + (b * kQBlock + k) * kPanel;
        for (int g = 0; g < kPanel / 16; ++g) {
          __m256 w[2];
          dequant16<F>(block + Q::kHeader + k * Q::kRowBytes, g, buffer, buffer + kPanel, w);
          _mm256_store_ps(row + 16 * g, w[0]);
          _mm256_store_ps(row + 16 * g + 8, w[1]);
        }
      }
    }
  }
}

using Block = void (*)(const Problem&, const void*, int64_t, int64_t);
using Stream = void (*)(const Problem&, int64_t);

struct Isa {
  int level;  // 2: AVX-512F, 1: AVX2 + FMA, 0: neither (the kernel refuses to run)
  Block blocks[kMaxRows];       // fp32 panels, 1..kMaxRows rows
  Block blocks_bf16[kMaxRows];  // bf16 panels
  Stream stream, stream_bf16;   // up to kStreamRows rows (nullptr: the blocks serve every M)
};

// AVX-512 has 32 registers (6 rows x 4 accumulators + 4 weights + 1), AVX2 16 (6 x 2 + 2 + 1).
const Isa kAvx512{2,
                  {block512<1>, block512<2>, block512<3>, block512<4>, block512<5>, block512<6>},
                  {block512_bf16<1>, block512_bf16<2>, block512_bf16<3>, block512_bf16<4>,
                   block512_bf16<5>, block512_bf16<6>},
                  nullptr, nullptr};
const Isa kAvx2{1,
                {block256<1>, block256<2>, block256<3>, block256<4>, block256<5>, block256<6>},
                {block256_bf16<1>, block256_bf16<2>, block256_bf16<3>, block256_bf16<4>,
                 block256_bf16<5>, block256_bf16<6>},
                stream256<float>, stream256<uint16_t>};
const Isa kNone{0, {}, {}, nullptr, nullptr};

const Isa& detect() {
  __builtin_cpu_init();
  // F16C (the quantized panels' scales) comes with every AVX2 CPU; checked all the same.
  if (!__builtin_cpu_supports("f16c")) return kNone;
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

const Isa* isa = &detect();  // jaxspec_small_m_set_isa may lower it (tests of the AVX2 path)

// Every row of panel j (at `panel`), kMaxRows rows at a time.
void row_blocks(const Problem& p, const Block* blocks, const void* panel, int64_t j) {
  for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows)
    blocks[std::min<int64_t>(p.M - m0, kMaxRows) - 1](p, panel, m0, j);
}

// Quantized panels [j_begin, j_end): up to kWideRows rows by quant_rows (kFusedRows at a time),
// more through an fp32 copy of each panel and the fp32 row blocks.
template <Format F>
void quant_panels(const Problem& p, int64_t j_begin, int64_t j_end) {
  if (p.M <= kWideRows) {
    constexpr Block kFused[kFusedRows] = {quant_rows<F, 1>, quant_rows<F, 2>, quant_rows<F, 3>,
                                           quant_rows<F, 4>, quant_rows<F, 5>, quant_rows<F, 6>};
    for (int64_t j = j_begin; j < j_end; ++j)
      for (int64_t m0 = 0; m0 < p.M; m0 += kFusedRows)
        kFused[std::min<int64_t>(p.M - m0, kFusedRows) - 1](p, nullptr, m0, j);
    return;
  }
  thread_local std::vector<float> buffer;
  buffer.resize(p.K * kPanel + 8);
  float* const wide = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(buffer.data()) + 31) & ~uintptr_t{31});
  for (int64_t j = j_begin; j < j_end; ++j) {
    dequant_panel<F>(p, j, wide);
    row_blocks(p, isa->blocks, wide, j);
  }
}

void run_quant_panels(const Problem& p, int64_t j_begin, int64_t j_end) {
  switch (p.format) {
    case kQ4_1: return quant_panels<kQ4_1>(p, j_begin, j_end);
    case kQ8_0: return quant_panels<kQ8_0>(p, j_begin, j_end);
    case kQ4_K: return quant_panels<kQ4_K>(p, j_begin, j_end);
    case kQ6_K: return quant_panels<kQ6_K>(p, j_begin, j_end);
    default: return quant_panels<kQ8_DM>(p, j_begin, j_end);
  }
}

// Panels [j_begin, j_end) for every row: a few rows streamed together where the ISA has a stream,
// else row blocks inside each panel (the panel is read from memory once, then from cache for
// the next blocks).
void run_panels(const Problem& p, int64_t j_begin, int64_t j_end) {
  if (p.format != kF32 && p.format != kBF16) return run_quant_panels(p, j_begin, j_end);
  const bool bf16 = p.format == kBF16;
  const Stream stream = bf16 ? isa->stream_bf16 : isa->stream;
  if (stream && p.M <= kStreamRows) {
    for (int64_t j = j_begin; j < j_end; ++j) stream(p, j);
    return;
  }
  const Block* blocks = bf16 ? isa->blocks_bf16 : isa->blocks;
  const size_t bytes = bf16 ? 2 : 4;
  for (int64_t j = j_begin; j < j_end; ++j)
    row_blocks(p, blocks, static_cast<const char*>(p.panels) + j * p.K * kPanel * bytes, j);
}

// ---------------------------------------------------------------- threads

// Rows of the items a many-row product (a prefill) is split into where it has few panels per
// thread: the 9 panels of a [*, 576] weight went 5 / 4 to 2 threads, now 36 / 36 items.
constexpr int64_t kRowChunk = 96;

// Rows [first, first + rows) of p (fewer at its end).
Problem row_chunk(const Problem& p, int64_t first, int64_t rows) {
  Problem chunk = p;
  chunk.x = p.x + first * p.K;
  chunk.out = p.out + first * p.N;
  chunk.M = std::min(rows, p.M - first);
  return chunk;
}

void run(const Problem& p, ffi::ThreadPool& pool) {
  const int64_t panels = p.N / kPanel;
  const int64_t threads = jaxspec::usable_threads(pool);
  const int64_t chunks =
      p.M >= 2 * kRowChunk && panels < 16 * threads ? (p.M + kRowChunk - 1) / kRowChunk : 1;
  const int64_t rows = (p.M + chunks - 1) / chunks;
  // Fewer than 4 items per thread: synchronising costs more than it saves.
  if (threads <= 1 || panels * chunks < 4 * threads) return run_panels(p, 0, panels);
  jaxspec::parallel_ranges(pool, panels * chunks, threads,
                           [&p, chunks, rows](int64_t begin, int64_t end) {
                             for (int64_t item = begin; item < end; ++item)  // (panel, rows)
                               run_panels(row_chunk(p, item % chunks * rows, rows),
                                          item / chunks, item / chunks + 1);
                           });
}

int64_t quant_bytes(Format f) {
  switch (f) {
    case kQ4_1: return Quant<kQ4_1>::kBytes;
    case kQ8_0: return Quant<kQ8_0>::kBytes;
    case kQ4_K: return Quant<kQ4_K>::kBytes;
    case kQ6_K: return Quant<kQ6_K>::kBytes;
    default: return Quant<kQ8_DM>::kBytes;
  }
}

// The panels' format from their element type and shape (kF32 with ok = false: not panels of
// x's K).
Format format_of(ffi::AnyBuffer& panels, int64_t K, bool& ok) {
  auto pd = panels.dimensions();
  const ffi::DataType t = panels.element_type();
  ok = pd.size() == 3;
  if (ok && (t == ffi::DataType::U8 || t == ffi::DataType::S8)) {  // the kind by its bytes
    const bool u8 = t == ffi::DataType::U8;
    const Format f = pd[2] == Quant<kQ4_K>::kBytes   ? kQ4_K
                     : pd[2] == Quant<kQ6_K>::kBytes  ? kQ6_K
                     : pd[2] == Quant<kQ8_DM>::kBytes ? kQ8_DM
                     : u8                             ? kQ4_1
                                                      : kQ8_0;
    ok = K % kQBlock == 0 && pd[1] == K / kQBlock && (f == kQ4_1 || f == kQ4_K) == u8 &&
         pd[2] == quant_bytes(f);
    return f;
  }
  ok = ok && pd[1] == K && pd[2] == kPanel &&
       (t == ffi::DataType::F32 || t == ffi::DataType::BF16);
  return t == ffi::DataType::BF16 ? kBF16 : kF32;
}

ffi::Error SmallMMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  bool ok = xd.size() == 2;
  const Format format = ok ? format_of(panels, xd[1], ok) : kF32;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "jaxspec small-M matmul: expected x[M, K] and fp32 or bf16 panels[N / 64, K, 64] or "
        "quantized (u8 or s8) blocks[N / 64, K / 32, bytes]");
  if (isa->level == 0) return ffi::Error::Internal("jaxspec small-M matmul: no AVX2/FMA");
  Problem p{x.typed_data(), panels.untyped_data(), out->typed_data(), xd[0], xd[1],
            panels.dimensions()[0] * kPanel, format};
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  run(p, pool);
  return ffi::Error::Success();
}

// The same product with the weight chosen at run time among several of the same shape (one
// per decoder layer): x[M, K], index i32[], then panels_0 .. panels_{L-1}. A loop over layers
// (lax.scan) passes every layer's own buffer and its counter, so the weights are read in place
// where a slice of one stacked array would be copied first.
ffi::Error SmallMMatmulIndexed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::S32> index, ffi::RemainingArgs layers,
                               ffi::ResultBuffer<ffi::F32> out) {
  if (index.element_count() != 1)
    return ffi::Error::InvalidArgument("jaxspec small-M matmul: index must be a scalar");
  const int64_t i = *index.typed_data();
  if (i < 0 || i >= static_cast<int64_t>(layers.size()))
    return ffi::Error::InvalidArgument("jaxspec small-M matmul: index out of range");
  auto panels = layers.get<ffi::AnyBuffer>(i);
  if (!panels.has_value()) return panels.error();
  return SmallMMatmul(pool, x, *panels, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_small_m_matmul, SmallMMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_small_m_matmul_indexed, SmallMMatmulIndexed,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int jaxspec_small_m_isa() { return isa->level; }

// Use at most ISA `level` (1: AVX2 even where AVX-512 is present); returns the level in use.
extern "C" int jaxspec_small_m_set_isa(int level) {
  if (level < isa->level) isa = level >= 1 ? &kAvx2 : &kNone;
  return isa->level;
}

// At most this many threads (the caller's included) share one product or attention.
extern "C" int jaxspec_small_m_set_threads(int threads) {
  jaxspec::max_threads = threads < 1 ? 1 : threads;
  return jaxspec::max_threads;
}
