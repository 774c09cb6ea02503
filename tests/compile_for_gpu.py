"""Compile every Triton kernel for a real GPU target (default sm_90) without a GPU.

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter accepts code that the GPU compiler
rejects, e.g. unsupported dtypes or shapes). Each kernel module of ``fastgrpo.kernels`` lists the signatures and
constexprs its launchers use in ``compile_specs()``; every ``@triton.jit`` function of the module must appear there,
except device helpers named with a leading underscore (they are compiled inside the kernels that call them).
Prints one line per compiled variant and exits non-zero on the first failure.
"""
import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def main(arch: int = 90) -> int:
    from fastgrpo.kernels import KERNEL_MODULES

    target = GPUTarget("cuda", arch, 32)
    n = 0
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"fastgrpo.kernels.{name}")
        kernels = {k for k, obj in vars(mod).items() if isinstance(obj, JITFunction) and not k.startswith("_")}
        covered = set()
        for kernel, signature, constexprs in mod.compile_specs():
            sig = dict(signature)
            sig.update({k: "constexpr" for k in constexprs})
            src = ASTSource(kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": 4})
            assert "cubin" in compiled.asm or "ptx" in compiled.asm
            covered.add(kernel.__name__)
            n += 1
            print(f"sm_{arch} ok {name}.{kernel.__name__} {constexprs}")
        missing = kernels - covered
        if missing:
            print(f"kernels without compile specs in {name}: {sorted(missing)}", file=sys.stderr)
            return 1
    print(f"compiled {n} kernel variants for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
