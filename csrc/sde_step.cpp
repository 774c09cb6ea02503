// Fused SDE step with Gaussian log-prob and KL on CPU: the C++ twin of kernels/sde_step.py (same arithmetic,
// same per-sample sums; the formulas and their sources are in fastgrpo/ops/sde.py).
//
// Every kind of step is affine in x and v with per-sample coefficients, mean = cx[b] x + cv[b] v, so one loop
// serves them all. Work is split into (sample, chunk of SDE_CHUNK elements) tasks run by OpenMP; each task
// writes its partial sums of squares, and the partials of a sample are added in chunk order afterwards, so the
// result is the same for any number of threads. Bytes moved, sampling with given noise in float32: read x, v,
// eps; write prev, mean (5 * 4 bytes per element), as the Triton kernel.
#include "kernels.h"

#include <vector>

namespace fastgrpo {
namespace {

struct Partial {
  float ssq = 0.0f, klssq = 0.0f;
};

FASTGRPO_HOT
Partial sde_fwd_chunk(const In& x, const In& v, const In& eps, const In& prev, const In& vref, float cx, float cv,
                      float sd, int64_t begin, int64_t end, float* mean, float* new_prev) {
  alignas(64) float bx[BLOCK], bv[BLOCK], bn[BLOCK], br[BLOCK];
  float ssq = 0.0f, klssq = 0.0f;  // block sums are added in block order
  const bool sample = eps.present(), given = prev.present(), has_ref = vref.present();
  for (int64_t off = begin; off < end; off += BLOCK) {
    const int n = static_cast<int>(end - off < BLOCK ? end - off : BLOCK);
    const float* px = load_block(x, off, n, bx);
    const float* pv = load_block(v, off, n, bv);
    float* pm = mean + off;
    for (int i = 0; i < n; ++i) pm[i] = cx * px[i] + cv * pv[i];
    if (sample || given) {
      const float* pp;
      if (sample) {
        const float* pe = load_block(eps, off, n, bn);
        float* out = new_prev + off;
        for (int i = 0; i < n; ++i) out[i] = pm[i] + sd * pe[i];
        pp = out;
      } else {
        pp = load_block(prev, off, n, bn);
      }
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int i = 0; i < n; ++i) a += (pp[i] - pm[i]) * (pp[i] - pm[i]);
      ssq += a;
    }
    if (has_ref) {
      const float* pr = load_block(vref, off, n, br);
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int i = 0; i < n; ++i) a += (cv * (pv[i] - pr[i])) * (cv * (pv[i] - pr[i]));
      klssq += a;
    }
  }
  return {ssq, klssq};
}

FASTGRPO_HOT
void sde_bwd_chunk(const In& x, const In& v, const In& prev, const In& vref, const float* g_mean, float g_ssq,
                   float g_kl, float cx, float cv, int64_t begin, int64_t end, void* gx, DType gx_dtype, void* gv,
                   DType gv_dtype, void* gvref, DType gvref_dtype) {
  alignas(64) float bx[BLOCK], bv[BLOCK], bp[BLOCK], br[BLOCK], g[BLOCK], gk[BLOCK], out[BLOCK];
  const bool has_diff = prev.present(), has_ref = vref.present();
  for (int64_t off = begin; off < end; off += BLOCK) {
    const int n = static_cast<int>(end - off < BLOCK ? end - off : BLOCK);
    for (int i = 0; i < n; ++i) g[i] = g_mean ? g_mean[off + i] : 0.0f;
    const float* pv = (has_diff || has_ref) ? load_block(v, off, n, bv) : nullptr;
    if (has_diff) {
      // d ssq / d mean = -2 (prev - mean), with the mean recomputed rather than stored.
      const float* px = load_block(x, off, n, bx);
      const float* pp = load_block(prev, off, n, bp);
      for (int i = 0; i < n; ++i) g[i] += -2.0f * g_ssq * (pp[i] - (cx * px[i] + cv * pv[i]));
    }
    if (gx) {
      for (int i = 0; i < n; ++i) out[i] = cx * g[i];
      store_block(gx, gx_dtype, off, n, out);
    }
    if (has_ref) {
      // d klssq / dv = 2 cv^2 (v - v_ref) = -d klssq / dv_ref.
      const float* pr = load_block(vref, off, n, br);
      for (int i = 0; i < n; ++i) gk[i] = 2.0f * g_kl * cv * cv * (pv[i] - pr[i]);
      if (gvref) {
        for (int i = 0; i < n; ++i) out[i] = -gk[i];
        store_block(gvref, gvref_dtype, off, n, out);
      }
    }
    if (gv) {
      if (has_ref)
        for (int i = 0; i < n; ++i) out[i] = cv * g[i] + gk[i];
      else
        for (int i = 0; i < n; ++i) out[i] = cv * g[i];
      store_block(gv, gv_dtype, off, n, out);
    }
  }
}

}  // namespace

void sde_step_fwd(In x, In v, In eps, In prev, In vref, const float* cx, const float* cv, const float* std,
                  int64_t B, int64_t N, float* mean, float* new_prev, float* ssq, float* klssq) {
  const int64_t chunks = sde_chunks(N);
  std::vector<Partial> parts(static_cast<size_t>(B * chunks));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < B * chunks; ++t) {
    const int64_t b = t / chunks, c = t % chunks;
    const int64_t begin = b * N + c * SDE_CHUNK;
    const int64_t end = b * N + (c + 1 < chunks ? (c + 1) * SDE_CHUNK : N);
    parts[t] = sde_fwd_chunk(x, v, eps, prev, vref, cx[b], cv[b], std[b], begin, end, mean, new_prev);
  }
  for (int64_t b = 0; b < B; ++b) {  // fixed order over chunks: deterministic
    double s = 0.0, k = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      s += parts[b * chunks + c].ssq;
      k += parts[b * chunks + c].klssq;
    }
    if (ssq) ssq[b] = static_cast<float>(s);
    if (klssq) klssq[b] = static_cast<float>(k);
  }
}

void sde_step_bwd(In x, In v, In prev, In vref, const float* g_mean, const float* g_ssq, const float* g_klssq,
                  const float* cx, const float* cv, int64_t B, int64_t N, void* gx, DType gx_dtype, void* gv,
                  DType gv_dtype, void* gvref, DType gvref_dtype) {
  const int64_t chunks = sde_chunks(N);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < B * chunks; ++t) {
    const int64_t b = t / chunks, c = t % chunks;
    const int64_t begin = b * N + c * SDE_CHUNK;
    const int64_t end = b * N + (c + 1 < chunks ? (c + 1) * SDE_CHUNK : N);
    sde_bwd_chunk(x, v, prev, vref, g_mean, g_ssq ? g_ssq[b] : 0.0f, g_klssq ? g_klssq[b] : 0.0f, cx[b], cv[b],
                  begin, end, gx, gx_dtype, gv, gv_dtype, gvref, gvref_dtype);
  }
}

}  // namespace fastgrpo
