// Small-M matmul for CPU: out[M, N] = x[M, K] @ w[K, N], fp32, row-major; built and loaded by
// cpu_matmul.py, called by XLA through its FFI (custom call "jaxspec_small_m_matmul").
//
// Decoding reads every weight once per step, and verifying gamma + 1 tokens should cost about
// the same. XLA:CPU streams one row at copy bandwidth but takes a slower path for 2-16 rows;
// this kernel reads w once for up to kMaxRows rows. It walks w in chunks of kDepth rows (k)
// across all its columns: each chunk is kDepth sequential streams, and for every strip of
// columns the MR x NV partial sums stay in vector registers while k runs through the chunk
// (one broadcast of x[m, k] per row and k), then wait in `out` for the next chunk.
//
// Every output element accumulates its K products with fused multiply-adds in k order, whatever
// M, the strip, the chunk or the thread, so a row's result is bit-identical whether it is
// computed alone or with other rows: a verify of gamma + 1 tokens computes exactly what gamma + 1
// single-token steps would.
//
// ISA: AVX-512F or AVX2 + FMA, chosen at run time (jaxspec_small_m_isa says which; Python falls
// back to XLA's dot when it is 0). Columns are split into contiguous ranges across a small pool
// of threads (jaxspec_small_m_set_threads, before the first product).

#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [K, N]
  float* out;      // [M, N]
  int64_t M, K, N;
};

constexpr int64_t kDepth = 64;  // rows of w per chunk (measured: 32 and 16 were slower)
constexpr int kMaxRows = 6;     // rows per register block: 6 x 4 accumulators + 4 weights + 1

// ---------------------------------------------------------------- register blocks

// out[m0 : m0 + MR, n0 : n0 + NV * lanes] += x[m0 : m0 + MR, k0 : k1] @ w[k0 : k1, same columns]
// (starting from zero when k0 == 0). One instantiation per ISA via the macro below.
#define JAXSPEC_BLOCK(NAME, TARGET, VEC, LANES, ZERO, LOAD, STORE, FMA, SET1)                 \
  template <int MR, int NV>                                                                 \
  __attribute__((target(TARGET))) void NAME(const Problem& p, int64_t m0, int64_t n0,       \
                                            int64_t k0, int64_t k1) {                       \
    VEC acc[MR][NV];                                                                        \
    float* out = p.out + m0 * p.N + n0;                                                     \
    for (int r = 0; r < MR; ++r)                                                            \
      for (int v = 0; v < NV; ++v) acc[r][v] = k0 == 0 ? ZERO : LOAD(out + r * p.N + LANES * v); \
    const float* w = p.w + k0 * p.N + n0;                                                   \
    const float* x = p.x + m0 * p.K;                                                        \
    for (int64_t k = k0; k < k1; ++k, w += p.N) {                                           \
      VEC wv[NV];                                                                           \
      for (int v = 0; v < NV; ++v) wv[v] = LOAD(w + LANES * v);                             \
      for (int r = 0; r < MR; ++r) {                                                        \
        VEC b = SET1(x[r * p.K + k]);                                                       \
        for (int v = 0; v < NV; ++v) acc[r][v] = FMA(b, wv[v], acc[r][v]);                  \
      }                                                                                     \
    }                                                                                       \
    for (int r = 0; r < MR; ++r)                                                            \
      for (int v = 0; v < NV; ++v) STORE(out + r * p.N + LANES * v, acc[r][v]);             \
  }

JAXSPEC_BLOCK(block512, "avx512f", __m512, 16, _mm512_setzero_ps(), _mm512_loadu_ps,
              _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_set1_ps)
JAXSPEC_BLOCK(block256, "avx2,fma", __m256, 8, _mm256_setzero_ps(), _mm256_loadu_ps,
              _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_set1_ps)

using Block = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);

#define JAXSPEC_ROWS(F, NV) {F<1, NV>, F<2, NV>, F<3, NV>, F<4, NV>, F<5, NV>, F<6, NV>}

struct Isa {
  int level;        // 2: AVX-512F, 1: AVX2 + FMA, 0: neither (the kernel refuses to run)
  int lanes;        // floats per vector
  int wide;         // vectors per strip (then strips of one vector, then single columns)
  Block wide_blocks[kMaxRows];
  Block one_blocks[kMaxRows];
};

// AVX-512 has 32 registers (6 x 4 accumulators fit), AVX2 16 (6 x 2).
const Isa kAvx512{2, 16, 4, JAXSPEC_ROWS(block512, 4), JAXSPEC_ROWS(block512, 1)};
const Isa kAvx2{1, 8, 2, JAXSPEC_ROWS(block256, 2), JAXSPEC_ROWS(block256, 1)};
const Isa kNone{0, 8, 2, {}, {}};

const Isa& detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

const Isa& kIsa = detect();

// Columns past the last whole vector: one fused multiply-add per term, in the same k order.
void tail_columns(const Problem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = n_begin; n < n_end; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc = __builtin_fmaf(p.x[m * p.K + k], p.w[k * p.N + n], acc);
      p.out[m * p.N + n] = acc;
    }
}

// Columns [n_begin, n_end) of every row; n_begin is a multiple of the lane count.
void run_columns(const Problem& p, int64_t n_begin, int64_t n_end) {
  const int64_t lanes = kIsa.lanes;
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / lanes * lanes;
  for (int64_t k0 = 0; k0 < p.K; k0 += kDepth) {
    const int64_t k1 = k0 + kDepth < p.K ? k0 + kDepth : p.K;
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
      const int rows = static_cast<int>(p.M - m0 < kMaxRows ? p.M - m0 : kMaxRows);
      int64_t n = n_begin;
      const Block wide = kIsa.wide_blocks[rows - 1], one = kIsa.one_blocks[rows - 1];
      for (; n + kIsa.wide * lanes <= n_vec_end; n += kIsa.wide * lanes) wide(p, m0, n, k0, k1);
      for (; n + lanes <= n_vec_end; n += lanes) one(p, m0, n, k0, k1);
    }
  }
  if (n_vec_end < n_end) tail_columns(p, n_vec_end, n_end);
}

// ---------------------------------------------------------------- threads

// A decode step issues a few hundred products back to back, each a few tens of microseconds:
// workers spin briefly between products (waking a sleeping thread costs more than some of
// them take), then sleep until the next one so an idle process uses no CPU.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs p on every thread; when another product holds the pool (XLA may run independent
  // products concurrently), the caller computes p alone instead.
  void run(const Problem& p) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return run_columns(p, 0, p.N);
    problem_ = &p;
    pending_.store(size() - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    share(p, 0);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  static constexpr int kSpins = 20000;  // about 0.1-1 ms of pause instructions

  void share(const Problem& p, int index) {
    const int64_t lanes = kIsa.lanes;
    const int64_t per = ((p.N + lanes - 1) / lanes + size() - 1) / size() * lanes;
    const int64_t begin = index * per, end = begin + per < p.N ? begin + per : p.N;
    if (begin < end) run_columns(p, begin, end);
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      for (int spins = 0; now == seen && spins < kSpins; ++spins) {
        _mm_pause();
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        now = generation_.load(std::memory_order_acquire);
      }
      seen = now;
      share(*problem_, index);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  const Problem* problem_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;  // guards sleeping
  std::condition_variable wake_;
  std::mutex busy_;  // held by the product being computed
};

int requested_threads = 1;

Pool& pool() {
  static Pool* instance = new Pool(requested_threads);  // never destroyed: workers live on
  return *instance;
}

ffi::Error SmallMMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("jaxspec small-M matmul: expected x[M, K] and w[K, N]");
  if (kIsa.level == 0) return ffi::Error::Internal("jaxspec small-M matmul: no AVX2/FMA");
  Problem p{x.typed_data(), w.typed_data(), out->typed_data(), xd[0], xd[1], wd[1]};
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  if (p.K == 0) {
    for (int64_t i = 0; i < p.M * p.N; ++i) p.out[i] = 0.0f;
    return ffi::Error::Success();
  }
  Pool& threads = pool();
  // Splitting fewer than 16 vectors of columns costs more in synchronisation than it saves.
  if (threads.size() == 1 || p.N < 16 * kIsa.lanes) {
    run_columns(p, 0, p.N);
  } else {
    threads.run(p);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_small_m_matmul, SmallMMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int jaxspec_small_m_isa() { return kIsa.level; }

// Threads for the products (including the caller's); takes effect before the first product.
extern "C" int jaxspec_small_m_set_threads(int threads) {
  requested_threads = threads < 1 ? 1 : (threads > 64 ? 64 : threads);
  return pool().size();
}
