// The CPU kernels of fastgrpo._C on raw arrays (no torch types); csrc/bindings.cpp wraps them for Python.
#pragma once

#include "common.h"

namespace fastgrpo {

// ---- sde_step (fastgrpo/ops/sde.py): mean = cx[b]*x + cv[b]*v per sample b of N elements --------------------
constexpr int64_t SDE_CHUNK = 16384;  // elements per parallel task; a function of N only (deterministic sums)

inline int64_t sde_chunks(int64_t n) { return n == 0 ? 1 : (n + SDE_CHUNK - 1) / SDE_CHUNK; }

// Forward. Exactly one of eps / prev may be present (sample, or the log-prob of a given sample); neither: ODE.
// Writes mean [B, N] and, when sampling, new_prev [B, N]; ssq [B] = sum (prev - mean)^2 when eps or prev is
// present, klssq [B] = sum (cv (v - v_ref))^2 when v_ref is present (null outputs are skipped).
void sde_step_fwd(In x, In v, In eps, In prev, In vref, const float* cx, const float* cv, const float* std,
                  int64_t B, int64_t N, float* mean, float* new_prev, float* ssq, float* klssq);

// Backward: g = g_mean - 2 g_ssq[b] (prev - mean); gx = cx g; gk = 2 g_klssq[b] cv^2 (v - v_ref);
// gv = cv g + gk; gvref = -gk. Absent inputs (null pointers) drop their terms; null outputs are skipped.
void sde_step_bwd(In x, In v, In prev, In vref, const float* g_mean, const float* g_ssq, const float* g_klssq,
                  const float* cx, const float* cv, int64_t B, int64_t N, void* gx, DType gx_dtype, void* gv,
                  DType gv_dtype, void* gvref, DType gvref_dtype);

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
