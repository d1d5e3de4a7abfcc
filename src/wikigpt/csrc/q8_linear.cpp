// y = x W^T + b with W int8 per output row and x quantized to int8 per block of 32 values
// (llama.cpp's q8_0 activations), integer sums per block, float32 out.
//
// Why a kernel of our own: FBGEMM's dynamic int8 (torch.ops.quantized.linear_dynamic) quantizes
// activations to uint8 with one scale per call and, without VNNI, sums pairs of u8 x s8 products
// into int16 with saturation (2 x 255 x 127 = 64,770 > 32,767), so AVX2-only CPUs need 7-bit
// activations. Here both sides are signed 8-bit in [-127, 127]; the AVX2 path multiplies |x| by
// w * sign(x) (the sign trick), so a pair sum is at most 2 x 127 x 127 = 32,258 and never
// saturates: the same numbers on every x86 CPU, and a row's numbers never depend on the rows
// beside it (each block has its own scale).
//
// Layout: W [N, Kp] int8 (K padded with zeros to Kp, a multiple of 32), w_scale [N] float32.
// Activations: per block b of row m, scale d = max|x| / 127, q = round(x / d).
//   y[m, n] = bias[n] + w_scale[n] * sum_b d[m, b] * sum_{k in b} q[m, k] * W[n, k]
// Paths (chosen at run time from the CPU's features; the Python side times those that run):
//   0 portable C++, 1 AVX2 (+FMA), 2 AVX-512BW + VNNI.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define Q8_X86 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kTileRows = 4;  // activation rows per pass over a weight row (its 0.75-3 KB stay in L1)

// |q|, the unsigned operand of maddubs / dpbusd, is taken in the loop (one op per block and
// activation row) rather than stored: a stored copy doubled the activations' share of L1, and
// four rows of 3,072 (24 KB with it, 12 KB without) then no longer fit beside the weight stream.
struct Quantized {
  std::vector<int8_t> q;     // [M, Kp] signed values
  std::vector<float> d;      // [M, Kp / 32] block scales
};

// With `ln_w`, each row is layer-normalised first (y = (x - mean) / sqrt(var + eps) * ln_w + ln_b,
// as F.layer_norm): the norm before a product then costs no call of its own.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, Quantized& out,
                   const float* ln_w, const float* ln_b, double eps) {
  const int64_t nb = Kp / kBlock;
  out.q.assign(M * Kp, 0);
  out.d.assign(M * nb, 0.f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> normed(ln_w ? K : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * K;
      if (ln_w) {
        double sum = 0, sq = 0;
        for (int64_t k = 0; k < K; ++k) sum += row[k];
        const double mean = sum / K;
        for (int64_t k = 0; k < K; ++k) sq += (row[k] - mean) * (row[k] - mean);
        const float inv = float(1.0 / std::sqrt(sq / K + eps)), mu = float(mean);
        for (int64_t k = 0; k < K; ++k) normed[k] = (row[k] - mu) * inv * ln_w[k] + (ln_b ? ln_b[k] : 0.f);
        row = normed.data();
      }
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(row[k]));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        out.d[m * nb + b] = d;
        for (int64_t k = k0; k < k1; ++k) {
          const int v = static_cast<int>(std::nearbyint(row[k] * id));  // |v| <= 127
          out.q[m * Kp + k] = static_cast<int8_t>(v);
        }
      }
    }
  });
}

// A tile: NW weight rows (w, w + Kp, ...) against R activation rows from m0:
// out[i * R + r] = sum_b d[r, b] * isum(w_i, q_r over block b). NW and R are compile-time, so
// every accumulator lives in a register: each weight block loaded is used R times and each
// activation block NW times.
template <int NW, int R>
void dot_portable(const int8_t* w, const Quantized& x, int64_t m0, int64_t Kp, float* out) {
  const int64_t nb = Kp / kBlock;
  for (int i = 0; i < NW; ++i) {
    for (int r = 0; r < R; ++r) {
      const int8_t* q = x.q.data() + (m0 + r) * Kp;
      const float* d = x.d.data() + (m0 + r) * nb;
      const int8_t* wi = w + i * Kp;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) s += int32_t(q[k]) * int32_t(wi[k]);
        acc += d[b] * float(s);
      }
      out[i * R + r] = acc;
    }
  }
}

#ifdef Q8_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Per block of 32: sign(w, q) puts q's sign on w; maddubs(|q|, w * sign(q)) gives 16 pair sums
// (exact: <= 32,258); madd by ones gives 8 int32 sums; to float, times the block's scale.
template <int NW, int R>
__attribute__((target("avx2,fma")))
void dot_avx2(const int8_t* w, const Quantized& x, int64_t m0, int64_t Kp, float* out) {
  const int64_t nb = Kp / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NW][R];
  for (int i = 0; i < NW; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  const int8_t* q = x.q.data() + m0 * Kp;
  const float* d = x.d.data() + m0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wv[NW];
    for (int i = 0; i < NW; ++i)
      wv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * Kp + b * kBlock));
    for (int r = 0; r < R; ++r) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * Kp + b * kBlock));
      const __m256i av = _mm256_sign_epi8(qv, qv);  // |q|: q is never -128
      const __m256 scale = _mm256_broadcast_ss(d + r * nb + b);
      for (int i = 0; i < NW; ++i) {
        const __m256i pairs = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv[i], qv));
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[i][r] = _mm256_fmadd_ps(scale, sums, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NW; ++i)
    for (int r = 0; r < R; ++r) out[i * R + r] = hsum256(acc[i][r]);
}

// Two blocks per 64 bytes: w negated where q < 0 (a masked subtract), dpbusd(|q|, w * sign(q))
// gives 16 int32 sums of 4 products, lanes 0-7 block b and 8-15 block b + 1; each lane times its
// block's scale. An odd last block runs in the lower 256 bits with the upper lanes zero.
template <int NW, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
void dot_vnni(const int8_t* w, const Quantized& x, int64_t m0, int64_t Kp, float* out) {
  const int64_t nb = Kp / kBlock;
  __m512 acc[NW][R];
  for (int i = 0; i < NW; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const int8_t* q = x.q.data() + m0 * Kp;
  const float* d = x.d.data() + m0 * nb;
  const __m512i zero = _mm512_setzero_si512();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m512i wv[NW];
    for (int i = 0; i < NW; ++i) wv[i] = _mm512_loadu_si512(w + i * Kp + b * kBlock);
    for (int r = 0; r < R; ++r) {
      const __m512i qv = _mm512_loadu_si512(q + r * Kp + b * kBlock);
      const __m512i av = _mm512_abs_epi8(qv);
      const __mmask64 neg = _mm512_movepi8_mask(qv);
      const float* db = d + r * nb + b;
      const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(db[0]), _mm512_set1_ps(db[1]));
      for (int i = 0; i < NW; ++i) {
        const __m512i sw = _mm512_mask_sub_epi8(wv[i], neg, zero, wv[i]);
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, av, sw));
        acc[i][r] = _mm512_fmadd_ps(scale, sums, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NW; ++i) {
    for (int r = 0; r < R; ++r) {
      float tail = 0.f;
      if (b < nb) {  // the odd last block, 256 bits wide
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * Kp + b * kBlock));
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * Kp + b * kBlock));
        const __m256i av = _mm256_abs_epi8(qv);
        const __m256i sw = _mm256_mask_sub_epi8(wv, _mm256_movepi8_mask(qv), _mm256_setzero_si256(), wv);
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), av, sw));
        tail = d[r * nb + b] * hsum256(sums);
      }
      out[i * R + r] = _mm512_reduce_add_ps(acc[i][r]) + tail;
    }
  }
}
#endif

using DotFn = void (*)(const int8_t*, const Quantized&, int64_t, int64_t, float*);

// Tiles of kW weight rows x R activation rows (R = 1..kTileRows), and one weight row for the
// leftover rows. AVX2 has 16 vector registers: 2 x 4 accumulators, 2 weight blocks and the
// temporaries fit; AVX-512's 32 fit 4 x 4.
struct Tiles {
  int64_t width;            // weight rows per full tile
  DotFn full[kTileRows];    // [R - 1]: `width` weight rows x R activation rows
  DotFn single[kTileRows];  // [R - 1]: 1 weight row x R activation rows
};

#define Q8_TILES(fn, W)                                                                     \
  Tiles{W, {fn<W, 1>, fn<W, 2>, fn<W, 3>, fn<W, 4>}, {fn<1, 1>, fn<1, 2>, fn<1, 3>, fn<1, 4>}}

bool path_runs(int64_t path) {
#ifdef Q8_X86
  __builtin_cpu_init();
  if (path == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == 2)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return path == 0;
}

Tiles tiles_for(int64_t path) {
  TORCH_CHECK(path_runs(path), "q8_linear: path ", path, " does not run on this CPU");
#ifdef Q8_X86
  if (path == 1) return Q8_TILES(dot_avx2, 2);
  if (path == 2) return Q8_TILES(dot_vnni, 4);
#endif
  return Q8_TILES(dot_portable, 1);
}

// The paths this CPU runs, as a bit set (bit i: path i).
int64_t q8_paths() {
  int64_t bits = 0;
  for (int64_t p = 0; p < 3; ++p) bits |= path_runs(p) ? (int64_t(1) << p) : 0;
  return bits;
}

const float* float_data(const std::optional<at::Tensor>& t, int64_t numel, at::Tensor& keep, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->contiguous().to(at::kFloat);
  TORCH_CHECK(keep.numel() == numel, "q8_linear: ", name, " must hold ", numel, " values");
  return keep.data_ptr<float>();
}

// y = [residual +] (LN(x) or x) W^T * w_scale + bias
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, int64_t path,
                     const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                     double eps, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "q8_linear: x must be 2-D float32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "q8_linear: weight must be contiguous 2-D int8");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), Kp = weight.size(1);
  TORCH_CHECK(Kp % kBlock == 0 && K <= Kp && Kp - K < kBlock, "q8_linear: weight holds ", Kp,
              " columns for ", K, " inputs (padded to a multiple of 32)");
  TORCH_CHECK(w_scale.numel() == N && w_scale.scalar_type() == at::kFloat, "q8_linear: one float32 scale per row");
  const Tiles tiles = tiles_for(path);
  const at::Tensor xc = x.contiguous();
  at::Tensor lw, lb, bc, rc;
  const float* ln_w = float_data(ln_weight, K, lw, "ln_weight");
  const float* ln_b = float_data(ln_bias, K, lb, "ln_bias");
  const float* bp = float_data(bias, N, bc, "bias");
  const float* res = float_data(residual, M * N, rc, "residual");
  Quantized xq;
  quantize_rows(xc.data_ptr<float>(), M, K, Kp, xq, ln_w, ln_b, eps);
  at::Tensor y = at::empty({M, N}, x.options());
  float* out = y.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* ws = w_scale.data_ptr<float>();
  // Threads split the weight rows: each weight byte is read by one thread. Within a thread, a
  // chunk of 16 weight rows (12-48 KB, in L2) meets each tile of 4 activation rows (in L1) in
  // turn, so a weight byte comes from memory once per call and from L2 once per tile (M = 1:
  // one pass over the weights, the bandwidth-bound case).
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    float tile[4 * kTileRows];  // the widest tile: 4 weight rows x kTileRows activation rows
    for (int64_t c0 = n0; c0 < n1; c0 += 16) {
      const int64_t c1 = std::min(n1, c0 + 16);
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, M - m0);
        for (int64_t n = c0; n < c1;) {
          // Below 8 rows a call is bound by reading the weights, and a wide tile's several weight
          // streams read them at half the speed of one (Zen 4, both paths; 40 products of 768 x
          // 3,072 at 2 rows: 8.2 ms wide, 3.8 ms one row at a time). From 8 rows the call is
          // bound by arithmetic, its weights come from L2 after the first tile, and a wide tile
          // shares each activation block's |q| and scale: 32 rows on the VNNI path 33.7 ms wide,
          // 44.3 ms one row at a time (the AVX2 path: the same either way).
          const int64_t width = M >= 8 && rows > 1 && n + tiles.width <= c1 ? tiles.width : 1;
          (width > 1 ? tiles.full : tiles.single)[rows - 1](w + n * Kp, xq, m0, Kp, tile);
          for (int64_t i = 0; i < width; ++i, ++n)
            for (int64_t r = 0; r < rows; ++r)
              out[(m0 + r) * N + n] = tile[i * rows + r] * ws[n] + (bp ? bp[n] : 0.f) +
                                      (res ? res[(m0 + r) * N + n] : 0.f);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(wikigpt, m) {
  m.def("q8_linear(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, int path, Tensor? ln_weight=None, "
        "Tensor? ln_bias=None, float eps=1e-5, Tensor? residual=None) -> Tensor");
  m.def("q8_paths() -> int", &q8_paths);
}

TORCH_LIBRARY_IMPL(wikigpt, CPU, m) { m.impl("q8_linear", &q8_linear); }
