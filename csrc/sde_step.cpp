// Fused SDE step with Gaussian log-prob and KL on CPU: the C++ twin of kernels/sde_step.py (same arithmetic,
// same per-sample sums; the formulas and their sources are in fastgrpo/ops/sde.py).
//
// Every kind of step is affine in x and v with per-sample coefficients, mean = cx[b] x + cv[b] v, so one loop
// serves them all. Work is split into (sample, chunk of SDE_CHUNK elements) tasks run by OpenMP; each task
// writes its partial sums of squares, and the partials of a sample are added in chunk order afterwards, so the
// result is the same for any number of threads. Bytes moved, sampling with given noise in float32: read x, v,
// eps; write prev, mean (5 * 4 bytes per element), as the Triton kernel.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
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

constexpr double LOG_SQRT_2PI = 0.91893853320467274178;  // log(sqrt(2 pi))
// Below this many elements the loops run on the calling thread: waking the OpenMP team costs more than the work.
constexpr int64_t SERIAL_ELEMENTS = 1 << 16;

inline double sigma_at(const double* p, double val, int64_t stride, int64_t b) { return p ? p[b * stride] : val; }

}  // namespace

SdeCoef sde_coefficients(const SdeSched& sc, int64_t b) {
  const double s = sigma_at(sc.s_ptr, sc.s_val, sc.s_stride, b);
  const double sn = sigma_at(sc.sn_ptr, sc.sn_val, sc.sn_stride, b);
  const double dt = sn - s;
  bool ok = (s <= 1.0) && (sn >= 0.0) && (sn < s);
  double cx, cv, std, kl_d;
  if (sc.kind == 0 || sc.kind == 1) {
    double sd;
    if (sc.kind == 0) {
      if (!sc.has_sigma_max) ok = ok && s != 1.0;
      const double guard = s == 1.0 ? (sc.has_sigma_max ? sc.sigma_max : 0.5) : s;
      sd = sc.noise_level * std::sqrt(s / (1.0 - guard));
    } else {
      sd = sc.noise_level;
    }
    const double sd2 = sd * sd;
    cx = 1.0 + sd2 * dt / (2.0 * s);
    cv = (1.0 + sd2 * (1.0 - s) / (2.0 * s)) * dt;
    std = sd * std::sqrt(std::max(-dt, 0.0));
    kl_d = sc.kl_exact ? std : sd;
  } else if (sc.kind == 2) {
    std = sn * sc.sin_a;
    const double c = std::sqrt(std::max(sn * sn - std * std, 0.0));
    cx = (1.0 - sn) + c;  // x0*(1-sn) + x1*c with x0 = x - s*v, x1 = x + (1-s)*v
    cv = -s * (1.0 - sn) + (1.0 - s) * c;
    kl_d = std;
    if (sc.has_vref) ok = ok && sn != 0.0;
  } else {
    cx = 1.0, cv = dt, std = 0.0, kl_d = 1.0;
  }
  if (!ok) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan, nan, nan};
  }
  return {cx, cv, std, kl_d};
}

void sde_step_fwd(In x, In v, In eps, In prev, In vref, const SdeSched& sc, int64_t B, int64_t N, float* mean,
                  float* new_prev, float* log_prob, float* std, float* kl) {
  const int64_t chunks = sde_chunks(N);
  std::vector<SdeCoef> coef(static_cast<size_t>(B));
  std::vector<float> cx(B), cv(B), sd(B);
  for (int64_t b = 0; b < B; ++b) {
    coef[b] = sde_coefficients(sc, b);
    cx[b] = static_cast<float>(coef[b].cx), cv[b] = static_cast<float>(coef[b].cv);
    sd[b] = static_cast<float>(coef[b].std);
  }
  std::vector<Partial> parts(static_cast<size_t>(B * chunks));
#pragma omp parallel for schedule(static) if (B * N >= SERIAL_ELEMENTS)
  for (int64_t t = 0; t < B * chunks; ++t) {
    const int64_t b = t / chunks, c = t % chunks;
    const int64_t begin = b * N + c * SDE_CHUNK;
    const int64_t end = b * N + (c + 1 < chunks ? (c + 1) * SDE_CHUNK : N);
    parts[t] = sde_fwd_chunk(x, v, eps, prev, vref, cx[b], cv[b], sd[b], begin, end, mean, new_prev);
  }
  const bool has_sample = eps.present() || prev.present();
  const double n = static_cast<double>(N);
  for (int64_t b = 0; b < B; ++b) {  // fixed order over chunks: deterministic
    double s = 0.0, k = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      s += parts[b * chunks + c].ssq;
      k += parts[b * chunks + c].klssq;
    }
    const SdeCoef& cf = coef[b];
    std[b] = static_cast<float>(cf.std);
    double lp = 0.0 * cf.std;  // no density (ODE); NaN with invalid sigmas
    if (has_sample) lp = sc.kind == 2 ? -s / n + 0.0 * cf.std
                                      : -s / (2.0 * n * cf.std * cf.std) - std::log(cf.std) - LOG_SQRT_2PI;
    log_prob[b] = static_cast<float>(lp);
    if (kl) kl[b] = static_cast<float>(k / (2.0 * n * cf.kl_d * cf.kl_d));
  }
}

void sde_step_bwd(In x, In v, In prev, In vref, const SdeSched& sc, const float* g_mean, const float* g_log_prob,
                  int64_t glp_stride, const float* g_kl, int64_t gkl_stride, int64_t B, int64_t N, void* gx,
                  DType gx_dtype, void* gv, DType gv_dtype, void* gvref, DType gvref_dtype) {
  // d log_prob/d ssq = -1/(2 N std^2) (cps: -1/N); d kl/d klssq = 1/(2 N kl_d^2), in float64 then rounded.
  const int64_t chunks = sde_chunks(N);
  const double n = static_cast<double>(N);
  std::vector<float> cx(B), cv(B), gssq(B, 0.0f), gkl(B, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    const SdeCoef cf = sde_coefficients(sc, b);
    cx[b] = static_cast<float>(cf.cx), cv[b] = static_cast<float>(cf.cv);
    if (g_log_prob) {
      const double glp = g_log_prob[b * glp_stride];
      gssq[b] = static_cast<float>(sc.kind == 2 ? -glp / n : -glp / (2.0 * n * cf.std * cf.std));
    }
    if (g_kl) gkl[b] = static_cast<float>(g_kl[b * gkl_stride] / (2.0 * n * cf.kl_d * cf.kl_d));
  }
#pragma omp parallel for schedule(static) if (B * N >= SERIAL_ELEMENTS)
  for (int64_t t = 0; t < B * chunks; ++t) {
    const int64_t b = t / chunks, c = t % chunks;
    const int64_t begin = b * N + c * SDE_CHUNK;
    const int64_t end = b * N + (c + 1 < chunks ? (c + 1) * SDE_CHUNK : N);
    sde_bwd_chunk(x, v, prev, vref, g_mean, gssq[b], gkl[b], cx[b], cv[b], begin, end, gx, gx_dtype, gv, gv_dtype,
                  gvref, gvref_dtype);
  }
}

}  // namespace fastgrpo
