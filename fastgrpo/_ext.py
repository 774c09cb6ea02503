"""The optional C++ extension `fastgrpo._C` (csrc/): found prebuilt, or built lazily with ninja on first use.

Order of attempts, once per process (the outcome is remembered):

1. ``FASTGRPO_BUILD_EXT=0`` in the environment: disabled, nothing is built or imported, no warning.
2. A module ``fastgrpo._C`` built ahead of time (``FASTGRPO_BUILD_EXT=1 pip install .``, see setup.py).
3. ``torch.utils.cpp_extension.load`` on the sources in csrc/: ninja compiles them into a cache directory
   (``$TORCH_EXTENSIONS_DIR/fastgrpo_C`` when that variable is set, else
   ``~/.cache/fastgrpo/<python>-<torch>-<hash of the sources' folder>/``, or under ``$XDG_CACHE_HOME``) and reuses
   the result while the sources and flags are unchanged. The folder's hash keeps two checkouts (two clones, git
   worktrees) from sharing one build: ninja's build file names the sources by absolute path, so a shared folder
   would be rebuilt from scratch each time the other checkout loads it.

Concurrent builds. A build holds an ``flock`` on ``fastgrpo.lock`` in the cache directory for its whole duration
(the file records the owner's host and PID, for people). The OS releases that lock when its owner dies, however
it dies (SIGKILL, SIGTERM, a crash), so:

* a live concurrent build (another process, or another rank of the same training) is waited for, and its result
  reused; a note goes to stderr once the wait passes a few seconds;
* torch's own lock file ``lock`` in that directory, which a killed build leaves behind and on which torch would
  wait forever, is known to be stale once the ``flock`` is ours: it is removed, with one ``RuntimeWarning``, and
  the extension is (re)built;
* a wait longer than ``FASTGRPO_EXT_LOCK_TIMEOUT`` seconds (default 600) stops waiting: the ops use the torch
  path, with one ``RuntimeWarning`` naming the lock file and ``make ext-clean``. On a file system without
  ``flock`` the same bound applies to waiting on torch's ``lock`` file itself.

When step 3 fails (no compiler, no ninja, a compile error) the ops fall back to their torch path, with one
``RuntimeWarning`` per process that says why; ``fastgrpo env`` and `failure_reason` report it too. The module
is registered as ``sys.modules["fastgrpo._C"]`` so ``import fastgrpo._C`` works either way.

The kernels are plain C++ with OpenMP (``-fopenmp``); the OpenMP runtime is the one torch already loaded
(``libgomp.so.1``), so ``torch.set_num_threads`` also sets the kernels' thread count.

Vector ISA (issue 20). The lazy build targets the best ISA of the CPU it runs on (``FASTGRPO_CPU_ISA=auto``, the
default: avx512 when /proc/cpuinfo lists AVX-512 F/BW/CD/DQ/VL, else avx2, else generic), or the one
``FASTGRPO_CPU_ISA`` names (avx512, avx2, native, generic); see `ISA_FLAGS`. ``generic`` is the portable build (hot
loops cloned for AVX2 and the baseline, picked at load time): what a compiler that refuses the ISA's flags, or a
failed ISA build, falls back to, and what ``setup.py`` builds ahead of time. Each ISA has its own cache folder
(``...-avx512``), so switching does not rebuild; `isa` and ``fastgrpo env`` say which one is loaded.

Output buffers (issue 20). Large outputs of the C++ ops are recycled by the extension instead of being freshly
mapped (and page-faulted) on every call: see ``OutputCache`` in csrc/bindings.cpp; ``FASTGRPO_CPU_CACHE_MB``
(default 1024, 0 = off) bounds the memory it keeps, ``fastgrpo._C.empty_cache()`` releases it.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

ENV_FLAG = "FASTGRPO_BUILD_EXT"
LOCK_TIMEOUT_ENV = "FASTGRPO_EXT_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOCK_FILE = "fastgrpo.lock"  # ours: an flock, released by the OS when its holder dies
TORCH_LOCK_FILE = "lock"  # torch.utils.cpp_extension's FileBaton: a bare file, left behind by a killed build
MODULE = "fastgrpo._C"
NAME = "fastgrpo_C"  # torch's name for the lazily built module (no dots allowed there)
SOURCES = ("bindings.cpp", "sde_step.cpp", "token_entropy.cpp", "ovf.cpp")
# -fno-trapping-math and -fno-math-errno let g++ if-convert and vectorise the loops; neither changes a result
# (unlike -ffast-math: no reassociation, no flush of NaN/inf handling).
CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]

# Vector ISA of the build (issue 20). FASTGRPO_CPU_ISA = auto (default: the best this CPU has, from /proc/cpuinfo),
# avx512, avx2, native (-march=native) or generic. generic is the portable build: the hot loops are compiled for
# AVX2+FMA and for the x86-64 baseline and picked at load time (csrc/common.h, target_clones). The others compile
# everything for one target (and drop the clones): avx512 = x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) with 512-bit vectors,
# which made the token kernels' forward 1.5x and backward 1.2x faster than the AVX2 clones on an AVX-512 CPU.
# Each ISA has its own build folder, so switching does not rebuild; a compiler that refuses the flags (an
# older g++, clang, another architecture), or a build that fails with them, falls back to generic.
ISA_ENV = "FASTGRPO_CPU_ISA"
ISAS = ("auto", "avx512", "avx2", "native", "generic")
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512", "-DFASTGRPO_HOT="],
    "avx2": ["-march=x86-64-v3", "-DFASTGRPO_HOT="],
    "native": ["-march=native", "-DFASTGRPO_HOT="],
    "generic": [],
}
_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2", "movbe"}
_AVX2 = {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}

_lock = threading.Lock()
_state: dict = {"done": False, "module": None, "reason": None, "build_s": None, "where": None, "isa": None}


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_isa(flags: Optional[set] = None) -> str:
    """The best ISA of `ISA_FLAGS` this x86-64 CPU runs (avx512, avx2), else generic."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    flags = cpu_flags() if flags is None else flags
    if _AVX512 <= flags:
        return "avx512"
    if _AVX2 <= flags:
        return "avx2"
    return "generic"


def requested_isa() -> str:
    """The ISA asked for by ``FASTGRPO_CPU_ISA`` (auto resolved with `detect_isa`); ValueError on other values."""
    raw = os.environ.get(ISA_ENV, "").strip().lower() or "auto"
    if raw not in ISAS:
        raise ValueError(f"{ISA_ENV}={raw!r} is not one of {ISAS}")
    return detect_isa() if raw == "auto" else raw


def _compiler_accepts(flags: list) -> bool:
    """Whether the C++ compiler torch builds with takes ``flags`` (compiles an empty file: ~50 ms)."""
    if not flags:
        return True
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int probe() { return 0; }\n")
        try:
            res = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                                 capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return res.returncode == 0


def disabled() -> bool:
    """True when the environment disables the extension (``FASTGRPO_BUILD_EXT=0``)."""
    return os.environ.get(ENV_FLAG, "").strip() == "0"


def source_dir() -> Path:
    """The C++ sources: fastgrpo/csrc in an installed package, csrc/ beside it in a checkout (editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if (installed / SOURCES[0]).is_file() else here.parent / "csrc"


def build_dir(isa: Optional[str] = None) -> Path:
    """Where the lazily built extension of ``isa`` (default: `requested_isa`) is cached (see the module
    docstring); the generic build keeps the folder it always had, the others get a ``-<isa>`` suffix."""
    import torch

    isa = requested_isa() if isa is None else isa
    suffix = "" if isa == "generic" else f"-{isa}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / (NAME + suffix)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    import hashlib

    where = hashlib.sha256(str(source_dir().resolve()).encode()).hexdigest()[:10]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}-{where}"
    return cache / "fastgrpo" / (tag + suffix)


def clean() -> list:
    """Remove the build caches of every ISA (``make ext-clean``); returns the folders removed."""
    import shutil

    gone = [build_dir(isa) for isa in ISA_FLAGS if build_dir(isa).exists()]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def _with_ninja_on_path():
    """Put the ninja of the `ninja` PyPI package (a dependency) on PATH: an unactivated venv does not."""
    try:
        import ninja
    except ImportError:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    return bin_dir


class LockTimeout(RuntimeError):
    """Another process held the build lock for longer than FASTGRPO_EXT_LOCK_TIMEOUT."""


def lock_timeout() -> float:
    """Seconds to wait for another process's build (``FASTGRPO_EXT_LOCK_TIMEOUT``, default 600)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _timeout_message(lock: Path, waited: float) -> str:
    return (f"waited {waited:.0f}s for the build lock {lock} (another process building {MODULE}, or a build that "
            f"was killed); remove it with `make ext-clean` (or delete {lock.parent}) if no build is running, or "
            f"raise {LOCK_TIMEOUT_ENV}")


@contextlib.contextmanager
def _build_lock(out: Path, poll_s: float = 0.1):
    """Hold the cross-process build lock of ``out`` (see the module docstring): wait for a live holder up to
    `lock_timeout` (then raise `LockTimeout`), and clear torch's lock file left behind by a killed build."""
    timeout, start, noted = lock_timeout(), time.monotonic(), False
    torch_lock = out / TORCH_LOCK_FILE
    try:
        import fcntl
    except ImportError:  # no flock (Windows): only bound the wait on torch's lock file
        fcntl = None
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            fd = None
    try:
        if fd is not None:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # no flock here (NFS)
                        os.close(fd)
                        fd = None
                        break
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise LockTimeout(_timeout_message(out / LOCK_FILE, waited))
                if not noted and waited >= 5.0:
                    print(f"fastgrpo: waiting for another process building {MODULE} (lock {out / LOCK_FILE}, "
                          f"{_lock_owner(out / LOCK_FILE)}); giving up after {timeout:.0f}s", file=sys.stderr)
                    noted = True
                time.sleep(poll_s)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode())
            if torch_lock.exists():  # nobody else can be building: left by a killed build
                try:
                    torch_lock.unlink()
                except FileNotFoundError:
                    pass
                warnings.warn(f"fastgrpo: removed the stale build lock {torch_lock}, left by a build of {MODULE} "
                              f"that was killed; building again", RuntimeWarning, stacklevel=2)
        else:
            while torch_lock.exists():
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise LockTimeout(_timeout_message(torch_lock, waited))
                time.sleep(poll_s)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "owner unknown"
    except OSError:
        return "owner unknown"


def _build(verbose: bool = False) -> ModuleType:
    """Compile csrc/ with ninja through torch.utils.cpp_extension (a no-op when the cache is fresh), holding the
    build lock (`_build_lock`), for `requested_isa`; falls back to the generic build when the compiler refuses
    that ISA's flags or the build with them fails. Sets ``_state["isa"]``."""
    from torch.utils import cpp_extension

    src = source_dir()
    missing = [s for s in SOURCES if not (src / s).is_file()]
    if missing:
        raise RuntimeError(f"C++ sources not found in {src} (missing {', '.join(missing)}); install from a source "
                           f"checkout, or build ahead of time with {ENV_FLAG}=1")
    _with_ninja_on_path()
    isa = requested_isa()
    if isa != "generic" and not _compiler_accepts(ISA_FLAGS[isa]):
        isa = "generic"

    def build(isa):
        out = build_dir(isa)
        out.mkdir(parents=True, exist_ok=True)
        with _build_lock(out):
            mod = cpp_extension.load(
                name=NAME, sources=[str(src / s) for s in SOURCES], extra_cflags=CFLAGS + ISA_FLAGS[isa],
                extra_ldflags=LDFLAGS, extra_include_paths=[str(src)], build_directory=str(out), verbose=verbose,
            )
        _state["isa"] = isa
        return mod

    if isa == "generic":
        return build(isa)
    try:
        return build(isa)
    except LockTimeout:
        raise
    except Exception as exc:  # the ISA build failed: the portable one, saying why
        warnings.warn(f"fastgrpo: building {MODULE} for {isa} failed ({_reason(exc)}); building the portable "
                      f"(generic) one", RuntimeWarning, stacklevel=4)
        return build("generic")


_COMPILER_ERROR = re.compile(r"([^\s:]+):(\d+):(?:\d+:)? (?:fatal )?error: (.*)")


def _reason(exc: BaseException) -> str:
    """A short why: the first compiler error (file:line: error: message) if there is one, else the exception's
    first line (all of a `LockTimeout`'s message, which names the lock file)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, LockTimeout):
        return text
    for line in text.splitlines():
        m = _COMPILER_ERROR.search(line)
        if m:
            return f"{Path(m.group(1)).name}:{m.group(2)}: error: {m.group(3).strip()}"
    first = text.splitlines()[0].strip()
    return first if len(first) <= 300 else first[:297] + "..."


def load(*, strict: bool = False, verbose: bool = False) -> Optional[ModuleType]:
    """The extension module, building it on the first call; None when disabled or when the build failed.

    The outcome is remembered for the process. ``strict=True`` retries a failed build and raises its error instead
    of warning (``make ext`` uses it, so CI fails loudly rather than skipping the C++ tests).
    """
    if _state["done"] and not strict:  # every op call: no lock once the outcome is known
        return _state["module"]
    with _lock:
        if not _state["done"] or (strict and _state["module"] is None and not disabled()):
            _attempt(strict, verbose)
        return _state["module"]


def _attempt(strict: bool, verbose: bool) -> None:
    if disabled():
        _state.update(done=True, module=None, reason=f"disabled by {ENV_FLAG}=0", build_s=None, where=None)
        return
    try:
        mod = importlib.import_module(MODULE)  # built ahead of time by setup.py (or loaded earlier)
        _state.update(done=True, module=mod, reason=None, build_s=0.0, where=getattr(mod, "__file__", None),
                      isa=getattr(mod, "ISA", None) or "generic")
        return
    except ImportError:
        pass
    start = time.perf_counter()
    try:
        mod = _build(verbose=verbose)
    except Exception as exc:  # any build failure: fall back to torch, say why once
        reason = _reason(exc)
        _state.update(done=True, module=None, reason=f"build failed: {reason}", build_s=None, where=None)
        if strict:
            raise
        warnings.warn(f"fastgrpo: the C++ extension {MODULE} could not be built ({reason}); CPU ops use the "
                      f"torch path. Set {ENV_FLAG}=0 to skip the build.", RuntimeWarning, stacklevel=4)
        return
    sys.modules[MODULE] = mod
    _state.update(done=True, module=mod, reason=None, build_s=time.perf_counter() - start,
                  where=getattr(mod, "__file__", None))


def available() -> bool:
    """True when the extension is usable (builds it on the first call)."""
    return load() is not None


def failure_reason() -> Optional[str]:
    """Why the extension is not usable (after `load`), or None."""
    load()
    return _state["reason"]


def isa() -> Optional[str]:
    """The vector ISA the loaded extension was built for (a key of `ISA_FLAGS`), or None when it is not usable."""
    return _state["isa"] if load() is not None else None


def describe() -> str:
    """One line for `fastgrpo env`: built (for which ISA, and where), disabled, or why the build failed."""
    mod = load()
    if mod is None:
        return f"{MODULE} not usable: {_state['reason']}"
    flags = " ".join(ISA_FLAGS.get(_state["isa"], [])) or "portable: AVX2/baseline clones"
    return f"{MODULE} built for {_state['isa']} ({flags}; {ISA_ENV}) at {_state['where']}"


def reset() -> None:
    """Forget the outcome so the next call tries again (tests; a changed environment)."""
    with _lock:
        _state.update(done=False, module=None, reason=None, build_s=None, where=None, isa=None)
        if sys.modules.get(MODULE) is not None and getattr(sys.modules[MODULE], "__name__", "") == NAME:
            del sys.modules[MODULE]


if __name__ == "__main__":  # python -m fastgrpo._ext: build now (verbose), report the time, fail loudly
    t0 = time.perf_counter()
    m = load(strict=True, verbose="-v" in sys.argv)
    if m is None:
        print(f"{MODULE}: {_state['reason']}")
    else:
        print(f"{MODULE} ready in {time.perf_counter() - t0:.1f}s: {m.__file__} (ISA {_state['isa']})")
