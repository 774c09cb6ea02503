// Token log-prob and entropy over rows of V logits on CPU: the C++ twin of kernels/token_entropy.py (formulas and
// sources in fastgrpo/ops/token_entropy.py).
//
// One pass over each row with an online softmax, in blocks of BLOCK logits: with z = x / T and the running max m
// of the raw logits x (initialised to -inf, never 0, so a row of -1e4 logits does not underflow), keep in float32
//
//     s = sum_j exp(d_j),   w = sum_j exp(d_j) d_j,     d_j = (x_j - m) / T
//
// so that logsumexp(z) = m/T + log s, E_p[z] = m/T + w/s and entropy = log s - w/s (the offset m cancels exactly).
// A block converts its logits to float32 once (they stay in L1), takes its max, and when the max moves from m to
// m' rescales s and w by a = exp((m - m')/T) (w also gains s (m - m')/T): one exp per logit. Entries of -inf
// (a masked vocabulary) add nothing and never form 0 * inf. OpenMP runs rows in parallel; each row is summed in a
// fixed order, so results do not depend on the number of threads. The backward recomputes
// p = exp((x - rowmax)/T - log s) from the three saved float32 numbers per row in one more pass.
//
// Bytes moved: the forward reads the logits once (R V elements) and writes O(R); the backward reads them once
// more and writes R V gradients. No [R, V] float32 intermediate exists at any point.
#include <limits>
#include "kernels.h"

#include <cmath>

namespace fastgrpo {
namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline const void* row_ptr(const TokenRows& t, int64_t r) {
  const int64_t p = r / t.L, l = r % t.L;
  const int64_t off = p * t.stride_p + l * t.stride_l;
  switch (t.logits.dtype) {
    case DType::F32: return static_cast<const float*>(t.logits.ptr) + off;
    case DType::F16: return static_cast<const c10::Half*>(t.logits.ptr) + off;
    case DType::BF16: return static_cast<const c10::BFloat16*>(t.logits.ptr) + off;
    case DType::F64: return static_cast<const double*>(t.logits.ptr) + off;
  }
  return nullptr;
}

inline float block_max(const float* x, int n) {
  float m = NEG_INF;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}

struct RowStats {
  float m, s, w;  // running max of raw logits, sum exp(d), sum exp(d) d
};

FASTGRPO_HOT
RowStats row_stats(In row, int64_t V, float inv_t) {
  alignas(64) float buf[BLOCK];
  float m = NEG_INF, s = 0.0f, w = 0.0f;
  for (int64_t off = 0; off < V; off += BLOCK) {
    const int n = static_cast<int>(V - off < BLOCK ? V - off : BLOCK);
    const float* x = load_block(row, off, n, buf);
    int nans = 0;
#pragma omp simd reduction(+ : nans)
    for (int i = 0; i < n; ++i) nans += x[i] != x[i];
    if (nans) {  // a max skips NaN: the row's statistics are NaN, as log_softmax gives (issue 14: logp was +inf)
      const float nan = std::numeric_limits<float>::quiet_NaN();
      return {nan, nan, nan};
    }
    const float bm = block_max(x, n);
    const float m_new = m > bm ? m : bm;
    if (m_new == NEG_INF) continue;  // every logit so far is -inf: s = w = 0 stay
    if (m != NEG_INF && m_new != m) {
      const float shift = (m - m_new) * inv_t;
      const float a = std::exp(shift);
      w = a * (w + s * shift);
      s = a * s;
    }
    float bs = 0.0f, bw = 0.0f;
#pragma omp simd reduction(+ : bs, bw)
    for (int i = 0; i < n; ++i) {
      const float d = (x[i] - m_new) * inv_t;  // x - max is exact for nearby values; x/T - m/T would round
      const float e = exp_f32(d);
      bs += e;
      bw += e > 0.0f ? e * d : 0.0f;  // e = 0 where d = -inf
    }
    s += bs;
    w += bw;
    m = m_new;
  }
  return {m, s, w};
}

FASTGRPO_HOT
void row_grad(In row, int64_t V, float inv_t, float big, float logs, float mean_rel, float gl, float ge,
              int64_t target, void* out, DType dtype, int64_t out_off) {
  alignas(64) float buf[BLOCK], g[BLOCK];
  for (int64_t off = 0; off < V; off += BLOCK) {
    const int n = static_cast<int>(V - off < BLOCK ? V - off : BLOCK);
    const float* x = load_block(row, off, n, buf);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const float d = (x[i] - big) * inv_t;
      const float p = exp_f32(d - logs);
      // dH/dz = -p (z - E_p[z]); on -inf logits p = 0 and (z - E_p[z]) = -inf: keep the product 0.
      const float dh = p > 0.0f ? p * (d - mean_rel) : 0.0f;
      g[i] = (-ge * dh - gl * p) * inv_t;
    }
    if (target >= off && target < off + n) g[target - off] += gl * inv_t;
    store_block(out, dtype, out_off + off, n, g);
  }
}

}  // namespace

void token_stats_fwd(const TokenRows& t, float* logp, float* ent, float* rowmax, float* logs, float* mean_rel) {
  const int64_t R = t.P * t.L;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t tgt = t.targets[r];
    if (tgt == t.ignore_index) {  // ignored rows read no logits; neutral statistics (no log 0)
      logp[r] = ent[r] = rowmax[r] = logs[r] = mean_rel[r] = 0.0f;
      continue;
    }
    In row{row_ptr(t, r), t.logits.dtype};
    const RowStats st = row_stats(row, t.V, t.inv_t);
    const float big = st.m == NEG_INF ? 0.0f : st.m;  // a fully masked row gives NaN below, as log_softmax does
    const float ls = std::log(st.s);
    const float mr = st.w / st.s;
    float tmp;
    const float xt = *load_block(row, tgt, 1, &tmp);
    logp[r] = (xt - big) * t.inv_t - ls;
    ent[r] = (ls - mr) * t.ent_scale;
    rowmax[r] = big;
    logs[r] = ls;
    mean_rel[r] = mr;
  }
}

void token_stats_bwd(const TokenRows& t, const float* rowmax, const float* logs, const float* mean_rel,
                     const float* g_logp, const float* g_ent, void* dlogits) {
  const int64_t R = t.P * t.L;
  const size_t elem = element_size(t.logits.dtype);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t tgt = t.targets[r];
    if (tgt == t.ignore_index) {  // no gradient: zeros, logits not read
      std::memset(static_cast<char*>(dlogits) + r * t.V * elem, 0, t.V * elem);  // +0.0 in every dtype
      continue;
    }
    const float gl = g_logp ? g_logp[r] : 0.0f;
    const float ge = g_ent ? g_ent[r] * t.ent_scale : 0.0f;
    row_grad(In{row_ptr(t, r), t.logits.dtype}, t.V, t.inv_t, rowmax[r], logs[r], mean_rel[r], gl, ge, tgt, dlogits,
             t.logits.dtype, r * t.V);
  }
}

}  // namespace fastgrpo
