// Decode attention for CPU, reading one layer of the stacked KV cache in place: for the few
// query rows of a decode step or a verify,
//   out[b, t, k, g] = softmax_s(q[b, t, k, g] . keys[layer, b, k, s] / sqrt(Dh)) values[.., s]
// over the slots s the query at positions[b, t] may see (s <= position, and with a sliding
// window W, s > position - W: models.decoder.attention_mask). Built into the same library as
// cpu_matmul.cc (custom call "jaxspec_decode_attention").
//
// Why: the decoder's layers run as one lax.scan whose carry holds the cache of every layer
// [L, B, K, S, Dh]; XLA:CPU copied the scanned layer's keys and values out of it before its
// batched dots, every layer of every step, and the dots then ran over all S slots. At 448 new
// tokens on SmolLM2-135M those copies were a third of a decode step. Here a row reads only its
// visible slots, where they lie.
//
// Every query row is computed alone, in a fixed order that depends only on its own q, position
// and the cache: scores for 8 slots at a time (each a dot over Dh in d order, then one
// horizontal-sum tree for all lanes), their max, exp(score - max) (one polynomial, exp8), their
// sum (8 running sums in slot order, then one tree), weights = e / sum, then each output element
// sums weight x value the same way. So a row's result is bit-identical whatever the number of
// rows, the thread or the other rows: a verify of gamma + 1 positions computes exactly what
// gamma + 1 one-token steps compute. AVX2 + FMA (the library loads only where they exist).

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
using jaxspec::first_lanes;
using jaxspec::kLanes;
using jaxspec::sums8;

struct Problem {
  const float* q;         // [B, T, K, G, Dh]
  const float* keys;      // [L, B, K, S, Dh]
  const float* values;    // [L, B, K, Dh, S]
  const int32_t* positions;  // [B, T]
  float* out;             // [B, T, K, G, Dh]
  int64_t layer, B, T, K, G, S, Dh, window;  // window 0: none
};

// One query row q[Dh] over the n visible slots of keys[n, Dh] / values[Dh, S] (both already at
// the first visible slot): out[Dh]. w: scratch of n rounded up to 8 floats.
JAXSPEC_AVX2 void attend_row(const float* q, const float* keys, const float* values, int64_t n,
                             int64_t S, int64_t Dh, float* w, float* out) {
  const int64_t chunks = Dh / kLanes;
  const __m256 scale = _mm256_set1_ps(std::sqrt(static_cast<float>(Dh)));
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // scores, 8 slots at a time
    __m256 acc[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      acc[i] = _mm256_setzero_ps();
      if (j0 + i >= n) continue;
      const float* k = keys + (j0 + i) * Dh;
      acc[i] = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
      for (int64_t c = 1; c < chunks; ++c)
        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * kLanes), _mm256_loadu_ps(k + c * kLanes),
                                 acc[i]);
    }
    const __m256 s = _mm256_div_ps(sums8(acc), scale);
    const __m256 valid = _mm256_castsi256_ps(first_lanes(n - j0));
    top = _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, valid));
    _mm256_storeu_ps(w + j0, s);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, top);
  const float m = *std::max_element(lanes, lanes + kLanes);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // e = exp(s - max), 0 past n
    const __m256 valid = _mm256_castsi256_ps(first_lanes(n - j0));
    const __m256 e = _mm256_and_ps(
        valid, exp8(_mm256_sub_ps(_mm256_loadu_ps(w + j0), _mm256_set1_ps(m))));
    total = _mm256_add_ps(total, e);
    _mm256_storeu_ps(w + j0, e);
  }
  __m256 parts[kLanes] = {total, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                          _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                          _mm256_setzero_ps()};
  const __m256 sum = _mm256_set1_ps(_mm256_cvtss_f32(sums8(parts)));
  for (int64_t j0 = 0; j0 < n; j0 += kLanes)
    _mm256_storeu_ps(w + j0, _mm256_div_ps(_mm256_loadu_ps(w + j0), sum));
  for (int64_t d0 = 0; d0 < Dh; d0 += kLanes) {  // out[d] = sum_j w[j] values[d, j]
    __m256 acc[kLanes];
    for (int i = 0; i < kLanes; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
      const __m256 wv = _mm256_loadu_ps(w + j0);  // 0 past n
      const __m256i valid = first_lanes(n - j0);
      for (int i = 0; i < kLanes; ++i)
        acc[i] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(values + (d0 + i) * S + j0, valid),
                                 acc[i]);
    }
    _mm256_storeu_ps(out + d0, sums8(acc));
  }
}

// The first and last slot the query (b, t) may see (hi < lo: none).
void visible(const Problem& p, int64_t b, int64_t t, int64_t& lo, int64_t& hi) {
  const int64_t position = p.positions[b * p.T + t];
  hi = std::min(position, p.S - 1);
  lo = p.window > 0 ? std::max<int64_t>(0, position - p.window + 1) : 0;
}

// Rows (b, t, k, every g) for items [begin, end) of B x T x K.
void run_items(const Problem& p, int64_t begin, int64_t end) {
  thread_local std::vector<float> w;
  w.resize((p.S + kLanes - 1) / kLanes * kLanes);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t k = item % p.K, t = item / p.K % p.T, b = item / (p.K * p.T);
    int64_t lo, hi;
    visible(p, b, t, lo, hi);
    const int64_t head = (p.layer * p.B + b) * p.K + k;  // [L, B, K] index of the cache
    const int64_t row = ((b * p.T + t) * p.K + k) * p.G;  // first of the G query rows
    for (int64_t g = 0; g < p.G; ++g) {
      float* out = p.out + (row + g) * p.Dh;
      if (hi < lo) {  // nothing visible (never for a real position): zeros
        std::fill(out, out + p.Dh, 0.0f);
        continue;
      }
      attend_row(p.q + (row + g) * p.Dh, p.keys + (head * p.S + lo) * p.Dh,
                 p.values + head * p.Dh * p.S + lo, hi - lo + 1, p.S, p.Dh, w.data(), out);
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> positions,
                           int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  auto pd = positions.dimensions();
  const bool ok = qd.size() == 5 && kd.size() == 5 && vd.size() == 5 && pd.size() == 2 &&
                  layer.element_count() == 1 && kd[1] == qd[0] && kd[2] == qd[2] &&
                  kd[4] == qd[4] && qd[4] > 0 && qd[4] % kLanes == 0 && vd[0] == kd[0] &&
                  vd[1] == kd[1] && vd[2] == kd[2] && vd[3] == kd[4] && vd[4] == kd[3] &&
                  pd[0] == qd[0] && pd[1] == qd[1];
  if (!ok)
    return ffi::Error::InvalidArgument(
        "jaxspec decode attention: expected q[B, T, K, G, Dh] (Dh a multiple of 8), keys[L, B, "
        "K, S, Dh], values[L, B, K, Dh, S], layer i32[], positions i32[B, T]");
  const int64_t index = *layer.typed_data();
  if (index < 0 || index >= kd[0])
    return ffi::Error::InvalidArgument("jaxspec decode attention: layer out of range");
  Problem p{q.typed_data(), keys.typed_data(), values.typed_data(), positions.typed_data(),
            out->typed_data(), index, qd[0], qd[1], qd[2], qd[3], kd[3], qd[4], window};
  const int64_t items = p.B * p.T * p.K;
  // Split only work worth a synchronisation: from 256 row-slots on (on 2 AMD EPYC cores,
  // splitting paid at 9 rows of ~60 visible slots and more; 2026-12-03).
  int64_t slots = 0;  // visible slots of all query positions
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t t = 0; t < p.T; ++t) {
      int64_t lo, hi;
      visible(p, b, t, lo, hi);
      slots += std::max<int64_t>(0, hi - lo + 1);
    }
  const int64_t threads = slots * p.K * p.G >= 256 ? jaxspec::usable_threads(pool) : 1;
  jaxspec::parallel_ranges(pool, items, std::min(threads, items),
                           [&p](int64_t begin, int64_t end) { run_items(p, begin, end); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
