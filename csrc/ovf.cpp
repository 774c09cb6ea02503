// Optimal Variance Filtering on CPU: the C++ twin of kernels/ovf.py (the argument that the k + 1 "j smallest plus
// k - j largest" candidates contain an optimum is in fastgrpo/ops/ovf.py).
//
// Per group (OpenMP over groups): pack each reward's order-preserving 32-bit image above its index into one
// 64-bit key and sort the keys (ascending rewards, equal rewards by index: the stable order), centre the sorted
// rewards on the middle one, take prefix and suffix sums of d and d^2, score every j as
// k * sum d^2 - (sum d)^2 = k^2 Var_j, keep the first maximum (smallest j on ties), and return the chosen indices
// ascending with the population variance recomputed in two passes over the chosen rewards.
// Rewards are float32 values (inputs of other types are converted exactly); the sums and scores are in float64,
// which is exact wherever the float32 kernels are (small integers, dyadic rewards) and rounds less elsewhere.
#include "kernels.h"

#include <algorithm>
#include <vector>

namespace fastgrpo {
namespace {

inline uint32_t order_bits(float x) {
  if (x == 0.0f) x = 0.0f;  // -0.0 and +0.0 are the same reward
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // unsigned order of the bits = order of the floats
}

inline float from_order_bits(uint32_t b) {
  b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

struct Scratch {
  std::vector<uint64_t> keys;
  std::vector<double> d, pre1, pre2, suf1, suf2;
  std::vector<int64_t> picked;
};

void select_group(const float* r, int64_t G, int64_t stride_g, int64_t k, int64_t* out_idx, float* out_var,
                  Scratch& w) {
  w.keys.resize(G);
  for (int64_t g = 0; g < G; ++g) w.keys[g] = (static_cast<uint64_t>(order_bits(r[g * stride_g])) << 32) | g;
  std::sort(w.keys.begin(), w.keys.end());
  w.d.resize(G);
  const double centre = from_order_bits(static_cast<uint32_t>(w.keys[G / 2] >> 32));
  for (int64_t g = 0; g < G; ++g) w.d[g] = static_cast<double>(from_order_bits(w.keys[g] >> 32)) - centre;
  // pre*[i] = sum over sorted positions < i; suf*[i] = sum over positions >= i.
  w.pre1.assign(G + 1, 0.0);
  w.pre2.assign(G + 1, 0.0);
  w.suf1.assign(G + 1, 0.0);
  w.suf2.assign(G + 1, 0.0);
  for (int64_t g = 0; g < G; ++g) {
    w.pre1[g + 1] = w.pre1[g] + w.d[g];
    w.pre2[g + 1] = w.pre2[g] + w.d[g] * w.d[g];
  }
  for (int64_t g = G - 1; g >= 0; --g) {
    w.suf1[g] = w.suf1[g + 1] + w.d[g];
    w.suf2[g] = w.suf2[g + 1] + w.d[g] * w.d[g];
  }
  int64_t best = 0;
  double best_score = 0.0;
  for (int64_t j = 0; j <= k; ++j) {  // bottom: positions < j; top: positions >= G - k + j
    const double s1 = w.pre1[j] + w.suf1[G - k + j];
    const double s2 = w.pre2[j] + w.suf2[G - k + j];
    const double score = static_cast<double>(k) * s2 - s1 * s1;
    if (j == 0 || score > best_score) {  // strict: the first maximum wins
      best = j;
      best_score = score;
    }
  }
  w.picked.clear();
  double mean = 0.0;
  for (int64_t pos = 0; pos < G; ++pos) {
    if (pos < best || pos >= G - k + best) {
      w.picked.push_back(static_cast<int64_t>(w.keys[pos] & 0xFFFFFFFFu));
      mean += w.d[pos];
    }
  }
  mean /= static_cast<double>(k);
  double var = 0.0;
  for (int64_t pos = 0; pos < G; ++pos) {
    if (pos < best || pos >= G - k + best) var += (w.d[pos] - mean) * (w.d[pos] - mean);
  }
  std::sort(w.picked.begin(), w.picked.end());
  std::copy(w.picked.begin(), w.picked.end(), out_idx);
  *out_var = static_cast<float>(var / static_cast<double>(k));
}

}  // namespace

void ovf_select(In rewards, int64_t P, int64_t G, int64_t stride_p, int64_t stride_g, int64_t k, int64_t* indices,
                float* variance) {
#pragma omp parallel
  {
    Scratch w;
    std::vector<float> row(G);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const float* r;
      if (rewards.dtype == DType::F32) {
        r = static_cast<const float*>(rewards.ptr) + p * stride_p;
      } else {  // gather the row to float32 (exact for float16 / bfloat16)
        for (int64_t g = 0; g < G; ++g) load_block(rewards, p * stride_p + g * stride_g, 1, &row[g]);
        r = row.data();
      }
      select_group(r, G, rewards.dtype == DType::F32 ? stride_g : 1, k, indices + p * k, variance + p, w);
    }
  }
}

}  // namespace fastgrpo
