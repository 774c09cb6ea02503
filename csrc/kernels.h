// The CPU kernels of fastgrpo._C on raw arrays (no torch types); csrc/bindings.cpp wraps them for Python.
#pragma once

#include "common.h"

namespace fastgrpo {

// ---- sde_step (fastgrpo/ops/sde.py): mean = cx[b]*x + cv[b]*v per sample b of N elements --------------------
constexpr int64_t SDE_CHUNK = 16384;  // elements per parallel task; a function of N only (deterministic sums)

inline int64_t sde_chunks(int64_t n) { return n == 0 ? 1 : (n + SDE_CHUNK - 1) / SDE_CHUNK; }

// The step's sigmas and constants (fastgrpo/ops/sde.py, _Schedule): a sigma is a float64 scalar or a float64 array
// read at b * stride. kind: 0 flow_grpo, 1 dance, 2 cps, 3 ode (kernels/sde_step.py, KIND_IDS).
struct SdeSched {
  int kind = 0;
  const double* s_ptr = nullptr;
  const double* sn_ptr = nullptr;
  double s_val = 0.0, sn_val = 0.0;
  int64_t s_stride = 0, sn_stride = 0;
  double noise_level = 0.0, sigma_max = 0.5, sin_a = 0.0;
  bool has_sigma_max = false, kl_exact = false, has_vref = false;
};

// float64 coefficients of sample b: mean = cx x + cv v, the transition std, and kl_d (the KL divides by 2 kl_d^2).
// NaN when its sigmas are invalid (the twin of kernels/sde_step.py, _coefficients).
struct SdeCoef {
  double cx, cv, std, kl_d;
};
SdeCoef sde_coefficients(const SdeSched& sc, int64_t b);

// Forward. Exactly one of eps / prev may be present (sample, or the log-prob of a given sample); neither: ODE (no
// density). Writes mean [B, N], new_prev [B, N] when sampling, and the [B] epilogue in float64 from per-chunk
// float32 partial sums added in chunk order: log_prob (-ssq / (2 N std^2) - log std - log sqrt(2 pi); cps: -ssq / N;
// 0 without a sample), std, and kl (klssq / (2 N kl_d^2), when vref is present).
void sde_step_fwd(In x, In v, In eps, In prev, In vref, const SdeSched& sc, int64_t B, int64_t N, float* mean,
                  float* new_prev, float* log_prob, float* std, float* kl);

// Backward: g = g_mean - 2 g_ssq[b] (prev - mean) with g_ssq = d log_prob / d ssq * g_log_prob[b];
// gx = cx g; gk = 2 g_klssq[b] cv^2 (v - v_ref); gv = cv g + gk; gvref = -gk. Absent inputs (null pointers) drop
// their terms; null outputs are skipped. g_log_prob / g_kl: [B] float32 read at b * stride.
void sde_step_bwd(In x, In v, In prev, In vref, const SdeSched& sc, const float* g_mean, const float* g_log_prob,
                  int64_t glp_stride, const float* g_kl, int64_t gkl_stride, int64_t B, int64_t N, void* gx,
                  DType gx_dtype, void* gv, DType gv_dtype, void* gvref, DType gvref_dtype);

// ---- token_logprob_entropy (fastgrpo/ops/token_entropy.py) -----------------------------------------------------
// Rows r = p * L + l of logits at p * stride_p + l * stride_l (unit stride along V).
struct TokenRows {
  In logits;
  int64_t P, L, V, stride_p, stride_l;
  const int64_t* targets;  // [P * L]
  float inv_t;
  int64_t ignore_index;
  float ent_scale;
};

// Forward: one pass over each row with an online softmax. Writes float32 [R] logp, entropy and the statistics
// the backward needs: rowmax (of the raw logits), log_s, mean_rel (= E_p[z] - rowmax / T).
void token_stats_fwd(const TokenRows& rows, float* logp, float* ent, float* rowmax, float* logs, float* mean_rel);

// Backward: dlogits [R, V] (contiguous, logits' dtype) = [g_logp (onehot - p) - g_ent ent_scale p (z - E_p z)] / T.
// g_logp / g_ent may be null (that output unused).
void token_stats_bwd(const TokenRows& rows, const float* rowmax, const float* logs, const float* mean_rel,
                     const float* g_logp, const float* g_ent, void* dlogits);

// ---- ovf_select (fastgrpo/ops/ovf.py) ---------------------------------------------------------------------------
// rewards [P, G] at p * stride_p + g * stride_g; writes indices [P, k] ascending and variance [P].
void ovf_select(In rewards, int64_t P, int64_t G, int64_t stride_p, int64_t stride_g, int64_t k, int64_t* indices,
                float* variance);

}  // namespace fastgrpo
