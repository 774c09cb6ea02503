"""The C++ extension's loader: disabled by FASTGRPO_BUILD_EXT=0, one warning and the torch path when the build
fails, what `fastgrpo env` reports, and results that do not depend on the thread count.

(The kernels themselves are tested against their float64 references in test_sde_step.py,
test_token_logprob_entropy.py and test_ovf.py, parametrised over impl="cpp".)
"""
import os
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


# --- reused output buffers (issue 20): large outputs are recycled, fully overwritten, and the cache can be off --

def _require_cpp():
    if not _ext.available():
        pytest.skip(f"the C++ extension fastgrpo._C is not usable: {_ext.failure_reason()}")


def test_large_outputs_are_reused_and_fully_overwritten():
    _require_cpp()
    C = _ext.load()
    if os.environ.get("FASTGRPO_CPU_CACHE_MB"):
        pytest.skip("the output cache is configured by FASTGRPO_CPU_CACHE_MB in this environment")
    g = torch.Generator().manual_seed(3)
    shape = (3, 5, 97, 131)  # 762 KiB per float32 output: above the cache's 256 KiB floor, odd sizes
    first = [torch.randn(shape, generator=g) for _ in range(3)]
    out = sde_step(*first[:2], 0.9, 0.4, noise=first[2], impl="cpp")
    ptrs = {out.mean.data_ptr(), out.prev_sample.data_ptr()}
    del out
    assert C.cached_bytes() >= 2 * 3 * 5 * 97 * 131 * 4
    x, v, noise = (torch.randn(shape, generator=g) * 3 for _ in range(3))
    again = sde_step(x, v, 0.7, 0.65, noise=noise, impl="cpp")
    assert {again.mean.data_ptr(), again.prev_sample.data_ptr()} == ptrs  # the same blocks, no new mapping
    ref = sde_step_ref(x.double(), v.double(), 0.7, 0.65, noise=noise.double())
    for name in ("mean", "prev_sample", "log_prob"):
        torch.testing.assert_close(getattr(again, name).double(), getattr(ref, name), rtol=1e-5, atol=1e-5)
    # gradients come from the cache too, and are exact after reuse of a block that held other values
    for _ in range(2):
        vv = v.clone().requires_grad_(True)
        o = sde_step(x, vv, 0.7, 0.65, prev_sample=noise, v_ref=x, impl="cpp")
        (gv,) = torch.autograd.grad(o.log_prob.sum() + o.kl.sum(), vv)
        v64 = v.double().requires_grad_(True)
        r = sde_step_ref(x.double(), v64, 0.7, 0.65, prev_sample=noise.double(), v_ref=x.double())
        (g64,) = torch.autograd.grad(r.log_prob.sum() + r.kl.sum(), v64)
        torch.testing.assert_close(gv.double(), g64, rtol=1e-4, atol=1e-6)
        del o, gv
    del again
    assert C.empty_cache() > 0 and C.cached_bytes() == 0


def test_output_cache_off_by_environment():
    _require_cpp()
    import subprocess
    import sys

    code = ("import torch; from fastgrpo import _ext, sde_step; C = _ext.load(); x = torch.randn(4, 100_000); "
            "o = sde_step(x, x, 0.9, 0.4, noise=x, impl='cpp'); del o; print(C.cached_bytes())")
    env = {**os.environ, "FASTGRPO_CPU_CACHE_MB": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0"


# --- the vector ISA of the build (issue 20) ------------------------------------------------------------------

def test_isa_is_detected_from_cpu_flags(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    avx2 = {"sse2", "avx", "avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert _ext.detect_isa(avx512) == "avx512"
    assert _ext.detect_isa(avx512 - {"avx512vl"}) == "avx2"  # AVX-512 F without VL (Knights Landing): not v4
    assert _ext.detect_isa(avx2) == "avx2"
    assert _ext.detect_isa(avx2 - {"fma"}) == "generic"
    assert _ext.detect_isa(set()) == "generic"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert _ext.detect_isa(avx512) == "generic"


def test_isa_from_environment_and_its_own_build_folder(monkeypatch):
    monkeypatch.setenv("FASTGRPO_CPU_ISA", "generic")
    assert _ext.requested_isa() == "generic"
    generic = _ext.build_dir()
    monkeypatch.setenv("FASTGRPO_CPU_ISA", "AVX2")
    assert _ext.requested_isa() == "avx2"
    assert _ext.build_dir() == generic.with_name(generic.name + "-avx2")  # keyed by the flags: no rebuild
    monkeypatch.setenv("FASTGRPO_CPU_ISA", "auto")
    assert _ext.requested_isa() == _ext.detect_isa()
    monkeypatch.setenv("FASTGRPO_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FASTGRPO_CPU_ISA='sse9'"):
        _ext.requested_isa()
    assert _ext.ISA_FLAGS["generic"] == [] and all("-DFASTGRPO_HOT=" in f for k, f in _ext.ISA_FLAGS.items()
                                                     if k != "generic")


def test_a_refused_isa_falls_back_to_the_portable_build(monkeypatch):
    """The compiler probe: flags it does not know mean the generic build (checked without building)."""
    assert _ext._compiler_accepts([])
    assert not _ext._compiler_accepts(["-march=no-such-cpu-fastgrpo"])


def test_loaded_extension_reports_its_isa():
    _require_cpp()
    mod = _ext.load()
    assert _ext.isa() in _ext.ISA_FLAGS
    assert f"built for {_ext.isa()}" in _ext.describe()
    if _ext.isa() in ("avx512", "avx2"):  # what the compiler was told is what the module was compiled for
        assert mod.ISA == _ext.isa()


@pytest.mark.slow  # builds the other ISA's extension (~40 s) and runs the kernels' float64 tests with it
def test_the_other_isa_build_passes_the_float64_tests(tmp_path):
    _require_cpp()
    import subprocess
    import sys
    from pathlib import Path

    other = "generic" if _ext.isa() != "generic" else _ext.detect_isa()
    if other == "generic" and _ext.isa() == "generic":
        pytest.skip("this CPU has no vector ISA beyond the portable build")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "FASTGRPO_CPU_ISA": other, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpp",
                          str(root / "tests/test_sde_step.py"), str(root / "tests/test_token_logprob_entropy.py"),
                          str(root / "tests/test_ovf.py")], env=env, cwd=root, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# --- the build lock: a killed build must not hang later processes, a live one is waited for -------------------

_LOCK_TEST_NAME = "fastgrpo_C_lock_test"
_LOCK_SCRIPT = r'''
import json, sys, time, warnings
from pathlib import Path
from fastgrpo import _ext
mode, src = sys.argv[1], Path(sys.argv[2])
_ext.NAME = "%s"
_ext.source_dir = lambda: src
if mode in ("hang", "slow"):  # a real build through torch's FileBaton whose compile step hangs / is slow
    from torch.utils import cpp_extension
    compile_ = cpp_extension._write_ninja_file_and_build_library
    def build(*a, **k):
        print("building", flush=True)
        time.sleep(3600 if mode == "hang" else 4)
        return compile_(*a, **k)
    cpp_extension._write_ninja_file_and_build_library = build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mod = _ext.load()
print(json.dumps({"built": mod is not None, "reason": _ext._state["reason"],
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}), flush=True)
''' % _LOCK_TEST_NAME


@pytest.fixture
def lock_build(tmp_path):
    """Start loader processes on a tiny C-API module, built in a private TORCH_EXTENSIONS_DIR (never the shared
    cache): start(mode) -> Popen; finish(proc, timeout) -> the JSON it printed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import is_ninja_available

    _ext._with_ninja_on_path()
    if not is_ninja_available():
        pytest.skip("ninja is not installed (it is a dependency of fastgrpo: pip install ninja)")
    src = tmp_path / "csrc"
    src.mkdir()
    for name in _ext.SOURCES:
        (src / name).write_text("\n")
    (src / "bindings.cpp").write_text(
        "#include <Python.h>\n"
        f'static struct PyModuleDef def_ = {{PyModuleDef_HEAD_INIT, "{_LOCK_TEST_NAME}", nullptr, -1, nullptr}};\n'
        f"PyMODINIT_FUNC PyInit_{_LOCK_TEST_NAME}(void) {{ return PyModule_Create(&def_); }}\n")
    script = tmp_path / "load.py"
    script.write_text(_LOCK_SCRIPT)
    root = str(Path(_ext.__file__).resolve().parent.parent)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "build"), OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTGRPO_BUILD_EXT", None)
    env["FASTGRPO_CPU_ISA"] = "generic"  # the build folder below is the generic one (others get a suffix)
    procs = []

    def start(mode, **extra_env):
        p = subprocess.Popen([sys.executable, str(script), mode, str(src)], env={**env, **extra_env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    def finish(p, timeout):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            pytest.fail(f"the loader did not return within {timeout}s (waiting on a lock forever?)")
        assert p.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1]), err

    def wait_building(p):
        line = p.stdout.readline()
        assert line.strip() == "building", (line, p.stderr.read()[-3000:] if p.poll() is not None else "")

    yield start, finish, wait_building, tmp_path / "build" / _LOCK_TEST_NAME
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.slow  # several processes: `make test-slow` (and CI) runs it
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_build_does_not_hang_the_next_process(lock_build, sig):
    """Regression (issue 14): a build killed mid-way left torch's lock file and every later process waited on it
    forever, silently. Now the next process sees that no live process holds the lock, clears it with one warning
    and builds."""
    import signal

    start, finish, wait_building, out = lock_build
    killed = start("hang")
    wait_building(killed)
    killed.send_signal(getattr(signal, sig))
    killed.communicate(timeout=60)
    assert (out / _ext.TORCH_LOCK_FILE).exists()  # what a killed build leaves behind
    result, _ = finish(start("load", FASTGRPO_EXT_LOCK_TIMEOUT="600"), timeout=180)
    assert result["built"], result
    assert len(result["warnings"]) == 1 and "stale build lock" in result["warnings"][0], result
    assert str(out / _ext.TORCH_LOCK_FILE) in result["warnings"][0]
    assert not (out / _ext.TORCH_LOCK_FILE).exists()


@pytest.mark.slow  # several processes: `make test-slow` (and CI) runs it
def test_a_live_build_is_waited_for(lock_build):
    start, finish, wait_building, out = lock_build
    first = start("slow")
    wait_building(first)
    second = start("load")  # starts while the first one holds the lock
    result, _ = finish(second, timeout=180)
    assert result == {"built": True, "reason": None, "warnings": []}  # waited, did not clear a live lock
    result, _ = finish(first, timeout=180)
    assert result == {"built": True, "reason": None, "warnings": []}


@pytest.mark.slow  # several processes: `make test-slow` (and CI) runs it
def test_a_lock_held_too_long_falls_back_to_torch(lock_build):
    start, finish, wait_building, out = lock_build
    holder = start("hang")
    wait_building(holder)
    result, _ = finish(start("load", FASTGRPO_EXT_LOCK_TIMEOUT="1"), timeout=120)
    assert not result["built"] and len(result["warnings"]) == 1, result
    message = result["warnings"][0]
    assert "torch path" in message and str(out / _ext.LOCK_FILE) in message and "make ext-clean" in message
    assert "FASTGRPO_EXT_LOCK_TIMEOUT" in message and "make ext-clean" in result["reason"]
