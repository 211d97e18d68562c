// Prefill attention for CPU: a prompt's own causal attention, positions 0..T-1 of every row,
//   out[b, t, k, g] = softmax_s(q[b, t, k, g] . keys[b, s, k] / sqrt(Dh)) values[b, s, k]
// over s <= t (and s > t - W with a sliding window W), reading q and values where the decoder's
// projections left them ([B, T, K, G, Dh], [B, T, K, Dh]) and the keys transposed ([B, K, Dh,
// T]: one transposition per layer in the program). Built into the same library as
// cpu_matmul.cc (custom call "jaxspec_prefill_attention").
//
// Why: XLA's blocked attention (models.decoder._attention_prefill) spent most of its time
// copying and transposing each block's keys and values for its dots, and ran the dots at a
// third of the cores' FMA rate. Here an item is one (row b, key/value head k, block of kRows
// query positions): its G * kRows query vectors share every key and value they read, as the
// row blocks of a matmul share a weight. Scores: 16 keys at a time, a [Dh, 16] tile of the
// transposed keys that 6 query vectors at a time multiply (their 12 partial sums in registers).
// Softmax per query vector over the keys it may see (exp8). Output: 64 keys at a time, 6 query
// vectors x 16 of the Dh columns in registers. The sums run in a fixed order per item, so the
// result does not depend on the thread; it is not the order of the decode kernel
// (cpu_attention.cc), whose rows a prefill never has to match.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_simd.h"
#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxspec::exp8;
using jaxspec::kLanes;

constexpr int64_t kRows = 8;   // query positions per item
constexpr int kBlock = 6;      // query vectors per register block
constexpr int64_t kTile = 16;  // keys per score tile
constexpr int64_t kChunk = 64;  // keys per output pass

struct Problem {
  const float* q;       // [B, T, K, G, Dh]
  const float* keys;    // [B, K, Dh, T]
  const float* values;  // [B, T, K, Dh]
  float* out;           // [B, T, K, G, Dh]
  int64_t B, T, K, G, Dh, window;  // window 0: none
};

// The keys [lo, hi) that the queries t0..t1-1 see between them.
void key_range(const Problem& p, int64_t t0, int64_t t1, int64_t& lo, int64_t& hi) {
  lo = p.window > 0 ? std::max<int64_t>(0, t0 - p.window + 1) : 0;
  hi = t1;
}

// out[r, 0:16] = (accumulate ? out[r, 0:16] : 0) + sum_i x_r[i] rows[i, 0:16] (i < n) for MR
// vectors x_r, the rows `stride` floats apart: scores (x_r a query, rows a [Dh, 16] key tile)
// and outputs (x_r a query's weights, rows 16 columns of the values).
template <int MR>
JAXSPEC_AVX2 void block_product(const float* const* x, const float* rows, int64_t stride,
                                int64_t n, bool accumulate, float* const* out) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = accumulate ? _mm256_loadu_ps(out[r] + 8 * h) : _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 row0 = _mm256_loadu_ps(rows + i * stride);
    const __m256 row1 = _mm256_loadu_ps(rows + i * stride + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 b = _mm256_set1_ps(x[r][i]);
      acc[r][0] = _mm256_fmadd_ps(b, row0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, row1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out[r] + 8 * h, acc[r][h]);
}

using Product = void (*)(const float* const*, const float*, int64_t, int64_t, bool,
                         float* const*);
constexpr Product kProduct[kBlock] = {block_product<1>, block_product<2>, block_product<3>,
                                      block_product<4>, block_product<5>, block_product<6>};

// Lanes j0..j0+7 of a row that lie in [first, last] (all ones there, zeros elsewhere).
JAXSPEC_AVX2 inline __m256 seen(int64_t j0, int64_t first, int64_t last) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j0)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_castsi256_ps(_mm256_and_si256(
      _mm256_cmpgt_epi32(index, _mm256_set1_epi32(static_cast<int>(first) - 1)),
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last) + 1), index)));
}

// Scratch of one thread: scores [R, n] (rows `width` apart), a last partial key tile [Dh, 16],
// output sums [R, Dh].
struct Scratch {
  std::vector<float> scores, tile, sums;
};

// The item (b, k, queries t0..t1-1).
JAXSPEC_AVX2 void run_item(const Problem& p, int64_t b, int64_t k, int64_t t0, int64_t t1,
                           Scratch& s) {
  int64_t lo, hi;
  key_range(p, t0, t1, lo, hi);
  const int64_t n = hi - lo, R = (t1 - t0) * p.G, Dh = p.Dh;
  const int64_t width = (n + kTile - 1) / kTile * kTile;
  s.scores.resize(R * width);
  s.tile.resize(Dh * kTile);
  s.sums.assign(R * Dh, 0.0f);
  const int64_t kv_stride = p.K * Dh;  // between positions of values
  const float* keys = p.keys + (b * p.K + k) * Dh * p.T + lo;  // [Dh, T], from key lo
  const float* values = p.values + ((b * p.T + lo) * p.K + k) * Dh;
  const float* q[kBlock];
  float* rows[kBlock];
  auto query = [&](int64_t r) {  // query vector r: position t0 + r / G, head g = r % G
    return p.q + (((b * p.T + t0 + r / p.G) * p.K + k) * p.G + r % p.G) * Dh;
  };
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {  // scores, a [Dh, 16] tile of keys at a time
    const float* tile = keys + j0;
    int64_t stride = p.T;
    if (j0 + kTile > n) {  // the last keys: a copy padded with zeros (no read past them)
      for (int64_t d = 0; d < Dh; ++d)
        for (int64_t j = 0; j < kTile; ++j)
          s.tile[d * kTile + j] = j0 + j < n ? keys[d * p.T + j0 + j] : 0.0f;
      tile = s.tile.data();
      stride = kTile;
    }
    for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
      const int mr = static_cast<int>(std::min<int64_t>(kBlock, R - r0));
      for (int r = 0; r < mr; ++r) {
        q[r] = query(r0 + r);
        rows[r] = s.scores.data() + (r0 + r) * width + j0;
      }
      kProduct[mr - 1](q, tile, stride, Dh, false, rows);
    }
  }
  const __m256 scale = _mm256_set1_ps(std::sqrt(static_cast<float>(Dh)));
  for (int64_t r = 0; r < R; ++r) {  // softmax over the keys query r sees: [first, last]
    float* w = s.scores.data() + r * width;
    const int64_t t = t0 + r / p.G;
    const int64_t first = (p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0) - lo;
    const int64_t last = t - lo;
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < width; j0 += kLanes) {
      const __m256 x = _mm256_div_ps(_mm256_loadu_ps(w + j0), scale);
      _mm256_storeu_ps(w + j0, x);
      top = _mm256_max_ps(top,
                          _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, seen(j0, first, last)));
    }
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, top);
    const __m256 m = _mm256_set1_ps(*std::max_element(lanes, lanes + kLanes));
    __m256 total = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < width; j0 += kLanes) {
      const __m256 e = _mm256_and_ps(seen(j0, first, last),
                                     exp8(_mm256_sub_ps(_mm256_loadu_ps(w + j0), m)));
      total = _mm256_add_ps(total, e);
      _mm256_storeu_ps(w + j0, e);
    }
    _mm256_store_ps(lanes, total);
    float sum = 0.0f;
    for (float x : lanes) sum += x;
    const __m256 inverse = _mm256_set1_ps(1.0f / sum);
    for (int64_t j0 = 0; j0 < width; j0 += kLanes)
      _mm256_storeu_ps(w + j0, _mm256_mul_ps(_mm256_loadu_ps(w + j0), inverse));
  }
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {  // outputs, 64 keys at a time
    const int64_t m = std::min(kChunk, n - j0);
    for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
      const int mr = static_cast<int>(std::min<int64_t>(kBlock, R - r0));
      const float* w[kBlock];
      for (int r = 0; r < mr; ++r) w[r] = s.scores.data() + (r0 + r) * width + j0;
      for (int64_t d0 = 0; d0 < Dh; d0 += 16) {
        for (int r = 0; r < mr; ++r) rows[r] = s.sums.data() + (r0 + r) * Dh + d0;
        kProduct[mr - 1](w, values + j0 * kv_stride + d0, kv_stride, m, true, rows);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    std::copy(s.sums.data() + r * Dh, s.sums.data() + (r + 1) * Dh, query(r) - p.q + p.out);
}

// Items [begin, end) of B x K x blocks, the blocks of a (b, k) in the order 0, last, 1, last - 1,
// ... so that equal ranges of items cost about the same (a block's cost grows with its position).
void run_items(const Problem& p, int64_t begin, int64_t end) {
  thread_local Scratch scratch;
  const int64_t blocks = (p.T + kRows - 1) / kRows;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t i = item % blocks, k = item / blocks % p.K, b = item / (blocks * p.K);
    const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;
    run_item(p, b, k, block * kRows, std::min(p.T, (block + 1) * kRows), scratch);
  }
}

ffi::Error PrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                            int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  const bool ok = qd.size() == 5 && kd.size() == 4 && vd.size() == 4 && kd[0] == qd[0] &&
                  kd[1] == qd[2] && kd[2] == qd[4] && kd[3] == qd[1] && qd[4] > 0 &&
                  qd[4] % 16 == 0 && vd[0] == qd[0] && vd[1] == qd[1] && vd[2] == qd[2] &&
                  vd[3] == qd[4];
  if (!ok)
    return ffi::Error::InvalidArgument(
        "jaxspec prefill attention: expected q[B, T, K, G, Dh] (Dh a multiple of 16), keys "
        "[B, K, Dh, T], values [B, T, K, Dh]");
  Problem p{q.typed_data(), keys.typed_data(), values.typed_data(), out->typed_data(),
            qd[0], qd[1], qd[2], qd[3], qd[4], window};
  const int64_t items = p.B * p.K * ((p.T + kRows - 1) / kRows);
  if (items == 0) return ffi::Error::Success();
  jaxspec::parallel_ranges(pool, items, std::min(jaxspec::usable_threads(pool), items),
                           [&p](int64_t begin, int64_t end) { run_items(p, begin, end); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_prefill_attention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
