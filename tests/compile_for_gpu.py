"""Compile every Triton kernel for a real GPU target (default sm_90) without a GPU.

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter accepts code that the GPU compiler
rejects, e.g. unsupported dtypes or shapes). Each kernel module of ``fastgrpo.kernels`` lists the signatures and
constexprs its launchers use in ``compile_specs()``; every ``@triton.jit`` function of the module must appear there,
except device helpers named with a leading underscore (they are compiled inside the kernels that call them).
Prints one line per compiled variant and exits non-zero on the first failure.

A spec is ``(kernel, signature, constexprs)``, compiled with 4 warps and no alignment facts, or ``(kernel,
signature, constexprs, launch)`` for a variant as a real launch at the benchmark shapes builds it: ``launch`` gives
``num_warps`` / ``num_stages`` and ``divisible``, the arguments Triton's launcher finds divisible by 16 there
(``"*"``: every pointer, from torch's allocator; sizes and strides like V = 16384), which it passes to the compiler as
``tt.divisibility`` facts, so that the compiled code is the vectorised one a GPU runs (integer arguments equal to 1,
which the launcher turns into constants, go in ``constexprs``); ``ptx_has``, strings its PTX must contain (e.g.
``ld.global.v4``: the streaming kernels read 16 bytes per load there, a property that a change of indexing can
lose without changing a result).
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
        for spec in mod.compile_specs():
            kernel, signature, constexprs = spec[:3]
            launch = dict(spec[3]) if len(spec) > 3 else {}
            divisible = launch.pop("divisible", ())
            ptx_has = launch.pop("ptx_has", ())
            if "*" in divisible:  # shorthand: every pointer argument (torch's allocations are 256-byte aligned)
                pointers = [a for a, ty in signature.items() if ty.startswith("*")]
                divisible = pointers + [a for a in divisible if a != "*"]
            options = {"num_warps": 4, **launch}
            sig = dict(signature)
            sig.update({k: "constexpr" for k in constexprs})
            unknown = [a for a in divisible if a not in signature]
            assert not unknown, f"{kernel.__name__}: divisible names no runtime argument: {unknown}"
            attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
            src = ASTSource(kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options=options)
            assert "cubin" in compiled.asm or "ptx" in compiled.asm
            missing_ptx = [p for p in ptx_has if p not in compiled.asm["ptx"]]
            if missing_ptx:
                print(f"sm_{arch} {name}.{kernel.__name__} {constexprs}: the PTX has no {missing_ptx} (launch: "
                      f"{options}, divisible: {list(divisible)})", file=sys.stderr)
                return 1
            covered.add(kernel.__name__)
            n += 1
            how = f" (launch: {options}, {len(divisible)} arguments divisible by 16)" if len(spec) > 3 else ""
            print(f"sm_{arch} ok {name}.{kernel.__name__} {constexprs}{how}")
        missing = kernels - covered
        if missing:
            print(f"kernels without compile specs in {name}: {sorted(missing)}", file=sys.stderr)
            return 1
    print(f"compiled {n} kernel variants for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
