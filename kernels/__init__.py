"""Triton kernels of fastgrpo (shipped as the package ``fastgrpo.kernels``).

Only ``@triton.jit`` functions and their launch helpers live here; they import nothing but torch and triton.
The public ops, their references and autograd wiring are in ``fastgrpo.ops``.

Every kernel module lists, in ``compile_specs()``, the argument types and constexpr values its launchers use, so
the test suite can compile each kernel for a real GPU target (sm_90) on a machine without a GPU.
"""

KERNEL_MODULES = ("sde_step", "ovf")
