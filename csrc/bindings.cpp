// Python bindings of fastgrpo._C (pybind11 through torch.utils.cpp_extension): tensors in, raw arrays to the
// kernels of csrc/*.cpp, tensors out. The signatures mirror the Triton launchers in kernels/ so that one
// autograd.Function per op (fastgrpo/ops/) drives either backend. User-facing validation happens in Python before
// these are called; the checks here guard the internal contract (CPU, layout, dtypes) with clear messages.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define FASTGRPO_OUTPUT_CACHE 1
#endif
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>
#include <string>
#include <tuple>
#include <utility>

#include "kernels.h"

namespace fastgrpo {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: TORCH_CHECK(false, name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
  return DType::F32;
}

void check_cpu_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

In as_in(const OptTensor& t, const char* name, int64_t numel) {
  if (!t.has_value()) return In{};
  check_cpu_contiguous(*t, name);
  TORCH_CHECK(t->numel() == numel, name, " must have ", numel, " elements, got ", t->numel());
  return In{t->data_ptr(), dtype_of(*t, name)};
}

const float* f32_ptr(const OptTensor& t, const char* name, int64_t numel) {
  if (!t.has_value()) return nullptr;
  check_cpu_contiguous(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == numel, name, " must have ", numel, " elements, got ", t->numel());
  return t->data_ptr<float>();
}

at::TensorOptions f32_on(const Tensor& like) { return like.options().dtype(at::kFloat); }

// ---- reused output buffers (issue 20) ---------------------------------------------------------------------------
// Large outputs of the ops (sde_step's mean and sample, the gradients, token_logprob_entropy's dlogits) come from
// this allocator: a block of B bytes is mapped once (mmap) and, when its tensor is freed, kept in a free list for
// the next output of the same size instead of being unmapped. glibc maps a fresh zeroed block for every large
// allocation (above its mmap threshold, or when it trims the heap top), and the kernel then takes one page fault per
// 4 KiB of the first write: 3-4 ns per float32 element on this box against 0.8 for the whole fused step with
// recycled memory, so an sde_step at SD3.5-512 took 5 ms instead of 1.3. The cache holds only blocks the process
// had in use a moment before (the peak memory does not grow), at most FASTGRPO_CPU_CACHE_MB MiB of them (default
// 1024; 0 turns the cache off: every output is a fresh torch allocation, as before); `_C.empty_cache()` unmaps them.
// Outputs below 256 KiB come from torch's allocator (glibc's heap recycles those without faults).
constexpr size_t CACHE_MIN_BYTES = size_t(256) << 10;

#ifdef FASTGRPO_OUTPUT_CACHE
class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t limit = limit_bytes();
    if (n < CACHE_MIN_BYTES || limit == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + PAGE - 1) / PAGE * PAGE;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
      }
    }
    if (!p) {
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return c10::GetCPUAllocator()->allocate(n);  // let torch report the failure
    }
    return {p, new Block{p, size}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // Unmap every cached block; returns the bytes released.
  size_t empty() {
    std::lock_guard<std::mutex> g(mu_);
    size_t freed = cached_;
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) munmap(p, size);
    free_.clear();
    cached_ = 0;
    return freed;
  }
  size_t cached_bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return cached_;
  }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may be freed at exit after statics
    return *cache;
  }

 private:
  static constexpr size_t PAGE = 4096;
  struct Block {
    void* ptr;
    size_t size;
  };

  static size_t limit_bytes() {
    static const size_t limit = [] {
      const char* env = std::getenv("FASTGRPO_CPU_CACHE_MB");
      if (!env || !*env) return size_t(1024) << 20;
      char* end = nullptr;
      const double mb = std::strtod(env, &end);
      return (end == env || !(mb > 0)) ? size_t(0) : static_cast<size_t>(mb * 1048576.0);
    }();
    return limit;
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    OutputCache& c = get();
    bool keep = false;
    {
      std::lock_guard<std::mutex> g(c.mu_);
      if (c.cached_ + b->size <= limit_bytes()) {
        c.free_[b->size].push_back(b->ptr);
        c.cached_ += b->size;
        keep = true;
      }
    }
    if (!keep) munmap(b->ptr, b->size);
    delete b;
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// An uninitialised contiguous CPU tensor; large ones come from the OutputCache.
Tensor out_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}
size_t cache_empty() { return OutputCache::get().empty(); }
size_t cache_bytes() { return OutputCache::get().cached_bytes(); }
#else  // no mmap: torch's allocator
Tensor out_empty(at::IntArrayRef sizes, at::ScalarType dtype) { return at::empty(sizes, at::dtype(dtype)); }
size_t cache_empty() { return 0; }
size_t cache_bytes() { return 0; }
#endif
Tensor out_empty_f32(at::IntArrayRef sizes) { return out_empty(sizes, at::kFloat); }

// ---- sde_step ---------------------------------------------------------------------------------------------------

// A latent [B, ...] as B rows of N elements (the op passes [B, N], or x itself when it is contiguous: outputs then
// come back in x's shape with no view to make in Python).
std::pair<int64_t, int64_t> rows_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "x must be [B, ...] with at least one non-batch dim, got ", x.dim(), " dims");
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) n *= x.size(d);
  return {x.size(0), n};
}

// A fastgrpo.ops.sde._Schedule (the argument the Triton launchers take) as the kernels' SdeSched. Its sigma
// tensors are float64 CPU arrays (the op copies per-sample host sigmas into one); `keep` holds converted copies.
SdeSched sched_of(const pybind11::object& sched, bool has_vref, Tensor keep[2]) {
  namespace py = pybind11;
  SdeSched sc;
  const std::string kind = sched.attr("kind").cast<std::string>();
  sc.kind = kind == "flow_grpo" ? 0 : kind == "dance" ? 1 : kind == "cps" ? 2 : kind == "ode" ? 3 : -1;
  TORCH_CHECK(sc.kind >= 0, "unknown sde_step kind ", kind);
  sc.s_val = sched.attr("s").cast<double>();
  sc.sn_val = sched.attr("sn").cast<double>();
  const char* names[2] = {"s_tensor", "sn_tensor"};
  for (int i = 0; i < 2; ++i) {
    py::object t = sched.attr(names[i]);
    if (t.is_none()) continue;
    Tensor ten = t.cast<Tensor>();
    TORCH_CHECK(ten.device().is_cpu(), names[i], " must be a CPU tensor, got one on ", ten.device());
    int64_t stride = ten.numel() == 1 ? 0 : ten.stride(0);
    if (ten.scalar_type() != at::kDouble) {
      ten = ten.to(at::kDouble).contiguous();
      stride = ten.numel() == 1 ? 0 : 1;
    }
    keep[i] = ten;
    (i == 0 ? sc.s_ptr : sc.sn_ptr) = ten.data_ptr<double>();
    (i == 0 ? sc.s_stride : sc.sn_stride) = stride;
  }
  sc.noise_level = sched.attr("noise_level").cast<double>();
  sc.sigma_max = sched.attr("sigma_max").cast<double>();
  sc.sin_a = sched.attr("sin_a").cast<double>();
  sc.has_sigma_max = sched.attr("has_sigma_max").cast<bool>();
  sc.kl_exact = sched.attr("kl_exact").cast<bool>();
  sc.has_vref = has_vref;
  return sc;
}

std::tuple<OptTensor, Tensor, Tensor, Tensor, OptTensor> sde_step_fwd_py(const Tensor& x, const Tensor& v,
                                                                         const pybind11::object& sched,
                                                                         const OptTensor& eps, const OptTensor& prev,
                                                                         const OptTensor& v_ref) {
  TORCH_CHECK(!(eps.has_value() && prev.has_value()), "give eps (sample) or prev (given sample), not both");
  const auto [B, N] = rows_of(x);
  Tensor keep[2];
  const SdeSched sc = sched_of(sched, v_ref.has_value(), keep);
  const bool ode = sc.kind == 3;
  const In ix = as_in(x, "x", B * N), iv = as_in(v, "v", B * N), ir = as_in(v_ref, "v_ref", B * N);
  const In ie = ode ? In{} : as_in(eps, "eps", B * N), ip = ode ? In{} : as_in(prev, "prev", B * N);
  Tensor mean = out_empty_f32(x.sizes());
  OptTensor new_prev, kl;
  if (eps.has_value() && !ode) new_prev = out_empty_f32(x.sizes());
  Tensor log_prob = at::empty({B}, f32_on(x)), std = at::empty({B}, f32_on(x));
  if (v_ref.has_value()) kl = at::empty({B}, f32_on(x));
  if (B > 0) {
    pybind11::gil_scoped_release no_gil;
    sde_step_fwd(ix, iv, ie, ip, ir, sc, B, N, mean.data_ptr<float>(), new_prev ? new_prev->data_ptr<float>() : nullptr,
                 log_prob.data_ptr<float>(), std.data_ptr<float>(), kl ? kl->data_ptr<float>() : nullptr);
  }
  return {new_prev, mean, log_prob, std, kl};
}

const float* f32_strided(const OptTensor& t, const char* name, int64_t numel, int64_t* stride) {
  *stride = 0;
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got one on ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->numel() == numel, name, " must have shape [", numel, "]");
  *stride = t->stride(0);
  return t->data_ptr<float>();
}

std::tuple<OptTensor, OptTensor, OptTensor> sde_step_bwd_py(const Tensor& x, const Tensor& v,
                                                            const pybind11::object& sched, const OptTensor& prev,
                                                            const OptTensor& v_ref, const OptTensor& g_mean,
                                                            const OptTensor& g_log_prob, const OptTensor& g_kl,
                                                            bool need_gx, bool need_gv, bool need_gvref) {
  const auto [B, N] = rows_of(x);
  Tensor keep[2];
  const SdeSched sc = sched_of(sched, v_ref.has_value(), keep);
  const bool has_diff = g_log_prob.has_value() && prev.has_value() && sc.kind != 3;
  const bool has_ref = g_kl.has_value() && v_ref.has_value();
  OptTensor gx, gv, gvref;
  if (need_gx) gx = out_empty(x.sizes(), x.scalar_type());
  if (need_gv) gv = out_empty(v.sizes(), v.scalar_type());
  if (need_gvref && v_ref.has_value()) {
    // Without a KL gradient, v_ref influences nothing that was differentiated.
    gvref = has_ref ? out_empty(v_ref->sizes(), v_ref->scalar_type()) : at::zeros_like(*v_ref);
  }
  const bool write_gvref = gvref.has_value() && has_ref;
  if (B > 0 && (need_gx || need_gv || write_gvref)) {
    int64_t glp_stride = 0, gkl_stride = 0;
    const float* glp = has_diff ? f32_strided(g_log_prob, "g_log_prob", B, &glp_stride) : nullptr;
    const float* gkl = has_ref ? f32_strided(g_kl, "g_kl", B, &gkl_stride) : nullptr;
    const In ix = as_in(x, "x", B * N), iv = as_in(v, "v", B * N);
    const In ip = has_diff ? as_in(prev, "prev", B * N) : In{}, ir = has_ref ? as_in(v_ref, "v_ref", B * N) : In{};
    const float* gm = f32_ptr(g_mean, "g_mean", B * N);
    void* pgx = gx ? gx->data_ptr() : nullptr;
    void* pgv = gv ? gv->data_ptr() : nullptr;
    void* pgr = write_gvref ? gvref->data_ptr() : nullptr;
    const DType tx = gx ? dtype_of(*gx, "x") : DType::F32, tv = gv ? dtype_of(*gv, "v") : DType::F32;
    const DType tr = write_gvref ? dtype_of(*gvref, "v_ref") : DType::F32;
    pybind11::gil_scoped_release no_gil;
    sde_step_bwd(ix, iv, ip, ir, sc, gm, glp, glp_stride, gkl, gkl_stride, B, N, pgx, tx, pgv, tv, pgr, tr);
  }
  return {gx, gv, gvref};
}

// ---- token_logprob_entropy --------------------------------------------------------------------------------------

TokenRows token_rows(const Tensor& logits3, const Tensor& targets, double inv_t, int64_t ignore_index,
                     double ent_scale) {
  TORCH_CHECK(logits3.dim() == 3, "logits3 must be [P, L, V], got ", logits3.dim(), " dims");
  TORCH_CHECK(logits3.device().is_cpu(), "logits must be a CPU tensor, got one on ", logits3.device());
  TORCH_CHECK(logits3.size(2) == 0 || logits3.stride(2) == 1, "logits must have unit stride along V");
  check_cpu_contiguous(targets, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.numel() == logits3.size(0) * logits3.size(1), "targets must have P * L elements");
  return TokenRows{In{logits3.data_ptr(), dtype_of(logits3, "logits")}, logits3.size(0), logits3.size(1),
                   logits3.size(2), logits3.stride(0), logits3.stride(1), targets.data_ptr<int64_t>(),
                   static_cast<float>(inv_t), ignore_index, static_cast<float>(ent_scale)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> token_stats_fwd_py(const Tensor& logits3, const Tensor& targets,
                                                                      double inv_t, int64_t ignore_index,
                                                                      double ent_scale) {
  const TokenRows rows = token_rows(logits3, targets, inv_t, ignore_index, ent_scale);
  const int64_t R = rows.P * rows.L;
  // The target range, checked here rather than with torch ops in Python (issue 20): the kernel indexes with it.
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = rows.targets[r];
    if (t != ignore_index && (t < 0 || t >= rows.V))
      throw pybind11::value_error("targets must lie in [0, " + std::to_string(rows.V) +
                                  ") (the vocabulary of logits) or equal ignore_index=" + std::to_string(ignore_index));
  }
  auto o = f32_on(logits3);
  // logp and entropy in the targets' shape (no view to make in Python)
  Tensor logp = at::empty(targets.sizes(), o), ent = at::empty(targets.sizes(), o), rowmax = at::empty({R}, o),
         logs = at::empty({R}, o), mean_rel = at::empty({R}, o);
  if (R > 0) {
    token_stats_fwd(rows, logp.data_ptr<float>(), ent.data_ptr<float>(), rowmax.data_ptr<float>(),
                    logs.data_ptr<float>(), mean_rel.data_ptr<float>());
  }
  return {logp, ent, rowmax, logs, mean_rel};
}

Tensor token_stats_bwd_py(const Tensor& logits3, const Tensor& targets, const Tensor& rowmax, const Tensor& logs,
                          const Tensor& mean_rel, const OptTensor& g_logp, const OptTensor& g_ent, double inv_t,
                          int64_t ignore_index, double ent_scale) {
  const TokenRows rows = token_rows(logits3, targets, inv_t, ignore_index, ent_scale);
  const int64_t R = rows.P * rows.L;
  Tensor dlogits = out_empty({rows.P, rows.L, rows.V}, logits3.scalar_type());
  if (R > 0) {
    token_stats_bwd(rows, f32_ptr(rowmax, "rowmax", R), f32_ptr(logs, "logs", R), f32_ptr(mean_rel, "mean_rel", R),
                    f32_ptr(g_logp, "g_logp", R), f32_ptr(g_ent, "g_ent", R), dlogits.data_ptr());
  }
  return dlogits;
}

// ---- ovf_select -------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> ovf_select_py(const Tensor& rewards, int64_t k) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [P, G], got ", rewards.dim(), " dims");
  TORCH_CHECK(rewards.device().is_cpu(), "rewards must be a CPU tensor, got one on ", rewards.device());
  const int64_t P = rewards.size(0), G = rewards.size(1);
  TORCH_CHECK(k >= 1 && k <= G, "k must satisfy 1 <= k <= G = ", G, ", got ", k);
  TORCH_CHECK(G < (int64_t(1) << 32), "groups must have fewer than 2^32 rewards");
  Tensor idx = at::empty({P, k}, rewards.options().dtype(at::kLong));
  Tensor var = at::empty({P}, f32_on(rewards));
  if (P > 0) {
    ovf_select(In{rewards.data_ptr(), dtype_of(rewards, "rewards")}, P, G, rewards.stride(0), rewards.stride(1), k,
               idx.data_ptr<int64_t>(), var.data_ptr<float>());
  }
  return {idx, var};
}

// max |r| over a [P, G] tensor of any strides, NaN when one is NaN (ovf_select's value check: one call instead of
// three torch ops).
double max_abs_py(const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "max_abs takes [P, G], got ", t.dim(), " dims");
  TORCH_CHECK(t.device().is_cpu(), "max_abs needs a CPU tensor, got one on ", t.device());
  const In a{t.data_ptr(), dtype_of(t, "rewards")};
  const int64_t P = t.size(0), G = t.size(1), sp = t.stride(0), sg = t.stride(1);
  double top = 0.0;
  float v;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t g = 0; g < G; ++g) {
      const double x = a.dtype == DType::F64 ? static_cast<const double*>(a.ptr)[p * sp + g * sg]
                                             : static_cast<double>(*load_block(a, p * sp + g * sg, 1, &v));
      const double ax = std::fabs(x);
      if (ax != ax) return ax;
      top = ax > top ? ax : top;
    }
  return top;
}

}  // namespace
}  // namespace fastgrpo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fastgrpo;
  m.doc() = "fastgrpo._C: fused CPU kernels (OpenMP) of sde_step, token_logprob_entropy and ovf_select";
  m.attr("BLOCK") = BLOCK;            // logits per staging block of a token row (tests place hard blocks with it)
  m.attr("SDE_CHUNK") = SDE_CHUNK;    // latent elements per parallel sde_step task
  // The vector ISA the whole module was compiled for (fastgrpo/_ext.py, FASTGRPO_CPU_ISA); "generic" is the
  // portable build whose hot loops are cloned for AVX2 and the baseline.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  m.attr("ISA") = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  m.attr("ISA") = "avx2";
#else
  m.attr("ISA") = "generic";
#endif
  m.def("sde_step_fwd", &sde_step_fwd_py, py::arg("x"), py::arg("v"), py::arg("sched"), py::kw_only(),
        py::arg("eps") = py::none(), py::arg("prev") = py::none(), py::arg("v_ref") = py::none(),
        "sde_step forward on [B, N] rows with a fastgrpo.ops.sde._Schedule (the Triton launcher's arguments): "
        "(prev or None, mean, log_prob [B], std [B], kl [B] or None), float32");
  m.def("sde_step_bwd", &sde_step_bwd_py, py::arg("x"), py::arg("v"), py::arg("sched"), py::kw_only(),
        py::arg("prev") = py::none(), py::arg("v_ref") = py::none(), py::arg("g_mean") = py::none(),
        py::arg("g_log_prob") = py::none(), py::arg("g_kl") = py::none(), py::arg("need_gx") = true,
        py::arg("need_gv") = true, py::arg("need_gvref") = false,
        "sde_step backward: (g_x or None, g_v or None, g_vref or None) in the inputs' dtypes");
  m.def("token_stats_fwd", &token_stats_fwd_py, py::arg("logits3"), py::arg("targets"), py::arg("inv_t"),
        py::arg("ignore_index"), py::arg("ent_scale"),
        "token log-prob and entropy forward: float32 [R] (logp, entropy, rowmax, log_s, mean_rel)");
  m.def("token_stats_bwd", &token_stats_bwd_py, py::arg("logits3"), py::arg("targets"), py::arg("rowmax"),
        py::arg("logs"), py::arg("mean_rel"), py::arg("g_logp"), py::arg("g_ent"), py::arg("inv_t"),
        py::arg("ignore_index"), py::arg("ent_scale"), "token log-prob and entropy backward: dlogits [P, L, V]");
  m.def("empty_cache", &cache_empty,
        "unmap the output buffers kept for reuse (FASTGRPO_CPU_CACHE_MB); returns the bytes released");
  m.def("cached_bytes", &cache_bytes,
        "bytes of output buffers kept for reuse");
  m.def("max_abs", &max_abs_py, py::arg("rewards"), "max |r| of a [P, G] tensor (NaN if one is NaN), as a float");
  m.def("ovf_select_launch", &ovf_select_py, py::arg("rewards"), py::arg("k"),
        "OVF on [P, G] rewards: (indices [P, k] int64 ascending, variance [P] float32)");
}
