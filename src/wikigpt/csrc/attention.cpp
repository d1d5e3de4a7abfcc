// One sequence's decoding attention: one query per head over its cached keys and values,
//   y[h] = softmax(q[h] K[h]^T * scale, masked) V[h]
// with q [1, H, D], keys / values [1, H, L, D] (views of the KV cache: any strides but a
// contiguous last dimension), mask [1, 1, L] bool (False: not attended), all float32 or all
// bfloat16; y [1, H, D] in q's dtype, sums in float32.
//
// Why a kernel of our own: at one row the work is tiny (DistilGPT2 at 40 positions: 12 heads x
// 40 x 64 x 2 = 61 k multiply-adds, ~10 us on one core), but an Inductor-compiled graph costs
// ~90 us a call inside a decoding step on Zen 4 and SDPA more (both measured, 6 calls a token),
// most of it wrapper and thread start-up. Here a call is one pass over each key and value row,
// in one thread up to ~64 k multiply-adds per thread, and the heads split across threads above.
// `target_clones` compiles the loops for AVX-512, AVX2 and baseline x86-64 and picks one when
// the library loads, so the cached library runs on any x86 CPU (as q8_linear.cpp's paths do).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bits) {  // bfloat16: the upper half of a float32
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float v, float* out) { *out = v; }
inline void store(float v, uint16_t* out) {  // round to nearest even, as torch's bfloat16 does
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *out = std::isnan(v) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

template <typename T>
inline void one_head(const T* q, const T* k, const T* v, const bool* mask, int64_t L, int64_t D,
                     int64_t k_step, int64_t v_step, float scale, float* scores, float* acc, T* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < L; ++l) {
    float s = 0.f;
    const T* kl = k + l * k_step;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += to_float(q[d]) * to_float(kl[d]);
    scores[l] = mask[l] ? s * scale : -std::numeric_limits<float>::infinity();
    top = std::max(top, scores[l]);
  }
  std::fill(acc, acc + D, 0.f);
  float total = 0.f;
  if (top != -std::numeric_limits<float>::infinity()) {  // every position masked: zeros, not NaN
    for (int64_t l = 0; l < L; ++l) {
      if (!mask[l]) continue;
      const float p = std::exp(scores[l] - top);
      total += p;
      const T* vl = v + l * v_step;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += p * to_float(vl[d]);
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t d = 0; d < D; ++d) store(acc[d] * inv, out + d);
}

// The heads [h0, h1) of one call; compiled per instruction set (see the top of the file).
#define WIKIGPT_HEADS(T, NAME)                                                                     \
  __attribute__((target_clones("avx512f", "avx2,fma", "default"))) void NAME(                     \
      const T* q, const T* k, const T* v, const bool* mask, int64_t h0, int64_t h1, int64_t L,     \
      int64_t D, int64_t q_head, int64_t k_head, int64_t k_step, int64_t v_head, int64_t v_step,   \
      float scale, T* out) {                                                                       \
    std::vector<float> scores(L), acc(D);                                                          \
    for (int64_t h = h0; h < h1; ++h)                                                              \
      one_head(q + h * q_head, k + h * k_head, v + h * v_head, mask, L, D, k_step, v_step, scale, \
               scores.data(), acc.data(), out + h * D);                                            \
  }
WIKIGPT_HEADS(float, heads_f32)
WIKIGPT_HEADS(uint16_t, heads_bf16)
#undef WIKIGPT_HEADS

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.size(0) == 1, "decode_attention: q must be [1, heads, head_dim]");
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == 1 && values.sizes() == keys.sizes(),
              "decode_attention: keys and values must be [1, heads, positions, head_dim] alike");
  const int64_t H = q.size(1), D = q.size(2), L = keys.size(2);
  TORCH_CHECK(keys.size(1) == H && keys.size(3) == D, "decode_attention: q and keys disagree in shape");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, keys and values must all be float32 or all bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && keys.stride(3) == 1 && values.stride(3) == 1,
              "decode_attention: the head dimension must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == L, "decode_attention: mask must be [1, 1, positions] bool");
  const at::Tensor m = mask.contiguous();
  at::Tensor y = at::empty({1, H, D}, q.options());
  // one thread for up to ~64 k multiply-adds (a thread's start costs more than that much work)
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * D));
  const float s = float(scale);
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
    if (q.scalar_type() == at::kFloat) {
      heads_f32(q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), m.data_ptr<bool>(), h0, h1,
                L, D, q.stride(1), keys.stride(1), keys.stride(2), values.stride(1), values.stride(2), s,
                y.data_ptr<float>());
    } else {
      auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
      heads_bf16(bits(q), bits(keys), bits(values), m.data_ptr<bool>(), h0, h1, L, D, q.stride(1), keys.stride(1),
                 keys.stride(2), values.stride(1), values.stride(2), s,
                 reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wikigpt, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(wikigpt, CPU, m) { m.impl("decode_attention", &decode_attention); }
