// Matrix products with GGUF block-quantized weights, for XLA on CPU.
//
// y[M, N] = x[M, K] @ W[K, N], where W keeps the numbers of a GGUF tensor:
//   Q4_1: w = d * q + m, q in [0, 16), one (d, m) per 32 inputs and output;
//   Q8_0: w = d * q,     q in [-128, 128), one d per 32 inputs and output.
// Activations and accumulation stay float32; each weight is dequantized in
// registers just before it is used, so a decode step streams 5-8.5 bits per
// weight from memory instead of 32.
//
// Layout (written by search_r3_jax/quantized.py): outputs are grouped in
// tiles of 16 lanes, inputs in blocks of 32.
//   Q4_1 qs: u8 [L, N/16, K/32, 16, 16]  byte [j][lane] = q[2j] | q[2j+1] << 4
//   Q8_0 qs: s8 [L, N/16, K/32, 32, 16]  byte [k][lane] = q[k]
//   d, m:    f32 [L, N/16, K/32, 16]
// L stacks the layers; the scalar operand `layer` picks one, so a scanned
// decoder passes the whole stack without slicing (and copying) it.
//
// Threads: the output tiles are cut into chunks that the calling thread and
// the tasks it schedules on XLA's intra-op pool take from one atomic counter.
// The caller never waits for a chunk nobody has started, so a busy or
// one-thread pool cannot deadlock it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One tile row: 16 float lanes, in whatever registers the target has.
#if defined(__AVX512F__)
struct Vec {
  __m512 v;
};
inline Vec Zero() { return {_mm512_setzero_ps()}; }
inline Vec Load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void Store(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
// acc + s * w
inline Vec Fma(float s, Vec w, Vec acc) {
  return {_mm512_fmadd_ps(_mm512_set1_ps(s), w.v, acc.v)};
}
// 16 signed bytes times the lanes' scales.
inline Vec Q8(const int8_t* q, Vec d) {
  const __m512i i = _mm512_cvtepi8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return {_mm512_mul_ps(_mm512_cvtepi32_ps(i), d.v)};
}
// 16 bytes of nibble pairs -> d * q + m for the low and the high nibbles.
inline void Q4(const uint8_t* q, Vec d, Vec m, Vec* lo, Vec* hi) {
  const __m512i i = _mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512i l = _mm512_and_si512(i, _mm512_set1_epi32(15));
  const __m512i h = _mm512_srli_epi32(i, 4);
  lo->v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), d.v, m.v);
  hi->v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), d.v, m.v);
}
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  __m256 a, b;  // lanes 0-7, 8-15
};
inline Vec Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec Load(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
inline void Store(float* p, Vec a) {
  _mm256_storeu_ps(p, a.a);
  _mm256_storeu_ps(p + 8, a.b);
}
inline Vec Fma(float s, Vec w, Vec acc) {
  const __m256 b = _mm256_set1_ps(s);
  return {_mm256_fmadd_ps(b, w.a, acc.a), _mm256_fmadd_ps(b, w.b, acc.b)};
}
inline __m256 Bytes8(const void* q, bool is_signed) {
  const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(x)
                                      : _mm256_cvtepu8_epi32(x));
}
inline Vec Q8(const int8_t* q, Vec d) {
  return {_mm256_mul_ps(Bytes8(q, true), d.a),
          _mm256_mul_ps(Bytes8(q + 8, true), d.b)};
}
inline void Q4(const uint8_t* q, Vec d, Vec m, Vec* lo, Vec* hi) {
  for (int half = 0; half < 2; ++half) {
    const __m128i x =
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * half));
    const __m256i i = _mm256_cvtepu8_epi32(x);
    const __m256 l = _mm256_cvtepi32_ps(
        _mm256_and_si256(i, _mm256_set1_epi32(15)));
    const __m256 h = _mm256_cvtepi32_ps(_mm256_srli_epi32(i, 4));
    const __m256 dd = half ? d.b : d.a, mm = half ? m.b : m.a;
    (half ? lo->b : lo->a) = _mm256_fmadd_ps(l, dd, mm);
    (half ? hi->b : hi->a) = _mm256_fmadd_ps(h, dd, mm);
  }
}
#else
// Portable fallback: plain loops the compiler may vectorize.
struct Vec {
  float v[16];
};
inline Vec Zero() { return Vec{}; }
inline Vec Load(const float* p) {
  Vec a;
  std::memcpy(a.v, p, sizeof(a.v));
  return a;
}
inline void Store(float* p, Vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline Vec Fma(float s, Vec w, Vec acc) {
  for (int i = 0; i < 16; ++i) acc.v[i] += s * w.v[i];
  return acc;
}
inline Vec Q8(const int8_t* q, Vec d) {
  Vec w;
  for (int i = 0; i < 16; ++i) w.v[i] = static_cast<float>(q[i]) * d.v[i];
  return w;
}
inline void Q4(const uint8_t* q, Vec d, Vec m, Vec* lo, Vec* hi) {
  for (int i = 0; i < 16; ++i) {
    lo->v[i] = static_cast<float>(q[i] & 15) * d.v[i] + m.v[i];
    hi->v[i] = static_cast<float>(q[i] >> 4) * d.v[i] + m.v[i];
  }
}
#endif

constexpr int kLanes = 16;
constexpr int kBlock = 32;
constexpr int kMaxRows = 8;

struct Problem {
  const float* x;   // [M, K]
  const void* qs;   // this layer's tiles
  const float* d;   // this layer's scales
  const float* m;   // this layer's minimums (Q4_1) or null
  float* y;         // [M, N]
  int64_t rows, k, n;
};

// The two block layouts, as pairs of consecutive inputs: pair j of a
// 32-input block gives the 16 lanes' weights of inputs 2j and 2j + 1.
struct Q41Blocks {
  static constexpr int kBytes = 256;  // per block of one tile
  static void Pair(const uint8_t* q, int j, Vec d, Vec m, Vec* w0, Vec* w1) {
    Q4(q + j * kLanes, d, m, w0, w1);
  }
};

struct Q80Blocks {
  static constexpr int kBytes = 512;
  static void Pair(const uint8_t* q, int j, Vec d, Vec, Vec* w0, Vec* w1) {
    const int8_t* s = reinterpret_cast<const int8_t*>(q) + 2 * j * kLanes;
    *w0 = Q8(s, d);
    *w1 = Q8(s + kLanes, d);
  }
};

// R rows of x times one 16-output tile.
template <class Blocks, int R>
void Tile(const Problem& p, int64_t row0, int64_t tile) {
  const int64_t kb_count = p.k / kBlock;
  const uint8_t* qs =
      static_cast<const uint8_t*>(p.qs) + tile * kb_count * Blocks::kBytes;
  const float* d = p.d + tile * kb_count * kLanes;
  const float* m = p.m ? p.m + tile * kb_count * kLanes : nullptr;
  const float* x = p.x + row0 * p.k;
  Vec acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = Zero();
  for (int64_t kb = 0; kb < kb_count; ++kb) {
    const Vec dv = Load(d + kb * kLanes);
    const Vec mv = m ? Load(m + kb * kLanes) : Zero();
    const uint8_t* q = qs + kb * Blocks::kBytes;
    const float* xk = x + kb * kBlock;
    for (int j = 0; j < kBlock / 2; ++j) {
      Vec w0, w1;
      Blocks::Pair(q, j, dv, mv, &w0, &w1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r] = Fma(xk[r * p.k + 2 * j], w0, acc[r]);
        acc[r] = Fma(xk[r * p.k + 2 * j + 1], w1, acc[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Store(p.y + (row0 + r) * p.n + tile * kLanes, acc[r]);
  }
}

template <class Blocks>
void RunTiles(const Problem& p, int64_t tile0, int64_t tile1) {
  for (int64_t row0 = 0; row0 < p.rows; row0 += kMaxRows) {
    const int64_t r = std::min<int64_t>(kMaxRows, p.rows - row0);
    for (int64_t t = tile0; t < tile1; ++t) {
      switch (r) {
        case 8: Tile<Blocks, 8>(p, row0, t); break;
        case 7: Tile<Blocks, 7>(p, row0, t); break;
        case 6: Tile<Blocks, 6>(p, row0, t); break;
        case 5: Tile<Blocks, 5>(p, row0, t); break;
        case 4: Tile<Blocks, 4>(p, row0, t); break;
        case 3: Tile<Blocks, 3>(p, row0, t); break;
        case 2: Tile<Blocks, 2>(p, row0, t); break;
        default: Tile<Blocks, 1>(p, row0, t); break;
      }
    }
  }
}

struct Shared {
  Problem problem;
  int64_t chunk_tiles, chunks;
  bool q41;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Work(Shared& s) {
  for (;;) {
    const int64_t c = s.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= s.chunks) return;
    const int64_t t0 = c * s.chunk_tiles;
    const int64_t t1 = std::min(t0 + s.chunk_tiles, s.problem.n / kLanes);
    if (s.q41) {
      RunTiles<Q41Blocks>(s.problem, t0, t1);
    } else {
      RunTiles<Q80Blocks>(s.problem, t0, t1);
    }
    s.done.fetch_add(1, std::memory_order_release);
  }
}

void Run(ffi::ThreadPool& pool, const Problem& problem, bool q41) {
  const int64_t tiles = problem.n / kLanes;
  if (tiles == 0 || problem.rows == 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // A few chunks per thread balance uneven progress; each chunk still
  // streams tens of kilobytes of weights.
  const int64_t want = std::min<int64_t>(tiles, threads * 4);
  auto s = std::make_shared<Shared>();
  s->problem = problem;
  s->q41 = q41;
  s->chunk_tiles = (tiles + want - 1) / want;
  s->chunks = (tiles + s->chunk_tiles - 1) / s->chunk_tiles;
  const int64_t helpers = std::min<int64_t>(threads, s->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([s] { Work(*s); });
  }
  Work(*s);
  // Only chunks a helper has started remain: a short spin covers them, and
  // a helper descheduled mid-chunk gets the core back through yield.
  for (int spins = 0;
       s->done.load(std::memory_order_acquire) < s->chunks; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string out = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(d[i]);
  }
  return out + "]";
}

bool Same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Validates x [M, K], qs [L, N/16, K/32, per_block], d (and m) [L, N/16,
// K/32, 16], y [M, N] and the layer index; fills the sizes.
ffi::Error Check(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> qd,
                 ffi::Span<const int64_t> dd, const ffi::Span<const int64_t>* md,
                 ffi::Span<const int64_t> yd, int64_t per_block,
                 int64_t layer, int64_t* rows, int64_t* k, int64_t* n) {
  const std::string shapes = "x " + Dims(xd) + ", qs " + Dims(qd) + ", d " +
                             Dims(dd) + (md ? ", m " + Dims(*md) : "") +
                             ", y " + Dims(yd);
  if (xd.size() != 2 || qd.size() != 4 || dd.size() != 4 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("qmatmul: operand ranks: " + shapes);
  }
  *rows = xd[0];
  *k = xd[1];
  *n = qd[1] * kLanes;
  if (qd[2] * kBlock != *k || qd[3] != per_block || dd[0] != qd[0] ||
      dd[1] != qd[1] || dd[2] != qd[2] || dd[3] != kLanes ||
      (md && !Same(*md, dd)) || yd[0] != *rows || yd[1] != *n) {
    return ffi::Error::InvalidArgument("qmatmul: operand shapes disagree: " +
                                       shapes);
  }
  if (layer < 0 || layer >= qd[0]) {
    return ffi::Error::InvalidArgument(
        "qmatmul: layer index out of range: " + std::to_string(layer) +
        " not in [0, " + std::to_string(qd[0]) + ")");
  }
  return ffi::Error::Success();
}

ffi::Error Q41Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::U8> qs, ffi::Buffer<ffi::F32> d,
                   ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::S32> layer,
                   ffi::ResultBuffer<ffi::F32> y) {
  int64_t rows, k, n;
  const int64_t l = layer.typed_data()[0];
  const auto md = m.dimensions();
  if (auto e = Check(x.dimensions(), qs.dimensions(), d.dimensions(), &md,
                     y->dimensions(), 256, l, &rows, &k, &n);
      e.failure()) {
    return e;
  }
  const int64_t per_layer = (n / kLanes) * (k / kBlock);
  Problem p{x.typed_data(), qs.typed_data() + l * per_layer * 256,
            d.typed_data() + l * per_layer * kLanes,
            m.typed_data() + l * per_layer * kLanes, y->typed_data(),
            rows, k, n};
  Run(pool, p, /*q41=*/true);
  return ffi::Error::Success();
}

ffi::Error Q80Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::S8> qs, ffi::Buffer<ffi::F32> d,
                   ffi::Buffer<ffi::S32> layer,
                   ffi::ResultBuffer<ffi::F32> y) {
  int64_t rows, k, n;
  const int64_t l = layer.typed_data()[0];
  if (auto e = Check(x.dimensions(), qs.dimensions(), d.dimensions(), nullptr,
                     y->dimensions(), 512, l, &rows, &k, &n);
      e.failure()) {
    return e;
  }
  const int64_t per_layer = (n / kLanes) * (k / kBlock);
  Problem p{x.typed_data(), qs.typed_data() + l * per_layer * 512,
            d.typed_data() + l * per_layer * kLanes, nullptr,
            y->typed_data(), rows, k, n};
  Run(pool, p, /*q41=*/false);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QMatmulQ41, Q41Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QMatmulQ80, Q80Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
