"""The C++ extension's loader: disabled by FASTGRPO_BUILD_EXT=0, one warning and the torch path when the build
fails, what `fastgrpo env` reports, and results that do not depend on the thread count.

(The kernels themselves are tested against their float64 references in test_sde_step.py,
test_token_logprob_entropy.py and test_ovf.py, parametrised over impl="cpp".)
"""
import warnings

import pytest
import torch

from fastgrpo import (_ext, ovf_select, ovf_select_ref, sde_step, sde_step_ref, token_logprob_entropy,
                      token_logprob_entropy_ref)
from fastgrpo.env import collect_env, format_env
from fastgrpo.ops._backend import resolve_impl


def _inputs():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(2, 3, 5, generator=g) for _ in range(3))
    logits = torch.randn(2, 4, 33, generator=g)
    targets = torch.randint(0, 33, (2, 4), generator=g)
    rewards = torch.randn(3, 8, generator=g)
    return x, v, noise, logits, targets, rewards


def _assert_auto_is_torch_and_cpp_raises(match):
    x, v, noise, logits, targets, rewards = _inputs()
    a, b = sde_step(x, v, 0.6, 0.5, noise=noise), sde_step_ref(x, v, 0.6, 0.5, noise=noise)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.prev_sample, b.prev_sample)
    a, b = token_logprob_entropy(logits, targets), token_logprob_entropy_ref(logits, targets)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a, b = ovf_select(rewards, 3), ovf_select_ref(rewards, 3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.variance, b.variance)
    with pytest.raises(ValueError, match=match):
        sde_step(x, v, 0.6, 0.5, noise=noise, impl="cpp")
    with pytest.raises(ValueError, match=match):
        token_logprob_entropy(logits, targets, impl="cpp")
    with pytest.raises(ValueError, match=match):
        ovf_select(rewards, 3, impl="cpp")


def test_disabled_by_environment(cpp_disabled):
    with cpp_disabled():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabling on purpose is silent
            _assert_auto_is_torch_and_cpp_raises(r"impl='cpp'.*not usable \(disabled by FASTGRPO_BUILD_EXT=0\)")
        assert not _ext.available()
        assert "disabled by FASTGRPO_BUILD_EXT=0" in format_env(collect_env())


def test_build_failure_warns_once_and_falls_back(cpp_build_fails):
    with cpp_build_fails("Error building extension 'fastgrpo_C': csrc/ovf.cpp:3:1: error: simulated failure"):
        with pytest.warns(RuntimeWarning) as caught:
            _assert_auto_is_torch_and_cpp_raises("impl='cpp'.*build failed.*simulated failure")
            _assert_auto_is_torch_and_cpp_raises("build failed")  # later calls: no second warning
        ours = [w for w in caught if "fastgrpo._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "could not be built" in str(ours[0].message) and "simulated failure" in str(ours[0].message)
        assert collect_env()["backends"]["cpp"] is False
        assert "simulated failure" in format_env(collect_env())


def test_real_compile_error_is_reported(cpp_fresh, tmp_path):
    """A real ninja/g++ run on a broken source: the warning quotes the compiler's error line."""
    from torch.utils.cpp_extension import is_ninja_available

    src = tmp_path / "csrc"
    src.mkdir()
    for name in _ext.SOURCES:
        (src / name).write_text("#error deliberately broken source\n" if name == "ovf.cpp" else "\n")
    with cpp_fresh() as m:
        m.delenv("FASTGRPO_BUILD_EXT", raising=False)
        # Another module name: torch versions JIT extensions by name within a process, and a second source set
        # under the real name would make the real build in this process (and its cache) a new version.
        m.setattr(_ext, "NAME", "fastgrpo_C_broken_for_test")
        m.setattr(_ext, "source_dir", lambda: src)
        m.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
        _ext._with_ninja_on_path()
        if not is_ninja_available():
            pytest.skip("ninja is not installed (it is a dependency of fastgrpo: pip install ninja)")
        with pytest.warns(RuntimeWarning, match="deliberately broken source"):
            assert not _ext.available()


def test_missing_sources_are_a_clear_reason(cpp_fresh, tmp_path):
    with cpp_fresh() as m:
        m.delenv("FASTGRPO_BUILD_EXT", raising=False)
        m.setattr(_ext, "source_dir", lambda: tmp_path)
        with pytest.warns(RuntimeWarning, match="C\\+\\+ sources not found"):
            assert _ext.load() is None


def test_cpp_needs_cpu_tensors():
    with pytest.raises(ValueError, match="impl='cpp' runs the C\\+\\+ CPU kernels and got tensors on meta"):
        resolve_impl("cpp", torch.device("meta"), has_cpp=True)
    with pytest.raises(ValueError, match="no C\\+\\+ kernel"):
        resolve_impl("cpp", torch.device("cpu"), has_cpp=False)


def test_env_reports_the_extension():
    info = collect_env()
    text = format_env(info)
    if _ext.available():
        assert info["backends"]["cpp"] is True
        assert "fastgrpo._C built" in text
    else:
        assert info["backends"]["cpp"] is False and "not usable" in text


@pytest.mark.parametrize("impl", ["cpp"])
def test_results_do_not_depend_on_thread_count(impl):
    g = torch.Generator().manual_seed(1)
    x, v, prev, v_ref = (torch.randn(3, 40_000, generator=g) for _ in range(4))  # several chunks per sample
    logits = torch.randn(37, 3000, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 3000, (37,), generator=g)
    rewards = torch.randn(101, 24, generator=g)

    def run():
        vv = v.clone().requires_grad_(True)
        out = sde_step(x, vv, 0.7, 0.6, prev_sample=prev, v_ref=v_ref, impl=impl)
        (gv,) = torch.autograd.grad(out.log_prob.sum() + out.kl.sum(), vv)
        xl = logits.clone().requires_grad_(True)
        logp, ent = token_logprob_entropy(xl, targets, impl=impl)
        (gl,) = torch.autograd.grad(logp.sum() + ent.sum(), xl)
        sel = ovf_select(rewards, 7, impl=impl)
        return [out.log_prob, out.kl, gv, logp, ent, gl, sel.indices, sel.variance]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
